import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs.plan import RowSlice, make_plan
from ldm_jobs.jobs.readers import InputError, list_input_files, read_slice
from ldm_jobs.jobs.spec import SpecError, parse_spec
from ldm_jobs.jobs.storage import open_storage


def make_spec(input_path, output_path, **sections):
    data = {"input": {"path": str(input_path)}, "output": {"path": str(output_path)}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.update(
            {key: value})
    return parse_spec(data)


def write_parquet(path, prompts, row_group_size=None, **columns):
    pq.write_table(pa.table({"prompt": prompts, **columns}), path, row_group_size=row_group_size)


def test_folder_glob_and_formats_in_stable_order(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_parquet(folder / "b.parquet", ["b0", "b1"])
    write_parquet(folder / "a.parquet", ["a0"])
    (folder / "c.csv").write_text("prompt,tag\nc0,1\n\"c1, with comma\",2\n")
    (folder / "d.jsonl").write_text('{"prompt": "d0"}\n{"prompt": "d1"}\n')
    (folder / "e.txt").write_text("e0\n\ne1\n")
    (folder / "_SUCCESS").write_text("")
    (folder / ".tmp-x.parquet").write_text("junk")
    storage = open_storage(str(folder))
    files = list_input_files(str(folder), storage)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.parquet", "b.parquet", "c.csv",
                                                     "d.jsonl", "e.txt"]
    plan = make_plan(make_spec(folder, tmp_path / "out"))
    assert plan.input_rows == 9
    prompts = []
    for shard in plan.shards:
        for piece in shard.slices:
            prompts += read_slice(storage, piece.path, piece.first, piece.count,
                                  "prompt").column("prompt").to_pylist()
    assert prompts == ["a0", "b0", "b1", "c0", "c1, with comma", "d0", "d1", "e0", "e1"]
    globbed = list_input_files(str(folder / "*.parquet"), storage)
    assert [f.rsplit("/", 1)[-1] for f in globbed] == ["a.parquet", "b.parquet"]
    with pytest.raises(InputError, match="matches no input files"):
        list_input_files(str(folder / "*.avro"), storage)


def test_shards_slices_and_names(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(5)], row_group_size=2)
    write_parquet(tmp_path / "b.parquet", [f"b{i}" for i in range(4)], row_group_size=3)
    spec = make_spec(tmp_path / "*.parquet", tmp_path / "out", output={"rows_per_shard": 4})
    plan = make_plan(spec)
    assert [s.name for s in plan.shards] == ["part-00000", "part-00001", "part-00002"]
    assert [s.rows for s in plan.shards] == [4, 4, 1]
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    assert plan.shards[1].slices == (RowSlice(a, 4, 1, 4), RowSlice(b, 0, 3, 5))
    storage = open_storage(a)
    # A slice that starts inside one row group and ends in another reads exactly its rows.
    assert read_slice(storage, a, 1, 3, "prompt").column("prompt").to_pylist() == [
        "a1", "a2", "a3"]
    assert [s.name for s in plan.pending()] == [s.name for s in plan.shards]
    assert "9 rows" in plan.describe() and "3 pending" in plan.describe()
    assert "compute    1 actor(s), 0 GPU(s) each, batch 8, float32\n" in plan.describe()
    compiled = make_spec(spec.input.path, spec.output.path, compute={"compile": True, "actors": 2})
    assert ("compute    2 actor(s), 0 GPU(s) each, batch 8, float32, UNet compiled "
            "(torch.compile)") in make_plan(compiled).describe()
    # images_per_prompt counts against rows_per_shard: shards hold about 4 images.
    doubled = make_plan(make_spec(tmp_path / "*.parquet", tmp_path / "out",
                                  output={"rows_per_shard": 4},
                                  sampling={"images_per_prompt": 2}))
    assert [s.rows for s in doubled.shards] == [2, 2, 2, 2, 1]


