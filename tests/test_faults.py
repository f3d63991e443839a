"""Faults on a real local Ray with the real tiny model: killed actors, a killed driver,
a model that cannot load.

Every test compares against one clean run of the same job: the same ids, the same
image bytes (indeed the same shard files), every input row generated or rejected
exactly once, and nothing half-written left in the output.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import yaml

from ldm_jobs.jobs.runner import JobFailed, ModelLoadError, run_job
from ldm_jobs.jobs.spec import load_spec, parse_spec
from ldm_jobs.jobs.worker import ShardWorker

# The worker subclass and factories below reach the actors by value: the tests folder is
# not on the workers' import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
ROWS = 14  # 4 shards of 4 rows (the last one 2); row r01 is rejected (width 30)
IDS = [f"r{i:02d}" for i in range(ROWS)]
BAD_ID = "r01"
SHARDS = ["part-00000", "part-00001", "part-00002", "part-00003"]


def _spec_dict(workdir: Path, output: str, model: str = "builtin:tiny-random",
               actors: int = 2) -> dict:
    return {
        "name": "faults",
        "model": model,
        "input": {"path": str(workdir / "prompts.parquet"), "id_column": "id"},
        "output": {"path": str(workdir / output), "rows_per_shard": 4},
        "sampling": {"sampler": "euler", "steps": 2, "guidance_scale": 4.0,
                     "width": SIZE, "height": SIZE, "seed": 1},
        # batch 2: a shard is two pipeline calls, so a kill can land between them
        "compute": {"actors": actors, "batch_size": 2, "gpus_per_actor": 0},
    }


def _write_spec(workdir: Path, output: str, **kwargs) -> Path:
    path = workdir / f"{output}.yaml"
    path.write_text(yaml.safe_dump(_spec_dict(workdir, output, **kwargs)))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    widths = [30 if key == BAD_ID else None for key in IDS]
    pq.write_table(pa.table({
        "id": IDS,
        "prompt": [f"shape number {i}" for i in range(ROWS)],
        "width": pa.array(widths, pa.int64()),
    }), root / "prompts.parquet")
    return root


@pytest.fixture(scope="module")
def clean(workdir: Path) -> Path:
    output = workdir / "clean"
    run_job(load_spec(str(_write_spec(workdir, "clean"))), progress=False)
    assert _shard_names(output) == SHARDS
    return output


# ---- reading an output ----------------------------------------------------------------

def _shard_names(output: Path) -> list[str]:
    return sorted(p.name[: -len(".parquet")] for p in output.glob("part-*.parquet"))


def _images(output: Path) -> dict[str, bytes]:
    """id -> image bytes over the committed shards; an id seen twice fails the test."""
    parts = sorted(str(p) for p in output.glob("part-*.parquet"))
    table = pads.dataset(parts, format="parquet").to_table(columns=["id", "image"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), f"ids repeated in the shards: {sorted(ids)}"
    return dict(zip(ids, table.column("image").to_pylist()))


def _error_ids(output: Path) -> list[str]:
    return pq.read_table(output / "errors.parquet").column("id").to_pylist()


def _files(output: Path) -> list[str]:
    """Every file in the output, temp files included, relative to it."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_equal_to_clean(output: Path, clean: Path) -> None:
    images, errors = _images(output), _error_ids(output)
    # every input row exactly once: generated or rejected, never both, never twice
    assert sorted([*images, *errors]) == IDS
    assert errors == [BAD_ID]
    assert images == _images(clean)
    # the same shard files byte for byte, no duplicate, no half-written or temp file
    assert _files(output) == _files(clean)
    for name in SHARDS:
        assert _sha256(output / f"{name}.parquet") == _sha256(clean / f"{name}.parquet"), name
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["counts"] == {"input_rows": ROWS, "generated": ROWS - 1, "rejected": 1,
                                  "accepted_rows": ROWS - 1}
    assert (output / "_SUCCESS").exists()


# ---- 1. actors killed with SIGKILL mid-shard -------------------------------------------

class KillPointWorker(ShardWorker):
    """Stops at named points inside a shard and waits there for the test to SIGKILL it.

    A point fires once per job (its marker file remembers it). The worker announces the
    point and its pid in `hook_dir/<point>.reached`; the test's killer thread kills that
    pid. Nobody killing it within the grace period is an error the test will see.
    """

    GRACE_SECONDS = 30.0

    def __init__(self, spec, device="cpu", hook_dir=""):
        super().__init__(spec, device=device)
        self.hook_dir = Path(hook_dir)
        self.shard_name, self.calls = "", 0
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            # the rename that publishes a shard file, then the one for its record
            target = Path(dst)
            if target.name == "part-00000.parquet":
                self.stop_here("part-00000-shard-temp-written")
            if target.name == "part-00000.json" and target.parent.name == "_shards":
                self.stop_here("part-00000-shard-visible-record-not")
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # this actor's process only

    def stop_here(self, point: str) -> None:
        marker = self.hook_dir / f"{point}.reached"
        if marker.exists():
            return
        temp = self.hook_dir / f".{point}.{os.getpid()}"
        temp.write_text(str(os.getpid()))
        os.rename(temp, marker)  # the killer never reads a half-written pid
        deadline = time.monotonic() + self.GRACE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError(f"kill point {point}: pid {os.getpid()} was never killed")

    def run(self, shard):
        self.shard_name, self.calls = shard.name, 0
        return super().run(shard)

    def _generate(self, batch):
        self.calls += 1
        if self.shard_name == "part-00001" and self.calls == 2:
            self.stop_here("part-00001-between-batches")
        return super()._generate(batch)


