"""A job with prompt editing under prompt_syntax: a1111, through the in-process runner:
each image is the one ``generate`` draws for its row, and a row whose schedule cannot be
read is rejected with a reason naming it."""

from __future__ import annotations

import io

import numpy as np
from job_helpers import a1111_job
from PIL import Image

PROMPTS = {"edit": "a [red:blue:0.25] circle", "alternation": "a [cat|dog] x",
           "plain": "a (plain) square", "bad": "a [red:blue:1e999] circle"}
NEGATIVE = "[blurry:ugly:1]"


def test_a_job_with_prompt_edits_draws_what_generate_draws(tmp_path):
    out, errors, drawn = a1111_job(tmp_path, {"id": list(PROMPTS), "prompt": list(PROMPTS.values())},
                                   NEGATIVE)
    assert sorted(out) == ["alternation", "edit", "plain"]
    assert list(errors) == ["bad"] and "prompt" in errors["bad"] and "1e999" in errors["bad"]
    # the edit is read: the first step's text throughout draws another image
    got = np.asarray(Image.open(io.BytesIO(out["edit"]["image"]))).astype(int)
    assert np.abs(got - drawn("a red circle", out["edit"]["seed"])).max() > 1
