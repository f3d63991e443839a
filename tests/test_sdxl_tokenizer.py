"""Tokenizer folders as transformers 5 saves them: ``tokenizer.json`` + ``tokenizer_config.json``
and no ``vocab.json`` / ``merges.txt`` (SDXL folders saved today have two of them).

Oracle: the folder is written by ``transformers.CLIPTokenizer(...).save_pretrained`` from the
real CLIP vocabulary, and read back by transformers itself; our ids must be identical on the
awkward corpus of test_tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_jobs.model.tokenizer import DATA_DIR, CLIPTokenizer, TokenizerError
from tests.test_tokenizer import CORPUS, assert_same_ids, oracle_ids

transformers = pytest.importorskip("transformers")

SHARED_CLIP = Path("/work/shared/data/clip")
VOCAB_DIRS = [DATA_DIR] + ([SHARED_CLIP] if (SHARED_CLIP / "vocab.json").is_file() else [])


def save_transformers5(folder: Path, vocab_dir: Path, pad: str) -> Path:
    tok = transformers.CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                                     pad_token=pad)
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("vocab_dir", VOCAB_DIRS, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_json_folder_matches_transformers(tmp_path, vocab_dir, pad):
    folder = save_transformers5(tmp_path / "tokenizer", vocab_dir, pad)
    assert (folder / "tokenizer.json").is_file()
    assert not (folder / "vocab.json").exists() and not (folder / "merges.txt").exists()
    ours = CLIPTokenizer.from_folder(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ours.model_max_length == 77  # the saved config says "no limit": CLIP's 77
    assert ours.pad_token_id == reference.pad_token_id == (0 if pad == "!" else 49407)
    assert_same_ids(ours(CORPUS), oracle_ids(reference, CORPUS), CORPUS)
    # "!" as the pad token is special there: "hello!" ends in id 0, not "!</w>"
    assert ours(["hello!"])[0, :4].tolist() == [49406, 3306, 0 if pad == "!" else 256, 49407]


def test_old_string_merges_and_config_limits(tmp_path):
    """tokenizers before 0.20 wrote merges as "a b" strings; model_max_length is honoured."""
    folder = save_transformers5(tmp_path / "tokenizer", DATA_DIR, "!")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    ours = CLIPTokenizer.from_folder(folder)
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ours.model_max_length == 64
    assert_same_ids(ours(CORPUS), oracle_ids(reference, CORPUS, 64), CORPUS)


def test_foreign_tokenizer_json_is_refused_by_name(tmp_path):
    folder = save_transformers5(tmp_path / "tokenizer", DATA_DIR, "!")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}  # no lower-casing
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="tokenizer.json: its normalizer is not CLIP's"):
        CLIPTokenizer.from_folder(folder)
    data["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="not a BPE model"):
        CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(folder)


def test_pipeline_folder_with_transformers5_tokenizer_loads(tmp_path):
    """The user's report: a diffusers folder saved by current transformers failed to load."""
    from ldm_jobs import load_pipeline
    from tests.tiny_sd import make_reference, save_diffusers_folder

    folder = save_diffusers_folder(make_reference("sd1"), tmp_path / "sd1")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / "tokenizer" / name).unlink()
    save_transformers5(folder / "tokenizer", DATA_DIR, "<|endoftext|>")
    pipe = load_pipeline(str(folder))
    ids = pipe.tokenizer(["a red fox"])
    assert ids.tolist() == oracle_ids(transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                                      ["a red fox"])
    images = pipe.generate(["a red fox"], seeds=[1], steps=2, width=32, height=32)
    assert images[0].size == (32, 32)
