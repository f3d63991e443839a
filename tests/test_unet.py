"""Parity of model.unet.UNet with diffusers' UNet2DConditionModel on tiny random shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_jobs.model.configs import ConfigError, UNetConfig, from_dict
from ldm_jobs.model.unet import UNet

TOL = 1e-4

SD1_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)
SD2_TINY = dict(
    sample_size=16,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    cross_attention_dim=24,
    norm_num_groups=8,
)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    # diffusers zero-inits nothing here, but its default init leaves small outputs;
    # fresh noise on every parameter makes every path contribute to the output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _pair(kwargs: dict, seed: int = 0) -> tuple[UNet2DConditionModel, UNet]:
    torch.manual_seed(seed)
    reference = UNet2DConditionModel(**kwargs).eval()
    _randomise(reference, seed)
    ours = UNet(from_dict(UNetConfig, dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    err = (a - b).abs().max().item()
    return err, err / b.abs().max().item()


@pytest.mark.parametrize("kwargs", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
@pytest.mark.parametrize("size", [(16, 16), (8, 12)], ids=["square", "rect"])
def test_matches_diffusers(kwargs, size):
    reference, ours = _pair(kwargs)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, *size, generator=g)
    context = torch.randn(2, 7, kwargs["cross_attention_dim"], generator=g)
    for timesteps in (torch.tensor([3.0, 801.0]), torch.tensor(500), 999):
        with torch.no_grad():
            want = reference(latents, timesteps, encoder_hidden_states=context).sample
            got = ours(latents, timesteps, context)
        assert want.abs().max() > 1e-2  # non-trivial output
        abs_err, rel_err = _rel(got, want)
        print(f"unet {size} t={timesteps}: max abs {abs_err:.2e} rel {rel_err:.2e}")
        assert rel_err <= TOL, (abs_err, rel_err)


def test_odd_latent_size_matches_diffusers():
    # 9x9 does not halve evenly: the upsampler must follow the skip's size
    reference, ours = _pair(SD1_TINY)
    latents = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(2))
    context = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(latents, 10, encoder_hidden_states=context).sample
        got = ours(latents, 10, context)
    assert _rel(got, want)[1] <= TOL


def test_timesteps_per_sample_differ():
    _, ours = _pair(SD1_TINY)
    latents = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    context = torch.randn(1, 5, 32).expand(2, -1, -1)
    with torch.no_grad():
        out = ours(latents, torch.tensor([1, 900]), context)
        same = ours(latents, torch.tensor([900]), context)
    assert not torch.allclose(out[0], out[1])
    assert torch.allclose(out[1], same[1], atol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        ours(latents, torch.tensor([1, 2, 3]), context)


def test_bad_groups_names_field():
    with pytest.raises(ConfigError, match="block_out_channels"):
        UNet(
            UNetConfig(
                block_out_channels=(30, 64),
                norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            )
        )


def test_sd15_keys_and_shapes_on_meta():
    with torch.device("meta"):
        ours = UNet(UNetConfig())
        reference = UNet2DConditionModel(
            **{
                "cross_attention_dim": 768,
                "attention_head_dim": 8,
                "block_out_channels": (320, 640, 1280, 1280),
            }
        )
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


@pytest.mark.parametrize("kwargs", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_bfloat16_close_to_float32(kwargs):
    # half precision runs end to end (time embedding cast, upcast attention) and stays close
    _, ours = _pair(kwargs)
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, kwargs["cross_attention_dim"], generator=g)
    with torch.no_grad():
        want = ours(latents, 700, context)
        got = ours.to(torch.bfloat16)(latents.bfloat16(), 700, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() / want.abs().max() < 0.1
