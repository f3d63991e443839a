"""Progress line and closing summary for a running job, written to stderr.

The live line redraws in place, so it only makes sense on a terminal; in logs (Ray Jobs,
CI) it would be a wall of carriage returns, hence off unless the stream is a TTY. The
closing summary is one plain line and is printed whenever progress is wanted at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _clock() -> float:
    return time.monotonic()


def format_duration(seconds: float) -> str:
    """`75.4` -> `1m15s`; short enough for a one-line bar."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Rows done out of total, images per second and ETA, updated per finished shard.

    `rows_done` starts at the rows of shards committed by an earlier run, so a resumed
    job shows its true position; rates count only this run's work.
    """

    def __init__(
        self,
        total_rows: int,
        rows_done: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = _clock,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        # The live line needs a terminal; `live` overrides the check (tests).
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.live = enabled and (is_tty if live is None else live)
        self.total_rows = total_rows
        self.rows_done = rows_done
        self.rows_at_start = rows_done
        self.generated = 0
        self.rejected = 0
        self._clock = clock
        self._started = clock()
        self._line_width = 0

    @property
    def elapsed(self) -> float:
        return max(self._clock() - self._started, 1e-9)

    def update(self, rows: int, generated: int, rejected: int) -> None:
        """Account one finished shard."""
        self.rows_done += rows
        self.generated += generated
        self.rejected += rejected
        self._draw(self.line())

    def note(self, message: str) -> None:
        """A one-off message (waiting for resources, a retried shard) above the bar."""
        if not self.enabled:
            return
        self._clear()
        print(message, file=self.stream, flush=True)
        self._draw(self.line())

    def line(self) -> str:
        elapsed = self.elapsed
        rate = self.generated / elapsed
        rows_rate = (self.rows_done - self.rows_at_start) / elapsed
        remaining = self.total_rows - self.rows_done
        eta = format_duration(remaining / rows_rate) if rows_rate > 0 else "?"
        percent = 100.0 * self.rows_done / self.total_rows if self.total_rows else 100.0
        return (
            f"rows {self.rows_done}/{self.total_rows} ({percent:.0f}%)  "
            f"{rate:.2f} images/s  elapsed {format_duration(elapsed)}  ETA {eta}"
        )

    def close(self, output: str, wall_seconds: float | None = None) -> str:
        """Print and return the closing summary."""
        wall = self.elapsed if wall_seconds is None else wall_seconds
        rate = self.generated / wall if wall > 0 else 0.0
        summary = (
            f"done: {self.generated} images generated, {self.rejected} rows rejected "
            f"in {format_duration(wall)} ({rate:.2f} images/s) -> {output}"
        )
        if self.enabled:
            self._clear()
            print(summary, file=self.stream, flush=True)
        return summary

    def _draw(self, text: str) -> None:
        if not self.live:
            return
        padding = " " * max(0, self._line_width - len(text))
        self.stream.write("\r" + text + padding)
        self.stream.flush()
        self._line_width = len(text)

    def _clear(self) -> None:
        if self.live and self._line_width:
            self.stream.write("\r" + " " * self._line_width + "\r")
            self.stream.flush()
            self._line_width = 0
