"""Expansion (jobs/expand.py): templates x sweeps planned as ranges; ids, seeds, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from job_helpers import make_spec

from ldm_jobs.jobs.expand import Expander
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.sinks import finalize
from ldm_jobs.jobs.spec import SpecError
from ldm_jobs.jobs.worker import ShardWorker
from ldm_jobs.model.seeds import derive_seed

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"a": "a __colour__ {circle|square}", "b": "{2$$red|green|blue} star",
             "c": "plain text", "bad": "{unclosed", "nowild": "a __missing__ thing"}


@pytest.fixture
def inputs(tmp_path):
    wildcards = tmp_path / "wildcards"
    wildcards.mkdir()
    (wildcards / "colour.txt").write_text("red\ngreen\nblue\n")
    pq.write_table(pa.table({"id": list(TEMPLATES), "prompt": list(TEMPLATES.values()),
                             "note": [f"n{i}" for i in range(len(TEMPLATES))]}),
                   tmp_path / "in.parquet")
    return tmp_path


def spec_for(root, out="out", mode="random", **prompts):
    return make_spec(root / "in.parquet", root / out,
                     output={"rows_per_shard": 5},
                     expand={"prompts": {"mode": mode, "wildcards": str(root / "wildcards"), **prompts},
                             "sweep": {"guidance_scale": [3, 5], "sampler": ["euler", "ddim"]}})


def run_shards(spec, pipeline):
    """Plan, run every pending shard here (no Ray) and finalize."""
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=pipeline)
    for shard in plan.pending():
        worker.run(shard)
    worker.close()
    finalize(spec, plan, 0.0)
    return plan


def run_in_process(spec, pipeline):
    plan = run_shards(spec, pipeline)
    parts = sorted(str(p) for p in Path(spec.output.path).glob("part-*.parquet"))
    dataset = pads.dataset(parts, format="parquet")
    wanted = ["id", "prompt", "template", "seed", "guidance_scale", "sampler", "note"]
    table = dataset.to_table(columns=[c for c in wanted if c in dataset.schema.names])
    errors_file = Path(spec.output.path) / "errors.parquet"
    errors = pq.read_table(errors_file) if errors_file.exists() else None
    return plan, table, errors


def test_random_variants_crossed_with_the_sweep(inputs, fake_pipeline):
    spec = spec_for(inputs, variants=3)
    plan, table, errors = run_in_process(spec, fake_pipeline)
    per_row = 3 * 4
    assert plan.input_rows == len(TEMPLATES) * per_row
    assert len(plan.shards) == -(-plan.input_rows // 5)  # ranges of the expansion
    rows = {r["id"]: r for r in table.to_pylist()}
    good = ["a", "b", "c"]
    assert sorted(rows) == sorted(f"{i}~{k}" for i in good for k in range(per_row))
    # rows that cannot expand are rejected, every one of their slots, with the reason
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist()))
    assert sorted(reasons) == sorted(f"{i}~{k}" for i in ("bad", "nowild") for k in range(per_row))
    assert "template" in reasons["bad~0"] and "__missing__" in reasons["nowild~3"]
    for i in good:
        first = [rows[f"{i}~{k}"] for k in range(per_row)]
        assert all(r["template"] == TEMPLATES[i] for r in first)
        assert all(r["note"] == first[0]["note"] for r in first)  # input columns pass through
        # the sweep: first field slowest, then the variant's seed shared by its points
        assert [(r["guidance_scale"], r["sampler"]) for r in first[:4]] == [
            (3.0, "euler"), (3.0, "ddim"), (5.0, "euler"), (5.0, "ddim")]
        for v in range(3):
            points = first[v * 4 : v * 4 + 4]
            assert {r["prompt"] for r in points} == {points[0]["prompt"]}
            assert {r["seed"] for r in points} == {derive_seed(spec.sampling.seed, f"{i}~{v * 4}")}
    assert rows["c~0"]["prompt"] == "plain text"
    assert all(rows[f"a~{k}"]["prompt"].split()[1] in ("red", "green", "blue") for k in range(12))
    assert all(len(rows[f"b~{k}"]["prompt"].split(",")) == 2 for k in range(12))


def test_two_runs_are_identical(inputs, fake_pipeline):
    _, first, _ = run_in_process(spec_for(inputs, "one", variants=3), fake_pipeline)
    _, second, _ = run_in_process(spec_for(inputs, "two", variants=3), fake_pipeline)
    assert first.to_pylist() == second.to_pylist()
    names = sorted(p.name for p in (inputs / "one").glob("part-*.parquet"))
    for name in names:
        assert (inputs / "one" / name).read_bytes() == (inputs / "two" / name).read_bytes()


def test_combinatorial_counts_per_row(inputs, fake_pipeline):
    plan, table, _ = run_in_process(spec_for(inputs, mode="combinatorial", max=4), fake_pipeline)
    ids = set(table.column("id").to_pylist())
    # a: 3 colours x 2 shapes = 6, cut at 4; b: 6 ordered pairs (the library's 2$$), cut
    # at 4; c: 1; failing rows: 1 each (their rejections)
    assert plan.input_rows == (4 + 4 + 1 + 1 + 1) * 4
    assert {i for i in ids if i.startswith("a~")} == {f"a~{k}" for k in range(16)}
    assert {i for i in ids if i.startswith("c~")} == {f"c~{k}" for k in range(4)}
    prompts = sorted({r["prompt"] for r in table.to_pylist() if r["id"].startswith("a~")})
    assert prompts == ["a blue circle", "a blue square", "a green circle", "a green square"]


def test_wildcards_from_s3(inputs, s3_server, fake_pipeline):
    import boto3

    bucket = s3_server.make_bucket()
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(
        Bucket=bucket, Key="wild/colour.txt", Body=b"purple\n")
    spec = make_spec(inputs / "in.parquet", inputs / "s3out", output={"rows_per_shard": 5},
                     expand={"prompts": {"variants": 2, "wildcards": f"s3://{bucket}/wild"}})
    _, table, _ = run_in_process(spec, fake_pipeline)
    assert {r["prompt"].split()[1] for r in table.to_pylist() if r["id"].startswith("a~")} == {"purple"}


def test_validate_prints_the_expansion(inputs):
    text = make_plan(spec_for(inputs, variants=3)).describe()
    assert "expand     60 rows to generate (random, 3 variant(s) per row; 4 sweep point(s) each)" in text
    assert "a~0  seed" in text and "guidance_scale=3" in text


def test_bad_sweeps_name_the_field(inputs):
    for sweep, field in (({"guidance_scale": ["x"]}, "expand.sweep.guidance_scale[0]"),
                         ({"colour": [1]}, "expand.sweep.colour"),
                         ({"steps": []}, "expand.sweep.steps")):
        spec = make_spec(inputs / "in.parquet", inputs / "o", expand={"sweep": sweep})
        with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
            Expander(spec)


def test_plan_stays_lazy(tmp_path):
    # 1,000 rows x 1,000 variants x 10 points: shards are ranges, planned without templates
    pq.write_table(pa.table({"prompt": ["a {red|green} cat"] * 1000}), tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", output={"rows_per_shard": 4096},
                     expand={"prompts": {"variants": 1000}, "sweep": {"steps": list(range(1, 11))}})
    plan = make_plan(spec)
    assert plan.input_rows == 10_000_000
    assert sum(s.rows for s in plan.shards) == 10_000_000
    last = plan.shards[-1]
    assert last.expanded[1] == 10_000_000 and last.slices[-1].offset + last.slices[-1].count == 1000


# ---- a real kill of the driver, then the same command again --------------------------------
@pytest.mark.slow  # two local jobs and a third, killed one: a minute on an idle machine
@pytest.mark.usefixtures("ray_cluster")
def test_resume_after_the_driver_is_killed(inputs):
    import ray

    address = ray.get_runtime_context().gcs_address
    data = {"model": "builtin:tiny-random",
            "input": {"path": str(inputs / "in.parquet")},
            "output": {"path": str(inputs / "killed"), "rows_per_shard": 4},
            "sampling": {"sampler": "euler", "steps": 2, "width": 16, "height": 16},
            "compute": {"actors": 1, "batch_size": 4},
            "expand": {"prompts": {"variants": 2, "wildcards": str(inputs / "wildcards")},
                       "sweep": {"guidance_scale": [3, 5]}}}
    spec_file = inputs / "killed.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    clean_file = inputs / "clean.yaml"
    clean_file.write_text(yaml.safe_dump({**data, "output": {**data["output"], "path": str(inputs / "clean")}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = [sys.executable, "-m", "ldm_jobs", "run"]
    done = subprocess.run([*run, str(clean_file), "--address", address], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    output = inputs / "killed"
    first = subprocess.Popen([*run, str(spec_file), "--address", address], cwd=PROJECT_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((output / "_shards").glob("part-*.json")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    committed = {p.name for p in (output / "_shards").glob("part-*.json")}
    assert 1 <= len(committed) < 5 and not (output / "_SUCCESS").exists()
    again = subprocess.run([*run, str(spec_file), "--address", address], cwd=PROJECT_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (inputs / "clean").glob("part-*.parquet"))
    assert names == sorted(p.name for p in output.glob("part-*.parquet")) and len(names) == 5
    for name in names:  # exactly once, the same bytes
        assert (output / name).read_bytes() == (inputs / "clean" / name).read_bytes()
    parts = sorted(str(p) for p in output.glob("part-*.parquet"))
    ids = pads.dataset(parts, format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{i}~{k}" for i in "abc" for k in range(4))
    rejected = pq.read_table(output / "errors.parquet").column("id").to_pylist()
    assert sorted(rejected) == sorted(f"{i}~{k}" for i in ("bad", "nowild") for k in range(4))


def test_prompt_syntax_reaches_generate(inputs):
    from conftest import FakePipeline

    class Recording(FakePipeline):
        def generate(self, prompts, *args, prompt_syntax="plain", **kwargs):
            self.syntaxes = [*getattr(self, "syntaxes", []), prompt_syntax]
            return super().generate(prompts, *args, **kwargs)

    for syntax in ("plain", "a1111"):
        pipeline = Recording()
        spec = make_spec(inputs / "in.parquet", inputs / f"syntax-{syntax}",
                         sampling={"prompt_syntax": syntax})
        run_in_process(spec, pipeline)
        assert set(pipeline.syntaxes) == {syntax}
    with pytest.raises(SpecError, match="prompt_syntax"):
        make_spec(inputs / "in.parquet", inputs / "x", sampling={"prompt_syntax": "compel"})


def test_a_sweep_over_loras(inputs):
    from ldm_jobs.jobs.expand import expand_table
    from ldm_jobs.jobs.readers import read_slice
    from ldm_jobs.jobs.rows import check_rows
    from ldm_jobs.jobs.storage import open_storage

    spec = make_spec(inputs / "in.parquet", inputs / "o", output={"rows_per_shard": 3},
                     sampling={"loras": {"base.safetensors": 1.0}},
                     expand={"sweep": {"loras": [{}, {"s3://b/x.safetensors": 0.5}, "y.safetensors:0.25"]}})
    plan = make_plan(spec)
    shard = plan.shards[1]  # input row b: b~0 .. b~2
    piece = shard.slices[0]
    table = read_slice(open_storage(piece.path), piece.path, piece.first, piece.count, "prompt")
    rows = [piece.offset + i for i in range(piece.count)]
    expanded, indices, _, reasons = expand_table(Expander(spec), shard, table, rows,
                                                 [piece.path] * len(rows), {})
    assert not reasons and indices == [3, 4, 5]
    tasks, rejected = check_rows(expanded, spec, indices, shard.id_column, {}, None)
    assert not rejected
    assert [(t.id, t.loras) for t in tasks] == [
        ("b~0", ()), ("b~1", (("s3://b/x.safetensors", 0.5),)), ("b~2", (("y.safetensors", 0.25),))]
    with pytest.raises(SpecError, match=r"expand.sweep.loras\[0\]"):
        Expander(make_spec(inputs / "in.parquet", inputs / "o", expand={"sweep": {"loras": [7]}}))


def test_combinatorial_without_max_rejects_a_huge_template(inputs, monkeypatch):
    from ldm_jobs.jobs import expand

    monkeypatch.setattr(expand, "MAX_COMBINATIONS", 5)
    expander = Expander(spec_for(inputs, mode="combinatorial"))
    assert len(expander.variants("{a|b} {c|d}", "x")) == 4
    with pytest.raises(ValueError, match="more than 5 combinations; set expand.prompts.max"):
        expander.variants("{a|b|c} {d|e}", "x")
