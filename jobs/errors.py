"""How a job stops: errors that the runners (Ray or in-process) raise and the CLI maps to
exit code 1. Kept apart from the Ray driver so the in-process runner needs no Ray."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job cannot finish: a shard failed on every attempt, or actors keep dying."""


class ModelLoadError(JobFailed):
    """The model named by the spec could not be loaded by a worker."""
