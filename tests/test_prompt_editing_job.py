"""A job with prompt editing under prompt_syntax: a1111, through the in-process runner:
each image is the one ``generate`` draws for its row, and a row whose schedule cannot be
read is rejected with a reason naming it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ldm_jobs.jobs.runner import run_job
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.model.pipeline import load_pipeline

PROMPTS = {"edit": "a [red:blue:0.25] circle", "alternation": "a [cat|dog] x",
           "plain": "a (plain) square", "bad": "a [red:blue:1e999] circle"}
NEGATIVE = "[blurry:ugly:1]"


def test_a_job_with_prompt_edits_draws_what_generate_draws(tmp_path):
    pq.write_table(pa.table({"id": list(PROMPTS), "prompt": list(PROMPTS.values())}),
                   tmp_path / "in.parquet")
    spec = parse_spec({
        "name": "editing", "model": "builtin:tiny-random",
        "input": {"path": str(tmp_path / "in.parquet")},
        "output": {"path": str(tmp_path / "out"), "rows_per_shard": 4},
        "sampling": {"width": 16, "height": 16, "steps": 4, "sampler": "euler_ancestral",
                     "guidance_scale": 6.0, "negative_prompt": NEGATIVE, "prompt_syntax": "a1111"},
        "compute": {"actors": 1, "batch_size": 3}})
    run_job(spec, progress=False, in_process=True)
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()}
    errors = {r["id"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()}
    assert sorted(out) == ["alternation", "edit", "plain"]
    assert list(errors) == ["bad"] and "prompt" in errors["bad"] and "1e999" in errors["bad"]
    pipe = load_pipeline("builtin:tiny-random")

    def drawn(prompt, seed):
        image = pipe.generate([prompt], seeds=[seed], negative_prompts=[NEGATIVE], steps=4,
                              guidance_scale=6.0, sampler="euler_ancestral", width=16, height=16,
                              prompt_syntax="a1111")[0]
        return np.asarray(image).astype(int)

    for image_id, row in out.items():
        got = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
        assert np.abs(got - drawn(PROMPTS[image_id], row["seed"])).max() <= 1, image_id
    # the edit is read: the first step's text throughout draws another image
    got = np.asarray(Image.open(io.BytesIO(out["edit"]["image"]))).astype(int)
    assert np.abs(got - drawn("a red circle", out["edit"]["seed"])).max() > 1
