"""Prompts -> what the UNet reads: (context, pooled, time ids), for every family.

The one place that knows how each family turns text into conditioning:

- SD 1.x / 2.x: one CLIP text encoder, its last hidden state after the final layer norm
  (SD 2.x's OpenCLIP already cut to the penultimate layer by its config) is the context.
- SDXL (``StableDiffusionXLPipeline``): both encoders' penultimate hidden states, with no
  final norm, side by side; the pooled, projected embedding of ``text_encoder_2``; and
  six time ids per row, ``original_size + crops_coords_top_left + target_size``. An empty
  negative prompt is all zeros where the model's ``force_zeros_for_empty_prompt`` is set
  (what diffusers does for ``negative_prompt=None``).
  In the web UI's syntax (``encode_chunked``) both encoders read the same chunks, each
  with its own BOS/EOS/pad; each encoder's hidden states are weighted and rescaled on
  their own before the two are joined; the pooled embedding is the first chunk's,
  unweighted, as the web UI takes it.
- the SDXL refiner: ``text_encoder_2`` alone, and five time ids with the aesthetic score
  (6.0, negative 2.5) in place of the target size.

Guided rows stack ``[negative; positive]`` so both branches run in one UNet call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

    def __init__(self, family: str, encoders: Sequence[tuple[Any, torch.nn.Module]],
                 force_zeros_for_empty_prompt: bool = False):
        if not encoders:
            raise ValueError("a pipeline needs at least one text encoder")
        self.family = family
        self.encoders = list(encoders)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt) and family in SDXL_FAMILIES

    @property
    def is_sdxl(self) -> bool:
        return self.family in SDXL_FAMILIES

    def run(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: each encoder's penultimate hidden states for its own ids (N, T), joined
        along the features, and text_encoder_2's pooled, projected embedding (N, P)."""
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


def encode_chunked(text: TextEncoders, chunked: Sequence[Sequence[Chunk]], run
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SDXL in the web UI's syntax: one context (chunks x T, D) per text and the pooled
    embeddings (B, P). ``run(ids per encoder)`` is ``TextEncoders.run`` (the caller may
    group its rows); every chunk of every text goes through it in one call."""
    flat = [chunk for chunks in chunked for chunk in chunks]
    hidden, pooled = run([prompt_encoding.chunk_ids(flat, tokenizer) for tokenizer, _ in text.encoders])
    weights = prompt_encoding.chunk_weights(flat, hidden.shape[1])
    # the mean restored is each encoder's own: rescale the two feature blocks apart
    widths = [encoder.config.hidden_size for _, encoder in text.encoders]
    hidden = torch.cat([prompt_encoding.emphasize(h, weights) for h in hidden.split(widths, dim=-1)], dim=-1)
    return prompt_encoding.per_text(hidden, chunked), pooled[prompt_encoding.first_chunks(chunked)]


def pack(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """One text's (S, D) context and (P,) pooled embedding as one flat tensor: the
    pipeline's text cache keeps one tensor per text."""
    return torch.cat([context.reshape(-1), pooled.reshape(-1)])


def unpack(row: torch.Tensor, text: TextEncoders) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``pack``ed row back as (context (S, D), pooled (P,))."""
    pooled_dim = text.encoders[-1][1].config.projection_dim
    width = sum(encoder.config.hidden_size for _, encoder in text.encoders)
    return row[:-pooled_dim].reshape(-1, width), row[-pooled_dim:]


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
    if not text.is_sdxl:
        return Conditioning(context, context_mask=mask)
    ids = [time_ids(text.family, height, width, options, negative)
           for negative, texts in rows for _ in texts]
    return Conditioning(context, pooled, torch.tensor(ids, dtype=dtype, device=device),
                        None if mask is None else mask.to(device))
