"""The KL autoencoder of Stable Diffusion (diffusers' ``AutoencoderKL``).

Images in [-1, 1] <-> latents ``downsampling_factor`` times smaller. ``encode`` and ``decode``
work on unscaled latents; the pipeline multiplies / divides by ``scaling_factor``.
Module names match diffusers' keys, so a diffusers ``vae/`` state dict loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ConfigError, VAEConfig
from .layers import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D

# The autoencoder's norms use a smaller epsilon than the UNet's (fixed, not in the config).
EPS = 1e-6
# diffusers clamps the log-variance so exp() stays finite.
LOGVAR_RANGE = (-30.0, 20.0)


def _resnet(cin: int, cout: int, config: VAEConfig) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, None, config.norm_num_groups, EPS)


class MidBlock(nn.Module):
    """resnet -> single-head spatial self-attention -> resnet."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(channels, channels, config), _resnet(channels, channels, config)]
        )
        self.attentions = (
            nn.ModuleList([SpatialSelfAttention(channels, config.norm_num_groups, EPS)])
            if config.mid_block_add_attention
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """``layers_per_block`` resnets, then a (right/bottom padded) stride-2 conv."""

    def __init__(self, cin: int, cout: int, downsample: bool, config: VAEConfig):
        super().__init__()
        n = config.layers_per_block
        self.resnets = nn.ModuleList(
            _resnet(cin if i == 0 else cout, cout, config) for i in range(n)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nn.Module):
    """``layers_per_block + 1`` resnets, then nearest x2 and a conv."""

    def __init__(self, cin: int, cout: int, upsample: bool, config: VAEConfig):
        super().__init__()
        n = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            _resnet(cin if i == 0 else cout, cout, config) for i in range(n)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch = config.block_out_channels
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], i < last, config) for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[-1], eps=EPS)
        # mean and log-variance, stacked on the channel axis
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        rev = tuple(reversed(config.block_out_channels))
        last = len(rev) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], config)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rev[max(i - 1, 0)], rev[i], i < last, config) for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        # the mid block may have run upcast; continue in the up blocks' dtype
        x = x.to(self.conv_out.weight.dtype)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        check = getattr(config, "check", None)
        if check is not None:
            check()
        for i, c in enumerate(config.block_out_channels):
            if c % config.norm_num_groups:
                raise ConfigError(
                    f"VAE config block_out_channels[{i}]={c} is not divisible by "
                    f"norm_num_groups={config.norm_num_groups}"
                )
        self.config = config
        self.scaling_factor = float(config.scaling_factor)
        self.downsampling_factor = 2 ** (len(config.block_out_channels) - 1)
        latent2 = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(latent2, latent2, 1) if config.use_quant_conv else None
        lc = config.latent_channels
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled latent mean (what img2img uses with ``sample_mode="argmax"``)."""
        return self.encode_moments(x)[0]

    @staticmethod
    def sample(
        mean: torch.Tensor,
        logvar: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """A draw from N(mean, exp(logvar)), with the noise drawn as diffusers'
        ``randn_tensor`` does: in the mean's dtype on the generator's device (CPU generators
        stay on the CPU, then move), one draw per row when given one generator per row."""
        std = torch.exp(0.5 * logvar)
        noise = _randn_like(mean, generator)
        return mean + std * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> image, roughly in [-1, 1] (not clamped, as in diffusers)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _randn_like(
    like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    shape, dtype = like.shape, like.dtype
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator list has {len(generator)} entries for a batch of {shape[0]}"
            )
        rows = [_randn((1, *shape[1:]), g, like.device, dtype) for g in generator]
        return torch.cat(rows, dim=0)
    return _randn(shape, generator, like.device, dtype)


def _randn(
    shape, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
