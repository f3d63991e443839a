"""The pipeline against diffusers' StableDiffusion(Img2Img)Pipeline, seed for seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import DIFFUSERS_SAMPLERS, diffusers_pipeline, make_reference, ours_from_reference

PROMPTS = ["a red circle on a blue background", "a small green star, top left"]
NEGATIVES = ["blurry", ""]
SEEDS = [1234, 98765]
W, H = 32, 48  # non-square, so a swapped axis cannot pass


@pytest.fixture(scope="module")
def sd1():
    ref = make_reference("sd1")
    return ref, ours_from_reference(ref)


@pytest.fixture(scope="module")
def sd2v():
    ref = make_reference("sd2v")
    return ref, ours_from_reference(ref)


def diffusers_images(ref, sampler, *, steps, guidance, negatives=None, init=None, strength=0.75):
    pipe = diffusers_pipeline(ref, sampler, img2img=init is not None)
    generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    kwargs = dict(
        prompt=PROMPTS, negative_prompt=negatives, num_inference_steps=steps,
        guidance_scale=guidance, generator=generators, output_type="np",
    )
    if init is None:
        out = pipe(height=H, width=W, **kwargs)
    else:
        out = pipe(image=init, strength=strength, **kwargs)
    return (out.images * 255).round().astype(np.uint8)


def ours_images(pipe, sampler, *, steps, guidance, negatives=None, init=None, strength=0.75):
    images = pipe.generate(
        PROMPTS, seeds=SEEDS, negative_prompts=negatives, steps=steps, guidance_scale=guidance,
        sampler=sampler, width=W, height=H, init_images=init, strength=strength,
    )
    return np.stack([np.asarray(im) for im in images])


def assert_close_images(ours, theirs):
    assert ours.shape == theirs.shape == (len(PROMPTS), H, W, 3)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 2, f"max pixel diff {diff.max()}/255"
    assert diff.mean() <= 0.5, f"mean pixel diff {diff.mean():.3f}/255"
    # The oracle must be informative: images that are not flat.
    assert theirs.std() > 5


@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_SAMPLERS))
@pytest.mark.parametrize("steps", [4, 9])
def test_txt2img_matches_diffusers(sd1, sampler, steps):
    ref, pipe = sd1
    guidance = 7.5 if steps == 4 else 1.0
    negatives = NEGATIVES if steps == 4 else None
    theirs = diffusers_images(ref, sampler, steps=steps, guidance=guidance, negatives=negatives)
    ours = ours_images(pipe, sampler, steps=steps, guidance=guidance, negatives=negatives)
    assert_close_images(ours, theirs)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m_karras"])
def test_txt2img_guided_without_negatives(sd1, sampler):
    ref, pipe = sd1
    theirs = diffusers_images(ref, sampler, steps=6, guidance=5.0)
    ours = ours_images(pipe, sampler, steps=6, guidance=5.0)
    assert_close_images(ours, theirs)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "ddpm"])
def test_v_prediction_trailing_matches_diffusers(sd2v, sampler):
    ref, pipe = sd2v
    theirs = diffusers_images(ref, sampler, steps=5, guidance=4.0, negatives=NEGATIVES)
    ours = ours_images(pipe, sampler, steps=5, guidance=4.0, negatives=NEGATIVES)
    assert_close_images(ours, theirs)


def init_images():
    rng = np.random.default_rng(7)
    base = np.zeros((H, W, 3), np.uint8)
    base[8:30, 6:20] = (220, 40, 40)
    noisy = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
    return [Image.fromarray(base), Image.fromarray(noisy)]


@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_SAMPLERS))
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(sd1, sampler, strength):
    ref, pipe = sd1
    init = init_images()
    theirs = diffusers_images(ref, sampler, steps=8, guidance=6.0, negatives=NEGATIVES, init=init, strength=strength)
    ours = ours_images(pipe, sampler, steps=8, guidance=6.0, negatives=NEGATIVES, init=init, strength=strength)
    assert_close_images(ours, theirs)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm", "dpmpp_2m"])
def test_image_alone_equals_image_in_batch(sd1, sampler):
    _, pipe = sd1
    prompts = ["a", "b red", "c blue square", "d"]
    seeds = [5, 6, 7, 8]
    scales = [7.5, 1.0, 3.0, 7.5]
    batch = pipe.generate(prompts, seeds=seeds, steps=5, sampler=sampler, width=W, height=H,
                          guidance_scale=scales, negative_prompts=["", "x", "", "y"])
    alone = pipe.generate(prompts[2:3], seeds=seeds[2:3], steps=5, sampler=sampler, width=W,
                          height=H, guidance_scale=3.0, negative_prompts=[""])
    diff = np.abs(np.asarray(batch[2], np.int16) - np.asarray(alone[0], np.int16))
    assert diff.max() <= 2
    # A different row really is different: the check above is not vacuous.
    assert np.abs(np.asarray(batch[0], np.int16) - np.asarray(batch[2], np.int16)).max() > 10


def test_per_row_guidance_in_one_batch_matches_separate_calls(sd1):
    _, pipe = sd1
    batch = pipe.generate(PROMPTS, seeds=SEEDS, steps=4, sampler="euler", width=W, height=H,
                          guidance_scale=[1.0, 8.0], negative_prompts=["", "ugly"])
    first = pipe.generate(PROMPTS[:1], seeds=SEEDS[:1], steps=4, sampler="euler", width=W, height=H,
                          guidance_scale=1.0)
    second = pipe.generate(PROMPTS[1:], seeds=SEEDS[1:], steps=4, sampler="euler", width=W, height=H,
                           guidance_scale=8.0, negative_prompts=["ugly"])
    for a, b in ((batch[0], first[0]), (batch[1], second[0])):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2


BAD_ARGUMENTS = [
    (dict(width=30), "width"),
    (dict(height=0), "height"),
    (dict(width=100_000), "width"),
    (dict(steps=0), "steps"),
    (dict(steps=1_000_000), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(guidance_scale=[1.0]), "guidance_scale"),
    (dict(seeds=[1]), "seeds"),
    (dict(seeds=[-1, 2]), "seeds"),
    (dict(seeds=[2**64, 2]), "seeds"),
    (dict(seeds=[1.5, 2]), "seeds"),
    (dict(sampler="heun"), "sampler"),
    (dict(negative_prompts=["x"]), "negative_prompts"),
    (dict(init_images=[Image.new("RGB", (W, H))]), "init_images"),
    (dict(init_images=[Image.new("RGB", (W, H))] * 2, strength=0.0), "strength"),
    (dict(init_images=[Image.new("RGB", (W, H))] * 2, strength=1.5), "strength"),
    (dict(prompts=["ok", None]), "prompts"),
    (dict(prompts=[]), "prompts"),
]


@pytest.mark.parametrize("override,name", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_name_the_argument(sd1, override, name):
    _, pipe = sd1
    kwargs = dict(prompts=PROMPTS, seeds=SEEDS, steps=2, width=W, height=H)
    kwargs.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        pipe.generate(**kwargs)
    assert name in str(info.value)


def test_img2img_resizes_init_images_of_another_size(sd1):
    _, pipe = sd1
    big = [im.resize((W * 2, H * 2)) for im in init_images()]
    out = pipe.generate(PROMPTS, seeds=SEEDS, steps=4, width=W, height=H, init_images=big, strength=0.5)
    assert [im.size for im in out] == [(W, H)] * 2
