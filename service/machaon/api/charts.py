"""The dashboard's two charts, drawn on the server as SVG (no chart library, no script): studies
completed per hour, and the latency from last image received to results delivered (p50, p95)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from .formats import duration, parse


@dataclass
class Chart:
    """What an SVG chart template draws, in the viewBox's units."""

    title: str
    width: int = 480
    height: int = 170
    left: int = 44
    top: int = 10
    plot_w: int = 424
    plot_h: int = 120
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    bars: list[tuple[float, float, float, float, str]] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    empty: str | None = None


def _nice_ceiling(value: float) -> float:
    """The round number (1, 2 or 5 times a power of ten) at or above `value`."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def _hour_ticks(chart: Chart, hours: list[str]) -> None:
    step = chart.plot_w / max(len(hours), 1)
    for i, hour in enumerate(hours):
        local = parse(hour)
        if local and local.hour % 6 == 0:
            chart.x_ticks.append((chart.left + (i + 0.5) * step, local.strftime("%H:00")))


def _y_ticks(chart: Chart, top: float, label: Callable[[float], str]) -> None:
    for fraction in (0, 0.5, 1):
        chart.y_ticks.append((chart.top + chart.plot_h * (1 - fraction), label(top * fraction)))


def studies_chart(activity: list[dict]) -> Chart:
    chart = Chart("Studies completed per hour")
    counts = [a["studies"] for a in activity]
    top = _nice_ceiling(max(counts, default=0) or 1)
    step = chart.plot_w / max(len(counts), 1)
    for i, (hour, count) in enumerate(zip([a["hour"] for a in activity], counts, strict=True)):
        height = chart.plot_h * count / top
        chart.bars.append((chart.left + i * step + 1, chart.top + chart.plot_h - height, step - 2, height,
                           f"{hour_span(hour)}: {count} stud{'y' if count == 1 else 'ies'}"))
    _y_ticks(chart, top, lambda v: f"{v:g}")
    _hour_ticks(chart, [a["hour"] for a in activity])
    if not any(counts):
        chart.empty = "No study was completed in the last 24 hours."
    return chart


def latency_chart(activity: list[dict]) -> Chart:
    chart = Chart("Last image received to results delivered")
    values = [v for a in activity for v in (a["latency_p50_s"], a["latency_p95_s"]) if v is not None]
    top = _nice_ceiling(max(values, default=0) or 1)
    step = chart.plot_w / max(len(activity), 1)
    for key, name in (("latency_p95_s", "p95"), ("latency_p50_s", "p50")):
        segments: list[list[str]] = [[]]
        dots = []
        for i, a in enumerate(activity):
            if a[key] is None:  # an hour without deliveries breaks the line
                segments.append([])
                continue
            x, y = chart.left + (i + 0.5) * step, chart.top + chart.plot_h * (1 - a[key] / top)
            segments[-1].append(f"{x:.1f},{y:.1f}")
            dots.append((x, y, f"{hour_span(a['hour'])}: {name} {duration(a[key])}"))
        chart.lines.append({"name": name, "segments": [" ".join(s) for s in segments if len(s) > 1],
                            "dots": dots})
    _y_ticks(chart, top, duration)
    _hour_ticks(chart, [a["hour"] for a in activity])
    if not values:
        chart.empty = "No result was delivered in the last 24 hours."
    return chart


def hour_span(hour: str) -> str:
    start = parse(hour)
    if start is None:
        return hour
    return f"{start:%H:00}–{(start + timedelta(hours=1)):%H:00}"
