"""Prompts -> what the UNet reads: (context, pooled, time ids), for every family.

The one place that knows how each family turns text into conditioning:

- SD 1.x / 2.x: one CLIP text encoder, its last hidden state after the final layer norm
  (SD 2.x's OpenCLIP already cut to the penultimate layer by its config) is the context.
- SDXL (``StableDiffusionXLPipeline``): both encoders' penultimate hidden states, with no
  final norm, side by side; the pooled, projected embedding of ``text_encoder_2``; and
  six time ids per row, ``original_size + crops_coords_top_left + target_size``. An empty
  negative prompt is all zeros where the model's ``force_zeros_for_empty_prompt`` is set
  (what diffusers does for ``negative_prompt=None``).
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

    def encode(self, texts: list[str], to_device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (B, T, D), pooled (B, P) or None) for a list of texts."""
        if not self.is_sdxl:
            tokenizer, encoder = self.encoders[0]
            return encoder(to_device(tokenizer(texts))), None
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            ids = to_device(tokenizer(texts))
            if hasattr(encoder, "penultimate_and_pooled"):
                h, pooled = encoder.penultimate_and_pooled(ids)
            else:
                h = encoder.penultimate(ids)[0]
            hidden.append(h)
        return torch.cat(hidden, dim=-1), pooled


def pack(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """One text's (77, D) context and (P,) pooled embedding as one flat tensor: the
    pipeline's text cache keeps one tensor per text."""
    return torch.cat([context.reshape(-1), pooled.reshape(-1)])


def unpack(rows: list[torch.Tensor], text: TextEncoders) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack``'s rows back as (context (B, 77, D), pooled (B, P))."""
    pooled_dim = text.encoders[-1][1].config.projection_dim
    width = sum(encoder.config.hidden_size for _, encoder in text.encoders)
    stacked = torch.stack(rows)
    return stacked[:, :-pooled_dim].reshape(len(rows), -1, width), stacked[:, -pooled_dim:]


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
    """The conditioning of one call: ``encode(texts, sets) -> (context, pooled)`` (cached
    by the pipeline; ``sets``: each text's row's LoRA set, or None); rows ``[negatives;
    prompts]`` when any row is guided, else prompts alone."""
    def sets(rows: list[int]) -> list | None:
        return None if loras is None else [loras[i] for i in rows]

    every = list(range(len(prompts)))
    if not guided:
        context, pooled = encode(prompts, sets(every))
        rows = [(False, len(prompts))]
    elif not text.force_zeros_for_empty_prompt:
        context, pooled = encode([*negatives, *prompts], sets(every + every))
        rows = [(True, len(negatives)), (False, len(prompts))]
    else:
        # an empty negative is all zeros, context and pooled alike (never encoded), LoRA or not
        kept = [i for i, n in enumerate(negatives) if n != ""]
        encoded = [negatives[i] for i in kept]
        context, pooled = encode([*encoded, *prompts], sets(kept + every))
        n_neg = len(encoded)
        zero_ctx, zero_pool = torch.zeros_like(context[:1]), torch.zeros_like(pooled[:1])
        order, k = [], 0
        for n in negatives:
            order.append(None if n == "" else k)
            k += n != ""
        neg_ctx = torch.cat([zero_ctx if i is None else context[i : i + 1] for i in order])
        neg_pool = torch.cat([zero_pool if i is None else pooled[i : i + 1] for i in order])
        context = torch.cat([neg_ctx, context[n_neg:]])
        pooled = torch.cat([neg_pool, pooled[n_neg:]])
        rows = [(True, len(negatives)), (False, len(prompts))]
    if not text.is_sdxl:
        return Conditioning(context)
    ids = [time_ids(text.family, height, width, options, negative)
           for negative, n in rows for _ in range(n)]
    return Conditioning(context, pooled, torch.tensor(ids, dtype=dtype, device=device))
