"""The job's story as inline SVG, drawn here so the page needs no chart library or CDN.

Read from the per-shard records in `_shards/`: rows, busy seconds and worker always;
`started_at` / `finished_at` (wall-clock seconds) where the worker recorded them.
Throughput over time spreads each shard's images evenly over its own interval and sums
them per worker in time bins, so a bin shows the images per second that worker really
delivered then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 16, 40  # margins: axes left/bottom, legend right
TIME_BINS = 60
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22"]


@dataclass
class Plot:
    title: str
    svg: str  # empty when the records hold no data for it
    note: str = ""


def _nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `high`."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    return [step * i for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if value == int(value) or abs(value) >= 100 else f"{value:.3g}"


class _Canvas:
    """Axes from 0 to the data's top, in a fixed box; x and y map data to pixels."""

    def __init__(self, title: str, x_high: float, y_high: float, x_name: str, y_name: str):
        self.x_ticks, self.y_ticks = _nice_ticks(x_high), _nice_ticks(y_high)
        self.x_top, self.y_top = self.x_ticks[-1] or 1.0, self.y_ticks[-1] or 1.0
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
                      f'role="img" class="plot"><title>{escape(title)}</title>']
        plot_bottom, plot_right = HEIGHT - BOTTOM, WIDTH - RIGHT
        for tick in self.y_ticks:
            y = self.y(tick)
            self.parts.append(f'<line x1="{LEFT}" x2="{plot_right}" y1="{y:.1f}" y2="{y:.1f}" '
                              'class="grid"/>'
                              f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                              f'{_label(tick)}</text>')
        for tick in self.x_ticks:
            x = self.x(tick)
            self.parts.append(f'<text x="{x:.1f}" y="{plot_bottom + 16}" text-anchor="middle">'
                              f'{_label(tick)}</text>')
        self.parts.append(
            f'<line x1="{LEFT}" x2="{plot_right}" y1="{plot_bottom}" y2="{plot_bottom}" '
            'class="axis"/>'
            f'<text x="{(LEFT + plot_right) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
            f'{escape(x_name)}</text>'
            f'<text transform="translate(14 {(TOP + plot_bottom) / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_name)}</text>')

    def x(self, value: float) -> float:
        return LEFT + (WIDTH - RIGHT - LEFT) * value / self.x_top

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (HEIGHT - BOTTOM - TOP) * value / self.y_top

    def legend(self, names: list[str]) -> None:
        for i, name in enumerate(names[:12]):
            y = TOP + 8 + i * 16
            self.parts.append(f'<rect x="{WIDTH - RIGHT + 10}" y="{y - 8}" width="10" height="10" '
                              f'fill="{COLOURS[i % len(COLOURS)]}"/>'
                              f'<text x="{WIDTH - RIGHT + 24}" y="{y + 1}">'
                              f'{escape(_short(name))}</text>')
        if len(names) > 12:
            self.parts.append(f'<text x="{WIDTH - RIGHT + 10}" y="{TOP + 8 + 12 * 16}">'
                              f'and {len(names) - 12} more</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _short(name: str, limit: int = 20) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _timed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if isinstance(r.get("started_at"), (int, float))
            and isinstance(r.get("finished_at"), (int, float))
            and r["finished_at"] >= r["started_at"]]


def _workers(records: list[dict[str, Any]]) -> list[str]:
    return sorted({str(r.get("worker") or "?") for r in records})


NO_TIMES = ("the shard records hold no start and finish times (written before they were "
            "recorded)")


