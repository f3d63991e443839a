"""Input files that read badly: corrupt Parquet data pages, flaky storage, parse caching.

A Parquet file whose footer is fine but whose column data cannot be decoded passes
planning (which reads footers and the id column); the worker then rejects the rows of
the undecodable row group, naming the file, the rows and the error, and the job still
accounts for every row. A failure to *fetch* bytes is not the data's fault: it fails
the shard (Ray retries it), exactly as before. A corrupt id column stops planning.
Everything runs without Ray: plan + ShardWorker + sinks.finalize, as `run` does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import job_helpers
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ldm_jobs.jobs import readers, sinks
from ldm_jobs.jobs.cli import main
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.readers import (
    InputError,
    clear_parsed_cache,
    describe_file,
    read_slice,
    read_slice_checked,
)
from ldm_jobs.jobs.storage import LocalStorage, StorageError, open_storage
from ldm_jobs.jobs.worker import ShardWorker

ROWS, GROUP = 60, 20  # three row groups: rows 0..19, 20..39, 40..59


def prompts_table(with_ids: bool = True) -> pa.Table:
    columns = {"prompt": [f"prompt number {i}, " * 4 + f"row {i}" for i in range(ROWS)],
               "tag": [f"t{i % 3}" for i in range(ROWS)]}
    if with_ids:
        columns = {"id": [f"r{i:03d}" for i in range(ROWS)], **columns}
    return pa.table(columns)


def write_corrupt(path: Path, column: str, group: int = 1, with_ids: bool = True) -> bytes:
    """A Parquet file whose footer is valid but whose `column` chunk in row group `group`
    has 48 bytes flipped in its middle. Returns the intact file's bytes."""
    buffer = io.BytesIO()
    pq.write_table(prompts_table(with_ids), buffer, row_group_size=GROUP, compression="snappy")
    good = buffer.getvalue()
    meta = pq.ParquetFile(io.BytesIO(good)).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(group).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    data = bytearray(good)
    for i in range(middle - 24, middle + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    # The premise: the footer reads, that chunk does not, every other chunk does.
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_rows == ROWS
    with pytest.raises(OSError):
        parquet.read_row_group(group, columns=[column])
    others = [name for name in names if name != column]
    assert parquet.read_row_group(group, columns=others).num_rows == GROUP
    return good


def make_spec(input_path, output_path, **sections):
    """Shards of 30 rows, so a row group can span two shards."""
    return job_helpers.make_spec(input_path, output_path, **{"output": {"rows_per_shard": 30}, **sections})


def run_job_in_process(spec, pipeline):
    """What `ldm-jobs run` does, minus Ray: plan, every shard, finalize."""
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=pipeline)
    results = [worker.run(shard) for shard in plan.pending()]
    worker.close()
    return plan, results, sinks.finalize(spec, plan, 1.0)


def output_ids(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("part-*.parquet"))
            for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


# ---- corrupt data pages ------------------------------------------------------------------

def test_corrupt_prompt_pages_become_rejected_rows(tmp_path, fake_pipeline):
    source = tmp_path / "in.parquet"
    write_corrupt(source, "prompt")
    out = tmp_path / "out"
    # Shards of 30 rows: the corrupt row group (rows 20..39) straddles two shards.
    plan, results, manifest = run_job_in_process(make_spec(source, out), fake_pipeline)
    assert [s.rows for s in plan.shards] == [30, 30]
    assert [(r.generated, r.rejected) for r in results] == [(20, 10), (20, 10)]
    assert manifest["complete"] and (out / "_SUCCESS").exists()
    assert manifest["counts"] == {"input_rows": 60, "generated": 40, "rejected": 20,
                                  "accepted_rows": 40}

    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["id"] for e in errors] == [f"r{i:03d}" for i in range(20, 40)]
    assert [e["row"] for e in errors] == list(range(20, 40))
    for error in errors:
        reason = error["reason"]
        assert str(source) in reason and "cannot be decoded" in reason, reason
        assert "row group 1" in reason and "column 'prompt'" in reason, reason
        assert "Corrupt snappy" in reason or "OSError" in reason, reason
        # The rest of the row could be read, and errors.parquet keeps it.
        assert error["prompt"] is None and error["tag"] == f"t{error['row'] % 3}"
    assert {e["reason"] for e in errors[:10]} == {
        errors[0]["reason"]} and "rows 20..29 of the file" in errors[0]["reason"]
    assert "rows 30..39 of the file" in errors[-1]["reason"]
    generated = output_ids(out)
    assert generated == [f"r{i:03d}" for i in [*range(20), *range(40, 60)]]
    # No generation call ever saw a row of the corrupt group.
    seen = [p for call in fake_pipeline.calls for p in call["prompts"]]
    assert len(seen) == 40 and all(p is not None for p in seen)

    # A re-run gives the same bytes (the rejection is deterministic, so retries are safe).
    first = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    again = tmp_path / "again"
    run_job_in_process(make_spec(source, again), fake_pipeline)
    assert {p.name: p.read_bytes() for p in again.glob("part-*.parquet")} == first


