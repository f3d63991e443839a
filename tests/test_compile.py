"""`compute.compile`: the UNet under torch.compile, with batches bucketed to one shape.

Most checks use dynamo's "eager" backend: it traces and guards exactly as inductor does
(so a new shape recompiles the same way) without generating C++; one check builds the
real inductor graph on the CPU and compares its images with eager mode.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from job_helpers import make_spec
from PIL import Image

from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.worker import ShardWorker
from ldm_jobs.model import load_pipeline

SIZE = 32
PROMPTS = ["a red circle", "a blue square", "a green star", "a pink ring", "a black cross"]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in images])


def generate(pipe, n: int, **kwargs) -> np.ndarray:
    args = dict(steps=3, width=SIZE, height=SIZE, guidance_scale=5.0, sampler="euler")
    args.update(kwargs)
    return pixels(pipe.generate(PROMPTS[:n], list(range(10, 10 + n)), **args))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def eager_images():
    pipe = load_pipeline("builtin:tiny-random")
    return [generate(pipe, n) for n in (1, 3, 5)]


def test_padding_and_splitting_keep_every_image(eager_images):
    pipe = load_pipeline("builtin:tiny-random")
    pipe.compile(batch_size=2, backend="eager")
    for n, want in zip((1, 3, 5), eager_images, strict=True):
        got = generate(pipe, n)
        assert got.shape == want.shape  # the padding rows are dropped
        assert np.abs(got - want).max() <= 1


def test_a_bucketed_job_never_recompiles_after_its_first_batch():
    pipe = load_pipeline("builtin:tiny-random")
    pipe.compile(batch_size=4, backend="eager")
    generate(pipe, 4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 3, 4, 5):  # short batches, and more rows than a batch
            generate(pipe, n)


def test_without_buckets_a_short_batch_recompiles():
    """The check above can fail: the same calls without bucketing do recompile."""
    pipe = load_pipeline("builtin:tiny-random")
    pipe.compile(backend="eager")
    generate(pipe, 4)
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="ecompil"):
        generate(pipe, 3)


def test_compile_refuses_a_bad_batch_size():
    pipe = load_pipeline("builtin:tiny-random")
    with pytest.raises(ValueError, match="batch_size"):
        pipe.compile(batch_size=0)
    assert not pipe.compiled


def test_inductor_on_the_cpu_matches_eager(eager_images):
    pipe = load_pipeline("builtin:tiny-random")
    pipe.compile(batch_size=3)
    assert pipe.compiled
    got = generate(pipe, 3)
    assert np.abs(got - eager_images[1]).max() <= 2


def _job(tmp_path, compile_unet: bool):
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(5)], "prompt": PROMPTS}),
                   tmp_path / "in.parquet")
    out = tmp_path / ("compiled" if compile_unet else "eager")
    spec = make_spec(tmp_path / "in.parquet", out, sampling={"width": SIZE, "height": SIZE,
                                                              "steps": 3, "sampler": "euler"},
                     compute={"batch_size": 2, "compile": compile_unet})
    spec = spec.model_copy(update={"model": "builtin:tiny-random"})
    return spec, out


def test_a_compiled_worker_compiles_once_at_load_and_writes_the_same_rows(tmp_path, monkeypatch):
    import ldm_jobs.model.pipeline as pipeline_module

    calls = []
    original = pipeline_module.Pipeline.compile

    def eager_backend(self, batch_size=None, **kwargs):
        calls.append(batch_size)
        original(self, batch_size, backend="eager")

    monkeypatch.setattr(pipeline_module.Pipeline, "compile", eager_backend)
    rows = {}
    for compile_unet in (False, True):
        spec, out = _job(tmp_path, compile_unet)
        worker = ShardWorker(spec)  # loads the model; compiles and warms up when asked
        with torch._dynamo.config.patch(error_on_recompile=compile_unet):
            for shard in make_plan(spec).pending():  # 5 rows in batches of 2: 2, 2, 1
                worker.run(shard)
        worker.close()
        table = pq.read_table(out / "part-00000.parquet").to_pylist()
        rows[compile_unet] = {r["id"]: pixels([Image.open(io.BytesIO(r["image"]))])[0]
                              for r in table}
    assert calls == [2]  # the compiled worker only, with the job's batch size
    assert sorted(rows[True]) == sorted(rows[False]) == [f"r{i}" for i in range(5)]
    for key in rows[False]:
        assert np.abs(rows[True][key] - rows[False][key]).max() <= 1
