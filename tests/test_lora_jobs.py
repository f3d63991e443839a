"""LoRA in jobs: the spec's LoRAs, a per-row `loras` column in its three forms, web-UI
`<lora:NAME:WEIGHT>` tags; the output's `loras` column and the PNG's `Lora hashes:`;
bad LoRAs rejected per row with a reason; validate's listing; resume."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings

import lora_files as lf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from job_helpers import make_spec
from PIL import Image
from tiny_sd import make_reference, ours_from_reference

from ldm_jobs.jobs.images import read_parameters
from ldm_jobs.jobs.lora_check import check_loras
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.rows import parse_loras
from ldm_jobs.jobs.worker import ShardWorker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    warnings.filterwarnings("ignore")
    ref = make_reference("sd1")
    folder = tmp_path_factory.mktemp("loras")
    files = {
        "a": lf.kohya_state(lf.random_peft(ref.unet, lf.UNET_ATTENTION, 4, 1)),
        "b": lf.kohya_state(lf.random_peft(ref.unet, ("to_k", "to_v"), 4, 2),
                            lf.random_peft(ref.text_encoder, lf.TEXT, 4, 3)),
        "c": lf.kohya_state(lf.random_peft(ref.unet, lf.UNET_LOCON, 4, 4)),
    }
    paths = {name: str(lf.save_safetensors(folder / f"{name}.safetensors", state))
             for name, state in files.items()}
    nan = dict(files["a"])
    key = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[key] = torch.full_like(nan[key], float("nan"))
    paths["nan"] = str(lf.save_safetensors(folder / "nan.safetensors", nan))
    return ref, ours_from_reference(ref), folder, paths, key


def file_sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def webui_hash(path: str) -> str:
    """The web UI's hash of a safetensors LoRA: sha256 of the bytes after the header."""
    data = open(path, "rb").read()
    (size,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + size:]).hexdigest()[:12]


def run_shards(spec, pipeline, count=None):
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=pipeline)
    for shard in plan.pending()[:count]:
        worker.run(shard)
    worker.close()
    return plan


def test_loras_column_forms_as_parquet_writes_them(tmp_path):
    """map<string, float>, list<struct<path, weight>> and text, read back from Parquet."""
    forms = {
        "map": pa.array([[("a.safetensors", 0.8), ("s3://b/x.safetensors", -0.5)]],
                        pa.map_(pa.string(), pa.float64())),
        "structs": pa.array([[{"path": "a.safetensors", "weight": 0.8},
                              {"path": "s3://b/x.safetensors", "weight": -0.5}]]),
        "text": pa.array(["a.safetensors:0.8, s3://b/x.safetensors:-0.5"]),
    }
    pq.write_table(pa.table(forms), tmp_path / "forms.parquet")
    row = pq.read_table(tmp_path / "forms.parquet").to_pylist()[0]
    for form in forms:
        assert parse_loras(row[form]) == {"a.safetensors": 0.8, "s3://b/x.safetensors": -0.5}
    assert parse_loras("s3://b/x.safetensors, c.safetensors:2") == {
        "s3://b/x.safetensors": 1.0, "c.safetensors": 2.0}
    for bad in ("a.safetensors:nan", "a.safetensors:abc", 3, [{"path": "", "weight": 1}]):
        with pytest.raises(ValueError):
            parse_loras(bad)


