"""The web UI's prompt editing and alternation rules (model/prompt_editing.py), pure Python.

Expected schedules are the web UI's: its wiki's and its prompt_parser's documented
examples, and edge cases established by running the web UI's parser (AUTOMATIC1111
stable-diffusion-webui 1.10, default options) on them.
"""

from __future__ import annotations

import pytest

from ldm_jobs.model.prompt_editing import is_scheduled, schedule, text_at
from ldm_jobs.model.prompts import PromptSyntaxError


def entries(*pairs):
    return tuple(pairs)


def test_the_wikis_example_at_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert schedule(prompt, 100) == entries(
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    )


@pytest.mark.parametrize("prompt, expected", [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
])
def test_the_parsers_documented_examples(prompt, expected):
    assert schedule(prompt, 10) == tuple(expected)


@pytest.mark.parametrize("prompt, expected", [
    # when: '.' makes a fraction of the steps, truncated; else a step number; capped
    ("[a:b:0.99]", [(9, "a"), (10, "b")]),
    ("[a:b:1.0]", [(10, "a")]),
    ("[a:b:1.5]", [(10, "a")]),
    ("[a:b:3.5]", [(10, "a")]),          # 35 steps, capped
    ("[a:b:2.]", [(10, "a")]),
    ("[a:b:1e1]", [(10, "a")]),          # no '.': step 10
    ("[a:b:.5e1]", [(10, "a")]),         # a '.': 5 x 10 steps
    ("[a:b:11]", [(10, "a")]),
    ("[a:b:0]", [(10, "b")]),            # below step 1: `to` throughout
    ("[a:b:-1]", [(10, "b")]),
    ("[a:b:0.05]", [(10, "b")]),
    ("[a:b:+3]", [(3, "a"), (10, "b")]),
    ("[a:b:\t3 ]", [(3, "a"), (10, "b")]),
    ("[a: b :0.5]", [(5, "a"), (10, " b ")]),
    ("[:b:3]", [(3, ""), (10, "b")]),
    ("[a::3]", [(3, "a"), (10, "")]),
    # not edits: no number, a word for a number, too many parts
    ("a [cat:dog] x", [(10, "a [cat:dog] x")]),
    ("a ([cat:dog]) x", [(10, "a ([cat:dog]) x")]),
    ("[a:b:1_0]", [(10, "[a:b:1_0]")]),
    ("[a:b:c:3]", [(10, "[a:b:c:3]")]),
    ("(a:b:3)", [(10, "(a:b:3)")]),
    # nesting, and emphasis on either side
    ("a ([cat:dog:2]) x", [(2, "a (cat) x"), (10, "a (dog) x")]),
    ("([a:b:3]:1.5)", [(3, "(a:1.5)"), (10, "(b:1.5)")]),
    ("[(a:1.2):b:3]", [(3, "(a:1.2)"), (10, "b")]),
    ("[a:[b:c:0.7]:0.3]", [(3, "a"), (7, "b"), (10, "c")]),
    ("[a:b:3][c:d:0.5]", [(3, "ac"), (5, "bc"), (10, "bd")]),
    ("[a:b:3](c)", [(3, "a(c)"), (10, "b(c)")]),
    # escapes stay for the emphasis reading; an escaped bracket or colon is text
    ("\\[a:b:3\\]", [(10, "\\[a:b:3\\]")]),
    ("[a\\:b:c:3]", [(3, "a\\:b"), (10, "c")]),
    ("[a\\|b:c:3]", [(3, "a\\|b"), (10, "c")]),
    # a '|' outside an alternation, or a dangling backslash: the prompt as written
    ("a | b [c:d:3]", [(10, "a | b [c:d:3]")]),
    ("(a|b) [c:d:3]", [(10, "(a|b) [c:d:3]")]),
    ("[a|b:3]", [(10, "[a|b:3]")]),
    ("a\\", [(10, "a\\")]),
    ("a\\\nb [c:d:3]", [(10, "a\\\nb [c:d:3]")]),
    # BREAK and line breaks are text here
    ("[a BREAK b:c:3]", [(3, "a BREAK b"), (10, "c")]),
    ("[a\nb:c:3]", [(3, "a\nb"), (10, "c")]),
    # a stray colon between words is text
    ("style: anime, [a:b:3]", [(3, "style: anime, a"), (10, "style: anime, b")]),
])
def test_edge_cases_read_as_the_web_ui_reads_them(prompt, expected):
    assert schedule(prompt, 10) == tuple(expected)


def test_alternations_nest_and_read_the_global_step():
    assert schedule("[a|b|c]", 5) == ((1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b"))
    assert [t for _, t in schedule("[a|[b|c]]", 6)] == ["a", "c"] * 3
    assert [t for _, t in schedule("[a:[b|c]:3]", 6)] == ["a", "a", "a", "c", "b", "c"]
    assert [t for _, t in schedule("[[a|b]:c:3]", 6)] == ["a", "b", "a", "c", "c", "c"]
    assert [t for _, t in schedule("[a|b]x[c|d|e]", 6)] == ["axc", "bxd", "axe", "bxc", "axd", "bxe"]


def test_lora_tags_are_cut_before_scheduling():
    assert schedule("<lora:x:0.5> [a:b:3]", 10) == ((3, " a"), (10, " b"))
    assert schedule("[<lora:x:0.5>a:b:3]", 10) == ((3, "a"), (10, "b"))


def test_the_sampler_counts_its_steps_from_zero():
    """The web UI's sampler matches step k (from 0) to the first entry ending at or after
    k: the first text also takes step 0."""
    edit = schedule("[a:b:3]", 10)
    assert [text_at(edit, k) for k in range(10)] == ["a"] * 4 + ["b"] * 6
    alternation = schedule("[a|b]", 6)
    assert [text_at(alternation, k) for k in range(6)] == ["a", "a", "b", "a", "b", "a"]
    # PNDM makes one call more than its steps: the last text again
    assert text_at(edit, 10) == "b"


def test_is_scheduled():
    assert not is_scheduled(schedule("a (cat:1.2) [x:y]", 10))
    assert not is_scheduled(schedule("[cat:cat:0.5]", 10))
    assert not is_scheduled(schedule("[a:b:0]", 10))
    assert is_scheduled(schedule("[a|b]", 2))


@pytest.mark.parametrize("prompt, match", [
    ("[a:b:1e999]", "not a finite number"),
    ("[a:b:2]]]", "stray"),                   # the web UI reads this one as text...
    ("[a:b:2]]", "stray"),                    # ...and this one as an edit
    ("x :[a:b:2](:", "stray"),
    ("[a:b:2]:(", "stray"),
    ("([a:b:1])(e:1.2)[[", "stray"),          # a run of groups holding an edit, then strays
    ("(" * 2000 + "[a:b:1]", "nested too deeply"),
])
def test_unreadable_schedules_are_refused(prompt, match):
    with pytest.raises(PromptSyntaxError, match=match):
        schedule(prompt, 10)


def test_stray_brackets_set_apart_from_edits_are_plain_text():
    assert schedule("a (unclosed [b", 10) == ((10, "a (unclosed [b"),)
    assert schedule("a [cat:dog:0.5] (unclosed", 10) == ((5, "a cat (unclosed"), (10, "a dog (unclosed"))
    assert schedule("a [cat:dog:0.5] x ]] y", 10) == ((5, "a cat x ]] y"), (10, "a dog x ]] y"))
    assert schedule("((a][:b:c [d:3]", 10) == ((3, "((a][:b:c "), (10, "((a][:b:c d"))  # the web UI's own


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps"):
        schedule("a", 0)
