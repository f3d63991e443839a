"""Planning: input files in a stable order -> rows -> shards with fixed names.

A shard's name and content follow from the input and the spec alone, so a retried or
resumed shard writes the same bytes to the same name. Planning reads metadata (Parquet
footers) and, when the input has ids, the id column alone to find duplicates; it never
loads whole tables of a Parquet input, and it needs no Ray. Shards are row ranges, so
the plan of a million-row input is a few thousand small objects (see
benchmarks/plan_memory.py).

Everything wrong with the input that planning can see (no such file or bucket, a file
that is not Parquet, no prompt column, no rows at all, an id column whose data cannot be
decoded) is an InputError or SpecError naming the field, raised before any work starts;
the CLI exits 2 on it. Corrupt data in the other columns is found only by the worker
that reads it, which rejects those rows (see `jobs.readers.read_slice_checked`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .expand import Expander, Layout
from .readers import (
    InputError,
    InputFile,
    describe_file,
    list_input_files,
    read_parquet_column,
    read_slice,
    unify,
)
from .rows import OVERRIDE_COLUMNS, size_text
from .spec import JobSpec, SpecError, redact_text, resolved_note
from .storage import Storage, StorageError, open_storage

RECORDS_DIR = "_shards"  # per-shard records: written after the shard, they mark it done
SHARD_EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}  # output.format -> suffix


class ForeignOutputError(SpecError):
    """The output holds shards of another job (another spec or input): --overwrite clears it."""


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
    # With expand: the expanded rows [first, stop) this shard makes (`rows` of them), and
    # (input row, its first expanded row, its expanded row count) for each input row read.
    expanded: tuple[int, int] | None = None
    expanded_rows: tuple[tuple[int, int, int], ...] = ()


@dataclass
class Plan:
    spec: JobSpec
    shards: list[ShardPlan]
    input_rows: int
    committed: set[str]
    files: list[InputFile] = field(default_factory=list)
    schema: pa.Schema | None = None
    id_column: str | None = None
    damaged: list[str] = field(default_factory=list)  # unreadable shard records: run again

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
            f"model      {spec.model}" + (f" + refiner {spec.refiner.model} from {spec.refiner.switch_at}"
                                          if spec.refiner else ""),
            f"input      {spec.input.path}: {len(self.files)} file(s), {self.input_rows} rows",
            f"columns    {', '.join(columns)}",
            f"prompt     column '{spec.input.prompt_column}'",
            "id         " + (f"column '{self.id_column}'" if self.id_column
                              else "row index, zero-padded to 8 digits"),
            f"overrides  {', '.join(overrides) or '(none)'}",
            f"sampling   {spec.sampling.sampler}, {spec.sampling.steps} steps, "
            f"cfg {spec.sampling.guidance_scale}, {size_text(spec)}, "
            f"seed {spec.sampling.seed}, {spec.sampling.images_per_prompt} image(s) per prompt",
            f"output     {spec.output.path} ({spec.output.format}, {spec.output.image_format})",
            f"compute    {_actors(spec)}, {spec.compute.gpus_per_actor:g} GPU(s) "
            f"each, batch {spec.compute.batch_size}, {spec.compute.dtype}"
            + (", UNet compiled (torch.compile)" if spec.compute.compile else ""),
            f"shards     {len(self.shards)} of up to {rows_per_shard(spec)} prompts: "
            f"{len(self.committed)} committed, {len(self.pending())} pending",
            f"images     up to {images}",
        ]
        if self.damaged:
            lines.append(f"damaged    {len(self.damaged)} shard record(s) unreadable, will run "
                         f"again: {', '.join(self.damaged[:5])}")
        if duplicates:
            lines.append(f"duplicates {duplicates} row(s) repeat an earlier id and will be rejected")
        if spec.expand is not None:
            from .expand import preview

            lines += preview(self)
        return "\n".join(lines)


def plan_warnings(spec: JobSpec) -> list[str]:
    """Settings that work but are likely not what the user wants (printed, never fatal)."""
    warnings = []
    if spec.compute.gpus_per_actor == 0 and spec.compute.dtype in ("float16", "bfloat16"):
        warnings.append(f"compute.dtype: {spec.compute.dtype} on a CPU (gpus_per_actor: 0) is "
                        "slower than float32 there (CPUs have little half-precision "
                        "arithmetic); use float32 unless the job runs on GPUs")
    return warnings


def check_model(spec: JobSpec) -> None:
    """SpecError unless `spec.model` names a model a worker can load (no weights read):
    a wrong name or path stops the job before Ray starts, not after actors loaded."""
    from ldm_jobs.model.loading import check_source  # torch: only when a job is checked
    from ldm_jobs.model.weights import CheckpointError

    sources = [("model", spec.model)] + ([("refiner.model", spec.refiner.model)] if spec.refiner else [])
    for where, source in sources:
        try:
            check_source(source, spec.storage)
        except (OSError, ValueError, StorageError, CheckpointError) as error:
            raise SpecError(f"{where}: {redact_text(str(error))}{resolved_note(source)}") from None


def _actors(spec: JobSpec) -> str:
    if spec.compute.actors == "auto":
        return f"auto actors (one per free slot, up to {spec.compute.max_actors})"
    return f"{spec.compute.actors} actor(s)"


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
            raise InputError(f"input.prompt_column: {info.path}: no prompt column '{prompt}' "
                             f"(columns: {', '.join(names) or 'none'}); set input.prompt_column")
        kind = info.schema.field(prompt).type
        if not _is_text(kind):
            raise InputError(f"input.prompt_column: {info.path}: prompt column '{prompt}' "
                             f"holds {kind}, not text")
        if id_column and spec.input.id_column and id_column not in names:
            raise InputError(f"input.id_column: {info.path}: no id column '{id_column}' "
                             f"(columns: {', '.join(names)}); set input.id_column")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # pandas categoricals arrive as dictionary<string>
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _kind: False)(kind)
            or pa.types.is_null(kind))


def _read_ids(storage: Storage, info: InputFile, id_column: str, prompt_column: str) -> pa.Array:
    if not info.rows:
        return pa.array([], pa.string())
    if info.path.endswith(".parquet"):
        # The one place planning reads row data: a corrupt id column stops the job here,
        # naming the file and rows, since without ids its rows could not be accounted for.
        fs = storage.arrow_filesystem()
        column = read_parquet_column(fs.open_input_file(storage.arrow_path(info.path)),
                                     info.path, id_column)
    else:
        column = read_slice(storage, info.path, 0, info.rows, prompt_column).column(id_column)
    try:
        return pc.cast(column, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise InputError(f"input.id_column: {info.path}: id column '{id_column}' "
                         f"({column.type}) cannot be read "
                         f"as text ids: {error}; set input.id_column to a text or integer "
                         "column") from None


def find_duplicates(storage: Storage, files: list[InputFile], id_column: str,
                    prompt_column: str, images_per_prompt: int = 1) -> dict[int, int]:
    """{global row: an earlier global row} for every row one of whose image ids came before.

    Two rows clash when they have the same non-null id, or, with images_per_prompt k > 1,
    when one's id is another's plus `-j` (1 <= j < k): row `a` makes the images `a`,
    `a-1`, ..., so a row with the id `a-1` would write a second image of that id. The
    later row of a clashing pair is the one rejected, wherever the two rows' shards are.
    Ids are dictionary-encoded once; the rest is integer arrays (a few bytes per row).
    """
    ids = [_read_ids(storage, info, id_column, prompt_column) for info in files]
    if not ids:
        return {}
    encoded = pc.dictionary_encode(pa.chunked_array(ids, pa.string()).combine_chunks())
    del ids
    values = encoded.dictionary  # each distinct id once
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.flatnonzero(codes >= 0)  # rows with an id (null ids are rejected row by row)
    if len(values) == len(rows) and images_per_prompt == 1:
        return {}  # every id distinct: the common case, settled without sorting
    first = np.full(len(values), -1, np.int64)  # code -> first row with that id
    distinct, first_at = np.unique(codes[rows], return_index=True)
    first[distinct] = rows[first_at]
    found: dict[int, int] = {}
    if len(distinct) < len(rows):
        later = rows[first[codes[rows]] != rows]
        found.update(zip(later.tolist(), first[codes[later]].tolist()))
    if images_per_prompt > 1:
        _derived_clashes(values, first, images_per_prompt, found)
    return found


def _derived_clashes(values: pa.Array, first: np.ndarray, images_per_prompt: int,
                     found: dict[int, int]) -> None:
    """Add clashes of an id `<other id>-j` (j < images_per_prompt) with that other id."""
    pattern = r"^(?P<base>.*)-(?P<j>[1-9][0-9]{0,8})$"
    candidates = np.flatnonzero(
        pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(
            zero_copy_only=False))
    if not len(candidates):
        return
    parts = pc.extract_regex(values.take(pa.array(candidates)), pattern)
    suffix = pc.cast(pc.struct_field(parts, "j"), pa.int64()).to_numpy(zero_copy_only=False)
    base_codes = pc.fill_null(pc.index_in(pc.struct_field(parts, "base"), value_set=values), -1)
    base_codes = base_codes.to_numpy(zero_copy_only=False)
    hits = (suffix < images_per_prompt) & (base_codes >= 0)
    for code, base_code in zip(candidates[hits].tolist(), base_codes[hits].tolist()):
        one, other = int(first[code]), int(first[base_code])
        later, earlier = max(one, other), min(one, other)
        if earlier < found.get(later, later):
            found[later] = earlier


def _fingerprint_prefix(spec: JobSpec, id_column: str | None) -> bytes:
    """The JSON of everything but the slices that decides a shard's bytes, without its
    closing brace: `_fingerprint` appends each shard's slices (the last key in sorted
    order), so the spec is serialised once per plan, not once per shard."""
    decisive = {
        "model": spec.model,
        "input": {"prompt_column": spec.input.prompt_column, "id_column": id_column},
        "output": spec.output.model_dump(exclude={"path"}),
        "sampling": spec.sampling.model_dump(),
        "slices": None,
    }
    if spec.refiner is not None:  # only then: the fingerprints of one-stage jobs stay as they were
        decisive["refiner"] = spec.refiner.model_dump()
    text = json.dumps(decisive, sort_keys=True)
    assert text.endswith(', "slices": null}')  # slices sorts last
    return text[: -len("null}")].encode()


def _fingerprint(spec: JobSpec, slices: tuple[RowSlice, ...], id_column: str | None,
                 prefix: bytes | None = None) -> str:
    """sha256 of json.dumps(decisive fields and the slices, sort_keys=True)."""
    prefix = prefix if prefix is not None else _fingerprint_prefix(spec, id_column)
    tail = json.dumps([[s.path, s.first, s.count, s.offset] for s in slices]) + "}"
    return hashlib.sha256(prefix + tail.encode()).hexdigest()


def _cut_shards(spec: JobSpec, files: list[InputFile], id_column: str | None,
                schema: pa.Schema, duplicates: dict[int, int]) -> list[ShardPlan]:
    per_shard = rows_per_shard(spec)
    shards: list[ShardPlan] = []
    slices: list[RowSlice] = []
    rows = offset = 0
    dup_rows = sorted(duplicates)  # bisected per shard: linear, not shards x duplicates
    prefix = _fingerprint_prefix(spec, id_column)

    def close() -> None:
        nonlocal slices, rows
        start = offset - rows
        lo, hi = bisect.bisect_left(dup_rows, start), bisect.bisect_left(dup_rows, offset)
        dups = tuple((r, duplicates[r]) for r in dup_rows[lo:hi])
        frozen = tuple(slices)
        shards.append(ShardPlan(len(shards), shard_name(len(shards)), frozen, rows, id_column,
                                dups, _fingerprint(spec, frozen, id_column, prefix), schema))
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


def _cut_expanded_shards(spec: JobSpec, files: list[InputFile], id_column: str | None,
                         schema: pa.Schema, duplicates: dict[int, int],
                         layout: Layout) -> list[ShardPlan]:
    """Shards of ``rows_per_shard`` expanded rows; each reads the input rows it expands."""
    file_starts = np.cumsum([0] + [info.rows for info in files]).tolist()
    # the spec's part of every fingerprint, hashed once (10M rows make 40k shards)
    decisive = hashlib.sha256(_fingerprint(spec, (), id_column).encode())
    decisive.update(json.dumps(spec.expand.model_dump(), sort_keys=True).encode())
    id_name = id_column or "id"  # expanded rows always carry their ID~k ids
    shards: list[ShardPlan] = []
    per_shard = rows_per_shard(spec)
    for first in range(0, layout.total, per_shard):
        stop = min(first + per_shard, layout.total)
        rows = range(layout.row_of(first), layout.row_of(stop - 1) + 1)
        spans = tuple((r, layout.start(r), layout.start(r + 1) - layout.start(r)) for r in rows)
        slices = []
        for i in range(bisect.bisect_right(file_starts, rows[0]) - 1, len(files)):
            lo, hi = max(rows[0], file_starts[i]), min(rows[-1] + 1, file_starts[i + 1])
            if lo >= hi:
                break
            slices.append(RowSlice(files[i].path, lo - file_starts[i], hi - lo, lo))
        dups = tuple((e, duplicates[r]) for r, start, count in spans if r in duplicates
                     for e in range(max(first, start), min(stop, start + count)))
        frozen = tuple(slices)
        fingerprint = decisive.copy()
        fingerprint.update(json.dumps([[s.path, s.first, s.count, s.offset] for s in frozen]
                                      + [first, stop]).encode())
        shards.append(ShardPlan(len(shards), shard_name(len(shards)), frozen, stop - first, id_name,
                                dups, fingerprint.hexdigest(), schema, (first, stop), spans))
    return shards


def _templates(storage: Storage, files: list[InputFile], spec: JobSpec, id_column: str | None):
    """(template, id) of every input row, file by file (combinatorial counts need them)."""
    offset = 0
    for info in files:
        prompts = _read_ids(storage, info, spec.input.prompt_column, spec.input.prompt_column)
        ids = _read_ids(storage, info, id_column, spec.input.prompt_column).to_pylist() \
            if id_column else [f"{offset + i:08d}" for i in range(info.rows)]
        yield from zip(prompts.to_pylist(), (str(i) for i in ids))
        offset += info.rows


def _valid_record(name: str, record: object) -> bool:
    return (isinstance(record, dict) and record.get("name") == name
            and isinstance(record.get("fingerprint"), str))


def read_records(storage: Storage, spec: JobSpec,
                 damaged: list[str] | None = None) -> dict[str, dict]:
    """Every per-shard record present in the output, by shard name (read in parallel).

    A record that is not valid JSON naming its shard and job fingerprint (damaged storage,
    a hand edit) vouches for nothing: it is left out, so its shard is generated again and
    the record rewritten, and its name is appended to ``damaged`` for the caller to report.
    """
    wanted = []
    for path in storage.list(storage.join(spec.output.path, RECORDS_DIR)):
        base = path.replace("\\", "/").rsplit("/", 1)[-1]
        if base.startswith("part-") and base.endswith(".json"):
            wanted.append(base[: -len(".json")])

    def load(name: str) -> dict | None:
        try:
            record = json.loads(storage.read_bytes(record_path(storage, spec, name)))
        except (ValueError, UnicodeDecodeError):
            return None
        return record if _valid_record(name, record) else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        loaded = dict(zip(wanted, pool.map(load, wanted)))
    if damaged is not None:
        damaged.extend(name for name, record in loaded.items() if record is None)
    return {name: record for name, record in loaded.items() if record is not None}


def make_plan(spec: JobSpec) -> Plan:
    """Plan the job: validate the input's schema, cut shards, find committed ones (resume)."""
    try:
        in_storage = open_storage(spec.input.path, spec.storage)
        paths = list_input_files(spec.input.path, in_storage)
        files = [describe_file(in_storage, path, spec.input.prompt_column) for path in paths]
        schema = unify([info.schema for info in files], spec.input.path)
        id_column = spec.input.id_column or ("id" if "id" in schema.names else None)
        _check_columns(files, spec, id_column)
        input_rows = sum(info.rows for info in files)
        if input_rows == 0:
            raise InputError(f"{spec.input.path}: the input holds no rows "
                             f"({len(files)} file(s), all empty); nothing to generate")
        # Big Parquet inputs are checked out of memory (jobs/dedup.py), small ones here.
        from .dedup import find_duplicates_scaled

        duplicates = (find_duplicates_scaled(in_storage, files, id_column,
                                             spec.input.prompt_column,
                                             spec.sampling.images_per_prompt)
                      if id_column else {})
    except (InputError, StorageError) as error:
        # Name the field; never echo a credential that a URL or the environment holds.
        message = redact_text(str(error)) + resolved_note(spec.input.path)
        field = "" if message.startswith("input.") else "input.path: "
        raise InputError(f"{field}{message}") from None
    if spec.expand is not None:
        layout = Expander(spec).layout(input_rows, lambda: _templates(in_storage, files, spec, id_column))
        shards = _cut_expanded_shards(spec, files, id_column, schema, duplicates, layout)
        input_rows = layout.total
    else:
        shards = _cut_shards(spec, files, id_column, schema, duplicates)

    try:
        out_storage = open_storage(spec.output.path, spec.storage)
        out_storage.check_writable(spec.output.path)
        damaged: list[str] = []
        records = read_records(out_storage, spec, damaged)
    except StorageError as error:
        raise SpecError(f"output.path: {redact_text(str(error))}"
                        f"{resolved_note(spec.output.path)}") from None
    by_name = {shard.name: shard for shard in shards}
    for name, record in records.items():
        if name not in by_name or record.get("fingerprint") != by_name[name].fingerprint:
            raise ForeignOutputError(
                f"output.path: {spec.output.path} holds shard {name} of a different job "
                "(another spec or input); use --overwrite or another output path")
    return Plan(spec, shards, input_rows, set(records), files, schema, id_column,
                damaged=[name for name in damaged if name in by_name])
