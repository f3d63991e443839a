"""Job specs, planning, the Ray runner and outputs (installed as ``ldm_jobs.jobs``).

Names are loaded on first use, so importing the package (or running ``python -m jobs``
from a source checkout) pulls in nothing heavy.
"""

from __future__ import annotations

from ldm_jobs import lazy_exports

_EXPORTS = {
    "Output": "ldm_jobs.jobs.report",
    "open_output": "ldm_jobs.jobs.report",
    "show": "ldm_jobs.jobs.report",
    "JobSpec": "ldm_jobs.jobs.spec",
    "SpecError": "ldm_jobs.jobs.spec",
    "load_spec": "ldm_jobs.jobs.spec",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
