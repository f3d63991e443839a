"""The AUTOMATIC1111 web UI's prompt editing and alternating words -> a schedule of texts.

The web UI reads a prompt's text in two passes: this one decides which text applies at
each sampling step, and each scheduled text is then read for emphasis, ``BREAK`` and
chunks (``prompts.py``). The rules, as its ``prompt_parser`` applies them by default
(version 1.6 on, "use old prompt editing timelines" off):

- ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]``
  has an empty ``from``, ``[from::when]`` an empty ``to``.
- ``when`` is a number (optionally signed, with a fraction and/or an exponent, spaces
  allowed around it). Written with a ``.`` it is a fraction of the steps, else a step
  number; either way it is truncated to a whole step (``int``) and capped at the number
  of steps. ``0.5`` of 25 steps is step 12, ``1.0`` and ``1.5`` are the last step
  (``from`` throughout), ``0`` and anything that truncates below 1 mean ``to`` throughout.
- ``[a|b|c]`` alternates at every step: step s (counted from 1) reads option
  ``(s - 1) mod n``; options may be empty (``[fe|]male``). An alternation nested in
  another reads the same step.
- Edits and alternations nest in each other and inside emphasis (``([a:b:3]:1.5)``
  gives ``(a:1.5)`` then ``(b:1.5)``); their parts may hold emphasis (``[(a:1.2):b:3]``).
- A bracket group that is none of these is left as it is written, for the emphasis
  reading: ``[a:b]`` (no number) is the text ``a:b`` at weight 1/1.1, and ``[a:b:x]``,
  ``[a:b:c:3]``, or an edit whose parts hold an unclosed bracket are literal text too.
- A backslash keeps the next character literal (``\\[``, ``\\:``, ``\\|``; the escape
  itself is left for the emphasis reading). A ``|`` outside any alternation, or a
  backslash at the very end or before a line break, makes the web UI read the whole
  prompt as written, with no edit at all; so do we.
- Where an edit meets brackets or colons that match nothing, the web UI's (ambiguous)
  grammar reads it as an edit or as plain text depending on what follows (``[a:b:2]]``
  is an edit, ``[a:b:2]]]`` is not). Rather than guess, a prompt is refused
  (``PromptSyntaxError``) where a stray bracket or colon and an edit or alternation sit
  in one run of brackets with no text between them; strays set apart by text (``a
  [cat:dog:0.5] (unclosed``) are plain text, as the web UI reads them.
- ``<lora:...>`` tags are cut out first (the web UI removes its extra-network tags before
  scheduling), so a tag inside an edit applies at every step.

The schedule is the web UI's: one ``(last step, text)`` per step where the text may
change (every step an edit switches at, every step with an alternation), the last one
ending at ``steps``. The web UI's sampler then counts its model calls from 0 and uses,
at call k, the first entry whose last step is >= k (``text_at``): the first text also
serves call 0, so ``[a:b:3]`` reads ``a`` for 4 calls of 10 and ``[a|b]`` reads ``a, a,
b, a, b, ...``. We count and choose the same way. The negative prompt is scheduled alike.
img2img: the schedule is over the requested steps and the count starts at the first step
the run makes (the web UI schedules over its ``steps`` and counts only the steps run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .prompts import PromptSyntaxError, split_lora_tags

# a signed number with optional fraction and exponent, as the web UI's grammar reads it
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SPACE = re.compile(r"\s*")
# plain text: anything but brackets, parentheses, ':' and '|'; a backslash takes the next
# character (not a line break) with it
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_LITERAL = "[]():"  # what may stand alone, unmatched, outside every group


class _Unreadable(Exception):
    """The web UI's grammar does not accept the prompt: it is read as written."""


class _Stray(str):
    """A bracket or colon that closes or opens nothing: text."""


@dataclass(frozen=True)
class _Edit:
    before: tuple
    after: tuple
    when: str  # the number as written


@dataclass(frozen=True)
class _Alternation:
    options: tuple


@dataclass(frozen=True)
class _Group:
    """A bracket group kept as written, for the emphasis reading: ``(a)``, ``(a:b)``, ``[a]``."""

    items: tuple


