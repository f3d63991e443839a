"""SDXL with prompt_syntax="a1111", against an oracle built from transformers and diffusers.

The oracle chunks each text with each of transformers' two CLIPTokenizers on its own
(``oracle_chunks``: tokenizer_2 pads with "!"), runs transformers' CLIPTextModel and
CLIPTextModelWithProjection on every chunk, weights and rescales each encoder's
penultimate hidden states apart (``emphasized``), joins them along the features and the
chunks along the sequence, and takes ``text_embeds`` of the first chunk as the pooled
embedding; diffusers' StableDiffusionXLPipeline then draws the images from
``prompt_embeds`` / ``negative_prompt_embeds`` / ``pooled_prompt_embeds`` /
``negative_pooled_prompt_embeds`` (an empty negative left to diffusers, which zeroes it
under ``force_zeros_for_empty_prompt``). A prompt and negative of different lengths,
which diffusers refuses, run as two UNet branches (``separate_branches_images``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prompts_encoding import ARGS, LONG
from test_prompts_oracle import (  # noqa: F401 (one_thread: an autouse fixture)
    GUIDANCE,
    SAMPLER,
    SIZE,
    STEPS,
    check_against_oracle,
    corpus,
    emphasized,
    one_thread,
    oracle_chunks,
    separate_branches_images,
)

from ldm_jobs import load_pipeline
from tests.tiny_sdxl import diffusers_sdxl_pipeline, make_sdxl, save_sdxl_folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    ref = make_sdxl("sdxl", seed=3)
    return ref, load_pipeline(str(save_sdxl_folder(ref, tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")))


@torch.no_grad()
def oracle_embeds(texts, ref):
    """(embeds (1, chunks x 77, D), pooled (1, P)) per text."""
    out = []
    for text in texts:
        chunks_1, chunks_2 = oracle_chunks(text, ref.tokenizer), oracle_chunks(text, ref.tokenizer_2)
        assert [m for _, m in chunks_1] == [m for _, m in chunks_2]  # chunked alike
        h_1 = ref.text_encoder(torch.tensor([ids for ids, _ in chunks_1]), output_hidden_states=True)
        h_2 = ref.text_encoder_2(torch.tensor([ids for ids, _ in chunks_2]), output_hidden_states=True)
        parts = [torch.cat([emphasized(a[None], mults), emphasized(b[None], mults)], dim=-1)
                 for (_, mults), a, b in zip(chunks_1, h_1.hidden_states[-2], h_2.hidden_states[-2])]
        out.append((torch.cat(parts, dim=1), h_2.text_embeds[:1]))
    return out


def time_ids(n):
    return torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * n, dtype=torch.float32)


@torch.no_grad()
def oracle_images(ref, rows):
    """Images of (prompt, negative, seed) rows, grouped by embedding shapes ("zero": an
    empty negative, which diffusers makes itself)."""
    conds = oracle_embeds([p for p, _, _ in rows], ref)
    unconds = oracle_embeds([n or "unused" for _, n, _ in rows], ref)
    groups = {}
    for i, ((c, _), (u, _)) in enumerate(zip(conds, unconds)):
        groups.setdefault((c.shape[1], "zero" if rows[i][1] == "" else u.shape[1]), []).append(i)
    pipe = diffusers_sdxl_pipeline(ref, SAMPLER)
    images = [None] * len(rows)
    for (cond_len, uncond_len), index in groups.items():
        cond, pooled = (torch.cat(t) for t in zip(*[conds[i] for i in index]))
        uncond, uncond_pooled = (torch.cat(t) for t in zip(*[unconds[i] for i in index]))
        generators = [torch.Generator("cpu").manual_seed(rows[i][2]) for i in index]
        if uncond_len in (cond_len, "zero"):
            negative = {} if uncond_len == "zero" else dict(
                negative_prompt_embeds=uncond, negative_pooled_prompt_embeds=uncond_pooled)
            out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                       output_type="np", **negative).images
            found = (out * 255).round().astype(np.uint8)
        else:
            ids = time_ids(len(index))
            found = separate_branches_images(ref, cond, uncond, generators, (
                dict(added_cond_kwargs={"text_embeds": uncond_pooled, "time_ids": ids}),
                dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})))
        for i, image in zip(index, found):
            images[i] = image
    return images


def test_sdxl_corpus_matches_the_oracle(sdxl):
    ref, pipe = sdxl
    rows = corpus(100, seed=3)
    lengths = [len(ref.tokenizer(p, add_special_tokens=False).input_ids) for p, _, _ in rows]
    assert sum(150 <= n <= 300 for n in lengths) >= 20 and sum("BREAK" in p for p, _, _ in rows) >= 20
    assert sum(n == "" for _, n, _ in rows) >= 20  # the zeroed negative
    check_against_oracle(ref, pipe, rows, oracle_images)


def test_separate_branch_oracle_equals_the_sdxl_pipeline(sdxl):
    ref, _ = sdxl
    (cond, pooled), (uncond, uncond_pooled) = oracle_embeds(["a (red:1.3) cat", "dog, [blurry]"], ref)
    pipe = diffusers_sdxl_pipeline(ref, SAMPLER)
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=uncond_pooled, height=SIZE, width=SIZE,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np")
    expected = (out.images[0] * 255).round().astype(np.uint8)
    got = separate_branches_images(ref, cond, uncond, [torch.Generator("cpu").manual_seed(5)], (
        dict(added_cond_kwargs={"text_embeds": uncond_pooled, "time_ids": time_ids(1)}),
        dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(1)})))[0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_sdxl_plain_prompts_do_not_change_by_a_bit(sdxl):
    _, pipe = sdxl
    prompts = ["a red circle on a blue background", "a small green star, top left: noon", "cat", "x " * 74]
    kwargs = dict(seeds=[1, 2, 3, 4], negative_prompts=["blurry", "", "low quality, jpeg", ""],
                  guidance_scale=[7.5, 7.5, 1.0, 3.0], **ARGS)
    pipe.clear_text_cache()
    plain = np.stack([np.asarray(im) for im in pipe.generate(prompts, prompt_syntax="plain", **kwargs)])
    pipe.clear_text_cache()
    webui = np.stack([np.asarray(im) for im in pipe.generate(prompts, prompt_syntax="a1111", **kwargs)])
    assert np.array_equal(plain, webui)
    (contexts, pooled), (contexts_a, pooled_a) = pipe.sdxl_prompts(prompts), pipe.sdxl_prompts(prompts, "a1111")
    assert all(torch.equal(a, b) for a, b in zip(contexts, contexts_a)) and torch.equal(pooled, pooled_a)
    assert contexts_a[0].shape[0] == 77


@pytest.mark.parametrize("rows", [
    [("a red circle", "blurry"), (LONG, "blurry")],
    [(LONG, ""), ("(cat:1.3) BREAK dog", "[ugly]"), ("a red circle", LONG)],
])
def test_sdxl_image_in_a_batch_equals_the_image_alone(sdxl, rows):
    _, pipe = sdxl
    prompts, negatives = [p for p, _ in rows], [n for _, n in rows]
    seeds = list(range(10, 10 + len(rows)))
    request = pipe.check(prompts, seeds, negatives, STEPS, GUIDANCE, SAMPLER, SIZE, SIZE, None, 0.75, "a1111")
    together = pipe.denoise(request)
    assert pipe.text_context(request)[1] is not None  # the batch was padded
    # the same batch attending to the padding too: what the mask must prevent
    conditioning = pipe.unet_conditioning
    pipe.unet_conditioning = lambda *args: (lambda cond, _, guided: (cond, None, guided))(*conditioning(*args))
    try:
        leaked = pipe.denoise(request)
    finally:
        del pipe.unet_conditioning
    alone = torch.cat([pipe.denoise(pipe.check([prompts[i]], [seeds[i]], [negatives[i]], STEPS, GUIDANCE, SAMPLER,
                                               SIZE, SIZE, None, 0.75, "a1111")) for i in range(len(rows))])
    # float32 GEMMs of another batch size differ by ~3e-5 here even without padding (0.0
    # in float64); attending to the padded keys differs by orders of magnitude more
    assert (together - alone).abs().max() < 1e-4
    assert (leaked - alone).abs().max() > 1e-2


def test_sdxl_cache_keys_on_the_parsed_form(sdxl):
    _, pipe = sdxl
    pipe.clear_text_cache()
    calls = []
    run = pipe.text.run
    pipe.text.run = lambda ids: calls.append(ids[0].shape[0]) or run(ids)
    try:
        (first,), _ = pipe.sdxl_prompts(["a (cat)"], "a1111")
        again, pooled = pipe.sdxl_prompts(["a (cat:1.1)", "a  (cat) <lora:x:0.5>"], "a1111")
        assert len(calls) == 1  # one text encoded once for three spellings
        assert torch.equal(first, again[0]) and torch.equal(first, again[1])
        pipe.sdxl_prompts(["a (cat:1.2)", LONG], "a1111")
        assert len(calls) == 2
    finally:
        del pipe.text.run
