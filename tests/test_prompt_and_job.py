"""A job with the web UI's AND under prompt_syntax: a1111, through the in-process runner:
each image is the one ``generate`` draws for its row, and a row that cannot be drawn
(a sub-prompt that cannot be read, AND with LoRAs) is rejected with a reason naming it."""

from __future__ import annotations

import io

import numpy as np
from job_helpers import a1111_job
from PIL import Image

PROMPTS = {"and": "a red circle AND a (blue) square:0.6", "weighted": "a circle:0.5",
           "plain": "a cat and a dog", "bad": "a AND [b:c:1e999]", "lora": "a AND b"}
LORAS = {"lora": "x.safetensors:0.5"}
NEGATIVE = "blurry AND ugly"   # a negative is not split


def test_a_job_with_and_draws_what_generate_draws(tmp_path):
    out, errors, drawn = a1111_job(tmp_path, {"id": list(PROMPTS), "prompt": list(PROMPTS.values()),
                                              "loras": [LORAS.get(k) for k in PROMPTS]}, NEGATIVE)
    assert sorted(out) == ["and", "plain", "weighted"]
    assert sorted(errors) == ["bad", "lora"]
    assert "prompt" in errors["bad"] and "1e999" in errors["bad"]
    assert "prompt" in errors["lora"] and "AND" in errors["lora"] and "LoRAs" in errors["lora"]
    # AND is read: the joined text draws another image
    got = np.asarray(Image.open(io.BytesIO(out["and"]["image"]))).astype(int)
    assert np.abs(got - drawn(PROMPTS["and"].replace("AND", "and"), out["and"]["seed"])).max() > 1
