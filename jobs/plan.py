"""Planning: input files in a stable order -> rows -> shards with fixed names.

A shard's name and content follow from the input and the spec alone, so a retried or
resumed shard writes the same bytes to the same name. Planning reads metadata (Parquet
footers) and, when the input has ids, the id column alone to find duplicates; it never
loads whole tables of a Parquet input, and it needs no Ray.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .readers import InputError, InputFile, describe_file, list_input_files, read_slice, unify
from .rows import OVERRIDE_COLUMNS
from .spec import JobSpec, SpecError
from .storage import Storage, open_storage

RECORDS_DIR = "_shards"  # per-shard records: written after the shard, they mark it done
SHARD_EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}  # output.format -> suffix


@dataclass(frozen=True)
class RowSlice:
    """Rows [first, first + count) of one input file; `offset` is the first row's global index."""

    path: str
    first: int
    count: int
    offset: int = 0


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str  # "part-00000"
    slices: tuple[RowSlice, ...]
    rows: int  # input rows (each gives images_per_prompt images)
    id_column: str | None = None
    # (global row, global row of its first occurrence) for rows whose id came before.
    duplicates: tuple[tuple[int, int], ...] = ()
    fingerprint: str = ""  # hash of everything that decides the shard's bytes
    schema: pa.Schema | None = field(default=None, compare=False, repr=False)


@dataclass
class Plan:
    spec: JobSpec
    shards: list[ShardPlan]
    input_rows: int
    committed: set[str]
    files: list[InputFile] = field(default_factory=list)
    schema: pa.Schema | None = None
    id_column: str | None = None

    def pending(self) -> list[ShardPlan]:
        return [shard for shard in self.shards if shard.name not in self.committed]

    def describe(self) -> str:
        spec = self.spec
        columns = self.schema.names if self.schema is not None else []
        overrides = [name for name in OVERRIDE_COLUMNS if name in columns]
        images = self.input_rows * spec.sampling.images_per_prompt
        duplicates = sum(len(shard.duplicates) for shard in self.shards)
        lines = [
            f"job        {spec.name}",
            f"model      {spec.model}",
            f"input      {spec.input.path}: {len(self.files)} file(s), {self.input_rows} rows",
            f"columns    {', '.join(columns)}",
            f"prompt     column '{spec.input.prompt_column}'",
            "id         " + (f"column '{self.id_column}'" if self.id_column
                              else "row index, zero-padded to 8 digits"),
            f"overrides  {', '.join(overrides) or '(none)'}",
            f"sampling   {spec.sampling.sampler}, {spec.sampling.steps} steps, "
            f"cfg {spec.sampling.guidance_scale}, {spec.sampling.width}x{spec.sampling.height}, "
            f"seed {spec.sampling.seed}, {spec.sampling.images_per_prompt} image(s) per prompt",
            f"output     {spec.output.path} ({spec.output.format}, {spec.output.image_format})",
            f"shards     {len(self.shards)} of up to {rows_per_shard(spec)} prompts: "
            f"{len(self.committed)} committed, {len(self.pending())} pending",
            f"images     up to {images}",
        ]
        if duplicates:
            lines.append(f"duplicates {duplicates} row(s) repeat an earlier id and will be rejected")
        return "\n".join(lines)


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def shard_path(storage: Storage, spec: JobSpec, name: str) -> str:
    return storage.join(spec.output.path, f"{name}.{SHARD_EXTENSIONS[spec.output.format]}")


def record_path(storage: Storage, spec: JobSpec, name: str, suffix: str = ".json") -> str:
    return storage.join(spec.output.path, RECORDS_DIR, f"{name}{suffix}")


def rows_per_shard(spec: JobSpec) -> int:
    """Input rows per shard, so a shard holds about `output.rows_per_shard` images."""
    return max(1, spec.output.rows_per_shard // spec.sampling.images_per_prompt)


def _check_columns(files: list[InputFile], spec: JobSpec, id_column: str | None) -> None:
    prompt = spec.input.prompt_column
    for info in files:
        names = info.schema.names
        if prompt not in names:
            raise InputError(f"{info.path}: no prompt column '{prompt}' "
                             f"(columns: {', '.join(names) or 'none'}); set input.prompt_column")
        kind = info.schema.field(prompt).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind)):
            raise InputError(f"{info.path}: prompt column '{prompt}' holds {kind}, not text")
        if id_column and spec.input.id_column and id_column not in names:
            raise InputError(f"{info.path}: no id column '{id_column}' "
                             f"(columns: {', '.join(names)}); set input.id_column")


