"""Building blocks shared by the UNet and the VAE.

Module and attribute names follow diffusers' checkpoint keys (``conv1``, ``time_emb_proj``,
``to_q``, ``to_out.0``, ``ff.net.0.proj`` ...) so a diffusers state dict loads key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) timesteps -> (N, dim).

    Always computed in float32: timesteps up to 1000 lose too much precision in half.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * freqs[None, :]  # (N, half)
    sin_cos = (
        (torch.cos(angles), torch.sin(angles))
        if flip_sin_to_cos
        else (torch.sin(angles), torch.cos(angles))
    )
    emb = torch.cat(sin_cos, dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """The MLP after the sinusoidal embedding (``time_embedding.linear_1/linear_2``)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional time embedding added in between.

    ``temb_channels=None`` gives the VAE's variant (no ``time_emb_proj``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = (
            nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        )
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection only where the residual must change width
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE's variant: pad right/bottom by one first,
    which is what the original LDM autoencoder did (asymmetric, so weights depend on it)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to an explicit size, for odd skip shapes), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # the CUDA nearest kernel fails on huge non-contiguous (channels-last) inputs
        if x.numel() * 4 > 2**31:
            x = x.contiguous()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# On the CPU, for small float32 problems, a plain batched matmul-softmax-matmul beats
# SDPA's blocked (flash) kernel, whose fixed cost dominates when a whole score matrix
# fits in cache: measured 1.6x on cross-attention over 77 text tokens (tiny model).
# Above this many score elements the fused kernel's memory savings win; GPUs always use it.
CPU_MATH_ATTENTION_MAX_SCORES = 1 << 20


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, T, head_dim) tensors; ``mask`` (B, S),
    True for the keys each sample may attend to."""
    B, heads, T, d = q.shape
    S = k.shape[2]
    keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
    small = B * heads * T * S <= CPU_MATH_ATTENTION_MAX_SCORES
    if q.device.type != "cpu" or q.dtype != torch.float32 or not small:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    scores = torch.baddbmm(
        q.new_empty(B * heads, T, S), q.reshape(B * heads, T, d),
        k.reshape(B * heads, S, d).transpose(1, 2), beta=0.0, alpha=d**-0.5,
    )  # (B*heads, T, S)
    if keep is not None:
        scores = scores.view(B, heads, T, S).masked_fill(~keep, float("-inf")).view(B * heads, T, S)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * heads, S, d)).view(B, heads, T, d)


class Attention(nn.Module):
    """Multi-head attention over tokens (B, T, C); cross-attention when ``context`` is given.

    ``bias=False`` is the UNet transformer's q/k/v; the VAE uses biases everywhere.
    ``upcast`` runs the attention product in float32 (SD 2.x's ``upcast_attention``), which
    keeps half-precision softmax from overflowing.

    Cross-attention keys and values depend on the text alone, which stays the same for
    every denoising step: ``cache_context`` computes them once for a given context tensor,
    and ``forward`` reuses them whenever it is handed that very tensor again.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        # a ModuleList so the key is ``to_out.0`` as in diffusers (index 1 was a dropout)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self._kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, T, inner) -> (B, heads, T, head_dim), in float32 when upcasting
        B, T, inner = t.shape
        t = t.float() if self.upcast else t
        return t.view(B, T, self.heads, inner // self.heads).transpose(1, 2)

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._kv_cache
        if cache is not None and cache[0] is context:
            return cache[1], cache[2]
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def cache_context(self, context: torch.Tensor | None) -> None:
        """Keep this context's keys and values until called again (None: drop them)."""
        self._kv_cache = None
        if context is not None:
            self._kv_cache = (context, *self._keys_values(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        out_dtype = q.dtype
        B, T, inner = q.shape
        k, v = self._keys_values(context)
        h = attention(self._heads(q), k, v, context_mask)  # (B, heads, T, head_dim)
        h = h.transpose(1, 2).reshape(B, T, inner).to(out_dtype)
        return self.to_out[0](h)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over the H*W
    positions, residual. Keys: ``group_norm``, ``to_q/k/v``, ``to_out.0``."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half of it gates the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width; ``net.1`` (dropout in diffusers) is an Identity so the
    output layer keeps its key ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
