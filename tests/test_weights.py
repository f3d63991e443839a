"""Checkpoint loading: original single files and diffusers folders, strict checks, refusals.

The oracles are independent of our rename rules: tiny models built with the ORIGINAL
CompVis ``ldm`` modules (their state dicts are the single-file layout), diffusers' own
conversion functions, and diffusers / transformers models for the forward passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles must never reach a network

from ldm_jobs.model import checkpoint_files, hashing, weights  # noqa: E402
from ldm_jobs.model.weights import CheckpointError, load_components  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("ldm")
if importlib.util.find_spec("pytorch_lightning") is None:
    # ldm's AutoencoderKL subclasses LightningModule only for training hooks; the
    # modules and state dict keys are plain torch
    sys.modules["pytorch_lightning"] = types.SimpleNamespace(LightningModule=torch.nn.Module)

from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL as LdmAutoencoderKL  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel as LdmUNet  # noqa: E402

CLIP_DATA = Path(__file__).resolve().parents[1] / "model" / "data" / "clip"
RTOL = 1e-4


# runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape the model
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "use_linear_projection": False, "upcast_attention": False,
    "transformer_layers_per_block": 1,
}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max().clamp_min(1e-6))


# ------------------------------------------------------------------ oracle models

def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Spread every weight: ldm zero-inits its attention outputs, which would hide the heads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.device.type != "meta":
                p.copy_(torch.randn(p.shape, generator=g) / max(1.0, p[0].numel() ** 0.5))
    return module


def ldm_unet(sd2: bool = False, meta: bool = False, full: bool = False) -> torch.nn.Module:
    if full:  # SD 1.5 / 2.1 shapes
        kwargs = dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=[4, 2, 1], context_dim=1024 if sd2 else 768)
    elif sd2:  # 64-wide heads need channels in multiples of 64
        kwargs = dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=[1, 2], context_dim=[64, 64], transformer_depth=2)
    else:
        kwargs = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=[1], context_dim=32)
    heads = dict(num_head_channels=64, use_linear_in_transformer=True) if sd2 else dict(num_heads=8)
    torch.manual_seed(1)
    with torch.device("meta" if meta else "cpu"):
        unet = LdmUNet(image_size=8, in_channels=4, out_channels=4, use_spatial_transformer=True,
                       legacy=False, **kwargs, **heads)
    return randomize(unet, 1).eval()


def ldm_vae(meta: bool = False, full: bool = False) -> torch.nn.Module:
    ch, mult = (128, [1, 2, 4, 4]) if full else (32, [1, 2])
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=ch,
              ch_mult=mult, num_res_blocks=2 if full else 1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(2)
    with torch.device("meta" if meta else "cpu"):
        vae = LdmAutoencoderKL(dd, {"target": "torch.nn.Identity"}, 4)
    return randomize(vae, 2).eval()


def clip_config(full: bool = False):
    if full:  # SD 1.x's ViT-L/14 text tower
        return transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768)
    return transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=1, vocab_size=49408, max_position_embeddings=77)


def hf_clip(meta: bool = False, full: bool = False) -> torch.nn.Module:
    torch.manual_seed(3)
    with torch.device("meta" if meta else "cpu"):
        clip = transformers.CLIPTextModel(clip_config(full))
    return randomize(clip, 3).eval()


def single_file_dict(unet, vae, clip) -> dict[str, torch.Tensor]:
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    # files keep CLIPTextModel's ``text_model.`` level (transformers 5 hides it in memory)
    sd |= {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
           for k, v in clip.state_dict().items()}
    # what real files carry beside the three networks: all must be ignored
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return {k: v.contiguous().clone() for k, v in sd.items()}


def diffusers_builder(component: str, config: dict):
    if component == "unet":
        return diffusers.UNet2DConditionModel(**config), config
    if component == "vae":
        return diffusers.AutoencoderKL(**config), config
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), config


# -------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def originals():
    return {"sd1": ldm_unet(), "sd2": ldm_unet(sd2=True), "vae": ldm_vae(), "clip": hf_clip()}


@pytest.fixture(scope="module")
def sd1_files(originals, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    sd = single_file_dict(originals["sd1"], originals["vae"], originals["clip"])
    save_file(sd, root / "tiny-sd1.safetensors")
    torch.save({"state_dict": sd, "global_step": 7}, root / "tiny-sd1.ckpt")
    return root / "tiny-sd1.safetensors", root / "tiny-sd1.ckpt", sd


def unet_inputs(channels_context: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 5, channels_context, generator=g)
    return x, t, ctx


def check_unet(ldm_model, model, context_dim: int, ours: bool):
    x, t, ctx = unet_inputs(context_dim)
    with torch.no_grad():
        want = ldm_model(x, t, context=[ctx, ctx])  # a list: ldm indexes it per transformer depth
        got = model(x, t, ctx) if ours else model(x, t, encoder_hidden_states=ctx).sample
    assert close(got, want), (got - want).abs().max()


def check_vae(ldm_model, model, ours: bool):
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        mean = ldm_model.encode(x).mean
        got_mean = model.encode(x) if ours else model.encode(x).latent_dist.mean
        assert close(got_mean, mean)
        decoded = ldm_model.decode(mean)
        got = model.decode(mean) if ours else model.decode(mean).sample
    assert close(got, decoded)


def check_clip(hf_model, model, ours: bool):
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf_model(ids).last_hidden_state
        got = model(ids) if ours else model(ids).last_hidden_state
    assert close(got, want)


# ------------------------------------------------------------ 1. single files

def test_single_file_matches_diffusers_conversion(sd1_files):
    path, _, sd = sd1_files
    converted = weights.single_file_state_dicts(path)
    unet_config, unet_sd = converted["unet"]
    vae_config, vae_sd = converted["vae"]
    references = {
        "unet": sfu.convert_ldm_unet_checkpoint(sd, unet_config),
        "vae": sfu.convert_ldm_vae_checkpoint(sd, vae_config),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(sd),
    }
    references["text_encoder"].pop("text_model.embeddings.position_ids")
    for component, reference in references.items():
        ours = converted[component][1]
        assert ours.keys() == reference.keys(), component
        for key, tensor in reference.items():
            assert torch.equal(ours[key], tensor), (component, key)
    assert unet_config["attention_head_dim"] == 8 and unet_config["use_linear_projection"] is False
    assert unet_config["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet_config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert (unet_config["block_out_channels"], unet_config["layers_per_block"]) == ([32, 64], 1)
    assert unet_config["cross_attention_dim"] == 32
    assert vae_config["block_out_channels"] == [32, 64] and vae_config["latent_channels"] == 4
    assert converted["text_encoder"][0]["num_attention_heads"] == 1


def _has_ours() -> bool:
    return all(importlib.util.find_spec(f"ldm_jobs.model.{m}") for m in ("unet", "vae", "text_encoder", "tokenizer"))


def test_single_file_into_diffusers_modules(sd1_files, originals):
    # load_components without the tokenizer: infer configs, build, check, fill
    path = sd1_files[0]
    problems = weights._Problems()
    parts, kind = weights._single_file_parts(path, checkpoint_files.open_source(path), {}, problems)
    models, _ = weights._load_parts(parts, path, "cpu", torch.float32, diffusers_builder, problems)
    assert kind == "sd1"  # the family
    check_unet(originals["sd1"], models["unet"], 32, ours=False)
    check_vae(originals["vae"], models["vae"], ours=False)
    check_clip(originals["clip"], models["text_encoder"], ours=False)
    assert not any(p.requires_grad for p in models["unet"].parameters())


@pytest.mark.skipif(not _has_ours(), reason="our modules are not all written yet")
@pytest.mark.parametrize("which", [0, 1], ids=["safetensors", "ckpt"])
def test_single_file_into_our_modules(sd1_files, originals, which):
    path = sd1_files[which]
    parts = load_components(path)
    check_unet(originals["sd1"], parts.unet, 32, ours=True)
    check_vae(originals["vae"], parts.vae, ours=True)
    check_clip(originals["clip"], parts.text_encoder, ours=True)
    assert parts.scheduler_config == weights.ldm.OFFICIAL_SCHEDULERS["sd1"]
    for module in (parts.unet, parts.vae, parts.text_encoder):
        assert all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
        assert not module.training
    assert parts.tokenizer(["a cat"]).shape == (1, 77)


def test_sd2_style_unet(originals, tmp_path):
    sd = single_file_dict(originals["sd2"], originals["vae"], originals["clip"])
    save_file(sd, tmp_path / "sd2.safetensors")
    converted = weights.single_file_state_dicts(tmp_path / "sd2.safetensors")
    config, state = converted["unet"]
    assert config["use_linear_projection"] is True
    assert config["attention_head_dim"] == [1, 2]  # 64-wide heads: channels / 64
    assert config["transformer_layers_per_block"] == 2
    reference = sfu.convert_ldm_unet_checkpoint(sd, config)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    model, _ = diffusers_builder("unet", config)
    model.load_state_dict(state, strict=True)
    check_unet(originals["sd2"], model.eval(), 64, ours=False)
    if importlib.util.find_spec("ldm_jobs.model.unet"):
        ours, _ = weights.build_ours("unet", config)
        ours.load_state_dict(state, strict=True)
        check_unet(originals["sd2"], ours.eval(), 64, ours=True)


def test_config_folder_overrides_inferred_configs(sd1_files, originals, tmp_path):
    path = sd1_files[0]
    inferred = weights.single_file_state_dicts(path)
    folder = tmp_path / "config"
    for component, (config, _) in inferred.items():
        (folder / component).mkdir(parents=True)
        if component == "unet":
            config = dict(config, attention_head_dim=4)  # same shapes, other maths
        (folder / component / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir()
    scheduler = dict(weights.ldm.SD1_SCHEDULER, prediction_type="v_prediction")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text("{}")
    parts = load_components(path, config=folder, builder=diffusers_builder)
    assert parts.unet.config.attention_head_dim == 4
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(AssertionError):  # 4 heads instead of 8: no longer the original
        check_unet(originals["sd1"], parts.unet, 32, ours=False)
    plain = load_components(path, builder=diffusers_builder)
    assert plain.content_hash != parts.content_hash  # the configs shaped the model too


def test_open_clip_text_tower_matches_diffusers_conversion():
    width, layers = 64, 3
    g = torch.Generator().manual_seed(8)
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes |= {block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
                   block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
                   block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
                   block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
                   block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
                   block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,)}
    sd = {f"cond_stage_model.model.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    source = checkpoint_files.DictSource(Path("sd2.ckpt"), sd)
    problems = weights._Problems()
    plan, unknown = weights.ldm.open_clip_plan(list(shapes))
    config = weights.ldm.open_clip_config_from_shapes(shapes)
    assert unknown == [] and config["num_hidden_layers"] == layers - 1 and config["hidden_act"] == "gelu"
    ours = dict(weights._materialize(weights._prefixed(plan, "cond_stage_model.model."), source, "cpu", torch.float32))
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=width))
    reference = sfu.convert_open_clip_checkpoint(text_model, sd)
    reference.pop("text_projection.weight", None)
    # SD 2.x uses the penultimate layer: diffusers drops it by name (layer 23 of 24)
    reference = {k: v for k, v in reference.items() if f"layers.{layers - 1}." not in k}
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], v) for k, v in reference.items())
    with torch.device("meta"):
        model, _ = diffusers_builder("text_encoder", config)
    weights.check_plan("text_encoder", weights.fit_plan("text_encoder", plan, model),
                       checkpoint_files.DictSource(Path("m"), {k[len("cond_stage_model.model."):]: v for k, v in sd.items()}),
                       model, problems, weights._derived_buffers(model))
    assert (problems.missing, problems.unexpected, problems.misshaped) == ([], [], [])


def test_float16_cast_while_loading(sd1_files):
    path = sd1_files[0]
    problems = weights._Problems()
    parts, _ = weights._single_file_parts(path, checkpoint_files.open_source(path), {}, problems)
    models, _ = weights._load_parts(parts, path, "cpu", torch.float16, diffusers_builder, problems)
    dtypes = {p.dtype for m in models.values() for p in m.parameters()}
    assert dtypes == {torch.float16}


# ------------------------------------------------------- 2. full SD shapes on meta

def _meta_problems(sd: dict[str, torch.Tensor], builder) -> tuple[weights._Problems, dict]:
    source = checkpoint_files.DictSource(Path("sd-meta.safetensors"), sd)
    problems = weights._Problems()
    parts, _ = weights._single_file_parts(source.path, source, {}, problems)
    for component, part in parts.items():
        with torch.device("meta"):
            model, _ = builder(component, part.config)
        plan = weights.fit_plan(component, part.plan, model)
        weights.check_plan(component, plan, source, model, problems, weights._derived_buffers(model))
    return problems, parts


@pytest.mark.parametrize("builder", ["diffusers", "ours"])
def test_sd15_full_shape_maps_without_gaps(builder):
    if builder == "ours" and not _has_ours():
        pytest.skip("our modules are not all written yet")
    sd = single_file_dict(ldm_unet(meta=True, full=True), ldm_vae(meta=True, full=True),
                          hf_clip(meta=True, full=True))
    problems, parts = _meta_problems(sd, diffusers_builder if builder == "diffusers" else weights.build_ours)
    assert (problems.missing, problems.unexpected, problems.misshaped) == ([], [], [])
    assert parts["unet"].config == SD15_UNET
    assert parts["text_encoder"].config["num_attention_heads"] == 12
    assert parts["vae"].config["block_out_channels"] == [128, 256, 512, 512]


def test_sd21_full_shape_unet_maps_without_gaps():
    unet = ldm_unet(sd2=True, meta=True, full=True)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    config = weights.ldm.unet_config_from_shapes(shapes)
    assert config["attention_head_dim"] == [5, 10, 20, 20] and config["cross_attention_dim"] == 1024
    plan, unknown = weights.ldm.unet_plan(list(shapes), config["layers_per_block"])
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    problems = weights._Problems()
    weights.check_plan("unet", plan, checkpoint_files.DictSource(Path("m"), unet.state_dict()), model, problems)
    assert (unknown, problems.missing, problems.unexpected, problems.misshaped) == ([], [], [], [])


@pytest.mark.skipif(not _has_ours(), reason="our modules are not all written yet")
def test_diffusers_sd15_layout_is_ours():
    with torch.device("meta"):
        theirs = {
            "unet": diffusers.UNet2DConditionModel(),
            "vae": diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                                           down_block_types=("DownEncoderBlock2D",) * 4,
                                           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2),
            "text_encoder": transformers.CLIPTextModel(clip_config(full=True)),
        }
    problems = weights._Problems()
    for component, model in theirs.items():
        source = checkpoint_files.DictSource(Path(component), model.state_dict())
        config = dict(model.config) if component != "text_encoder" else model.config.to_dict()
        with torch.device("meta"):
            ours, _ = weights.build_ours(component, config)
        plan = weights.fit_plan(component, weights._folder_plan(source), ours)
        weights.check_plan(component, plan, source, ours, problems)
    assert (problems.missing, problems.unexpected, problems.misshaped) == ([], [], [])


# ------------------------------------------------------------ 3. bad checkpoints

def test_read_state_dict_both_formats(sd1_files):
    path, ckpt, sd = sd1_files
    for file in (path, ckpt):
        read = checkpoint_files.read_state_dict(file)
        assert read.keys() == sd.keys()
        assert all(torch.equal(read[k], v) for k, v in sd.items())


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_components(path, builder=diffusers_builder)
    message = str(info.value)
    assert path.name in message
    return message


def test_truncated_safetensors(sd1_files, tmp_path):
    data = sd1_files[0].read_bytes()
    for size in (len(data) * 2 // 3, 5):  # body cut, header cut
        bad = tmp_path / f"cut{size}.safetensors"
        bad.write_bytes(data[:size])
        assert "safetensors" in _load_error(bad)


def test_truncated_and_garbage_ckpt(sd1_files, tmp_path):
    data = sd1_files[1].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert "not a readable checkpoint" in _load_error(tmp_path / "cut.ckpt")
    assert "not a plain weights file" in _load_error(tmp_path / "junk.pt")


def test_missing_file(tmp_path):
    assert "no such weights file" in _load_error(tmp_path / "nothing.safetensors")


def test_wrong_missing_and_unexpected_keys_in_one_error(sd1_files, tmp_path):
    sd = dict(sd1_files[2])
    sd["model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"] = torch.zeros(32, 7)
    del sd["first_stage_model.decoder.conv_out.bias"]
    del sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    sd["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    sd["some_other_model.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    message = _load_error(tmp_path / "bad.safetensors")
    assert "2 missing, 2 unexpected, 1 mis-shaped" in message
    assert "vae: decoder.conv_out.bias" in message
    assert "final_layer_norm.weight" in message
    assert "model.diffusion_model.input_blocks.1.0.extra.weight" in message
    assert "some_other_model.weight" in message
    assert "emb_layers.1.weight: file [32, 7] vs model [32, 128]" in message


def test_long_lists_are_truncated_with_counts(sd1_files, tmp_path):
    sd = {k: v for k, v in sd1_files[2].items() if "decoder.up" not in k}
    save_file(sd, tmp_path / "novae.safetensors")
    message = _load_error(tmp_path / "novae.safetensors")
    assert "more)" in message and len(message) < 3000


def test_not_a_stable_diffusion_file(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert "no unet weights" in _load_error(tmp_path / "other.safetensors")


class _Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path, writer):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "hook": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        # a bare pickle, not torch's zip format (plain pickle cannot hold tensors)
        path.write_bytes(pickle.dumps({"hook": _Evil(marker)}, protocol=2))
    message = _load_error(path)
    assert "refused" in message and "not a plain weights file" in message
    assert "system" in message  # names what it would have called
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        checkpoint_files.read_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------- 4. diffusers folders

def tiny_diffusers_models():
    torch.manual_seed(6)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    return unet.eval(), vae.eval(), hf_clip()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    unet, vae, clip = tiny_diffusers_models()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae", safe_serialization=False)  # the .bin path too
    clip.save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_DATA / name, root / "tokenizer" / name)
    (root / "scheduler").mkdir()
    scheduler = dict(weights.ldm.SD1_SCHEDULER, _class_name="DDIMScheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, (unet, vae, clip)


def test_diffusers_folder_loads_into_diffusers_modules(diffusers_folder):
    root, (unet, vae, clip) = diffusers_folder
    assert (root / "vae" / "diffusion_pytorch_model.bin").is_file()
    configs = weights._folder_configs(root)
    parts = {c: weights._Part(configs[c], weights._folder_plan(s), s)
             for c, s in ((c, checkpoint_files.open_source(weights._folder_weights(root, c, torch.float32)))
                          for c in ("unet", "vae", "text_encoder"))}
    models, _ = weights._load_parts(parts, root, "cpu", torch.float32, diffusers_builder)
    for component, reference in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        got, want = models[component].state_dict(), reference.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], v) for k, v in want.items()), component


@pytest.mark.skipif(not _has_ours(), reason="our modules are not all written yet")
def test_diffusers_folder_into_our_modules(diffusers_folder):
    root, (unet, vae, clip) = diffusers_folder
    parts = load_components(root)
    assert parts.scheduler_config["_class_name"] == "DDIMScheduler"
    assert parts.name == "tiny-sd"
    x, t, ctx = unet_inputs(64)
    with torch.no_grad():
        assert close(parts.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
        image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
        mean = vae.encode(image).latent_dist.mean
        assert close(parts.vae.encode(image), mean)
        assert close(parts.vae.decode(mean), vae.decode(mean).sample)
    check_clip(clip, parts.text_encoder, ours=True)
    ids = parts.tokenizer(["a photo of a cat"])
    assert ids.shape == (1, 77)


def test_content_hash_follows_the_weights(diffusers_folder, tmp_path):
    root, _ = diffusers_folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    files = {f"{c}/weights": weights._folder_weights(copy, c, torch.float32) for c in ("unet", "vae")}
    before = hashing.files_hash(files)
    assert before == hashing.files_hash(
        {f"{c}/weights": weights._folder_weights(root, c, torch.float32) for c in ("unet", "vae")})
    unet_file = files["unet/weights"]
    sd = checkpoint_files.read_state_dict(unet_file)
    sd["conv_in.bias"] = sd["conv_in.bias"] + 1e-3
    save_file(sd, unet_file)
    assert hashing.files_hash(files) != before


def test_the_hash_made_beside_the_load_is_the_files_hash(diffusers_folder):
    root, _ = diffusers_folder
    loaded = load_components(root)  # hashes on a thread while the weights load
    files = {f"{c}/weights": weights._folder_weights(root, c, torch.float32)
             for c in ("unet", "vae", "text_encoder")} | weights._config_files(root)
    assert loaded.content_hash == hashing.files_hash(files)


def test_a_failed_load_stops_its_hash_thread(diffusers_folder, tmp_path):
    root, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    vae_file = weights._folder_weights(broken, "vae", torch.float32)
    # copies: the file may be memory-mapped, and it is rewritten below
    sd = {k: v.clone() for k, v in checkpoint_files.read_state_dict(vae_file).items()}
    del sd["decoder.conv_out.weight"]
    if vae_file.suffix == ".safetensors":
        save_file(sd, vae_file)
    else:
        torch.save(sd, vae_file)
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):  # the load's error
        load_components(broken)
    assert not [t for t in threading.enumerate() if t.name == "ldm-content-hash"]
    stop = threading.Event()
    stop.set()
    with pytest.raises(hashing.HashCancelled):
        hashing.files_hash({"vae": vae_file}, stop)


def test_missing_folder_parts(diffusers_folder, tmp_path):
    root, _ = diffusers_folder
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_components(broken, builder=diffusers_builder)
    (broken / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_components(broken)
