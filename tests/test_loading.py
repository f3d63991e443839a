"""load_pipeline on each kind of source, end to end against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_sd import diffusers_pipeline, make_reference, save_diffusers_folder

from ldm_jobs.model import load_pipeline


def test_diffusers_folder_generates_like_diffusers(tmp_path):
    ref = make_reference("sd1", seed=3)
    folder = save_diffusers_folder(ref, tmp_path / "tiny-sd")
    pipe = load_pipeline(str(folder))
    ours = pipe.generate(["a blue square"], seeds=[11], steps=4, guidance_scale=6.0,
                         sampler="euler", width=32, height=32)
    theirs = diffusers_pipeline(ref, "euler")(
        ["a blue square"], num_inference_steps=4, guidance_scale=6.0, width=32, height=32,
        generator=[torch.Generator("cpu").manual_seed(11)], output_type="np",
    ).images
    theirs = (theirs * 255).round().astype(np.uint8)
    diff = np.abs(np.asarray(ours[0], np.int16) - theirs[0].astype(np.int16))
    assert diff.max() <= 2
    assert pipe.name == str(folder)
    assert len(pipe.content_hash) == 64


def test_tiny_random_is_deterministic_and_named():
    a = load_pipeline("builtin:tiny-random")
    b = load_pipeline("builtin:tiny-random")
    assert a.name == "builtin:tiny-random"
    assert a.content_hash == b.content_hash
    ia = a.generate(["x"], seeds=[1], steps=2, width=64, height=64)[0]
    ib = b.generate(["x"], seeds=[1], steps=2, width=64, height=64)[0]
    assert ia.size == (64, 64)
    assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_unknown_builtin_lists_what_is_available():
    with pytest.raises(FileNotFoundError, match="tiny-random"):
        load_pipeline("builtin:no-such-model")


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline("builtin:tiny-random", dtype="float8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_gives_finite_images_close_to_float32(dtype):
    full = load_pipeline("builtin:tiny-random")
    half = load_pipeline("builtin:tiny-random", dtype=dtype)
    assert next(half.unet.parameters()).dtype == getattr(torch, dtype)
    # float16 keeps the VAE in float32 (its decoder overflows in float16 on SD models).
    expected_vae = torch.float32 if dtype == "float16" else torch.bfloat16
    assert next(half.vae.parameters()).dtype == expected_vae
    kwargs = dict(seeds=[4], steps=3, width=64, height=64, sampler="euler")
    a = np.asarray(full.generate(["a red star"], **kwargs)[0], np.float32)
    b = np.asarray(half.generate(["a red star"], **kwargs)[0], np.float32)
    assert b.std() > 5  # not a flat (black) image
    assert np.abs(a - b).mean() < 12, "half precision drifted far from float32"


def test_model_folder_loads_from_s3(tmp_path, s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("LDM_JOBS_CACHE", str(tmp_path / "cache"))
    ref = make_reference("sd1", seed=5)
    folder = save_diffusers_folder(ref, tmp_path / "tiny-sd")
    bucket = s3_server.make_bucket(None)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"models/tiny-sd/{path.relative_to(folder)}")
    local = load_pipeline(str(folder))
    remote = load_pipeline(f"s3://{bucket}/models/tiny-sd")
    assert remote.name == f"s3://{bucket}/models/tiny-sd"
    assert remote.content_hash == local.content_hash
    kwargs = dict(seeds=[2], steps=2, width=32, height=32)
    assert np.array_equal(np.asarray(remote.generate(["x"], **kwargs)[0]),
                          np.asarray(local.generate(["x"], **kwargs)[0]))
    with pytest.raises(FileNotFoundError, match="no model found"):
        load_pipeline(f"s3://{bucket}/models/missing")
    # A job spec's storage.endpoint_url is enough, without the AWS endpoint variables.
    from ldm_jobs.jobs.spec import StorageSpec

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("LDM_JOBS_CACHE", str(tmp_path / "cache2"))
    via_spec = load_pipeline(f"s3://{bucket}/models/tiny-sd",
                             storage=StorageSpec(endpoint_url=s3_server.endpoint_url))
    assert via_spec.content_hash == local.content_hash
