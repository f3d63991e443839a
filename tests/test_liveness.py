"""The driver's cluster watch (jobs/liveness.py) on real sockets, no Ray."""

from __future__ import annotations

import socket
import threading

import pytest

from ldm_jobs.jobs.liveness import ClusterLost, Liveness


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_silence_is_loss_only_after_lost_after_seconds() -> None:
    gcs, raylet = _listener(), _listener()
    now = [0.0]
    watch = Liveness({"the head's GCS": gcs.getsockname(),
                      "this machine's raylet": raylet.getsockname()},
                     lost_after=15.0, clock=lambda: now[0])
    watch.check()  # both answer
    port = raylet.getsockname()
    raylet.close()
    watch.check()  # silent since t=0
    now[0] = 14.0
    watch.check()
    now[0] = 15.5
    with pytest.raises(ClusterLost, match=rf"this machine's raylet at 127.0.0.1:{port[1]} has "
                                          r"not answered for 16 s; committed shards are kept"):
        watch.check()
    gcs.close()


def test_an_endpoint_that_answers_again_starts_afresh() -> None:
    server = _listener()
    address = server.getsockname()
    now = [0.0]
    watch = Liveness({"the head's GCS": address}, lost_after=10.0, clock=lambda: now[0])
    server.close()
    watch.check()
    now[0] = 8.0
    again = socket.socket()
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.bind(address)
    again.listen()
    watch.check()  # back: the silence is forgotten
    again.close()
    now[0] = 12.0
    watch.check()  # silent again since t=12 only
    now[0] = 21.0
    watch.check()
    now[0] = 22.5
    with pytest.raises(ClusterLost):
        watch.check()


def test_the_watch_thread_reports_a_loss_and_stops_with_the_block() -> None:
    server = _listener()
    address = server.getsockname()
    server.close()
    lost: list[BaseException] = []
    reported = threading.Event()

    def on_lost(error: BaseException) -> None:
        lost.append(error)
        reported.set()

    with Liveness({"the head's GCS": address}, lost_after=0.0, on_lost=on_lost).watching(0.02):
        assert reported.wait(10)
    assert isinstance(lost[0], ClusterLost)
    # nothing to watch: no thread, no report
    with Liveness({}, on_lost=on_lost).watching(0.01):
        pass
    assert len(lost) == 1
