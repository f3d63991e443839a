"""A from-scratch latent diffusion pipeline of the Stable Diffusion family.

``Pipeline`` and ``load_pipeline`` are loaded on first use, so the pure-Python parts
(``prompts``, ``seeds``) can be imported without torch: the job driver plans and checks
rows with them.
"""

from __future__ import annotations

from ldm_jobs import lazy_exports

_EXPORTS = {"Pipeline": "ldm_jobs.model.pipeline", "load_pipeline": "ldm_jobs.model.pipeline"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