def test_missing_prompt_column_names_file_and_column(tmp_path):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet: no prompt column 'prompt'.*text"):
        make_plan(make_spec(tmp_path / "in.parquet", tmp_path / "out"))
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", input={"prompt_column": "text"})
    assert make_plan(spec).input_rows == 1
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     input={"prompt_column": "text", "id_column": "key"})
    with pytest.raises(InputError, match="no id column 'key'"):
        make_plan(spec)
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(InputError, match="holds int64, not text"):
        make_plan(make_spec(tmp_path / "ints.parquet", tmp_path / "out"))
    with pytest.raises(InputError, match="input not found"):
        make_plan(make_spec(tmp_path / "none.parquet", tmp_path / "out"))


def test_duplicate_ids_found_at_planning(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["p"] * 5, id=["x", "y", "x", None, "y"])
    write_parquet(tmp_path / "b.parquet", ["p"] * 2, id=["z", "x"])
    plan = make_plan(make_spec(tmp_path, tmp_path / "out", output={"rows_per_shard": 3}))
    assert plan.id_column == "id"
    found = dict(pair for shard in plan.shards for pair in shard.duplicates)
    assert found == {2: 0, 4: 1, 6: 0}


def test_resume_detects_committed_shards_and_conflicts(tmp_path):
    write_parquet(tmp_path / "in.parquet", [f"p{i}" for i in range(5)])
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", output={"rows_per_shard": 2})
    plan = make_plan(spec)
    assert plan.committed == set()
    records = tmp_path / "out" / "_shards"
    records.mkdir(parents=True)
    (records / "part-00001.json").write_text(json.dumps(
        {"name": "part-00001", "fingerprint": plan.shards[1].fingerprint}))
    again = make_plan(spec)
    assert again.committed == {"part-00001"}
    assert [s.name for s in again.pending()] == ["part-00000", "part-00002"]
    # Same output, different sampling: refuse rather than mix two jobs' shards.
    changed = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                        output={"rows_per_shard": 2}, sampling={"steps": 3})
    with pytest.raises(SpecError, match="output.path: .*part-00001 of a different job"):
        make_plan(changed)


def test_plan_reads_s3_input(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    for name, prompts in [("b.parquet", ["b0"]), ("a.parquet", ["a0", "a1"])]:
        write_parquet(tmp_path / name, prompts)
        storage.write_atomic(f"s3://{bucket}/in/{name}", (tmp_path / name).read_bytes())
    plan = make_plan(make_spec(f"s3://{bucket}/in", f"s3://{bucket}/out"))
    assert plan.input_rows == 3
    assert [s.path for s in plan.shards[0].slices] == [f"s3://{bucket}/in/a.parquet",
                                                       f"s3://{bucket}/in/b.parquet"]


def test_duplicates_land_in_their_own_shards(tmp_path):
    # Many repeats over many shards: each shard carries exactly the repeats in its range.
    ids = [f"k{i % 7}" for i in range(60)]
    write_parquet(tmp_path / "a.parquet", ["p"] * 60, id=ids)
    plan = make_plan(make_spec(tmp_path / "a.parquet", tmp_path / "out",
                               output={"rows_per_shard": 8}))
    for shard in plan.shards:
        start = shard.slices[0].offset
        assert [row for row, _ in shard.duplicates] == [
            r for r in range(start, start + shard.rows) if r >= 7]
        assert all(first == row % 7 for row, first in shard.duplicates)


def test_generated_suffix_clashes_found_at_planning(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["p"] * 3, id=["a", "b-2", "c-1"])
    write_parquet(tmp_path / "b.parquet", ["p"] * 4, id=["b", "a-1", "a-3", "c"])
    spec = make_spec(tmp_path, tmp_path / "out", output={"rows_per_shard": 3},
                     sampling={"images_per_prompt": 3})
    found = dict(pair for shard in make_plan(spec).shards for pair in shard.duplicates)
    # b (row 3) makes b-2 (row 1); a-1 (row 4) is made by a (row 0); c (row 6) makes c-1
    # (row 2); a-3 is past images_per_prompt 3 and clashes with nothing.
    assert found == {3: 1, 4: 0, 6: 2}
    single = make_spec(tmp_path, tmp_path / "out", output={"rows_per_shard": 3})
    assert all(not shard.duplicates for shard in make_plan(single).shards)


def test_empty_input_and_text_column_types(tmp_path, fake_pipeline):
    from ldm_jobs.jobs.worker import ShardWorker

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), folder / "empty.parquet")
    with pytest.raises(InputError, match=r"^input.path: .*holds no rows"):
        make_plan(make_spec(folder / "empty.parquet", tmp_path / "out"))
    # An empty file among others is fine.
    write_parquet(folder / "full.parquet", ["a", "b"])
    assert make_plan(make_spec(folder, tmp_path / "out")).input_rows == 2
    # A categorical (dictionary-encoded) prompt column, as pandas writes it, is text.
    prompts = pa.array(["x", "y", "x"]).dictionary_encode()
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "cats.parquet")
    spec = make_spec(tmp_path / "cats.parquet", tmp_path / "cats",
                     sampling={"width": 16, "height": 16, "steps": 2})
    plan = make_plan(spec)
    # Dictionary columns are planned as their value type (so files with and without
    # categoricals merge); each file's own schema still says what it holds.
    assert plan.input_rows == 3 and plan.schema.field("prompt").type == pa.string()
    assert pa.types.is_dictionary(plan.files[0].schema.field("prompt").type)
    result = ShardWorker(spec, pipeline=fake_pipeline).run(plan.shards[0])
    assert (result.generated, result.rejected) == (3, 0)
    assert fake_pipeline.calls[0]["prompts"] == ["x", "y", "x"]


