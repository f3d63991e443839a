"""Write a pipeline's parts as a diffusers-layout folder (``model_index.json``, one
sub-folder per component, safetensors weights), which this project, diffusers and
transformers all load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configs import TextConfig, UNetConfig, VAEConfig, to_dict
from .tokenizer import BOS_TOKEN, DATA_DIR, EOS_TOKEN

DIFFUSERS_VERSION = "0.30.0"  # the config format written; any later diffusers reads it


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()
               if not k.endswith("position_ids")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def text_config_json(config: TextConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        **to_dict(config),
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": config.hidden_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_folder(
    folder: str | Path,
    *,
    text_encoder: torch.nn.Module,
    text_config: TextConfig,
    unet: torch.nn.Module,
    unet_config: UNetConfig,
    vae: torch.nn.Module,
    vae_config: VAEConfig,
    scheduler_config: dict[str, Any],
    model_max_length: int = 77,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the folder (replacing one already there) and return its path."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_diffusers_version": DIFFUSERS_VERSION, **scheduler_config})
    _write_json(folder / "unet" / "config.json", {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **to_dict(unet_config)})
    _write_json(folder / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **to_dict(vae_config)})
    _write_json(folder / "text_encoder" / "config.json", text_config_json(text_config, dtype))
    _save_weights(unet, folder / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    _save_weights(vae, folder / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    _save_weights(text_encoder, folder / "text_encoder" / "model.safetensors", dtype)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(DATA_DIR / name, tokenizer / name)
    _write_json(tokenizer / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
        "do_lower_case": True, "errors": "replace",
    })
    _write_json(tokenizer / "special_tokens_map.json", {
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN})
    return folder
