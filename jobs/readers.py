"""Input readers: list input files in a stable order, count rows, read row slices.

Parquet is the format for big inputs: planning reads only footers (row counts, schema)
and a worker reads just the row groups that cover its slice. CSV, JSON Lines and plain
text (one prompt per line; blank lines are not rows) are read whole, for small batches,
and each worker process parses such a file once (cached by path, size and mtime).
Every read goes through `storage`, which retries transient object-store faults; a
missing file is an InputError, any other storage failure stays a StorageError.

Unreadable data versus unreadable storage: a Parquet file with a valid footer may still
hold column chunks that cannot be decoded (flipped bits, a bad compressed page). Those
rows are data, not a fault of the machine: `read_slice_checked` returns them as
`UnreadableRows` (the worker rejects them with the reason) and reads the rest. What
decides is where the failure came from: every byte read from storage goes through
`_TrackedFile`, so an error while fetching bytes (a StorageError, a reset connection, a
local I/O error) is raised unchanged and fails the shard, to be retried, while an error
raised after all the bytes arrived is the data's.

Columns are merged across files after dictionary columns (pandas categoricals) are
decoded to their value type, so a categorical column in one file and a plain one in
another are the same column.
"""

from __future__ import annotations

import fnmatch
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .storage import NotFoundError, ReadOnlyRaw, Storage, StorageError


