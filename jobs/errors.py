"""How a job stops: errors that the runners (Ray or in-process) raise and the CLI maps to
exit code 1. Kept apart from the Ray driver so the in-process runner needs no Ray."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job cannot finish: a shard failed on every attempt, or actors keep dying."""


class ModelLoadError(JobFailed):
    """The model named by the spec could not be loaded by a worker."""


def last_line(exc: BaseException) -> str:
    """The exception line at the end of a remote traceback, without Ray's framing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
