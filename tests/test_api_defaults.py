"""`generate` with the size and seeds left out, and a job spec that leaves the size out.

Oracles: diffusers' StableDiffusionPipeline called with no height/width (its default is
the UNet's sample_size times the VAE factor) for the size and the pixels; a real job's
shard (the same worker code `ldm-jobs run` uses) for the seeds a call without seeds gets.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_sd import diffusers_pipeline, make_reference, ours_from_reference, save_diffusers_folder

from ldm_jobs import load_pipeline
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.rows import derive_seed, native_size_hint
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.worker import ShardWorker

PROMPTS = ["a red star", "a blue circle on green", "a small yellow square"]


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("builtin:tiny-random")


@pytest.fixture(scope="module")
def shapes():
    return load_pipeline("builtin:shapes")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_size_and_seed_defaults_match_diffusers():
    ref = make_reference("sd1")  # UNet sample_size 8, VAE factor 8: a 64x64 model
    ours = ours_from_reference(ref)
    theirs = diffusers_pipeline(ref, "euler")(
        ["a cat", "a dog"], num_inference_steps=2, guidance_scale=5.0, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)]).images
    assert theirs.shape == (2, 64, 64, 3)  # diffusers' own default size
    images = ours.generate(["a cat", "a dog"], seed=7, steps=2, sampler="euler",
                           guidance_scale=5.0)
    assert ours.native_size == (64, 64)
    assert [im.size for im in images] == [(64, 64)] * 2
    assert [im.info["seed"] for im in images] == [7, 8]  # seed=s: s, s+1, ...
    diff = np.abs(np.stack([pixels(im) for im in images]) - (theirs * 255).round())
    assert diff.max() <= 2 and theirs.std() * 255 > 5


@pytest.mark.parametrize("sample_size, side", [(64, 512), (96, 768), (128, 1024)])
def test_native_size_is_sample_size_times_the_vae_factor(tmp_path, sample_size, side):
    """The sizes of SD 1.x (512), SD 2.x v-models (768) and SDXL (1024): UNet configs of
    those sample sizes on a VAE with 4 levels (factor 8), as the real models have."""
    from diffusers import UNet2DConditionModel

    ref = make_reference("sd1")
    ref.unet = UNet2DConditionModel.from_config({**ref.unet.config, "sample_size": sample_size})
    folder = save_diffusers_folder(ref, tmp_path / "model")
    expected = sample_size * diffusers_pipeline(ref, "euler").vae_scale_factor
    assert expected == side
    assert load_pipeline(str(folder)).native_size == (side, side)
    assert native_size_hint(str(folder)) == (side, side)  # what validate prints, no weights


def test_builtin_shapes_draws_its_own_64px_by_default(shapes):
    assert shapes.native_size == (64, 64) == native_size_hint("builtin:shapes")
    image = shapes.generate(["a red star"], seeds=[0], steps=2)[0]
    assert image.size == (64, 64) and image.info["seed"] == 0
    # one side given: the other stays native
    assert shapes.generate(["a red star"], seeds=[0], steps=1, width=32)[0].size == (32, 64)


def test_without_seeds_a_call_draws_what_a_job_draws(tmp_path, tiny):
    """No seeds: prompt i gets the seed a job with the default `sampling.seed: 0` derives for
    row i of an input without ids, so the call and the job give the same images."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    spec = parse_spec({"model": "builtin:tiny-random",
                       "input": {"path": str(tmp_path / "prompts.txt")},
                       "output": {"path": str(tmp_path / "out")},
                       "sampling": {"steps": 2, "sampler": "euler", "guidance_scale": 5.0}})
    assert spec.sampling.width is None and spec.sampling.height is None
    plan = make_plan(spec)
    assert "native size of the model" in plan.describe()
    result = ShardWorker(spec, pipeline=tiny).run(plan.shards[0])
    assert (result.generated, result.rejected) == (3, 0)
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()

    images = tiny.generate(PROMPTS, steps=2, sampler="euler", guidance_scale=5.0)
    expected_seeds = [derive_seed(0, f"{i:08d}") for i in range(3)]
    assert [im.info["seed"] for im in images] == expected_seeds == [r["seed"] for r in rows]
    assert [(r["width"], r["height"]) for r in rows] == [tiny.native_size] * 3 == [(64, 64)] * 3
    for row, image in zip(rows, images):
        assert np.array_equal(pixels(Image.open(io.BytesIO(row["image"]))), pixels(image))
    # the seeds are distinct, so the images are too: a constant seed would fail here
    assert len({im.tobytes() for im in images}) == 3


def test_plan_prints_the_resolved_size_when_the_configs_tell_it(tmp_path):
    (tmp_path / "p.txt").write_text("a red star\n")

    def described(**sampling) -> str:
        spec = parse_spec({"input": {"path": str(tmp_path / "p.txt")},
                           "output": {"path": str(tmp_path / "o")}, "sampling": sampling})
        return next(line for line in make_plan(spec).describe().splitlines()
                    if line.startswith("sampling"))

    assert "64x64 (the model's native size)" in described()  # builtin:shapes' configs
    assert "32x64 (height: the model's native height)" in described(width=32)
    assert "48x40," in described(width=48, height=40)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(width=60), ValueError, "width=60: must be a multiple of 8 between 8 and 4096"),
    (dict(height=4), ValueError, "height=4: must be a multiple of 8"),
    (dict(seeds=[1], seed=1), TypeError, "seeds (one per prompt) or seed, not both"),
    (dict(seed=-1), ValueError, "seed=-1 is outside"),
    (dict(seed=2**63), ValueError, "is outside"),
    (dict(seed=True), TypeError, "seed must be an integer"),
    (dict(seed="3"), TypeError, "seed must be an integer"),
])
def test_bad_sizes_and_seeds_are_named(shapes, kwargs, error, words):
    # builtin:shapes' VAE factor is 4: 60 fits the VAE but not the job spec's rule of 8
    with pytest.raises(error) as raised:
        shapes.generate(["a red star"], steps=1, **kwargs)
    assert words in str(raised.value)


def test_a_seed_near_the_top_wraps_as_a_job_row_does(tiny):
    top = 2**63 - 1
    images = tiny.generate(["a", "b"], seed=top, steps=1)
    assert [im.info["seed"] for im in images] == [top, 0]
