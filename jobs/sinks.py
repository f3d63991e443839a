"""Writers: shard files (format -> sink), per-shard commit, and the job's final files.

Commit order makes the output trustworthy without coordination: the shard file first
(atomically), then its rejected rows, then its record in `_shards/` (which marks it done
and drives resume), and at the very end `errors.parquet`, `_manifest.json` and `_SUCCESS`
(just before it, temp files left by writers killed mid-write are swept away).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import string
import tarfile
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .images import EXTENSIONS
from .plan import RECORDS_DIR, Plan, ShardPlan, read_records, record_path, shard_path
from .readers import conform
from .rows import OVERRIDE_COLUMNS
from .spec import JobSpec
from .storage import Storage, open_storage

# The contract's shard columns, in order; the input's other columns follow.
IMAGE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("sampler", pa.string()),
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("strength", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("loras", pa.list_(pa.struct([("name", pa.string()), ("sha256", pa.string()),
                                          ("weight", pa.float64())]))),
    pa.field("image", pa.binary()),
    pa.field("image_format", pa.string()),
]
ERROR_FIELDS = [pa.field("id", pa.string()), pa.field("reason", pa.string()),
                pa.field("row", pa.int64()), pa.field("shard", pa.string())]
SUCCESS, MANIFEST, ERRORS = "_SUCCESS", "_manifest.json", "errors.parquet"


def _renamed(name: str, reserved: set[str]) -> str:
    # An input column named like one of ours keeps its data under a prefixed name.
    while name in reserved:
        name = f"input_{name}"
    return name


def passthrough_columns(schema: pa.Schema, prompt_column: str,
                        id_column: str | None) -> list[tuple[str, str]]:
    """(input name, output name) of the input columns a shard carries through unchanged."""
    consumed = {prompt_column, id_column, *OVERRIDE_COLUMNS}
    reserved = {field.name for field in IMAGE_FIELDS}
    return [(name, _renamed(name, reserved)) for name in schema.names if name not in consumed]


def errors_schema(input_schema: pa.Schema) -> pa.Schema:
    """errors.parquet's schema: id, reason, row, shard, then every input column."""
    reserved = {field.name for field in ERROR_FIELDS}
    extra = [pa.field(_renamed(f.name, reserved), f.type) for f in input_schema]
    return pa.schema(ERROR_FIELDS + extra)


def errors_table(input_rows: pa.Table, ids: list[str | None], reasons: list[str],
                 global_rows: list[int], shard: str, input_schema: pa.Schema) -> pa.Table:
    """Rejected rows with their reason and the whole input row."""
    schema = errors_schema(input_schema)
    head = [pa.array(ids, pa.string()), pa.array(reasons, pa.string()),
            pa.array(global_rows, pa.int64()), pa.array([shard] * len(ids), pa.string())]
    rows = conform(input_rows, input_schema)
    return pa.Table.from_arrays(head + rows.columns, schema=schema)


# ---- shard sinks: output table -> file bytes --------------------------------------------

def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    # Fixed options and no timestamps: the same table always gives the same bytes.
    pq.write_table(table, buffer, compression={name: ("NONE" if name == "image" else "ZSTD")
                                               for name in table.column_names},
                   row_group_size=64, use_dictionary=["sampler", "model", "image_format"],
                   write_statistics=True, store_schema=True)
    return buffer.getvalue()


_SAFE = set(string.ascii_letters + string.digits + "-_")
MAX_KEY = 80  # keeps `<key>.<ext>` inside a plain ustar name (100 bytes)


def safe_key(image_id: str) -> str:
    """An id as a tar member stem: no '/', '.', NUL or other surprises; injective.

    Bytes outside [A-Za-z0-9_-] are %XX-encoded ('.' too: webdataset splits the key at
    the first dot); a long key keeps a prefix plus '~' and a hash ('~' never appears in
    an encoded key, so shortened keys cannot collide with plain ones).
    """
    encoded = "".join(chr(b) if chr(b) in _SAFE else f"%{b:02X}" for b in image_id.encode())
    if len(encoded) > MAX_KEY:
        encoded = encoded[:60] + "~" + hashlib.sha256(image_id.encode()).hexdigest()[:19]
    return encoded


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _tar_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in table.to_pylist():
            key = safe_key(row["id"])
            image = row.pop("image")
            members = [(f"{key}.{EXTENSIONS[row['image_format']]}", image),
                       (f"{key}.json", json.dumps(row, sort_keys=True, ensure_ascii=False,
                                                   default=_json_value).encode())]
            for name, data in members:
                info = tarfile.TarInfo(name)  # fixed owner, mode and mtime 0: same bytes
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SINKS: dict[str, Callable[[pa.Table], bytes]] = {
    "parquet": _parquet_bytes,
    "webdataset": _tar_bytes,
}


