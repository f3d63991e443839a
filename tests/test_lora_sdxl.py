"""LoRA per row on SDXL against diffusers' StableDiffusionXLPipeline load_lora_weights +
set_adapters (PEFT), seed for seed.

The files are written the way the ecosystem writes SDXL ones: a kohya / sd-scripts file
(UNet attention and LoCon convolutions under their original-layout names,
`lora_unet_input_blocks_4_1_...`, and both text encoders, `lora_te1_` / `lora_te2_`), a
diffusers / PEFT file (`unet.` and `text_encoder_2.`, alpha in its adapter metadata) and
a kohya file for the second text encoder alone. A batch mixing no LoRA, one, the other at
0.6 and both must give, row by row, the image diffusers gives for that row alone.
"""

from __future__ import annotations

import warnings

import lora_files as lf
import numpy as np
import pytest

from ldm_jobs import load_pipeline
from tests.tiny_sd import make_reference
from tests.tiny_sdxl import diffusers_sdxl_pipeline, make_sdxl, original_unet_key, save_sdxl_folder

PROMPTS = ["a red circle", "a blue square, top left", "green star", "a small dot"]
NEGATIVES = ["", "blurry", "", "dark"]  # "" is all zeros on SDXL, LoRA or not
SEEDS = [21, 22, 23, 24]
SIDE, STEPS, SAMPLER = 32, 2, "euler"
ROWS = lf.Rows(PROMPTS, NEGATIVES, SEEDS, SIDE, STEPS, SAMPLER, empty_negative_as_none=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(ours, diffusers pipeline with adapters "a", "b", "c" loaded, their paths)."""
    warnings.filterwarnings("ignore")
    ref = make_sdxl("sdxl", seed=3)
    folder = tmp_path_factory.mktemp("lora-sdxl")
    ours = load_pipeline(str(save_sdxl_folder(ref, folder / "tiny-sdxl")))
    up_attention = [t.startswith("CrossAttn") for t in ref.unet.config.up_block_types]

    def original(module: str) -> str:
        layers = ref.unet.config.layers_per_block
        return original_unet_key(f"{module}.weight", layers, up_attention).removesuffix(".weight")

    a = lf.save_safetensors(folder / "style_a.safetensors", lf.kohya_sdxl_state(
        lf.random_peft(ref.unet, lf.UNET_ATTENTION + ("conv1", "conv2"), 4, 1),
        lf.random_peft(ref.text_encoder, lf.TEXT, 4, 2),
        lf.random_peft(ref.text_encoder_2, lf.TEXT, 4, 3), alpha=2.0, original_name=original))
    b = lf.save_peft_sdxl(folder / "subject_b.safetensors",
                          lf.random_peft(ref.unet, lf.UNET_ATTENTION, 8, 4),
                          text_2_state=lf.random_peft(ref.text_encoder_2, lf.TEXT, 8, 5),
                          alpha=4.0, rank=8)
    c = lf.save_safetensors(folder / "words_c.safetensors", lf.kohya_sdxl_state(
        text_2_state=lf.random_peft(ref.text_encoder_2, lf.TEXT, 4, 6, strength=2.0),
        alpha=4.0))
    pipe = diffusers_sdxl_pipeline(ref, SAMPLER)
    paths = {"a": str(a), "b": str(b), "c": str(c)}
    for name, path in paths.items():
        pipe.load_lora_weights(path, adapter_name=name)
    return ours, pipe, paths


MIXED = [{}, {"a": 1.0}, {"b": 0.6}, {"a": 1.0, "b": 0.6}]


def test_mixed_batch_matches_diffusers_row_by_row(sdxl):
    ours, pipe, paths = sdxl
    mine = ROWS.ours(ours, [{paths[k]: w for k, w in row.items()} for row in MIXED])
    plain = ROWS.ours(ours, None)
    for i, adapters in enumerate(MIXED):
        lf.assert_close(mine[i], ROWS.diffusers(pipe, i, adapters), f"row {i} {adapters}")
        if adapters:  # a LoRA silently ignored must not pass
            assert lf.mean_change(mine[i], plain[i]) > 3, f"row {i}: the LoRA changed nothing"
        else:
            assert np.array_equal(mine[i], plain[i])


def test_second_text_encoder_lora_alone_and_the_text_cache(sdxl):
    """A LoRA on text_encoder_2 alone changes the image (context and pooled embedding),
    and the text cache never hands its embedding to a row without it, or back."""
    ours, pipe, paths = sdxl
    ROWS.check_text_encoder_lora(ours, pipe, paths["c"], "c", "text-encoder-2 LoRA")


def test_sd1_lora_on_sdxl_names_the_file_and_key(sdxl, tmp_path):
    ours, _, _ = sdxl
    sd1 = make_reference("sd1")
    path = lf.save_safetensors(tmp_path / "sd1_style.safetensors", lf.kohya_state(
        lf.random_peft(sd1.unet, lf.UNET_ATTENTION, 4, 1)))
    with pytest.raises(ValueError, match=r"sd1_style\.safetensors: lora_unet_\w+") as error:
        ours.generate(PROMPTS[:1], seeds=SEEDS[:1], steps=1, width=SIDE, height=SIDE,
                      loras=[{str(path): 1.0}])
    assert "no module" in str(error.value) or "do not fit" in str(error.value)
