"""The command line (without Ray), the progress line, and cluster.yaml."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ldm_jobs.jobs import cli
from ldm_jobs.jobs.cli import main, submission_request, unaccounted_rows
from ldm_jobs.jobs.progress import Progress, format_duration
from ldm_jobs.jobs.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def job(tmp_path: Path) -> dict:
    pq.write_table(pa.table({"id": ["x", "y", "z"], "prompt": ["one", "two", "three"]}),
                   tmp_path / "prompts.parquet")
    return {
        "name": "cli-test",
        "model": "builtin:tiny-random",
        "input": {"path": str(tmp_path / "prompts.parquet")},
        "output": {"path": str(tmp_path / "out"), "rows_per_shard": 2},
        "sampling": {"steps": 2, "width": 32, "height": 32},
        "compute": {"actors": 1, "batch_size": 2},
    }


def _write(tmp_path: Path, data: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --- bad specs: exit 2, the field named, nothing started ----------------------------


@pytest.mark.parametrize("command", ["run", "validate", "submit"])
def test_bad_spec_exits_2_naming_the_field(tmp_path, job, command, capsys) -> None:
    job["sampling"]["steps"] = 0
    code = main([command, _write(tmp_path, job), "--address", "http://nowhere:8265"]
                if command != "validate" else [command, _write(tmp_path, job)])
    assert code == 2
    assert "sampling.steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:  # bound and closed again: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "dashboard / Jobs API address"),
    ("127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port} (Connection refused)"),
    ("ray://127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port}"),
])
def test_run_with_an_address_it_cannot_join_fails_fast_and_keeps_the_output(
        tmp_path, job, address, message) -> None:
    """Ray would answer a dashboard URL with a traceback and retry a dead address for
    minutes; `run` says what is wrong at once, before --overwrite deletes anything."""
    port = _closed_port()
    address, message = address.format(port=port), message.format(port=port)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_manifest.json").write_text("{}")  # an earlier run's output
    done = subprocess.run(
        [sys.executable, "-m", "ldm_jobs", "run", _write(tmp_path, job), "--overwrite",
         "--address", address], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "_manifest.json").exists()


def test_a_cluster_that_wants_a_token_is_named_as_such() -> None:
    from ldm_jobs.jobs.cluster import join_failure

    # Ray's GCS client keeps the authentication failure as text inside a RuntimeError,
    # the context of the ConnectionError that ray.init raises.
    try:
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: ... "
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken")
        except RuntimeError:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from None
    except ConnectionError as error:
        assert "RAY_AUTH_MODE=token" in join_failure("10.0.0.1:6379", error)
    other = join_failure("h:1", ConnectionError("refused"))
    assert other == "could not join the Ray cluster at h:1: refused"


def test_unknown_field_and_bad_override_exit_2(tmp_path, job, capsys) -> None:
    job["sampling"]["stepz"] = 3
    assert main(["validate", _write(tmp_path, job)]) == 2
    assert "sampling.stepz" in capsys.readouterr().err
    del job["sampling"]["stepz"]
    assert main(["validate", _write(tmp_path, job), "--set", "compute.actors=zero"]) == 2
    assert "compute.actors" in capsys.readouterr().err


def test_missing_prompt_column_exits_2(tmp_path, job, capsys) -> None:
    job["input"]["prompt_column"] = "caption"
    assert main(["validate", _write(tmp_path, job)]) == 2
    err = capsys.readouterr().err
    assert "caption" in err and "prompt" in err


def test_overwrite_with_a_bad_input_keeps_the_old_output(tmp_path, job, capsys) -> None:
    old_shard = tmp_path / "out" / "part-00000.parquet"
    old_shard.parent.mkdir()
    old_shard.write_bytes(b"a previous run")
    job["input"]["prompt_column"] = "caption"
    assert main(["run", _write(tmp_path, job), "--overwrite", "--quiet"]) == 2
    assert "caption" in capsys.readouterr().err
    assert old_shard.read_bytes() == b"a previous run"


def test_missing_spec_file_exits_2(tmp_path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


# --- validate, schema ----------------------------------------------------------------


def test_validate_prints_the_plan(tmp_path, job, capsys) -> None:
    assert main(["validate", _write(tmp_path, job), "--set", "sampling.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "3 rows" in out
    assert "2 pending" in out  # 3 rows, 2 per shard
    assert "3 steps" in out


def test_schema_prints_json(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"input", "output", "sampling", "compute", "storage"} <= set(schema["properties"])


def test_python_dash_m_jobs_is_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "ldm_jobs", "schema"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "JobSpec" in json.loads(done.stdout)["title"]


# --- show on a real output (made without Ray: worker + finalize) ----------------------


def test_show_summarises_an_output_and_writes_a_sheet(tmp_path, job, capsys) -> None:
    from ldm_jobs.jobs import sinks
    from ldm_jobs.jobs.plan import make_plan
    from ldm_jobs.jobs.worker import ShardWorker

    spec = load_spec(_write(tmp_path, job))
    plan = make_plan(spec)
    worker = ShardWorker(spec)
    for shard in plan.pending():
        worker.run(shard)
    sinks.finalize(spec, make_plan(spec), wall_seconds=1.0)

    sheet = tmp_path / "sheet.png"
    assert main(["show", spec.output.path, "--sheet", str(sheet)]) == 0
    assert capsys.readouterr().out.strip()
    from PIL import Image

    assert Image.open(sheet).size[0] >= 32

    # validate on a finished output: everything committed, nothing pending.
    assert main(["validate", _write(tmp_path, job)]) == 0
    assert "0 pending" in capsys.readouterr().out


def test_show_on_an_unfinished_output_does_not_crash(tmp_path, capsys) -> None:
    assert main(["show", str(tmp_path / "nothing")]) in (0, 1)
    captured = capsys.readouterr()
    assert "nothing" in captured.out + captured.err and "Traceback" not in captured.err


# --- submit --------------------------------------------------------------------------


def test_submission_request_ships_the_resolved_spec(tmp_path, job) -> None:
    spec = load_spec(_write(tmp_path, job), ["sampling.steps=4"])
    request = submission_request(spec, overwrite=True)
    argv = shlex.split(request["entrypoint"])
    assert argv[:4] == ["python", "-m", "ldm_jobs", "run"] and argv[-1] == "--overwrite"
    inline = json.loads(argv[argv.index("--spec-json") + 1])
    assert inline == spec.model_dump(mode="json") and inline["sampling"]["steps"] == 4
    runtime_env = request["runtime_env"]
    assert runtime_env["working_dir"] == str(ROOT)
    assert {".venv", "out", ".git"} <= set(runtime_env["excludes"])
    # The entrypoint parses back into the same spec on the cluster side.
    args = cli.build_parser().parse_args(argv[3:])
    assert cli._read_spec(args) == spec


def test_submit_calls_the_jobs_api(tmp_path, job, monkeypatch, capsys) -> None:
    import ray.job_submission

    calls = []

    class FakeClient:
        def __init__(self, address):
            calls.append(("address", address))

        def submit_job(self, **kwargs):
            calls.append(("submit", kwargs))
            return "raysubmit_123"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    assert main(["submit", _write(tmp_path, job), "--address", "http://head:8265"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "raysubmit_123"
    assert "ray job logs --address http://head:8265 --follow raysubmit_123" in captured.err
    assert calls[0] == ("address", "http://head:8265")
    assert "--spec-json" in calls[1][1]["entrypoint"]


@pytest.mark.parametrize("status", [401, 403])
def test_submit_to_a_cluster_that_wants_a_token_says_so(tmp_path, job, capsys, status) -> None:
    """A Ray head with token authentication (the default of `ray start` in Ray 2.60) answers
    401 or 403: a one-line error naming the token and RAY_AUTH_MODE, not a traceback. The
    head is a real HTTP server on loopback answering as Ray's dashboard does."""
    import http.server
    import threading

    class Head(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            body = b"Unauthorized: Missing authentication token"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["submit", _write(tmp_path, job), "--address", address]) == 1
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert f"submit to {address} failed: Authentication" in err
    assert "RAY_AUTH_MODE=token" in err and "Traceback" not in err


