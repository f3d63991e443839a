"""The Ray driver: shards dispatched over an actor pool, and `run_job`, which runs a job
in-process or through Ray. Getting connected to a cluster is `cluster.py`; what the
driver watches while it runs is `liveness.py` and `metrics.py`.

Why Ray core actors rather than Ray Data `map_batches`: the unit of work is a whole
shard that a worker generates *and commits* itself, so there is no dataset to stream
between stages, and what matters is control over failure: an actor whose process dies
is replaced and its shard retried a bounded number of times, a shard that keeps failing
stops the job with its name and last error, and a model that cannot load stops the job
at once instead of being restarted forever. A hand-rolled dispatch loop over
`ray.wait` says all of that in a few lines, where Ray Data would hide it behind
operator-level retries and backpressure settings.

The flow: plan (which shards are still missing) -> start `compute.actors` actors, each
loading the pipeline once -> hand one shard to each idle actor, and the next shard as
soon as one finishes, so no actor waits on the slowest -> `sinks.finalize` writes
errors, the manifest and `_SUCCESS`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from ldm_jobs.jobs import sinks
from ldm_jobs.jobs.cluster import (
    JOIN_HINT,
    check_address,
    check_placeable,
    cluster_endpoints,
    ray_session,
)
from ldm_jobs.jobs.errors import JobFailed, ModelLoadError, last_line
from ldm_jobs.jobs.inprocess import PERMANENT_NOTE, run_in_process
from ldm_jobs.jobs.liveness import Liveness
from ldm_jobs.jobs.metrics import JobMetrics
from ldm_jobs.jobs.plan import (
    RECORDS_DIR,
    ForeignOutputError,
    Plan,
    ShardPlan,
    check_model,
    make_plan,
    plan_warnings,
)
from ldm_jobs.jobs.progress import Progress
from ldm_jobs.jobs.spec import JobSpec
from ldm_jobs.jobs.worker import ShardResult, ShardWorker

# A shard gets this many attempts in all (first try included) before the job fails.
DEFAULT_MAX_ATTEMPTS = 3
# With `compute.actors: auto`, how often the driver looks for nodes that joined.
AUTO_RESIZE_SECONDS = 2.0
# How long to wait on Ray before telling the user that nothing has moved yet (an
# autoscaling cluster may take minutes to bring up a GPU node).
WAIT_NOTE_SECONDS = 60.0
# A local Ray start taking more than this share of a job's wall time is worth a hint.
START_NOTE_SHARE = 0.25

WorkerFactory = Callable[..., Any]


class _ShardActor:
    """Holds one ShardWorker (and so one loaded pipeline) for the actor's lifetime.

    A failing model load is caught and handed back by `ready()` rather than raised from
    `__init__`: that way the driver sees one clear error instead of an actor death that
    looks the same as a killed process and would be retried.
    """

    def __init__(self, spec: JobSpec, worker_factory: WorkerFactory) -> None:
        device = "cuda" if spec.compute.gpus_per_actor > 0 else "cpu"
        self._worker = None
        self._error: str | None = None
        try:
            self._worker = worker_factory(spec, device=device)
        except Exception as exc:  # any load failure is reported, not retried
            self._error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        return self._error

    def run(self, shard: ShardPlan) -> ShardResult:
        return self._worker.run(shard)


@dataclass
class _Pool:
    """Actor slots: slot i always holds the current actor for that position."""

    spec: JobSpec
    actor_options: dict[str, Any]
    worker_factory: WorkerFactory
    actors: dict[int, Any] = field(default_factory=dict)

    def start(self, slot: int) -> Any:
        """(Re)start the actor in `slot`; returns the ref that resolves once it loaded."""
        old = self.actors.get(slot)
        if old is not None:
            with contextlib.suppress(RayError):
                ray.kill(old, no_restart=True)
        remote_cls = ray.remote(_ShardActor).options(**self.actor_options)
        actor = remote_cls.remote(self.spec, self.worker_factory)
        self.actors[slot] = actor
        return actor.ready.remote()

    def submit(self, slot: int, shard: ShardPlan) -> Any:
        return self.actors[slot].run.remote(shard)

    def drop(self, slot: int) -> None:
        actor = self.actors.pop(slot, None)
        if actor is not None:
            with contextlib.suppress(RayError):
                ray.kill(actor, no_restart=True)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            with contextlib.suppress(RayError):
                ray.kill(actor, no_restart=True)
        self.actors.clear()


def _actor_options(spec: JobSpec) -> dict[str, Any]:
    gpus = spec.compute.gpus_per_actor
    cpus = 1.0
    if gpus == 0:
        # CPU actors on a small machine: share its cores rather than leave actors
        # pending forever (Ray also sizes torch's thread pool from num_cpus).
        total_cpus = ray.cluster_resources().get("CPU", 0.0)
        if total_cpus > 0 and spec.compute.actors != "auto":  # auto: a slot is one CPU
            cpus = min(1.0, total_cpus / max(spec.compute.actors, 1))
    # Our own retry loop replaces dead actors and retries shards, so Ray's are off:
    # two layers of retries would make "retried at most N times" untrue.
    return {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


class _Dispatch:
    """The driver's loop: keep every actor busy, replace lost ones, retry shards (bounded)."""

    def __init__(self, spec: JobSpec, shards: list[ShardPlan], pool: _Pool,
                 max_attempts: int, progress: Progress) -> None:
        self.spec = spec
        self.pool = pool
        self.max_attempts = max_attempts
        self.progress = progress
        self.auto = spec.compute.actors == "auto"
        self.n_actors = self._target(len(shards)) if self.auto else max(
            1, min(spec.compute.actors, len(shards)))
        self.next_slot = self.n_actors
        self.sized_at = time.monotonic()
        self.queue: deque[ShardPlan] = deque(shards)
        self.attempts: dict[str, int] = {}
        self.booting: dict[Any, int] = {}  # ready() ref -> slot
        self.running: dict[Any, tuple[int, ShardPlan]] = {}  # run() ref -> (slot, shard)
        self.idle: deque[int] = deque()
        self.results: list[ShardResult] = []
        # Actors that die while loading (out of memory, a lost node) are replaced too, but
        # not forever. Until one actor has loaded the model, `max_attempts` deaths in all
        # stop the job: the model itself likely kills its loaders (too big for memory), and
        # every actor retrying it would be a storm of restarts. Once the model has loaded
        # somewhere, deaths are the machines' and each actor may lose `max_attempts`.
        self.boot_deaths = 0
        self.loaded_once = False
        self.metrics = JobMetrics(spec.name)

    def run(self) -> list[ShardResult]:
        self.progress.note(f"{len(self.queue)} shard(s) to run on {self.n_actors} actor(s); "
                           f"loading {self.spec.model}...")
        try:
            for slot in range(self.n_actors):
                self.booting[self.pool.start(slot)] = slot
            quiet_since = time.monotonic()
            while self.queue or self.running:
                while self.idle and self.queue:
                    slot, shard = self.idle.popleft(), self.queue.popleft()
                    self.running[self.pool.submit(slot, shard)] = slot, shard
                if self.auto and time.monotonic() - self.sized_at >= AUTO_RESIZE_SECONDS:
                    self._resize()
                if not self.running and not self.booting:
                    raise JobFailed("no actor is left to run the remaining shards")
                self.metrics.queue(len(self.queue))
                done, _ = ray.wait([*self.running, *self.booting], num_returns=1,
                                   timeout=AUTO_RESIZE_SECONDS if self.auto
                                   else WAIT_NOTE_SECONDS)
                if not done:
                    if time.monotonic() - quiet_since >= WAIT_NOTE_SECONDS:
                        self._note_waiting()
                        quiet_since = time.monotonic()
                    continue
                quiet_since = time.monotonic()
                if done[0] in self.booting:
                    self._booted(done[0])
                else:
                    self._finished(done[0])
        finally:
            self.pool.shutdown()
        return self.results

    # ---- compute.actors: auto ----------------------------------------------------------
    def _capacity(self) -> int:
        """Actor slots on the cluster's live nodes (gpus_per_actor GPUs, else one CPU, per
        actor), at most max_actors."""
        resources, gpus = ray.cluster_resources(), self.spec.compute.gpus_per_actor
        slots = int(resources.get("GPU", 0.0) // gpus) if gpus else int(
            resources.get("CPU", 0.0))
        return min(self.spec.compute.max_actors, slots)

    def _target(self, shards_left: int) -> int:
        """Actors for `auto`: one per slot, no more than shards left, at least one."""
        return max(1, min(self._capacity(), shards_left))

    def _resize(self) -> None:
        """Start actors for slots that nodes brought since the last look, and give up
        restarted actors whose slots have left. (An actor dies with its node at once, but
        Ray counts the node's resources until it has declared the node dead, tens of
        seconds later on a real cluster: the actor restarted meanwhile waits for a slot
        that is gone.)"""
        self.sized_at = time.monotonic()
        target = self._target(len(self.queue) + len(self.running))
        if target > len(self.pool.actors):
            self.progress.note(f"actors: auto: {len(self.pool.actors)} -> {target} "
                               "(nodes joined)")
        while len(self.pool.actors) < target:
            slot, self.next_slot = self.next_slot, self.next_slot + 1
            self.booting[self.pool.start(slot)] = slot
        self.n_actors = max(self.n_actors, len(self.pool.actors))
        spare = len(self.pool.actors) - max(1, self._capacity())
        for ref, slot in list(self.booting.items())[:max(0, spare)]:
            del self.booting[ref]
            self._drop(slot)

    def _shrinks(self, slot: int) -> bool:
        """With `auto`, a lost actor whose slot left with its node is not replaced."""
        if not self.auto or len(self.pool.actors) <= self._target(
                len(self.queue) + len(self.running)):
            return False
        self._drop(slot)
        return True

    def _drop(self, slot: int) -> None:
        self.pool.drop(slot)
        self.progress.note(f"actors: auto: a node left; {len(self.pool.actors)} actor(s) now")

    def _note_waiting(self) -> None:
        if self.booting:
            self.progress.note(
                f"{len(self.booting)} actor(s) not up yet: loading the model, or waiting for "
                f"Ray to find {self.spec.compute.gpus_per_actor:g} GPU(s) each")

    def _booted(self, ref: Any) -> None:
        slot = self.booting.pop(ref)
        try:
            load_error = ray.get(ref)
        except RayError as exc:
            if getattr(exc, "actor_init_failed", False):
                # The actor could not even be built (the project's code missing or broken
                # on the workers): the same on every retry.
                raise JobFailed(f"workers could not start: {last_line(exc)}") from None
            self.boot_deaths += 1  # the process died while loading
            allowed = self.max_attempts * (self.n_actors if self.loaded_once else 1)
            if self.boot_deaths >= allowed:
                hint = "" if self.loaded_once else (
                    "; none has loaded it, so the model itself may not fit in memory")
                raise JobFailed(f"actors keep dying while loading model {self.spec.model!r} "
                                f"({self.boot_deaths} lost{hint}): {_error_text(exc)}") from None
            if not self._shrinks(slot):
                self.booting[self.pool.start(slot)] = slot
            return
        if load_error is not None:
            raise ModelLoadError(f"model {self.spec.model!r} could not be loaded: {load_error}")
        self.loaded_once = True
        self.idle.append(slot)

    def _finished(self, ref: Any) -> None:
        slot, shard = self.running.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as exc:  # the worker raised; the actor itself is fine
            if getattr(getattr(exc, "cause", None), "permanent", False):  # no such bucket, ...
                raise JobFailed(f"shard {shard.name}: {_error_text(exc)} {PERMANENT_NOTE}"
                                ) from None
            self._retry(shard, _error_text(exc))
            self.idle.append(slot)
        except RayError as exc:  # the actor's process is gone (killed, OOM, node lost)
            self._retry(shard, f"worker lost ({_error_text(exc)})")
            if not self._shrinks(slot):
                self.booting[self.pool.start(slot)] = slot
        else:
            self.results.append(result)
            self.metrics.shard_done(result)
            self.progress.update(shard.rows, result.generated, result.rejected)
            self.idle.append(slot)

    def _retry(self, shard: ShardPlan, error: str) -> None:
        tries = self.attempts[shard.name] = self.attempts.get(shard.name, 0) + 1
        if tries >= self.max_attempts:
            raise JobFailed(f"shard {shard.name} failed {tries} times; last error: {error}")
        self.progress.note(f"shard {shard.name}: {error}; retrying")
        self.queue.appendleft(shard)


