import io
import json
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_jobs.jobs import open_output, show
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.sinks import clear_output, finalize
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.storage import open_storage
from ldm_jobs.jobs.worker import ShardWorker


def make_spec(input_path, output_path, **sections):
    data = {"name": "t", "input": {"path": str(input_path)},
            "output": {"path": str(output_path), "rows_per_shard": 3},
            "sampling": {"width": 16, "height": 16, "steps": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_spec(data)


def run_job(spec, pipeline, only=None):
    started = time.perf_counter()
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=pipeline, worker_id="w0")
    for shard in plan.pending()[:only]:
        worker.run(shard)
    worker.close()
    return plan, finalize(spec, make_plan(spec), time.perf_counter() - started)


def write_input(path, n=7):
    prompts = [f"prompt number {i}" for i in range(n)]
    prompts[2] = ""  # one bad row
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": prompts,
                             "tag": list(range(n))}), path)


def test_finalize_writes_manifest_errors_and_success(tmp_path, fake_pipeline):
    write_input(tmp_path / "in.parquet")
    out = tmp_path / "out"
    spec = make_spec(tmp_path / "in.parquet", out,
                     storage={"endpoint_url": "http://key:secret@minio:9000"})
    _, manifest = run_job(spec, fake_pipeline, only=2)
    assert manifest["complete"] is False and not (out / "_SUCCESS").exists()
    assert manifest["missing_shards"] == ["part-00002"]
    _, manifest = run_job(spec, fake_pipeline)  # resume: only part-00002 runs
    assert manifest["complete"] is True and (out / "_SUCCESS").exists()
    assert manifest["counts"] == {"input_rows": 7, "generated": 6, "rejected": 1,
                                  "accepted_rows": 6}
    assert [s["name"] for s in manifest["shards"]] == ["part-00000", "part-00001", "part-00002"]
    assert sum(s["rows"] for s in manifest["shards"]) == 6
    assert manifest["model"]["name"] == "fake"
    assert manifest["model"]["hash"].startswith("sha256:0123")
    assert set(manifest["timings"]["busy_seconds"]) == {"w0"}
    assert manifest["timings"]["images_per_gpu_hour"] > 0
    text = (out / "_manifest.json").read_text()
    assert "secret" not in text and "***@minio:9000" in text
    assert json.loads(text) == manifest
    errors = pq.read_table(out / "errors.parquet")
    assert errors.column_names == ["id", "reason", "row", "shard", "input_id", "prompt", "tag"]
    assert errors.to_pylist()[0] | {"reason": None} == {
        "id": "r2", "reason": None, "row": 2, "shard": "part-00000", "input_id": "r2",
        "prompt": "", "tag": 2}
    # The _SUCCESS marker comes last: it is at least as new as the manifest.
    assert (out / "_SUCCESS").stat().st_mtime_ns >= (out / "_manifest.json").stat().st_mtime_ns


@pytest.mark.usefixtures("ray_cluster")
def test_a_job_without_rejections_opens_whole_in_every_reader(tmp_path, fake_pipeline):
    """The contract: outputs open unchanged with pyarrow.dataset, Ray Data and Hugging Face
    datasets. An errors.parquet beside the shards (even an empty one) broke all but Ray:
    pyarrow took its schema (no `image`), datasets failed on its empty row group."""
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "n": [1, 2, 3, 4]}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    _, manifest = run_job(make_spec(tmp_path / "in.parquet", out), fake_pipeline)
    assert manifest["complete"] and manifest["counts"]["rejected"] == 0
    assert not (out / "errors.parquet").exists()
    expected = {"id", "prompt", "n", "image", "seed", "model", "image_format"}

    for table in (ds.dataset(str(out), format="parquet").to_table(), pq.read_table(out)):
        assert expected <= set(table.column_names)
        assert sorted(table.column("n").to_pylist()) == [1, 2, 3, 4]
        assert all(Image.open(io.BytesIO(b)).size == (16, 16)
                   for b in table.column("image").to_pylist())

    import ray.data

    rows = ray.data.read_parquet(str(out)).take_all()
    assert sorted(r["n"] for r in rows) == [1, 2, 3, 4] and expected <= set(rows[0])

    import datasets

    # (data_dir would take _SUCCESS and _manifest.json for data too: the contract's names.)
    loaded = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert expected <= set(loaded.column_names) and sorted(loaded["n"]) == [1, 2, 3, 4]

    errors = open_output(str(out)).errors()  # finalized: an empty table, not None
    assert errors is not None and errors.num_rows == 0
    assert "errors     none" in show(str(out))


