"""Small local jobs without Ray: the same shards, bytes and resume as through Ray actors.

The reference is the same job through Ray (the session's local Ray, one actor); the
in-process run goes through the real CLI in a fresh process with no Ray anywhere, as a
user's `ldm-jobs run` on a laptop does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs.errors import JobFailed
from ldm_jobs.jobs.runner import run_job, runs_in_process
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.worker import ShardWorker

ROOT = Path(__file__).resolve().parent.parent


def _job(folder: Path, output: str, **compute) -> dict:
    return {"name": "inprocess", "model": "builtin:tiny-random",
            "input": {"path": str(folder / "prompts.parquet")},
            "output": {"path": str(folder / output), "rows_per_shard": 3},
            "sampling": {"width": 16, "height": 16, "steps": 2, "sampler": "euler"},
            "compute": {"actors": 1, "batch_size": 2, **compute}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inprocess")
    pq.write_table(pa.table({
        "id": [f"r{i}" for i in range(8)],
        "prompt": ["a red circle", "a square", "", "two dots", "a star", "rain", "sun", "x"],
        "seed": pa.array([None, 5, None, None, None, 9, None, None], pa.int64()),
        "tag": list(range(8)),
    }), folder / "prompts.parquet")
    return folder


def _files(output: Path) -> dict[str, str]:
    """sha256 of every data file (shards, errors) and the parts of the shard records that
    do not depend on when or where they ran."""
    found = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
             for path in sorted(output.glob("*.parquet"))}
    for path in sorted((output / "_shards").glob("*")):
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            for key in ("busy_seconds", "worker", "started_at", "finished_at"):
                record.pop(key, None)
            found[path.name] = json.dumps(record, sort_keys=True)
        else:
            found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def through_ray(folder: Path, ray_cluster) -> Path:
    run_job(parse_spec(_job(folder, "ray")), progress=False, in_process=False)
    return folder / "ray"


def test_cli_without_ray_writes_what_ray_writes(folder: Path, through_ray: Path) -> None:
    spec = folder / "job.json"
    spec.write_text(json.dumps(_job(folder, "cli")))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "ldm_jobs", "run", str(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Ray is not started" in done.stderr
    files = _files(folder / "cli")
    assert files == _files(through_ray)
    assert {"part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
            "errors.parquet"} <= set(files)  # the empty prompt was rejected


class _FailsOn(ShardWorker):
    """Fails one named shard every time (a storage outage, say)."""

    failing = "part-00001"

    def run(self, shard):
        if shard.name == self.failing:
            raise OSError(f"{shard.name}: storage unreachable")
        return super().run(shard)


def test_a_failed_in_process_run_resumes_to_the_same_bytes(folder: Path,
                                                           through_ray: Path) -> None:
    spec = parse_spec(_job(folder, "resumed"))
    ran: list[str] = []

    def counting(spec, device="cpu"):
        worker = ShardWorker(spec, device=device)
        run = worker.run
        worker.run = lambda shard: ran.append(shard.name) or run(shard)
        return worker

    with pytest.raises(JobFailed, match="shard part-00001 failed 2 times; last error: "
                                        "OSError: part-00001: storage unreachable"):
        run_job(spec, progress=False, in_process=True, max_attempts=2, worker_factory=_FailsOn)
    committed = sorted(p.stem for p in (folder / "resumed" / "_shards").glob("part-*.json"))
    assert committed == ["part-00000"]  # shards run in order; the job stopped at the failure
    manifest = run_job(spec, progress=False, in_process=True, worker_factory=counting)
    assert ran == ["part-00001", "part-00002"]  # the committed shard was not run again
    assert manifest["complete"]
    assert _files(folder / "resumed") == _files(through_ray)


def test_a_model_that_does_not_load_stops_the_job(folder: Path) -> None:
    spec = parse_spec(_job(folder, "noload"))

    def broken(spec, device="cpu"):
        raise OSError("weights truncated")

    with pytest.raises(JobFailed, match="could not be loaded: OSError: weights truncated"):
        run_job(spec, progress=False, in_process=True, worker_factory=broken)


def test_which_jobs_run_in_process(folder: Path) -> None:
    one, two = parse_spec(_job(folder, "a")), parse_spec(_job(folder, "a", actors=2))
    assert runs_in_process(one, None, ray_up=False)
    assert not runs_in_process(two, None, ray_up=False)  # more actors: Ray
    assert not runs_in_process(one, "10.0.0.1:6379", ray_up=False)  # a cluster named
    assert not runs_in_process(one, None, ray_up=True)  # this process already holds a Ray
