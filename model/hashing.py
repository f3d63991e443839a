"""What identifies a model: a sha256 over its weights, from its files or its modules.

The hash goes into every output row (`model`) and the manifest, so it must change with
any weight and never with where the model is stored or what it is called.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch


class HashCancelled(Exception):
    """files_hash stopped early because its caller no longer needs the result."""


def files_hash(files: dict[str, Path], stop: threading.Event | None = None) -> str:
    """sha256 over each file's role, size and full bytes, in sorted role order.

    ``files`` maps a role that does not depend on where the model is stored (say
    ``unet/config.json``) to a path. It covers every weight and config file that shaped
    the model, so any change to a weight changes the hash, while copying the model
    elsewhere or renaming it does not. Reading and hashing 2 GB takes 1-3 s; `load_components`
    runs it beside the load (`BackgroundHash`). A set `stop` ends it with HashCancelled.
    """
    digest = hashlib.sha256()
    for role in sorted(files):
        path = files[role]
        digest.update(f"{role}:{path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                if stop is not None and stop.is_set():
                    raise HashCancelled(str(path))
                digest.update(chunk)
    return digest.hexdigest()


class BackgroundHash:
    """`files_hash` on a thread while the weights load: file reads and sha256 updates of
    large chunks release the GIL, so the hash costs the load nothing where a core is free."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._stop = threading.Event()
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(files,), daemon=True,
                                        name="ldm-content-hash")
        self._thread.start()

    def _run(self, files: dict[str, Path]) -> None:
        try:
            self._outcome["hash"] = files_hash(files, self._stop)
        except BaseException as error:  # handed to the caller by result()
            self._outcome["error"] = error

    def result(self) -> str:
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["hash"]

    def cancel(self) -> None:
        """The load failed: stop reading (the thread ends at its next chunk)."""
        self._stop.set()
        self._thread.join()


def modules_hash(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for prefix in sorted(modules):
        for key, tensor in sorted(modules[prefix].state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
