"""Prompt editing with LoRA per row, against diffusers: the row's adapters loaded and set
(PEFT, unfused), each step's text encoded by diffusers' own ``encode_prompt`` with them
(so a text-encoder LoRA reaches every scheduled text and the negative), and the
embeddings swapped between steps by ``callback_on_step_end``. The rows share one batch
with a row without LoRA or edits."""

from __future__ import annotations

import warnings

import lora_files as lf
import numpy as np
import torch
from test_prompts_oracle import one_thread  # noqa: F401 (an autouse fixture)
from tiny_sd import diffusers_pipeline, make_reference, ours_from_reference

SIDE, STEPS, SAMPLER = 32, 4, "euler"


@torch.no_grad()
def reference(pipe, texts, negative, seed, adapters):
    """diffusers' image whose prompt at step k is ``texts[k]``, ``adapters`` set."""
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters(list(adapters), list(adapters.values()))
    else:
        pipe.disable_lora()
    embeds = [pipe.encode_prompt(text, "cpu", 1, True, negative_prompt=negative) for text in texts]

    def swap(_, i, t, tensors):
        return {} if i + 1 >= len(texts) else {"prompt_embeds": torch.cat(embeds[i + 1][::-1])}

    out = pipe(prompt_embeds=embeds[0][0], negative_prompt_embeds=embeds[0][1],
               num_inference_steps=STEPS, guidance_scale=7.5, height=SIDE, width=SIDE,
               generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np",
               callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    return (out[0] * 255).round().astype(np.uint8)


def test_lora_rows_with_prompt_edits_match_diffusers(tmp_path):
    warnings.filterwarnings("ignore")
    ref = make_reference("sd1")
    ours = ours_from_reference(ref)
    path = str(lf.save_safetensors(tmp_path / "style.safetensors", lf.kohya_state(
        lf.random_peft(ref.unet, lf.UNET_ATTENTION, 4, 1), lf.random_peft(ref.text_encoder, lf.TEXT, 4, 2),
        alphas={"": 2.0})))
    pipe = diffusers_pipeline(ref, SAMPLER)
    pipe.load_lora_weights(path, adapter_name="style")
    prompts = ["a [red:blue:1] circle", "a castle", "a [cat|dog] x"]
    texts = [["a red circle"] * 2 + ["a blue circle"] * 2, ["a castle"] * 4,
             ["a cat x", "a cat x", "a dog x", "a cat x"]]
    negatives, seeds = ["blurry", "", "dark"], [1, 2, 3]
    loras = [{path: 1.0}, {}, {path: 0.6}]
    mine = ours.generate(prompts, seeds=seeds, negative_prompts=negatives, steps=STEPS,
                         guidance_scale=7.5, sampler=SAMPLER, width=SIDE, height=SIDE,
                         prompt_syntax="a1111", loras=loras)
    for i, image in enumerate(mine):
        adapters = {"style": loras[i][path]} if loras[i] else {}
        expected = reference(pipe, texts[i], negatives[i], seeds[i], adapters)
        lf.assert_close(np.asarray(image), expected, f"row {i}")
        if i != 1:  # the edit is read: its first text throughout is another image
            unedited = reference(pipe, texts[i][:1] * STEPS, negatives[i], seeds[i], adapters)
            assert np.abs(expected.astype(int) - unedited.astype(int)).max() > 3, f"row {i}"
