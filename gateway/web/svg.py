"""Server-rendered SVG plots: a sparkline for a fleet row, a line chart for a device."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape


def _scale(points: Sequence[tuple[float, float]], w: float, h: float, pad: float,
           x_range: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = x_range if x_range else (min(xs), max(xs))
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    return [(pad + (x - x0) / (x1 - x0) * (w - 2 * pad),
             h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)) for x, y in points]


def _path(xy: Sequence[tuple[float, float]]) -> str:
    return "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in xy)


def sparkline(points: Sequence[tuple[float, float]], *, width: int = 80, height: int = 20,
              label: str = "") -> str:
    """A small line, no axes; an empty frame when there is nothing to draw."""
    title = f"<title>{escape(label)}</title>" if label else ""
    if not points:
        return (f'<svg class="spark" width="{width}" height="{height}" role="img">{title}'
                f'<text x="2" y="{height - 5}" font-size="10" fill="#888">no data</text></svg>')
    xy = _scale(points, width, height, 2)
    if len(xy) == 1:
        xy = [(2.0, xy[0][1]), (width - 2.0, xy[0][1])]
    return (f'<svg class="spark" width="{width}" height="{height}" role="img">{title}'
            f'<path d="{_path(xy)}" fill="none" stroke="#2a7" stroke-width="1.5"/></svg>')


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


MARKS_MAX = 60  # a chart with at most this many points marks each of them


def chart(name: str, unit: str, points: Sequence[tuple[float, float]], since: float,
          until: float, *, width: int = 720, height: int = 180, kind: str = "readings",
          empty: str = "no readings in this range") -> str:
    """A line chart with its value range and time range written on it; `kind` names what
    its points are (readings, or wakes from the wake log)."""
    pad = 36.0
    head = (f'<svg class="chart" data-kind="{escape(kind)}" data-series="{escape(name)}" '
            f'data-points="{len(points)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{escape(name)} ({escape(unit)})'
            f'</title><rect x="0" y="0" width="{width}" height="{height}" fill="#fff" '
            f'stroke="#ccc"/>')
    axes = (f'<text x="4" y="14" font-size="11">{escape(name)} ({escape(unit)})</text>'
            f'<text x="{pad}" y="{height - 6}" font-size="10">{_when(since)}</text>'
            f'<text x="{width - pad}" y="{height - 6}" font-size="10" text-anchor="end">'
            f'{_when(until)} UTC</text>')
    if not points:
        return (head + axes + f'<text x="{width / 2}" y="{height / 2}" font-size="12" '
                f'text-anchor="middle" fill="#888">{escape(empty)}</text></svg>')
    ys = [p[1] for p in points]
    xy = _scale(points, width, height, pad, (since, until))
    body = (f'<text x="{width - 4}" y="14" font-size="10" text-anchor="end">'
            f'min {min(ys):.2f} · max {max(ys):.2f} · last {ys[-1]:.2f}</text>'
            f'<path class="line" d="{_path(xy)}" fill="none" stroke="#26a" stroke-width="1.5"/>')
    if len(xy) <= MARKS_MAX:
        body += "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#26a"/>'
                        for x, y in xy)
    return head + axes + body + "</svg>"
