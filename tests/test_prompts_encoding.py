"""prompt_syntax="a1111" in the pipeline: plain prompts unchanged, batches that do not leak,
the cache keyed on the parsed form, the pad token, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prompts_oracle import one_thread, reference  # noqa: F401 (an autouse fixture)
from tiny_sd import CLIP_DIR, ours_from_reference

from ldm_jobs.model import prompt_encoding
from ldm_jobs.model.prompts import Chunk
from ldm_jobs.model.tokenizer import CLIPTokenizer

LONG = ", ".join(f"(word{i}:1.2) tree river" for i in range(40))   # 3+ chunks
ARGS = dict(steps=2, sampler="euler", width=32, height=32)


@pytest.fixture(scope="module")
def pipe():
    return ours_from_reference(reference("sd1"))


def arrays(images):
    return np.stack([np.asarray(im) for im in images])


def test_plain_prompts_do_not_change_by_a_bit(pipe):
    prompts = ["a red circle on a blue background", "a small green star, top left: noon",
               "cat", "x " * 74]
    negatives = ["blurry", "", "low quality, jpeg artifacts", ""]
    kwargs = dict(seeds=[1, 2, 3, 4], negative_prompts=negatives, guidance_scale=[7.5, 7.5, 1.0, 3.0], **ARGS)
    plain = arrays(pipe.generate(prompts, prompt_syntax="plain", **kwargs))
    pipe.clear_text_cache()
    webui = arrays(pipe.generate(prompts, prompt_syntax="a1111", **kwargs))
    assert np.array_equal(plain, webui)
    context, mask = pipe.encode_prompts(prompts, "a1111")
    assert mask is None and torch.equal(context, pipe.encode_text(prompts))


def test_syntax_changes_the_image(pipe):
    kwargs = dict(seeds=[1], **ARGS)
    plain = arrays(pipe.generate(["a (red:1.5) circle"], **kwargs))
    webui = arrays(pipe.generate(["a (red:1.5) circle"], prompt_syntax="a1111", **kwargs))
    assert not np.array_equal(plain, webui)


@pytest.mark.parametrize("rows", [
    # (prompt, negative): the short row shares a batch with a long prompt, a long negative
    [("a red circle", "blurry"), (LONG, "blurry")],
    [("a red circle", "blurry"), ("a cat", LONG)],
    [(LONG, ""), ("(cat:1.3) BREAK dog", "[ugly]"), ("a red circle", "blurry")],
])
def test_image_in_a_batch_equals_the_image_alone(pipe, rows):
    prompts, negatives = [p for p, _ in rows], [n for _, n in rows]
    seeds = list(range(10, 10 + len(rows)))
    request = pipe.check(prompts, seeds, negatives, 2, 7.5, "euler", 32, 32, None, 0.75, "a1111")
    together = pipe.denoise(request)
    _, mask, _ = pipe.text_context(request)
    assert mask is not None  # the batch was padded
    for i in range(len(rows)):
        alone = pipe.denoise(pipe.check([prompts[i]], [seeds[i]], [negatives[i]], 2, 7.5, "euler",
                                        32, 32, None, 0.75, "a1111"))
        assert torch.allclose(together[i : i + 1], alone, rtol=0, atol=1e-6), (
            (together[i : i + 1] - alone).abs().max())
        assert np.array_equal(arrays(pipe.decode(together[i : i + 1])), arrays(pipe.decode(alone)))


def test_cache_keys_on_the_parsed_form(pipe):
    pipe.clear_text_cache()
    calls = []
    encode = pipe._encode
    pipe._encode = lambda keys, syntax: calls.append(len(keys)) or encode(keys, syntax)
    try:
        first, _ = pipe.encode_prompts(["a (cat)"], "a1111")
        again, _ = pipe.encode_prompts(["a (cat:1.1)", "a  (cat) <lora:x:0.5>"], "a1111")
        assert calls == [1]  # one text, encoded once for three spellings of one prompt
        assert torch.equal(first[0], again[0]) and torch.equal(first[0], again[1])
        pipe.encode_prompts(["a (cat:1.2)"], "a1111")
        assert calls == [1, 1]
        # a plain text and the same text read in the web-UI syntax are separate entries
        pipe.encode_prompts(["a (cat)"], "plain")
        assert calls == [1, 1, 1]
    finally:
        del pipe._encode


def test_chunk_ids_use_the_tokenizers_pad_token():
    chunk = Chunk((320, 1929), (1.1, 1.0))
    sd1 = CLIPTokenizer.default()
    sd2 = CLIPTokenizer(CLIP_DIR / "vocab.json", CLIP_DIR / "merges.txt", pad_token="!")
    ids1 = prompt_encoding.chunk_ids([chunk], sd1)[0].tolist()
    ids2 = prompt_encoding.chunk_ids([chunk], sd2)[0].tolist()
    assert ids1 == [49406, 320, 1929, 49407] + [49407] * 73
    assert ids2 == [49406, 320, 1929, 49407] + [0] * 73
    weights = prompt_encoding.chunk_weights([chunk], 77)[0]
    assert weights[1].item() == pytest.approx(1.1) and (weights[2:] == 1).all() and weights[0] == 1


def test_emphasis_restores_the_chunk_mean():
    hidden = torch.randn(3, 77, 8) + 0.5
    weights = torch.ones(3, 77)
    weights[0, 5] = 2.0
    weights[2, 1:10] = 0.5
    out = prompt_encoding.emphasize(hidden, weights)
    assert torch.equal(out[1], hidden[1])  # all-ones chunk untouched
    for i in (0, 2):
        assert torch.allclose(out[i].mean(), hidden[i].mean(), atol=1e-6)
        ratio = out[i] / (hidden[i] * weights[i][:, None])
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)


def test_emphasis_with_a_zero_weighted_mean_stays_finite():
    hidden = torch.ones(1, 4, 2)
    weights = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = prompt_encoding.emphasize(hidden, weights)
    assert torch.equal(out, hidden * weights[..., None])


def test_pad_contexts_masks_the_padding():
    a, b = torch.ones(77, 4), torch.full((154, 4), 2.0)
    stacked, mask = prompt_encoding.pad_contexts([a, b])
    assert stacked.shape == (2, 154, 4) and mask.tolist()[0] == [True] * 77 + [False] * 77
    assert mask[1].all() and (stacked[0, 77:] == 0).all()
    assert prompt_encoding.pad_contexts([a, a])[1] is None


def test_bad_syntax_names_the_row(pipe):
    with pytest.raises(ValueError, match=r"negative_prompts\[1\].*1\.2\.3"):
        pipe.generate(["a", "b"], seeds=[1, 2], negative_prompts=["", "(x:1.2.3)"],
                      prompt_syntax="a1111", **ARGS)
    with pytest.raises(ValueError, match="prompt_syntax"):
        pipe.generate(["a"], seeds=[1], prompt_syntax="compel", **ARGS)
    # the plain reading takes any text
    pipe.generate(["(x:1.2.3)"], seeds=[1], **ARGS)
