"""The conditional UNet of Stable Diffusion 1.x / 2.x (diffusers' ``UNet2DConditionModel``).

One class builds every shape in the family from a ``UNetConfig``: any number of levels,
channels, heads per level, transformer depths, conv or linear projections. Module names
match diffusers' keys, so a diffusers ``unet/`` state dict loads with ``strict=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ConfigError, UNetConfig
from .layers import (
    Attention,
    Downsample2D,
    FeedForward,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU MLP; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask=None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input.

    SD 1.x projects with 1x1 convs (on the map), SD 2.x with Linear layers (on the tokens);
    the two are the same maths but the weights have different shapes, so both are kept.
    """

    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.linear = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                channels, heads, config.cross_attention_dim, config.upcast_attention
            )
            for _ in range(depth)
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask=None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.linear:
            h = self.proj_out(h)
        # (B, C, H, W), back in the layout the block was given: a channels-last input made
        # the permutes above free views, and stays channels-last for the convs after it.
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


def _resnet(cin: int, cout: int, config: UNetConfig, scale: float = 1.0) -> ResnetBlock2D:
    temb = config.block_out_channels[0] * 4
    return ResnetBlock2D(cin, cout, temb, config.norm_num_groups, config.norm_eps, scale)


class DownBlock(nn.Module):
    """One encoder level: ``layers_per_block`` resnets (each followed by a transformer in
    a CrossAttnDownBlock2D), then a stride-2 downsampler except at the last level.
    Returns the output and every intermediate map, which the decoder concatenates back."""

    def __init__(self, level: int, cin: int, config: UNetConfig):
        super().__init__()
        cout = config.block_out_channels[level]
        n = config.layers_per_block
        self.resnets = nn.ModuleList(
            _resnet(cin if i == 0 else cout, cout, config) for i in range(n)
        )
        if config.down_block_types[level] == "CrossAttnDownBlock2D":
            heads, depth = config.heads()[level], config.transformer_depths()[level]
            self.attentions = nn.ModuleList(
                Transformer2DModel(cout, heads, depth, config) for _ in range(n)
            )
        else:
            self.attentions = None
        if level < config.levels - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, config.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(self, x, temb, context, context_mask=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level (index ``i`` counted from the bottom): ``layers_per_block + 1``
    resnets, each taking the previous map concatenated with one skip, then an upsampler
    except at the top level."""

    def __init__(self, i: int, config: UNetConfig):
        super().__init__()
        rev = tuple(reversed(config.block_out_channels))
        cout = rev[i]
        cprev = rev[max(i - 1, 0)]  # width coming up from below
        cskip_last = rev[min(i + 1, len(rev) - 1)]  # the last skip is this level's input
        n = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            _resnet(
                (cprev if j == 0 else cout) + (cskip_last if j == n - 1 else cout), cout, config
            )
            for j in range(n)
        )
        if config.up_block_types[i] == "CrossAttnUpBlock2D":
            heads = tuple(reversed(config.heads()))[i]
            depth = tuple(reversed(config.transformer_depths()))[i]
            self.attentions = nn.ModuleList(
                Transformer2DModel(cout, heads, depth, config) for _ in range(n)
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if i < config.levels - 1 else None

    def forward(self, x, temb, context, skips: list[torch.Tensor], up_size, context_mask=None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = config.block_out_channels[-1]
        scale = config.mid_block_scale_factor
        self.resnets = nn.ModuleList([_resnet(c, c, config, scale), _resnet(c, c, config, scale)])
        heads, depth = config.heads()[-1], config.transformer_depths()[-1]
        self.attentions = nn.ModuleList([Transformer2DModel(c, heads, depth, config)])

    def forward(self, x, temb, context, context_mask=None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, context_mask)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """``forward(latents, timesteps, context) -> prediction`` (noise or v, per the model).

    ``context_mask`` (B, S), True for real keys, lets texts of different lengths share a
    batch: cross-attention skips the padding after each one's own chunks."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        check = getattr(config, "check", None)
        if check is not None:
            check()
        self.config = config
        ch = config.block_out_channels
        for level, c in enumerate(ch):
            if c % config.norm_num_groups:
                raise ConfigError(
                    f"UNet config block_out_channels[{level}]={c} is not divisible by "
                    f"norm_num_groups={config.norm_num_groups}"
                )
        k_in, k_out = config.conv_in_kernel, config.conv_out_kernel
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], k_in, padding=(k_in - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        # SDXL's "text_time": the pooled text and each time id's sinusoid, through an MLP
        self.add_embedding = None
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, ch[0] * 4)
        self.down_blocks = nn.ModuleList(
            DownBlock(level, ch[max(level - 1, 0)], config) for level in range(config.levels)
        )
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList(UpBlock(i, config) for i in range(config.levels))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, k_out, padding=(k_out - 1) // 2)

    def _time_embedding(self, timesteps, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, D), or (1, D) when every sample shares one timestep: the sinusoid and MLP
        then run once, and the resnets' (1, C, 1, 1) projections broadcast over the batch."""
        t = torch.as_tensor(timesteps, device=like.device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timesteps has shape {tuple(t.shape)}; expected [] or [{batch}]")
        c = self.config
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        # float32 sinusoids, then the MLP in the model's dtype
        return self.time_embedding(emb.to(like.dtype))

    @contextlib.contextmanager
    def cached_context(self, context: torch.Tensor) -> Iterator[None]:
        """Within the block, cross-attention reuses keys and values computed once from
        `context` (the same tensor object must be passed to every call): a sampler's
        steps all attend to the same text."""
        layers = [m.attn2 for m in self.modules() if isinstance(m, BasicTransformerBlock)]
        try:
            for attn in layers:
                attn.cache_context(context)
            yield
        finally:
            for attn in layers:
                attn.cache_context(None)

    def _added_embedding(self, pooled, time_ids, like: torch.Tensor) -> torch.Tensor:
        """SDXL: MLP(pooled text ++ sinusoids of each time id) -> (B, D)."""
        if pooled is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type 'text_time') needs pooled= and time_ids=")
        c = self.config
        B = time_ids.shape[0]
        time_embeds = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim,
                                         c.flip_sin_to_cos, c.freq_shift).reshape(B, -1)
        return self.add_embedding(torch.cat([pooled, time_embeds.to(pooled.dtype)], dim=-1).to(like.dtype))

    def forward(self, latents: torch.Tensor, timesteps, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, *,
                pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        temb = self._time_embedding(timesteps, latents.shape[0], latents)
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(pooled, time_ids, latents)  # (B, D)
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, context_mask)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context, context_mask)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips = skips[-n:]
            del skips[-n:]
            # upsample to the size of the next level's skip, so odd sizes round-trip
            up_size = skips[-1].shape[2:] if skips else None
            x = block(x, temb, context, level_skips, up_size, context_mask)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)
