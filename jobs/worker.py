"""One shard, start to finish: read rows -> check -> batch -> generate -> encode -> commit.

A ShardWorker loads the pipeline once and serves many shards (a Ray actor holds one).
Encoding runs in a thread beside generation so the accelerator does not wait for zlib.
Same input + spec -> same bytes under the same name, so retries and resumes are safe.

A row the pipeline cannot serve becomes a rejection with a reason, never a lost row or a
made-up image: a batch that fails with ValueError (a value the pipeline refuses) or
FloatingPointError (NaN or infinite latents, which the pipeline refuses to decode into a
black image) is retried one image at a time, so only the bad row is rejected. Rows of a
Parquet file whose data cannot be decoded (a corrupt column chunk) are rejected too, with
the file, the rows and the decode error as the reason; a failure to *fetch* the input
(a storage or connection error) still fails the shard, which is then retried.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from PIL import Image

from .expand import Expander, expand_table
from .images import decode_init_image, encode, parameters_text
from .plan import ShardPlan, shard_path
from .readers import conform, read_slice_checked, unify
from .rows import ImageTask, Rejection, batches, check_rows, row_id, with_native_size
from .sinks import IMAGE_FIELDS, SINKS, commit_shard, errors_table, passthrough_columns
from .spec import JobSpec, redact_text
from .storage import open_storage

# Errors of one generation call that concern its rows, not the worker: the pipeline's
# ValueError for a value it refuses, FloatingPointError for NaN/infinite latents.
ROW_ERRORS = (ValueError, FloatingPointError)
# An init image file larger than this is refused before it is read into memory.
MAX_INIT_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ShardResult:
    name: str
    generated: int  # images written
    rejected: int  # input rows rejected
    bytes: int
    sha256: str
    busy_seconds: float
    worker: str = ""


def model_tag(pipeline: Any) -> str:
    """`name@sha256:...` for the `model` column and the manifest."""
    content_hash = str(getattr(pipeline, "content_hash", "") or "")
    if content_hash and ":" not in content_hash:
        content_hash = f"sha256:{content_hash}"
    name = str(getattr(pipeline, "name", "model"))
    return f"{name}@{content_hash}" if content_hash else name


def _load(spec: JobSpec, source: str, device: str) -> Any:
    from ldm_jobs.model import load_pipeline

    return load_pipeline(source, device=device, dtype=spec.compute.dtype, storage=spec.storage)


def _check_families(base: Any, refiner: Any) -> None:
    """The job's refiner stage is SDXL's: an SDXL base model and an SDXL refiner."""
    if base.family != "sdxl":
        raise ValueError(f"refiner: the model is {base.family!r}, and a refiner stage needs an SDXL "
                         "base model (family 'sdxl')")
    if refiner.family != "sdxl_refiner":
        raise ValueError(f"refiner.model is {refiner.family!r}, not an SDXL refiner (family "
                         "'sdxl_refiner')")


def _check_local_image_file(path: str) -> None:
    """Refuse what must not be read whole: devices, FIFOs (/dev/zero) and huge files."""
    local = path[len("file://"):] if path.startswith("file://") else path
    try:
        info = os.stat(local)
    except OSError as error:
        raise ValueError(f"{path}: cannot read: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_INIT_IMAGE_BYTES:
        raise ValueError(f"{path}: {info.st_size} bytes, more than {MAX_INIT_IMAGE_BYTES}")


class RowGenerator:
    """Input rows -> checked image tasks -> generated, encoded images -> output rows.

    No storage and no commit: a ShardWorker adds those around it, and Ray Data's
    `GenerateImages` (jobs/ray_data.py) calls it on each batch, so both write the same
    columns and the same bytes for the same row.
    """

    def __init__(self, spec: JobSpec, device: str = "cpu", pipeline: Any = None,
                 refiner: Any = None):
        if pipeline is None:
            pipeline = _load(spec, spec.model, device)
        if spec.refiner is not None and refiner is None:
            refiner = _load(spec, spec.refiner.model, device)
        self.refiner = refiner
        if refiner is not None:
            _check_families(pipeline, refiner)
        # sizes the spec leaves out are the model's own (the pipeline knows it once loaded)
        self.spec = spec = with_native_size(spec, pipeline.native_size)
        self.pipeline = pipeline
        if getattr(pipeline, "unet", None) is not None:  # adapters read once per actor
            from ldm_jobs.model.lora_cache import AdapterCache

            pipeline.lora_cache = AdapterCache(pipeline, spec.compute.lora_cache_mb * 2**20,
                                               storage=spec.storage)
        if spec.compute.compile:
            self._compile()
        self.model = model_tag(pipeline)
        # what the manifest records besides the model column: the family, the second stage
        self.model_info = {"family": getattr(pipeline, "family", None)}
        if refiner is not None:
            self.model_info["refiner"] = {"tag": model_tag(refiner), "family": refiner.family,
                                          "switch_at": spec.refiner.switch_at}
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")

    def _compile(self) -> None:
        """Set the UNet to compile for the job's batch size, and compile it now on a
        throwaway image at the job's size, so the first shard does not pay for it (nor
        count it in its busy time). Rows with other sizes (override columns) compile once
        each."""
        sampling = self.spec.sampling
        try:
            self.pipeline.compile(batch_size=self.spec.compute.batch_size)
            self.pipeline.generate(
                ["warm-up"], [0], negative_prompts=[sampling.negative_prompt],
                steps=min(2, sampling.steps), guidance_scale=sampling.guidance_scale,
                sampler=sampling.sampler, width=sampling.width, height=sampling.height)
        except Exception as error:  # the model loaded: say that compiling is what failed
            raise RuntimeError(f"compute.compile: compiling the UNet failed "
                               f"({type(error).__name__}: {error}); set compile: false") from error

    def _init_image_loader(self, sources: list[str], skip: dict[int, str] | None = None):
        spec = self.spec
        skip = skip or {}

        def load(value: Any, position: int) -> Image.Image:
            if position in skip:  # an undecodable row: rejected anyway, fetch nothing for it
                raise ValueError("row data cannot be decoded")
            if isinstance(value, str):
                if "\x00" in value:
                    raise ValueError("path contains a NUL character")
                if "://" not in value and not os.path.isabs(value):
                    # Relative paths are relative to the input file that names them.
                    source = sources[position]
                    folder = source.rsplit("/", 1)[0] if "/" in source else "."
                    value = f"{folder}/{value}"
                if "://" not in value or value.startswith("file://"):
                    _check_local_image_file(value)
                data = open_storage(value, spec.storage).read_bytes(value)
            elif isinstance(value, (bytes, bytearray)):
                data = bytes(value)
            else:
                raise ValueError(f"expected image bytes or a path, got {type(value).__name__}")
            return decode_init_image(data)

        return load

    # ---- generating ------------------------------------------------------------------------
    def _generate(self, batch: list[ImageTask]) -> list[Image.Image]:
        first = batch[0]
        options: dict[str, Any] = {}
        if self.spec.sampling.prompt_syntax != "plain":
            options["prompt_syntax"] = self.spec.sampling.prompt_syntax
        if first.init_image is not None:
            options |= {"init_images": [t.init_image.resize((t.width, t.height), Image.LANCZOS)
                                       if t.init_image.size != (t.width, t.height)
                                       else t.init_image for t in batch],
                       "strength": first.strength}
        if any(t.loras for t in batch):
            options["loras"] = [dict(t.loras) for t in batch]
        if self.refiner is not None:
            options |= {"refiner": self.refiner, "switch_at": self.spec.refiner.switch_at}
        return self.pipeline.generate(
            [t.prompt if t.text is None else t.text for t in batch], seeds=[t.seed for t in batch],
            negative_prompts=[t.negative_prompt for t in batch], steps=first.steps,
            guidance_scale=[t.guidance_scale for t in batch], sampler=first.sampler,
            width=first.width, height=first.height, **options)

    def _adapters(self, task: ImageTask) -> tuple:
        """The task's LoRAs as (name, sha256, web UI hash, weight), each read and checked
        against the model once per actor (a LoraError, a ValueError, names what is wrong)."""
        cache = getattr(self.pipeline, "lora_cache", None)
        if task.loras and cache is None:
            raise ValueError("this pipeline does not take LoRAs")
        adapters = [(cache.get(source), weight) for source, weight in task.loras]
        return tuple((a.name, a.sha256, a.webui_hash, w) for a, w in adapters)

    def _encode(self, task: ImageTask, image: Image.Image) -> bytes:
        name, _, content_hash = self.model.partition("@")
        loras = [(lora, webui_hash, w) for lora, _, webui_hash, w in task.adapters]
        text = parameters_text(task, name, content_hash, loras)
        return encode(image, self.spec.output.image_format, text, self.spec.output.quality)

    def _generate_all(self, tasks: list[ImageTask]) -> tuple[dict[int, Future], dict[int, str]]:
        """Encoded-image futures by task index, and generation failures by shard row.

        A batch that the pipeline refuses (ValueError) is retried one image at a time, so
        one bad row is rejected with the pipeline's message and its batch-mates survive.
        """
        index_of = {id(task): i for i, task in enumerate(tasks)}
        encoded: dict[int, Future] = {}
        failed: dict[int, str] = {}
        for task in tasks:  # a missing or unfit LoRA costs its rows, before any batch
            try:
                task.adapters = self._adapters(task)
            except ValueError as error:
                failed.setdefault(task.row, f"loras: {error}")
        tasks = [task for task in tasks if task.row not in failed]
        for batch in batches(tasks, self.spec.compute.batch_size):
            try:
                results = [(batch, self._generate(batch))]
            except ROW_ERRORS:
                results = []
                for task in batch:
                    try:
                        results.append(([task], self._generate([task])))
                    except ROW_ERRORS as error:
                        failed.setdefault(task.row, f"generation: {error}")
            for done, images in results:
                for task, image in zip(done, images):
                    encoded[index_of[id(task)]] = self._encoder.submit(self._encode, task, image)
        return encoded, failed

    def _output_table(self, table: pa.Table, tasks: list[ImageTask], images: list[bytes],
                      id_column: str | None) -> pa.Table:
        columns = {
            "id": [t.id for t in tasks],
            "prompt": [t.prompt for t in tasks],
            "negative_prompt": [t.negative_prompt for t in tasks],
            "seed": [t.seed for t in tasks],
            "sampler": [t.sampler for t in tasks],
            "steps": [t.steps for t in tasks],
            "guidance_scale": [float(t.guidance_scale) for t in tasks],
            "width": [t.width for t in tasks],
            "height": [t.height for t in tasks],
            "strength": [t.strength for t in tasks],
            "model": [self.model] * len(tasks),
            "loras": [[{"name": name, "sha256": sha, "weight": w}
                       for name, sha, _, w in t.adapters] for t in tasks],
            "image": images,
            "image_format": [self.spec.output.image_format] * len(tasks),
        }
        fields = list(IMAGE_FIELDS)
        arrays = [pa.array(columns[f.name], f.type) for f in fields]
        source_rows = pa.array([t.row for t in tasks], pa.int64())
        for in_name, out_name in passthrough_columns(table.schema, self.spec.input.prompt_column,
                                                     id_column):
            column = table.column(in_name).take(source_rows)
            fields.append(pa.field(out_name, column.type))
            arrays.append(column.combine_chunks())
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    # ---- checking and generating rows ---------------------------------------------------
    def convert(self, table: pa.Table, global_rows: list[int], id_column: str | None,
                duplicates: dict[int, int], load: Any,
                unreadable: list[Rejection] = ()) -> tuple[pa.Table, list[Rejection]]:
        """The output table of `table`'s rows, and the rejected rows sorted by row.

        `unreadable` are rejections of rows whose data could not be decoded: the decode
        error is their one reason, so they are neither checked nor generated.
        """
        tasks, rejected = check_rows(table, self.spec, global_rows, id_column, duplicates, load)
        if unreadable:
            lost = {r.row for r in unreadable}
            tasks = [task for task in tasks if task.row not in lost]
            rejected = [r for r in rejected if r.row not in lost] + list(unreadable)
        encoded, failed = self._generate_all(tasks)
        ids_by_row: dict[int, str] = {}
        for task in tasks:
            ids_by_row.setdefault(task.row, task.id)  # a row's first image carries its own id
        rejected += [Rejection(row, ids_by_row.get(row), reason) for row, reason in failed.items()]
        # Reasons quote paths and library messages: keep credentials out of errors.parquet.
        rejected = sorted((Rejection(r.row, r.id, redact_text(r.reason)) for r in rejected),
                          key=lambda r: r.row)
        kept = [(i, task) for i, task in enumerate(tasks) if task.row not in failed]
        images = [encoded[i].result() for i, _ in kept]
        return self._output_table(table, [task for _, task in kept], images, id_column), rejected

    def close(self) -> None:
        self._encoder.shutdown(wait=True)


class ShardWorker(RowGenerator):
    """A RowGenerator that reads a shard's rows from the input and commits its output."""

    def __init__(self, spec: JobSpec, device: str = "cpu", pipeline: Any = None,
                 worker_id: str | None = None):
        super().__init__(spec, device, pipeline)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.input_storage = open_storage(spec.input.path, spec.storage)
        self.output_storage = open_storage(spec.output.path, spec.storage)
        self._expander = Expander(spec)

    # ---- reading -------------------------------------------------------------------------
    def _read(self, shard: ShardPlan) -> tuple[pa.Table, list[int], list[str], dict[int, str]]:
        """The shard's input rows, their global indices, the file each came from, and
        {shard row: reason} for rows whose data cannot be decoded (their table row holds
        what could be read, nulls for the rest)."""
        prompt_column = self.spec.input.prompt_column
        parts, unreadable, position = [], {}, 0
        for piece in shard.slices:
            part, spans = read_slice_checked(self.input_storage, piece.path, piece.first,
                                             piece.count, prompt_column)
            for span in spans:
                start = position + span.first - piece.first
                unreadable.update((start + i, span.reason) for i in range(span.count))
            parts.append(part)
            position += piece.count
        schema = shard.schema or unify([part.schema for part in parts], self.spec.input.path)
        table = pa.concat_tables([conform(part, schema) for part in parts]) if parts \
            else schema.empty_table()
        global_rows = [s.offset + i for s in shard.slices for i in range(s.count)]
        sources = [s.path for s in shard.slices for _ in range(s.count)]
        return table, global_rows, sources, unreadable

    def _unreadable_rejections(self, table: pa.Table, global_rows: list[int],
                               id_column: str | None,
                               unreadable: dict[int, str]) -> list[Rejection]:
        """A rejection per undecodable row, with its id where the id could be read
        (planning read the whole id column, so it can)."""
        ids = table.column(id_column) if id_column and id_column in table.column_names else None
        rejections = []
        for row, reason in sorted(unreadable.items()):
            try:
                image_id = row_id(ids[row].as_py() if ids is not None else None,
                                  global_rows[row], bool(id_column))
            except ValueError:
                image_id = None
            rejections.append(Rejection(row, image_id, reason))
        return rejections

    # ---- one shard ---------------------------------------------------------------------------
    def run(self, shard: ShardPlan) -> ShardResult:
        started = time.perf_counter()
        started_at = time.time()  # wall clock, for the gallery's throughput over time
        spec = self.spec
        table, global_rows, sources, unreadable = self._read(shard)
        if shard.expanded is not None:  # the shard's range of templates x sweep
            table, global_rows, sources, unreadable = expand_table(
                self._expander, shard, table, global_rows, sources, unreadable)
        load = self._init_image_loader(sources, skip=unreadable)
        lost = self._unreadable_rejections(table, global_rows, shard.id_column, unreadable)
        output, rejected = self.convert(table, global_rows, shard.id_column,
                                        dict(shard.duplicates), load, lost)
        data = SINKS[spec.output.format](output)
        errors = None
        if rejected:
            rows = table.take([r.row for r in rejected])
            errors = errors_table(rows, [r.id for r in rejected], [r.reason for r in rejected],
                                  [global_rows[r.row] for r in rejected], shard.name,
                                  shard.schema or table.schema)
        busy = time.perf_counter() - started
        digest = hashlib.sha256(data).hexdigest()
        accepted_rows = shard.rows - len(rejected)
        record = {
            "name": shard.name, "fingerprint": shard.fingerprint,
            "file": shard_path(self.output_storage, spec, shard.name).replace("\\", "/")
            .rsplit("/", 1)[-1],
            "rows": output.num_rows, "input_rows": shard.rows, "accepted_rows": accepted_rows,
            "rejected": len(rejected), "bytes": len(data), "sha256": digest,
            "busy_seconds": busy, "worker": self.worker_id, "model": self.model, **self.model_info,
            "errors": None,
            "started_at": round(started_at, 3), "finished_at": round(started_at + busy, 3),
        }
        commit_shard(self.output_storage, spec, shard, data, errors, record)
        return ShardResult(shard.name, output.num_rows, len(rejected), len(data), digest,
                           time.perf_counter() - started, self.worker_id)
