"""Single-file checkpoints' scheduler config follows diffusers' ``from_config`` rule.

A single file uses its family's official ``scheduler_config.json``; a key that file never
set (SD 1.5's has no ``timestep_spacing``) takes the target scheduler's own default. The
oracle: diffusers schedulers made with ``from_config`` of the hub files' content, written
here as the hub has them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_jobs.model import convert_ldm
from ldm_jobs.model.schedules import SchedulerConfig, plan
from tests.tiny_sd import DIFFUSERS_SAMPLERS, diffusers_pipeline, diffusers_scheduler
from tests.tiny_sdxl import SDXL_SCHEDULER, make_sd1_single_file_model, original_state_dict

diffusers = pytest.importorskip("diffusers")

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
HUB = {"sd1": SD15_SCHEDULER, "sd2": SD21_SCHEDULER, "sdxl": SDXL_SCHEDULER, "sdxl_refiner": SDXL_SCHEDULER}


def _without_version(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "_diffusers_version"}


@pytest.mark.parametrize("family", sorted(HUB))
def test_official_configs_are_the_hub_files(family):
    assert convert_ldm.OFFICIAL_SCHEDULERS[family] == _without_version(HUB[family])


@pytest.mark.parametrize("family", sorted(HUB))
@pytest.mark.parametrize("sampler", sorted(DIFFUSERS_SAMPLERS))
@pytest.mark.parametrize("steps", [7, 25])
def test_timesteps_match_from_config(family, sampler, steps):
    ours = plan(sampler, SchedulerConfig.from_dict(convert_ldm.OFFICIAL_SCHEDULERS[family]), steps)
    reference = diffusers_scheduler(sampler, HUB[family])
    reference.set_timesteps(steps)
    assert ours.timesteps.tolist() == pytest.approx(reference.timesteps.float().tolist(), abs=1e-4)
    if ours.sigmas is not None:
        np.testing.assert_allclose(ours.sigmas.numpy(), reference.sigmas.float().numpy(), rtol=1e-5, atol=1e-6)
    assert float(ours.init_noise_sigma) == pytest.approx(float(reference.init_noise_sigma), rel=1e-5)


def test_spacing_defaults_per_sampler():
    """SD 1.5's file: Euler and DPM++ space linspace, DDIM/PNDM leading (the measured bug)."""
    config = SchedulerConfig.from_dict(convert_ldm.OFFICIAL_SCHEDULERS["sd1"])
    spacing = {s: config.resolved(s, "timestep_spacing") for s in ("euler", "euler_ancestral", "dpmpp_2m", "ddim", "pndm")}
    assert spacing == {"euler": "linspace", "euler_ancestral": "linspace", "dpmpp_2m": "linspace",
                       "ddim": "leading", "pndm": "leading"}


@pytest.fixture(scope="module")
def sd1_single_file(tmp_path_factory):
    ref = make_sd1_single_file_model(seed=3)
    path = tmp_path_factory.mktemp("sd15") / "tiny-sd15.safetensors"
    save_file(original_state_dict(ref.unet, ref.vae, ref.text_encoder, family="sd1"), str(path))
    return ref, path


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_sd15_single_file_images_match_diffusers(sd1_single_file, sampler):
    from ldm_jobs import load_pipeline

    ref, path = sd1_single_file
    pipe = load_pipeline(str(path))
    assert pipe.scheduler_config == _without_version(SD15_SCHEDULER)
    prompts, seeds = ["a red fox in the snow", "a castle"], [11, 12]
    ours = np.stack([np.asarray(im, dtype=np.float32) for im in pipe.generate(
        prompts, seeds=seeds, steps=6, guidance_scale=5.0, sampler=sampler, width=32, height=32)])
    ref.scheduler_config = dict(SD15_SCHEDULER)
    dpipe = diffusers_pipeline(ref, sampler)
    images = dpipe(prompts, num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    theirs = np.round(images * 255)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 and diff.mean() <= 0.5, (sampler, diff.max(), diff.mean())
