"""LoRA per row against diffusers' load_lora_weights + set_adapters (PEFT), seed for seed.

Each family gets two LoRA files written the way the ecosystem writes them: a kohya /
sd-scripts file (attention, LoCon convolutions on ResNets, samplers and the time
projection, and the text encoder; one alpha for all, as sd-scripts writes it) and a
diffusers / PEFT file (UNet and text encoder, alpha in its adapter metadata). A batch
mixing no LoRA, one, the other at 0.6, both, and a negative weight must give, row by row,
the image diffusers gives for that row alone.
"""

from __future__ import annotations

import warnings

import lora_files as lf
import numpy as np
import pytest
import torch
from tiny_sd import diffusers_pipeline, make_reference, ours_from_reference

PROMPTS = ["a red circle", "a blue square, top left", "green star", "a small dot", "a wave"]
NEGATIVES = ["", "blurry", "", "dark", ""]
SEEDS = [11, 12, 13, 14, 15]
SIDE, STEPS, SAMPLER = 32, 3, "euler"
ROWS = lf.Rows(PROMPTS, NEGATIVES, SEEDS, SIDE, STEPS, SAMPLER)


# SD 2.x (v-prediction, linear projections, another CLIP) runs the same checks, slowly
@pytest.fixture(scope="module", params=["sd1", pytest.param("sd2v", marks=pytest.mark.slow)])
def family(request, tmp_path_factory):
    """(ref, ours, diffusers pipeline with adapters "a", "b", "c" loaded, their paths);
    "c" is a kohya file for the text encoder alone."""
    warnings.filterwarnings("ignore")
    ref = make_reference(request.param)
    ours = ours_from_reference(ref)
    folder = tmp_path_factory.mktemp(f"loras-{request.param}")
    kohya = lf.kohya_state(lf.random_peft(ref.unet, lf.UNET_ATTENTION + lf.UNET_LOCON, 4, 1),
                           lf.random_peft(ref.text_encoder, lf.TEXT, 4, 2), alphas={"": 2.0})
    a = lf.save_safetensors(folder / "style_a.safetensors", kohya)
    b = lf.save_peft(folder / "subject_b.safetensors",
                     lf.random_peft(ref.unet, lf.UNET_ATTENTION, 8, 3),
                     lf.random_peft(ref.text_encoder, lf.TEXT, 8, 4), alpha=4.0, rank=8)
    c = lf.save_safetensors(folder / "words_c.safetensors", lf.kohya_state(
        None, lf.random_peft(ref.text_encoder, lf.TEXT, 4, 9)))
    pipe = diffusers_pipeline(ref, SAMPLER)
    paths = {"a": str(a), "b": str(b), "c": str(c)}
    for name, path in paths.items():
        pipe.load_lora_weights(path, adapter_name=name)
    return ref, ours, pipe, paths


MIXED = [{}, {"a": 1.0}, {"b": 0.6}, {"a": 1.0, "b": 0.6}, {"a": -0.7}]


def test_mixed_batch_matches_diffusers_row_by_row(family):
    ref, ours, pipe, paths = family
    rows = [{paths[k]: w for k, w in row.items()} for row in MIXED]
    mine = ROWS.ours(ours, rows)
    plain = ROWS.ours(ours, None)
    for i, adapters in enumerate(MIXED):
        lf.assert_close(mine[i], ROWS.diffusers(pipe, i, adapters), f"row {i} {adapters}")
        if adapters:  # a LoRA silently ignored would pass the comparison above for
            # nothing: diffusers itself must draw a different image with it
            assert lf.mean_change(mine[i], plain[i]) > 3, f"row {i}: the LoRA changed nothing"
        else:
            assert np.array_equal(mine[i], plain[i])


def test_shared_set_is_fused_and_restored_bit_for_bit(family):
    """A whole batch on one set patches the weights for the call, then restores them."""
    ref, ours, pipe, paths = family
    before = {k: v.clone() for k, v in {**ours.unet.state_dict(),
                                         **ours.text_encoder.state_dict()}.items()}
    shared = {"a": 0.8, "b": -0.5}
    mine = ROWS.ours(ours, [{paths[k]: w for k, w in shared.items()}] * 3, n=3)
    for i in range(3):
        lf.assert_close(mine[i], ROWS.diffusers(pipe, i, shared), f"row {i}")
    after = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_text_encoder_lora_reaches_prompt_and_negative(family):
    """A text-encoder-only LoRA changes the image (prompt and negative both read with it),
    and the text cache never hands its embedding to a row without it, or back."""
    ref, ours, pipe, paths = family
    ROWS.check_text_encoder_lora(ours, pipe, paths["c"], "c", "text-encoder LoRA")
