"""Rename rules from the original CompVis single-file layout to the diffusers layout.

An original Stable Diffusion checkpoint keeps all three networks in one flat dict under
the prefixes in ``COMPONENT_PREFIXES``. Our modules use diffusers' / transformers' key
names, so loading one is a rename (plus a reshape or a split for a few tensors). This
module only *plans* that: for each key of our model it names the file key it comes from
and the small operation to apply (``Ref``), and it infers every component's config from
tensor shapes. Nothing here reads tensor data, so a plan for the full SD 1.5 shape is
checked in microseconds from shapes alone; ``weights.py`` executes plans tensor by tensor.

A rename function returns ``None`` for a key it does not know; such keys are reported
as unexpected, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Shape = tuple[int, ...]

# Where each network lives in an original checkpoint. Order matters: the first match wins.
COMPONENT_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",  # SD 1.x: OpenAI CLIP, HF layout inside
    "open_clip": "cond_stage_model.model.",  # SD 2.x: OpenCLIP layout, fused q/k/v
    # SDXL (Stability's sgm): CLIP ViT-L in HF layout, OpenCLIP bigG; the refiner has bigG alone
    "sdxl_clip": "conditioner.embedders.0.transformer.",
    "sdxl_open_clip": "conditioner.embedders.1.model.",
    "refiner_open_clip": "conditioner.embedders.0.model.",
}

# family -> pipeline text component -> (key group above, how that tower is read: "clip" is
# HF layout, "open_clip" the whole OpenCLIP tower with its projection, "open_clip_cut" SD
# 2.x's without its last block)
TEXT_TOWERS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("text_encoder", "clip")},
    "sd2": {"text_encoder": ("open_clip", "open_clip_cut")},
    "sdxl": {"text_encoder": ("sdxl_clip", "clip"), "text_encoder_2": ("sdxl_open_clip", "open_clip")},
    "sdxl_refiner": {"text_encoder_2": ("refiner_open_clip", "open_clip")},
}


def single_file_family(groups: Mapping[str, Mapping[str, Shape]]) -> str:
    """The family of a single file from which text towers it holds."""
    if groups.get("sdxl_open_clip"):
        return "sdxl"
    if groups.get("refiner_open_clip"):
        return "sdxl_refiner"
    if groups.get("open_clip") and not groups.get("text_encoder"):
        return "sd2"
    return "sd1"

# Keys of an original checkpoint that carry no weights of the three networks: the
# training-time noise schedule buffers, EMA copies (SD files ship the EMA weights as the
# main ones when pruned), the VAE's training loss, and derived index buffers.
IGNORED_KEYS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_alphas_cumprod"
    r"|posterior_\w+|logvar|lvlb_weights|model_ema\..*|first_stage_model\.loss\..*"
    r"|(cond_stage_model|conditioner\.embedders\.\d)\.transformer\.(text_model\.)?embeddings\.position_ids"
    r"|cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)"
    r"|conditioner\.embedders\.\d\.model\.(logit_scale|attn_mask))$"
)


@dataclass(frozen=True)
class Ref:
    """Where one tensor of our model comes from: a file key and an operation (``OPS``)."""

    key: str
    op: str = "copy"
    part: int = 0  # for "third": which of q, k, v


def _conv_to_linear(t: torch.Tensor, part: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1])


def _third(t: torch.Tensor, part: int) -> torch.Tensor:
    n = t.shape[0] // 3
    return t[part * n : (part + 1) * n]


# op -> (apply to a tensor, apply to a shape); the shape half lets plans be checked
# before any data is read.
OPS: dict[str, tuple[Callable[[torch.Tensor, int], torch.Tensor], Callable[[Shape, int], Shape]]] = {
    "copy": (lambda t, part: t, lambda s, part: s),
    # the VAE's mid attention: 1x1 convs [C, C, 1, 1] in the original, Linear [C, C] in ours
    "conv_to_linear": (_conv_to_linear, lambda s, part: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s),
    # OpenCLIP's fused in_proj: rows [q; k; v]
    "third": (_third, lambda s, part: (s[0] // 3, *s[1:])),
    # OpenCLIP's text_projection is applied as x @ P: [width, proj]; a Linear holds P^T
    "transpose": (lambda t, part: t.T.contiguous(), lambda s, part: tuple(reversed(s))),
}

Plan = dict[str, Ref]  # our key -> source


# --------------------------------------------------------------------------- UNet

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL's text_time embedding
    "label_emb.0.2": "add_embedding.linear_2",
}
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_BLOCK = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_MIDDLE = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}


def _resnet(prefix: str, rest: str) -> str | None:
    module, _, param = rest.rpartition(".")
    name = _RESNET.get(module)
    return f"{prefix}.{name}.{param}" if name else None


def rename_unet_key(key: str, layers_per_block: int) -> str | None:
    """Original UNet key (prefix removed) -> diffusers key, or None if unknown."""
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := _MIDDLE_BLOCK.match(key):
        target = _MIDDLE.get(int(m[1]))
        if target is None:
            return None
        return _resnet(target, m[2]) if ".resnets." in target else f"{target}.{m[2]}"
    m = _BLOCK.match(key)
    if m is None:
        return None
    kind, index, part, rest = m[1], int(m[2]), int(m[3]), m[4]
    per_level = layers_per_block + 1  # resnets, then a down/upsampler slot
    if kind == "input_blocks":
        if index == 0:
            return None
        level, slot = divmod(index - 1, per_level)
        if part == 0 and rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        stem = f"down_blocks.{level}"
    else:
        level, slot = divmod(index, per_level)
        stem = f"up_blocks.{level}"
        # the upsampler follows the resnet (part 1) or the attention (part 2)
        if part in (1, 2) and rest.startswith("conv."):
            return f"{stem}.upsamplers.0.conv.{rest[5:]}"
    if part == 0:
        return _resnet(f"{stem}.resnets.{slot}", rest)
    if part == 1:
        return f"{stem}.attentions.{slot}.{rest}"
    return None


def _count(shapes: Mapping[str, Shape], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in shapes if (m := regex.match(k))})


def unet_config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config inferred from original-layout shapes.

    Raises KeyError/ValueError on a layout it cannot read; the caller names the file.
    """
    n_inputs = _count(shapes, r"^input_blocks\.(\d+)\.")
    levels = _count(shapes, r"^input_blocks\.(\d+)\.0\.op\.weight$") + 1
    # input blocks: conv_in, then per level L resnets and (except last) one downsampler
    layers, remainder = divmod(n_inputs - levels, levels)
    if remainder or layers < 1:
        raise ValueError(f"{n_inputs} input blocks do not form {levels} UNet levels")
    channels, attention, depths = [], [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * (layers + 1)}"
        channels.append(shapes[f"{first}.0.out_layers.3.weight"][0])
        attention.append(f"{first}.1.proj_in.weight" in shapes)
        depths.append(_count(shapes, rf"^{re.escape(first)}\.1\.transformer_blocks\.(\d+)\.") or 1)
    attn_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj) and len(proj[0]) == 2
    # Heads are not stored in the weights; each family has its convention:
    # SD 1.x (1x1-conv projections) 8 heads everywhere, SD 2.x (linear) 64-wide heads.
    heads: Any = [c // 64 for c in channels] if linear else 8
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    sdxl = "label_emb.0.0.weight" in shapes
    # SDXL's added embedding: pooled text and 256-wide sinusoids of the time ids
    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": shapes["label_emb.0.0.weight"][1]} if sdxl else {}
    return {
        **added,
        "sample_size": 128 if sdxl else 96 if linear else 64,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "cross_attention_dim": shapes[attn_keys[0]][1] if attn_keys else 768,
        "use_linear_projection": linear,
        # SD 2.x overflows in half precision without it (diffusers' SD 2.1 config sets it)
        "upcast_attention": linear and not sdxl,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
    }


def unet_plan(keys: list[str], layers_per_block: int) -> tuple[Plan, list[str]]:
    """(our key -> Ref, file keys no rule knows)."""
    plan, unknown = {}, []
    for key in keys:
        new = rename_unet_key(key, layers_per_block)
        if new is None:
            unknown.append(key)
        else:
            plan[new] = Ref(key)
    return plan, unknown


# --------------------------------------------------------------------------- VAE

_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_rules(levels: int) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    return [
        (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"),
        (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$"),
         lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
        # the decoder's up blocks are numbered from the lowest resolution in diffusers
        (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$"),
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"),
        (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$"),
         lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$"),
         lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"),
        (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$"),
         lambda m: f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN[m[2]]}.{m[3]}"),
        (re.compile(r"^(encoder|decoder)\.norm_out\.(.+)$"), lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (re.compile(r"^((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.(weight|bias)$"),
         lambda m: m[0]),
    ]


def vae_config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config inferred from original-layout shapes."""
    levels = _count(shapes, r"^encoder\.down\.(\d+)\.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": _count(shapes, r"^encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": shapes["post_quant_conv.weight"][1],
        "sample_size": 512,
        "scaling_factor": 0.18215,  # SD 1.x and 2.x alike; not stored in the weights
    }


def vae_plan(keys: list[str], levels: int) -> tuple[Plan, list[str]]:
    rules = _vae_rules(levels)
    plan, unknown = {}, []
    for key in keys:
        for regex, target in rules:
            m = regex.match(key)
            if m:
                new = target(m).replace("nin_shortcut", "conv_shortcut")
                is_attn_weight = ".mid_block.attentions.0." in new and new.endswith(".weight")
                is_conv_proj = is_attn_weight and "group_norm" not in new
                plan[new] = Ref(key, "conv_to_linear" if is_conv_proj else "copy")
                break
        else:
            unknown.append(key)
    return plan, unknown


# ----------------------------------------------------------------- text encoders

def clip_config_from_shapes(shapes: Mapping[str, Shape], hidden_act: str = "quick_gelu") -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` from HF-layout shapes."""
    shapes = {_with_text_model(k): v for k, v in shapes.items()}
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(shapes, r"^text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": width // 64,  # CLIP text towers use 64-wide heads
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "hidden_act": hidden_act,
    }


def _with_text_model(key: str) -> str:
    # CLIPTextModel's files use ``text_model.``-prefixed keys; some writers dropped the
    # level. The projection of CLIPTextModelWithProjection sits beside it, never inside.
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def clip_plan(keys: list[str]) -> tuple[Plan, list[str]]:
    return {_with_text_model(k): Ref(k) for k in keys}, []


def fit_text_model_level(plan: Plan, model_keys: set[str]) -> Plan:
    """Spell a plan's keys with or without the ``text_model.`` level, as the module does.

    transformers 5 reports CLIPTextModel keys without it (it renames on load); files
    and older versions keep it. Plans always carry it, modules may not.
    """
    if any(k.startswith("text_model.") for k in model_keys):
        return {_with_text_model(k): r for k, r in plan.items()}
    return {k.removeprefix("text_model."): r for k, r in plan.items()}


_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
# the image-text projection and temperature serve CLIP's contrastive training, not SD
_OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_plan(keys: list[str], cut: bool = True) -> tuple[Plan, list[str]]:
    """OpenCLIP text tower -> CLIPTextModel(WithProjection) keys.

    SD 2.x (``cut``) conditions on the penultimate layer's output (then ``ln_final``), so
    the last residual block is left out: a CLIPTextModel one layer shorter gives exactly
    that. SDXL keeps the whole tower and its projection (for the pooled embedding).
    """
    last = _count({k: () for k in keys}, r"^transformer\.resblocks\.(\d+)\.") - 1 if cut else -1
    plan, unknown = {}, []
    for key in keys:
        if key == "text_projection" and not cut:
            plan["text_projection.weight"] = Ref(key, "transpose")
            continue
        if key in _OPEN_CLIP_UNUSED:
            continue
        if key in _OPEN_CLIP_TOP:
            plan[_OPEN_CLIP_TOP[key]] = Ref(key)
        elif m := _IN_PROJ.match(key):
            if int(m[1]) != last:
                for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    plan[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = Ref(key, "third", part)
        elif (m := _RESBLOCK.match(key)) and m[2] in _OPEN_CLIP_LAYER:
            if int(m[1]) != last:
                plan[f"text_model.encoder.layers.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = Ref(key)
        else:
            unknown.append(key)
    return plan, unknown


def open_clip_config_from_shapes(shapes: Mapping[str, Shape], cut: bool = True) -> dict[str, Any]:
    vocab, width = shapes["token_embedding.weight"]
    whole = {} if cut else {
        "projection_dim": shapes["text_projection"][1],
        "eos_token_id": 2,  # as SDXL's text_encoder_2/config.json: pooled at the highest id
    }
    return {
        **whole,
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": _count(shapes, r"^transformer\.resblocks\.(\d+)\.") - (1 if cut else 0),
        "num_attention_heads": width // 64,
        "max_position_embeddings": shapes["positional_embedding"][0],
        "hidden_act": "gelu",  # OpenCLIP uses exact GELU, OpenAI CLIP quick_gelu
    }


# how each kind of text tower (TEXT_TOWERS) is read: (config from shapes, plan from keys)
TOWER_READERS: dict[str, tuple[Callable, Callable]] = {
    "clip": (clip_config_from_shapes, clip_plan),
    "open_clip_cut": (open_clip_config_from_shapes, open_clip_plan),
    "open_clip": (lambda shapes: open_clip_config_from_shapes(shapes, cut=False),
                  lambda keys: open_clip_plan(keys, cut=False)),
}


# --------------------------------------------------------------------- scheduler

# SD 1.x's numbers with every key set (leading spacing for all samplers): the schedule of
# the built-in and random models. Single files use OFFICIAL_SCHEDULERS instead.
SD1_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Each family's official ``scheduler_config.json``, as the hub's folders have it (the
# ``_diffusers_version`` aside). A single-file checkpoint uses its family's, and keys a
# file never set stay unset, so each sampler takes its own diffusers default for them, as
# ``from_config`` does: SD 1.5's and SD 2.1's files have no ``timestep_spacing`` (Euler and
# DPM++ then space ``linspace``, DDIM and PNDM ``leading``); SDXL's says ``leading``.
_SD_SCHEDULER_BASE: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
OFFICIAL_SCHEDULERS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5
    "sd1": {"_class_name": "PNDMScheduler", **_SD_SCHEDULER_BASE},
    # stabilityai/stable-diffusion-2-1: SD 2.x single files are mostly the 768-px
    # v-prediction models (diffusers assumes the same); pass ``config=`` for SD 2.x base
    "sd2": {"_class_name": "DDIMScheduler", **_SD_SCHEDULER_BASE, "prediction_type": "v_prediction"},
    # stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_SD_SCHEDULER_BASE,
             "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
             "timestep_spacing": "leading", "use_karras_sigmas": False},
}
OFFICIAL_SCHEDULERS["sdxl_refiner"] = OFFICIAL_SCHEDULERS["sdxl"]
