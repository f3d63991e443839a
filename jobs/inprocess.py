"""Small local jobs without Ray: the same shards, run one after another in this process.

With no cluster named and `compute.actors: 1`, Ray would add only its own start-up, a
second process that imports torch again and a model load there (half of a 240-image
job's wall time on two cores). Here the one ShardWorker runs in the driver itself: the
same plan, the same shard code and commit, so the same bytes under the same names, and
resume works across both ways of running. What Ray adds for failures (a replaced actor
after the process dies) has no meaning here: if this process dies, the job stops, and
the same command resumes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .errors import JobFailed, ModelLoadError
from .plan import ShardPlan
from .progress import Progress
from .spec import JobSpec
from .worker import ShardResult


def _device(spec: JobSpec) -> str:
    if spec.compute.gpus_per_actor <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise JobFailed(f"compute.gpus_per_actor: {spec.compute.gpus_per_actor:g} GPU(s) asked, "
                        "but this machine has no CUDA GPU; set it to 0 or join a GPU cluster "
                        "with --address")
    return "cuda"


# A shard failing with a permanent error (permission denied, no such bucket: the storage
# layer marks them `permanent`) stops the job at once, here as through Ray.
PERMANENT_NOTE = "(not retried: it would fail the same way again)"


# Torch threads of a CPU job here: what Ray gives one CPU actor (num_cpus 1 sets
# OMP_NUM_THREADS=1), since a float reduction split over other thread counts can move a
# pixel by 1/255, and outputs must not depend on how the job ran.
CPU_THREADS = 1


@contextlib.contextmanager
def _torch_threads(device: str) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_in_process(spec: JobSpec, shards: list[ShardPlan], max_attempts: int,
                   progress: Progress, worker_factory: Callable[..., Any]) -> list[ShardResult]:
    """Run `shards` in order with one worker; a failing shard is retried at once, up to
    `max_attempts` tries in all, unless its error is permanent."""
    progress.note(f"{len(shards)} shard(s) to run in this process (1 actor, no cluster "
                  f"named: Ray is not started); loading {spec.model}...")
    device = _device(spec)
    with _torch_threads(device):
        return _run(spec, shards, max_attempts, progress, worker_factory, device)


def _run(spec: JobSpec, shards: list[ShardPlan], max_attempts: int, progress: Progress,
         worker_factory: Callable[..., Any], device: str) -> list[ShardResult]:
    try:
        worker = worker_factory(spec, device=device)
    except Exception as error:
        raise ModelLoadError(f"model {spec.model!r} could not be loaded: "
                             f"{type(error).__name__}: {error}") from None
    results = []
    try:
        for shard in shards:
            attempt = 0
            while True:
                attempt += 1
                try:
                    result = worker.run(shard)
                except Exception as error:
                    text = f"{type(error).__name__}: {error}"
                    if getattr(error, "permanent", False):
                        raise JobFailed(f"shard {shard.name}: {text} {PERMANENT_NOTE}") from None
                    if attempt >= max_attempts:
                        raise JobFailed(f"shard {shard.name} failed {attempt} times; last "
                                        f"error: {text}") from None
                    progress.note(f"shard {shard.name}: {text}; retrying")
                    continue
                break
            results.append(result)
            progress.update(shard.rows, result.generated, result.rejected)
    finally:
        close = getattr(worker, "close", None)
        if close is not None:
            close()
    return results