def throughput_plot(records: list[dict[str, Any]]) -> Plot:
    """Images per second over the job's time, one line per worker."""
    title = "Images per second over time, per worker"
    timed = _timed(records)
    if not timed:
        return Plot(title, "", NO_TIMES)
    start = min(r["started_at"] for r in timed)
    span = max(max(r["finished_at"] for r in timed) - start, 1e-3)
    width = span / TIME_BINS
    workers = _workers(timed)
    rates = {worker: [0.0] * TIME_BINS for worker in workers}
    for record in timed:
        first, last = record["started_at"] - start, record["finished_at"] - start
        per_second = record.get("rows", 0) / max(last - first, 1e-6)
        series = rates[str(record.get("worker") or "?")]
        for b in range(int(first // width), min(TIME_BINS, int(last // width) + 1)):
            overlap = min(last, (b + 1) * width) - max(first, b * width)
            if overlap > 0:
                series[b] += per_second * overlap / width
    top = max(max(series) for series in rates.values())
    canvas = _Canvas(title, span, top, "seconds since the first shard started", "images / s")
    for i, worker in enumerate(workers):
        points = " ".join(f"{canvas.x((b + 0.5) * width):.1f},{canvas.y(rate):.1f}"
                          for b, rate in enumerate(rates[worker]))
        canvas.parts.append(f'<polyline points="{points}" fill="none" stroke-width="2" '
                            f'stroke="{COLOURS[i % len(COLOURS)]}"/>')
    canvas.legend(workers)
    total = sum(r.get("rows", 0) for r in timed)
    return Plot(title, canvas.svg(), f"{total} images in {span:.1f} s of wall time, "
                f"{total / span:.2f} images/s over all {len(workers)} worker(s)")


def duration_plot(records: list[dict[str, Any]]) -> Plot:
    """Each shard's busy time against when it started (or its order), by worker."""
    title = "Shard durations"
    if not records:
        return Plot(title, "", "no shard records yet")
    timed = _timed(records)
    use_time = len(timed) == len(records)
    start = min(r["started_at"] for r in timed) if use_time else 0.0
    positions = [(r["started_at"] - start) if use_time else i for i, r in enumerate(records)]
    seconds = [float(r.get("busy_seconds", 0.0)) for r in records]
    canvas = _Canvas(title, max(positions) or 1.0, max(seconds),
                     "shard start, seconds since the first" if use_time else "shard number",
                     "seconds")
    workers = _workers(records)
    for record, x, y in zip(records, positions, seconds):
        colour = COLOURS[workers.index(str(record.get("worker") or "?")) % len(COLOURS)]
        canvas.parts.append(f'<circle cx="{canvas.x(x):.1f}" cy="{canvas.y(y):.1f}" r="3.5" '
                            f'fill="{colour}"><title>{escape(str(record.get("name")))}: '
                            f'{y:.2f} s, {record.get("rows", 0)} images</title></circle>')
    canvas.legend(workers)
    ordered = sorted(seconds)
    return Plot(title, canvas.svg(), f"{len(records)} shards; median {ordered[len(ordered) // 2]:.2f} s, "
                f"slowest {ordered[-1]:.2f} s")


def outcome_plot(generated: int, rejected: int, pending: int | None) -> Plot:
    """Rows by outcome as horizontal bars."""
    title = "Rows by outcome"
    bars = [("images generated", generated, "#2ca02c"), ("rows rejected", rejected, "#d62728")]
    if pending is not None:
        bars.append(("rows not yet done", pending, "#7f7f7f"))
    top = max(value for _, value, _ in bars) or 1
    height = 34 * len(bars) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
             f'role="img" class="plot"><title>{title}</title>']
    for i, (label, value, colour) in enumerate(bars):
        y = 8 + i * 34
        length = (WIDTH - 300) * value / top
        parts.append(f'<text x="150" y="{y + 17}" text-anchor="end">{label}</text>'
                     f'<rect x="160" y="{y}" width="{length:.1f}" height="24" fill="{colour}"/>'
                     f'<text x="{166 + length:.1f}" y="{y + 17}">{value:,}</text>')
    note = "" if pending is not None else "the input's row count is known once the job finalizes"
    return Plot(title, "".join(parts) + "</svg>", note)