class InputError(ValueError):
    """Input that cannot be read as prompts; the message names the file (and column/row)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class UnreadableRows:
    """Rows [first, first + count) of a file whose data cannot be decoded, and why."""

    first: int
    count: int
    reason: str


# What pyarrow raises for bytes it cannot decode (a corrupt page, bad thrift, a snappy
# stream that does not inflate). Not-implemented (a codec this build lacks) and memory
# errors are not about the data: they fail the shard as before.
_DECODE_ERRORS = (OSError, pa.ArrowInvalid, pa.ArrowIndexError, pa.ArrowKeyError,
                  pa.ArrowTypeError, pa.ArrowCapacityError, pa.ArrowSerializationError)
# Failures of the storage or network, never of the data, however pyarrow relays them.
_IO_ERRORS = (StorageError, ConnectionError, TimeoutError)


class _TrackedFile(ReadOnlyRaw):
    """A file for pyarrow that remembers the first failure of the storage under it.

    Wrapped in `pa.PythonFile`, it tells apart the two ways a read of Parquet data fails:
    fetching the bytes (then `error` is set, and that error propagates as it was) or
    decoding bytes that did arrive (`error` stays None).
    """

    def __init__(self, raw: pa.NativeFile):
        super().__init__()
        self.raw = raw
        self.error: BaseException | None = None

    def _tracked(self, operation, *args):
        try:
            return operation(*args)
        except BaseException as error:
            if self.error is None:
                self.error = error
            raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._tracked(self.raw.seek, offset, whence)

    def tell(self) -> int:
        return self._tracked(self.raw.tell)

    def read(self, size: int = -1) -> bytes:
        return self._tracked(self.raw.read, None if size is None or size < 0 else size)

    def read_buffer(self, size: int = -1) -> pa.Buffer:  # pyarrow's zero-copy path
        return self._tracked(self.raw.read_buffer, None if size is None or size < 0 else size)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def _is_decode_failure(error: BaseException, tracked: _TrackedFile) -> bool:
    """Whether `error` came from decoding bytes that were read fine (the data is bad)."""
    return (tracked.error is None and isinstance(error, _DECODE_ERRORS)
            and not isinstance(error, _IO_ERRORS))


def _open_tracked(source: pa.NativeFile) -> tuple[pq.ParquetFile, _TrackedFile]:
    tracked = _TrackedFile(source)
    return pq.ParquetFile(pa.PythonFile(tracked, mode="r")), tracked


class _Parquet:
    @staticmethod
    def _open(storage: Storage, path: str) -> pq.ParquetFile:
        # Through the storage layer: on S3 each ranged read is retried like any request.
        return pq.ParquetFile(storage.open_input_file(path))

    def describe(self, storage: Storage, path: str, prompt_column: str) -> InputFile:
        parquet = self._open(storage, path)  # footer only: no row data is read
        return InputFile(path, parquet.metadata.num_rows, parquet.schema_arrow)

    def read_checked(self, storage: Storage, path: str, first: int, count: int,
                     prompt_column: str) -> tuple[pa.Table, list[UnreadableRows]]:
        parquet, tracked = _open_tracked(storage.open_input_file(path))
        meta = parquet.metadata
        spans = []  # (row group, its first row in the file, its rows) covering the slice
        group_start = 0
        for index in range(meta.num_row_groups):
            rows = meta.row_group(index).num_rows
            if group_start + rows > first and group_start < first + count:
                spans.append((index, group_start, rows))
            group_start += rows
        if not spans:
            return parquet.schema_arrow.empty_table(), []
        try:  # the common case: every row group decodes, one read for all of them
            table = parquet.read_row_groups([index for index, _, _ in spans])
            return table.slice(first - spans[0][1], count), []
        except Exception as error:
            if not _is_decode_failure(error, tracked):
                raise
        # Some row group is corrupt: read group by group, keeping what decodes.
        pieces, unreadable = [], []
        for index, start, rows in spans:
            low, high = max(first, start), min(first + count, start + rows)
            try:
                part = parquet.read_row_group(index)
            except Exception as error:
                if not _is_decode_failure(error, tracked):
                    raise
                part, reason = self._salvage(parquet, tracked, index, rows, error)
                unreadable.append(UnreadableRows(
                    low, high - low, f"{path}: rows {low}..{high - 1} of the file (row group "
                    f"{index}) cannot be decoded: {reason}"))
            pieces.append(part.slice(low - start, high - low))
        return pa.concat_tables(pieces), unreadable

    @staticmethod
    def _salvage(parquet: pq.ParquetFile, tracked: _TrackedFile, index: int, rows: int,
                 error: BaseException) -> tuple[pa.Table, str]:
        """Row group `index`, column by column: what decodes is kept (for errors.parquet,
        and the ids), a column that does not becomes nulls and is named in the reason."""
        schema = parquet.schema_arrow
        columns, broken = [], []
        for field in schema:
            try:
                columns.append(parquet.read_row_group(index, columns=[field.name]).column(0))
            except Exception as column_error:
                if not _is_decode_failure(column_error, tracked):
                    raise
                columns.append(pa.nulls(rows, field.type))
                broken.append((field.name, column_error))
        if broken:
            names = ", ".join(f"'{name}'" for name, _ in broken)
            reason = f"column {names}: {_one_line(broken[0][1])}"
        else:
            reason = _one_line(error)
        return pa.Table.from_arrays(columns, schema=schema), reason

    def read(self, storage: Storage, path: str, first: int, count: int,
             prompt_column: str) -> pa.Table:
        return _strict(path, *self.read_checked(storage, path, first, count, prompt_column))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _strict(path: str, table: pa.Table, unreadable: list[UnreadableRows]) -> pa.Table:
    if unreadable:
        raise InputError(unreadable[0].reason)
    return table


# Parsed whole-file inputs, per process: {(reader, path, prompt column): (version, table)}.
# A worker reads many slices of one small file; each file is parsed once while its
# version (size and mtime, or the object's ETag) stays the same.
PARSED_CACHE_BYTES = 256 * 1024 * 1024
_parsed: OrderedDict[tuple, tuple[Any, pa.Table]] = OrderedDict()
_parsed_lock = threading.Lock()


def _cached_table(key: tuple, version: Any) -> pa.Table | None:
    with _parsed_lock:
        hit = _parsed.get(key)
        if hit is None or hit[0] != version:
            return None
        _parsed.move_to_end(key)
        return hit[1]


def _remember_table(key: tuple, version: Any, table: pa.Table) -> None:
    if table.nbytes > PARSED_CACHE_BYTES:
        return
    with _parsed_lock:
        _parsed[key] = (version, table)
        _parsed.move_to_end(key)
        total = sum(entry[1].nbytes for entry in _parsed.values())
        while total > PARSED_CACHE_BYTES and len(_parsed) > 1:
            _, (_, dropped) = _parsed.popitem(last=False)
            total -= dropped.nbytes


def clear_parsed_cache() -> None:
    with _parsed_lock:
        _parsed.clear()


class _WholeFile:
    """Small formats: read the whole file; counting and slicing both go through it."""

    def load(self, data: bytes, prompt_column: str) -> pa.Table:
        raise NotImplementedError

    def _table(self, storage: Storage, path: str, prompt_column: str) -> pa.Table:
        key = (type(self).__name__, path, prompt_column)
        version = storage.version(path)
        table = _cached_table(key, version) if version is not None else None
        if table is not None:
            return table
        data = storage.read_bytes(path)
        try:
            table = self.load(data, prompt_column)
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise InputError(f"{path}: cannot parse: {error}") from None
        if version is not None:
            # Taken before the read: if the file changed meanwhile, the next version check
            # differs and the file is parsed again; a stale table is never served.
            _remember_table(key, version, table)
        return table

    def describe(self, storage: Storage, path: str, prompt_column: str) -> InputFile:
        table = self._table(storage, path, prompt_column)
        return InputFile(path, table.num_rows, table.schema)

    def read_checked(self, storage: Storage, path: str, first: int, count: int,
                     prompt_column: str) -> tuple[pa.Table, list[UnreadableRows]]:
        return self._table(storage, path, prompt_column).slice(first, count), []

    def read(self, storage: Storage, path: str, first: int, count: int,
             prompt_column: str) -> pa.Table:
        return self._table(storage, path, prompt_column).slice(first, count)


class _Csv(_WholeFile):
    def load(self, data: bytes, prompt_column: str) -> pa.Table:
        # Prompts stay text even when they look like numbers.
        options = pacsv.ConvertOptions(column_types={prompt_column: pa.string()})
        return pacsv.read_csv(io.BytesIO(data), convert_options=options)


class _JsonLines(_WholeFile):
    def load(self, data: bytes, prompt_column: str) -> pa.Table:
        return pajson.read_json(io.BytesIO(data))


class _Text(_WholeFile):
    def load(self, data: bytes, prompt_column: str) -> pa.Table:
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
        return pa.table({prompt_column: pa.array(lines, pa.string())})


READERS = {
    ".parquet": _Parquet(),
    ".csv": _Csv(),
    ".jsonl": _JsonLines(),
    ".ndjson": _JsonLines(),
    ".txt": _Text(),
}


def _reader(path: str):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in READERS:
        raise InputError(f"{path}: unsupported input type '{suffix}' "
                         f"(supported: {', '.join(sorted(READERS))})")
    return READERS[suffix]


def _is_data_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    # Hidden, temporary and marker files (_SUCCESS, .tmp-*) are never input.
    return not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in READERS


def list_input_files(path: str, storage: Storage) -> list[str]:
    """The input's files, sorted by path: one file, a folder/prefix, or a glob."""
    if any(char in path for char in "*?["):
        cut = min(path.index(char) for char in "*?[" if char in path)
        base = path[:cut].rsplit("/", 1)[0] if "/" in path[:cut] else "."
        found = [p for p in storage.list(base) if fnmatch.fnmatchcase(p, path)
                 or fnmatch.fnmatchcase(os.path.normpath(p), os.path.normpath(path))]
        files = sorted(p for p in found if _is_data_file(p))
        if not files:
            raise InputError(f"{path}: the glob matches no input files")
        return files
    if storage.is_dir(path):
        files = sorted(p for p in storage.list(path) if _is_data_file(p))
        if not files:
            raise InputError(f"{path}: no input files (supported: {', '.join(sorted(READERS))})")
        return files
    if not storage.exists(path):
        raise InputError(f"{path}: input not found")
    _reader(path)
    return [path]


