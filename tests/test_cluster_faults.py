"""Whole-node faults on a real multi-node Ray (`ray.cluster_utils.Cluster`).

Each scenario runs in its own process (tests/cluster_scenarios.py): a head without CPUs
(the driver's node) and worker nodes of one CPU each. The clean reference runs on the
test session's local Ray; images depend only on their rows, so every shard file must be
byte-identical to it. Slow: a cluster of three raylets starts per scenario.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs.runner import run_job
from ldm_jobs.jobs.spec import parse_spec

pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).with_name("cluster_scenarios.py")
ROWS = 16
# A scenario that has not ended by then has hung: the test fails rather than waits.
SCENARIO_SECONDS = 480


def _spec(input_path: Path, output: Path, **compute) -> dict:
    return {"model": "builtin:tiny-random", "input": {"path": str(input_path)},
            "output": {"path": str(output), "rows_per_shard": 2},
            "sampling": {"width": 16, "height": 16, "steps": 2},
            "compute": {"actors": 2, "batch_size": 2, **compute}}


def _scenario(name: str, spec: dict, result: Path) -> tuple[dict, subprocess.CompletedProcess]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    process = subprocess.Popen(
        [sys.executable, str(SCENARIOS), name, json.dumps(spec), str(result)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=SCENARIO_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the scenario and the cluster it started
        output, _ = process.communicate()
        raise AssertionError(f"scenario {name} hung:\n{output[-4000:]}") from None
    done = subprocess.CompletedProcess(process.args, process.returncode, output)
    assert result.exists(), f"scenario {name} wrote no result:\n{output[-4000:]}"
    return json.loads(result.read_text()), done


def _shards(output: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(output.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, ray_cluster) -> tuple[Path, Path]:
    """The input, and its clean output made on the session's local Ray."""
    folder = tmp_path_factory.mktemp("cluster")
    source = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(ROWS)],
                             "prompt": [f"a shape number {i}" for i in range(ROWS)]}), source)
    run_job(parse_spec(_spec(source, folder / "clean")), progress=False)
    return source, folder / "clean"


def test_a_node_lost_mid_job_changes_nothing(clean, tmp_path: Path) -> None:
    source, clean_output = clean
    output = tmp_path / "out"
    result, _ = _scenario("node_loss", _spec(source, output), tmp_path / "result.json")
    assert result["error"] is None, result.get("traceback")
    [(removed_at, what)] = result["events"]
    assert what == "removed node1" and removed_at < result["wall"]
    ids = pq.read_table(output).column("id").to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(ROWS)]  # every row exactly once
    assert _shards(output) == _shards(clean_output)  # byte-identical shard files
    assert (output / "_SUCCESS").exists()


def test_auto_actors_shrink_when_a_node_goes(ray_cluster, tmp_path: Path) -> None:
    rows = 32  # 16 shards of one batch each: work is left when the node goes
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"s{i:02d}" for i in range(rows)],
                             "prompt": [f"a shape number {i}" for i in range(rows)]}), source)
    reference = tmp_path / "reference"
    run_job(parse_spec(_spec(source, reference)), progress=False)
    output = tmp_path / "out"
    result, done = _scenario("node_loss", _spec(source, output, actors="auto"),
                             tmp_path / "result.json")
    assert result["error"] is None, result.get("traceback")
    # two slots, then one: the lost actor is not replaced
    assert "16 shard(s) to run on 2 actor(s)" in done.stdout
    assert "actors: auto: a node left; 1 actor(s) now" in done.stdout, done.stdout[-3000:]
    assert _shards(output) == _shards(reference)  # every row once, the same bytes


def test_the_cluster_gone_stops_run_in_one_line_and_the_same_command_resumes(
        clean, tmp_path: Path) -> None:
    source, clean_output = clean
    output = tmp_path / "out"
    result, _ = _scenario("cluster_loss", _spec(source, output), tmp_path / "result.json")
    # The first run: stopped, well within Ray's own 60 s, by our one line, exit code 1.
    assert result["first_code"] == 1, result["first_stderr"]
    assert result["stopped_after"] < 60
    ours = [line for line in result["first_stderr"].splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "lost the Ray cluster" in ours[0], result["first_stderr"]
    assert "run the same command again" in ours[0]
    assert result["committed_when_lost"]  # it was mid-job
    # The same command on a cluster back at the same address: resumed and complete.
    assert result["again_code"] == 0, result["again_stderr"]
    assert f"resuming: {len(result['committed_when_lost'])} of 8 shard(s) already committed" \
        in result["again_stderr"]
    assert sorted(pq.read_table(output).column("id").to_pylist()) == \
        [f"r{i:02d}" for i in range(ROWS)]
    assert _shards(output) == _shards(clean_output)


def test_auto_actors_grow_with_nodes_up_to_max_actors(tmp_path: Path) -> None:
    rows = 60
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"g{i:02d}" for i in range(rows)],
                             "prompt": [f"a shape number {i}" for i in range(rows)]}), source)
    output = tmp_path / "out"
    spec = _spec(source, output, actors="auto", max_actors=2)
    spec["output"]["rows_per_shard"] = 1  # 60 shards of 6 steps: time for new nodes to help
    spec["sampling"]["steps"] = 6
    result, done = _scenario("grow", spec, tmp_path / "result.json")
    assert result["error"] is None, result.get("traceback")
    # One node of 1 CPU: one actor; two more nodes: three slots, capped at max_actors 2.
    assert "60 shard(s) to run on 1 actor(s)" in done.stdout
    assert "actors: auto: 1 -> 2 (nodes joined)" in done.stdout, done.stdout[-3000:]
    assert "-> 3" not in done.stdout
    records = [json.loads(p.read_text()) for p in (output / "_shards").glob("part-*.json")]
    assert len({r["worker"] for r in records}) <= 2
    assert sorted(pq.read_table(output).column("id").to_pylist()) == \
        [f"g{i:02d}" for i in range(rows)]