def test_storage_errors_name_the_field(s3_server, tmp_path):
    with pytest.raises(InputError, match=r"^input.path: .*bucket 'no-such-in' does not exist"):
        make_plan(make_spec("s3://no-such-in/prompts/", tmp_path / "out"))
    write_parquet(tmp_path / "a.parquet", ["a"])
    with pytest.raises(SpecError, match=r"^output.path: .*bucket 'no-such-out' does not exist"):
        make_plan(make_spec(tmp_path / "a.parquet", "s3://no-such-out/run"))


def test_categorical_and_plain_columns_across_files(tmp_path, fake_pipeline):
    from ldm_jobs.jobs.worker import ShardWorker

    folder = tmp_path / "in"
    folder.mkdir()
    # As pandas writes a categorical column: dictionary<values=string> in Parquet.
    pq.write_table(pa.table({"prompt": pa.array(["x", "y", "x", ""]).dictionary_encode(),
                             "tag": pa.array(["t1", "t2", "t1", "t2"]).dictionary_encode()}),
                   folder / "a.parquet")
    pq.write_table(pa.table({"prompt": ["z", "w"], "tag": ["t3", None]}), folder / "b.parquet")
    spec = make_spec(folder, tmp_path / "out", output={"rows_per_shard": 4},
                     sampling={"width": 16, "height": 16, "steps": 2})
    plan = make_plan(spec)
    assert plan.input_rows == 6
    assert plan.schema.field("prompt").type == pa.string()
    assert plan.schema.field("tag").type == pa.string()
    worker = ShardWorker(spec, pipeline=fake_pipeline)
    results = [worker.run(shard) for shard in plan.shards]
    assert [(r.generated, r.rejected) for r in results] == [(3, 1), (2, 0)]
    tables = [pq.read_table(tmp_path / "out" / f"part-0000{i}.parquet") for i in (0, 1)]
    assert [p for t in tables for p in t.column("prompt").to_pylist()] == ["x", "y", "x", "z",
                                                                           "w"]
    assert [p for t in tables for p in t.column("tag").to_pylist()] == ["t1", "t2", "t1", "t3",
                                                                        None]
    assert all(t.schema.field("tag").type == pa.string() for t in tables)
    errors = pq.read_table(tmp_path / "out" / "_shards" / "part-00000.errors.parquet")
    assert errors.column("prompt").to_pylist() == [""]
    assert errors.column("tag").to_pylist() == ["t2"]


