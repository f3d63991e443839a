"""prompt_syntax="a1111" against an oracle built from transformers and diffusers.

The oracle follows the web UI's rules step by step on its own: a regex-and-stack reading
of the emphasis syntax (the web UI's algorithm), transformers' CLIPTokenizer per
fragment, the 75-token chunk loop with the comma backtrack, transformers' CLIPTextModel
on each chunk alone (BOS + 75 + EOS, padded with the tokenizer's pad token), the weights
multiplied in and the chunk's mean restored, chunks joined along the sequence; then
diffusers' StableDiffusionPipeline with ``prompt_embeds`` / ``negative_prompt_embeds``.
Where a prompt and its negative have different lengths diffusers refuses them, so the
oracle runs the two guidance branches as separate UNet calls in a diffusers-scheduler
loop (each text attends to its own chunks only), itself checked against the pipeline.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from tiny_sd import (
    CLIP_DIR,
    diffusers_pipeline,
    diffusers_scheduler,
    make_reference,
    ours_from_reference,
)

from ldm_jobs.model.tokenizer import CLIPTokenizer as OurTokenizer

SAMPLER, STEPS, SIZE, GUIDANCE = "euler", 2, 32, 7.5

# ------------------------------------------------------------------ the oracle's parser
_WEBUI_ITEM = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""")
_WEBUI_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA = re.compile(r"<lora:[^>]*>")


def oracle_parse(text):
    """[[text, weight]] with ["BREAK", None] markers (which no bracket scales)."""
    res, round_open, square_open = [], [], []

    def multiply_range(start, factor):
        for item in res[start:]:
            if item[1] is not None:
                item[1] *= factor

    for m in _WEBUI_ITEM.finditer(_LORA.sub("", text)):
        item, weight = m.group(0), m.group(1)
        if item.startswith("\\"):
            res.append([item[1:], 1.0])
        elif item == "(":
            round_open.append(len(res))
        elif item == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_range(round_open.pop(), float(weight))
        elif item == ")" and round_open:
            multiply_range(round_open.pop(), 1.1)
        elif item == "]" and square_open:
            multiply_range(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(_WEBUI_BREAK, item)):
                if i > 0:
                    res.append(["BREAK", None])
                res.append([part, 1.0])
    for pos in round_open:
        multiply_range(pos, 1.1)
    for pos in square_open:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] is not None and res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def oracle_chunks(text, hf_tokenizer):
    """[(tokens, multipliers)] of 77 each, ids as the web UI builds them."""
    comma = hf_tokenizer.convert_tokens_to_ids(",</w>")
    bos, eos, pad = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id
    chunks, tokens, mults, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        body = tokens + [eos] * (75 - len(tokens))
        ids = [bos] + body + [eos]
        first_end = ids.index(eos)
        ids = ids[: first_end + 1] + [pad] * (76 - first_end)
        chunks.append((ids, [1.0] + mults + [1.0] * (76 - len(mults))))
        tokens, mults, last_comma = [], [], -1

    for text_part, weight in oracle_parse(text):
        if weight is None:
            next_chunk()
            continue
        for token in hf_tokenizer(text_part, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= 20:
                keep = last_comma + 1
                moved = (tokens[keep:], mults[keep:])
                tokens, mults = tokens[:keep], mults[:keep]
                next_chunk()
                tokens, mults = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def emphasized(z, mults):
    """The web UI's "Original" emphasis of one chunk's states (1, 77, D)."""
    original_mean = z.mean()
    z = z * torch.tensor(mults).reshape(1, -1, 1)
    return z * (original_mean / z.mean())


@torch.no_grad()
def oracle_embeds(texts, ref):
    """One (1, chunks x 77, D) embedding per text; every chunk through the encoder in one
    batch (rows do not mix in a transformer), each chunk weighted and rescaled alone."""
    chunked = [oracle_chunks(text, ref.tokenizer) for text in texts]
    flat = [chunk for chunks in chunked for chunk in chunks]
    hidden = ref.text_encoder(torch.tensor([ids for ids, _ in flat])).last_hidden_state
    out, start = [], 0
    for chunks in chunked:
        parts = []
        for (_, mults), z in zip(chunks, hidden[start : start + len(chunks)]):
            parts.append(emphasized(z[None], mults))  # (1, 77, D): the web UI's batch of one
        out.append(torch.cat(parts, dim=1))
        start += len(chunks)
    return out


@torch.no_grad()
def oracle_images(ref, rows):
    """Images of (prompt, negative, seed) rows; rows whose embeddings have the same shapes
    go through diffusers together, each with its own generator."""
    conds, unconds = oracle_embeds([p for p, _, _ in rows], ref), oracle_embeds([n for _, n, _ in rows], ref)
    groups = {}
    for i, (c, u) in enumerate(zip(conds, unconds)):
        groups.setdefault((c.shape[1], u.shape[1]), []).append(i)
    pipe = diffusers_pipeline(ref, SAMPLER)
    images = [None] * len(rows)
    for (cond_len, uncond_len), index in groups.items():
        cond = torch.cat([conds[i] for i in index])
        uncond = torch.cat([unconds[i] for i in index])
        generators = [torch.Generator("cpu").manual_seed(rows[i][2]) for i in index]
        if cond_len == uncond_len:
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=SIZE, width=SIZE,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                       output_type="np").images
            found = (out * 255).round().astype(np.uint8)
        else:
            found = separate_branches_images(ref, cond, uncond, generators)
        for i, image in zip(index, found):
            images[i] = image
    return images


