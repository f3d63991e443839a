"""`ldm-jobs submit` to a real Ray Jobs API: a head of our own, with token authentication.

The test starts `ray start --head --block` in its own session with its own temp dir, ports
and dashboard, a fresh token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) for the head and the
submitting side alike, submits a tiny job, follows it to SUCCEEDED through the Jobs REST
API, reads the images, and stops that head by the process ids it started (never
`ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray_metrics import metric, scrape

pytestmark = pytest.mark.slow  # a Ray head with its dashboard, a job driver, a model load

BIN = Path(sys.executable).parent
# How long the head and the job may take on a busy 2-core machine before the test gives up.
HEAD_UP_SECONDS = 180
JOB_SECONDS = 420
METRICS_SECONDS = 60
JOB = "submitted"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> dict[int, int]:
    """{pid: parent pid} of every process on the machine (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents = _children(pid)
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _ours(temp_dir: str) -> set[int]:
    """Processes whose command line names our temp dir (Ray daemons that re-parented)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.add(int(entry))
            except OSError:
                continue
    return pids


class Head:
    def __init__(self, env: dict[str, str]) -> None:
        # Unix socket paths live under the temp dir and must stay short: not under tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="ldmray-", dir="/tmp")
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.metrics_port = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(Path(self.temp_dir) / "head.log", "wb")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--metrics-export-port={self.metrics_port}", "--num-cpus=2", "--num-gpus=0",
             "--object-store-memory=100000000", "--include-dashboard=true"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, token: str) -> None:
        deadline = time.monotonic() + HEAD_UP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.tail()
            try:
                _get(f"{self.url}/api/version", token)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise AssertionError(f"the Ray head did not come up:\n{self.tail()}")

    def tail(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM then SIGKILL to the `ray start` process and every process it started."""
        pids = _descendants(self.process.pid) | _ours(self.temp_dir) | {self.process.pid}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _get(url: str, token: str | None) -> dict:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def head_env():
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_")}  # no address or auth from the test session
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               # metrics reach the node's exporter every 0.5 s, not 10: the job is short
               RAY_metrics_report_interval_ms="500")
    head = Head(env)
    try:
        head.wait_up(token)
        yield head, env, token
    finally:
        head.stop()


def test_submit_runs_to_succeeded_on_a_real_head(head_env, tmp_path: Path) -> None:
    head, env, token = head_env
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["red", "green", "blue"]}),
                   prompts)
    output = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": JOB, "model": "builtin:tiny-random",
        "input": {"path": str(prompts)}, "output": {"path": str(output)},
        "sampling": {"width": 16, "height": 16, "steps": 2},
        "compute": {"actors": 1, "batch_size": 2}}))

    # Token auth is really on: without the token the Jobs API refuses.
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{head.url}/api/jobs/", None)
    assert refused.value.code in (401, 403)

    submitted = subprocess.run(
        [str(BIN / "ldm-jobs"), "submit", str(spec), "--address", head.url],
        env=env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]

    deadline = time.monotonic() + JOB_SECONDS
    status = None
    while time.monotonic() < deadline:
        status = _get(f"{head.url}/api/jobs/{job_id}", token)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _get(f"{head.url}/api/jobs/{job_id}/logs", token).get("logs", "")
    assert status == "SUCCEEDED", f"{status}\n{logs[-3000:]}"

    table = pq.read_table(output)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    assert (output / "_SUCCESS").exists()
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["generated"] == 3

    # The driver's Ray metrics, on the head's metrics endpoint (what the dashboard scrapes).
    # (The queue gauge is checked while a job runs in test_metrics.py: a gauge's last value
    # goes with the driver's process, which ends with this short job before it is exported.)
    deadline, text = time.monotonic() + METRICS_SECONDS, ""
    while time.monotonic() < deadline and (metric(text, "images_generated_total", JOB) is None
                                           or metric(text, "shard_seconds_count", JOB) is None):
        time.sleep(1)
        text = scrape(head.metrics_port)
    ours = "\n".join(line for line in text.splitlines() if "ldm_jobs" in line)
    assert metric(text, "images_generated_total", JOB) == 3.0, ours  # Prometheus's counter name
    assert metric(text, "shard_seconds_count", JOB) == 1.0, ours  # one shard of 3 rows
