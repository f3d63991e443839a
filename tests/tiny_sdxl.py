"""Tiny random SDXL models built with diffusers + transformers, and original-layout files.

`make_sdxl(kind)` builds the diffusers components of a tiny SDXL base or refiner (the
second text encoder a ``CLIPTextModelWithProjection`` with the hub's legacy
``eos_token_id: 2``); `save_sdxl_folder` writes them in diffusers layout, as
``save_pretrained`` does; `original_state_dict` writes any tiny model in the original
single-file layout (CompVis/SGM key names), which the tests prove genuine by running
diffusers' own ``single_file_utils`` converters on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.tiny_sd import CLIP_DIR

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (content as on the hub)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


@dataclass
class SDXLReference:
    kind: str  # "sdxl" or "sdxl_refiner"
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module
    tokenizer: object | None
    tokenizer_2: object
    scheduler_config: dict


def _spread(*modules: torch.nn.Module) -> None:
    """Weights wide enough that every path shows in the output (default inits are timid)."""
    for module in modules:
        for p in module.parameters():
            if p.ndim > 1:
                p.data.normal_(0.0, 1.0 / max(1.0, p[0].numel() ** 0.5))
        module.eval()


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
        sample_size=32, **config)


def make_sd1_single_file_model(seed: int = 0):
    """A tiny SD 1.x with the family's conventions (8 heads, 64-wide CLIP heads, 32 norm
    groups), so the config inferred from its single file's shapes is its own."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_sd import Reference, make_reference

    ref = make_reference("sd1", seed)
    torch.manual_seed(seed)
    ref.unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8)
    ref.vae = tiny_vae()
    ref.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=1, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407))
    _spread(ref.unet, ref.vae, ref.text_encoder)
    return Reference(ref.unet, ref.vae, ref.text_encoder, ref.tokenizer, ref.scheduler_config)


def make_sdxl(kind: str = "sdxl", seed: int = 0, force_upcast: bool = True) -> SDXLReference:
    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    refiner = kind == "sdxl_refiner"
    width_1, width_2, proj = 64, 128, 96
    context = width_2 if refiner else width_1 + width_2
    # SDXL's shape in small, with its conventions (so a single file's shapes tell the
    # config): no attention at the first level, 64-wide heads, per-level depths, linear
    # projections, 32 norm groups, the text_time embedding (pooled text + 256-wide
    # sinusoids per time id)
    unet = UNet2DConditionModel(
        sample_size=4, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, cross_attention_dim=context,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=proj + (5 if refiner else 6) * 256,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=force_upcast)
    # text_encoder_2/config.json on the hub keeps CLIP's legacy ids (eos_token_id 2)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width_2, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=2, hidden_act="gelu", projection_dim=proj,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    text_1 = None if refiner else CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width_1, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=1, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    _spread(*(m for m in (unet, vae, text_1, text_2) if m is not None))
    vocab, merges = str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt")
    tokenizer = None if refiner else CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    return SDXLReference(kind, unet, vae, text_1, text_2, tokenizer, tokenizer_2, dict(SDXL_SCHEDULER))


def save_sdxl_folder(ref: SDXLReference, path: Path) -> Path:
    """A diffusers-layout SDXL folder, each component written by its own save_pretrained."""
    path = Path(path)
    ref.unet.save_pretrained(path / "unet")
    ref.vae.save_pretrained(path / "vae")
    ref.text_encoder_2.save_pretrained(path / "text_encoder_2")
    ref.tokenizer_2.save_pretrained(str(path / "tokenizer_2"))
    refiner = ref.kind == "sdxl_refiner"
    if not refiner:
        ref.text_encoder.save_pretrained(path / "text_encoder")
        ref.tokenizer.save_pretrained(str(path / "tokenizer"))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(ref.scheduler_config))
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0", "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def diffusers_sdxl_pipeline(ref: SDXLReference, sampler: str, img2img: bool = False):
    import diffusers

    from tests.tiny_sd import diffusers_scheduler

    refiner = ref.kind == "sdxl_refiner"
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img or refiner else diffusers.StableDiffusionXLPipeline
    kwargs = dict(requires_aesthetics_score=True) if refiner else {}
    pipe = cls(vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
               tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, unet=ref.unet,
               scheduler=diffusers_scheduler(sampler, ref.scheduler_config),
               force_zeros_for_empty_prompt=not refiner, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------- the original single-file layout
# Written here from the published layouts (CompVis ldm / Stability sgm); diffusers'
# converters are the check that it is the real one.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def original_unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    n = layers_per_block
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)$", key):
        index = {"resnets": 2 * int(m[2]), "attentions": 1}[m[1]]
        return f"middle_block.{index}.{_resnet_param(m[3]) if m[1] == 'resnets' else m[3]}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", key)
    side, level, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (n + 1)}.0.op.{rest.removeprefix('conv.')}"
        block = 1 + level * (n + 1) + i
        return f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet_param(rest) if kind == 'resnets' else rest}"
    if kind == "upsamplers":
        slot = 2 if up_has_attention[level] else 1
        return f"output_blocks.{level * (n + 1) + n}.{slot}.{rest}"
    block = level * (n + 1) + i
    return f"output_blocks.{block}.{0 if kind == 'resnets' else 1}.{_resnet_param(rest) if kind == 'resnets' else rest}"


def _resnet_param(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    return f"{_RESNET[module]}.{param}"


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_vae(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                t = t[:, :, None, None]  # the original's 1x1 convs
        out[new] = t
    return out


def original_open_clip(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: fused in_proj, transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()
             if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].T.contiguous(),
           "logit_scale": torch.tensor(4.6052)}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in sorted(layers):
        p = f"encoder.layers.{i}."
        for ours, theirs in names.items():
            for param in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}.{param}"] = state[f"{p}{ours}.{param}"]
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [state[f"{p}self_attn.{q}_proj.{param}"] for q in "qkv"])
    return out


def _hf_clip(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Files keep CLIPTextModel's ``text_model.`` level (transformers 5 hides it in memory)."""
    return {f"text_model.{k.removeprefix('text_model.')}": v for k, v in model.state_dict().items()}


def original_state_dict(unet, vae, text_encoder=None, text_encoder_2=None, family: str = "sdxl"):
    """The whole model in the original single-file layout of its family."""
    config = unet.config
    up_attention = [t == "CrossAttnUpBlock2D" for t in config.up_block_types]
    sd = {f"model.diffusion_model.{original_unet_key(k, config.layers_per_block, up_attention)}": v
          for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in original_vae(vae.state_dict(), len(vae.config.block_out_channels)).items()}
    if family == "sd1":
        sd |= {f"cond_stage_model.transformer.{k}": v for k, v in _hf_clip(text_encoder).items()}
    elif family == "sdxl":
        sd |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _hf_clip(text_encoder).items()}
        sd |= {f"conditioner.embedders.1.model.{k}": v for k, v in original_open_clip(text_encoder_2).items()}
    elif family == "sdxl_refiner":
        sd |= {f"conditioner.embedders.0.model.{k}": v for k, v in original_open_clip(text_encoder_2).items()}
    # what real files carry beside the networks
    sd["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}