def test_finalize_removes_a_stale_errors_file_when_nothing_is_rejected(tmp_path,
                                                                      fake_pipeline):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out")
    run_job(spec, fake_pipeline)
    stale = tmp_path / "out" / "errors.parquet"
    pq.write_table(pa.table({"id": ["old"], "reason": ["from an earlier finalize"]}), stale)
    assert finalize(spec, make_plan(spec), 1.0)["counts"]["rejected"] == 0
    assert not stale.exists()


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_clear_output_removes_only_our_files(tmp_path, fake_pipeline, scheme):
    write_input(tmp_path / "in.parquet")
    out = tmp_path / "out"
    spec = make_spec(tmp_path / "in.parquet", f"{scheme}{out}")
    run_job(spec, fake_pipeline)
    (out / "notes.txt").write_text("keep me")
    removed = clear_output(spec)
    assert removed >= 3 + 3 + 2
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["notes.txt"]
    assert make_plan(spec).committed == set()


def test_open_output_and_show(tmp_path, fake_pipeline):
    write_input(tmp_path / "in.parquet")
    out = tmp_path / "out"
    spec = make_spec(tmp_path / "in.parquet", out)
    run_job(spec, fake_pipeline)
    (out / ".tmp-part-00009.parquet-abc").write_bytes(b"half written")
    opened = open_output(str(out))
    assert opened.manifest["counts"]["generated"] == 6
    assert opened.dataset.count_rows() == 6
    assert ds.dataset(str(out / "part-00000.parquet")).count_rows() == 2
    rows = list(opened.iter_images())
    assert [r["id"] for r in rows] == ["r0", "r1", "r3", "r4", "r5", "r6"]
    assert isinstance(rows[0]["image"], Image.Image) and rows[0]["tag"] == 0
    sheet = tmp_path / "sheet.png"
    text = show(str(out), sheet=str(sheet))
    assert "7 input, 6 images generated, 1 rejected" in text
    assert "1  prompt: empty" in text and "complete" in text
    with Image.open(sheet) as image:
        assert image.width >= 3 * 128 and image.height > 128


def test_webdataset_output_reads_back(tmp_path, fake_pipeline):
    write_input(tmp_path / "in.parquet", n=4)
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", output={"format": "webdataset"})
    run_job(spec, fake_pipeline)
    rows = list(open_output(str(tmp_path / "out")).iter_images())
    assert [r["id"] for r in rows] == ["r0", "r1", "r3"]
    assert rows[0]["image"].size == (16, 16)


def test_webdataset_output_opens_with_the_webdataset_library(tmp_path, fake_pipeline):
    """The contract: webdataset output opens unchanged with `webdataset`. Its loader splits a
    member name at the first dot, so ids with dots must not leak into the key as-is."""
    import webdataset as wds

    ids = ["a.b", "v1.2.3", "plain", "x y"]
    pq.write_table(pa.table({"id": ids, "prompt": ["red", "blue", "green", "grey"]}),
                   tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     input={"id_column": "id"}, sampling={"images_per_prompt": 2},
                     output={"format": "webdataset", "rows_per_shard": 4})
    _, manifest = run_job(spec, fake_pipeline)
    tars = sorted(str(p) for p in (tmp_path / "out").glob("part-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))

    assert len(samples) == manifest["counts"]["generated"] == 8
    expected = sorted(f"{i}{suffix}" for i in ids for suffix in ("", "-1"))
    assert sorted(s["json"]["id"] for s in samples) == expected
    for sample in samples:  # every image met its own metadata: one key, both members
        assert set(sample) >= {"png", "json"} and sample["png"].size == (16, 16)
        assert sample["json"]["prompt"] in ("red", "blue", "green", "grey")


def test_s3_input_and_output_round_trip(s3_server, tmp_path, fake_pipeline):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    write_input(tmp_path / "in.parquet")
    storage.write_atomic(f"s3://{bucket}/input/prompts.parquet",
                         (tmp_path / "in.parquet").read_bytes())
    spec = make_spec(f"s3://{bucket}/input/", f"s3://{bucket}/runs/demo",
                     storage={"endpoint_url": s3_server.endpoint_url})
    _, manifest = run_job(spec, fake_pipeline)
    assert manifest["complete"] is True
    names = [p.rsplit("/", 1)[-1] for p in storage.list(f"s3://{bucket}/runs/demo")]
    assert {"_SUCCESS", "_manifest.json", "errors.parquet", "part-00000.parquet",
            "part-00002.parquet"} <= set(names)
    # Endpoint from AWS_ENDPOINT_URL_S3 (set by the fixture), as a user's script would.
    opened = open_output(f"s3://{bucket}/runs/demo")
    assert opened.manifest["counts"]["generated"] == 6
    assert opened.dataset.to_table(columns=["id"]).column("id").to_pylist() == [
        "r0", "r1", "r3", "r4", "r5", "r6"]
    assert next(iter(opened.iter_images()))["image"].size == (16, 16)
    assert "6 images generated" in show(f"s3://{bucket}/runs/demo")
    # Resume against S3 sees every shard committed.
    assert make_plan(spec).pending() == []


def test_opening_an_empty_location_is_a_clear_error(tmp_path):
    import pytest

    from ldm_jobs.jobs.report import OutputError

    with pytest.raises(OutputError, match="no job output here"):
        open_output(str(tmp_path / "nothing"))
