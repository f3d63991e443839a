"""One ``generate`` call's arguments: checked into a ``GenerationRequest``, and split or
padded into batches. Pure argument handling: the pipeline supplies what its model
bounds (the schedule's length, the VAE's factor)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import composable
from . import samplers as sampling
from .seeds import MAX_SEED, derive_seed

MAX_SIDE = 4096
SIZE_MULTIPLE = 8  # image sides are multiples of 8, as in a job spec (and SD's VAE needs)
# How prompt text is read: diffusers' plain reading (cut at 77 tokens), or the
# AUTOMATIC1111 web UI's emphasis, BREAK and chunks (model/prompts.py).
PROMPT_SYNTAXES = ("plain", "a1111")


@dataclass
class GenerationRequest:
    """The checked arguments of one ``generate`` call."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    guidance_scales: list[float]
    steps: int
    sampler: str
    width: int
    height: int
    init_images: list[Image.Image] | None = None
    strength: float | None = None
    prompt_syntax: str = "plain"
    extra: dict = field(default_factory=dict)
    loras: list | None = None  # per row: a tuple of (Adapter, weight), see lora_rows
    # a two-stage run: (start, end) fractions of the schedule this stage runs, and for the
    # second stage the first stage's latents (see ``generate``'s ``refiner``)
    window: tuple[float | None, float | None] = (None, None)
    init_latents: torch.Tensor | None = None


def _per_row(name: str, value: Any, n: int) -> list:
    """A scalar broadcast to n rows, or a list that must have exactly n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def check(
    prompts, seeds, negative_prompts, steps, guidance_scale, sampler, width, height,
    init_images, strength, prompt_syntax="plain", *, num_train_timesteps: int,
    vae_factor: int,
) -> GenerationRequest:
    """Every argument of a ``generate`` call checked, with an error that names it; the
    model's ``num_train_timesteps`` bounds the steps, its ``vae_factor`` the sizes."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings")
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not a string")
    if negative_prompts is None:
        negative_prompts = ""
    negatives = _per_row("negative_prompts", negative_prompts, n)
    for i, p in enumerate(negatives):
        if not isinstance(p, str):
            raise TypeError(f"negative_prompts[{i}] is {type(p).__name__}, not a string")
    if isinstance(seeds, (int, np.integer)) or not isinstance(seeds, Sequence):
        raise TypeError("seeds must be a list of integers, one per prompt")
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} prompts")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds[{i}] is {type(s).__name__}, not an integer")
        if not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seeds[{i}]={s} is outside [0, 2**63-1]")
    scales = _per_row("guidance_scale", guidance_scale, n)
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)):
            raise TypeError(f"guidance_scale[{i}] is {type(s).__name__}, not a number")
        if not math.isfinite(float(s)):
            raise ValueError(f"guidance_scale[{i}]={s} is not finite")
    if sampler not in sampling.SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(sampling.SAMPLERS)}")
    num_train = int(num_train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__}")
    if not 1 <= int(steps) <= num_train:
        raise ValueError(f"steps={steps} is outside [1, {num_train}]")
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(side).__name__}")
        step = math.lcm(SIZE_MULTIPLE, vae_factor)  # the job spec's rule, and the VAE's
        if not step <= side <= MAX_SIDE or side % step:
            raise ValueError(f"{name}={side}: must be a multiple of {step} between {step} "
                             f"and {MAX_SIDE}")
    images = None
    if init_images is not None:
        if isinstance(init_images, Image.Image) or not isinstance(init_images, Sequence):
            raise TypeError("init_images must be a list of PIL images, one per prompt")
        images = list(init_images)
        if len(images) != n:
            raise ValueError(f"init_images has {len(images)} entries for {n} prompts")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"init_images[{i}] is {type(im).__name__}, not a PIL image")
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)):
            raise TypeError(f"strength must be a number, got {type(strength).__name__}")
        if not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength={strength} is outside (0, 1]")
        if int(int(steps) * float(strength)) < 1:
            raise ValueError(
                f"steps={steps} with strength={strength} leaves no denoising step "
                "(int(steps * strength) must be at least 1)"
            )
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax {prompt_syntax!r} is not one of {list(PROMPT_SYNTAXES)}")
    if prompt_syntax == "a1111":  # a syntax error names its row before any work
        for name, texts in (("prompts", prompts), ("negative_prompts", negatives)):
            for i, text in enumerate(texts):
                try:  # each AND sub-prompt of a prompt on its own (see composable)
                    composable.check_prompt(text, int(steps), positive=name == "prompts")
                except ValueError as error:
                    raise ValueError(f"{name}[{i}]: {error}") from None
    return GenerationRequest(
        prompts=prompts,
        negative_prompts=negatives,
        seeds=[int(s) for s in seeds],
        guidance_scales=[float(s) for s in scales],
        steps=int(steps),
        sampler=sampler,
        width=int(width),
        height=int(height),
        init_images=images,
        strength=float(strength) if images is not None else None,
        prompt_syntax=prompt_syntax,
    )


_ROW_FIELDS = ("prompts", "negative_prompts", "seeds", "guidance_scales", "init_images", "loras")


def with_rows(request: GenerationRequest, rows) -> GenerationRequest:
    """The request with ``rows(values)`` applied to each of its per-row lists."""
    return dataclasses.replace(request, **{
        name: rows(getattr(request, name)) for name in _ROW_FIELDS
        if getattr(request, name) is not None})


def seeds_for(prompts, seeds, seed) -> Any:
    """The per-prompt seeds of a ``generate`` call (see there); checked later by ``check``."""
    if seed is None:
        if seeds is not None or isinstance(prompts, str) or not isinstance(prompts, Sequence):
            return seeds  # check() names whatever is wrong
        return [derive_seed(0, f"{i:08d}") for i in range(len(prompts))]
    if seeds is not None:
        raise TypeError("give seeds (one per prompt) or seed, not both")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed={seed} is outside [0, 2**63-1]")
    count = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, str) else 1
    return [(int(seed) + i) & MAX_SEED for i in range(count)]


def split(request: GenerationRequest, size: int) -> list[GenerationRequest]:
    """The request in consecutive parts of at most ``size`` rows."""
    n = len(request.prompts)
    if n <= size:
        return [request]
    return [with_rows(request, lambda values, i=i: values[i : i + size]) for i in range(0, n, size)]


def pad(request: GenerationRequest, size: int) -> GenerationRequest:
    """The request with its last row repeated up to ``size`` rows."""
    extra = size - len(request.prompts)
    if extra <= 0:
        return request
    return with_rows(request, lambda values: values + [values[-1]] * extra)
