"""The web UI's AND (composable diffusion) under prompt_syntax="a1111".

The parser's rules are the web UI's (``modules/prompt_parser.py``); the images are
checked against a reference denoising loop written here with diffusers' own parts: its
scheduler (``from_config`` of the model's scheduler config), its UNet2DConditionModel
called once for the negative and once per sub-prompt embedding (built by the a1111
oracle of test_prompts_oracle), combined by the web UI's ``combine_denoised``
(``uncond + scale * sum_i w_i * (cond_i - uncond)``), and its AutoencoderKL. The oracle's
sub-prompts and weights are written out by hand for each case, not parsed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prompts_oracle import one_thread, oracle_embeds, reference  # noqa: F401 (a fixture)
from tiny_sd import diffusers_scheduler, ours_from_reference

from ldm_jobs.model.composable import (
    Composition,
    SubPrompt,
    check_prompt,
    compose,
    is_composed,
    split_and,
    unsupported,
)
from ldm_jobs.model.prompts import PromptSyntaxError

SIZE, STEPS = 32, 4


# ------------------------------------------------------------------ the split
@pytest.mark.parametrize("text, parts", [
    ("a cat AND a dog :0.6", [("a cat", 1.0), (" a dog", 0.6)]),
    ("a:0.5 AND b : -1.5 AND c:.5", [("a", 0.5), (" b", -1.5), (" c", 0.5)]),
    ("a AND b:5.", [("a", 1.0), (" b", 5.0)]),
    ("a AND b:+2", [("a", 1.0), (" b", 2.0)]),
    ("x AND", [("x", 1.0), ("", 1.0)]),                   # an empty sub-prompt is kept
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a AND b:1e3", [("a", 1.0), (" b:1e3", 1.0)]),       # no exponent: text
    ("a AND b:x", [("a", 1.0), (" b:x", 1.0)]),
    ("a\nb:0.5 AND c", [("a\nb:0.5 ", 1.0), (" c", 1.0)]),  # a line break: whole, weight 1
    ("(a AND b:1.2)", [("(a", 1.0), (" b:1.2)", 1.0)]),   # split before the brackets
    ("cat,AND,dog", [("cat,", 1.0), (",dog", 1.0)]),
    ("a cat  ", [("a cat", 1.0)]),
    ("cat:0.5", [("cat", 0.5)]),
])
def test_split_as_the_web_ui_splits(text, parts):
    assert split_and(text) == tuple(SubPrompt(t, w) for t, w in parts)


@pytest.mark.parametrize("text", ["a cat and a dog", "ANDROID", "X_AND_Y", "And so", "BAND AND1",
                                  "(cat:1.2)", "a [cat:dog:0.5]", "a cat: 1e3", "x:"])
def test_only_the_capital_word_or_a_trailing_weight_composes(text):
    assert not is_composed(text)
    assert compose([text, "plain"]) is None


def test_lora_tags_are_cut_before_the_split():
    assert not is_composed("a cat <lora:AND:0.5>")
    assert is_composed("<lora:x:0.5>a cat AND a dog")
    assert is_composed("a cat:0.5 <lora:x:0.7>")   # the tag cut, the weight is the prompt's end
    comp = compose(["<lora:x:0.5>a cat AND a dog:2", "plain", "b:0.5"])
    assert comp.texts == ("a cat", " a dog", "plain", "b")
    assert comp.rows == (0, 0, 1, 2) and comp.weights == (1.0, 2.0, 1.0, 0.5)
    assert comp.composed == (True, False, True) and comp.first == (0, 2, 3)


def test_each_sub_prompt_is_checked_on_its_own():
    check_prompt("[a:b:2] AND c", 4, positive=True)
    with pytest.raises(PromptSyntaxError, match="1e999"):
        check_prompt("a AND [b:c:1e999]", 4, positive=True)
    # a negative is not split: AND is a word there
    check_prompt("a AND b:0.5", 4, positive=False)


def test_loras_and_refiner_with_and_are_named():
    assert unsupported("a AND b", loras=False, refiner=False) is None
    assert unsupported("a and b", loras=True, refiner=True) is None
    assert "LoRAs" in unsupported("a AND b", loras=True, refiner=False)
    assert "refiner" in unsupported("a:0.5", loras=False, refiner=True)


# ------------------------------------------------------------------ the images
@pytest.fixture(scope="module")
def sd1():
    ref = reference("sd1")
    return ref, ours_from_reference(ref)


def sd1_embeds(ref):
    return lambda texts: [(e, {}) for e in oracle_embeds(texts, ref)]


@torch.no_grad()
def oracle_image(ref, sampler, seed, parts, negative, scale, embeds=None):
    """One image: ``parts`` [(text or one text per step, weight)], the web UI's sum.
    ``embeds(texts)``: one (encoder_hidden_states, other UNet arguments) per text."""
    texts = [[t] * STEPS if isinstance(t, str) else list(t) for t, _ in parts]
    found = (embeds or sd1_embeds(ref))([t for per_step in texts for t in per_step] + [negative])
    uncond = found[-1]
    scheduler = diffusers_scheduler(sampler, ref.scheduler_config)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator) * scheduler.init_noise_sigma
    for step, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(latents, t)
        eps_u = ref.unet(x, t, encoder_hidden_states=uncond[0], **uncond[1]).sample
        total = torch.zeros_like(eps_u)
        for k, (_, weight) in enumerate(parts):
            context, added = found[k * STEPS + step]
            eps_c = ref.unet(x, t, encoder_hidden_states=context, **added).sample
            total = total + weight * (eps_c - eps_u)
        latents = scheduler.step(eps_u + scale * total, t, latents, generator=generator).prev_sample
    image = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0]
    return (image * 255).round().astype(np.uint8)


def ours(pipe, prompts, seeds, sampler, negative="", scale=7.5):
    images = pipe.generate(prompts, seeds=seeds, negative_prompts=negative, steps=STEPS,
                           guidance_scale=scale, sampler=sampler, width=SIZE, height=SIZE,
                           prompt_syntax="a1111")
    return [np.asarray(im) for im in images]


def diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# (prompt, sampler, the oracle's sub-prompts and weights)
CASES = {
    "two": ("a red circle AND a blue square", "euler",
            [("a red circle", 1.0), ("a blue square", 1.0)]),
    "weights": ("red circle:1.2 AND blue square :0.7 AND green:-0.5", "dpmpp_2m",
                [("red circle", 1.2), ("blue square", 0.7), ("green", -0.5)]),
    "emphasis": ("a (red:1.4) circle AND [blue] ((square)) BREAK sky", "euler_ancestral",
                 [("a (red:1.4) circle", 1.0), ("[blue] ((square)) BREAK sky", 1.0)]),
    "edit": ("a [red:blue:1] circle AND square:0.5", "euler",
             [(["a red circle"] * 2 + ["a blue circle"] * 2, 1.0), ("square", 0.5)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_and_matches_the_web_ui_sum_over_diffusers(sd1, name):
    ref, pipe = sd1
    prompt, sampler, parts = CASES[name]
    (mine,) = ours(pipe, [prompt], [21], sampler, negative="blurry")
    expected = oracle_image(ref, sampler, 21, parts, "blurry", 7.5)
    assert diff(mine, expected) <= 2, f"{name}: {diff(mine, expected)}/255"
    assert np.std(mine) > 5
    # AND is not the joined text: that reading draws another image
    (joined,) = ours(pipe, [prompt.replace("AND", "and")], [21], sampler, negative="blurry")
    assert diff(mine, joined) > 2


def test_a_batch_mixing_and_and_plain_rows(sd1):
    ref, pipe = sd1
    prompts = ["a red circle AND a blue square:0.8", "a (green) triangle", "a star:0.5 AND sky"]
    scales = [7.5, 6.0, 1.0]   # the last composed row at scale 1 still runs its negative
    mine = pipe.generate(prompts, seeds=[5, 6, 7], negative_prompts="ugly", steps=STEPS,
                         guidance_scale=scales, sampler="euler", width=SIZE, height=SIZE,
                         prompt_syntax="a1111")
    expected = [oracle_image(ref, "euler", 5, [("a red circle", 1.0), ("a blue square", 0.8)], "ugly", 7.5),
                oracle_image(ref, "euler", 6, [("a (green) triangle", 1.0)], "ugly", 6.0),
                oracle_image(ref, "euler", 7, [("a star", 0.5), ("sky", 1.0)], "ugly", 1.0)]
    for prompt, image, reference_image in zip(prompts, mine, expected):
        assert diff(np.asarray(image), reference_image) <= 2, prompt
    # the plain row is the image it is alone, up to the UNet's batch size (a batch of
    # plain rows, with no AND, already differs from a row alone by 1/255 here)
    alone = pipe.generate([prompts[1]], seeds=[6], negative_prompts="ugly", steps=STEPS,
                          guidance_scale=6.0, sampler="euler", width=SIZE, height=SIZE,
                          prompt_syntax="a1111")[0]
    assert diff(np.asarray(alone), np.asarray(mine[1])) <= 1


def test_the_sum_of_one_sub_prompt_at_weight_one_is_exact(sd1):
    """A row of one sub-prompt at weight 1 gets exactly the bits of plain CFG: with the
    same UNet rows, the composed combination equals ``uncond + s * (cond - uncond)``."""
    _, pipe = sd1
    request = pipe.check(["a cat", "a (dog)"], [1, 2], "ugly", STEPS, [7.5, 1.0], "euler", SIZE, SIZE,
                         None, 0.75, "a1111")
    cond, mask, guided = pipe.unet_conditioning(request)
    scales = torch.tensor([7.5, 1.0])
    guided = torch.tensor([True, False])
    plain = pipe.model_fn(cond.context, guided, scales, mask)
    one = Composition(("a cat", "a (dog)"), (0, 1), (1.0, 1.0), (False, False))
    composed = pipe.model_fn(cond.context, guided, scales, mask, composition=one)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    assert torch.equal(plain(x, t, 0), composed(x, t, 0))
    # the weights are read: another weight, another prediction
    half = Composition(("a cat", "a (dog)"), (0, 1), (0.5, 1.0), (True, False))
    assert not torch.equal(plain(x, t, 0)[:1], pipe.model_fn(cond.context, guided, scales, mask,
                                                             composition=half)(x, t, 0)[:1])


def test_rows_without_and_run_as_before(sd1):
    """No composed row: one UNet row per prompt and negative, as without AND."""
    _, pipe = sd1
    batches = []
    original = pipe.unet.forward

    def counting(x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(x, *args, **kwargs)

    pipe.unet.forward = counting
    try:
        ours(pipe, ["a cat and a dog", "ANDROID"], [1, 2], "euler")
        assert batches == [4] * STEPS
        batches.clear()
        ours(pipe, ["a cat and a dog"], [1], "euler", scale=1.0)   # unguided: no negative
        assert batches == [1] * STEPS
        batches.clear()
        ours(pipe, ["a cat AND a dog:0.5", "x"], [1, 2], "euler")  # 2 negatives, 3 sub-prompts
        assert batches == [5] * STEPS
    finally:
        del pipe.unet.forward


def test_refiner_with_and_is_refused(sd1):
    _, pipe = sd1
    with pytest.raises(ValueError, match=r"prompts\[1\].*refiner"):
        pipe.generate(["plain", "a AND b"], seeds=[1, 2], steps=STEPS, width=SIZE, height=SIZE,
                      prompt_syntax="a1111", refiner=pipe, switch_at=0.5)


def test_a_sub_prompt_that_cannot_be_read_names_its_row(sd1):
    _, pipe = sd1
    with pytest.raises(ValueError, match=r"prompts\[0\].*1e999"):
        pipe.generate(["a AND [b:c:1e999]"], seeds=[1], steps=STEPS, width=SIZE, height=SIZE,
                      prompt_syntax="a1111")


def test_sdxl_sub_prompts_bring_their_own_pooled_embedding(tmp_path):
    """SDXL: each sub-prompt's own context and pooled embedding (and the time ids)."""
    from test_prompts_sdxl import oracle_embeds as sdxl_embeds
    from test_prompts_sdxl import time_ids

    from ldm_jobs import load_pipeline
    from tests.tiny_sdxl import make_sdxl, save_sdxl_folder

    ref = make_sdxl("sdxl", seed=3)
    pipe = load_pipeline(str(save_sdxl_folder(ref, tmp_path / "tiny-sdxl")))

    def embeds(texts):
        return [(e, {"added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids(1)}})
                for e, p in sdxl_embeds(texts, ref)]

    prompt = "a red circle AND (blue square:1.3), " + "sky, " * 40 + ":0.7"  # two chunks
    (mine,) = ours(pipe, [prompt], [9], "euler", negative="ugly")
    parts = [("a red circle", 1.0), ("(blue square:1.3), " + "sky, " * 40, 0.7)]
    expected = oracle_image(ref, "euler", 9, parts, "ugly", 7.5, embeds)
    assert diff(mine, expected) <= 2, f"{diff(mine, expected)}/255"
    (joined,) = ours(pipe, [prompt.replace("AND", "and")], [9], "euler", negative="ugly")
    assert diff(mine, joined) > 2
