"""What tripped a new user in their first hour (issue 16): errors that came too late or
looked like crashes, and messages that misled."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import write_yaml

from ldm_jobs.jobs import cli
from ldm_jobs.jobs.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def job(tmp_path: Path) -> dict:
    """Three prompts, one shard each, on the tiny random model."""
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["one", "two", "three"]}),
                   tmp_path / "prompts.parquet")
    return {"name": "first-hour", "model": "builtin:tiny-random",
            "input": {"path": str(tmp_path / "prompts.parquet")},
            "output": {"path": str(tmp_path / "out"), "rows_per_shard": 1},
            "sampling": {"steps": 2, "width": 16, "height": 16},
            "compute": {"actors": 1, "batch_size": 1}}


_write = write_yaml


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "ldm_jobs", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- 1. an output that cannot be written: exit 2 before any work ---------------------

def _unwritable(tmp_path: Path, where: str) -> str:
    if where == "proc":
        return "/proc/ldm-out"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return str(blocker / "out")


@pytest.mark.parametrize("where", ["proc", "under a file"])
def test_unwritable_output_fails_validate_and_run_before_any_work(tmp_path, job, capsys,
                                                                  where) -> None:
    job["output"]["path"] = _unwritable(tmp_path, where)
    spec = _write(tmp_path, job)
    assert main(["validate", spec]) == 2
    err = capsys.readouterr().err
    assert f"output.path: {job['output']['path']}: cannot create the output folder" in err
    # `run` in its own process: it must stop before starting Ray or loading the model.
    result = _cli("run", spec)
    assert result.returncode == 2, result.stderr
    assert "cannot create the output folder" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr


def test_a_write_that_cannot_succeed_is_not_retried(tmp_path, job, ray_cluster) -> None:
    """The output was writable when planned, then a file took the place of `_shards/`:
    the first shard's commit fails with "File exists" / "Not a directory". Retrying
    cannot mend that: the job stops at once, naming the path and the reason."""
    import ray.cloudpickle

    from ldm_jobs.jobs.runner import JobFailed, run_job
    from ldm_jobs.jobs.spec import parse_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = parse_spec(job)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    with pytest.raises(JobFailed) as raised:
        run_job(spec, progress=False,
                worker_factory=_blocked_records_factory(str(attempts)))
    message = str(raised.value)
    assert "_shards" in message and "not retried" in message
    assert "File exists" in message or "Not a directory" in message
    assert len(list(attempts.iterdir())) == 1, "the failing shard was retried"


def _blocked_records_factory(attempts: str):
    from ldm_jobs.jobs.worker import ShardWorker

    class BlockedRecords(ShardWorker):
        def run(self, shard):
            Path(attempts, f"{shard.name}-{len(os.listdir(attempts))}").write_text("")
            records = Path(self.spec.output.path) / "_shards"
            if not records.exists():
                records.write_text("a file where the records folder goes")
            return super().run(shard)

    return BlockedRecords


def test_storage_marks_what_a_retry_cannot_mend(tmp_path, s3_server) -> None:
    from ldm_jobs.jobs.storage import LocalStorage, StorageError, open_storage

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError) as raised:
        LocalStorage().write_atomic(str(blocker / "x.json"), b"{}")
    assert raised.value.permanent
    with pytest.raises(StorageError) as raised:
        open_storage("s3://no-such-bucket-here/x").write_atomic("s3://no-such-bucket-here/x",
                                                                b"{}")
    assert raised.value.permanent and "does not exist" in str(raised.value)


# --- 2. a file that is not a spec: one line, exit 2 ------------------------------------

def test_a_parquet_file_given_as_the_spec_is_one_line_exit_2(tmp_path, job, capsys) -> None:
    code = main(["validate", str(tmp_path / "prompts.parquet")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "prompts.parquet: not a job spec" in err


def test_a_jsonl_file_given_as_the_spec_is_one_line_exit_2(tmp_path, capsys) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", : }\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not valid YAML/JSON" in err


# --- 3. the model source is checked before any work ------------------------------------

def _tiny_folder(tmp_path: Path) -> Path:
    from tiny_sd import make_reference, save_diffusers_folder

    # Written by diffusers' and transformers' own save_pretrained.
    return save_diffusers_folder(make_reference("sd1"), tmp_path / "tiny-folder")


@pytest.mark.parametrize("case", ["no such builtin", "no such path", "folder without index",
                                  "folder missing a config", "safetensors not a model",
                                  "not safetensors"])
def test_validate_and_run_reject_a_bad_model_source(tmp_path, job, capsys, case) -> None:
    if case == "no such builtin":
        model, expected = "builtin:shape", "no built-in model builtin:shape; available: "
    elif case == "no such path":
        model, expected = str(tmp_path / "nowhere"), "no such weights file"
    elif case == "folder without index":
        (tmp_path / "empty").mkdir()
        model, expected = str(tmp_path / "empty"), "no model_index.json"
    elif case == "folder missing a config":
        folder = _tiny_folder(tmp_path)
        (folder / "vae" / "config.json").unlink()
        model, expected = str(folder), "vae/config.json: missing config file"
    elif case == "safetensors not a model":
        import torch
        from safetensors.torch import save_file

        save_file({"some.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
        model, expected = str(tmp_path / "lora.safetensors"), "no unet weights"
    else:
        (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
        model, expected = str(tmp_path / "junk.safetensors"), "not a readable safetensors"
    job["model"] = model
    spec = _write(tmp_path, job)
    capsys.readouterr()  # what saving the folder printed
    assert main(["validate", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: ") and expected in err, err
    # `run` stops the same way before Ray starts: nothing is written to the output.
    assert main(["run", spec, "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_validate_accepts_models_that_load(tmp_path, job, capsys) -> None:
    from ldm_jobs.model import load_pipeline
    from ldm_jobs.model.loading import check_source

    folder = _tiny_folder(tmp_path)
    load_pipeline(str(folder))  # the oracle: the loader itself takes it
    for model in ("builtin:tiny-random", "builtin:shapes", str(folder)):
        job["model"] = model
        assert main(["validate", _write(tmp_path, job)]) == 0, capsys.readouterr().err
        check_source(model)


def test_validate_checks_an_s3_model_exists(tmp_path, job, s3_server, capsys) -> None:
    from ldm_jobs.jobs.storage import open_storage

    bucket = s3_server.make_bucket()
    folder = _tiny_folder(tmp_path)
    store = open_storage(f"s3://{bucket}/")
    for path in folder.rglob("*"):
        if path.is_file():
            store.write_atomic(f"s3://{bucket}/models/tiny/{path.relative_to(folder)}",
                               path.read_bytes())
    job["model"] = f"s3://{bucket}/models/tiny"
    assert main(["validate", _write(tmp_path, job)]) == 0, capsys.readouterr().err
    job["model"] = f"s3://{bucket}/models/nothing.safetensors"
    assert main(["validate", _write(tmp_path, job)]) == 2
    assert "no model found at s3://" in capsys.readouterr().err
    job["model"] = f"s3://{bucket}/models"  # a prefix, but not a diffusers folder
    store.write_atomic(f"s3://{bucket}/models/readme.txt", b"hi")
    assert main(["validate", _write(tmp_path, job)]) == 2


# --- 4. joining a token-auth cluster without the token: fast, one message -------------

class _TokenGcs:
    """A GCS on loopback that refuses callers without a token, with the status and text
    Ray's token-auth interceptor answers (UNAUTHENTICATED, InvalidAuthToken)."""

    def __init__(self, token: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        self.calls = 0
        outer = self

        class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
            def GetClusterId(self, request, context):  # noqa: N802 (the RPC's name)
                outer.calls += 1
                sent = dict(context.invocation_metadata()).get("authorization")
                if sent != f"Bearer {token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "InvalidAuthToken: Authentication token is missing or "
                                  "incorrect")
                return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def token_gcs():
    gcs = _TokenGcs("0123456789abcdef0123456789abcdef")
    yield gcs
    gcs.stop()