def _read_ids(storage: Storage, info: InputFile, id_column: str, prompt_column: str) -> pa.Array:
    if info.path.endswith(".parquet"):
        fs = storage.arrow_filesystem()
        parquet = pq.ParquetFile(fs.open_input_file(storage.arrow_path(info.path)))
        column = parquet.read(columns=[id_column]).column(0)
    else:
        column = read_slice(storage, info.path, 0, info.rows, prompt_column).column(id_column)
    return pc.cast(column, pa.string()).combine_chunks() if info.rows else pa.array([], pa.string())


def find_duplicates(storage: Storage, files: list[InputFile], id_column: str,
                    prompt_column: str) -> dict[int, int]:
    """{global row: global row of the first occurrence} for every repeated non-null id."""
    ids = [_read_ids(storage, info, id_column, prompt_column) for info in files]
    if not ids:
        return {}
    table = pa.table({"id": pa.chunked_array(ids, pa.string())})
    table = table.append_column("row", pa.array(range(table.num_rows), pa.int64()))
    table = table.filter(pc.is_valid(table.column("id")))
    counts = table.group_by("id").aggregate([("row", "min"), ("row", "count")])
    repeated = counts.filter(pc.greater(counts.column("row_count"), 1))
    if repeated.num_rows == 0:
        return {}
    first_row = dict(zip(repeated.column("id").to_pylist(), repeated.column("row_min").to_pylist()))
    later = table.filter(pc.is_in(table.column("id"), value_set=repeated.column("id")))
    return {row: first_row[key] for key, row in zip(later.column("id").to_pylist(),
                                                   later.column("row").to_pylist())
            if row != first_row[key]}


def _fingerprint(spec: JobSpec, slices: tuple[RowSlice, ...], id_column: str | None) -> str:
    decisive = {
        "model": spec.model,
        "input": {"prompt_column": spec.input.prompt_column, "id_column": id_column},
        "output": spec.output.model_dump(exclude={"path"}),
        "sampling": spec.sampling.model_dump(),
        "slices": [[s.path, s.first, s.count, s.offset] for s in slices],
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def _cut_shards(spec: JobSpec, files: list[InputFile], id_column: str | None,
                schema: pa.Schema, duplicates: dict[int, int]) -> list[ShardPlan]:
    per_shard = rows_per_shard(spec)
    shards: list[ShardPlan] = []
    slices: list[RowSlice] = []
    rows = offset = 0

    def close() -> None:
        nonlocal slices, rows
        start = offset - rows
        dups = tuple(sorted((r, f) for r, f in duplicates.items() if start <= r < offset))
        frozen = tuple(slices)
        shards.append(ShardPlan(len(shards), shard_name(len(shards)), frozen, rows, id_column,
                                dups, _fingerprint(spec, frozen, id_column), schema))
        slices, rows = [], 0

    for info in files:
        first = 0
        while first < info.rows:
            take = min(per_shard - rows, info.rows - first)
            slices.append(RowSlice(info.path, first, take, offset))
            first, rows, offset = first + take, rows + take, offset + take
            if rows == per_shard:
                close()
    if rows:
        close()
    return shards


def read_records(storage: Storage, spec: JobSpec) -> dict[str, dict]:
    """Every per-shard record present in the output, by shard name (read in parallel)."""
    wanted = []
    for path in storage.list(storage.join(spec.output.path, RECORDS_DIR)):
        base = path.replace("\\", "/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".json"):
            wanted.append(base[: -len(".json")])

    def load(name: str) -> dict:
        return json.loads(storage.read_bytes(record_path(storage, spec, name)))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(wanted, pool.map(load, wanted)))


def make_plan(spec: JobSpec) -> Plan:
    """Plan the job: validate the input's schema, cut shards, find committed ones (resume)."""
    in_storage = open_storage(spec.input.path, spec.storage)
    paths = list_input_files(spec.input.path, in_storage)
    files = [describe_file(in_storage, path, spec.input.prompt_column) for path in paths]
    schema = unify([info.schema for info in files], spec.input.path)
    id_column = spec.input.id_column or ("id" if "id" in schema.names else None)
    _check_columns(files, spec, id_column)
    duplicates = (find_duplicates(in_storage, files, id_column, spec.input.prompt_column)
                  if id_column else {})
    shards = _cut_shards(spec, files, id_column, schema, duplicates)

    out_storage = open_storage(spec.output.path, spec.storage)
    records = read_records(out_storage, spec)
    by_name = {shard.name: shard for shard in shards}
    for name, record in records.items():
        if name not in by_name or record.get("fingerprint") != by_name[name].fingerprint:
            raise SpecError(f"output.path: {spec.output.path} holds shard {name} of a different "
                            "job (another spec or input); use --overwrite or another output path")
    return Plan(spec, shards, sum(info.rows for info in files), set(records), files, schema,
                id_column)
