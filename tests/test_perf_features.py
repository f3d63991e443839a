"""The pipeline's speed features change nothing in the images: text-embedding cache,
chunked VAE decode, cached cross-attention keys/values, one-row timestep embedding,
channels-last layout, the CPU math attention path, and one UNet call per step for CFG."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jobs.model import layers, load_pipeline
from ldm_jobs.model import pipeline as pipeline_module

PROMPTS = ["a red circle", "a blue square", "a red circle"]
SEEDS = [3, 4, 5]
SIZE = 32


@pytest.fixture()
def pipe():
    return load_pipeline("builtin:tiny-random")


def images(pipe, **kwargs) -> np.ndarray:
    args = dict(prompts=PROMPTS, seeds=SEEDS, steps=3, width=SIZE, height=SIZE,
                negative_prompts=["", "ugly", ""], guidance_scale=[7.5, 7.5, 1.0])
    args.update(kwargs)
    return np.stack([np.asarray(im, np.int16) for im in pipe.generate(**args)])


class Counter:
    """Wraps a module's forward, recording the batch size of every call."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.batches.append(args[0].shape[0])


def _uncached(pipe, texts: list[str]) -> torch.Tensor:
    """The texts' plain embeddings straight from the encoder, past the cache."""
    return torch.stack([context for context, _ in pipe._encode(texts, "plain")])


def test_text_cache_encodes_each_distinct_text_once(pipe):
    encoded: list[list[str]] = []
    encode = pipe._encode  # the texts (plain: the keys) each encoder pass is given
    pipe._encode = lambda keys, syntax: encoded.append(list(keys)) or encode(keys, syntax)
    first = images(pipe)
    # "a red circle" twice and "" twice: four distinct texts in one encoder pass
    assert encoded == [["", "ugly", "a red circle", "a blue square"]]
    second = images(pipe)
    assert len(encoded) == 1  # all cached now
    images(pipe, prompts=["a green star"] * 3)
    assert encoded[1:] == [["a green star"]]
    pipe.text_cache_size = 0
    uncached = images(pipe)
    assert len(encoded) == 3 and len(encoded[2]) == 6
    assert np.abs(first - second).max() == 0
    assert np.abs(first - uncached).max() == 0


def test_an_embedding_does_not_depend_on_its_batch_mates(pipe):
    seen = Counter(pipe.text_encoder)
    alone = _uncached(pipe, ["a red circle"])
    amid = _uncached(pipe, [f"filler {i}" for i in range(5)] + ["a red circle"] + ["x"] * 6)
    assert amid.shape[0] == 12
    assert torch.equal(alone[0], amid[5])
    assert set(seen.batches) == {pipeline_module.TEXT_ENCODE_GROUP}  # one shape, padded


def test_text_cache_is_bounded_and_keyed_by_the_model(pipe):
    pipe.text_cache_size = 3
    pipe.encode_text(["a", "b", "c", "d"])
    assert len(pipe._text_cache) == 3
    pipe.encode_text(["d"])  # most recently used entries survive
    assert {key[-1] for key in pipe._text_cache} == {"b", "c", "d"}
    embedding = pipe.encode_text(["b"])
    assert torch.allclose(embedding, _uncached(pipe, ["b"]), atol=1e-5)
    other = load_pipeline("builtin:tiny-random", dtype="bfloat16")
    other._text_cache = pipe._text_cache  # shared dict: the key still tells models apart
    assert other.encode_text(["b"]).dtype == torch.bfloat16
    pipe.clear_text_cache()
    assert not pipe._text_cache


def test_a_swapped_tokenizer_is_used_and_a_dropped_pipeline_is_freed_at_once():
    pipe = load_pipeline("builtin:tiny-random")
    before = pipe.encode_text(["a red circle"])
    pipe.clear_text_cache()
    pipe.tokenizer = lambda texts: torch.ones((len(texts), 77), dtype=torch.long)  # all "
    swapped = pipe.encode_text(["a red circle"])
    assert not torch.equal(before, swapped)
    assert torch.allclose(swapped, pipe.text_encoder(torch.ones((1, 77), dtype=torch.long)), atol=1e-6)
    # no reference cycle holds the weights: dropping the last reference frees them (GPU
    # memory at once, not at the next garbage collection)
    gc.collect()
    gc.disable()
    try:
        alive = weakref.ref(pipe)
        del pipe
        assert alive() is None
    finally:
        gc.enable()


def test_chunked_decode_equals_whole_batch(pipe):
    decoded = Counter(pipe.vae.decoder)
    pipe.decode_chunk_size = 2
    chunked = images(pipe)
    assert decoded.batches == [2, 1]
    pipe.decode_chunk_size = None
    whole = images(pipe)
    assert decoded.batches == [2, 1, 3]
    assert np.abs(chunked - whole).max() <= 1
    with pytest.raises(ValueError, match="decode_chunk_size"):
        type(pipe)(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler_config,
                   name="x", content_hash="x", decode_chunk_size=0)


def test_guidance_is_one_unet_call_per_step_on_both_branches(pipe):
    calls = Counter(pipe.unet)
    images(pipe, steps=4, sampler="euler")
    assert calls.batches == [2 * len(PROMPTS)] * 4
    calls.batches.clear()
    images(pipe, steps=4, sampler="euler", guidance_scale=1.0)
    assert calls.batches == [len(PROMPTS)] * 4


def test_channels_last_changes_nothing_visible(pipe):
    pipe.set_channels_last(True)
    nhwc = images(pipe)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.set_channels_last(False)
    nchw = images(pipe)
    assert pipe.unet.conv_in.weight.is_contiguous()
    assert np.abs(nhwc - nchw).max() <= 1


def test_unet_cached_context_and_shared_timestep(pipe):
    unet = pipe.unet.float()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 4, 4, generator=g)
    context = torch.randn(4, 77, 32, generator=g)
    other = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(latents, torch.full((4,), 321.0), context)
        shared = unet(latents, torch.tensor(321.0), context)  # embedded once, broadcast
        want_other = unet(latents, 321, other)
        with unet.cached_context(context):
            cached = unet(latents, torch.tensor(321.0), context)
            # another context tensor is never served from the cache
            got_other = unet(latents, 321, other)
        assert all(m._kv_cache is None for m in unet.modules() if isinstance(m, layers.Attention))
    assert torch.allclose(shared, want, atol=1e-5)
    assert torch.allclose(cached, want, atol=1e-5)
    assert torch.allclose(got_other, want_other, atol=1e-5)
    assert not torch.allclose(got_other, cached, atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 4, 64, 77, 8), (1, 1, 16, 16, 32)])
def test_cpu_math_attention_matches_sdpa(shape):
    B, H, T, S, D = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
    assert B * H * T * S <= layers.CPU_MATH_ATTENTION_MAX_SCORES  # the math path runs
    assert torch.allclose(layers.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
