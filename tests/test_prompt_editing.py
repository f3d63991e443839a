"""Prompt editing and alternating words (prompt_syntax="a1111") against diffusers.

The reference: for each row, the text of every sampler step written out by hand from the
web UI's rules (``when`` truncated to a step, the schedule's 1-based ends matched by the
sampler's 0-based step count, alternation option (s - 1) mod n); each text embedded by the
a1111 oracle of test_prompts_oracle (transformers' CLIP, step by step); then diffusers'
pipeline swapping the embeddings between steps with ``callback_on_step_end``. Inside
diffusers' loop ``prompt_embeds`` is already CFG's ``[negative; positive]``, so the
callback returns that concatenation for the next step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_prompts_oracle import one_thread, oracle_embeds, reference  # noqa: F401 (a fixture)
from tiny_sd import diffusers_pipeline, ours_from_reference

SIZE, GUIDANCE = 32, 7.5


@pytest.fixture(scope="module")
def sd1():
    ref = reference("sd1")
    return ref, ours_from_reference(ref)


def init_image(seed=3):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@torch.no_grad()
def reference_image(ref, sampler, steps, seed, texts, negatives, strength=None):
    """diffusers' image of one row whose prompt at sampler step k is ``texts[k]`` and
    whose negative is ``negatives[k]`` (a str: the same at every step)."""
    calls = len(texts)
    if isinstance(negatives, str):
        negatives = [negatives] * calls
    assert len(negatives) == calls
    embeds = oracle_embeds(list(texts) + list(negatives), ref)
    pos, neg = embeds[:calls], embeds[calls:]

    def swap(pipe, i, t, tensors):
        if i + 1 >= calls:
            return {}
        return {"prompt_embeds": torch.cat([neg[i + 1], pos[i + 1]])}

    options = dict(prompt_embeds=pos[0], negative_prompt_embeds=neg[0], num_inference_steps=steps,
                   guidance_scale=GUIDANCE, generator=[torch.Generator("cpu").manual_seed(seed)],
                   output_type="np", callback_on_step_end=swap,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"])
    if strength is None:
        pipe = diffusers_pipeline(ref, sampler)
        out = pipe(height=SIZE, width=SIZE, **options).images
    else:
        pipe = diffusers_pipeline(ref, sampler, img2img=True)
        out = pipe(image=init_image(), strength=strength, **options).images
    return (out[0] * 255).round().astype(np.uint8)


def ours(pipe, rows, sampler, steps, strength=None):
    """Our images of (prompt, negative, seed) rows, in one batch."""
    extra = {} if strength is None else dict(init_images=[init_image()] * len(rows), strength=strength)
    images = pipe.generate([p for p, _, _ in rows], seeds=[s for _, _, s in rows],
                           negative_prompts=[n for _, n, _ in rows], steps=steps,
                           guidance_scale=GUIDANCE, sampler=sampler, width=SIZE, height=SIZE,
                           prompt_syntax="a1111", **extra)
    return [np.asarray(im) for im in images]


def diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# (prompt, negative, the prompt's text at each step, the negative's); 0.3 of 8 steps is
# step int(2.4) = 2, which the sampler's steps 0-2 read
CASES = {
    "fraction": ("a [cat:dog:0.3] x", "", ["a cat x"] * 3 + ["a dog x"] * 5, ""),
    "absolute step": ("a [cat:dog:1] x", "", ["a cat x"] * 2 + ["a dog x"] * 2, ""),
    "to:when": ("a [dog:1] x", "", ["a  x"] * 2 + ["a dog x"] * 2, ""),
    "from::when": ("a [dog::1] x", "", ["a dog x"] * 2 + ["a  x"] * 2, ""),
    "nested": ("a [cat:[dog:fox:2]:1] x", "", ["a cat x", "a cat x", "a dog x", "a fox x"], ""),
    "inside emphasis": ("a ([cat:dog:1]:1.5) x", "", ["a (cat:1.5) x"] * 2 + ["a (dog:1.5) x"] * 2, ""),
    "alternation": ("a [cat|dog] x", "", ["a cat x", "a cat x", "a dog x", "a cat x"], ""),
    "negative": ("a cat", "[blurry:ugly:0.25]", ["a cat"] * 4, ["blurry"] * 2 + ["ugly"] * 2),
}


def check_case(ref, pipe, sampler, name, seed=11):
    prompt, negative, texts, negatives = CASES[name]
    steps = len(texts)
    expected = reference_image(ref, sampler, steps, seed, texts, negatives)
    (mine,) = ours(pipe, [(prompt, negative, seed)], sampler, steps)
    assert diff(mine, expected) <= 2, f"{name}: {diff(mine, expected)}/255"
    # the edit matters: the image of the first step's texts throughout is another image
    unedited = reference_image(ref, sampler, steps, seed, [texts[0]] * steps,
                               negatives if isinstance(negatives, str) else negatives[0])
    assert diff(expected, unedited) > 3, f"{name}: the edit does not change the image ({diff(expected, unedited)})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_edits_match_diffusers_swapping_embeddings(sd1, name):
    check_case(*sd1, "euler", name)


@pytest.mark.parametrize("name", ["fraction", "alternation", "negative"])
def test_edits_with_an_ancestral_sampler(sd1, name):
    check_case(*sd1, "euler_ancestral", name)


def test_dpmpp_2m_nested(sd1):
    check_case(*sd1, "dpmpp_2m", "nested")


def test_pndm_calls_the_model_once_more_than_its_steps(sd1):
    """PNDM (PLMS) makes steps + 1 model calls, diffusers' loop and callback as many:
    the last call reads the last text."""
    ref, pipe = sd1
    texts = ["a cat x"] * 2 + ["a dog x"] * 3
    expected = reference_image(ref, "pndm", 4, 7, texts, "")
    (mine,) = ours(pipe, [("a [cat:dog:1] x", "", 7)], "pndm", 4)
    assert diff(mine, expected) <= 2
    assert diff(expected, reference_image(ref, "pndm", 4, 7, texts[:1] * 5, "")) > 3


def test_chunk_counts_that_change_between_steps_keep_each_image_its_own(sd1):
    """A row whose text grows from one chunk to two mid-run, beside rows that stay at one
    or two: every step pads the batch with the key mask, and each image is the one drawn
    alone."""
    _, pipe = sd1
    long = ", ".join(["a red castle on a hill"] * 14)  # about 100 tokens: two chunks
    rows = [(f"a [cat:{long}:1] x", "blurry", 41), ("a dog", "", 42), (long, "[dark:bright:2]", 43)]
    together = ours(pipe, rows, "euler", 4)
    for row, image in zip(rows, together):
        (alone,) = ours(pipe, [row], "euler", 4)
        assert diff(image, alone) <= 1, row[0][:20]


def test_refiner_with_edits_is_refused(sd1):
    _, pipe = sd1
    with pytest.raises(ValueError, match="refiner= with prompt editing"):
        pipe.generate(["a [cat:dog:1] x"], seed=1, steps=4, width=SIZE, height=SIZE,
                      prompt_syntax="a1111", refiner=pipe)


def test_a_batch_mixing_scheduled_and_plain_rows(sd1):
    ref, pipe = sd1
    rows = [("a [cat:dog:1] x", "", 21), ("a plain castle", "blurry", 22),
            ("a [cat|dog] x", "[blurry:ugly:0.25]", 23)]
    texts = [(CASES["absolute step"][2], ""), (["a plain castle"] * 4, "blurry"),
             (CASES["alternation"][2], CASES["negative"][3])]
    mine = ours(pipe, rows, "euler", 4)
    for (prompt, _, seed), image, (steps_text, negatives) in zip(rows, mine, texts):
        expected = reference_image(ref, "euler", 4, seed, steps_text, negatives)
        assert diff(image, expected) <= 2, prompt
    # the plain row of the mixed batch is the image it is alone
    (alone,) = ours(pipe, rows[1:2], "euler", 4)
    assert diff(mine[1], alone) == 0


def test_img2img_schedules_over_the_requested_steps(sd1):
    """6 steps at strength 0.5 run 3 steps; the schedule is the 6 steps' (the web UI
    schedules over its steps and counts the steps it runs from 0): [cat:dog:1] reads cat
    at the run's steps 0 and 1, dog at step 2."""
    ref, pipe = sd1
    (mine,) = ours(pipe, [("a [cat:dog:1] x", "", 5)], "euler", 6, strength=0.5)
    expected = reference_image(ref, "euler", 6, 5, ["a cat x"] * 2 + ["a dog x"], "", strength=0.5)
    assert diff(mine, expected) <= 2
    unedited = reference_image(ref, "euler", 6, 5, ["a cat x"] * 3, "", strength=0.5)
    assert diff(expected, unedited) > 3


