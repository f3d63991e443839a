import json

import pytest

from ldm_jobs.jobs.spec import (
    JobSpec,
    SpecError,
    load_spec,
    parse_spec,
    redact_text,
    redact_url,
    spec_schema,
)

BASE = {"input": {"path": "in.parquet"}, "output": {"path": "out"}}


def write_yaml(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_contract():
    spec = parse_spec(BASE)
    assert spec.model == "builtin:shapes"
    assert (spec.output.format, spec.output.image_format, spec.output.rows_per_shard) == (
        "parquet", "png", 256)
    s = spec.sampling
    assert (s.sampler, s.steps, s.guidance_scale, s.width, s.height, s.seed) == (
        "dpmpp_2m", 25, 7.5, None, None, 0)  # None: the model's native size
    assert (s.images_per_prompt, s.negative_prompt, s.strength) == (1, "", 0.75)
    c = spec.compute
    assert (c.actors, c.batch_size, c.gpus_per_actor, c.dtype, c.compile) == (
        1, 8, 0, "float32", False)
    assert spec.storage.endpoint_url is None and spec.storage.region is None
    assert spec.input.prompt_column == "prompt"


def test_yaml_and_json_load(tmp_path):
    path = write_yaml(tmp_path, """
name: demo
input:  {path: examples/prompts.parquet, prompt_column: prompt, id_column: id}
output: {path: out/demo, format: webdataset, image_format: jpeg, rows_per_shard: 16}
sampling: {sampler: euler_ancestral, steps: 4, width: 64, height: 64, seed: 3}
compute: {actors: 2, batch_size: 4}
""")
    spec = load_spec(path)
    assert spec.name == "demo" and spec.output.format == "webdataset"
    assert spec.sampling.sampler == "euler_ancestral" and spec.compute.actors == 2
    as_json = tmp_path / "job.json"
    as_json.write_text(json.dumps(spec.model_dump()))
    assert load_spec(str(as_json)) == spec


def test_set_overrides_are_typed(tmp_path):
    path = write_yaml(tmp_path, "input: {path: a.parquet}\noutput: {path: out}\n")
    spec = load_spec(path, ["sampling.steps=20", "sampling.guidance_scale=3",
                            "compute.compile=true", "sampling.negative_prompt=",
                            "output.path=s3://b/x", "storage.endpoint_url=http://h:9000"])
    assert spec.sampling.steps == 20 and spec.sampling.guidance_scale == 3.0
    assert spec.compute.compile is True and spec.sampling.negative_prompt == ""
    assert spec.output.path == "s3://b/x" and spec.storage.endpoint_url == "http://h:9000"


@pytest.mark.parametrize("override, message", [
    ("sampling.stepz=3", "sampling.stepz: unknown field"),
    ("bogus=1", "bogus: unknown field"),
    ("compute.actors=many", "compute.actors: a whole number of actors >= 1, or auto"),
    ("sampling.steps=0", "sampling.steps: Input should be greater than or equal to 1"),
    ("sampling.steps=1001", "sampling.steps: Input should be less than or equal to 1000"),
    ("sampling.width=7", "sampling.width: must be a multiple of 8"),
    ("sampling.height=4104", "sampling.height: must be a multiple of 8"),
    ("sampling.width=0", "sampling.width: must be a multiple of 8"),
    ("sampling.guidance_scale=.nan", "sampling.guidance_scale: must be a finite number"),
    ("sampling.guidance_scale=.inf", "sampling.guidance_scale: must be a finite number"),
    ("sampling.strength=0", "sampling.strength: must be in (0, 1]"),
    ("sampling.strength=1.5", "sampling.strength: must be in (0, 1]"),
    ("sampling.sampler=heun", "sampling.sampler: Input should be 'ddim'"),
    ("sampling.seed=-1", "sampling.seed: Input should be greater than or equal to 0"),
    ("output.rows_per_shard=0", "output.rows_per_shard: Input should be greater than"),
    ("output.image_format=gif", "output.image_format: Input should be 'png', 'jpeg' or 'webp'"),
    ("output.format=csv", "output.format: Input should be 'parquet' or 'webdataset'"),
    ("compute.actors=0", "compute.actors: a whole number of actors >= 1, or auto (got 0)"),
    ("compute.actors=true", "compute.actors: a whole number of actors >= 1, or auto (got True)"),
    ("compute.max_actors=0", "compute.max_actors: Input should be greater than or equal to 1"),
    ("compute.dtype=int8", "compute.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
    ("storage.secret_access_key=x", "storage.secret_access_key: unknown field"),
    ("sampling.steps.deep=1", "sampling.steps: Input should be a valid integer"),
    ("name.x=1", "name: is not a section"),
    ("no-equals-sign", "expected FIELD=VALUE"),
])
def test_bad_values_name_the_field(tmp_path, override, message):
    path = write_yaml(tmp_path, "name: demo\ninput: {path: a.parquet}\noutput: {path: out}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path, [override])
    assert message in str(caught.value)


def test_bounds_are_accepted(tmp_path):
    spec = parse_spec({**BASE, "sampling": {"width": 8, "height": 4096, "steps": 1000,
                                            "strength": 1.0, "seed": 2**63 - 1}})
    assert spec.sampling.width == 8 and spec.sampling.height == 4096


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(SpecError, match="input: Field required"):
        parse_spec({"output": {"path": "o"}})
    with pytest.raises(SpecError, match="nope.yaml: cannot read"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write_yaml(tmp_path, "input: {path: [\n"))


def test_schema_and_redaction():
    schema = spec_schema()
    assert "input" in schema["properties"] and "sampling" in schema["properties"]
    assert redact_url("https://user:pw@minio:9000/x") == "https://***@minio:9000/x"
    assert redact_url("s3://bucket/key") == "s3://bucket/key"
    assert redact_text('failed: "http://AK:S3CRET#x@h:1/b?q=1" and s3://a:b@c/d') == (
        'failed: "http://***@h:1/b?q=1" and s3://***@c/d')


def test_credentials_in_urls_are_dropped_from_the_spec():
    # Credentials come from the AWS environment only: userinfo never enters the spec, so it
    # cannot reach workers, the manifest, the Ray Jobs entrypoint or an error message.
    with pytest.warns(UserWarning) as warned:
        spec = parse_spec({**BASE, "storage": {"endpoint_url": "http://ak:SECRETKEY@h:9000"},
                           "model": "s3://k:SECRETKEY@bucket/model.safetensors",
                           "input": {"path": "s3://k:SECRETKEY@bucket/in/"},
                           "output": {"path": "s3://k:SECRETKEY@bucket/out"}})
    messages = sorted(str(w.message).split(":")[0] for w in warned)
    assert messages == ["input.path", "model", "output.path", "storage.endpoint_url"]
    assert all("SECRETKEY" not in str(w.message) for w in warned)
    assert spec.storage.endpoint_url == "http://h:9000"
    assert spec.model == "s3://bucket/model.safetensors"
    assert (spec.input.path, spec.output.path) == ("s3://bucket/in/", "s3://bucket/out")
    assert "SECRETKEY" not in json.dumps(spec.model_dump()) + json.dumps(spec.public_dict())
    # The manifest's copy shows that credentials were given, and dropped.
    public = spec.public_dict()
    assert public["storage"]["endpoint_url"] == "http://***@h:9000"
    assert public["input"]["path"] == "s3://***@bucket/in/"
    assert parse_spec(BASE).public_dict()["input"]["path"] == "in.parquet"
    # Plain paths that merely contain '@' are left alone.
    assert parse_spec({**BASE, "output": {"path": "out/a@b"}}).output.path == "out/a@b"
    assert isinstance(spec, JobSpec)


def test_secret_environment_values_are_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEFAKETOKEN")
    text = "denied for wJalrXUtnFEMI/K7MDENG with token FwoGZXIvYXdzEFAKETOKEN"
    assert redact_text(text) == "denied for *** with token ***"
    spec = parse_spec({**BASE, "name": "job-wJalrXUtnFEMI/K7MDENG"})
    assert "wJalrXUtnFEMI" not in json.dumps(spec.public_dict())


@pytest.mark.parametrize("section, values, message", [
    ("sampling", {"steps": True}, "sampling.steps: must be a number, not a boolean"),
    ("sampling", {"guidance_scale": True}, "sampling.guidance_scale: must be a number"),
    ("compute", {"actors": "yes"}, "compute.actors: a whole number of actors >= 1, or auto"),
    ("compute", {"gpus_per_actor": float("inf")}, "compute.gpus_per_actor: Input should be a "
     "finite number"),
    ("sampling", {"seed": 2**64 + 1}, "sampling.seed: Input should be less than or equal to"),
    ("sampling", {"seed": 1.5}, "sampling.seed: Input should be a valid integer"),
    ("sampling", {"steps": 1_000_000}, "sampling.steps: Input should be less than or equal"),
    ("sampling", {"width": 100_000}, "sampling.width: must be a multiple of 8"),
    ("sampling", {"negative_prompt": "x" * 10_001}, "sampling.negative_prompt: String should "
     "have at most 10000 characters"),
    ("sampling", {"negative_prompt": 5}, "sampling.negative_prompt: Input should be a valid"),
    ("sampling", [1, 2], "sampling: Input should be a valid dictionary"),
    ("input", "prompts.parquet", "input: Input should be a valid dictionary"),
    ("output", {"path": ""}, "output.path: String should have at least 1 character"),
    ("input", {"path": "a.parquet", "promt_column": "text"}, "input.promt_column: unknown field"),
])
def test_wrong_types_name_the_field(section, values, message):
    data = {**BASE, section: values if not isinstance(values, dict)
            else {**BASE.get(section, {}), **values}}
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert message in str(caught.value)
