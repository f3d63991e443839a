"""Input readers: list input files in a stable order, count rows, read row slices.

Parquet is the format for big inputs: planning reads only footers (row counts, schema)
and a worker reads just the row groups that cover its slice. CSV, JSON Lines and plain
text (one prompt per line; blank lines are not rows) are read whole, for small batches.
Every read goes through `jobs.storage`, which retries transient object-store faults; a
missing file is an InputError, any other storage failure stays a StorageError.
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .storage import NotFoundError, Storage, StorageError


class InputError(ValueError):
    """Input that cannot be read as prompts; the message names the file (and column/row)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    schema: pa.Schema


class _Parquet:
    @staticmethod
    def _open(storage: Storage, path: str) -> pq.ParquetFile:
        # Through the storage layer: on S3 each ranged read is retried like any request.
        return pq.ParquetFile(storage.open_input_file(path))

    def describe(self, storage: Storage, path: str, prompt_column: str) -> InputFile:
        parquet = self._open(storage, path)  # footer only: no row data is read
        return InputFile(path, parquet.metadata.num_rows, parquet.schema_arrow)

    def read(self, storage: Storage, path: str, first: int, count: int,
             prompt_column: str) -> pa.Table:
        parquet = self._open(storage, path)
        meta = parquet.metadata
        groups, group_start, skip = [], 0, None
        for index in range(meta.num_row_groups):
            rows = meta.row_group(index).num_rows
            if group_start + rows > first and group_start < first + count:
                groups.append(index)
                skip = first - group_start if skip is None else skip
            group_start += rows
        if not groups:
            return parquet.schema_arrow.empty_table()
        return parquet.read_row_groups(groups).slice(skip, count)


class _WholeFile:
    """Small formats: read the whole file; counting and slicing both go through it."""

    def load(self, data: bytes, prompt_column: str) -> pa.Table:
        raise NotImplementedError

    def _table(self, storage: Storage, path: str, prompt_column: str) -> pa.Table:
        data = storage.read_bytes(path)
        try:
            return self.load(data, prompt_column)
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise InputError(f"{path}: cannot parse: {error}") from None

    def describe(self, storage: Storage, path: str, prompt_column: str) -> InputFile:
        table = self._table(storage, path, prompt_column)
        return InputFile(path, table.num_rows, table.schema)

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
    """Rows [first, first + count) of one input file, in file order."""
    try:
        return _reader(path).read(storage, path, first, count, prompt_column)
    except NotFoundError as error:
        raise InputError(f"{path}: input not found ({error})") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: cannot read rows {first}..{first + count - 1}: {error}") from None


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
    """One schema for all input files; incompatible column types are an InputError."""
    try:
        return pa.unify_schemas([s.remove_metadata() for s in schemas],
                                promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(f"{source}: input files have incompatible columns: {error}") from None


__all__ = ["InputError", "InputFile", "StorageError", "conform", "describe_file",
           "list_input_files", "read_slice", "unify"]