def test_corrupt_pages_without_an_id_column_use_row_indices(tmp_path, fake_pipeline):
    source = tmp_path / "in.parquet"
    write_corrupt(source, "tag", group=2, with_ids=False)
    out = tmp_path / "out"
    _, _, manifest = run_job_in_process(make_spec(source, out), fake_pipeline)
    assert manifest["complete"]
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["id"] for e in errors] == [f"{i:08d}" for i in range(40, 60)]
    assert all("column 'tag'" in e["reason"] and e["prompt"] for e in errors)
    assert len(output_ids(out)) == 40


def test_strict_read_slice_still_refuses_corrupt_rows(tmp_path):
    source = tmp_path / "in.parquet"
    write_corrupt(source, "prompt")
    storage = open_storage(str(source))
    assert describe_file(storage, str(source), "prompt").rows == ROWS  # footer only
    table, spans = read_slice_checked(storage, str(source), 10, 40, "prompt")
    assert table.num_rows == 40 and table.column("id")[0].as_py() == "r010"
    assert [(s.first, s.count) for s in spans] == [(20, 20)]
    assert table.column("prompt").null_count == 20
    # Slices that miss the corrupt group are read whole, without any rejection.
    assert read_slice_checked(storage, str(source), 40, 20, "prompt")[1] == []
    with pytest.raises(InputError, match=r"in.parquet: rows 20\.\.39 .*cannot be decoded"):
        read_slice(storage, str(source), 0, 60, "prompt")


class FlakyFile:
    """A file that serves the footer, then fails every later read (the data pages)."""

    def __init__(self, raw: pa.NativeFile, error: BaseException):
        self.raw, self.error, self.reads = raw, error, 0

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            raise self.error
        return self.raw.read(None if size is None or size < 0 else size)

    def close(self):
        self.raw.close()

    @property
    def closed(self):
        return self.raw.closed

    def readable(self):
        return True

    def seekable(self):
        return True


class FlakyStorage(LocalStorage):
    def __init__(self, error: BaseException):
        self.error = error

    def open_input_file(self, path):
        return pa.PythonFile(FlakyFile(super().open_input_file(path), self.error), mode="r")


@pytest.mark.parametrize("error, raised", [
    (StorageError("s3://b/in.parquet: cannot read key: connection reset; gave up after 6 "
                  "attempts"), StorageError),
    (ConnectionResetError(104, "Connection reset by peer"), ConnectionResetError),
    (TimeoutError("read timed out"), TimeoutError),
    # A local read error looks like pyarrow's decode errors (both OSError): it is told
    # apart by where it was raised, and fails the shard as before (an InputError).
    (OSError(5, "Input/output error"), InputError),
])
@pytest.mark.parametrize("corrupt", [True, False])
def test_io_errors_still_fail_the_shard(tmp_path, fake_pipeline, error, raised, corrupt):
    source = tmp_path / "in.parquet"
    if corrupt:
        write_corrupt(source, "prompt")
    else:
        pq.write_table(prompts_table(), source, row_group_size=GROUP)
    out = tmp_path / "out"
    spec = make_spec(source, out)
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=fake_pipeline)
    worker.input_storage = FlakyStorage(error)
    # Raised as it came (the runner retries the shard), never turned into rejected rows.
    with pytest.raises(raised):
        worker.run(plan.shards[0])
    worker.close()
    assert not list(out.glob("part-*")) and not (out / "_shards").exists()
    assert fake_pipeline.calls == []


