"""Repeated ids in inputs too large to hold in memory: hash partitions on local disk.

`plan.find_duplicates` holds every id at once (15-20 bytes a row with Arrow's dictionary
encoding): right for a few million rows, 15-20 GB of driver memory at 100M. Above
`IN_MEMORY_ROWS` the ids stream instead, one Parquet row group at a time: each id is
hashed to one of P partitions and appended, with its global row, to that partition's
Arrow IPC file in a temporary folder; then each partition alone is grouped by id (Arrow's
hash aggregation) to find every id's first row and the rows that repeat it. Equal ids
always hash alike, so repeats are found wherever their rows are, exactly as in memory.
Peak memory is one row group plus one partition (about PARTITION_ROWS rows) whatever the
input's size; the temporary folder takes about the id column's size plus 8 bytes a row.

With images_per_prompt k > 1, an id `B-j` (1 <= j < k) also clashes with the id `B`
(see `plan.find_duplicates`): such a row is written a second time under the key `B`, so
the partition holding `B` sees both.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .readers import InputFile, read_parquet_column
from .storage import Storage

# Inputs up to this many rows are checked in memory (plan.find_duplicates); above, on disk.
IN_MEMORY_ROWS = 5_000_000
# Rows per partition aimed at: what one partition's grouping holds in memory at once.
PARTITION_ROWS = 1_000_000
MAX_PARTITIONS = 512  # open files at once while partitioning
_DERIVED = r"^(?P<base>.*)-(?P<j>[1-9][0-9]{0,8})$"
# Per-position multipliers of the id hash (fixed: partitions must not depend on the run).
_MULTIPLIERS = (np.random.default_rng(0x1D5).integers(1, 2**62, size=64, dtype=np.uint64)
                | np.uint64(1))
_OWN = pa.schema([("key", pa.large_string()), ("row", pa.int64())])
_CANDIDATES = pa.schema([("key", pa.large_string()), ("row", pa.int64()),
                         ("own", pa.large_string())])


def id_hash(ids: pa.Array) -> np.ndarray:
    """A uint64 per non-null text id, a function of its bytes alone (vectorised: Arrow
    has no hash kernel). Used only to route ids to partitions, so a collision costs a
    slightly larger partition, never a wrong answer."""
    ids = pc.cast(ids, pa.large_string())
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset: ids.offset + len(ids) + 1]
    data = ids.buffers()[2]
    lengths = np.diff(offsets)
    sums = np.zeros(len(ids), np.uint64)
    if offsets[-1] > offsets[0]:
        segment = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)
        starts = offsets[:-1] - offsets[0]
        position = np.arange(len(segment)) - np.repeat(starts, lengths)
        weighted = segment * _MULTIPLIERS[position % len(_MULTIPLIERS)]
        filled = lengths > 0
        sums[filled] = np.add.reduceat(weighted, starts[filled])
    mixed = sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    mixed ^= mixed >> np.uint64(31)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    return mixed ^ (mixed >> np.uint64(29))


class _Partitions:
    """P append-only Arrow IPC streams in a folder, one per hash partition."""

    def __init__(self, folder: Path, count: int, schema: pa.Schema, name: str) -> None:
        self.count, self.schema = count, schema
        self.paths = [folder / f"{name}-{i:04d}.arrow" for i in range(count)]
        self.writers: list = [None] * count

    def add(self, columns: list[pa.Array], hashes: np.ndarray) -> None:
        part = (hashes % np.uint64(self.count)).astype(np.int64)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.count + 1))
        batch = pa.record_batch([c.take(pa.array(order)) for c in columns], schema=self.schema)
        for index in np.flatnonzero(np.diff(bounds)):
            if self.writers[index] is None:
                self.writers[index] = pa.ipc.new_stream(str(self.paths[index]), self.schema)
            self.writers[index].write_batch(batch.slice(bounds[index],
                                                        bounds[index + 1] - bounds[index]))

    def close(self) -> None:
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def read(self, index: int) -> pa.Table:
        if self.writers[index] is None:
            return self.schema.empty_table()
        with pa.ipc.open_stream(str(self.paths[index])) as reader:
            return reader.read_all()


def _row_groups(storage: Storage, info: InputFile, id_column: str):
    """The file's id column, one row group at a time, as text."""
    fs = storage.arrow_filesystem()
    import pyarrow.parquet as pq

    with fs.open_input_file(storage.arrow_path(info.path)) as source:
        parquet = pq.ParquetFile(source)
        for index in range(parquet.metadata.num_row_groups):
            try:
                column = parquet.read_row_group(index, columns=[id_column]).column(0)
            except Exception:
                # Let the whole-file reader name the file, column and rows that do not decode.
                read_parquet_column(fs.open_input_file(storage.arrow_path(info.path)),
                                    info.path, id_column)
                raise
            yield pc.cast(column, pa.string()).combine_chunks()


