"""SDXL base and refiner original single files (Stability's sgm layout).

The files are written from tiny diffusers/transformers models in the original layout
(``conditioner.embedders.0.transformer.*`` CLIP ViT-L, ``conditioner.embedders.1.model.*``
OpenCLIP with fused ``in_proj`` and a transposed ``text_projection``, the refiner's bigG
at ``conditioner.embedders.0.model.*``, ``model.diffusion_model.*`` with ``label_emb``,
``first_stage_model.*``). That they are genuine is checked by diffusers' own
``single_file_utils`` converters giving back the very tensors they were written from; then
our loader must infer every shape and give diffusers' images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_jobs import load_pipeline
from ldm_jobs.model import convert_ldm, weights
from tests.test_sdxl import (
    PROMPTS,
    SEEDS,
    SIZE,
    _init_images,
    as_array,
    assert_close_images,
    theirs_batched,
)
from tests.tiny_sdxl import (
    diffusers_sdxl_pipeline,
    make_sd1_single_file_model,
    make_sdxl,
    original_state_dict,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

PREFIX_2 = {"sdxl": "conditioner.embedders.1.model.", "sdxl_refiner": "conditioner.embedders.0.model."}


@pytest.fixture(scope="module", params=["sdxl", "sdxl_refiner"])
def single_file(request, tmp_path_factory):
    ref = make_sdxl(request.param, seed=7)
    state = original_state_dict(ref.unet, ref.vae, ref.text_encoder, ref.text_encoder_2, family=request.param)
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.safetensors"
    save_file(state, str(path))
    return ref, state, path


def _assert_same(got: dict, want: dict, what: str) -> None:
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys())[:5])
    bad = [k for k in want if not torch.equal(got[k].reshape(want[k].shape), want[k])]
    assert not bad, (what, bad[:5])


def _clip_keys(state: dict) -> dict:
    return {f"text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


def test_files_are_genuine_by_diffusers_converters(single_file):
    ref, state, _ = single_file
    _assert_same(sfu.convert_ldm_unet_checkpoint(state, dict(ref.unet.config)), ref.unet.state_dict(), "unet")
    _assert_same(sfu.convert_ldm_vae_checkpoint(state, dict(ref.vae.config)), ref.vae.state_dict(), "vae")
    _assert_same(sfu.convert_open_clip_checkpoint(ref.text_encoder_2, state, prefix=PREFIX_2[ref.kind]),
                 ref.text_encoder_2.state_dict(), "text_encoder_2")
    if ref.text_encoder is not None:
        converted = sfu.convert_ldm_clip_checkpoint(state)
        _assert_same(_clip_keys(converted), _clip_keys(ref.text_encoder.state_dict()), "text_encoder")


def test_shapes_infer_the_configs_and_weights(single_file):
    ref, _, path = single_file
    converted = weights.single_file_state_dicts(path)
    components = {"unet": ref.unet, "vae": ref.vae, "text_encoder_2": ref.text_encoder_2}
    if ref.text_encoder is not None:
        components["text_encoder"] = ref.text_encoder
    assert set(converted) == set(components)
    for name, module in components.items():
        config, state = converted[name]
        if name == "text_encoder":
            state, want = _clip_keys(state), _clip_keys(module.state_dict())
        else:
            want = module.state_dict()
        _assert_same(state, want, name)
    unet_config = converted["unet"][0]
    for key in ("block_out_channels", "down_block_types", "up_block_types", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim"):
        assert list(np.atleast_1d(unet_config[key])) == list(np.atleast_1d(ref.unet.config[key])), key
    assert list(unet_config["attention_head_dim"]) == list(ref.unet.config.attention_head_dim)
    assert list(unet_config["transformer_layers_per_block"]) == list(ref.unet.config.transformer_layers_per_block)
    assert converted["text_encoder_2"][0]["projection_dim"] == ref.text_encoder_2.config.projection_dim
    assert converted["vae"][0]["scaling_factor"] == 0.13025


def test_single_file_images_match_diffusers(single_file):
    ref, _, path = single_file
    pipe = load_pipeline(str(path))
    assert pipe.family == ref.kind
    assert pipe.scheduler_config == convert_ldm.OFFICIAL_SCHEDULERS[ref.kind]
    dpipe = diffusers_sdxl_pipeline(ref, "euler")
    if ref.kind == "sdxl":
        ours = as_array(pipe.generate(PROMPTS, seeds=SEEDS, steps=4, guidance_scale=5.0, sampler="euler",
                                      width=SIZE, height=SIZE))
        assert_close_images(ours, theirs_batched(dpipe, PROMPTS, SEEDS, guidance_scale=5.0), "sdxl single file")
    else:
        inits = _init_images(2)
        ours = as_array(pipe.generate(PROMPTS, seeds=SEEDS, steps=4, guidance_scale=5.0, sampler="euler",
                                      width=SIZE, height=SIZE, init_images=inits, strength=0.5))
        reference = theirs_batched(dpipe, PROMPTS, SEEDS, image=inits, guidance_scale=5.0, strength=0.5)
        assert_close_images(ours, reference, "refiner single file")


def test_sd1_file_is_genuine_too():
    """The SD 1.x layout the scheduler tests write, by the same converters."""
    ref = make_sd1_single_file_model(seed=3)
    state = original_state_dict(ref.unet, ref.vae, ref.text_encoder, family="sd1")
    _assert_same(sfu.convert_ldm_unet_checkpoint(state, dict(ref.unet.config)), ref.unet.state_dict(), "unet")
    _assert_same(sfu.convert_ldm_vae_checkpoint(state, dict(ref.vae.config)), ref.vae.state_dict(), "vae")
    _assert_same(_clip_keys(sfu.convert_ldm_clip_checkpoint(state)), _clip_keys(ref.text_encoder.state_dict()),
                 "text_encoder")


def test_a_tower_of_another_family_is_reported(single_file, tmp_path):
    ref, state, _ = single_file
    extra = dict(state, **{"cond_stage_model.model.token_embedding.weight": torch.zeros(3, 4)})
    save_file(extra, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(weights.CheckpointError, match="cond_stage_model.model.token_embedding.weight"):
        load_pipeline(str(tmp_path / "mixed.safetensors"))
