"""Conditioning that changes during sampling: the web UI's prompt editing and alternation.

Under ``prompt_syntax="a1111"`` each prompt and negative prompt has a schedule of texts
(``prompt_editing.schedule``). When any row's text changes, the sampler's model function
asks for the conditioning of each call (``StepConditioning.at``): every row reads its own
text for that call, built exactly as a call without edits builds it (``conditioning.build``:
CFG's ``[negatives; prompts]``, contexts of different lengths padded with the key mask that
keeps each image equal to the one made alone, SDXL's pooled embedding from the same text).
Every distinct text is encoded once per call, whatever the text cache holds; calls that
read the same texts share one conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .conditioning import Conditioning
from .prompt_editing import is_scheduled, schedule, text_at

Schedule = tuple[tuple[int, str], ...]


def schedules(prompts: Sequence[str], negatives: Sequence[str], steps: int
              ) -> tuple[list[Schedule], list[Schedule]] | None:
    """Each prompt's and negative's schedule over ``steps``; None when no text changes
    (such a call is built once, as without the syntax's scheduling)."""
    found = [schedule(text, steps) for text in prompts], [schedule(text, steps) for text in negatives]
    return found if any(is_scheduled(s) for side in found for s in side) else None


def first_texts(prompts: Sequence[str], negatives: Sequence[str], steps: int) -> tuple[list[str], list[str]]:
    """Each prompt's and negative's text at the first step (edits resolved, LoRA tags cut)."""
    return ([schedule(text, steps)[0][1] for text in prompts],
            [schedule(text, steps)[0][1] for text in negatives])


class StepConditioning:
    """The conditioning of each model call of one sampler run."""

    def __init__(self, prompts: list[Schedule], negatives: list[Schedule],
                 build: Callable[[list[str], list[str]], Conditioning]):
        """``build(prompts, negatives)``: one call's conditioning from each row's texts."""
        self.prompts, self.negatives = prompts, negatives
        self._build = build
        self._built: dict[tuple, Conditioning] = {}

    def texts(self, call: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Each row's prompt and negative at model call ``call`` (counted from 0)."""
        return (tuple(text_at(s, call) for s in self.prompts),
                tuple(text_at(s, call) for s in self.negatives))

    def at(self, call: int) -> Conditioning:
        key = self.texts(call)
        if key not in self._built:
            self._built[key] = self._build(list(key[0]), list(key[1]))
        return self._built[key]


def encoder_of(texts: list[str], row_sets: list | None, set_key: Callable,
               encode_rows: Callable[[list[str], list | None], list]):
    """An ``encode(texts, sets) -> (contexts, pooled)`` for ``conditioning.build`` over a
    fixed set of texts, each distinct (text, LoRA set) encoded once, up front.
    ``texts[i]`` is read with ``row_sets[i]`` (None: no LoRA); ``encode_rows(texts, sets)``
    gives one (context, pooled) per text."""
    keys = [(text, None if row_sets is None else set_key(row_sets[i])) for i, text in enumerate(texts)]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    order = sorted(first.values())
    encoded = encode_rows([texts[i] for i in order], None if row_sets is None else [row_sets[i] for i in order])
    memo = {keys[i]: row for i, row in zip(order, encoded)}

    def encode(wanted: list[str], sets: list | None):
        rows = [memo[(text, None if sets is None else set_key(sets[i]))] for i, text in enumerate(wanted)]
        contexts, pooled = zip(*rows)
        return list(contexts), (None if pooled[0] is None else torch.stack(pooled))

    return encode
