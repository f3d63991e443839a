"""Reading a job's output: manifest, dataset over committed shards, images; summaries.

Only committed shards are read: files named `part-NNNNN.parquet` / `.tar` appear solely
by an atomic rename or a completed upload, so a job still running (or one that died)
can be inspected safely.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import textwrap
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from .sinks import ERRORS, MANIFEST, SUCCESS
from .spec import StorageSpec, redact_text
from .storage import open_storage

SHARD_FILE = re.compile(r"^part-\d{5,}\.(parquet|tar)$")
SHEET_MAX_IMAGES, SHEET_CELL, SHEET_CAPTION_LINES = 64, 128, 3


class OutputError(Exception):
    """The location holds no job output; the message names it."""


class Output:
    """A job's output folder or prefix, opened read-only."""

    def __init__(self, uri: str, storage_spec: StorageSpec | None = None):
        self.uri = uri.rstrip("/") if "://" in uri else uri
        self.storage = open_storage(uri, storage_spec)
        files = self.storage.list(uri)
        if not files:
            raise OutputError(f"{redact_text(uri)}: no job output here (no shards, manifest or "
                              "records)")
        base = {path.replace("\\", "/").rsplit("/", 1)[-1]: path for path in files}
        self.shard_files = sorted(path for name, path in base.items() if SHARD_FILE.match(name))
        self.complete = SUCCESS in base
        self.manifest: dict[str, Any] | None = (
            json.loads(self.storage.read_bytes(base[MANIFEST])) if MANIFEST in base else None)
        self._errors_path = base.get(ERRORS)

    @property
    def parquet_files(self) -> list[str]:
        return [path for path in self.shard_files if path.endswith(".parquet")]

    @property
    def dataset(self) -> ds.Dataset:
        """A pyarrow dataset over the committed Parquet shards (empty for webdataset output)."""
        fs = self.storage.arrow_filesystem()
        paths = [self.storage.arrow_path(path) for path in self.parquet_files]
        if not paths:
            from .sinks import IMAGE_FIELDS

            return ds.dataset(pa.schema(IMAGE_FIELDS).empty_table())
        return ds.dataset(paths, filesystem=fs, format="parquet")

    def errors(self) -> pa.Table | None:
        """errors.parquet as a table; empty when the job rejected nothing (no file is
        written then), None before the job finalized."""
        if self._errors_path is None:
            if self.manifest is None:
                return None
            return pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        return pq.read_table(io.BytesIO(self.storage.read_bytes(self._errors_path)))

    def iter_images(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts with the metadata and `image` decoded to a PIL image."""
        count = 0
        for path in self.shard_files:
            rows = (_parquet_rows(self.storage, path) if path.endswith(".parquet")
                    else _tar_rows(self.storage.read_bytes(path)))
            for row in rows:
                if limit is not None and count >= limit:
                    return
                data = row.pop("image")
                image = Image.open(io.BytesIO(data))
                image.load()
                row["image"] = image
                count += 1
                yield row


def _parquet_rows(storage, path: str) -> Iterator[dict[str, Any]]:
    fs = storage.arrow_filesystem()
    parquet = pq.ParquetFile(fs.open_input_file(storage.arrow_path(path)))
    for batch in parquet.iter_batches(batch_size=64):
        yield from batch.to_pylist()


def _tar_rows(data: bytes) -> Iterator[dict[str, Any]]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is not None:
                members.setdefault(key, {})[ext] = handle.read()
    for parts in members.values():
        row = json.loads(parts.pop("json"))
        row["image"] = next(iter(parts.values()))
        yield row


def open_output(uri: str, storage_spec: StorageSpec | None = None) -> Output:
    """Open a job's output (local folder or s3:// prefix) for reading."""
    return Output(uri, storage_spec)


def _summary(out: Output) -> list[str]:
    manifest = out.manifest
    lines = [f"output     {redact_text(out.uri)}",
             f"status     {'complete (_SUCCESS)' if out.complete else 'incomplete'}",
             f"shards     {len(out.shard_files)} committed"]
    if manifest is None:
        return lines + ["manifest   (none yet: the job has not finalized)"]
    counts, timings, model = manifest["counts"], manifest["timings"], manifest["model"]
    runs = manifest.get("runs") or []  # manifests written before runs were kept have none
    lines += [
        f"job        {manifest['name']}",
        f"model      {model['name']}" + (f" @{model['hash']}" if model.get("hash") else ""),
        f"rows       {counts['input_rows']} input, {counts['generated']} images generated, "
        f"{counts['rejected']} rejected",
        f"wall       {timings['wall_seconds']:.1f} s; busy {timings['busy_seconds_total']:.1f} s "
        f"over {len(timings['busy_seconds'])} worker(s)"
        + (f" (all {len(runs)} runs)" if len(runs) > 1 else ""),
        f"rate       {timings['images_per_gpu_hour']} images per "
        f"{'GPU' if timings.get('accelerator') == 'gpu' else 'worker'}-hour",
    ]
    if len(runs) > 1:  # a resumed job: each run's own figures
        lines += [_run_line(number, run) for number, run in enumerate(runs, start=1)]
    for worker in timings.get("workers", []):  # manifests before per-worker lines have none
        used = worker.get("utilisation")
        lines.append(
            f"  worker   {worker['node']} {worker['device']}: {worker['images']} images in "
            f"{worker['shards']} shard(s), busy {worker['busy_seconds']:.1f} s"
            + (f" ({used:.0%} of the generation window)" if used is not None else "")
            + (f", {worker['images_per_gpu_hour']:.0f} images per "
               f"{'GPU' if timings.get('accelerator') == 'gpu' else 'worker'}-hour"
               if worker.get("images_per_gpu_hour") else ""))
    return lines


def _run_line(number: int, run: dict[str, Any]) -> str:
    skipped = run.get("shards_skipped") or 0
    return (f"run {number:<6} {run.get('started_at') or '?'}: {run.get('shards_run', 0)} "
            f"shard(s), {run.get('generated', 0)} images"
            + (f" ({skipped} shard(s) skipped, already committed)" if skipped else "")
            + f"; wall {run.get('wall_seconds', 0):.1f} s, busy "
            f"{run.get('busy_seconds_total', 0):.1f} s")


def _error_lines(out: Output) -> list[str]:
    errors = out.errors()
    if errors is None or errors.num_rows == 0:
        return ["errors     none"]
    counts = errors.group_by("reason").aggregate([("reason", "count")])
    counts = counts.sort_by([("reason_count", "descending"), ("reason", "ascending")])
    lines = [f"errors     {errors.num_rows} rejected row(s) by reason:"]
    reasons = counts.column("reason").to_pylist()
    numbers = counts.column("reason_count").to_pylist()
    for reason, number in list(zip(reasons, numbers))[:20]:
        lines.append(f"  {number:>6}  {reason}")
    if len(reasons) > 20:
        lines.append(f"  ... and {len(reasons) - 20} more reasons")
    return lines


def contact_sheet(rows: list[dict[str, Any]], cell: int = SHEET_CELL) -> Image.Image:
    """A grid of thumbnails, each captioned with the start of its prompt."""
    font = ImageFont.load_default()
    line_height = 11
    caption = SHEET_CAPTION_LINES * line_height + 4
    columns = max(1, min(8, int(len(rows) ** 0.5 + 0.999)))
    grid_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * cell, grid_rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for index, row in enumerate(rows):
        x, y = (index % columns) * cell, (index // columns) * (cell + caption)
        thumb = row["image"].convert("RGB")
        scale = cell // max(thumb.size)
        if scale > 1:  # tiny test images: enlarge by whole pixels so they stay crisp
            thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.NEAREST)
        thumb.thumbnail((cell, cell))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        text = f"{row.get('id', '')}: {row.get('prompt', '')}"
        lines = textwrap.wrap(text, chars)[:SHEET_CAPTION_LINES] or [""]
        if len(textwrap.wrap(text, chars)) > SHEET_CAPTION_LINES:
            lines[-1] = lines[-1][: chars - 3] + "..."
        for number, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + number * line_height), line, fill="black", font=font)
    return sheet


def show(uri: str, sheet: str | None = None, storage_spec: StorageSpec | None = None) -> str:
    """Summary text of an output; with `sheet`, also writes a contact sheet PNG there."""
    out = open_output(uri, storage_spec)
    lines = _summary(out) + _error_lines(out)
    if sheet is not None:
        rows = list(out.iter_images(limit=SHEET_MAX_IMAGES))
        image = contact_sheet(rows)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        open_storage(sheet).write_atomic(sheet, buffer.getvalue())
        lines.append(f"sheet      {sheet} ({len(rows)} images)")
    return "\n".join(lines)


__all__ = ["Output", "OutputError", "contact_sheet", "open_output", "show"]