def commit_shard(storage: Storage, spec: JobSpec, shard: ShardPlan, data: bytes,
                 errors: pa.Table | None, record: dict[str, Any]) -> None:
    """Write the shard, then its rejected rows, then its record: the record means done."""
    storage.write_atomic(shard_path(storage, spec, shard.name), data)
    if errors is not None and errors.num_rows:
        buffer = io.BytesIO()
        pq.write_table(errors, buffer, compression="ZSTD")
        storage.write_atomic(record_path(storage, spec, shard.name, ".errors.parquet"),
                             buffer.getvalue())
        record = {**record, "errors": f"{shard.name}.errors.parquet"}
    storage.write_atomic(record_path(storage, spec, shard.name),
                         json.dumps(record, indent=1, sort_keys=True).encode())


# ---- the end of a job ----------------------------------------------------------------------

def _timings(spec: JobSpec, records: list[dict], wall_seconds: float) -> dict[str, Any]:
    busy: dict[str, float] = {}
    for record in records:
        busy[record.get("worker", "?")] = busy.get(record.get("worker", "?"), 0.0) + float(
            record.get("busy_seconds", 0.0))
    # On CPU each actor counts as one accelerator; fractional GPUs count by their share.
    share = spec.compute.gpus_per_actor or 1.0
    accelerator_hours = sum(busy.values()) * share / 3600.0
    generated = sum(record["rows"] for record in records)
    return {
        "wall_seconds": round(wall_seconds, 3),
        "busy_seconds": {worker: round(seconds, 3) for worker, seconds in sorted(busy.items())},
        "busy_seconds_total": round(sum(busy.values()), 3),
        "accelerator": "gpu" if spec.compute.gpus_per_actor else "cpu",
        "images_per_gpu_hour": round(generated / accelerator_hours, 1) if accelerator_hours else None,
        "workers": _workers(records, share),
    }


def _workers(records: list[dict], share: float) -> list[dict[str, Any]]:
    """One line per worker: where it ran, what it made, and how busy it was.

    Utilisation is a worker's busy seconds over the job's generation window (the first
    shard's start to the last shard's end, from the shard records), so a worker that
    joined late, died early or waited on its model load shows below 1.
    """
    spans = [(r["started_at"], r["finished_at"]) for r in records
             if isinstance(r.get("started_at"), (int, float))
             and isinstance(r.get("finished_at"), (int, float))]
    window = (max(end for _, end in spans) - min(start for start, _ in spans)) if spans else 0.0
    lines: dict[str, dict[str, Any]] = {}
    for record in records:
        name = str(record.get("worker", "?"))
        parts = name.split(":")  # "host:pid:device", as ShardWorker names itself
        host, device = (":".join(parts[:-2]), parts[-1]) if len(parts) >= 3 else (name, "?")
        line = lines.setdefault(name, {"worker": name, "node": host, "device": device,
                                       "shards": 0, "images": 0, "busy_seconds": 0.0})
        line["shards"] += 1
        line["images"] += int(record["rows"])
        line["busy_seconds"] += float(record.get("busy_seconds", 0.0))
    for line in lines.values():
        busy = line["busy_seconds"]
        line["busy_seconds"] = round(busy, 3)
        line["utilisation"] = round(min(1.0, busy / window), 3) if window > 0 else None
        hours = busy * share / 3600.0
        line["images_per_gpu_hour"] = round(line["images"] / hours, 1) if hours else None
    return [lines[name] for name in sorted(lines)]


