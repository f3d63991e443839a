"""The process's own memory figures from /proc/self/status (Linux), for the benchmarks."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A /proc/self/status field in bytes (`VmRSS`, `VmHWM`, `RssAnon`, ...); 0 where the
    kernel has no such field or no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
