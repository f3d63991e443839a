"""The web-UI prompt language (model/prompts.py): the web UI's documented examples as facts."""

from __future__ import annotations

import pytest

from ldm_jobs.model.prompts import (
    BREAK,
    Fragment,
    LoraTag,
    PromptSyntaxError,
    chunk_fragments,
    parse_emphasis,
    parse_prompt,
    split_lora_tags,
)


def pairs(text):
    return [("BREAK", -1) if f.is_break else (f.text, f.weight) for f in parse_emphasis(text)]


# The examples of the web UI's prompt_parser.parse_prompt_attention docstring (values
# exactly as it prints them, float rounding included).
WEBUI_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
]


@pytest.mark.parametrize("text, expected", WEBUI_EXAMPLES)
def test_webui_docstring_examples(text, expected):
    assert pairs(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("((x))", [("x", 1.1 * 1.1)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", (1 / 1.1) * (1 / 1.1))]),
    ("(x:1.5)", [("x", 1.5)]),
    ("(x: 0.25 )", [("x", 0.25)]),               # spaces around the weight
    ("((x:2))", [("x", 2 * 1.1)]),
    ("[(x:2)]", [("x", 2 / 1.1)]),
    ("x:2)", [("x:2)", 1.0)]),                  # a weight with no open bracket is text
    ("a) b]", [("a) b]", 1.0)]),                # closing with nothing open is text
    ("[x:2]", [("x:2", 1 / 1.1)]),              # square brackets take no weight
    ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1)]),
    ("a\\\\b", [("a\\b", 1.0)]),                # \\ is one backslash
    ("a\\b", [("ab", 1.0)]),                    # a lone backslash is dropped
    ("\\(x\\)", [("(x)", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("time: noon", [("time: noon", 1.0)]),
])
def test_emphasis(text, expected):
    assert pairs(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),         # capitals only
    ("aBREAK b", [("aBREAK b", 1.0)]),           # a word only
    ("BREAKING news", [("BREAKING news", 1.0)]),
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1), ("", 1.0), ("b", 1.1)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),  # still a break inside brackets
])
def test_break(text, expected):
    assert pairs(text) == expected


def test_bad_weight_is_an_error():
    with pytest.raises(PromptSyntaxError, match="1.2.3"):
        parse_emphasis("(x:1.2.3)")


def test_lora_tags_cut_out():
    text, tags = split_lora_tags("a cat <lora:film grain:0.7>, (sharp) <lora:detail>")
    assert text == "a cat , (sharp) "
    assert tags == (LoraTag("film grain", 0.7), LoraTag("detail", 1.0))
    parsed = parse_prompt("<lora:x:-0.5>(a)")
    assert parsed.loras == (LoraTag("x", -0.5),)
    assert parsed.fragments == (Fragment("a", 1.1),)
    for bad in ("<lora::1>", "<lora:x:heavy>", "<lora:x:1:2>"):
        with pytest.raises(PromptSyntaxError):
            split_lora_tags(bad)


def test_plain():
    assert parse_prompt("a photo of a cat, 4k").plain
    assert not parse_prompt("a (photo)").plain
    assert not parse_prompt("a BREAK b").plain


# ---------------------------------------------------------------- chunking
COMMA = 0


def words(text):
    """A stand-in tokenizer: one id per word, "," is COMMA, "wN" is N."""
    return [COMMA if w == "," else int(w[1:]) for w in text.replace(",", " , ").split()]


def prompt(*tokens):
    return " ".join("," if t == COMMA else f"w{t}" for t in tokens)


def chunks_of(text_or_fragments, **kw):
    fragments = parse_emphasis(text_or_fragments) if isinstance(text_or_fragments, str) else text_or_fragments
    return [(list(c.tokens), list(c.weights)) for c in chunk_fragments(fragments, words, COMMA, **kw)]


def test_chunks_split_at_75_without_a_comma():
    ids = list(range(1, 161))
    got = chunks_of(prompt(*ids))
    assert [c[0] for c in got] == [ids[:75], ids[75:150], ids[150:]]
    assert all(w == 1.0 for c in got for w in c[1])


def test_exactly_75_is_one_chunk():
    assert len(chunks_of(prompt(*range(1, 76)))) == 1
    assert len(chunks_of(prompt(*range(1, 77)))) == 2


def test_comma_backtrack_within_last_20():
    # a comma at index 60 of the first chunk: 75 - 60 = 15 <= 20, so the chunk ends after it
    ids = list(range(1, 61)) + [COMMA] + list(range(100, 130))
    got = chunks_of(prompt(*ids))
    assert got[0][0] == ids[:61]
    assert got[1][0] == ids[61:]


def test_comma_too_early_does_not_backtrack():
    # comma at index 50: 75 - 50 = 25 > 20, plain cut at 75
    ids = list(range(1, 51)) + [COMMA] + list(range(100, 140))
    got = chunks_of(prompt(*ids))
    assert got[0][0] == ids[:75]


def test_comma_as_76th_token_starts_the_next_chunk():
    # the full chunk closes as it is; the comma opens chunk 2 but is not remembered there
    ids = list(range(1, 76)) + [COMMA] + list(range(200, 290))
    got = chunks_of(prompt(*ids))
    assert got[0][0] == ids[:75]
    assert got[1][0] == ids[75:150]


def test_backtrack_carries_weights():
    text = prompt(*range(1, 70)) + " , (" + prompt(500, 501, 502, 503, 504, 505, 506) + ")"
    got = chunks_of(text)
    assert got[0][0] == list(range(1, 70)) + [COMMA]
    assert got[1] == ([500, 501, 502, 503, 504, 505, 506], [1.1] * 7)


def test_break_chunks():
    assert chunks_of("w1 w2 BREAK w3") == [([1, 2], [1.0, 1.0]), ([3], [1.0])]
    assert chunks_of("BREAK w3") == [([], []), ([3], [1.0])]     # the web UI keeps the empty one
    assert chunks_of("w1 BREAK") == [([1], [1.0])]
    assert chunks_of("") == [([], [])]
    full = prompt(*range(1, 76))
    assert len(chunks_of(full + " BREAK w9")) == 2
    assert chunks_of([BREAK, BREAK]) == [([], []), ([], [])]


def test_backtrack_can_be_turned_off():
    ids = list(range(1, 61)) + [COMMA] + list(range(100, 130))
    assert chunks_of(prompt(*ids), backtrack=0)[0][0] == ids[:75]
