"""The AUTOMATIC1111 web UI's ``AND`` (composable diffusion): where a prompt splits.

The web UI splits a positive prompt into sub-prompts at the word ``AND`` and guides the
image by all of them at once: ``uncond + cfg_scale * sum_i w_i * (cond_i - uncond)``.
Its rules, as its ``prompt_parser`` applies them:

- ``AND`` counts in capitals and as a whole word (a regex word boundary on each side):
  ``a cat AND a dog`` splits, ``a cat and a dog``, ``ANDROID`` and ``X_AND_Y`` do not.
  The split is on the raw text, before emphasis and prompt editing, so an ``AND`` inside
  brackets splits too (each side then reads its own, unbalanced, brackets).
- Each sub-prompt may end in ``:WEIGHT`` (spaces allowed around the colon, a signed
  number written ``3``, ``3.`` or ``.5`` / ``0.5``, no exponent); without one the weight
  is 1.0. The weight and the whitespace at the end are cut off; the whitespace at the
  start is kept (the tokenizer ignores it). A sub-prompt holding a line break is kept
  whole, any ``:WEIGHT`` left in its text, at weight 1.0 (the web UI's pattern cannot
  match across lines).
- An empty sub-prompt (``a cat AND``) is kept as the empty text, at its weight.
- Only the positive prompt is split: a negative prompt reads ``AND`` as a word.
- ``<lora:...>`` tags are cut out before the split (the web UI removes its extra-network
  tags first).

A prompt ``is composed`` when it splits, or when its one sub-prompt had a ``:WEIGHT``
cut off (``a cat:0.5`` is the text ``a cat`` guided at half strength, and ``a cat:1`` the
text ``a cat``); any other prompt is read whole, exactly as without this module.

``generate`` runs the UNet once per step over ``[negatives; every sub-prompt of every
row]`` and combines each row's predictions with its weights (``Composition``). A
composed row always runs its negative, at any guidance scale, as the web UI does (its
``cond_scale`` 1 still reads ``uncond + sum_i w_i * (cond_i - uncond)``); other rows
keep diffusers' rule (at or below 1 the conditional branch alone). The web UI sums its
samplers' denoised images; the sum is affine with the same x and sigma in every term, so
it is the same sum over the UNet's noise predictions, which is where it is taken here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from . import prompt_editing
from .prompts import parse_prompt, split_lora_tags

_AND = re.compile(r"\bAND\b")
# text (lazy, so the weight and trailing spaces are left to the rest), an optional
# ':number' and trailing whitespace; '.' does not cross a line break, as in the web UI
_WEIGHT = re.compile(r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@dataclass(frozen=True)
class SubPrompt:
    text: str
    weight: float


def split_and(text: str) -> tuple[SubPrompt, ...]:
    """A positive prompt (its LoRA tags already cut) as the web UI's sub-prompts and
    their weights; a prompt without ``AND`` is one sub-prompt at weight 1.0, its text
    as the web UI keeps it (trailing whitespace and any ``:WEIGHT`` cut)."""
    parts = []
    for part in _AND.split(text):
        match = _WEIGHT.search(part)
        if match is None:  # a line break inside: the whole part, weight 1
            parts.append(SubPrompt(part, 1.0))
        else:
            parts.append(SubPrompt(match.group(1), 1.0 if match.group(2) is None else float(match.group(2))))
    return tuple(parts)


def is_composed(text: str) -> bool:
    """Whether the web UI composes ``text`` (a positive prompt, LoRA tags not yet cut)
    rather than reading it whole: it splits at ``AND``, or ends in a ``:WEIGHT``."""
    rest = split_lora_tags(text)[0]
    return bool(_AND.search(rest)) or _weighted(rest)


def _weighted(part: str) -> bool:
    match = _WEIGHT.search(part)
    return match is not None and match.group(2) is not None


def sub_prompts(text: str) -> tuple[SubPrompt, ...]:
    """A positive prompt's sub-prompts: ``split_and`` of its text without LoRA tags
    where it is composed, else the prompt itself, whole, at weight 1.0."""
    return split_and(split_lora_tags(text)[0]) if is_composed(text) else (SubPrompt(text, 1.0),)


@dataclass(frozen=True)
class Composition:
    """The sub-prompts of a batch of rows, flattened: ``texts[k]`` belongs to image row
    ``rows[k]`` with weight ``weights[k]``; ``composed[i]`` says whether row i is."""

    texts: tuple[str, ...]
    rows: tuple[int, ...]
    weights: tuple[float, ...]
    composed: tuple[bool, ...]

    @property
    def first(self) -> tuple[int, ...]:
        """The index in ``texts`` of each row's first sub-prompt."""
        return tuple(self.rows.index(i) for i in range(len(self.composed)))


def compose(prompts: Sequence[str]) -> Composition | None:
    """The rows' sub-prompts; None where no row is composed (the batch runs as it would
    without this module)."""
    composed = tuple(is_composed(p) for p in prompts)
    if not any(composed):
        return None
    found = [(part.text, i, part.weight) for i, p in enumerate(prompts) for part in sub_prompts(p)]
    texts, rows, weights = zip(*found)
    return Composition(texts, rows, weights, composed)


def check_prompt(text: str, steps: int, positive: bool) -> None:
    """A prompt or negative read in the web UI's syntax as it will be drawn: its LoRA
    tags, then each sub-prompt's (a positive prompt's) emphasis and prompt-editing
    schedule over ``steps``; raises ``PromptSyntaxError`` naming what cannot be read."""
    parse_prompt(text)
    for part in sub_prompts(text) if positive else (SubPrompt(text, 1.0),):
        parse_prompt(part.text)
        prompt_editing.schedule(part.text, steps)


def unsupported(prompt: str, loras: bool, refiner: bool) -> str | None:
    """Why a composed prompt cannot be drawn with LoRAs (``loras``) or a refiner
    (``refiner``); None where it can (or is not composed). Each sub-prompt's UNet rows
    would need its row's adapters, and two stages would split the composition: neither
    is done yet, so such a row is refused rather than drawn otherwise."""
    what = [name for name, used in (("LoRAs", loras), ("a refiner", refiner)) if used]
    if not what or not is_composed(prompt):
        return None
    return (f"AND / a trailing :WEIGHT (composable diffusion) with {' and '.join(what)} is "
            "not supported under prompt_syntax='a1111'")
