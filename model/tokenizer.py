"""CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.x / 2.x use it.

The engine is the ``tokenizers`` library (Rust, batch-parallel), set up exactly as
transformers' ``CLIPTokenizer`` sets it up (transformers 5; transformers 4 calls the
same pipeline ``CLIPTokenizerFast``), so ids match diffusers' pipelines id for id:

1. Special tokens (``<|startoftext|>``, ``<|endoftext|>``, and the pad token, e.g. "!" in
   SD 2.x folders) written in the prompt are cut out first and map straight to their ids.
2. Normalisation: Unicode NFC, every run of whitespace (Unicode ``\\s``) becomes one
   space, then Unicode lower-casing. Nothing else: no ftfy, no accent stripping, no
   removal of control characters, no splitting of CJK characters. (transformers 4's
   slow ``CLIPTokenizer`` without ftfy differs from this on control/format characters,
   which it deletes, and on CJK characters, which it splits one word per character;
   transformers 5 no longer has that slow class, and diffusers uses this pipeline.)
3. Pre-tokenisation: CLIP's regex keeps the special-token strings, the contractions
   's 't 're 've 'm 'll 'd, runs of letters, single digits and runs of other
   non-space characters; whitespace between them is dropped. Each piece is then mapped
   byte by byte to GPT-2's printable byte alphabet.
4. BPE with the merge ranks of ``merges.txt``; the last symbol of each piece carries the
   end-of-word suffix ``</w>``.
5. ``<|startoftext|>`` + ids + ``<|endoftext|>``, truncated so that the whole fits
   ``model_max_length`` (77) with the end token kept last, then padded with the pad token.

Speed: the Rust pipeline costs about 100 us of CPU per prompt (offset tracking, Unicode
regexes). Most prompts are printable ASCII, where steps 2-3 reduce to ``str.lower`` and
an ASCII regex with the same leftmost-first alternation, and the byte mapping is the
identity; those take a Python path that reuses the same BPE model through a per-piece
cache (about 10 us a prompt). Any other prompt, or one that contains a special token's
text, goes through the full pipeline. Tests check both paths against transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

DATA_DIR = Path(__file__).parent / "data" / "clip"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77

# CLIP's pre-tokenizer regex (openai/CLIP simple_tokenizer.py), applied to normalised text.
_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The fast path: prompts of printable ASCII plus tab/CR/LF (whitespace to both regex
# engines; \v, \f and other controls take the full pipeline). After lower-casing,
# \p{L} is [a-z], \p{N} is [0-9] and \s is [\t\n\r ] on such text.
_FAST_TEXT = re.compile(r"[\t\n\r -~]*")
_FAST_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t\n\r a-z0-9]+")
_PIECE_CACHE_SIZE = 100_000  # cleared when full; ordinary prompts reuse few pieces
# Named special tokens in the order transformers registers them; a later one with the
# same text replaces the earlier one's matching flags.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names the file."""


