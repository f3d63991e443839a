"""Prompts -> what the UNet reads: (context, pooled, time ids), for every family.

The one place that knows how each family turns text into conditioning:

- SD 1.x / 2.x: one CLIP text encoder, its last hidden state after the final layer norm
  (SD 2.x's OpenCLIP already cut to the penultimate layer by its config) is the context.
- SDXL (``StableDiffusionXLPipeline``): both encoders' penultimate hidden states, with no
  final norm, side by side; the pooled, projected embedding of ``text_encoder_2``; and
  six time ids per row, ``original_size + crops_coords_top_left + target_size``. An empty
  negative prompt is all zeros where the model's ``force_zeros_for_empty_prompt`` is set
  (what diffusers does for ``negative_prompt=None``).
  In the web UI's syntax (``TextEncoders.encode``) both encoders read the same chunks, each
  with its own BOS/EOS/pad; each encoder's hidden states are weighted and rescaled on
  their own before the two are joined; the pooled embedding is the first chunk's,
  unweighted, as the web UI takes it.
- the SDXL refiner: ``text_encoder_2`` alone, and five time ids with the aesthetic score
  (6.0, negative 2.5) in place of the target size.

Guided rows stack ``[negative; positive]`` so both branches run in one UNet call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import prompt_encoding
from .prompts import Chunk

SDXL_FAMILIES = ("sdxl", "sdxl_refiner")
# generate()'s micro-conditioning arguments and their defaults (None: from the image size)
OPTIONS = {"original_size": None, "crops_coords_top_left": (0, 0), "target_size": None,
           "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}


@dataclass
class Conditioning:
    """The UNet's inputs besides latents and timesteps, one row per UNet row."""

    context: torch.Tensor  # (N, T, D)
    pooled: torch.Tensor | None = None  # (N, P), SDXL
    time_ids: torch.Tensor | None = None  # (N, 6) or (N, 5), SDXL
    context_mask: torch.Tensor | None = None  # (N, T), True on real keys; None: all are

    def unet_kwargs(self) -> dict[str, torch.Tensor]:
        if self.pooled is None:
            return {}
        return {"pooled": self.pooled, "time_ids": self.time_ids}


