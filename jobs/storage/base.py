"""The storage interface every backend implements, and its errors."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(Exception):
    """A storage operation failed; the message names the file, or bucket and key.

    `permanent` marks a failure that no retry can mend (permission denied, a file where a
    folder should be, no such bucket): the job stops at once instead of retrying it.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class NotFoundError(StorageError):
    """The object (or its bucket) does not exist."""


# OS errors that a retry cannot mend: the same write fails the same way every time


class Storage:
    """Interface; see LocalStorage and S3Storage."""

    scheme = ""

    def list(self, prefix: str) -> list[str]:
        """Files below the folder/prefix `prefix` (recursive), sorted; [] when none."""
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes:
        raise NotImplementedError

    def write_atomic(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def is_dir(self, path: str) -> bool:
        """A local folder, or an S3 prefix with objects below it."""
        raise NotImplementedError

    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""
        raise NotImplementedError

    def join(self, *parts: str) -> str:
        raise NotImplementedError

    def arrow_filesystem(self) -> pafs.FileSystem:
        raise NotImplementedError

    def arrow_path(self, path: str) -> str:
        """`path` as `arrow_filesystem()` names it."""
        raise NotImplementedError

    def open_input_file(self, path: str) -> pa.NativeFile:
        """A seekable file for pyarrow readers (Parquet reads only the ranges it needs)."""
        return self.arrow_filesystem().open_input_file(self.arrow_path(path))

    def check_writable(self, folder: str) -> None:
        """Raise StorageError unless files can be written under `folder` (checked before
        any work, so a job never generates images it cannot keep). Object stores are
        judged by their listing (a missing bucket, access denied) instead."""

    def abort_uploads(self, prefix: str, keep: Callable[[str], bool] | None = None) -> int:
        """Abort unfinished multipart uploads under ``prefix`` (whose keys ``keep`` does not
        protect); returns how many. Only object stores have them."""
        return 0

    def version(self, path: str) -> Any:
        """What changes when the file does (size and modification time, ETag on S3), for
        caches; None where unknown (nothing is cached then)."""
        return None



class ReadOnlyRaw(io.RawIOBase):
    """A raw file whose subclasses define `read(size)`: reading everything is one read,
    and `readinto` fills the buffer from one read (what pyarrow's PythonFile calls)."""

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

