"""Model configurations, read from diffusers' / transformers' ``config.json`` files.

One dataclass per component. Each is passed whole to the component's constructor, so a
single class builds every SD 1.x / 2.x shape. ``from_dict`` keeps the fields it knows and
ignores the rest (diffusers configs carry many keys that do not change the architecture);
values that would change the architecture in a way we do not implement are refused by
``check()`` with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field."""


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _tupled(v) for k, v in data.items() if k in names}
    config = cls(**kwargs)
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def per_level(value: Any, levels: int, name: str) -> tuple:
    """An int (same for every level) or one value per level, as diffusers allows."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ConfigError(f"{name} has {len(value)} entries for {levels} levels")
        return tuple(value)
    return (value,) * levels


@dataclasses.dataclass
class UNetConfig:
    """``UNet2DConditionModel`` config (SD 1.x / 2.x family)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' historical naming: in SD configs this is the number of heads
    # (unless num_attention_heads is given), an int or one per level.
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    transformer_layers_per_block: Any = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    upcast_attention: bool = False
    only_cross_attention: Any = False
    class_embed_type: Any = None
    # SDXL: "text_time", an embedding of the pooled text and the size/crop time ids added
    # to the timestep embedding
    addition_embed_type: Any = None
    addition_time_embed_dim: Any = None
    projection_class_embeddings_input_dim: Any = None
    time_cond_proj_dim: Any = None
    resnet_time_scale_shift: str = "default"
    center_input_sample: bool = False
    mid_block_type: Any = "UNetMidBlock2DCrossAttn"
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def heads(self) -> tuple:
        """Attention heads per level."""
        value = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_level(value, self.levels, "attention_head_dim")

    def transformer_depths(self) -> tuple:
        return per_level(self.transformer_layers_per_block, self.levels, "transformer_layers_per_block")

    def check(self) -> None:
        unsupported = {
            "class_embed_type": (self.class_embed_type, None),
            "time_cond_proj_dim": (self.time_cond_proj_dim, None),
            "resnet_time_scale_shift": (self.resnet_time_scale_shift, "default"),
            "center_input_sample": (self.center_input_sample, False),
            "only_cross_attention": (self.only_cross_attention, False),
            "mid_block_type": (self.mid_block_type, "UNetMidBlock2DCrossAttn"),
            "act_fn": (self.act_fn, "silu"),
        }
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ConfigError(f"UNet config {name}={value!r} is not supported (only {wanted!r})")
        if self.addition_embed_type not in (None, "text_time"):
            raise ConfigError(
                f"UNet config addition_embed_type={self.addition_embed_type!r} is not supported "
                "(only None or 'text_time')")
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, name), int):
                    raise ConfigError(f"UNet config {name} must be an integer with addition_embed_type 'text_time'")
        allowed_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        allowed_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, allowed_down),
            ("up_block_types", self.up_block_types, allowed_up),
        ):
            if len(types) != self.levels:
                raise ConfigError(f"UNet config {name} has {len(types)} entries for {self.levels} levels")
            for t in types:
                if t not in allowed:
                    raise ConfigError(f"UNet config {name} entry {t!r} is not one of {sorted(allowed)}")
        self.heads()
        self.transformer_depths()


@dataclasses.dataclass
class VAEConfig:
    """``AutoencoderKL`` config."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: Any = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def check(self) -> None:
        if self.act_fn != "silu":
            raise ConfigError(f"VAE config act_fn={self.act_fn!r} is not supported (only 'silu')")
        if self.shift_factor not in (None, 0, 0.0):
            raise ConfigError(f"VAE config shift_factor={self.shift_factor!r} is not supported")


@dataclasses.dataclass
class TextConfig:
    """transformers ``CLIPTextConfig`` (the fields that shape the model)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # where the pooled embedding is read (CLIPTextModelWithProjection): the first
    # eos_token_id, or, for configs with the legacy value 2, the highest token id
    eos_token_id: int = 49407
    projection_dim: int = 512

    def check(self) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text encoder hidden_act={self.hidden_act!r} is not one of ['gelu', 'quick_gelu']")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text encoder hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )


FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


def family_of(unet: dict[str, Any], text: dict[str, Any] | None) -> str:
    """Which family a model belongs to, from its UNet config and its (last) text encoder's.

    SDXL's UNet adds the "text_time" embedding: pooled text plus one sinusoid per time id,
    six for the base model (sizes and crop), five for the refiner (aesthetic score instead
    of the target size). SD 2.x reads OpenCLIP (exact GELU); SD 1.x OpenAI CLIP.
    """
    if unet.get("addition_embed_type") == "text_time":
        pooled = (text or {}).get("projection_dim", 0)
        per_id = unet.get("addition_time_embed_dim") or 1
        ids, rest = divmod(int(unet.get("projection_class_embeddings_input_dim", 0)) - int(pooled), int(per_id))
        if rest or ids not in (5, 6):
            raise ConfigError(
                f"UNet config projection_class_embeddings_input_dim={unet.get('projection_class_embeddings_input_dim')}"
                f" is neither SDXL's 6 nor the refiner's 5 time ids of {per_id} plus the pooled {pooled}")
        return "sdxl_refiner" if ids == 5 else "sdxl"
    if (text or {}).get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"
