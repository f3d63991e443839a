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
    addition_embed_type: Any = None
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
            "addition_embed_type": (self.addition_embed_type, None),
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

    def check(self) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text encoder hidden_act={self.hidden_act!r} is not one of ['gelu', 'quick_gelu']")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text encoder hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
