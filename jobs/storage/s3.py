"""S3-compatible object stores (AWS, MinIO, R2, Ceph) through boto3.

S3 requests that fail transiently (connection reset or refused, timeouts, truncated
bodies, HTTP 5xx, SlowDown and other throttling) are retried by this module, with
exponential backoff and jitter, a bounded number of times within a bounded time; botocore's
own retries are off so that the bound holds. Every other failure (AccessDenied,
NoSuchBucket, ...) and the last transient one surface as a StorageError that names the
bucket and key, never a credential. The policy's defaults are the module constants below;
the `LDM_JOBS_S3_*` environment variables override them per process.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ..spec import StorageSpec
from .base import NotFoundError, ReadOnlyRaw, Storage, StorageError
from .redact import scrub, strip_userinfo

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # one PUT below this, a multipart upload above
MULTIPART_MIN_PART = 5 * 1024 * 1024  # S3's smallest part (all but the last)
MULTIPART_MAX_PARTS = 10_000  # S3's most parts per upload
MULTIPART_CONCURRENCY = 4  # parts in flight at once

# Retries of transient S3 failures. Each default is overridden by its variable when set.
RETRY_ATTEMPTS = 6  # LDM_JOBS_S3_ATTEMPTS: tries per operation, the first one included
RETRY_BASE_SECONDS = 0.5  # LDM_JOBS_S3_RETRY_BASE: the first backoff; doubles per retry
RETRY_MAX_SECONDS = 10.0  # LDM_JOBS_S3_RETRY_MAX: the longest single backoff
RETRY_DEADLINE_SECONDS = 60.0  # LDM_JOBS_S3_RETRY_DEADLINE: no retry starts after this long
CONNECT_TIMEOUT_SECONDS = 10.0  # LDM_JOBS_S3_CONNECT_TIMEOUT
READ_TIMEOUT_SECONDS = 60.0  # LDM_JOBS_S3_READ_TIMEOUT: one silent socket read at most

log = logging.getLogger(__name__)
T = TypeVar("T")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{scrub(uri)}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # most specific first
_warned_endpoint_userinfo: set[str] = set()


def resolve_endpoint(storage_spec: StorageSpec | None) -> str | None:
    """The spec's endpoint, else the variables boto3 itself reads, most specific first.

    Never with URL userinfo: `http://user:secret@host:9000` from the environment becomes
    `http://host:9000`, as the spec's endpoint does (S3 signs requests with the AWS
    credentials, never with userinfo), so the secret cannot reach a message or a log.
    """
    if storage_spec is not None and storage_spec.endpoint_url:
        return strip_userinfo(storage_spec.endpoint_url)
    for name in ENDPOINT_VARIABLES:
        value = os.environ.get(name)
        if value:
            stripped = strip_userinfo(value)
            if stripped != value and name not in _warned_endpoint_userinfo:
                _warned_endpoint_userinfo.add(name)
                log.warning("%s: credentials in the URL were ignored; they come from the AWS "
                            "environment only (AWS_ACCESS_KEY_ID, ...)", name)
            return stripped
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How S3 requests are retried; `RetryPolicy.current()` reads the constants and env."""

    attempts: int = RETRY_ATTEMPTS
    base_seconds: float = RETRY_BASE_SECONDS
    max_seconds: float = RETRY_MAX_SECONDS
    deadline_seconds: float = RETRY_DEADLINE_SECONDS
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS
    read_timeout: float = READ_TIMEOUT_SECONDS

    @classmethod
    def current(cls) -> RetryPolicy:
        """The module constants (read now, so tests may patch them), env variables first."""
        return cls(
            attempts=max(1, int(_env_number("LDM_JOBS_S3_ATTEMPTS", RETRY_ATTEMPTS))),
            base_seconds=_env_number("LDM_JOBS_S3_RETRY_BASE", RETRY_BASE_SECONDS),
            max_seconds=_env_number("LDM_JOBS_S3_RETRY_MAX", RETRY_MAX_SECONDS),
            deadline_seconds=_env_number("LDM_JOBS_S3_RETRY_DEADLINE", RETRY_DEADLINE_SECONDS),
            connect_timeout=_env_number("LDM_JOBS_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT_SECONDS),
            read_timeout=_env_number("LDM_JOBS_S3_READ_TIMEOUT", READ_TIMEOUT_SECONDS),
        )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...): exponential, with
        "equal jitter" (half fixed, half random) so that clients hit by the same fault
        do not come back in lockstep."""
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (retry - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise StorageError(f"{name}={raw!r}: expected a number >= 0")
    return value


# S3 error codes worth another try; HTTP 5xx (but 501), 408 and 429 are too.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "EC2ThrottledException", "PriorRequestNotComplete",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted", "IDPCommunicationError",
})


def _client_error_parts(error: Exception) -> tuple[str, int, str]:
    """(code, HTTP status, message) of a botocore ClientError; ("", 0, "") otherwise."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return "", 0, ""
    details = response.get("Error", {}) or {}
    status = int((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
    return str(details.get("Code", "") or ""), status, str(details.get("Message", "") or "")


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same request may succeed: the network, a throttle, a 5xx."""
    from botocore.exceptions import (
        ChecksumError,
        ClientError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(error, ClientError):
        code, status, _ = _client_error_parts(error)
        return (code in TRANSIENT_CODES or status in (408, 429)
                or (status >= 500 and status != 501))
    if isinstance(error, StorageError):
        return False
    return isinstance(error, (BotoConnectionError, HTTPClientError, IncompleteReadError,
                              ChecksumError, FlexibleChecksumError, Urllib3Error,
                              http.client.HTTPException, ConnectionError, TimeoutError))



class S3Storage(Storage):
    scheme = "s3"

    def __init__(self, endpoint_url: str | None = None, region: str | None = None,
                 policy: RetryPolicy | None = None):
        import boto3
        from botocore.config import Config

        self.endpoint_url = strip_userinfo(endpoint_url)
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        self.policy = policy or RetryPolicy.current()
        # Custom endpoints (MinIO, Ceph, R2, moto) rarely support virtual-host buckets.
        s3_options = {"addressing_style": "path"} if self.endpoint_url else {}
        # One retry layer only (ours, in `_call`): botocore's would multiply the attempts.
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                        s3=s3_options, connect_timeout=self.policy.connect_timeout,
                        read_timeout=self.policy.read_timeout, max_pool_connections=32)
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url,
                                   region_name=self.region, config=config)
        self._arrow_fs: pafs.FileSystem | None = None

    # ---- retries and errors ---------------------------------------------------------------
    def _call(self, action: str, bucket: str, key: str, operation: Callable[[], T]) -> T:
        """`operation()`, retried while it fails transiently, within the policy's bounds."""
        policy = self.policy
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except Exception as error:
                elapsed = time.monotonic() - started
                pause = policy.backoff(attempt)
                if (not is_transient(error) or attempt >= policy.attempts
                        or elapsed + pause > policy.deadline_seconds):
                    raise self._error(error, bucket, key, action, attempt, elapsed) from None
                log.info("s3://%s/%s: %s failed (%s); retry %d of %d in %.2fs", bucket, key,
                         action, scrub(_describe(error)), attempt, policy.attempts - 1, pause)
                time.sleep(pause)

    def _error(self, error: Exception, bucket: str, key: str, action: str,
               attempts: int = 1, elapsed: float = 0.0) -> StorageError:
        code, status, _ = _client_error_parts(error)
        where = f"s3://{bucket}/{key}"
        if code == "NoSuchBucket":
            return NotFoundError(f"{where}: bucket '{bucket}' does not exist", permanent=True)
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError(f"{where}: no such key '{key}' in bucket '{bucket}'")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StorageError(f"{where}: cannot {action}: access denied to key '{key}' in "
                                f"bucket '{bucket}' ({scrub(_describe(error))})", permanent=True)
        tries = f"; gave up after {attempts} attempts in {elapsed:.1f}s" if attempts > 1 else ""
        return StorageError(f"{where}: cannot {action} key '{key}' in bucket '{bucket}': "
                            f"{scrub(_describe(error))}{tries}")

    # ---- the interface ----------------------------------------------------------------------
    def list(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"  # list a folder, not every key that merely starts alike

        def listing() -> list[str]:  # a failed page restarts the listing: no gaps, no repeats
            found = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                          Prefix=key)
            for page in pages:
                found.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
            return found

        found = self._call("list", bucket, key, listing)
        return sorted(path for path in found if not path.endswith("/"))

    def read_bytes(self, path: str) -> bytes:
        bucket, key = split_s3(path)
        # The body is read inside the retried call: a connection lost mid-body retries too.
        return self._call("read", bucket, key, lambda: self.client.get_object(
            Bucket=bucket, Key=key)["Body"].read())

    def read_range(self, path: str, start: int, length: int, etag: str | None = None) -> bytes:
        """`length` bytes from `start`; with `etag`, only from that version of the object."""
        bucket, key = split_s3(path)
        if length <= 0:
            return b""
        options = {"IfMatch": etag} if etag else {}

        def read() -> bytes:
            reply = self.client.get_object(Bucket=bucket, Key=key,
                                           Range=f"bytes={start}-{start + length - 1}",
                                           **options)
            return reply["Body"].read()

        try:
            return self._call("read", bucket, key, read)
        except StorageError as error:
            if "PreconditionFailed" in str(error):
                raise StorageError(f"s3://{bucket}/{key}: the object changed while being read "
                                   "(its ETag no longer matches)") from None
            raise

    def head(self, path: str) -> dict[str, Any]:
        """The object's metadata (size in `ContentLength`, `ETag`)."""
        bucket, key = split_s3(path)
        return self._call("read", bucket, key,
                          lambda: self.client.head_object(Bucket=bucket, Key=key))

    def version(self, path: str) -> Any:
        meta = self.head(path)
        return (int(meta.get("ContentLength", -1)), str(meta.get("LastModified", "")),
                meta.get("ETag"))

    def write_atomic(self, path: str, data: bytes) -> None:
        bucket, key = split_s3(path)
        if len(data) < MULTIPART_THRESHOLD:
            # One PUT is atomic, and repeating it is harmless: the same bytes, same key.
            self._call("write", bucket, key,
                       lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))
        else:
            self._multipart_write(bucket, key, data)

    def _multipart_write(self, bucket: str, key: str, data: bytes) -> None:
        """Parts (each retried), then complete; any failure aborts the upload, so the key
        shows either the whole new object or whatever it held before, never a part."""
        part_size = max(MULTIPART_THRESHOLD, MULTIPART_MIN_PART,
                        math.ceil(len(data) / MULTIPART_MAX_PARTS))
        upload_id = self._call("start upload of", bucket, key, lambda: self.client
                               .create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])

        def send(number: int, offset: int) -> dict[str, Any]:
            body = data[offset:offset + part_size]
            reply = self._call(f"write part {number} of", bucket, key, lambda: self.client
                               .upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                            PartNumber=number, Body=body))
            return {"PartNumber": number, "ETag": reply["ETag"]}

        try:
            offsets = list(enumerate(range(0, len(data), part_size), start=1))
            with ThreadPoolExecutor(max_workers=MULTIPART_CONCURRENCY) as pool:
                futures = [pool.submit(send, number, offset) for number, offset in offsets]
                wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    future.cancel()  # once a part failed for good, start no more
            for future in futures:
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()
            self._complete(bucket, key, upload_id, [future.result() for future in futures])
        except BaseException:
            self._abort(bucket, key, upload_id)
            raise

    def _complete(self, bucket: str, key: str, upload_id: str, parts: list[dict]) -> None:
        from botocore.exceptions import ClientError

        tries = 0

        def complete() -> None:
            nonlocal tries
            tries += 1
            try:
                self.client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts})
            except ClientError as error:
                # A retry after a reply lost on the way back: the first try did complete.
                if (tries > 1 and _client_error_parts(error)[0] == "NoSuchUpload"
                        and self._has_parts(bucket, key, parts)):
                    return
                raise

        self._call("complete upload of", bucket, key, complete)

    def _has_parts(self, bucket: str, key: str, parts: list[dict]) -> bool:
        """Whether the object at `key` is the one these parts make (its multipart ETag)."""
        try:
            digests = b"".join(bytes.fromhex(part["ETag"].strip('"')) for part in parts)
        except ValueError:
            return False
        expected = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
        try:
            etag = self._call("check", bucket, key, lambda: self.client.head_object(
                Bucket=bucket, Key=key))["ETag"]
        except StorageError:
            return False
        return etag == expected

    def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        try:
            self._call("abort upload of", bucket, key, lambda: self.client.abort_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id))
        except StorageError as error:
            # The parts stay invisible (no object appears); a bucket lifecycle rule for
            # incomplete uploads reclaims them.
            log.warning("%s (upload %s is left incomplete)", error, upload_id)

    def abort_uploads(self, prefix: str, keep: Callable[[str], bool] | None = None) -> int:
        """Abort the multipart uploads left under ``prefix`` by writers killed mid-upload
        (their parts are invisible but stored, and billed, until aborted)."""
        bucket, key = split_s3(prefix)
        if key and not key.endswith("/"):
            key += "/"

        def listing() -> list[tuple[str, str]]:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=key)
            return [(item["Key"], item["UploadId"]) for page in pages
                    for item in page.get("Uploads", [])]

        uploads = self._call("list uploads under", bucket, key, listing)
        stale = [(k, u) for k, u in uploads if keep is None or not keep(f"s3://{bucket}/{k}")]
        for stale_key, upload_id in stale:
            self._abort(bucket, stale_key, upload_id)
        return len(stale)

    def exists(self, path: str) -> bool:
        bucket, key = split_s3(path)
        try:
            self._call("check", bucket, key,
                       lambda: self.client.head_object(Bucket=bucket, Key=key))
            return True
        except NotFoundError as failure:
            if "no such key" in str(failure):
                return False
            raise

    def is_dir(self, path: str) -> bool:
        bucket, key = split_s3(path)
        if key and not key.endswith("/"):
            key += "/"
        reply = self._call("list", bucket, key, lambda: self.client.list_objects_v2(
            Bucket=bucket, Prefix=key, MaxKeys=1))
        return reply.get("KeyCount", 0) > 0

    def delete(self, path: str) -> None:
        bucket, key = split_s3(path)
        # Deleting is idempotent on S3 (a missing key is no error), so retrying is safe.
        self._call("delete", bucket, key,
                   lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def join(self, *parts: str) -> str:
        return "/".join(part.strip("/") if i else part.rstrip("/") for i, part in enumerate(parts))

    def open_input_file(self, path: str) -> pa.NativeFile:
        """Ranged reads through this class, so they get its retries and its errors."""
        return pa.PythonFile(_S3InputFile(self, path), mode="r")

    def arrow_filesystem(self) -> pafs.FileSystem:
        """pyarrow's own S3 client, for callers that want a FileSystem; it retries
        transient failures itself (the AWS SDK's standard strategy), as many times."""
        if self._arrow_fs is None:
            options: dict[str, Any] = {
                "region": self.region,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                    max_attempts=self.policy.attempts),
                "connect_timeout": self.policy.connect_timeout,
                "request_timeout": self.policy.read_timeout,
            }
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                options["endpoint_override"] = (parsed.netloc or parsed.path).rpartition("@")[2]
                options["scheme"] = parsed.scheme or "https"
                options["force_virtual_addressing"] = False
            self._arrow_fs = pafs.S3FileSystem(**options)
        return self._arrow_fs

    def arrow_path(self, path: str) -> str:
        bucket, key = split_s3(path)
        return f"{bucket}/{key}"


def _describe(error: BaseException) -> str:
    code, status, message = _client_error_parts(error)
    if code or status:
        return f"{code or 'error'} (HTTP {status}){': ' + message if message else ''}"
    return f"{type(error).__name__}: {error}"


class _S3InputFile(ReadOnlyRaw):
    """A read-only, seekable view of one S3 object: every read is a retried ranged GET
    pinned to the ETag seen at open, so a file replaced mid-read is an error, not a mix."""

    def __init__(self, storage: S3Storage, path: str):
        super().__init__()
        self.storage, self.path = storage, path
        meta = storage.head(path)
        self.size = int(meta["ContentLength"])
        self.etag = meta.get("ETag")
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        data = self.storage.read_range(self.path, self.position, end - self.position,
                                       self.etag)
        self.position += len(data)
        return data



def open_s3(storage_spec: StorageSpec | None) -> Storage:
    region = storage_spec.region if storage_spec is not None else None
    return S3Storage(resolve_endpoint(storage_spec), region)

