"""The manifest's per-worker lines and their `show` output (no Ray: two ShardWorkers)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ldm_jobs.jobs import show
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.sinks import finalize
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.worker import ShardWorker


def test_manifest_has_a_line_per_worker_and_show_prints_it(tmp_path, fake_pipeline) -> None:
    rows = 10
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "prompt": [f"p{i}" for i in range(rows)]}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    spec = parse_spec({"input": {"path": str(tmp_path / "in.parquet")},
                       "output": {"path": str(out), "rows_per_shard": 2},
                       "sampling": {"width": 16, "height": 16, "steps": 2,
                                    "images_per_prompt": 2}})
    plan = make_plan(spec)
    assert len(plan.shards) == 10  # 1 prompt (2 images) per shard
    first = ShardWorker(spec, pipeline=fake_pipeline, worker_id="node-a:11:cuda")
    second = ShardWorker(spec, pipeline=fake_pipeline, worker_id="node-b:22:cpu")
    started = time.perf_counter()
    for index, shard in enumerate(plan.shards):
        (first if index < 7 else second).run(shard)
    manifest = finalize(spec, make_plan(spec), time.perf_counter() - started)

    lines = manifest["timings"]["workers"]
    assert [(w["node"], w["device"], w["shards"], w["images"]) for w in lines] == [
        ("node-a", "cuda", 7, 14), ("node-b", "cpu", 3, 6)]
    records = [json.loads(p.read_text()) for p in sorted((out / "_shards").glob("part-*.json"))]
    window = max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)
    for line in lines:
        mine = [r for r in records if r["worker"] == line["worker"]]
        busy = sum(r["busy_seconds"] for r in mine)
        assert line["busy_seconds"] == round(busy, 3)
        assert line["utilisation"] == round(min(1.0, busy / window), 3)
        assert 0 < line["utilisation"] <= 1
        assert line["images_per_gpu_hour"] == round(line["images"] / (busy / 3600), 1)
    assert json.loads((out / "_manifest.json").read_text())["timings"]["workers"] == lines

    text = show(str(out))
    assert "node-a cuda: 14 images in 7 shard(s)" in text
    assert "node-b cpu: 6 images in 3 shard(s)" in text
