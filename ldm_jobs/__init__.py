"""ldm-jobs: bulk latent-diffusion image generation from prompt tables, on Ray.

The two halves install as ``ldm_jobs.model`` (the pipeline) and ``ldm_jobs.jobs`` (specs,
planning, Ray, outputs); the everyday names are re-exported here, loaded on first use so
that ``import ldm_jobs`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

# In a source checkout (a clone, or the working_dir Ray Jobs uploads) the halves live in
# the sibling folders model/ and jobs/; an installed copy has them inside this package.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "model" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - the package's own __path__

_EXPORTS = {
    "load_pipeline": "ldm_jobs.model.pipeline",
    "Pipeline": "ldm_jobs.model.pipeline",
    "open_output": "ldm_jobs.jobs.report",
    "Output": "ldm_jobs.jobs.report",
    "JobSpec": "ldm_jobs.jobs.spec",
    "load_spec": "ldm_jobs.jobs.spec",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports each of ``exports`` (name -> module) on first use."""
    def __getattr__(name: str):
        if name in exports:
            import importlib

            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)
