"""SDXL base and refiner from diffusers folders, seed for seed with diffusers.

Oracles: tiny random SDXL models made with diffusers + transformers
(``CLIPTextModelWithProjection`` with the hub's legacy ``eos_token_id: 2`` for encoder 2),
saved in diffusers layout and run by ``StableDiffusionXLPipeline`` /
``StableDiffusionXLImg2ImgPipeline`` with one generator per row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_jobs import load_pipeline
from tests.tiny_sd import DIFFUSERS_SAMPLERS
from tests.tiny_sdxl import diffusers_sdxl_pipeline, make_sdxl, save_sdxl_folder

diffusers = pytest.importorskip("diffusers")

SIZE = 32
PROMPTS = ["a red fox in the snow", "a castle on a hill, (masterpiece)"]
SEEDS = [5, 6]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    ref = make_sdxl("sdxl", seed=1)
    folder = save_sdxl_folder(ref, tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    return ref, load_pipeline(str(folder))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    ref = make_sdxl("sdxl_refiner", seed=2)
    folder = save_sdxl_folder(ref, tmp_path_factory.mktemp("refiner") / "tiny-refiner")
    return ref, load_pipeline(str(folder))


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def theirs(pipe, rows: list[dict], **common) -> np.ndarray:
    """diffusers' images, one call per row (each row its own guidance and negative)."""
    out = []
    for row in rows:
        kwargs = {**common, **row}
        seed = kwargs.pop("seed")
        images = pipe(num_inference_steps=kwargs.pop("steps", 4), height=SIZE, width=SIZE,
                      generator=[torch.Generator().manual_seed(seed)], output_type="np", **kwargs).images
        out.append(np.round(images[0] * 255))
    return np.stack(out)


def theirs_batched(pipe, prompts: list[str], seeds: list[int], steps: int = 4, **common) -> np.ndarray:
    """diffusers' images for rows that share every argument but prompt, seed and image."""
    images = pipe(prompt=prompts, num_inference_steps=steps, height=SIZE, width=SIZE,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **common).images
    return np.round(images * 255)


def assert_close_images(ours: np.ndarray, reference: np.ndarray, what) -> None:
    diff = np.abs(ours - reference)
    assert diff.max() <= 2 and diff.mean() <= 0.5, (what, diff.max(), diff.mean())


def test_family_and_components_match_transformers_and_diffusers(sdxl):
    ref, pipe = sdxl
    assert pipe.family == "sdxl"
    assert pipe.vae.scaling_factor == pytest.approx(0.13025)
    assert pipe.text.force_zeros_for_empty_prompt
    ids_1, ids_2 = pipe.tokenizer(PROMPTS), pipe.tokenizer_2(PROMPTS)
    want_2 = ref.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids_2, want_2.input_ids) and (ids_2[:, -1] == 0).all()  # pads with "!"
    with torch.no_grad():
        out_1 = ref.text_encoder(ids_1, output_hidden_states=True)
        out_2 = ref.text_encoder_2(ids_2, output_hidden_states=True)
        contexts, pooled = pipe.sdxl_prompts(PROMPTS)
        context = torch.stack(contexts)
        torch.testing.assert_close(context, torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], -1),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled, out_2.text_embeds, atol=1e-4, rtol=0)
        # the contract's component: last hidden state after the final norm
        torch.testing.assert_close(pipe.text_encoder(ids_1), out_1.last_hidden_state, atol=1e-4, rtol=0)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 4, 4, generator=g)
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE], [64, 48, 8, 0, SIZE, SIZE]], dtype=torch.float32)
        t = torch.tensor([999, 500])
        ours = pipe.unet(latents, t, context, pooled=pooled, time_ids=time_ids)
        want = ref.unet(latents, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="pooled= and time_ids="):
        pipe.unet(latents, t, context)


# two samplers in the default run (a sigma one and an alpha one), all of them with -m slow
FAST_SAMPLERS = ("euler", "ddim")


@pytest.mark.parametrize("sampler", [s if s in FAST_SAMPLERS else pytest.param(s, marks=pytest.mark.slow)
                                     for s in sorted(DIFFUSERS_SAMPLERS)])
def test_txt2img_matches_diffusers_every_sampler(sdxl, sampler):
    ref, pipe = sdxl
    ours = as_array(pipe.generate(PROMPTS, seeds=SEEDS, steps=4, guidance_scale=5.0, sampler=sampler,
                                  width=SIZE, height=SIZE))
    reference = theirs_batched(diffusers_sdxl_pipeline(ref, sampler), PROMPTS, SEEDS, guidance_scale=5.0)
    assert_close_images(ours, reference, sampler)


