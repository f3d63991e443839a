"""SDXL base + refiner as two stages, seed for seed with diffusers' ensemble of experts.

Oracle: ``StableDiffusionXLPipeline(denoising_end=f, output_type="latent")`` then
``StableDiffusionXLImg2ImgPipeline(denoising_start=f, image=latents)`` on tiny random SDXL
base and refiner folders built here, each stage given fresh per-row generators.
"""

from __future__ import annotations

import pytest
import torch

from ldm_jobs import load_pipeline
from tests.test_sdxl import SIZE, as_array, assert_close_images
from tests.tiny_sdxl import diffusers_sdxl_pipeline, make_sdxl, save_sdxl_folder

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red fox in the snow", "a castle on a hill"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage")
    base = make_sdxl("sdxl", seed=1)
    refiner = make_sdxl("sdxl_refiner", seed=2)
    return (base, load_pipeline(str(save_sdxl_folder(base, root / "base"))),
            refiner, load_pipeline(str(save_sdxl_folder(refiner, root / "refiner"))))


def diffusers_two_stage(base, refiner, sampler: str, steps: int, switch_at: float, guidance: float):
    generators = lambda: [torch.Generator().manual_seed(s) for s in SEEDS]  # noqa: E731
    common = dict(prompt=PROMPTS, negative_prompt=["blurry", "blurry"], num_inference_steps=steps,
                  guidance_scale=guidance)
    latents = diffusers_sdxl_pipeline(base, sampler)(
        **common, height=SIZE, width=SIZE, denoising_end=switch_at, output_type="latent",
        generator=generators()).images
    images = diffusers_sdxl_pipeline(refiner, sampler)(
        **common, image=latents, denoising_start=switch_at, generator=generators(), output_type="np").images
    return (images * 255).round()


@pytest.mark.parametrize("sampler,steps,switch_at,guidance", [
    ("euler", 6, 0.8, 5.0),
    ("dpmpp_2m", 7, 0.6, 5.0),
    pytest.param("ddim", 6, 0.7, 1.0, marks=pytest.mark.slow),
    pytest.param("euler_ancestral", 5, 0.5, 5.0, marks=pytest.mark.slow),  # fresh draws per stage
])
def test_two_stage_matches_diffusers_ensemble(models, sampler, steps, switch_at, guidance):
    base_ref, base, refiner_ref, refiner = models
    ours = as_array(base.generate(PROMPTS, seeds=SEEDS, negative_prompts="blurry", steps=steps,
                                  guidance_scale=guidance, sampler=sampler, width=SIZE, height=SIZE,
                                  refiner=refiner, switch_at=switch_at))
    reference = diffusers_two_stage(base_ref, refiner_ref, sampler, steps, switch_at, guidance)
    assert_close_images(ours, reference, sampler)
    # the refiner did change the image: the base alone ends elsewhere
    alone = as_array(base.generate(PROMPTS, seeds=SEEDS, negative_prompts="blurry", steps=steps,
                                   guidance_scale=guidance, sampler=sampler, width=SIZE, height=SIZE))
    assert abs(alone - reference).max() > 2


def test_two_stage_arguments_are_checked(models):
    _, base, _, refiner = models
    with pytest.raises(ValueError, match="switch_at"):
        base.generate(["x"], seeds=[1], steps=4, width=SIZE, height=SIZE, refiner=refiner, switch_at=1.0)
    with pytest.raises(ValueError, match="leaves no denoising step"):  # all 2 steps above 0.99's cutoff
        base.generate(["x"], seeds=[1], steps=2, width=SIZE, height=SIZE, refiner=refiner, switch_at=0.99)
    with pytest.raises(ValueError, match="pndm"):
        base.generate(["x"], seeds=[1], steps=4, sampler="pndm", width=SIZE, height=SIZE, refiner=refiner)