def test_rows_without_edits_are_unchanged(sd1):
    """Edits whose sides read alike give the bytes of the prompt without them: texts that
    are equal (built once), and texts spelled apart that parse alike (``(cat)`` and
    ``(cat:1.1)``: the per-step path, its conditioning rebuilt per step); a request
    without edits never builds a per-step conditioning."""
    _, pipe = sd1
    rows = [("a (cat) x", "blurry", 31), ("a (dog:1.3) x", "", 32)]
    plain = ours(pipe, rows, "euler_ancestral", 4)
    same = ours(pipe, [("a [(cat):(cat):0.5] x", "blurry", 31), ("a ([dog|dog]:1.3) x", "", 32)],
                "euler_ancestral", 4)
    alike = ours(pipe, [("a [(cat):(cat:1.1):0.5] x", "blurry", 31), ("a ([dog|dog]:1.3) x", "", 32)],
                 "euler_ancestral", 4)
    assert [diff(a, b) for a, b in zip(plain, same)] == [0, 0]
    assert [diff(a, b) for a, b in zip(plain, alike)] == [0, 0]
    request = pipe.check([p for p, _, _ in rows], [31, 32], [n for _, n, _ in rows], 4, 7.5,
                         "euler", SIZE, SIZE, None, 0.75, "a1111")
    assert pipe.call_conditioning(request) is None