class _Firsts:
    """One partition's distinct keys and the first row of each (rows arrive ascending:
    files, row groups and rows are written in order, and the split is stable)."""

    def __init__(self, keys: pa.ChunkedArray, rows: np.ndarray) -> None:
        encoded = pc.dictionary_encode(keys.combine_chunks() if keys.num_chunks != 1
                                       else keys.chunk(0))
        self.values = encoded.dictionary
        self.codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        distinct, first_at = np.unique(self.codes, return_index=True)
        self.first = np.full(len(self.values), -1, np.int64)
        self.first[distinct] = rows[first_at]


def _repeats(own: pa.Table) -> tuple[_Firsts, list[tuple[np.ndarray, np.ndarray]]]:
    """Each key's first row, and (later rows, their first rows) of repeated keys."""
    rows = own.column("row").to_numpy()
    firsts = _Firsts(own.column("key"), rows)
    if len(firsts.values) == len(rows):
        return firsts, []
    first_of_row = firsts.first[firsts.codes]
    later = first_of_row != rows
    return firsts, [(rows[later], first_of_row[later])]


def _derived_pairs(candidates: pa.Table, firsts: _Firsts) -> list[tuple[np.ndarray, np.ndarray]]:
    """(later, earlier) first rows of an id `B-j` and the id `B` it clashes with."""
    if not candidates.num_rows:
        return []
    own = _Firsts(candidates.column("own"), candidates.column("row").to_numpy())
    # Each distinct B-j once, with its first row and its base B.
    distinct, first_at = np.unique(own.codes, return_index=True)
    base = candidates.column("key").take(pa.array(first_at))
    base_code = pc.index_in(base, value_set=firsts.values).to_numpy(zero_copy_only=False)
    found = ~np.isnan(base_code.astype(np.float64))
    one = own.first[distinct][found]
    other = firsts.first[base_code[found].astype(np.int64)]
    return [(np.maximum(one, other), np.minimum(one, other))] if len(one) else []


def find_duplicates_on_disk(storage: Storage, files: list[InputFile], id_column: str,
                            images_per_prompt: int = 1, partitions: int | None = None,
                            folder: str | None = None) -> dict[int, int]:
    """What `plan.find_duplicates` returns, for Parquet inputs of any size."""
    rows = sum(info.rows for info in files)
    count = partitions or min(MAX_PARTITIONS, max(1, math.ceil(rows / PARTITION_ROWS)))
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="ldm-jobs-ids-", dir=folder) as temp:
        own = _Partitions(Path(temp), count, _OWN, "own")
        derived = _Partitions(Path(temp), count, _CANDIDATES, "derived")
        try:
            offset = 0
            for info in files:
                start = offset
                for ids in _row_groups(storage, info, id_column):
                    row = pa.array(np.arange(start, start + len(ids), dtype=np.int64))
                    start += len(ids)
                    present = pc.is_valid(ids)  # null ids are rejected row by row
                    ids, row = ids.filter(present), row.filter(present)
                    own.add([pc.cast(ids, pa.large_string()), row], id_hash(ids))
                    if images_per_prompt > 1:
                        _add_candidates(derived, ids, row, images_per_prompt)
                offset += info.rows
        finally:
            own.close()
            derived.close()
        for index in range(count):
            firsts, found = _repeats(own.read(index))
            pairs += found + _derived_pairs(derived.read(index), firsts)
    return _merge(pairs)


def _add_candidates(derived: _Partitions, ids: pa.Array, row: pa.Array,
                    images_per_prompt: int) -> None:
    match = pc.fill_null(pc.match_substring_regex(ids, _DERIVED), False)
    if not pc.any(match).as_py():
        return
    ids, row = ids.filter(match), row.filter(match)
    parts = pc.extract_regex(ids, _DERIVED)
    near = pc.less(pc.cast(pc.struct_field(parts, "j"), pa.int64()), images_per_prompt)
    base = pc.struct_field(parts, "base").filter(near)
    derived.add([pc.cast(base, pa.large_string()), row.filter(near),
                 pc.cast(ids.filter(near), pa.large_string())], id_hash(base))


def _merge(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, int]:
    """{later row: its earliest clashing row}."""
    if not pairs:
        return {}
    later = np.concatenate([p[0] for p in pairs])
    earlier = np.concatenate([p[1] for p in pairs])
    order = np.lexsort((earlier, later))  # by later row, then earliest first
    later, earlier = later[order], earlier[order]
    keep = np.unique(later, return_index=True)[1]
    return dict(zip(later[keep].tolist(), earlier[keep].tolist()))


def find_duplicates_scaled(storage: Storage, files: list[InputFile], id_column: str,
                           prompt_column: str, images_per_prompt: int = 1) -> dict[int, int]:
    """In memory for small inputs (and the small-batch formats), on disk for big Parquet."""
    from .plan import find_duplicates

    parquet = all(info.path.endswith(".parquet") for info in files)
    if not parquet or sum(info.rows for info in files) <= IN_MEMORY_ROWS:
        return find_duplicates(storage, files, id_column, prompt_column, images_per_prompt)
    return find_duplicates_on_disk(storage, files, id_column, images_per_prompt)
