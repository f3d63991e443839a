"""One small storage interface over local files and S3-compatible object stores.

Paths are full locations: a local path, or `s3://bucket/key`. `open_storage(uri)` picks
the implementation by scheme. Writes are atomic: locally a temp file beside the target
then `os.replace`; on S3 a single PUT or a completed multipart upload (aborted when any
part fails), so a reader never sees half a file. Parquet is read through
`open_input_file()` (ranged reads); `arrow_filesystem()` serves other pyarrow callers.

The backends live in their own modules (`local`, `s3`); the errors, the interface and
the credential scrubbing are shared by both. Details of S3's retries: `s3`'s docstring.
"""

from __future__ import annotations

from urllib.parse import urlparse

from ..spec import StorageSpec
from .base import NotFoundError, ReadOnlyRaw, Storage, StorageError
from .local import LocalStorage
from .redact import scrub, strip_userinfo
from .s3 import RetryPolicy, S3Storage, is_transient, open_s3, resolve_endpoint, split_s3

__all__ = [
    "LocalStorage", "NotFoundError", "ReadOnlyRaw", "RetryPolicy", "S3Storage", "Storage",
    "StorageError", "is_transient", "open_storage", "resolve_endpoint", "scrub", "split_s3",
    "strip_userinfo",
]


def open_storage(uri: str, storage_spec: StorageSpec | None = None) -> Storage:
    """Storage for `uri`: `s3://` -> S3 (endpoint from the spec or AWS env), else local."""
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if scheme not in _OPENERS:
        raise StorageError(
            f"{scrub(uri)}: unsupported scheme '{scheme}' (use a local path or s3://)")
    return _OPENERS[scheme](storage_spec)



# scheme -> backend
_OPENERS = {
    "": lambda _spec: LocalStorage(),
    "file": lambda _spec: LocalStorage(),
    "s3": open_s3,
}