def _model(spec: JobSpec, records: list[dict]) -> dict[str, Any]:
    tags = sorted({record["model"] for record in records if record.get("model")})
    name, _, content_hash = (tags[0].partition("@") if tags else (spec.model, "", ""))
    model = {"source": spec.model, "name": name, "hash": content_hash or None}
    if len(tags) > 1:  # resumed with other weights: say so rather than pick one silently
        model["all"] = tags
    families = sorted({record["family"] for record in records if record.get("family")})
    model["family"] = families[0] if len(families) == 1 else (families or None)
    if spec.refiner is not None:  # the second stage, as the workers loaded it
        stages = sorted({json.dumps(record["refiner"], sort_keys=True) for record in records
                         if record.get("refiner")})
        stage = json.loads(stages[0]) if stages else {"tag": spec.refiner.model, "family": None}
        name, _, content_hash = stage["tag"].partition("@")
        model["refiner"] = {"source": spec.refiner.model, "name": name, "hash": content_hash or None,
                            "family": stage["family"], "switch_at": spec.refiner.switch_at}
        if len(stages) > 1:
            model["refiner"]["all"] = [json.loads(text)["tag"] for text in stages]
    return model


def _runs(storage: Storage, spec: JobSpec, plan: Plan, records: list[dict],
          wall_seconds: float, started_at: float | None) -> list[dict[str, Any]]:
    """The runs that built this output, oldest first: the earlier manifest's list plus
    this run, when it committed shards (a run that found everything done adds nothing).
    Each run has its own wall and busy time, so a resumed job's timings stay honest."""
    runs: list[dict[str, Any]] = []
    path = storage.join(spec.output.path, MANIFEST)
    try:
        earlier = json.loads(storage.read_bytes(path)) if storage.exists(path) else {}
    except (ValueError, UnicodeDecodeError):
        earlier = {}  # a damaged manifest is rewritten below; its history is lost with it
    if isinstance(earlier, dict) and isinstance(earlier.get("runs"), list):
        runs = [run for run in earlier["runs"] if isinstance(run, dict)]
    mine = [record for record in records if record["name"] not in plan.committed]
    if mine or not runs:
        timings = _timings(spec, mine, wall_seconds)
        runs.append({
            "started_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at))
                           if started_at is not None else None),
            "wall_seconds": timings["wall_seconds"],
            "shards_run": len(mine),
            "shards_skipped": len(plan.committed),
            "generated": sum(record["rows"] for record in mine),
            "busy_seconds_total": timings["busy_seconds_total"],
            "images_per_gpu_hour": timings["images_per_gpu_hour"],
        })
    return runs


def finalize(spec: JobSpec, plan: Plan, wall_seconds: float,
             started_at: float | None = None) -> dict[str, Any]:
    """Write errors.parquet (only when a row was rejected) and _manifest.json, then
    _SUCCESS if every row is accounted for.

    `wall_seconds` is this run's; `started_at` (epoch seconds) dates it in `runs`.
    Returns the manifest; `manifest["complete"]` tells whether _SUCCESS was written.
    """
    storage = open_storage(spec.output.path, spec.storage)
    storage.delete(storage.join(spec.output.path, SUCCESS))  # never vouch for a stale state
    by_name = read_records(storage, spec)
    records = [by_name[shard.name] for shard in plan.shards if shard.name in by_name]
    missing = [shard.name for shard in plan.shards if shard.name not in by_name]

    input_schema = plan.schema if plan.schema is not None else pa.schema([])
    tables = [errors_schema(input_schema).empty_table()]
    for record in records:
        if record.get("errors"):
            data = storage.read_bytes(storage.join(spec.output.path, RECORDS_DIR,
                                                   record["errors"]))
            tables.append(pq.read_table(io.BytesIO(data)).cast(errors_schema(input_schema)))
    errors = pa.concat_tables(tables)
    errors_path = storage.join(spec.output.path, ERRORS)
    if errors.num_rows:
        buffer = io.BytesIO()
        pq.write_table(errors, buffer, compression="ZSTD")
        storage.write_atomic(errors_path, buffer.getvalue())
    else:
        # No rejected row, no errors.parquet: a file of another schema beside the shards
        # is what readers of the whole folder trip on (pyarrow.dataset and pq.read_table
        # take the first file's schema, so `image` would vanish; Hugging Face datasets
        # fails on an empty file). The manifest's counts say that nothing was rejected.
        storage.delete(errors_path)

    accepted = sum(record["accepted_rows"] for record in records)
    rejected = sum(record["rejected"] for record in records)
    complete = not missing and accepted + rejected == plan.input_rows
    runs = _runs(storage, spec, plan, records, wall_seconds, started_at)
    manifest = {
        "name": spec.name,
        "spec": spec.public_dict(),
        "model": _model(spec, records),
        "counts": {"input_rows": plan.input_rows, "generated": sum(r["rows"] for r in records),
                   "rejected": rejected, "accepted_rows": accepted},
        # Every run's busy time against every run's wall time; `runs` splits them up.
        "timings": _timings(spec, records, sum(run["wall_seconds"] for run in runs)),
        "runs": runs,
        "shards": [{"name": r["name"], "file": r["file"], "rows": r["rows"],
                    "bytes": r["bytes"], "sha256": r["sha256"]} for r in records],
        "missing_shards": missing,
        "complete": complete,
    }
    storage.write_atomic(storage.join(spec.output.path, MANIFEST),
                         json.dumps(manifest, indent=2).encode())
    if complete:
        remove_stale_temps(storage, spec)
        storage.write_atomic(storage.join(spec.output.path, SUCCESS), b"")
    return manifest


