"""Seeds: the range torch's generators take, and the seed an image gets from an id."""

from __future__ import annotations

import hashlib

MAX_SEED = 2**63 - 1  # seeds are stored as int64 and fed to torch's manual_seed


def derive_seed(base_seed: int, image_id: str) -> int:
    """A reproducible seed in [0, 2**63) from a base seed and an image id."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED
