"""A job on a tiny SDXL model, with and without the refiner stage, run in process.

The rows must be what ``generate`` gives called directly (same seed, same arguments), at
the model's native size when the spec leaves the size out, and the manifest must record
the family and the refiner.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_jobs import load_pipeline
from ldm_jobs.jobs.errors import ModelLoadError
from ldm_jobs.jobs.plan import check_model
from ldm_jobs.jobs.runner import run_job
from ldm_jobs.jobs.spec import SpecError, parse_spec
from tests.tiny_sdxl import make_sdxl, save_sdxl_folder

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-job")
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red fox", "a castle"]}), root / "prompts.parquet")
    return (root, save_sdxl_folder(make_sdxl("sdxl", seed=1), root / "base"),
            save_sdxl_folder(make_sdxl("sdxl_refiner", seed=2), root / "refiner"))


def job(root, base, out: str, **extra) -> dict:
    return {"name": "sdxl", "model": str(base), "input": {"path": str(root / "prompts.parquet")},
            "output": {"path": str(root / out)}, "sampling": {"steps": 3, "sampler": "euler"},
            "compute": {"actors": 1, "batch_size": 1}, **extra}


def rows_and_manifest(root, out: str):
    table = pq.read_table(sorted((root / out).glob("part-*.parquet"))).to_pylist()
    return table, json.loads((root / out / "_manifest.json").read_text())


def test_sdxl_job_with_and_without_refiner_matches_generate(folders):
    root, base_folder, refiner_folder = folders
    base, refiner = load_pipeline(str(base_folder)), load_pipeline(str(refiner_folder))
    run_job(parse_spec(job(root, base_folder, "plain")), progress=False, in_process=True)
    run_job(parse_spec(job(root, base_folder, "refined", refiner={"model": str(refiner_folder),
                                                                  "switch_at": 0.5})),
            progress=False, in_process=True)
    images = {}
    for out, stage in (("plain", {}), ("refined", {"refiner": refiner, "switch_at": 0.5})):
        rows, manifest = rows_and_manifest(root, out)
        assert len(rows) == 2 and manifest["model"]["family"] == "sdxl"
        for row in rows:
            assert (row["width"], row["height"]) == base.native_size  # the spec left them out
            ours = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
            direct = base.generate([row["prompt"]], seeds=[row["seed"]], negative_prompts=[row["negative_prompt"]],
                                   steps=row["steps"], guidance_scale=row["guidance_scale"],
                                   sampler=row["sampler"], **stage)[0]
            # the job runs with its own torch thread count: kernels may round differently
            diff = np.abs(ours.astype(np.float32) - np.asarray(direct))
            assert diff.max() <= 2 and diff.mean() <= 0.5, (out, row["id"], diff.max(), diff.mean())
            images[out, row["id"]] = ours
    assert all(np.abs(images["plain", i].astype(int) - images["refined", i]).max() > 2 for i in "ab")
    _, manifest = rows_and_manifest(root, "refined")
    stage = manifest["model"]["refiner"]
    assert stage["family"] == "sdxl_refiner" and stage["switch_at"] == 0.5
    assert stage["source"] == str(refiner_folder) and stage["hash"] == f"sha256:{refiner.content_hash}".replace(
        "sha256:sha256:", "sha256:")
    assert "refiner" not in rows_and_manifest(root, "plain")[1]["model"]


def test_refiner_spec_is_checked(folders, tmp_path):
    root, base_folder, refiner_folder = folders
    with pytest.raises(SpecError, match="switch_at"):
        parse_spec(job(root, base_folder, "x", refiner={"model": str(refiner_folder), "switch_at": 1.0}))
    with pytest.raises(SpecError, match="refiner.model"):
        check_model(parse_spec(job(root, base_folder, "x", refiner={"model": str(tmp_path / "nowhere")})))
    # the families are checked when the models load: the base must be SDXL, the refiner its refiner
    for model, refiner_model, says in ((refiner_folder, refiner_folder, "SDXL base"),
                                       (base_folder, base_folder, "not an SDXL refiner")):
        spec = parse_spec(job(root, model, "bad", refiner={"model": str(refiner_model)}))
        with pytest.raises(ModelLoadError, match=says):
            run_job(spec, progress=False, in_process=True)


def test_the_refiner_is_part_of_each_shard_fingerprint(folders):
    """A resume with another refiner (or none) must redo the shards, not keep them."""
    from ldm_jobs.jobs.plan import make_plan

    root, base_folder, refiner_folder = folders
    prints = [[shard.fingerprint for shard in make_plan(parse_spec(job(root, base_folder, "fp", **extra))).shards]
              for extra in ({}, {"refiner": {"model": str(refiner_folder)}},
                            {"refiner": {"model": str(refiner_folder), "switch_at": 0.5}})]
    assert len({tuple(p) for p in prints}) == 3