class Killer(threading.Thread):
    """Kills (SIGKILL) each pid announced in the hook folder and notes what it saw."""

    def __init__(self, hook_dir: Path, output: Path) -> None:
        super().__init__(daemon=True)
        self.hook_dir, self.output = hook_dir, output
        self.killed: dict[str, int] = {}  # point -> pid
        self.seen: dict[str, list[str]] = {}  # point -> output files at the kill
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for marker in sorted(self.hook_dir.glob("*.reached")):
                point = marker.name[: -len(".reached")]
                if point not in self.killed:
                    pid = int(marker.read_text())
                    self.seen[point] = _files(self.output) if self.output.exists() else []
                    os.kill(pid, signal.SIGKILL)
                    self.killed[point] = pid
            self.done.wait(0.02)


def test_actors_sigkilled_mid_shard_three_times(workdir: Path, clean: Path) -> None:
    hook_dir = workdir / "hooks"
    hook_dir.mkdir()
    output = workdir / "killed_actors"
    spec = load_spec(str(_write_spec(workdir, "killed_actors")))
    killer = Killer(hook_dir, output)
    killer.start()
    try:
        run_job(spec, progress=False,
                worker_factory=functools.partial(KillPointWorker, hook_dir=str(hook_dir)))
    finally:
        killer.done.set()
        killer.join()

    # three real kills, of three different processes, at the three points: part-00000
    # died twice (and so succeeded on its last allowed attempt), part-00001 once
    assert sorted(killer.killed) == ["part-00000-shard-temp-written",
                                     "part-00000-shard-visible-record-not",
                                     "part-00001-between-batches"]
    assert len(set(killer.killed.values())) == 3
    # the kills landed where they were meant to: mid-write, then between shard and record
    mid_write = killer.seen["part-00000-shard-temp-written"]
    assert any(f.startswith(".tmp-part-00000.parquet-") for f in mid_write), mid_write
    assert "part-00000.parquet" not in mid_write
    half_committed = killer.seen["part-00000-shard-visible-record-not"]
    assert {"part-00000.parquet", "_shards/part-00000.errors.parquet"} <= set(half_committed)
    assert "_shards/part-00000.json" not in half_committed

    _assert_equal_to_clean(output, clean)


# ---- 2. the driver killed mid-job, then the same command again -------------------------

def _cli(spec_file: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "ldm_jobs", "run", str(spec_file), "--address", address]


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_driver_killed_then_resumed(workdir: Path, clean: Path) -> None:
    address = ray.get_runtime_context().gcs_address
    output = workdir / "killed_driver"
    spec_file = _write_spec(workdir, "killed_driver")
    # one actor: shards commit one after another, so the kill finds some still to do
    command = [*_cli(spec_file, address), "--set", "compute.actors=1"]
    log = workdir / "killed_driver.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen(command, cwd=PROJECT_ROOT, env=_cli_env(), stdout=sink,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not list((output / "_shards").glob("part-*.json")):
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no shard committed in 90 s"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL

    committed = {p.name[: -len(".json")] for p in (output / "_shards").glob("part-*.json")}
    assert 1 <= len(committed) < len(SHARDS), committed
    assert not (output / "_SUCCESS").exists()
    kept = {name: ((output / f"{name}.parquet").stat().st_mtime_ns,
                   (output / "_shards" / f"{name}.json").read_bytes()) for name in committed}

    second = subprocess.run(command, cwd=PROJECT_ROOT, env=_cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr

    # committed shards were skipped: neither their file nor their record was rewritten
    for name, (mtime, record) in kept.items():
        assert (output / f"{name}.parquet").stat().st_mtime_ns == mtime, f"{name} rewritten"
        assert (output / "_shards" / f"{name}.json").read_bytes() == record, f"{name} redone"
    # the second run planned only what was missing (an actor of the killed driver may have
    # finished one more shard before Ray reaped it)
    planned = re.search(r"(\d+) shard\(s\) to run", second.stderr)
    assert planned is None or int(planned[1]) <= len(SHARDS) - len(committed), second.stderr
    _assert_equal_to_clean(output, clean)


# ---- 3. a model that cannot load fails fast, with one clear message ---------------------

def _counting_factory(count_dir: Path):
    """ShardWorker, noting each model load attempt (one file per actor process)."""
    folder = str(count_dir)

    def factory(spec, device="cpu"):
        Path(folder, f"load-{os.getpid()}").write_text("")
        return ShardWorker(spec, device=device)

    return factory


def _diffusers_folder(path: Path) -> Path:
    """The tiny random model saved as a diffusers folder (configs and safetensors)."""
    from safetensors.torch import save_file

    from ldm_jobs.model.configs import to_dict
    from ldm_jobs.model.loading import (
        SD1_SCHEDULER,
        TINY_TEXT,
        TINY_UNET,
        TINY_VAE,
        build_tiny_random,
    )

    pipe = build_tiny_random("cpu", "float32")
    for component, module, config, stem in [
        ("unet", pipe.unet, TINY_UNET, "diffusion_pytorch_model"),
        ("vae", pipe.vae, TINY_VAE, "diffusion_pytorch_model"),
        ("text_encoder", pipe.text_encoder, TINY_TEXT, "model"),
    ]:
        (path / component).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  str(path / component / f"{stem}.safetensors"))
        (path / component / "config.json").write_text(json.dumps(to_dict(config)))
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", **SD1_SCHEDULER}))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