def test_joining_a_token_cluster_without_the_token_fails_at_once(tmp_path, job,
                                                                 token_gcs) -> None:
    """Without the fix Ray retried for 20 s, printing a gcs_client warning a second."""
    from ldm_jobs.jobs.cluster import TOKEN_HINT

    address = f"127.0.0.1:{token_gcs.port}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    result = subprocess.run([sys.executable, "-m", "ldm_jobs", "run", _write(tmp_path, job),
                             "--address", address], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: could not join the Ray cluster at {address}: it wants an authentication "
        f"token (Ray's token auth); {TOKEN_HINT}")
    assert token_gcs.calls == 1


def test_a_wrong_token_is_named_as_such(tmp_path, token_gcs, monkeypatch) -> None:
    from ldm_jobs.jobs.cluster import check_address
    from ldm_jobs.jobs.errors import JobFailed

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token-0000000000")
    with pytest.raises(JobFailed, match="refused this machine's token"):
        check_address(f"127.0.0.1:{token_gcs.port}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef0123456789abcdef")
    check_address(f"127.0.0.1:{token_gcs.port}")  # the right one passes
    assert token_gcs.calls == 2


HEAD_SCRIPT = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


@pytest.mark.slow
def test_a_real_token_head_is_refused_at_once_and_joined_with_the_token(tmp_path, job,
                                                                        monkeypatch) -> None:
    """A real Ray head with token auth (a local `ray.init` with RAY_AUTH_MODE=token, in a
    process of its own, stopped by closing its stdin): `run` without the token stops at
    once with the one message; the probe lets the right token through."""
    from ldm_jobs.jobs.cluster import TOKEN_HINT, check_address

    token = "5eb0c7c2a1f04b6e9d3f28a7c4e1b0d9"
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    home = tmp_path / "home"  # no ~/.ray/auth_token of the real user is read or written
    home.mkdir()
    head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": token})
    try:
        address = head.stdout.readline().strip()
        assert address, "the head did not start"
        result = subprocess.run([sys.executable, "-m", "ldm_jobs", "run",
                                 _write(tmp_path, job), "--address", address],
                                cwd=ROOT, env={**base, "HOME": str(home)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"error: could not join the Ray cluster at {address}: it wants an "
            f"authentication token (Ray's token auth); {TOKEN_HINT}")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        check_address(address)  # the probe with the cluster's token: answered
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def test_the_advice_to_keep_a_head_up_says_what_joining_needs() -> None:
    from ldm_jobs.jobs.cluster import JOIN_HINT

    readme = (ROOT / "README.md").read_text()
    for text in (JOIN_HINT, readme[readme.index("ray start --head"):][:800]):
        assert "RAY_AUTH_MODE=token" in text and "auth_token" in text, text


# --- 6. Ctrl-C after --overwrite: say how to resume -------------------------------------

def test_interrupt_with_overwrite_gives_the_command_without_it(tmp_path, job, monkeypatch,
                                                              capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "run", interrupted)
    spec = _write(tmp_path, job)
    assert main(["run", spec, "--overwrite", "--set", "sampling.steps=3"]) == 130
    err = capsys.readouterr().err
    assert "without --overwrite" in err
    assert f"ldm-jobs run {spec} --set sampling.steps=3\n" in err
    assert main(["run", spec]) == 130
    err = capsys.readouterr().err
    assert "re-run the same command to resume" in err and "--overwrite" not in err


# --- 7. a finished job, a resumed job: say so; the manifest keeps every run -------------

def test_rerun_and_resume_say_what_happened_and_keep_every_run(tmp_path, job, ray_cluster,
                                                               capsys) -> None:
    from ldm_jobs.jobs.report import show
    from ldm_jobs.jobs.runner import run_job
    from ldm_jobs.jobs.spec import parse_spec

    spec = parse_spec(job)
    out = Path(spec.output.path)
    first = run_job(spec)
    capsys.readouterr()
    again = run_job(spec)
    err = capsys.readouterr().err
    assert "already complete: all 3 shard(s)" in err and "0 images generated" not in err
    assert again["runs"] == first["runs"] and len(first["runs"]) == 1

    (out / "part-00001.parquet").unlink()
    (out / "_shards" / "part-00001.json").unlink()
    resumed = run_job(spec)
    err = capsys.readouterr().err
    assert "resuming: 2 of 3 shard(s) already committed, skipped" in err
    assert "done: 1 images generated" in err
    runs = resumed["runs"]
    assert [(r["shards_run"], r["shards_skipped"], r["generated"]) for r in runs] == [
        (3, 0, 3), (1, 2, 1)]
    assert runs[0] == first["runs"][0]
    timings = resumed["timings"]
    assert timings["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in runs),
                                                    abs=0.01)
    # busy time: the second run's is the re-made shard's alone; the job's is every
    # committed shard's (the first run's copy of part-00001 was thrown away)
    records = {p.stem: json.loads(p.read_text()) for p in (out / "_shards").glob("*.json")}
    assert runs[1]["busy_seconds_total"] == pytest.approx(
        records["part-00001"]["busy_seconds"], abs=0.01)
    assert timings["busy_seconds_total"] == pytest.approx(
        sum(r["busy_seconds"] for r in records.values()), abs=0.01)
    # keys of the contract stay
    assert {"counts", "timings", "shards", "model", "spec"} <= set(resumed)
    summary = show(str(out))
    assert "(all 2 runs)" in summary
    assert "run 1" in summary and "3 shard(s), 3 images" in summary
    assert "run 2" in summary and "1 shard(s), 1 images (2 shard(s) skipped" in summary


# --- 8. submit: the absolute output path; --env ----------------------------------------

def test_submit_says_where_an_absolute_local_output_goes(tmp_path, job) -> None:
    from ldm_jobs.jobs.cli import submit_warnings
    from ldm_jobs.jobs.spec import load_spec

    warning = submit_warnings(load_spec(_write(tmp_path, job)))[0]
    assert "written to that path on the cluster's machines" in warning
    assert "temporary working directory" not in warning
    job["output"]["path"] = "out/relative"
    warning = submit_warnings(load_spec(_write(tmp_path, job)))[0]
    assert "temporary working directory" in warning


class _JobsApi:
    """Ray's Jobs API on loopback, enough for `JobSubmissionClient.submit_job`: it keeps
    the submitted job's JSON body."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.jobs: list[dict] = []
        outer = self

        class Head(http.server.BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path.startswith("/api/version"):
                    import ray

                    return self._reply(200, {"version": "4", "ray_version": ray.__version__,
                                             "ray_commit": "x"})
                if self.path.startswith("/api/packages/"):
                    return self._reply(404)  # not uploaded yet
                return self._reply(404)

            def do_PUT(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                return self._reply(200)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.jobs.append(body)
                return self._reply(200, {"job_id": "raysubmit_env", "submission_id":
                                         "raysubmit_env"})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_submit_env_forwards_named_variables_without_printing_them(tmp_path, job,
                                                                  monkeypatch,
                                                                  capsys) -> None:
    api = _JobsApi()
    secret_endpoint = "http://minio.internal:9000/very-private-endpoint"
    monkeypatch.setenv("AWS_ENDPOINT_URL", secret_endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    job["input"]["path"], job["output"]["path"] = "s3://b/prompts/", "s3://b/runs/x"
    spec = _write(tmp_path, job)
    try:
        code = main(["submit", spec, "--address", api.address,
                     "--env", "AWS_ENDPOINT_URL", "--env", "AWS_REGION"])
    finally:
        api.server.shutdown()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == "raysubmit_env"
    env_vars = api.jobs[0]["runtime_env"]["env_vars"]
    assert env_vars == {"AWS_ENDPOINT_URL": secret_endpoint, "AWS_REGION": "eu-west-3"}
    assert secret_endpoint not in captured.out + captured.err
    assert secret_endpoint not in api.jobs[0]["entrypoint"]  # so never in the manifest


@pytest.mark.parametrize("given, expected", [
    ("LDM_TEST_UNSET_VARIABLE", "LDM_TEST_UNSET_VARIABLE is not set in this environment"),
    ("AWS_REGION=eu-west-3", "give the variable's name only"),
])
def test_submit_env_errors(tmp_path, job, monkeypatch, capsys, given, expected) -> None:
    monkeypatch.delenv("LDM_TEST_UNSET_VARIABLE", raising=False)
    code = main(["submit", _write(tmp_path, job), "--address", "http://127.0.0.1:9",
                 "--env", given])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "eu-west-3" not in err


# --- 9. Ray's token banner stays out of our output --------------------------------------

def test_ray_token_banner_is_filtered_from_our_output(caplog) -> None:
    from ray._private.authentication import authentication_token_setup as setup

    from ldm_jobs.jobs.cluster import quiet_ray_banners

    logger = logging.getLogger(setup.__name__)
    with caplog.at_level(logging.WARNING, logger=setup.__name__):
        setup._warn_token_auth_enabled()  # what Ray says on every local start
        assert any("Token authentication is enabled" in r.getMessage() for r in caplog.records)
        caplog.clear()
        quiet_ray_banners()
        quiet_ray_banners()  # idempotent
        setup._warn_token_auth_enabled()
        logger.warning("Token authentication is disabled for this Ray cluster.")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("is enabled" in m for m in messages)
    assert any("is disabled" in m for m in messages)  # other warnings still pass


# --- 10. half precision on a CPU: a warning at plan time ---------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_warns_at_plan_time(tmp_path, job, capsys, dtype) -> None:
    job["compute"]["dtype"] = dtype
    assert main(["validate", _write(tmp_path, job)]) == 0
    err = capsys.readouterr().err
    assert f"warning: compute.dtype: {dtype} on a CPU (gpus_per_actor: 0) is slower" in err
    job["compute"]["dtype"] = "float32"
    assert main(["validate", _write(tmp_path, job)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_run_prints_the_half_precision_warning(tmp_path, job, ray_cluster, capsys) -> None:
    from ldm_jobs.jobs.runner import run_job
    from ldm_jobs.jobs.spec import parse_spec

    job["compute"]["dtype"] = "bfloat16"
    job["output"]["rows_per_shard"] = 3
    run_job(parse_spec(job))
    assert "warning: compute.dtype: bfloat16 on a CPU" in capsys.readouterr().err
