"""Weights files, read lazily: the key list and shapes first, tensors one at a time.

``.safetensors`` is memory-mapped; pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``,
``.bin``) are read only through ``torch.load(weights_only=True)``: a file that needs
anything beyond plain tensors is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class CheckpointError(Exception):
    """A weights file that cannot be read or does not fit the model; names file and keys."""


class Source:
    """Lazy access to one weights file: key list and shapes without reading data."""

    def __init__(self, path: Path):
        self.path = path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsSource(Source):
    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own untyped errors
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({e})") from None


class DictSource(Source):
    """A pickled checkpoint, already loaded (memory-mapped where the format allows)."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        super().__init__(path)
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # mmap needs torch's zip format; the legacy format is read whole
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is long; the line naming the refused global or opcode is the news
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), "")
        reason = reason.rstrip(".") or (lines[-1] if lines else "")
        raise CheckpointError(
            f"{path}: refused: not a plain weights file; torch.load(weights_only=True) stopped at: "
            f"{reason!r}. Unpickling anything beyond tensors could run code. If you trust the file, "
            "convert it to .safetensors."
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(f"{path}: not a readable checkpoint file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    # non-tensor entries (step counters and the like) are not weights
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def open_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in PICKLE_SUFFIXES:
        return DictSource(path, _torch_load(path))
    raise CheckpointError(f"{path}: unknown weights format (expected one of {list(SINGLE_FILE_SUFFIXES)})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.bin`` file, on the CPU."""
    source = open_source(path)
    return {key: source.get(key) for key in source.keys()}
