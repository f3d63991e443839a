"""Tiny random Stable Diffusion models built with diffusers/transformers: test oracles.

`make_reference(kind)` returns the diffusers components; `ours_from_reference` loads their
weights key-for-key into this project's modules. `save_diffusers_folder` writes a
diffusers-layout model folder (what users point `model:` at).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

CLIP_DIR = Path(__file__).resolve().parents[1] / "model" / "data" / "clip"

SD1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Each sampler name of CONTRACT.md and the diffusers scheduler it must match.
DIFFUSERS_SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}


@dataclass
class Reference:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict


def diffusers_scheduler(name: str, scheduler_config: dict):
    import diffusers

    cls_name, overrides = DIFFUSERS_SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config({**scheduler_config, **overrides})


def make_reference(kind: str = "sd1", seed: int = 0) -> Reference:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    if kind == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        )
        scheduler = dict(SD1_SCHEDULER)
    elif kind == "sd2v":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4, 4), use_linear_projection=True,
            norm_num_groups=16,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        )
        scheduler = {**SD1_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    else:
        raise ValueError(kind)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=32,
    )
    text_encoder = CLIPTextModel(text_config)
    # Spread the weights so every path contributes visibly (default inits are timid).
    for module in (unet, vae, text_encoder):
        for p in module.parameters():
            if p.ndim > 1:
                p.data.normal_(0.0, 1.0 / max(1.0, p[0].numel() ** 0.5))
    for m in (unet, vae, text_encoder):
        m.eval()
    tokenizer = CLIPTokenizer(
        str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"), model_max_length=77
    )
    return Reference(unet, vae, text_encoder, tokenizer, scheduler)


def ours_from_reference(ref: Reference, dtype: str = "float32"):
    from ldm_jobs.model.configs import TextConfig, UNetConfig, VAEConfig, from_dict
    from ldm_jobs.model.hashing import modules_hash
    from ldm_jobs.model.loading import assemble
    from ldm_jobs.model.text_encoder import CLIPTextModel
    from ldm_jobs.model.tokenizer import CLIPTokenizer
    from ldm_jobs.model.unet import UNet
    from ldm_jobs.model.vae import AutoencoderKL

    unet = UNet(from_dict(UNetConfig, dict(ref.unet.config)))
    unet.load_state_dict(ref.unet.state_dict(), strict=True)
    vae = AutoencoderKL(from_dict(VAEConfig, dict(ref.vae.config)))
    vae.load_state_dict(ref.vae.state_dict(), strict=True)
    text = CLIPTextModel(from_dict(TextConfig, ref.text_encoder.config.to_dict()))
    state = {k: v for k, v in ref.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    text.load_state_dict(state, strict=True)
    digest = modules_hash({"unet": unet, "vae": vae, "text_encoder": text})
    return assemble(CLIPTokenizer.default(), text, unet, vae, ref.scheduler_config,
                    name="tiny-test", digest=digest, device="cpu", dtype=dtype)


def diffusers_pipeline(ref: Reference, sampler: str, img2img: bool = False):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
        scheduler=diffusers_scheduler(sampler, ref.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_folder(ref: Reference, path: Path) -> Path:
    """A diffusers-layout model folder, as `save_pretrained` writes it."""
    path = Path(path)
    ref.unet.save_pretrained(path / "unet")
    ref.vae.save_pretrained(path / "vae")
    ref.text_encoder.save_pretrained(path / "text_encoder")
    tok = path / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_DIR / name, tok / name)
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", **ref.scheduler_config})
    )
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    return path
