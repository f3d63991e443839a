"""One small storage interface over local files and S3-compatible object stores.

Paths are full locations: a local path, or `s3://bucket/key`. `open_storage(uri)` picks
the implementation by scheme. Writes are atomic: locally a temp file beside the target
then `os.replace`; on S3 a single PUT or a completed multipart upload, so a reader never
sees half a file. pyarrow reads through `arrow_filesystem()` for ranged reads of Parquet.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .spec import StorageSpec

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # one PUT below this, a multipart upload above


class StorageError(Exception):
    """A storage operation failed; the message names the file, or bucket and key."""


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
            raise StorageError(f"{path}: cannot read: {error.strerror or error}") from None

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
            raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None

    def exists(self, path: str) -> bool:
        return os.path.isfile(_local(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(_local(path))

    def delete(self, path: str) -> None:
        try:
            os.unlink(_local(path))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StorageError(f"{path}: cannot delete: {error.strerror or error}") from None

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def arrow_filesystem(self) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def arrow_path(self, path: str) -> str:
        return os.path.abspath(_local(path))


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve_endpoint(storage_spec: StorageSpec | None) -> str | None:
    """The spec's endpoint, else the variables boto3 itself reads, most specific first."""
    if storage_spec is not None and storage_spec.endpoint_url:
        return storage_spec.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Storage(Storage):
    scheme = "s3"

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        # Custom endpoints (MinIO, Ceph, R2, moto) rarely support virtual-host buckets.
        s3_options = {"addressing_style": "path"} if endpoint_url else {}
        config = Config(retries={"max_attempts": 8, "mode": "adaptive"}, s3=s3_options,
                        connect_timeout=10, read_timeout=120)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=self.region,
                                   config=config)
        self._arrow_fs: pafs.FileSystem | None = None

    def _error(self, error: Exception, bucket: str, key: str, action: str) -> StorageError:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        where = f"s3://{bucket}/{key}"
        if code == "NoSuchBucket":
            return StorageError(f"{where}: bucket '{bucket}' does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{where}: no such key '{key}' in bucket '{bucket}'")
        return StorageError(f"{where}: cannot {action}: {error}")

    def list(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"  # list a folder, not every key that merely starts alike
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                found.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
        except Exception as error:
            raise self._error(error, bucket, key, "list") from None
        return sorted(path for path in found if not path.endswith("/"))

    def read_bytes(self, path: str) -> bytes:
        bucket, key = split_s3(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:
            raise self._error(error, bucket, key, "read") from None

    def write_atomic(self, path: str, data: bytes) -> None:
        bucket, key = split_s3(path)
        try:
            if len(data) < MULTIPART_THRESHOLD:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            else:
                from boto3.s3.transfer import TransferConfig

                # The object appears only when the upload completes; boto3 aborts on failure.
                config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                        multipart_chunksize=MULTIPART_THRESHOLD)
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
        except Exception as error:
            raise self._error(error, bucket, key, "write") from None

    def exists(self, path: str) -> bool:
        bucket, key = split_s3(path)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as error:
            failure = self._error(error, bucket, key, "check")
            if "no such key" in str(failure):
                return False
            raise failure from None

    def is_dir(self, path: str) -> bool:
        bucket, key = split_s3(path)
        if key and not key.endswith("/"):
            key += "/"
        try:
            reply = self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except Exception as error:
            raise self._error(error, bucket, key, "list") from None
        return reply.get("KeyCount", 0) > 0

    def delete(self, path: str) -> None:
        bucket, key = split_s3(path)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as error:
            raise self._error(error, bucket, key, "delete") from None

    def join(self, *parts: str) -> str:
        return "/".join(part.strip("/") if i else part.rstrip("/") for i, part in enumerate(parts))

    def arrow_filesystem(self) -> pafs.FileSystem:
        if self._arrow_fs is None:
            options: dict[str, Any] = {"region": self.region}
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                options["endpoint_override"] = parsed.netloc or parsed.path
                options["scheme"] = parsed.scheme or "https"
                options["force_virtual_addressing"] = False
            self._arrow_fs = pafs.S3FileSystem(**options)
        return self._arrow_fs

    def arrow_path(self, path: str) -> str:
        bucket, key = split_s3(path)
        return f"{bucket}/{key}"


def open_storage(uri: str, storage_spec: StorageSpec | None = None) -> Storage:
    """Storage for `uri`: `s3://` -> S3 (endpoint from the spec or AWS env), else local."""
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if scheme not in _OPENERS:
        raise StorageError(f"{uri}: unsupported scheme '{scheme}' (use a local path or s3://)")
    return _OPENERS[scheme](storage_spec)


def _open_s3(storage_spec: StorageSpec | None) -> Storage:
    region = storage_spec.region if storage_spec is not None else None
    return S3Storage(resolve_endpoint(storage_spec), region)


_OPENERS = {
    "": lambda _spec: LocalStorage(),
    "file": lambda _spec: LocalStorage(),
    "s3": _open_s3,
}