def test_unreadable_schedules_name_their_row(sd1):
    _, pipe = sd1
    with pytest.raises(ValueError, match=r"prompts\[1\].*1e999"):
        pipe.generate(["a cat", "a [cat:dog:1e999]"], seed=1, steps=2, width=SIZE, height=SIZE,
                      prompt_syntax="a1111")
    with pytest.raises(ValueError, match=r"negative_prompts\[0\].*stray"):
        pipe.generate(["a cat"], seed=1, negative_prompts=["[a:b:1]]]"], steps=2, width=SIZE,
                      height=SIZE, prompt_syntax="a1111")


# ------------------------------------------------------------------ SDXL
@torch.no_grad()
def test_sdxl_edits_swap_the_pooled_embedding_too(tmp_path):
    """SDXL: each step's context and pooled embedding follow that step's text (diffusers'
    callback swaps ``prompt_embeds`` and ``add_text_embeds``, both ``[negative; positive]``
    in its loop); a negative edit included."""
    from test_prompts_sdxl import oracle_embeds as sdxl_embeds

    from ldm_jobs import load_pipeline
    from tests.tiny_sdxl import diffusers_sdxl_pipeline, make_sdxl, save_sdxl_folder

    ref = make_sdxl("sdxl", seed=3)
    pipe = load_pipeline(str(save_sdxl_folder(ref, tmp_path / "tiny-sdxl")))
    prompt, negative, seed = "a [cat|(dog:1.2)] x", "[blurry:ugly:1]", 9
    texts = ["a cat x", "a cat x", "a (dog:1.2) x", "a cat x"]
    negatives = ["blurry"] * 2 + ["ugly"] * 2
    pos, neg = sdxl_embeds(texts, ref), sdxl_embeds(negatives, ref)

    def swap(_, i, t, tensors):
        if i + 1 >= len(texts):
            return {}
        return {"prompt_embeds": torch.cat([neg[i + 1][0], pos[i + 1][0]]),
                "add_text_embeds": torch.cat([neg[i + 1][1], pos[i + 1][1]])}

    def reference(swapping):
        out = diffusers_sdxl_pipeline(ref, "euler")(
            prompt_embeds=pos[0][0], pooled_prompt_embeds=pos[0][1],
            negative_prompt_embeds=neg[0][0], negative_pooled_prompt_embeds=neg[0][1],
            height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np",
            callback_on_step_end=swap if swapping else None,
            callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"])
        return (out.images[0] * 255).round().astype(np.uint8)

    expected = reference(True)
    (mine,) = ours(pipe, [(prompt, negative, seed)], "euler", 4)
    assert diff(mine, expected) <= 2
    assert diff(expected, reference(False)) > 3


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m",
                                  "dpmpp_2m_karras"])
def test_every_sampler_numbers_its_model_calls_in_order(name):
    """The step each sampler hands its model function is its call count from 0, txt2img
    and img2img alike (a schedule's text is picked by it)."""
    from ldm_jobs.model import samplers

    config = samplers.SchedulerConfig()
    extra = 1 if name == "pndm" else 0  # PLMS evaluates one timestep twice
    for run, calls in (("txt2img", 5 + extra), ("img2img", 3 + extra)):
        steps = []

        def model_fn(x, t, step, steps=steps):
            steps.append(step)
            return 0.1 * x

        generators = [torch.Generator().manual_seed(0)]
        noise = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(1))
        if run == "txt2img":
            samplers.txt2img(name, model_fn, noise, 5, config, generators=generators)
        else:
            samplers.img2img(name, model_fn, noise, noise, 6, 0.5, config, generators=generators)
        assert steps == list(range(calls)), run
