"""Multi-node scenarios on a real `ray.cluster_utils.Cluster`, one per process.

tests/test_cluster_faults.py runs this file as a script (the test session holds its own
local Ray; a Cluster wants a process, and a temp dir, of its own):

    python tests/cluster_scenarios.py SCENARIO SPEC_JSON RESULT_JSON

Each scenario starts a head with no CPUs (the driver's node: nothing generates there) and
worker nodes of 1 CPU each with a custom resource naming them, runs the job with
`run_job` joined to that cluster, and writes what happened to RESULT_JSON:
- clean:      two worker nodes, nothing happens to them;
- node_loss:  two worker nodes; the second is killed (all its processes at once, as a
              spot preemption) as soon as the first shard is committed;
- grow:       one worker node; two more join once the first shard is committed
              (`compute.actors: auto` should use them);
- cluster_loss: `ldm-jobs run --address` (the real CLI, in its own process) on two worker
              nodes; every node, the head (GCS, the driver's raylet) last, is killed as
              soon as the first shard is committed; then a new cluster comes up at the
              same address and the same command runs again. Reports both runs' exit
              codes and stderr, and the seconds from the kill to the first run's exit.
              (Killing the head alone does not stop a job: actors on live workers need
              no GCS to finish their shards, so it completes.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

SCENARIOS = ("clean", "node_loss", "grow", "cluster_loss")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_commit(output: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((output / "_shards").glob("part-*.json")):
            return
        time.sleep(0.1)


def main(scenario: str, spec_json: str, result_path: str) -> int:
    # The Cluster writes "the current cluster" into Ray's temp dir: keep it private, so
    # no other Ray on this machine ever joins it by `address="auto"`.
    root = tempfile.mkdtemp(prefix="ldmcl-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = root
    temp = os.path.join(root, "ray")
    os.makedirs(temp)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token files written for a throwaway cluster
    import ray
    from ray.cluster_utils import Cluster

    from ldm_jobs.jobs.runner import run_job
    from ldm_jobs.jobs.spec import parse_spec

    spec = parse_spec(json.loads(spec_json))
    output = Path(spec.output.path)
    if scenario == "cluster_loss":
        result = _cluster_loss(Cluster, spec_json, output, temp)
        Path(result_path).write_text(json.dumps(result))
        shutil.rmtree(root, ignore_errors=True)
        return 0
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": _free_port(), "include_dashboard": False,
        "temp_dir": temp})
    workers = [cluster.add_node(num_cpus=1, resources={"node0": 1})]
    if scenario != "grow":
        workers.append(cluster.add_node(num_cpus=1, resources={"node1": 1}))
    result: dict = {"scenario": scenario, "events": []}

    def event(text: str) -> None:
        result["events"].append([round(time.monotonic() - started, 2), text])

    def act() -> None:
        _first_commit(output)
        if not running.is_alive():
            return
        if scenario == "node_loss":
            cluster.remove_node(workers[1], allow_graceful=False)
            event("removed node1")
        elif scenario == "grow":
            for index in (1, 2):
                workers.append(cluster.add_node(num_cpus=1, resources={f"node{index}": 1}))
            event("added node1, node2")

    ray.init(address=cluster.address)
    started = time.monotonic()

    def job() -> None:
        try:
            manifest = run_job(spec)  # its progress notes say what the pool did
            result["manifest_counts"] = manifest["counts"]
            result["error"] = None
        except Exception as error:  # the scenario reports it; the test judges it
            result["error"] = f"{type(error).__name__}: {error}"
            result["traceback"] = traceback.format_exc()
        result["wall"] = time.monotonic() - started

    # The job runs in a thread: starting a node (Cluster.add_node) wants the main thread.
    running = threading.Thread(target=job)
    running.start()
    act()
    running.join()
    Path(result_path).write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    return 0


def _start(cluster_class, port: int, temp: str):
    cluster = cluster_class(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": port, "include_dashboard": False, "temp_dir": temp})
    for index in range(2):
        cluster.add_node(num_cpus=1, resources={f"node{index}": 1})
    return cluster


def _cluster_loss(cluster_class, spec_json: str, output: Path, temp: str) -> dict:
    spec_file = Path(temp) / "job.json"
    spec_file.write_text(spec_json)
    port = _free_port()
    cluster = _start(cluster_class, port, temp)
    command = [sys.executable, "-m", "ldm_jobs", "run", str(spec_file), "--address",
               cluster.address]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    _first_commit(output)
    for node in [*cluster.worker_nodes, cluster.head_node]:
        node.kill_all_processes(check_alive=False, allow_graceful=False)
    killed = time.monotonic()
    try:
        _, first_err = first.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        first.kill()
        _, first_err = first.communicate()
    stopped_after = time.monotonic() - killed
    committed = sorted(p.stem for p in (output / "_shards").glob("part-*.json"))
    # The cluster is back, at the same address: the same command resumes the job.
    cluster = _start(cluster_class, port, temp)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    cluster.shutdown()
    return {"scenario": "cluster_loss", "first_code": first.returncode,
            "first_stderr": first_err, "stopped_after": stopped_after,
            "committed_when_lost": committed, "again_code": again.returncode,
            "again_stderr": again.stderr}


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