def test_submit_warns_about_paths_a_cluster_cannot_see(tmp_path, job) -> None:
    from ldm_jobs.jobs.cli import submit_warnings

    local = submit_warnings(load_spec(_write(tmp_path, job)))
    assert [w.split()[0] for w in local] == ["output.path", "input.path"]
    job["input"]["path"], job["output"]["path"] = "s3://b/prompts/", "s3://b/runs/x"
    assert submit_warnings(load_spec(_write(tmp_path, job))) == []


def test_submit_needs_an_address(tmp_path, job, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", _write(tmp_path, job)]) == 2
    assert "--address" in capsys.readouterr().err


# --- exit status ---------------------------------------------------------------------


def test_unaccounted_rows() -> None:
    def counts(accepted: int, rejected: int) -> dict:
        return {"counts": {"input_rows": 5, "accepted_rows": accepted, "rejected": rejected}}

    assert unaccounted_rows(counts(4, 1)) == 0
    assert unaccounted_rows(counts(3, 1)) == 1


def test_run_exits_1_unless_every_row_is_accounted_for(tmp_path, job, monkeypatch,
                                                       capsys) -> None:

    manifest = {"counts": {"input_rows": 3, "accepted_rows": 1, "rejected": 0},
                "complete": False, "missing_shards": ["part-00001"]}
    import ldm_jobs.jobs.runner

    monkeypatch.setattr(ldm_jobs.jobs.runner, "run_job", lambda spec, **kwargs: manifest)
    assert main(["run", _write(tmp_path, job), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2 input row(s)" in err and "part-00001" in err
    manifest.update(complete=True, counts={"input_rows": 3, "accepted_rows": 2, "rejected": 1})
    assert main(["run", _write(tmp_path, job), "--quiet"]) == 0


# --- progress ------------------------------------------------------------------------


def test_progress_line_and_summary() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(10, rows_done=2, stream=stream, live=True, clock=lambda: now[0])
    now[0] = 4.0
    bar.update(rows=4, generated=4, rejected=0)
    line = bar.line()
    assert "rows 6/10" in line and "1.00 images/s" in line and "ETA 4s" in line
    assert "\r" in stream.getvalue()
    summary = bar.close("out/x", wall_seconds=8.0)
    assert summary == "done: 4 images generated, 0 rows rejected in 8s (0.50 images/s) -> out/x"
    assert stream.getvalue().endswith(summary + "\n")


def test_progress_is_quiet_off_a_terminal() -> None:
    stream = io.StringIO()  # not a TTY: no live line, only the summary
    bar = Progress(3, stream=stream)
    bar.update(3, 3, 0)
    assert stream.getvalue() == ""
    bar.close("o")
    assert stream.getvalue().startswith("done: 3 images")
    silent = io.StringIO()
    Progress(3, stream=silent, enabled=False).close("o")
    assert silent.getvalue() == ""


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.6, 75, 3725)] == ["0s", "1m00s", "1m15s", "1h02m"]


# --- cluster.yaml --------------------------------------------------------------------


def test_cluster_yaml_has_what_a_gpu_cluster_needs() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["cluster_name"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert "cache_stopped_nodes" in config["provider"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["docker"]["image"].startswith("rayproject/ray:")
    assert config["docker"]["image"].endswith("-gpu") and config["docker"]["container_name"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no generation on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4", "p5"))
               for t in workers)
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"]  # S3 access
    for worker in workers:
        assert 0 <= worker["min_workers"] <= worker["max_workers"]
    assert any("pip install" in command and "ldm-jobs" in command
               for command in config["setup_commands"])
    # Nothing opened to the world: only the launcher's own SSH rule does that.
    text = json.dumps(config["provider"].get("security_group", {}))
    assert "0.0.0.0/0" not in text and "8265" not in text and "10001" not in text


def test_cluster_yaml_passes_rays_own_schema() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    util.validate_config(util.prepare_config(config))


# --- examples ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo.yaml", "s3_job.yaml"])
def test_example_specs_are_valid(name) -> None:
    spec = load_spec(str(ROOT / "examples" / name))
    assert spec.name
