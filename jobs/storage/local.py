"""Local files: atomic writes are a temp file beside the target, then `os.replace`."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

from .base import NotFoundError, Storage, StorageError

# (EEXIST: os.makedirs found a file where the folder should be).
PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                              errno.EROFS, errno.EEXIST})


def _os_error(path: str, action: str, error: OSError) -> StorageError:
    return StorageError(f"{path}: cannot {action}: {error.strerror or error}",
                        permanent=error.errno in PERMANENT_ERRNOS)



class LocalStorage(Storage):
    scheme = "file"

    def list(self, prefix: str) -> list[str]:
        root = _local(prefix)
        if not os.path.isdir(root):
            return []
        found = []
        for folder, _dirs, files in os.walk(root):
            found.extend(os.path.join(folder, name) for name in files)
        return sorted(found)

    def read_bytes(self, path: str) -> bytes:
        try:
            with open(_local(path), "rb") as handle:
                return handle.read()
        except OSError as error:
            raise _os_error(path, "read", error) from None

    def write_atomic(self, path: str, data: bytes) -> None:
        target = _local(path)
        folder = os.path.dirname(os.path.abspath(target))
        try:
            os.makedirs(folder, exist_ok=True)
            # A dot prefix keeps temp files out of `part-*` globs and pyarrow's listings.
            fd, temp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(target)}-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(temp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
                os.replace(temp, target)
            except BaseException:
                if os.path.exists(temp):
                    os.unlink(temp)
                raise
        except OSError as error:
            raise _os_error(path, "write", error) from None

    def exists(self, path: str) -> bool:
        return os.path.isfile(_local(path))

    def check_writable(self, folder: str) -> None:
        root = _local(folder)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as error:
            raise StorageError(f"{os.path.abspath(root)}: cannot create the output folder: "
                               f"{error.strerror or error}", permanent=True) from None
        probe = os.path.join(root, f".tmp-write-probe-{os.getpid()}")
        try:
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as error:
            raise StorageError(f"{os.path.abspath(root)}: cannot write in the output folder: "
                               f"{error.strerror or error}", permanent=True) from None

    def version(self, path: str) -> Any:
        try:
            info = os.stat(_local(path))
        except FileNotFoundError:
            raise NotFoundError(f"{path}: no such file") from None
        except OSError as error:
            raise _os_error(path, "read", error) from None
        return (info.st_size, info.st_mtime_ns, info.st_ino)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(_local(path))

    def delete(self, path: str) -> None:
        try:
            os.unlink(_local(path))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _os_error(path, "delete", error) from None

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def arrow_filesystem(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def arrow_path(self, path: str) -> str:
        return os.path.abspath(_local(path))


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path

