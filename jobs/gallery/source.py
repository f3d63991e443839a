"""What the gallery reads from a job's output: shards row by row, records, rejected rows.

Everything streams: a shard's rows come in Parquet record batches, rejected rows in
batches of the columns the page shows, so memory does not grow with the output.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from ..plan import RECORDS_DIR
from ..report import Output, _parquet_rows, _tar_rows


def base_name(path: str) -> str:
    """`.../part-00003.parquet` -> `part-00003.parquet` (local or s3:// paths)."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def shard_name(path: str) -> str:
    """`.../part-00003.parquet` -> `part-00003`."""
    return base_name(path).rsplit(".", 1)[0]


def shard_rows(out: Output, path: str) -> Iterator[dict[str, Any]]:
    """A committed shard's rows, in file order, `image` as encoded bytes."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(out.storage, path)
    else:
        yield from _tar_rows(out.storage.read_bytes(path))


def records_folder(out: Output) -> str:
    return out.storage.join(out.uri, RECORDS_DIR)


def shard_records(out: Output) -> dict[str, dict[str, Any]]:
    """The per-shard records in `_shards/` by shard name; unreadable ones are left out
    (the job itself regenerates their shards), so a plot may miss a shard, never lie."""
    records = {}
    for path in out.storage.list(records_folder(out)):
        base = base_name(path)
        if not (base.startswith("part-") and base.endswith(".json")):
            continue
        try:
            record = json.loads(out.storage.read_bytes(path))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and record.get("name") == base[: -len(".json")]:
            records[record["name"]] = record
    return records


ERROR_COLUMNS = ("id", "reason", "row", "shard")


def rejected_rows(out: Output, records: dict[str, dict[str, Any]],
                  prompt_column: str) -> Iterator[dict[str, Any]]:
    """Rejected rows (id, reason, row, shard, prompt), from the per-shard error files:
    `errors.parquet` is their concatenation at the end of a run, so these are complete
    even while a resumed job is still adding shards."""
    files = [out.storage.join(records_folder(out), record["errors"])
             for _, record in sorted(records.items()) if record.get("errors")]
    for path in files:
        parquet = pq.ParquetFile(out.storage.open_input_file(path))
        names = parquet.schema_arrow.names
        columns = [name for name in (*ERROR_COLUMNS, prompt_column) if name in names]
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                row["prompt"] = row.pop(prompt_column, None) if prompt_column != "prompt" \
                    else row.get("prompt")
                yield row


def jsonable(value: Any) -> Any:
    """A cell as JSON the page can show: bytes by size (never inlined), NaN as null."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)  # a seed past 2**53 would lose digits as a JavaScript number
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
