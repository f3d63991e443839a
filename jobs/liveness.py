"""Is the Ray cluster still there? TCP probes of the head's GCS and this machine's raylet.

When the cluster goes (every node preempted, the head's machine gone, the local raylet
killed), Ray's client neither raises nor returns: a replacement actor's creation waits on
the GCS inside Ray's C++ code, and after 60 s without its GCS the core worker ends the
process itself with pages of log (or, with only the raylet gone, actors stay pending
forever). So a thread beside the driver's loop probes the two endpoints the driver cannot
work without, and once either has been silent for `lost_after` seconds it prints one line
and ends the process with exit code 1 (the main thread may be stuck in Ray's C++, where
no Python exception reaches it; Ray would end the process anyway). Committed shards are
kept, and the same command resumes the job once a cluster is back. No Ray import here:
`runner` says which endpoints to watch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import JobFailed

# Silence for this long means the cluster is gone (Ray itself gives up on its GCS at 60 s).
LOST_AFTER_SECONDS = 15.0
PROBE_TIMEOUT_SECONDS = 2.0
PROBE_EVERY_SECONDS = 3.0


def _end_process(error: BaseException) -> None:
    print(f"error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


class ClusterLost(JobFailed):
    """The Ray cluster the job runs on stopped answering."""


@dataclass
class Liveness:
    endpoints: dict[str, tuple[str, int]]  # what it is ("the head's GCS") -> (host, port)
    lost_after: float = LOST_AFTER_SECONDS
    clock: Callable[[], float] = time.monotonic
    on_lost: Callable[[BaseException], None] = _end_process
    silent_since: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def watching(self, every: float = PROBE_EVERY_SECONDS) -> Iterator[None]:
        """Probe from a daemon thread for as long as the block runs."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(every):
                try:
                    self.check()
                except ClusterLost as lost:
                    if not stop.is_set():
                        self.on_lost(lost)
                    return

        thread = threading.Thread(target=watch, name="ray-liveness", daemon=True)
        if self.endpoints:
            thread.start()
        try:
            yield
        finally:
            stop.set()

    def check(self) -> None:
        """Probe every endpoint once; raise ClusterLost when one has been silent too long."""
        now = self.clock()
        for name, (host, port) in self.endpoints.items():
            try:
                socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS).close()
            except OSError:
                since = self.silent_since.setdefault(name, now)
                if now - since >= self.lost_after:
                    raise ClusterLost(
                        f"lost the Ray cluster: {name} at {host}:{port} has not answered for "
                        f"{now - since:.0f} s; committed shards are kept, run the same "
                        "command again once the cluster is back") from None
            else:
                self.silent_since.pop(name, None)