class TextEncoders:
    """A family's tokenizers and text encoders, and how that family reads them."""

    def __init__(self, family: str, components: Callable[[], list[tuple[Any, torch.nn.Module]]],
                 force_zeros_for_empty_prompt: bool = False):
        """``components()``: the (tokenizer, text encoder) pairs in use, read at each call,
        so a pipeline whose tokenizer or encoder is swapped (a power user's, a test's)
        encodes with the new one."""
        if not components():
            raise ValueError("a pipeline needs at least one text encoder")
        self.family = family
        self._components = components
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt) and family in SDXL_FAMILIES

    @property
    def encoders(self) -> list[tuple[Any, torch.nn.Module]]:
        return self._components()

    @property
    def is_sdxl(self) -> bool:
        return self.family in SDXL_FAMILIES

    def run(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Rows of ids (N, T), one tensor per encoder -> ``(context,)`` (N, T, D) for SD 1.x
        / 2.x; for SDXL each encoder's penultimate hidden states joined along the features,
        and text_encoder_2's pooled, projected embedding (N, P): ``(context, pooled)``."""
        if not self.is_sdxl:
            return (self.encoders[0][1](ids[0]),)
        hidden, pooled = [], None
        for (_, encoder), rows in zip(self.encoders, ids):
            if hasattr(encoder, "penultimate_and_pooled"):
                h, pooled = encoder.penultimate_and_pooled(rows)
            else:
                h = encoder.penultimate(rows)[0]
            hidden.append(h)
        return torch.cat(hidden, dim=-1), pooled

    def chunks(self, text: str) -> tuple[Chunk, ...]:
        """A text in the web UI's syntax, chunked. SDXL's two tokenizers share CLIP's
        vocabulary (only their pad tokens differ), so the first one's chunks are both's."""
        return prompt_encoding.text_chunks(text, self.encoders[0][0])

    def keys(self, texts: Sequence[str], syntax: str) -> list:
        """What identifies each text's encoding (the pipeline's text cache keys on it): the
        text read plainly; in the web UI's syntax its parsed chunks, so spellings that parse
        alike ("(cat)", "(cat:1.1)") are one entry."""
        if syntax == "plain":
            return list(texts)
        return [("a1111", self.chunks(text)) for text in texts]

    def encode(self, keys: Sequence, syntax: str, run) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One ``(context (S, D), pooled (P,) or None)`` per key of ``keys(texts, syntax)``.
        ``run(ids per encoder)`` is ``run`` above (the caller may group its rows). Plain
        texts are 77 tokens each; in the web UI's syntax every chunk of every text goes
        through ``run`` in one call, each encoder's hidden states are weighted and rescaled
        on their own (``prompt_encoding.emphasize``), and the pooled embedding is each
        text's first chunk's, unweighted."""
        if syntax == "plain":
            out = run([tokenizer(list(keys)) for tokenizer, _ in self.encoders])
            contexts, first = list(out[0]), slice(None)
        else:
            chunked = [chunks for _, chunks in keys]
            flat = [chunk for chunks in chunked for chunk in chunks]
            out = run([prompt_encoding.chunk_ids(flat, tokenizer) for tokenizer, _ in self.encoders])
            weights = prompt_encoding.chunk_weights(flat, out[0].shape[1])
            widths = [encoder.config.hidden_size for _, encoder in self.encoders]
            hidden = torch.cat([prompt_encoding.emphasize(h, weights)
                                for h in out[0].split(widths, dim=-1)], dim=-1)
            contexts, first = prompt_encoding.per_text(hidden, chunked), prompt_encoding.first_chunks(chunked)
        pooled = out[1][first] if len(out) > 1 else [None] * len(contexts)
        return list(zip(contexts, pooled))


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """generate()'s micro-conditioning arguments, checked; each error names its argument."""
    checked = {}
    for name, default in OPTIONS.items():
        value = options.get(name, default)
        if value is None:
            checked[name] = None
        elif name.endswith("aesthetic_score"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
            checked[name] = float(value)
        else:
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
                raise ValueError(f"{name}={value!r} must be two non-negative integers (height, width)")
            checked[name] = tuple(int(v) for v in value)
    return checked


def time_ids(family: str, height: int, width: int, options: dict[str, Any], negative: bool) -> list[float]:
    """One row's time ids, as diffusers' ``_get_add_time_ids`` builds them."""
    original = options.get("original_size") or (height, width)
    crops = options.get("crops_coords_top_left") or (0, 0)
    if family == "sdxl_refiner":
        score = options.get("negative_aesthetic_score" if negative else "aesthetic_score")
        return [*original, *crops, score]
    target = options.get("target_size") or (height, width)
    return [*original, *crops, *target]


def build(text: TextEncoders, encode, prompts: list[str], negatives: list[str], guided: bool,
          height: int, width: int, options: dict[str, Any], dtype: torch.dtype,
          device: torch.device, loras: list | None = None) -> Conditioning:
    """The conditioning of one call: ``encode(texts, sets) -> (contexts, pooled)``, one
    context (S_i, D) per text and the pooled embeddings (B, P) or None (cached by the
    pipeline; ``sets``: each text's row's LoRA set, or None); rows ``[negatives; prompts]``
    when any row is guided, else prompts alone. Contexts of different lengths are padded,
    with the key mask that hides the padding."""
    rows = [(True, negatives), (False, prompts)] if guided else [(False, prompts)]
    # an empty negative is all zeros where the model says so, context and pooled alike
    # (never encoded, LoRA or not; one chunk long: zero keys and values attend to zero at
    # any length)
    zeroed = [negative and text.force_zeros_for_empty_prompt and t == ""
              for negative, texts in rows for t in texts]
    texts = [t for _, texts in rows for t in texts]
    row_sets = None if loras is None else [loras[i] for _, texts in rows for i in range(len(texts))]
    kept = [i for i, zero in enumerate(zeroed) if not zero]
    contexts, pooled = encode([texts[i] for i in kept],
                              None if row_sets is None else [row_sets[i] for i in kept])
    if any(zeroed):
        found = iter(zip(contexts, pooled))
        zero = (torch.zeros_like(contexts[0][: text.encoders[0][0].model_max_length]), torch.zeros_like(pooled[0]))
        contexts, pooled = zip(*[zero if z else next(found) for z in zeroed])
        pooled = torch.stack(pooled)
    context, mask = prompt_encoding.pad_contexts(contexts)
    mask = None if mask is None else mask.to(device)
    if not text.is_sdxl:
        return Conditioning(context, context_mask=mask)
    ids = [time_ids(text.family, height, width, options, negative)
           for negative, texts in rows for _ in texts]
    return Conditioning(context, pooled, torch.tensor(ids, dtype=dtype, device=device), mask)