class _Parser:
    """Recursive descent over one prompt. A sequence is a tuple of items: str (text,
    written as it stands), ``_Edit`` or ``_Alternation``."""

    def __init__(self, text: str):
        self.text = text

    def top(self) -> tuple:
        items, pos = [], 0
        while pos < len(self.text):
            part, pos = self.sequence(pos)
            items += part
            if pos < len(self.text):
                if self.text[pos] not in _LITERAL:
                    raise _Unreadable  # a stray '|' or a dangling backslash
                items.append(_Stray(self.text[pos]))  # an unmatched bracket or colon: text
                pos += 1
        return tuple(items)

    def sequence(self, pos: int) -> tuple[list, int]:
        """Well-formed items from ``pos`` until a character none of them can take."""
        items: list = []
        while pos < len(self.text):
            char = self.text[pos]
            plain = _PLAIN.match(self.text, pos)
            if plain:
                items.append(plain.group(0))
                pos = plain.end()
                continue
            group = self.group(pos) if char in "([" else None
            if group is None:
                break
            item, pos = group
            items += item
        return items, pos

    def group(self, pos: int) -> tuple[list, int] | None:
        """A bracketed item at ``pos``, or None when the brackets do not form one."""
        close = ")" if self.text[pos] == "(" else "]"
        first, at = self.sequence(pos + 1)
        if self.peek(at) == close:
            return [_Group((self.text[pos], *first, close))], at + 1
        if close == ")":  # (text:weight) or any (a:b): kept for the emphasis reading
            if self.peek(at) != ":":
                return None
            second, end = self.sequence(at + 1)
            return ([_Group(("(", *first, ":", *second, ")"))], end + 1) if self.peek(end) == ")" else None
        if self.peek(at) == "|":
            return self.alternation([tuple(first)], at)
        if self.peek(at) != ":":
            return None
        when = self.when(at + 1)  # [to:when]
        if when is not None:
            return [_Edit((), tuple(first), when[0])], when[1]
        second, end = self.sequence(at + 1)
        when = self.when(end + 1) if self.peek(end) == ":" else None  # [from:to:when]
        return ([_Edit(tuple(first), tuple(second), when[0])], when[1]) if when else None

    def alternation(self, options: list, at: int) -> tuple[list, int] | None:
        while self.peek(at) == "|":
            option, at = self.sequence(at + 1)
            options.append(tuple(option))
        return ([_Alternation(tuple(options))], at + 1) if self.peek(at) == "]" else None

    def when(self, pos: int) -> tuple[str, int] | None:
        """``spaces NUMBER spaces ]`` at ``pos``: (the number, the position after ']')."""
        pos = _SPACE.match(self.text, pos).end()
        number = _NUMBER.match(self.text, pos)
        if not number:
            return None
        end = _SPACE.match(self.text, number.end()).end()
        return (number.group(0), end + 1) if self.peek(end) == "]" else None

    def peek(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""


def _edit_step(when: str, steps: int, prompt: str) -> int:
    """The last step of an edit's ``from``: a fraction of the steps when written with a
    '.', else a step number; truncated, capped at ``steps`` (may be < 1: never ``from``)."""
    value = float(when) * steps if "." in when else float(when)
    if not math.isfinite(value):
        raise PromptSyntaxError(f"the step {when!r} of a prompt edit in {prompt!r} is not a finite number")
    return min(steps, int(value))


def _render(items: tuple, step: int, whens: dict) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            out.append(_render(item.before if step <= whens[item] else item.after, step, whens))
        elif isinstance(item, _Group):
            out.append(_render(item.items, step, whens))
        else:
            out.append(_render(item.options[(step - 1) % len(item.options)], step, whens))
    return "".join(out)


def _walk(items: tuple):
    """Every edit and alternation in the items, at any depth."""
    for item in items:
        if isinstance(item, _Edit):
            yield item
            yield from _walk(item.before)
            yield from _walk(item.after)
        elif isinstance(item, _Alternation):
            yield item
            for option in item.options:
                yield from _walk(option)
        elif isinstance(item, _Group):
            yield from _walk(item.items)


def schedule(prompt: str, steps: int) -> tuple[tuple[int, str], ...]:
    """The prompt's texts over ``steps`` sampling steps: ``(last step, text)`` in step
    order, the last ending at ``steps`` (see the module docstring). A prompt without
    edits or alternations is one entry, its text without LoRA tags."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    text, _ = split_lora_tags(prompt)
    try:
        items = _Parser(text).top()
    except _Unreadable:
        return ((steps, text),)
    except RecursionError:
        raise PromptSyntaxError(f"{prompt[:80]!r}...: brackets nested too deeply to read") from None
    nodes = list(_walk(items))
    if not nodes:
        return ((steps, text),)
    if _ambiguous(items):
        raise PromptSyntaxError(
            f"{prompt!r}: a prompt edit or alternation touching a stray bracket or colon (one that "
            "matches nothing) is read differently by the web UI depending on its surroundings; "
            "escape the stray character (\\( \\) \\[ \\] \\:), balance it or set it apart with text")
    whens = {node: _edit_step(node.when, steps, prompt) for node in nodes if isinstance(node, _Edit)}
    ends = {steps, *(w for w in whens.values() if w >= 1)}
    if any(isinstance(node, _Alternation) for node in nodes):
        ends.update(range(1, steps + 1))
    return tuple((end, _render(items, end, whens)) for end in sorted(ends))


def text_at(entries: tuple[tuple[int, str], ...], call: int) -> str:
    """The text at the sampler's model call ``call`` (counted from 0): the first entry
    whose last step is at or after it, as the web UI picks."""
    for end, text in entries:
        if call <= end:
            return text
    return entries[0][1]  # past the last step (the web UI's fallback, never reached here)


def is_scheduled(entries: tuple[tuple[int, str], ...]) -> bool:
    """Whether the text changes during sampling."""
    return len({text for _, text in entries}) > 1


def _ambiguous(items: tuple) -> bool:
    """Whether the web UI's reading of these edits is unsure: its grammar is ambiguous
    where brackets or colons that match nothing meet edits, and which reading it picks
    then depends on what follows (``[a:b:2]]`` is an edit, ``[a:b:2]]]`` is not). So:
    a run of bracket groups, edits and stray brackets or colons, with no text between
    them, that holds both a stray and an edit or alternation (at any depth)."""
    run_has_stray = run_has_edit = False
    for item in (*items, ""):
        if isinstance(item, str) and not isinstance(item, _Stray):  # text ends the run
            if run_has_stray and run_has_edit:
                return True
            run_has_stray = run_has_edit = False
        elif isinstance(item, _Stray):
            run_has_stray = True
        else:
            run_has_edit = run_has_edit or any(True for _ in _walk((item,)))
    return False