def test_job_rows_carry_their_loras_hashes_and_reasons(tiny, tmp_path):
    ref, ours, folder, paths, nan_key = tiny
    rows = [  # (id, prompt, loras cell)
        ("r0", "a plain one", None),  # the spec's LoRAs
        ("r1", "with b", [(paths["b"], 0.8)]),  # its own column replaces them
        ("r2", "tagged <lora:c:0.7> circle", None),  # the spec's plus a tag
        ("r3", "missing <lora:nope:1>", None),
        ("r4", "bad file", [(paths["nan"], 1.0)]),
        ("r5", "none at all", []),  # an empty map: no LoRA
    ]
    table = pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                      "loras": pa.array([r[2] for r in rows], pa.map_(pa.string(), pa.float64()))})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     sampling={"loras": {paths["a"]: 0.5}, "prompt_syntax": "a1111",
                               "lora_dir": str(folder), "guidance_scale": 5.0},
                     compute={"batch_size": 8})
    lines, ok = check_loras(make_plan(spec), pipeline=ours)
    text = "\n".join(lines)
    assert not ok and "3 row(s)" in text and "nope.safetensors" in text and nan_key in text
    run_shards(spec, ours)
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()}
    errors = {r["id"]: r["reason"] for p in (tmp_path / "out" / "_shards").glob("*.errors.parquet")
              for r in pq.read_table(p).to_pylist()}
    assert sorted(out) == ["r0", "r1", "r2", "r5"] and sorted(errors) == ["r3", "r4"]
    assert "nope.safetensors" in errors["r3"]
    assert paths["nan"] in errors["r4"] and nan_key in errors["r4"]
    record = {k: [(x["name"], x["sha256"], x["weight"]) for x in v["loras"]] for k, v in out.items()}
    assert record["r0"] == [("a", file_sha(paths["a"]), 0.5)]
    assert record["r1"] == [("b", file_sha(paths["b"]), 0.8)]
    assert sorted(record["r2"]) == [("a", file_sha(paths["a"]), 0.5),
                                    ("c", file_sha(paths["c"]), 0.7)]
    assert record["r5"] == []
    assert out["r2"]["prompt"] == "tagged <lora:c:0.7> circle"  # as the web UI records it
    params = read_parameters(out["r2"]["image"])
    assert f'Lora hashes: "a: {webui_hash(paths["a"])}, c: {webui_hash(paths["c"])}"' in params
    assert "Lora hashes" not in read_parameters(out["r5"]["image"])
    # each image is the one its row draws alone (the tag cut from the text)
    for image_id, prompt, loras in (("r2", "tagged  circle", {paths["a"]: 0.5, paths["c"]: 0.7}),
                                    ("r1", "with b", {paths["b"]: 0.8}), ("r5", "none at all", {})):
        alone = ours.generate([prompt], seeds=[out[image_id]["seed"]], steps=2,
                              guidance_scale=5.0, sampler=spec.sampling.sampler, width=16,
                              height=16, loras=[loras])[0]
        got = np.asarray(Image.open(io.BytesIO(out[image_id]["image"]))).astype(int)
        assert np.abs(got - np.asarray(alone)).max() <= 2, image_id
        plain = ours.generate([prompt], seeds=[out[image_id]["seed"]], steps=2,
                              guidance_scale=5.0, sampler=spec.sampling.sampler, width=16,
                              height=16)[0]
        assert (np.abs(got - np.asarray(plain)).mean() > 1) == bool(loras), image_id


def _many_loras_job(tiny, tmp_path, rows: int, loras: int, rows_per_shard: int):
    ref, ours, folder, _, _ = tiny
    paths = [str(lf.save_safetensors(tmp_path / f"l{k:02d}.safetensors", lf.kohya_state(
        lf.random_peft(ref.unet, ("to_q", "to_v"), 4, 100 + k)))) for k in range(loras)]
    chosen = [paths[i % loras] for i in range(rows)]
    table = pa.table({"id": [f"{i:05d}" for i in range(rows)],
                      "prompt": [f"prompt {i}" for i in range(rows)],
                      "loras": [f"{chosen[i]}:{0.5 + (i % 3) / 4}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     sampling={"steps": 1, "guidance_scale": 1.0},
                     output={"rows_per_shard": rows_per_shard}, compute={"batch_size": 8})
    plan = run_shards(spec, ours, count=2)  # interrupted after two shards
    assert len(plan.shards) > 2
    again = make_plan(spec)
    assert len(again.pending()) == len(plan.shards) - 2  # resumes: the two stay
    run_shards(spec, ours)
    assert make_plan(spec).pending() == []
    out = pq.read_table(tmp_path / "out", columns=["id", "loras"]).to_pylist()
    assert sorted(r["id"] for r in out) == [f"{i:05d}" for i in range(rows)]
    shas = {p: file_sha(p) for p in paths}
    for r in out:
        i = int(r["id"])
        assert [(x["name"], x["sha256"], x["weight"]) for x in r["loras"]] == [
            (f"l{i % loras:02d}", shas[chosen[i]], 0.5 + (i % 3) / 4)]


def test_job_over_many_loras_resumes_with_the_right_hashes(tiny, tmp_path):
    _many_loras_job(tiny, tmp_path, rows=48, loras=6, rows_per_shard=12)


@pytest.mark.slow
def test_thousand_rows_over_twenty_loras(tiny, tmp_path):
    _many_loras_job(tiny, tmp_path, rows=1000, loras=20, rows_per_shard=100)