def test_overwrite_lets_through_only_a_foreign_output(s3_server, tmp_path):
    from ldm_jobs.jobs.plan import ForeignOutputError
    from ldm_jobs.jobs.runner import _check_before_clearing, run_job

    write_parquet(tmp_path / "a.parquet", ["a", "b", "c"])
    # Another job's shards in the output: that is what --overwrite clears.
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    (out / "_shards" / "part-00000.json").write_text(json.dumps(
        {"name": "part-00000", "fingerprint": "another job"}))
    spec = make_spec(tmp_path / "a.parquet", out)
    with pytest.raises(ForeignOutputError):
        make_plan(spec)
    _check_before_clearing(spec)  # let through
    # A missing output bucket is an output.path error too, but not one to clear away:
    # it stops the job with its own message, before anything is deleted.
    missing = make_spec(tmp_path / "a.parquet", "s3://no-such-out-bucket/run")
    with pytest.raises(SpecError, match=r"^output.path: .*bucket 'no-such-out-bucket' does "
                                        "not exist") as caught:
        _check_before_clearing(missing)
    assert not isinstance(caught.value, ForeignOutputError)
    with pytest.raises(SpecError, match="bucket 'no-such-out-bucket' does not exist"):
        run_job(missing, overwrite=True, progress=False)
    # A bad input still stops --overwrite before it deletes the old output.
    bad = make_spec(tmp_path / "none.parquet", out)
    with pytest.raises(InputError, match="input not found"):
        run_job(bad, overwrite=True, progress=False)
    assert (out / "_shards" / "part-00000.json").exists()


@pytest.mark.parametrize("damage", [b"", b'{"name": "part-00', b"\xff\xfe", b"[1, 2]",
                                    b'{"name": "part-00007", "fingerprint": "x"}'])
def test_a_damaged_shard_record_means_run_that_shard_again(tmp_path, damage):
    write_parquet(tmp_path / "in.parquet", [f"p{i}" for i in range(5)])
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", output={"rows_per_shard": 2})
    plan = make_plan(spec)
    records = tmp_path / "out" / "_shards"
    records.mkdir(parents=True)
    (records / "part-00000.json").write_text(json.dumps(
        {"name": "part-00000", "fingerprint": plan.shards[0].fingerprint}))
    (records / "part-00001.json").write_bytes(damage)
    again = make_plan(spec)
    assert again.committed == {"part-00000"}
    assert again.damaged == ["part-00001"]
    assert [s.name for s in again.pending()] == ["part-00001", "part-00002"]
    assert "damaged    1 shard record(s) unreadable, will run again: part-00001" in again.describe()


def test_a_slow_local_ray_start_gets_a_hint(tmp_path, monkeypatch, capsys, fake_pipeline):
    """When starting the local Ray is most of a job, `run` says how to avoid paying it."""
    import contextlib

    from ldm_jobs.jobs import runner
    from ldm_jobs.jobs.worker import ShardWorker

    write_parquet(tmp_path / "in.parquet", ["p0", "p1"])
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out")

    @contextlib.contextmanager
    def slow_local_start(address=None):
        time.sleep(2.0)
        yield True

    def in_process(self):  # the shards, without Ray
        worker = ShardWorker(self.spec, pipeline=fake_pipeline)
        return [worker.run(shard) for shard in self.queue]

    monkeypatch.setattr(runner, "check_placeable", lambda spec: None)
    monkeypatch.setattr(runner, "_actor_options", lambda spec: {})
    monkeypatch.setattr(runner._Dispatch, "run", in_process)
    # a Ray that was already up (or a start that is a small part of the job): no hint; this
    # run also pays the job's one-time imports, which would otherwise dwarf the fake start
    monkeypatch.setattr(runner, "ray_session", lambda address=None: contextlib.nullcontext(False))
    assert runner.run_job(spec, in_process=False)["complete"]
    assert "ray start --head" not in capsys.readouterr().err
    monkeypatch.setattr(runner, "ray_session", slow_local_start)
    assert runner.run_job(spec, overwrite=True, in_process=False)["complete"]
    assert "for many small jobs keep one up with `ray start --head`" in capsys.readouterr().err
