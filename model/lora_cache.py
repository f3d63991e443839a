"""LoRA adapters read once per pipeline (a job's actor holds one), kept by content hash.

A job names a few dozen LoRAs across thousands of rows: each file is fetched once (from
S3, through the project's storage interface; a local file is read where it lies), hashed
(sha256 of its bytes: the identity recorded with every image), parsed and checked against
the model once, and kept while it fits in ``max_bytes`` (least recently used first out).
An evicted adapter is parsed again from the local copy, never fetched again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections import OrderedDict
from pathlib import Path

from . import lora

DEFAULT_CACHE_MB = 1024
# A LoRA file larger than this is refused before it is read (SD LoRAs are MBs; a 2 GB
# "LoRA" is a checkpoint named by mistake).
MAX_FILE_BYTES = 2 * 1024**3


class AdapterCache:
    def __init__(self, pipeline, max_bytes: int = DEFAULT_CACHE_MB * 2**20, storage=None):
        """``storage``: a job spec's storage settings for ``s3://`` sources."""
        self.pipeline = pipeline
        self.max_bytes = int(max_bytes)
        self.storage = storage
        self._adapters: OrderedDict[str, lora.Adapter] = OrderedDict()  # by sha256
        self._identity: dict[tuple, str] = {}  # source version -> sha256
        self._local: dict[str, Path] = {}  # sha256 -> a local copy of the file
        self._downloads: tempfile.TemporaryDirectory | None = None
        # sources that failed, with their error: a bad LoRA named by a thousand rows is
        # read and refused once
        self._failed: dict[tuple, lora.LoraError] = {}
        self.fetches = 0  # reads of a source (local or remote), for tests and reports

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    def get(self, source: str) -> lora.Adapter:
        """The adapter of ``source`` (a .safetensors path or s3:// URI), checked against the
        pipeline's modules; a ``LoraError`` naming the file when it cannot serve it."""
        version = self._version(source)
        if version in self._failed:
            raise self._failed[version]
        try:
            return self._get(source, version)
        except lora.LoraError as error:
            self._failed[version] = error
            raise

    def _get(self, source: str, version: tuple) -> lora.Adapter:
        sha = self._identity.get(version)
        if sha is not None and sha in self._adapters:
            self._adapters.move_to_end(sha)
            return self._adapters[sha]
        data = self._local[sha].read_bytes() if sha in self._local else self._fetch(source)
        sha = hashlib.sha256(data).hexdigest()
        self._identity[version] = sha
        if source.startswith("s3://") and sha not in self._local:
            self._local[sha] = self._keep(sha, data)
        pipe = self.pipeline
        adapter = lora.load(data, source, lora.targets(pipe), pipe.device, pipe.dtype)
        self._adapters[sha] = adapter
        while len(self._adapters) > 1 and self.nbytes > self.max_bytes:
            self._adapters.popitem(last=False)
        return adapter

    def _version(self, source: str) -> tuple:
        """What identifies the bytes without reading them: a local file's path, size and
        modification time (an edited file is read again); an S3 URI as it is."""
        if not isinstance(source, str) or not source:
            raise lora.LoraError(f"{source!r}: a LoRA source must be a path or s3:// URI")
        if source.startswith("s3://"):
            return (source,)
        path = _local_path(source)
        try:
            info = os.stat(path)
        except OSError as error:
            raise lora.LoraError(f"{source}: cannot read: {error.strerror or error}") from None
        if not stat.S_ISREG(info.st_mode):
            raise lora.LoraError(f"{source}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise lora.LoraError(f"{source}: {info.st_size} bytes, more than a LoRA may be "
                                 f"({MAX_FILE_BYTES})")
        return (path, info.st_size, info.st_mtime_ns)

    def _fetch(self, source: str) -> bytes:
        self.fetches += 1
        if not source.startswith("s3://"):
            return Path(_local_path(source)).read_bytes()
        from ldm_jobs.jobs.storage import NotFoundError, open_storage  # the one storage API

        try:
            return open_storage(source, self.storage).read_bytes(source)
        except NotFoundError:
            raise lora.LoraError(f"{source}: not found") from None

    def _keep(self, sha: str, data: bytes) -> Path:
        if self._downloads is None:
            self._downloads = tempfile.TemporaryDirectory(prefix="ldm-jobs-loras-")
        path = Path(self._downloads.name) / f"{sha}.safetensors"
        path.write_bytes(data)
        return path


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def cache_of(pipeline) -> AdapterCache:
    """The pipeline's adapter cache, made on first use with the default size."""
    cache = getattr(pipeline, "lora_cache", None)
    if cache is None:
        cache = pipeline.lora_cache = AdapterCache(pipeline)
    return cache