@pytest.fixture(scope="module")
def corrupt_model(workdir: Path) -> tuple[Path, Path]:
    """(a diffusers folder whose unet weights are truncated, that weights file)."""
    from ldm_jobs.model import load_pipeline

    folder = _diffusers_folder(workdir / "corrupt-model")
    load_pipeline(str(folder))  # whole, it loads: the truncation below is the only fault
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder, weights


# Failing fast: the one actor loads once and the job stops; no restart, no retry. A retry
# storm would load the model max_attempts times per actor, each in a fresh process. The
# load count is the real check; the time bound is only a generous backstop, since a busy
# 2-core machine can take a minute to start the actor at all.
FAIL_FAST_SECONDS = 180


@pytest.mark.parametrize("case", ["truncated unet weights"])
def test_model_that_cannot_load_fails_fast(workdir: Path, corrupt_model, case: str) -> None:
    # (A missing path no longer reaches a worker: planning checks the model source first,
    # see tests/test_first_hour.py.)
    model, named = corrupt_model
    slug = case.replace(" ", "_")
    output = workdir / f"unloadable_{slug}"
    spec = parse_spec(_spec_dict(workdir, output.name, model=str(model), actors=1))
    count_dir = workdir / f"loads_{slug}"
    count_dir.mkdir()

    started = time.monotonic()
    with pytest.raises(ModelLoadError) as raised:
        run_job(spec, progress=False, worker_factory=_counting_factory(count_dir))
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert str(named) in message and "could not be loaded" in message
    assert len(message.splitlines()) == 1
    loads = list(count_dir.iterdir())
    assert len(loads) == 1, f"the model was loaded {len(loads)} times"
    assert elapsed < FAIL_FAST_SECONDS
    assert not output.exists() or not list(output.iterdir())


def _dies_while_loading(count_dir: Path):
    """A model whose loading kills the process (out of memory): SIGKILL in the load."""
    folder = str(count_dir)

    def factory(spec, device="cpu"):
        Path(folder, f"load-{os.getpid()}").write_text("")
        os.kill(os.getpid(), signal.SIGKILL)

    return factory


def test_model_that_kills_its_loaders_fails_fast(workdir: Path) -> None:
    """No actor ever loads the model: stop after max_attempts deaths, not actors x that."""
    spec = parse_spec(_spec_dict(workdir, "loader_deaths", actors=2))
    count_dir = workdir / "loads_dying"
    count_dir.mkdir()
    with pytest.raises(JobFailed, match=r"dying while loading model 'builtin:tiny-random' "
                                        r"\(3 lost; none has loaded it"):
        run_job(spec, progress=False, worker_factory=_dies_while_loading(count_dir),
                max_attempts=3)
    # 3 deaths; the 2 actors start together, so at most one more load was under way
    loads = len(list(count_dir.iterdir()))
    assert 3 <= loads <= 4, f"{loads} loads"


def test_cli_says_once_which_file_is_broken(workdir: Path, corrupt_model) -> None:
    """The command line: exit 1 and one line naming the file; no traceback from any layer."""
    folder, weights = corrupt_model
    spec_file = _write_spec(workdir, "unloadable_cli", model=str(folder), actors=1)
    started = time.monotonic()
    result = subprocess.run(_cli(spec_file, ray.get_runtime_context().gcs_address),
                            cwd=PROJECT_ROOT, env=_cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert time.monotonic() - started < FAIL_FAST_SECONDS
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert str(weights) in errors[0] and "could not be loaded" in errors[0]
    assert [line for line in result.stderr.splitlines() if "could not" in line] == errors