def describe_file(storage: Storage, path: str, prompt_column: str) -> InputFile:
    """Row count and schema of one input file (Parquet: from the footer alone)."""
    try:
        return _reader(path).describe(storage, path, prompt_column)
    except NotFoundError as error:
        raise InputError(f"{path}: input not found ({error})") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot read: {error}") from None


def read_slice(storage: Storage, path: str, first: int, count: int,
               prompt_column: str) -> pa.Table:
    """Rows [first, first + count) of one input file, in file order.

    Rows that cannot be decoded are an InputError here; see `read_slice_checked`.
    """
    return _strict(path, *read_slice_checked(storage, path, first, count, prompt_column))


def read_slice_checked(storage: Storage, path: str, first: int, count: int,
                       prompt_column: str) -> tuple[pa.Table, list[UnreadableRows]]:
    """Rows [first, first + count) of one input file, and the spans of them that cannot be
    decoded (corrupt Parquet data); those rows are in the table too, their unreadable
    columns null, so the table always has `count` rows in file order.

    A failure to fetch bytes (StorageError, a connection or local I/O error) is raised.
    """
    try:
        return _reader(path).read_checked(storage, path, first, count, prompt_column)
    except NotFoundError as error:
        raise InputError(f"{path}: input not found ({error})") from None
    except _IO_ERRORS:
        raise
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot read rows {first}..{first + count - 1}: {error}") from None