def test_per_row_guidance_negatives_and_cfg_off(sdxl):
    """Row 0 unguided, row 1 guided with the zeroed empty negative, row 2 with its own
    negative; each equals diffusers' image for that row alone."""
    ref, pipe = sdxl
    prompts, seeds = [*PROMPTS, "a bowl of ramen"], [7, 8, 9]
    scales, negatives = [1.0, 6.0, 3.0], ["ignored", "", "blurry, ugly"]
    ours = as_array(pipe.generate(prompts, seeds=seeds, negative_prompts=negatives, steps=4,
                                  guidance_scale=scales, sampler="euler_ancestral", width=SIZE, height=SIZE))
    dpipe = diffusers_sdxl_pipeline(ref, "euler_ancestral")
    rows = [{"prompt": p, "seed": s, "guidance_scale": g, "negative_prompt": n or None}
            for p, s, g, n in zip(prompts, seeds, scales, negatives)]
    assert_close_images(ours, theirs(dpipe, rows), "per-row")
    # the zeroed negative is not the encoded "": force_zeros_for_empty_prompt matters here
    encoded = theirs(dpipe, [{**rows[1], "negative_prompt": ""}])
    assert np.abs(ours[1] - encoded[0]).max() > 2


@pytest.mark.slow  # three diffusers runs; the default time ids are checked by every other test
def test_micro_conditioning_overrides(sdxl):
    ref, pipe = sdxl
    ours = as_array(pipe.generate(PROMPTS[:1], seeds=[3], steps=3, sampler="ddim", width=SIZE, height=SIZE,
                                  guidance_scale=6.0, original_size=(1024, 768),
                                  crops_coords_top_left=(16, 0), target_size=(512, 512)))
    rows = [{"prompt": PROMPTS[0], "seed": 3, "steps": 3, "guidance_scale": 6.0}]
    reference = theirs(diffusers_sdxl_pipeline(ref, "ddim"), rows, original_size=(1024, 768),
                       crops_coords_top_left=(16, 0), target_size=(512, 512))
    assert_close_images(ours, reference, "micro-conditioning")
    plain = theirs(diffusers_sdxl_pipeline(ref, "ddim"), rows)
    assert np.abs(reference - plain).max() > 2  # the time ids do reach the image
    with pytest.raises(ValueError, match="original_size"):
        pipe.generate(PROMPTS[:1], seeds=[3], steps=1, width=SIZE, height=SIZE, original_size=(1, 2, 3))
    with pytest.raises(TypeError, match="bogus"):
        pipe.generate(PROMPTS[:1], seeds=[3], steps=1, width=SIZE, height=SIZE, bogus=1)


def _init_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("sampler", ["euler", pytest.param("dpmpp_2m", marks=pytest.mark.slow)])
def test_img2img_matches_diffusers(sdxl, sampler):
    ref, pipe = sdxl
    inits = _init_images(2)
    ours = as_array(pipe.generate(PROMPTS, seeds=SEEDS, steps=5, guidance_scale=4.0, sampler=sampler,
                                  width=SIZE, height=SIZE, init_images=inits, strength=0.6))
    reference = theirs_batched(diffusers_sdxl_pipeline(ref, sampler, img2img=True), PROMPTS, SEEDS, steps=5,
                               image=inits, guidance_scale=4.0, strength=0.6)
    assert_close_images(ours, reference, sampler)


def test_refiner_folder_img2img_with_aesthetic_scores(refiner):
    ref, pipe = refiner
    assert pipe.family == "sdxl_refiner"
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert not pipe.text.force_zeros_for_empty_prompt  # the refiner's model_index says false
    inits = _init_images(2)
    ours = as_array(pipe.generate(PROMPTS, seeds=SEEDS, steps=5, guidance_scale=5.0, sampler="euler",
                                  width=SIZE, height=SIZE, init_images=inits, strength=0.5,
                                  aesthetic_score=7.0))
    reference = theirs_batched(diffusers_sdxl_pipeline(ref, "euler"), PROMPTS, SEEDS, steps=5, image=inits,
                               guidance_scale=5.0, strength=0.5, aesthetic_score=7.0)
    assert_close_images(ours, reference, "refiner")


def test_force_upcast_decides_the_vae_dtype(tmp_path):
    """float16: a force_upcast VAE decodes in float32; an fp16-fix VAE (force_upcast false)
    stays in float16 and decodes without NaN."""
    for upcast, wanted in ((True, torch.float32), (False, torch.float16)):
        ref = make_sdxl("sdxl", seed=4, force_upcast=upcast)
        folder = save_sdxl_folder(ref, tmp_path / f"upcast-{upcast}")
        pipe = load_pipeline(str(folder), dtype="float16")
        assert pipe.vae_dtype == wanted
        assert next(pipe.vae.parameters()).dtype == wanted
        latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        pixels = pipe.decode_to_array(latents)
        assert pixels.shape == (1, SIZE, SIZE, 3) and pixels.std() > 0
