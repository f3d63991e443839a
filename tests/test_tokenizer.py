"""CLIPTokenizer: ids identical to transformers' CLIP tokenizer on an awkward corpus.

The oracle is the tokenizers-backed CLIP tokenizer, the one diffusers' pipelines use:
``transformers.CLIPTokenizer`` in transformers 5 (which has no slow class any more),
called ``CLIPTokenizerFast`` in transformers 4; the name ``CLIPTokenizerFast`` exists in
both. ftfy is not involved: neither side uses it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from ldm_jobs.model.tokenizer import DATA_DIR, CLIPTokenizer, TokenizerError

VOCAB, MERGES = DATA_DIR / "vocab.json", DATA_DIR / "merges.txt"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]

SUBJECTS = [
    "a photograph of an astronaut riding a horse", "a red fox in the snow", "Portrait of an old man",
    "A CASTLE ON A HILL", "two cats sleeping on a sofa", "the Eiffel Tower at night",
    "an isometric pixel-art city", "a bowl of ramen", "Mount Fuji at dawn", "a robot playing chess",
    "a lighthouse during a storm", "a watercolor painting of tulips", "a steampunk airship",
    "New York City street, 1920s", "a koi pond", "a cozy cabin in the woods",
]
STYLES = [
    "highly detailed", "8k", "trending on artstation", "by Greg Rutkowski", "oil on canvas",
    "octane render", "f/1.8, 35mm", "(masterpiece:1.2)", "[[ugly]]", "cinematic lighting",
    "4K UHD", "HDR!!!", "digital art -- v4", "ultra-realistic", "studio ghibli style",
]
EDGE_CASES = [
    "", " ", "   ", "\t", "\n", "\r\n", " leading space", "trailing space   ", "multiple    inner   spaces",
    "tabs\tbetween\twords", "new\nlines\n\nand\r\ncarriage returns", "\u00a0non-breaking\u00a0spaces\u00a0",
    "ideographic\u3000space", "em\u2003space and thin\u2009space", "line\u2028separator",
    "it's a dog's life", "don't stop, can't stop, won't stop", "we're here, they've gone, I'm ok",
    "you'll see, he'd know", "IT'S LOUD, DON'T", "rock 'n' roll", "''quoted''", "`backticks` and \u2019curly\u2019",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade", "cafe\u0301 (combining accent)", "\u00c5ngstr\u00f6m \u00c9T\u00c9",
    "Stra\u00dfe STRASSE", "\u00e6on \u0153uvre \u00f8re", "\u0130stanbul \u0131\u015f\u0131k", "\u039f\u0394\u039f\u03a3 \u03b1\u03b2\u03b3",
    "\u041c\u043e\u0441\u043a\u0432\u0430 \u0437\u0438\u043c\u043e\u0439", "\u0627\u0644\u0642\u0627\u0647\u0631\u0629", "\u05e9\u05dc\u05d5\u05dd",
    "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22",
    "\u4f60\u597d\u4e16\u754c", "\u4e00\u5e45\u5c71\u6c34\u753b", "\u6771\u4eac\u30bf\u30ef\u30fc at night", "\u3072\u3089\u304c\u306a\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8", "\u1112\u1161\u11ab (decomposed hangul)", "mixed \u4e2d\u6587 and English",
    "emoji \U0001f600\U0001f680\U0001f308", "\U0001f468\u200d\U0001f469\u200d\U0001f467 family", "flag \U0001f1ef\U0001f1f5",
    "\u2764\ufe0f heart", "\U0001f44d\U0001f3fd thumbs", "\u2603 \u2602 \u263a",
    "numbers 1234567890", "3.14159 and 2,718", "year 2024, 1st, 2nd, 3rd", "1920x1080", "#hashtag @mention",
    "100% $5 \u20ac10 \u00a320 \u00a5", "a+b=c; x<y>z", "!!!???...", "(((parentheses)))", "{curly} [square] <angle>",
    "path/to/file.png", "https://example.com/a?b=c&d=e", "user@example.com", "C++ and C#", "~`!@#$%^&*()_+-=",
    "&amp; &lt; &gt; &quot; &#39; &nbsp;", "<b>bold</b> <i>italic</i>", "&#x1F600; &#128512;",
    "MiXeD CaSe WoRdS", "ALL CAPS PROMPT", "camelCaseWord and snake_case_word", "hello!", "hello ! world!!",
    "!", "!!", "a ! b", "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "x<|endoftext|>y<|startoftext|>z",
    "<|ENDOFTEXT|> upper", "<|StartOfText|>", "<|endoftext", "endoftext|>", "</w> suffix literal",
    "control\x00chars\x07here\x1b", "zero\u200bwidth\u200cjoin\u200d", "bom\ufeffinside", "replacement \ufffd char",
    "soft\u00adhyphen", "\ufb01 ligature \ufb02", "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 letters \uff11\uff12\uff13",
    "superscript x\u00b2 \u2153 \u2460", "math \U0001d400\U0001d401 bold", "private \ue000 use", "\U000e0041 tag char",
    "a" * 300, "ab" * 200, "word " * 100, ", ".join(["masterpiece"] * 40), "\u4e2d" * 200, "\U0001f600" * 50,
    " ".join(str(i) for i in range(200)),
]


def make_corpus(n_random: int = 260) -> list[str]:
    """Edge cases plus random prompts built from the pieces above; deterministic."""
    rng = random.Random(1234)
    pieces = SUBJECTS + STYLES + EDGE_CASES[:110]
    seps = [", ", " ", ",", " . ", "\t", "\n", "  ", " | ", "; ", ""]
    prompts = list(EDGE_CASES) + list(SUBJECTS)
    for i in range(n_random):
        k = rng.choice([1, 2, 3, 5, 8, 20, 40])  # 20 and 40 pieces run well past 77 tokens
        parts = [rng.choice(pieces) for _ in range(k)]
        text = rng.choice(seps).join(parts)
        if i % 7 == 0:
            text = text.upper()
        if i % 11 == 0:
            text = f"  {text}\t\n"
        prompts.append(text)
    return prompts


CORPUS = make_corpus()


def oracle(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizerFast(str(VOCAB), str(MERGES), **kwargs)


def oracle_ids(tokenizer, prompts: list[str], max_length: int = 77) -> list[list[int]]:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]


def assert_same_ids(ours: torch.Tensor, reference: list[list[int]], prompts: list[str]) -> None:
    got = ours.tolist()
    bad = [(p, g, r) for p, g, r in zip(prompts, got, reference) if g != r]
    assert not bad, f"{len(bad)} of {len(prompts)} prompts differ, first: {bad[0]!r}"


def test_corpus_is_awkward_enough():
    tok = CLIPTokenizer.default()
    lengths = [len(tok._backend.encode(p).ids) for p in CORPUS]
    assert len(CORPUS) >= 300
    assert sum(n == 77 for n in lengths) >= 30  # truncated prompts
    assert "" in CORPUS and any("\t" in p for p in CORPUS)


def test_reference_ids_from_readme():
    ids = CLIPTokenizer.default()(["a photograph of an astronaut riding a horse"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == ASTRONAUT_IDS
    assert (ids[0, 10:] == 49407).all()


def test_default_matches_transformers_on_corpus():
    ours = CLIPTokenizer.default()(CORPUS)
    assert ours.shape == (len(CORPUS), 77)
    assert_same_ids(ours, oracle_ids(oracle(), CORPUS), CORPUS)


def test_ascii_fast_path_matches_full_pipeline():
    """Printable-ASCII prompts skip the Rust pipeline; both paths must give the same ids."""
    tok = CLIPTokenizer.default()
    rng = random.Random(99)
    alphabet = "abcXYZ019 '\t\n\r!?.,<|>_-" + "stdmlrve" * 3
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    fuzz += ["".join(chr(rng.randint(0, 127)) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    fast = 0
    for prompt in CORPUS + fuzz:
        ids = tok._fast_ids(prompt)
        if ids is not None:
            fast += 1
            assert ids == tok._backend.encode(prompt).ids, repr(prompt)
    assert fast > len(CORPUS) // 3 and fast < len(CORPUS) + len(fuzz)  # both paths are exercised


def test_truncation_keeps_eos_last_and_padding():
    tok = CLIPTokenizer.default()
    ids = tok(["word " * 100, "", "a"])
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] != 49407).all()
    assert ids[1].tolist() == [49406] + [49407] * 76
    assert ids[2, :3].tolist() == [49406, 320, 49407]
    assert tok.encode("a") == [49406, 320, 49407]
    assert len(tok.encode("word " * 100)) == 77


def test_batch_equals_single_and_empty_batch():
    tok = CLIPTokenizer.default()
    batch = tok(CORPUS[:50])
    for i, prompt in enumerate(CORPUS[:50]):
        assert torch.equal(tok([prompt])[0], batch[i])
    assert tok([]).shape == (0, 77)
    assert torch.equal(tok("a red fox"), tok(["a red fox"]))


def test_non_string_prompt_names_its_index():
    tok = CLIPTokenizer.default()
    with pytest.raises(TypeError, match="prompt 2 is a int"):
        tok(["a", "b", 3])
    with pytest.raises(TypeError, match="prompt 0 is a NoneType"):
        tok([None])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer(tmp_path / "vocab.json", MERGES)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_bytes(VOCAB.read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(folder)


# ---------------------------------------------------------------- tokenizer folders

def _added(content: str, normalized: bool, key: bool = True) -> dict:
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
             "single_word": False}
    return {"__type": "AddedToken", **token} if key else token


def _sd1_config(pad: str) -> tuple[dict, dict]:
    """tokenizer_config.json + special_tokens_map.json as SD 1.x / 2.x folders ship them."""
    config = {
        "add_prefix_space": False, "bos_token": _added("<|startoftext|>", True), "do_lower_case": True,
        "eos_token": _added("<|endoftext|>", True), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added("<|endoftext|>", True),
    }
    special = {"bos_token": _added("<|startoftext|>", True, key=False),
               "eos_token": _added("<|endoftext|>", True, key=False), "pad_token": pad,
               "unk_token": _added("<|endoftext|>", True, key=False)}
    return config, special


FOLDERS = {
    "sd1": _sd1_config("<|endoftext|>"),
    "sd2": _sd1_config("!"),
    "pad_only": ({"pad_token": "!"}, None),
    "no_config": (None, None),
    # the layout transformers >= 4.34 writes: an added_tokens_decoder, named tokens as strings
    "added_tokens_decoder": ({
        "added_tokens_decoder": {
            "0": {**_added("!", False, key=False), "special": True},
            "49406": {**_added("<|startoftext|>", True, key=False), "special": True},
            "49407": {**_added("<|endoftext|>", False, key=False), "special": True},
        },
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    }, None),
    "max_length_64": ({"pad_token": "<|endoftext|>", "model_max_length": 64}, None),
}
PAD_IDS = {"sd1": 49407, "sd2": 0, "pad_only": 0, "no_config": 49407, "added_tokens_decoder": 0,
           "max_length_64": 49407}


def make_folder(root: Path, name: str) -> Path:
    config, special = FOLDERS[name]
    folder = root / name / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_bytes(VOCAB.read_bytes())
    (folder / "merges.txt").write_bytes(MERGES.read_bytes())
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if special is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_folder_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    folder = make_folder(tmp_path, name)
    ours = CLIPTokenizer.from_folder(folder)
    reference = transformers.CLIPTokenizerFast.from_pretrained(str(folder))
    max_length = 64 if name == "max_length_64" else 77
    assert ours.model_max_length == max_length
    assert ours.pad_token_id == reference.pad_token_id == PAD_IDS[name]
    ids = ours(CORPUS)
    assert ids.shape == (len(CORPUS), max_length)
    assert_same_ids(ids, oracle_ids(reference, CORPUS, max_length), CORPUS)


def test_sd2_pads_with_zero_and_reads_bang_as_pad(tmp_path):
    tok = CLIPTokenizer.from_folder(make_folder(tmp_path, "sd2"))
    ids = tok(["a photograph of an astronaut riding a horse", "hello!"])
    assert ids[0, :10].tolist() == ASTRONAUT_IDS and (ids[0, 10:] == 0).all()
    # "!" is the pad token there, a special token: transformers maps it to 0, not to "!</w>"
    assert ids[1, :4].tolist() == [49406, 3306, 0, 49407]
    assert CLIPTokenizer.default()(["hello!"])[0, :4].tolist() == [49406, 3306, 256, 49407]


def test_bad_folder_config_is_named(tmp_path):
    folder = make_folder(tmp_path, "pad_only")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerError, match="<pad>"):
        CLIPTokenizer.from_folder(folder)


def test_speed_is_reported_not_asserted():
    tok = CLIPTokenizer.default()
    rng = random.Random(5)
    prompts = [", ".join(rng.choice(SUBJECTS + STYLES) for _ in range(rng.randint(1, 10))) for _ in range(10_000)]
    tok(prompts[:100])  # warm-up
    start = time.perf_counter()
    ids = tok(prompts)
    seconds = time.perf_counter() - start
    print(f"\nCLIPTokenizer: 10,000 prompts in {seconds * 1000:.0f} ms ({len(prompts) / seconds:,.0f} prompts/s)")
    assert ids.shape == (10_000, 77)
