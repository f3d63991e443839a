"""Whole jobs on a real local Ray with the real tiny random model, local and on S3.

Kept small on purpose (tiny model, 32x32, 2 steps, 8 rows): the point is the job
system's properties (every row accounted for exactly once, resume, overwrite, batch
invariance, retries, fail-fast), not image quality.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import yaml
from PIL import Image

from ldm_jobs.jobs.cli import main
from ldm_jobs.jobs.runner import JobFailed, run_job
from ldm_jobs.jobs.spec import load_spec
from ldm_jobs.jobs.worker import ShardWorker

# Test-only worker subclasses below must reach the actors by value: the tests folder is
# not on the workers' import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")

SIZE = 32


def _png(width: int, height: int) -> bytes:
    gradient = np.linspace(0, 255, width * height * 3, dtype=np.float64)
    pixels = gradient.reshape(height, width, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _prompts_table() -> pa.Table:
    """8 rows: plain rows, per-row overrides of every kind, an img2img row, a bad row."""
    rows = [
        dict(id="a", prompt="a red circle"),
        dict(id="b", prompt="a blue square", seed=7, steps=3),
        dict(id="c", prompt="a green triangle", guidance_scale=1.0),
        dict(id="d", prompt="two dots", negative_prompt="blurry"),
        dict(id="e", prompt="a wide stripe", width=48, height=24),
        dict(id="f", prompt="make it yellow", init_image=_png(SIZE, SIZE), strength=0.5),
        dict(id="g", prompt="a purple star", seed=123, guidance_scale=3.0),
        dict(id="h", prompt="a bad row", width=30),  # not a multiple of 8: rejected
    ]
    columns = {
        "id": pa.string(), "prompt": pa.string(), "seed": pa.int64(), "steps": pa.int64(),
        "guidance_scale": pa.float64(), "negative_prompt": pa.string(), "width": pa.int64(),
        "height": pa.int64(), "init_image": pa.binary(), "strength": pa.float64(),
    }
    return pa.table({name: pa.array([row.get(name) for row in rows], kind)
                     for name, kind in columns.items()})


INPUT_IDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _spec_dict(input_path: str, output_path: str, **compute) -> dict:
    return {
        "name": "e2e",
        "model": "builtin:tiny-random",
        "input": {"path": input_path, "prompt_column": "prompt", "id_column": "id"},
        "output": {"path": output_path, "rows_per_shard": 3},
        "sampling": {"sampler": "dpmpp_2m", "steps": 2, "guidance_scale": 5.0,
                     "width": SIZE, "height": SIZE, "seed": 0},
        "compute": {"actors": 2, "batch_size": 4, "gpus_per_actor": 0, **compute},
    }


def _write_spec(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    pq.write_table(_prompts_table(), root / "prompts.parquet")
    return root


@pytest.fixture(scope="module")
def clean_run(workdir: Path) -> Path:
    """One full run through the CLI (2 actors, batch 4); other tests compare to it."""
    output = workdir / "clean"
    spec_file = _write_spec(workdir / "job.yaml",
                            _spec_dict(str(workdir / "prompts.parquet"), str(output)))
    assert main(["run", spec_file, "--quiet"]) == 0
    return output


def _parts(output: Path) -> list[str]:
    # The shards alone: errors.parquet sits beside them with another schema.
    return sorted(str(p) for p in output.glob("part-*.parquet"))


def _images(output: Path) -> dict[str, bytes]:
    table = pads.dataset(_parts(output), format="parquet").to_table(columns=["id", "image"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id appears twice in the shards"
    return dict(zip(ids, table.column("image").to_pylist()))


def _error_ids(output: Path) -> list[str]:
    errors = output / "errors.parquet"
    return pq.read_table(errors).column("id").to_pylist() if errors.exists() else []


def _shard_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("part-*.parquet"))


# --- a clean run ---------------------------------------------------------------------


def test_every_row_accounted_exactly_once(clean_run: Path) -> None:
    assert len(_shard_files(clean_run)) == 3  # 8 rows, 3 per shard
    images = _images(clean_run)
    errors = _error_ids(clean_run)
    assert sorted([*images, *errors]) == INPUT_IDS
    assert errors == ["h"]
    assert (clean_run / "_SUCCESS").exists()
    manifest = json.loads((clean_run / "_manifest.json").read_text())
    assert json.dumps(manifest).count("part-0000") >= 3


def test_images_decode_to_the_asked_size(clean_run: Path) -> None:
    table = pads.dataset(_parts(clean_run), format="parquet").to_table()
    rows = {row["id"]: row for row in table.to_pylist()}
    for key, row in rows.items():
        image = Image.open(io.BytesIO(row["image"]))
        image.load()
        assert image.size == (row["width"], row["height"]), key
    assert (rows["a"]["width"], rows["a"]["height"]) == (SIZE, SIZE)
    assert (rows["e"]["width"], rows["e"]["height"]) == (48, 24)
    assert rows["b"]["seed"] == 7 and rows["b"]["steps"] == 3
    assert rows["c"]["guidance_scale"] == 1.0
    assert rows["d"]["negative_prompt"] == "blurry"
    assert rows["f"]["strength"] == pytest.approx(0.5)
    assert rows["a"]["strength"] is None  # txt2img
    # A row without a seed gets one derived from the job seed and its id: distinct rows differ.
    assert rows["a"]["seed"] != rows["c"]["seed"]


def test_output_opens_with_ray_data(clean_run: Path, monkeypatch) -> None:
    import importlib.util

    import ray.data

    if importlib.util.find_spec("aiohttp") is None:
        # Ray Data probes fsspec's optional HTTP filesystem from several listing threads;
        # without aiohttp the concurrent failed imports race into an ImportError Ray does
        # not catch. A None entry makes every probe fail cleanly with ModuleNotFoundError.
        monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)

    dataset = ray.data.read_parquet(_parts(clean_run))
    assert sorted(dataset.to_pandas()["id"]) == sorted(set(INPUT_IDS) - {"h"})


# --- resume and overwrite ------------------------------------------------------------


def _copy_spec(workdir: Path, output: Path, **compute) -> str:
    return _write_spec(workdir / f"{output.name}.yaml",
                       _spec_dict(str(workdir / "prompts.parquet"), str(output), **compute))


def test_resume_generates_only_the_missing_shard(workdir: Path, clean_run: Path) -> None:
    output = workdir / "resumed"
    shutil.copytree(clean_run, output)
    # A run stopped part-way: shard 1 never committed (no shard, no record, no _SUCCESS)
    # and a temp file of an interrupted write is left beside it.
    (output / "part-00001.parquet").unlink()
    (output / "_shards" / "part-00001.json").unlink()
    (output / "_SUCCESS").unlink()
    (output / ".tmp-part-00001.parquet-crashed").write_bytes(b"PAR1 half a shard")
    (output / "_shards" / ".tmp-part-00001.json-crashed").write_bytes(b'{"name": ')
    # Files that are not ours stay, even when their names look like ours.
    (output / ".tmp-notes.txt").write_text("the user's")
    (output / "extra").mkdir()
    (output / "extra" / ".tmp-part-00001.parquet-x").write_text("the user's")
    kept = {name: (output / name).stat().st_mtime_ns for name in _shard_files(output)}

    spec = load_spec(_copy_spec(workdir, output))
    run_job(spec, progress=False)

    assert _shard_files(output) == _shard_files(clean_run)
    for name, mtime in kept.items():
        assert (output / name).stat().st_mtime_ns == mtime, f"{name} was regenerated"
    assert _images(output) == _images(clean_run)
    assert _error_ids(output) == _error_ids(clean_run)
    assert (output / "_SUCCESS").exists()
    # The interrupted writes' temp files are swept once the job is complete.
    assert not list(output.glob(".tmp-part-*")) and not list(output.glob("_shards/.tmp-*"))
    assert (output / ".tmp-notes.txt").exists()
    assert (output / "extra" / ".tmp-part-00001.parquet-x").exists()


def test_overwrite_regenerates_everything(workdir: Path, clean_run: Path) -> None:
    output = workdir / "overwritten"
    shutil.copytree(clean_run, output)
    before = {name: (output / name).stat().st_mtime_ns for name in _shard_files(output)}
    time.sleep(0.01)
    spec_file = _copy_spec(workdir, output)
    assert main(["run", spec_file, "--overwrite", "--quiet"]) == 0
    for name, mtime in before.items():
        assert (output / name).stat().st_mtime_ns != mtime, f"{name} was not regenerated"
    assert _images(output) == _images(clean_run)


def test_batching_and_actor_count_do_not_change_images(workdir: Path, clean_run: Path) -> None:
    output = workdir / "one_actor"
    run_job(load_spec(_copy_spec(workdir, output, actors=1, batch_size=1)), progress=False)
    ours, theirs = _images(output), _images(clean_run)
    assert ours.keys() == theirs.keys()
    for key in ours:
        if ours[key] == theirs[key]:
            continue
        a = np.asarray(Image.open(io.BytesIO(ours[key])), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(theirs[key])), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, key


# --- failures (killed actors and driver, unloadable models: tests/test_faults.py) -----


class AlwaysFailsWorker(ShardWorker):
    def run(self, shard):
        if shard.name == "part-00001":
            raise RuntimeError("disk on fire")
        return super().run(shard)


def test_shard_failing_every_attempt_fails_the_job(workdir: Path) -> None:
    output = workdir / "failing"
    spec = load_spec(_copy_spec(workdir, output))
    with pytest.raises(JobFailed, match=r"part-00001.*disk on fire"):
        run_job(spec, progress=False, worker_factory=AlwaysFailsWorker, max_attempts=2)
    assert not (output / "_SUCCESS").exists()


# --- S3 ------------------------------------------------------------------------------


def test_s3_input_and_output(s3_server, workdir: Path, clean_run: Path, capsys) -> None:
    import boto3

    from ldm_jobs.jobs import open_output

    bucket = s3_server.make_bucket(None)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="prompts/prompts.parquet",
                      Body=(workdir / "prompts.parquet").read_bytes())
    data = _spec_dict(f"s3://{bucket}/prompts/", f"s3://{bucket}/runs/e2e")
    data["storage"] = {"endpoint_url": s3_server.endpoint_url, "region": "us-east-1"}
    assert main(["run", _write_spec(workdir / "s3.yaml", data), "--quiet"]) == 0

    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"runs/e2e/_SUCCESS", "runs/e2e/_manifest.json",
            "runs/e2e/part-00000.parquet"} <= keys
    assert not [key for key in keys if ".tmp" in key]

    output = open_output(f"s3://{bucket}/runs/e2e")  # endpoint from AWS_ENDPOINT_URL_S3
    table = output.dataset.to_table(columns=["id", "image"])
    assert dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist())) \
        == _images(clean_run)
    decoded = list(output.iter_images())
    assert len(decoded) == 7

    capsys.readouterr()
    assert main(["show", f"s3://{bucket}/runs/e2e"]) == 0
    shown = capsys.readouterr().out
    assert f"s3://{bucket}/runs/e2e" in shown and "7 images" in shown
