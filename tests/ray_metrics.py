"""Reading our Ray metrics back the way a dashboard does: Prometheus text from a node's
metrics endpoint."""

from __future__ import annotations

import contextlib
import urllib.request


def scrape(port: int) -> str:
    """The node's /metrics page, or "" while its exporter is not up yet."""
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()
    return ""


def metric(text: str, name: str, job: str) -> float | None:
    """The value of ray_ldm_jobs_<name> tagged with `job`, or None if not exported (yet)."""
    for line in text.splitlines():
        if line.startswith(f"ray_ldm_jobs_{name}{{") and f'job="{job}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None
