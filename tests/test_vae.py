"""Parity of model.vae.AutoencoderKL with diffusers' AutoencoderKL on tiny random shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE

from ldm_jobs.model.configs import ConfigError, VAEConfig, from_dict
from ldm_jobs.model.vae import AutoencoderKL

TOL = 1e-4

TWO_LEVELS = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
THREE_LEVELS = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.13025,
)


def _pair(kwargs: dict, seed: int = 0) -> tuple[ReferenceVAE, AutoencoderKL]:
    torch.manual_seed(seed)
    reference = ReferenceVAE(**kwargs).eval()
    # fresh noise on every weight so no path is negligible
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = AutoencoderKL(from_dict(VAEConfig, dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, name
    assert want.abs().max() > 1e-2, f"{name} is trivial"
    abs_err = (got - want).abs().max().item()
    rel_err = abs_err / want.abs().max().item()
    print(f"vae {name}: max abs {abs_err:.2e} rel {rel_err:.2e}")
    assert rel_err <= TOL, (name, abs_err, rel_err)


@pytest.mark.parametrize("kwargs", [TWO_LEVELS, THREE_LEVELS], ids=["2-level", "3-level"])
def test_matches_diffusers(kwargs):
    reference, ours = _pair(kwargs)
    f = ours.downsampling_factor
    assert f == 2 ** (len(kwargs["block_out_channels"]) - 1)
    assert ours.scaling_factor == pytest.approx(kwargs.get("scaling_factor", 0.18215))
    images = torch.rand(2, 3, 4 * f, 6 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = reference.encode(images).latent_dist
        mean, logvar = ours.encode_moments(images)
        _check("mean", mean, dist.mean)
        _check("logvar", logvar, dist.logvar)
        _check("encode", ours.encode(images), dist.mean)
        want = dist.sample(torch.Generator().manual_seed(7))
        got = ours.sample(mean, logvar, torch.Generator().manual_seed(7))
        _check("sample", got, want)
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        want = dist.sample([torch.Generator().manual_seed(s) for s in (3, 4)])
        _check("sample per-row", ours.sample(mean, logvar, gens), want)
        _check("decode", ours.decode(mean), reference.decode(dist.mean).sample)
    assert mean.shape == (2, 4, 4, 6)


def test_logvar_is_clamped():
    _, ours = _pair(TWO_LEVELS)
    with torch.no_grad():
        ours.quant_conv.bias[4:] += 100.0  # the log-variance half
        _, logvar = ours.encode_moments(torch.zeros(1, 3, 8, 8))
    assert logvar.max().item() == 20.0


def test_sample_rows_depend_on_their_own_generator():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    a = AutoencoderKL.sample(
        mean, logvar, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    )
    b = AutoencoderKL.sample(mean[:1], logvar[:1], [torch.Generator().manual_seed(5)])
    assert torch.equal(a[:1], b)
    with pytest.raises(ValueError, match="generator"):
        AutoencoderKL.sample(mean, logvar, [torch.Generator()])


def test_no_quant_convs_and_no_attention():
    config = VAEConfig(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    vae = AutoencoderKL(config)
    keys = vae.state_dict().keys()
    assert not any(
        k.startswith(("quant_conv", "post_quant_conv")) or ".attentions." in k for k in keys
    )
    assert vae.decode(vae.encode(torch.zeros(1, 3, 8, 8))).shape == (1, 3, 8, 8)


def test_sd_keys_and_shapes_on_meta():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
        reference = ReferenceVAE(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_bad_groups_names_field():
    with pytest.raises(ConfigError, match="block_out_channels"):
        AutoencoderKL(VAEConfig(block_out_channels=(12, 16), norm_num_groups=8))