# A local atomic write goes through `.tmp-<target name>-<random>` beside its target.
_TEMP_PREFIX = ".tmp-"
_OUR_TARGETS = ("part-", ERRORS, MANIFEST, SUCCESS)


def _relative(spec: JobSpec, path: str) -> str:
    """A listed path relative to the output folder, with '/' separators. Listings give
    local paths without `file://`, so the output path loses it too before it is cut off."""
    root = spec.output.path.removeprefix("file://").replace("\\", "/").rstrip("/")
    return path.replace("\\", "/")[len(root):].lstrip("/")


def _is_ours(relative: str) -> bool:
    """One of the names a job writes: in the output's root or in `_shards/`."""
    folder, _, base = relative.rpartition("/")
    return folder in ("", RECORDS_DIR) and base.startswith(_OUR_TARGETS)


def _is_our_temp(relative: str) -> bool:
    """A temp file of one of our writes: in the output's root or in `_shards/`."""
    folder, slash, base = relative.rpartition("/")
    target = base.removeprefix(_TEMP_PREFIX)
    return target != base and _is_ours(folder + slash + target)


def remove_stale_temps(storage: Storage, spec: JobSpec) -> int:
    """Delete what writers killed mid-write left behind; returns how many.

    A process killed between writing a temp file and renaming it leaves the temp behind
    (never under a shard's name, so no reader sees it as data); one killed in a multipart
    upload to S3 leaves the upload open (invisible, but its parts are stored and billed).
    Called once every shard is committed, when no writer of this job is left, so nothing
    live is removed; uploads to keys that are not ours are left alone.
    """
    stale = [path for path in storage.list(spec.output.path)
             if _is_our_temp(_relative(spec, path))]
    for path in stale:
        storage.delete(path)
    aborted = storage.abort_uploads(spec.output.path,
                                    keep=lambda path: not _is_ours(_relative(spec, path)))
    return len(stale) + aborted


def clear_output(spec: JobSpec) -> int:
    """Remove what a previous run wrote to the output (for --overwrite); returns files removed.

    Only this system's names go: `_SUCCESS` first (so no reader trusts a half-cleared
    output), then shards, records, errors and manifest. Other files are left alone.
    """
    storage = open_storage(spec.output.path, spec.storage)
    ours = []
    for path in storage.list(spec.output.path):
        relative = _relative(spec, path)
        base = relative.rsplit("/", 1)[-1]
        if (relative.startswith(f"{RECORDS_DIR}/") or relative in (ERRORS, MANIFEST)
                or ("/" not in relative and base.startswith(("part-", ".tmp-part-"))
                    and base.endswith((".parquet", ".tar")) or base.startswith(".tmp-part-"))):
            ours.append(path)
    storage.delete(storage.join(spec.output.path, SUCCESS))
    for path in ours:
        storage.delete(path)
    return len(ours)