def read_parquet_column(source: pa.NativeFile, path: str, column: str) -> pa.ChunkedArray:
    """One column of a whole Parquet file (planning reads the ids so).

    Data that cannot be decoded is an InputError naming the file, the column and the row
    group; a failure to fetch the bytes is a StorageError naming the file.
    """
    parquet, tracked = _open_tracked(source)
    try:
        return parquet.read(columns=[column]).column(0)
    except Exception as error:
        if tracked.error is not None or isinstance(error, _IO_ERRORS):
            if isinstance(error, StorageError):
                raise
            raise StorageError(f"{path}: cannot read: {_one_line(error)}") from None
        if not _is_decode_failure(error, tracked):
            raise
        failure = _one_line(error)
    # Name the first row group that does not decode, for the message.
    meta, start = parquet.metadata, 0
    for index in range(meta.num_row_groups):
        rows = meta.row_group(index).num_rows
        try:
            parquet.read_row_group(index, columns=[column])
        except Exception as group_error:
            if not _is_decode_failure(group_error, tracked):
                raise
            raise InputError(f"{path}: column '{column}' cannot be decoded in rows "
                             f"{start}..{start + rows - 1} (row group {index}): "
                             f"{_one_line(group_error)}") from None
        start += rows
    raise InputError(f"{path}: column '{column}' cannot be decoded: {failure}")


def plain_type(kind: pa.DataType) -> pa.DataType:
    """A dictionary type's value type (pandas categoricals); any other type unchanged."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns and types (missing columns become nulls)."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            columns.append(column if column.type == field.type else column.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def unify(schemas: list[pa.Schema], source: str) -> pa.Schema:
    """One schema for all input files; incompatible column types are an InputError.

    Dictionary columns count as their value type: a pandas categorical column in one file
    and a plain column in another merge, and `conform` decodes the categorical one.
    """
    plain = [pa.schema([field.with_type(plain_type(field.type)) for field in s])
             for s in schemas]
    try:
        return pa.unify_schemas(plain, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(f"{source}: input files have incompatible columns: {error}") from None


__all__ = ["InputError", "InputFile", "StorageError", "UnreadableRows", "clear_parsed_cache",
           "conform", "describe_file", "list_input_files", "plain_type", "read_parquet_column",
           "read_slice", "read_slice_checked", "unify"]