def test_corrupt_pages_on_s3_and_an_object_replaced_mid_read(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    good = write_corrupt(tmp_path / "in.parquet", "prompt")
    path = f"s3://{bucket}/in/in.parquet"
    storage.write_atomic(path, (tmp_path / "in.parquet").read_bytes())
    table, spans = read_slice_checked(storage, path, 0, 60, "prompt")
    assert table.num_rows == 60 and [(s.first, s.count) for s in spans] == [(20, 20)]
    assert path in spans[0].reason

    # A storage failure (here: the object replaced while being read) is raised as such.
    class Replacing(type(storage)):
        calls = 0

        def read_range(self, *args, **kwargs):
            Replacing.calls += 1
            if Replacing.calls == 2:  # after the footer: a new version, a new ETag
                storage.write_atomic(path, good)
            return super().read_range(*args, **kwargs)

    replacing = Replacing.__new__(Replacing)
    replacing.__dict__.update(storage.__dict__)
    with pytest.raises(StorageError, match="changed while being read"):
        read_slice_checked(replacing, path, 0, 60, "prompt")
    assert Replacing.calls >= 2  # the footer was read: the failure hit a data page read


def test_corrupt_id_column_stops_planning(tmp_path, capsys):
    source = tmp_path / "in.parquet"
    write_corrupt(source, "id")
    with pytest.raises(InputError, match=r"^input.path: .*in.parquet: column 'id' cannot be "
                                         r"decoded in rows 20\.\.39 \(row group 1\)"):
        make_plan(make_spec(source, tmp_path / "out"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": {"path": str(source)},
                                   "output": {"path": str(tmp_path / "out")}}))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "in.parquet" in err and "column 'id' cannot be decoded" in err
    assert not (tmp_path / "out").exists()


# ---- whole-file formats: parsed once per process -------------------------------------------

class CountingStorage(LocalStorage):
    def __init__(self):
        self.reads: list[str] = []

    def read_bytes(self, path):
        self.reads.append(path)
        return super().read_bytes(path)


def test_whole_file_inputs_are_parsed_once_per_process(tmp_path):
    clear_parsed_cache()
    storage = CountingStorage()
    csv = tmp_path / "in.csv"
    csv.write_text("prompt,tag\n" + "".join(f"p{i},{i}\n" for i in range(10)))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"j{i}"}) + "\n"
                                               for i in range(4)))
    (tmp_path / "in.txt").write_text("a\nb\n\nc\n")
    assert describe_file(storage, str(csv), "prompt").rows == 10
    slices = [read_slice(storage, str(csv), first, 3, "prompt") for first in (0, 3, 6, 9)]
    assert [p for s in slices for p in s.column("prompt").to_pylist()] == [
        f"p{i}" for i in range(10)]
    assert storage.reads == [str(csv)]  # one read and parse for planning and four slices
    for name, expected in [("in.jsonl", ["j1", "j2"]), ("in.txt", ["b", "c"])]:
        for _ in range(3):
            table = read_slice(storage, str(tmp_path / name), 1, 2, "prompt")
            assert table.column("prompt").to_pylist() == expected
        assert storage.reads.count(str(tmp_path / name)) == 1

    # Another prompt column is another parse (the column decides the CSV's types).
    read_slice(storage, str(csv), 0, 1, "tag")
    assert storage.reads.count(str(csv)) == 2
    # A changed file (size, mtime) is parsed again; the old table is never served.
    csv.write_text("prompt,tag\nchanged,1\nagain,2\n")
    assert read_slice(storage, str(csv), 0, 5, "prompt").column("prompt").to_pylist() == [
        "changed", "again"]
    assert storage.reads.count(str(csv)) == 3
    read_slice(storage, str(csv), 1, 1, "prompt")
    assert storage.reads.count(str(csv)) == 3
    # A file gone since planning is still an input error, not a cached answer.
    csv.unlink()
    with pytest.raises(InputError, match="in.csv: input not found"):
        read_slice(storage, str(csv), 0, 1, "prompt")


def test_parse_cache_is_bounded(tmp_path, monkeypatch):
    clear_parsed_cache()
    monkeypatch.setattr(readers, "PARSED_CACHE_BYTES", 600)
    storage = CountingStorage()
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text("".join(f"{name}{i}\n" for i in range(40)))
        read_slice(storage, str(tmp_path / f"{name}.txt"), 0, 1, "prompt")
    assert len(readers._parsed) < 3
    assert sum(t.nbytes for _, t in readers._parsed.values()) <= 600
    clear_parsed_cache()