@torch.no_grad()
def separate_branches_images(ref, cond, uncond, generators, added=({}, {})):
    """CFG with the two branches in separate UNet calls (Euler: no noise after the first draw);
    ``added``: each branch's other UNet arguments (SDXL's ``added_cond_kwargs``)."""
    scheduler = diffusers_scheduler(SAMPLER, ref.scheduler_config)
    scheduler.set_timesteps(STEPS)
    latents = torch.cat([torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) for g in generators])
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps_u = ref.unet(x, t, encoder_hidden_states=uncond, **added[0]).sample
        eps_c = ref.unet(x, t, encoder_hidden_states=cond, **added[1]).sample
        latents = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents).prev_sample
    image = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)


# ------------------------------------------------------------------ the corpus
WORDS = ("cat dog castle forest river mountain portrait lighting cinematic detailed sunset neon "
         "city robot painting oil watercolor sharp focus red blue green golden hour misty lake "
         "ancient temple dragon knight armor glowing eyes soft light volumetric fog").split()


def corpus(n, seed=0):
    rng = random.Random(seed)

    def phrase():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    def weighted():
        kind = rng.randrange(7)
        p = phrase()
        if kind == 0:
            return f"({p}:{rng.choice(['0.5', '0.8', '1.2', '1.35', '1.6', '2'])})"
        if kind == 1:
            depth = rng.randint(1, 3)
            return "(" * depth + p + ")" * depth
        if kind == 2:
            return "[" * rng.randint(1, 2) + p + "]" * rng.randint(1, 2)   # maybe unbalanced
        if kind == 3:
            return f"(({p}:1.3) {phrase()} [{phrase()}])"                   # nested
        if kind == 4:
            return f"\\({p}\\) \\[{phrase()}\\]"                           # escaped
        if kind == 5:
            return f"{p} <lora:style{rng.randint(0, 9)}:0.{rng.randint(1, 9)}>"
        return p

    def text(items):
        parts = [weighted() for _ in range(items)]
        for _ in range(rng.randint(0, 2)):
            if rng.random() < 0.4:
                parts.insert(rng.randrange(len(parts) + 1), "BREAK")
        return rng.choice([", ", " ", ",  "]).join(parts)

    rows = []
    for i in range(n):
        size = [2, 6, 14, 30, 40][i % 5]   # the last two: mostly 150-300 tokens
        prompt = text(rng.randint(max(1, size * 2 // 3), size))
        if i % 7 == 0:
            prompt += " (unclosed " + phrase()
        negative = rng.choice(["", "", "blurry", "(worst quality:1.4), [ugly]", text(rng.randint(10, 40))])
        rows.append((prompt, negative, 1000 + i))
    return rows


# ------------------------------------------------------------------ tests
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds spin-waiting on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(kind):
    """The tiny model with its text encoder's norms randomised too: with unit scales and
    zero biases, a chunk's hidden states have a mean of exactly zero (after the final
    layer norm), which real CLIPs never have and which the mean restoring divides by."""
    ref = make_reference(kind)
    generator = torch.Generator().manual_seed(7)
    for name, p in ref.text_encoder.named_parameters():
        if p.ndim == 1 and "norm" in name:
            base = 1.0 if name.endswith("weight") else 0.0
            p.data = base + 0.3 * torch.randn(p.shape, generator=generator)
    return ref


@pytest.fixture(scope="module")
def sd1():
    ref = reference("sd1")
    return ref, ours_from_reference(ref)


@pytest.fixture(scope="module")
def sd2():
    """SD 2.x conventions: the tokenizer pads with "!" (id 0), not with EOS."""
    from transformers import CLIPTokenizer

    ref = reference("sd2v")
    ref.tokenizer = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"),
                                  model_max_length=77, pad_token="!")
    pipe = ours_from_reference(ref)
    pipe.tokenizer = OurTokenizer(CLIP_DIR / "vocab.json", CLIP_DIR / "merges.txt", pad_token="!")
    return ref, pipe


def ours(pipe, rows, batch=16):
    images = []
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        images += pipe.generate([p for p, _, _ in part], seeds=[s for _, _, s in part],
                                negative_prompts=[n for _, n, _ in part], steps=STEPS,
                                guidance_scale=GUIDANCE, sampler=SAMPLER, width=SIZE, height=SIZE,
                                prompt_syntax="a1111")
    return [np.asarray(im) for im in images]


def check_against_oracle(ref, pipe, rows, oracle=oracle_images):
    mine = ours(pipe, rows)
    worst = 0
    for (prompt, negative, _), image, expected in zip(rows, mine, oracle(ref, rows)):
        diff = int(np.abs(image.astype(np.int16) - expected.astype(np.int16)).max())
        assert diff <= 2, f"{diff}/255 on {prompt!r} / {negative!r}"
        worst = max(worst, diff)
    assert np.std(mine) > 5  # informative images
    return worst


def test_corpus_covers_the_syntax():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"))
    rows = corpus(200)
    chunk_counts = [len(oracle_chunks(p, tok)) for p, _, _ in rows]
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p, _, _ in rows]
    assert sum(150 <= n <= 300 for n in lengths) >= 40
    assert sum(c >= 3 for c in chunk_counts) >= 20
    assert sum("BREAK" in p for p, _, _ in rows) >= 40
    assert sum("\\(" in p for p, _, _ in rows) >= 40
    assert sum(":1.3)" in p for p, _, _ in rows) >= 40
    assert sum("<lora:" in p for p, _, _ in rows) >= 40
    # prompts and negatives of different lengths share batches
    assert sum(len(oracle_chunks(n, tok)) != c for (_, n, _), c in zip(rows, chunk_counts)) >= 40


def test_sd1_corpus_matches_the_oracle(sd1):
    ref, pipe = sd1
    check_against_oracle(ref, pipe, corpus(200, seed=1))


def test_sd2_pad_token_corpus_matches_the_oracle(sd2):
    ref, pipe = sd2
    assert pipe.tokenizer.pad_token_id == 0 == ref.tokenizer.pad_token_id
    check_against_oracle(ref, pipe, corpus(50, seed=2))


def test_separate_branch_oracle_equals_the_diffusers_pipeline(sd1):
    # the oracle's own fallback, checked where both apply
    ref, _ = sd1
    cond, uncond = oracle_embeds(["a (red:1.3) cat", "dog, " * 60], ref)
    pipe = diffusers_pipeline(ref, SAMPLER)
    for embeds in (cond, uncond):
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds.flip(1), height=SIZE,
                   width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="np")
        expected = (out.images[0] * 255).round().astype(np.uint8)
        got = separate_branches_images(ref, embeds, embeds.flip(1), [torch.Generator("cpu").manual_seed(5)])[0]
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