def runs_in_process(spec: JobSpec, named: str | None, ray_up: bool) -> bool:
    """Whether a job runs without Ray: one actor, no cluster named (--address or
    RAY_ADDRESS) and no Ray already up in this process (tests, notebooks and Ray Jobs
    drivers that hold one get actors, as they asked). Ray would only add its start-up and
    a second process loading the model."""
    return spec.compute.actors == 1 and not named and not ray_up  # never for "auto"


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    worker_factory: WorkerFactory = ShardWorker,
    in_process: bool | None = None,
) -> dict:
    """Run (or resume) a job to the end and return its manifest.

    `worker_factory(spec, device=...)` builds the per-actor worker; tests pass a
    ShardWorker subclass to inject failures. `in_process`: run the shards in this process
    without Ray (True), through Ray actors (False), or decide by `runs_in_process` (None).
    """
    started, started_at = time.monotonic(), time.time()
    named = address or os.environ.get("RAY_ADDRESS") or None
    if named and not ray.is_initialized():  # before --overwrite deletes anything
        check_address(named, "--address" if address else "RAY_ADDRESS")
    if overwrite:
        _check_before_clearing(spec)
        sinks.clear_output(spec)
    plan = make_plan(spec)
    pending = plan.pending()
    bar = Progress(plan.input_rows, _committed_rows(plan), enabled=progress)
    for warning in plan_warnings(spec):
        bar.note(f"warning: {warning}")
    if plan.damaged:
        bar.note(f"{len(plan.damaged)} shard record(s) in {RECORDS_DIR}/ could not be read "
                 f"({', '.join(plan.damaged[:5])}); those shards run again")
    skipped = len(plan.shards) - len(pending)
    if pending and skipped:
        bar.note(f"resuming: {skipped} of {len(plan.shards)} shard(s) already committed, "
                 "skipped")
    ray_start = 0.0
    if in_process is None:
        in_process = runs_in_process(spec, named, ray.is_initialized())
    if pending and in_process:
        check_model(spec)
        run_in_process(spec, pending, max_attempts, bar, worker_factory)
    elif pending:
        check_model(spec)  # a wrong model name or path stops here, before Ray starts
        ray_started = time.monotonic()
        with ray_session(named) as started_here:
            ray_start = time.monotonic() - ray_started if started_here else 0.0
            if started_here:
                check_placeable(spec)
            pool = _Pool(spec, _actor_options(spec), worker_factory)
            with Liveness(cluster_endpoints()).watching():
                _Dispatch(spec, pending, pool, max_attempts, bar).run()
    wall_seconds = time.monotonic() - started
    if ray_start > START_NOTE_SHARE * wall_seconds:
        bar.note(f"starting a local Ray took {ray_start:.0f} of the job's {wall_seconds:.0f} s; "
                 f"for many small jobs keep one up with `ray start --head`: {JOIN_HINT}")
    manifest = sinks.finalize(spec, plan, wall_seconds, started_at=started_at)
    if pending:
        bar.close(spec.output.path, wall_seconds)
    elif manifest["complete"]:
        bar.note(f"already complete: all {len(plan.shards)} shard(s) of {spec.output.path} "
                 f"were committed by an earlier run ({manifest['counts']['generated']} "
                 "images); nothing to do. --overwrite starts afresh")
    return manifest


def _check_before_clearing(spec: JobSpec) -> None:
    """Plan once before --overwrite deletes anything, so a bad input keeps the old output.

    The one planning error to let through is the output holding another job's shards:
    that is what --overwrite is for. Every other output.path error (a missing bucket,
    access denied) is raised, before anything is deleted.
    """
    try:
        make_plan(spec)
    except ForeignOutputError:
        pass


def _committed_rows(plan: Plan) -> int:
    return sum(shard.rows for shard in plan.shards if shard.name in plan.committed)
