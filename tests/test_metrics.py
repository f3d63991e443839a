"""The Ray metrics a cluster operator watches, read from the node's Prometheus endpoint
while a real job runs on the session's local Ray.

The job's single actor holds each shard until the test has seen the metrics that should
be exported at that moment, so every value is checked at a known point of the job: the
queue gauge counting down shard by shard, and the counters and the histogram growing with
each committed shard.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.cloudpickle
from ray_metrics import metric, scrape

from ldm_jobs.jobs.runner import run_job
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.worker import ShardWorker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # reaches the actor by value

JOB = "metrics-watched"
EXPORT_SECONDS = 60  # a value set by the driver reaches the endpoint within this on a busy VM


class HeldWorker(ShardWorker):
    """Runs a shard only once the test has written `<hook_dir>/<shard>.go`."""

    def __init__(self, spec, device="cpu", hook_dir=""):
        super().__init__(spec, device=device)
        self.hook_dir = Path(hook_dir)

    def run(self, shard):
        deadline = time.monotonic() + 300
        while not (self.hook_dir / f"{shard.name}.go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shard.name} was never released by the test")
            time.sleep(0.05)
        return super().run(shard)


def _wait_for(port: int, expected: dict[str, float]) -> dict[str, float | None]:
    """Scrape until every metric in `expected` reads its value; the last reading."""
    deadline, seen = time.monotonic() + EXPORT_SECONDS, {}
    while time.monotonic() < deadline:
        text = scrape(port)
        seen = {name: metric(text, name, JOB) for name in expected}
        if seen == expected:
            break
        time.sleep(0.25)
    return seen


def test_queue_gauge_counters_and_histogram_follow_the_job(ray_cluster, tmp_path: Path) -> None:
    # 3 shards of 2 rows; row "b1" asks for a width the model refuses (not a multiple of 8)
    pq.write_table(pa.table({"id": ["a0", "a1", "b0", "b1", "c0", "c1"],
                             "prompt": ["red", "green", "blue", "cyan", "pink", "gray"],
                             "width": pa.array([None, None, None, 30, None, None], pa.int64())}),
                   tmp_path / "prompts.parquet")
    spec = parse_spec({
        "name": JOB, "model": "builtin:tiny-random",
        "input": {"path": str(tmp_path / "prompts.parquet")},
        "output": {"path": str(tmp_path / "out"), "rows_per_shard": 2},
        "sampling": {"width": 16, "height": 16, "steps": 2},
        "compute": {"actors": 1, "batch_size": 2}})
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["manifest"] = run_job(
                spec, progress=False, in_process=False,
                worker_factory=functools.partial(HeldWorker, hook_dir=str(hooks)))
        except BaseException as exc:  # seen by the test's thread below
            outcome["error"] = exc

    driver = threading.Thread(target=job, daemon=True)
    driver.start()
    try:
        # shard k runs, the 2 - k behind it wait; the k before it are committed
        steps = [
            {"shards_queued": 2.0, "images_generated_total": None, "shard_seconds_count": None},
            {"shards_queued": 1.0, "images_generated_total": 2.0, "shard_seconds_count": 1.0},
            {"shards_queued": 0.0, "images_generated_total": 3.0, "rows_rejected_total": 1.0,
             "shard_seconds_count": 2.0},
        ]
        for k, expected in enumerate(steps):
            assert _wait_for(ray_cluster.metrics_port, expected) == expected, f"shard {k}"
            (hooks / f"part-{k:05d}.go").write_text("")
    finally:
        for k in range(3):  # never leave the driver waiting on a failed assertion
            (hooks / f"part-{k:05d}.go").write_text("")
        driver.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["manifest"]["counts"] == {**outcome["manifest"]["counts"],
                                             "generated": 5, "rejected": 1}
    final = {"images_generated_total": 5.0, "rows_rejected_total": 1.0,
             "shard_seconds_count": 3.0, "shards_queued": 0.0}
    assert _wait_for(ray_cluster.metrics_port, final) == final
