"""The AUTOMATIC1111 web UI's prompt language -> weighted token chunks (pure Python).

The prompts people share are written for the web UI, so they are read as it reads them:

- ``(text)`` multiplies the weight of its tokens by 1.1, ``[text]`` by 1/1.1 and
  ``(text:1.3)`` by 1.3; nested brackets multiply. A bracket left open is closed at the
  end of the prompt (round ones first, then square, as the web UI does), a closing one
  with nothing open is plain text. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are
  literal characters; any other backslash is dropped.
- Neighbouring pieces of equal weight are joined before tokenising (``\\(x`` tokenises
  as ``(x``), as the web UI joins them.
- ``BREAK``, in capitals and as a word, ends the current chunk. (Inside brackets the web
  UI multiplies its marker's weight and then reads it as the word "BREAK" with a negative
  weight, an accident of its implementation; here it stays a break.)
- ``<lora:NAME>`` and ``<lora:NAME:WEIGHT>`` tags are cut out before any of this and
  returned apart: they pick adapters, they are not text.
- Tokens go in chunks of 75. A chunk that is full when the next token is not a comma
  breaks after its last comma when that comma is among its last 20 tokens, carrying the
  tokens after it over to the next chunk; a chunk is never empty unless the prompt is, or
  a ``BREAK`` closes one with nothing in it (the web UI keeps that empty chunk too).

Prompt editing (``[from:to:when]``, ``[to:when]``, ``[from::when]``) and alternating words
(``[a|b]``) come first: ``prompt_editing.py`` turns a prompt into the text of each sampling
step, by the web UI's rules, and each of those texts is then read here.
Before either, a positive prompt may split at the web UI's ``AND`` into weighted
sub-prompts (``composable.py``), each read on its own by both.

The encoder side (BOS + 75 + EOS/pad, the weights applied to the hidden states) is in
``prompt_encoding.py``; this module knows nothing of tensors, so it serves every tokenizer
(SDXL's two included): the caller passes the tokenizing function and the comma's id.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROUND = 1.1
SQUARE = 1 / 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20

# One lexical item of the emphasis syntax, leftmost alternative first: escapes, brackets,
# a weight closing a round bracket, runs of ordinary text, and a colon that is just text.
_ITEM = re.compile(
    r"\\[()\[\]\\]?"               # escape (a lone backslash escapes nothing)
    r"|[(\[]"                      # opening bracket
    r"|:\s*([+-]?[.\d]+)\s*\)"     # ':1.3)' closes a round bracket with that weight
    r"|[)\]]"                      # closing bracket
    r"|[^\\()\[\]:]+"              # ordinary text
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA_TAG = re.compile(r"<lora:([^>]*)>")


class PromptSyntaxError(ValueError):
    """A prompt the web-UI syntax cannot read (a weight that is not a number, a bad tag)."""


@dataclass(frozen=True)
class Fragment:
    """A run of text with one weight, or a ``BREAK`` (``is_break``, text and weight unused)."""

    text: str
    weight: float
    is_break: bool = False


BREAK = Fragment("BREAK", 1.0, is_break=True)


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


@dataclass(frozen=True)
class Chunk:
    """Up to 75 token ids (no BOS/EOS) and the weight of each."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def split_lora_tags(text: str) -> tuple[str, tuple[LoraTag, ...]]:
    """The text without its ``<lora:NAME[:WEIGHT]>`` tags, and the tags in order."""
    tags = []
    for match in _LORA_TAG.finditer(text):
        parts = match.group(1).split(":")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise PromptSyntaxError(f"{match.group(0)!r} is not <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            weight = float(parts[1]) if len(parts) == 2 else 1.0
        except ValueError:
            raise PromptSyntaxError(f"{match.group(0)!r}: the weight {parts[1]!r} is not a number") from None
        tags.append(LoraTag(name, weight))
    return _LORA_TAG.sub("", text), tuple(tags)


def parse_emphasis(text: str) -> list[Fragment]:
    """The text as weighted fragments and breaks (see the module docstring)."""
    pieces: list[list] = []  # [text, weight] or the BREAK marker, weights still growing
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not BREAK:
                piece[1] *= factor

    for match in _ITEM.finditer(text):
        item, weight = match.group(0), match.group(1)
        if item.startswith("\\"):
            pieces.append([item[1:], 1.0])
        elif item == "(":
            open_round.append(len(pieces))
        elif item == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"weight {weight!r} in {item!r} is not a number") from None
            scale_from(open_round.pop(), factor)
        elif item == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif item == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(item)):
                if i:
                    pieces.append(BREAK)
                pieces.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)

    fragments: list[Fragment] = []
    for piece in pieces or [["", 1.0]]:
        if piece is BREAK:
            fragments.append(BREAK)
        elif fragments and not fragments[-1].is_break and fragments[-1].weight == piece[1]:
            fragments[-1] = Fragment(fragments[-1].text + piece[0], piece[1])
        else:
            fragments.append(Fragment(piece[0], piece[1]))
    return fragments


def chunk_fragments(
    fragments: Sequence[Fragment],
    tokenize: Callable[[str], Sequence[int]],
    comma_id: int | None,
    size: int = CHUNK_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
) -> tuple[Chunk, ...]:
    """Weighted fragments -> chunks of at most ``size`` tokens (see the module docstring).

    ``tokenize(text)`` gives a text's ids without BOS/EOS and without a length limit;
    ``comma_id`` is the id of "," as a word (None: never backtrack).
    """
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ``tokens`` of the current chunk's last comma

    def close(keep: int) -> None:
        # the chunk ends after ``keep`` tokens; the rest start the next one
        nonlocal tokens, weights, last_comma
        chunks.append(Chunk(tuple(tokens[:keep]), tuple(weights[:keep])))
        tokens, weights, last_comma = tokens[keep:], weights[keep:], -1

    for fragment in fragments:
        if fragment.is_break:
            close(len(tokens))
            continue
        for token in tokenize(fragment.text):
            if token == comma_id:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= backtrack:
                close(last_comma + 1)
            if len(tokens) == size:
                close(size)
            tokens.append(token)
            weights.append(fragment.weight)
    if tokens or not chunks:
        close(len(tokens))
    return tuple(chunks)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt read in the web UI's syntax: its fragments and the LoRA tags cut from it."""

    fragments: tuple[Fragment, ...]
    loras: tuple[LoraTag, ...]

    def chunks(self, tokenize: Callable[[str], Sequence[int]], comma_id: int | None) -> tuple[Chunk, ...]:
        return chunk_fragments(self.fragments, tokenize, comma_id)

    @property
    def plain(self) -> bool:
        """No emphasis and no break: the text would read the same without the syntax."""
        return all(not f.is_break and f.weight == 1.0 for f in self.fragments)


def parse_prompt(text: str) -> ParsedPrompt:
    """LoRA tags cut out, then the emphasis syntax read."""
    if not isinstance(text, str):
        raise TypeError(f"prompt is a {type(text).__name__}, not a str")
    rest, loras = split_lora_tags(text)
    return ParsedPrompt(tuple(parse_emphasis(rest)), loras)