def _special_token(value: Any, source: Path) -> AddedToken:
    """A special token from a config value: a plain string, or an AddedToken dict."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=True,
        )
    raise TokenizerError(f"{source}: cannot read special token {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data



_BPE_OPTIONS = dict(continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS_TOKEN)


def _bpe_from_files(vocab_file: Path, merges_file: Path) -> BPE:
    for path in (vocab_file, merges_file):
        if not path.is_file():
            raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
    return BPE.from_file(str(vocab_file), str(merges_file), **_BPE_OPTIONS)


def _bpe_from_tokenizer_json(path: Path) -> tuple[BPE, dict[str, Any]]:
    """The BPE vocabulary and merges of a ``tokenizer.json``, and the file's whole content
    (its normalizer and pre-tokenizer are checked against CLIP's by the caller)."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model is not a BPE model (got {(model or {}).get('type')!r})")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise TokenizerError(f"{path}: model.vocab / model.merges missing or malformed")
    for key, wanted in (("end_of_word_suffix", "</w>"), ("continuing_subword_prefix", "")):
        if (model.get(key) or "") != wanted:
            raise TokenizerError(f"{path}: model.{key}={model.get(key)!r} is not CLIP's {wanted!r}")
    # tokenizers writes merges as "a b" strings (before 0.20) or as [a, b] pairs
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise TokenizerError(f"{path}: model.merges has an entry that is not a pair")
    return BPE(vocab, pairs, **_BPE_OPTIONS), data


def _comparable(part: Any) -> Any:
    """A pipeline component's JSON without the offset-only flags, which change no id."""
    if isinstance(part, dict):
        return {k: _comparable(v) for k, v in part.items() if k != "trim_offsets"}
    if isinstance(part, list):
        return [_comparable(v) for v in part]
    return part


def _check_clip_pipeline(backend: Tokenizer, file_content: dict[str, Any], source: Path) -> None:
    """A tokenizer.json must describe CLIP's own text pipeline: we run ours (with its fast
    path), so a file that normalises or splits differently is refused, not misread."""
    for part in ("normalizer", "pre_tokenizer"):
        ours = json.loads(getattr(backend, part).__getstate__())
        if _comparable(file_content.get(part)) != _comparable(ours):
            raise TokenizerError(f"{source}: its {part} is not CLIP's ({file_content.get(part)!r})")

class CLIPTokenizer:
    """Prompts -> ``LongTensor[B, model_max_length]`` of CLIP token ids.

    ``CLIPTokenizer.default()`` uses the shipped vocabulary (SD 1.x: padded with
    ``<|endoftext|>``); ``CLIPTokenizer.from_folder(path)`` reads a diffusers
    ``tokenizer/`` folder, including its pad token (SD 2.x: "!", id 0).
    """

    def __init__(
        self,
        vocab_file: str | Path | None = None,
        merges_file: str | Path | None = None,
        *,
        tokenizer_file: str | Path | None = None,
        pad_token: str | AddedToken = EOS_TOKEN,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        special_tokens: Sequence[AddedToken] | None = None,
    ):
        """The BPE model comes from ``vocab_file`` + ``merges_file`` or, instead, from a
        ``tokenizer_file`` (``tokenizer.json``, as transformers 5 saves a tokenizer)."""
        if model_max_length < 2:
            raise TokenizerError(f"model_max_length={model_max_length} leaves no room for BOS and EOS")
        if tokenizer_file is not None:
            source = Path(tokenizer_file)
            bpe, file_pipeline = _bpe_from_tokenizer_json(source)
        else:
            if vocab_file is None or merges_file is None:
                raise TypeError("CLIPTokenizer needs vocab_file and merges_file, or tokenizer_file")
            source = Path(vocab_file)
            bpe, file_pipeline = _bpe_from_files(Path(vocab_file), Path(merges_file)), None
        backend = Tokenizer(bpe)
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        if file_pipeline is not None:
            _check_clip_pipeline(backend, file_pipeline, source)

        # Special tokens are matched on the raw prompt unless their flags say otherwise;
        # the default set is BOS, EOS and the pad token, as transformers registers them.
        if special_tokens is None:
            special_tokens = [
                AddedToken(BOS_TOKEN, special=True, normalized=False),
                AddedToken(EOS_TOKEN, special=True, normalized=False),
                _special_token(pad_token, source),
            ]
        by_text: dict[str, AddedToken] = {}
        for token in special_tokens:
            by_text[token.content] = token
        vocab = backend.get_vocab()
        for text in [BOS_TOKEN, EOS_TOKEN, str(getattr(pad_token, "content", pad_token)), *by_text]:
            if text not in vocab:
                raise TokenizerError(f"{source}: token {text!r} is not in the vocabulary")
        backend.add_special_tokens(list(by_text.values()))

        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token = str(getattr(pad_token, "content", pad_token))
        self.pad_token_id = vocab[self.pad_token]
        self.model_max_length = int(model_max_length)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

        backend.post_processor = processors.RobertaProcessing(
            (EOS_TOKEN, self.eos_token_id),
            (BOS_TOKEN, self.bos_token_id),
            trim_offsets=False,
            add_prefix_space=False,
        )
        # Truncation counts the two added tokens, so EOS always survives as the last id.
        backend.enable_truncation(self.model_max_length)
        backend.no_padding()  # padding is done in __call__, so encode() stays unpadded
        self._backend = backend
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._bpe = backend.model
        self._special_texts = tuple({t.lower() for t in (BOS_TOKEN, EOS_TOKEN, *by_text)})
        self._piece_ids: dict[str, list[int]] = {}
        self._unbounded: Tokenizer | None = None  # the backend without truncation, when needed

    @classmethod
    def default(cls, pad_token: str | None = None) -> CLIPTokenizer:
        """The shipped CLIP vocabulary with SD 1.x conventions (pad with EOS, 77 tokens),
        or another pad token (SDXL's tokenizer_2 pads with "!")."""
        return cls(DATA_DIR / "vocab.json", DATA_DIR / "merges.txt", pad_token=pad_token or EOS_TOKEN)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """A diffusers/transformers tokenizer folder, in either form the ecosystem writes:
        ``vocab.json`` + ``merges.txt`` (the hub's SD folders), or ``tokenizer.json`` alone
        (transformers 5's ``save_pretrained``); with, when present,
        ``tokenizer_config.json`` / ``special_tokens_map.json`` for the pad token, the
        special tokens' matching flags and ``model_max_length``."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder not found: {folder}")
        config_file = folder / "tokenizer_config.json"
        map_file = folder / "special_tokens_map.json"
        json_file = folder / "tokenizer.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        # vocab.json + merges.txt when the folder has either (a folder missing one of the
        # two is reported by name); tokenizer.json otherwise
        use_json = json_file.is_file() and not (folder / "vocab.json").is_file() \
            and not (folder / "merges.txt").is_file()
        files = {"tokenizer_file": json_file} if use_json else \
            {"vocab_file": folder / "vocab.json", "merges_file": folder / "merges.txt"}

        # transformers' rule: a config with added_tokens_decoder is complete on its own;
        # an older one is completed by special_tokens_map.json, whose entries win; a
        # transformers 5 folder keeps the added tokens' flags in tokenizer.json.
        named = {k: config[k] for k in _SPECIAL_NAMES if config.get(k) is not None}
        added = list((config.get("added_tokens_decoder") or {}).values())
        if not added and map_file.is_file():
            named.update({k: v for k, v in _read_json(map_file).items() if k in _SPECIAL_NAMES and v})
        if not added and use_json:
            added = [t for t in _read_json(json_file).get("added_tokens") or [] if t.get("special", True)]
        source = map_file if map_file.is_file() else config_file
        # Names the folder leaves out take transformers' CLIPTokenizer defaults.
        named = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                 "pad_token": EOS_TOKEN, **named}
        tokens = {k: _special_token(v, source) for k, v in named.items()}
        # A named token that the added tokens list takes that entry's flags.
        added_by_text = {t.content: t for t in (_special_token(v, config_file) for v in added)}
        tokens = {k: added_by_text.get(t.content, t) for k, t in tokens.items()}
        for name, wanted in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
            if tokens[name].content != wanted:
                raise TokenizerError(f"{source}: {name} {tokens[name].content!r} is not CLIP's {wanted!r}")
        special_tokens = [*added_by_text.values(), *(tokens[k] for k in _SPECIAL_NAMES)]

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10**6:  # transformers' "no limit"
            max_length = DEFAULT_MAX_LENGTH
        return cls(
            **files,
            pad_token=tokens["pad_token"],
            model_max_length=max_length,
            special_tokens=special_tokens,
        )

    def _check(self, prompts: Sequence[str] | str) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str: {prompt!r}")
        return prompts

    def _fast_ids(self, prompt: str) -> list[int] | None:
        """The ids of an ASCII prompt without special-token text; None for any other."""
        limit = self.model_max_length - 2
        ids = self._fast_tokens(prompt, limit)
        return None if ids is None else [self.bos_token_id, *ids[:limit], self.eos_token_id]

    def _fast_tokens(self, prompt: str, limit: float) -> list[int] | None:
        """At least the first ``limit`` token ids (no BOS/EOS) of an ASCII prompt without
        special-token text; None for any other."""
        if not _FAST_TEXT.fullmatch(prompt):
            return None
        text = prompt.lower()
        if any(special in text for special in self._special_texts):
            return None
        cache = self._piece_ids
        ids: list[int] = []
        for piece in _FAST_SPLIT.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                if len(cache) >= _PIECE_CACHE_SIZE:
                    cache.clear()
                piece_ids = cache[piece] = [token.id for token in self._bpe.tokenize(piece)]
            ids += piece_ids
            if len(ids) >= limit:
                break
        return ids

    def token_ids(self, text: str) -> list[int]:
        """The text's token ids with no BOS/EOS and no length limit (the web-UI prompt
        syntax cuts long prompts into chunks itself)."""
        ids = self._fast_tokens(text, float("inf"))
        if ids is None:
            if self._unbounded is None:
                self._unbounded = Tokenizer.from_str(self._backend.to_str())
                self._unbounded.no_truncation()
            ids = self._unbounded.encode(text, add_special_tokens=False).ids
        return ids

    @property
    def comma_id(self) -> int | None:
        """The id of "," as a word, where the web UI's chunking may break."""
        return self._backend.token_to_id(",</w>")

    def encode(self, prompt: str) -> list[int]:
        """One prompt's ids: BOS, tokens, EOS, truncated to ``model_max_length``, unpadded."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt is a {type(prompt).__name__}, not a str: {prompt!r}")
        ids = self._fast_ids(prompt)
        return self._backend.encode(prompt).ids if ids is None else ids

    def __call__(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """``LongTensor[B, model_max_length]``: BOS, tokens, EOS, then the pad id."""
        prompts = self._check(prompts)
        input_ids = np.full((len(prompts), self.model_max_length), self.pad_token_id, dtype=np.int64)
        slow = []
        for i, prompt in enumerate(prompts):
            ids = self._fast_ids(prompt)
            if ids is None:
                slow.append(i)
            else:
                input_ids[i, : len(ids)] = ids
        if slow:
            for i, encoding in zip(slow, self._encode_batch([prompts[i] for i in slow])):
                ids = encoding.ids
                input_ids[i, : len(ids)] = ids
        return torch.from_numpy(input_ids)

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"pad_token={self.pad_token!r} ({self.pad_token_id}))"
        )
