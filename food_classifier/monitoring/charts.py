"""Two tiny inline-SVG charts (lines over windows, grouped bars) for HTML reports without matplotlib.

The monitoring report runs where the server runs, with the serving install, which has no plotting
library: a few dozen lines of SVG are enough for a handful of series.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 260, 62, 150, 28, 48
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _frame(y_max: float, y_min: float = 0.0, title: str = "", xlabel: str = "",
           ylabel: str = "") -> tuple[list[str], Callable[[float], float]]:
    plot_h = H - TOP - BOTTOM
    span = (y_max - y_min) or 1.0

    def y(v: float) -> float:
        return TOP + plot_h * (1 - (min(max(v, y_min), y_max) - y_min) / span)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="11">', f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{plot_h}" '
             'fill="none" stroke="#ccc"/>']
    if title:
        parts.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="16" text-anchor="middle" font-size="13" '
                     f'font-weight="bold">{escape(title)}</text>')
    if xlabel:
        parts.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        mid = TOP + plot_h / 2
        parts.append(f'<text x="14" y="{mid:.0f}" text-anchor="middle" transform="rotate(-90 14 {mid:.0f})">'
                     f'{escape(ylabel)}</text>')
    for i in range(5):
        v = y_min + span * i / 4
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
                     f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
    return parts, y


def _legend(parts: list[str], names: list[str]) -> None:
    for i, name in enumerate(names):
        ly = TOP + 14 * i + 8
        parts.append(f'<rect x="{W - RIGHT + 8}" y="{ly - 8}" width="10" height="10" fill="{COLOURS[i % 6]}"/>'
                     f'<text x="{W - RIGHT + 22}" y="{ly + 1}">{escape(name)}</text>')


def _xlabels(parts: list[str], labels: list[str], x: Callable[[float], float]) -> None:
    step = max(1, len(labels) // 8)
    for i in range(0, len(labels), step):
        parts.append(f'<text x="{x(i):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{escape(labels[i])}</text>')


def lines(series: dict[str, list[float | None]], xlabels: list[str], y_max: float | None = None,
          hlines: dict[str, float] | None = None, title: str = "", xlabel: str = "", ylabel: str = "") -> str:
    """One line per series over the x positions; None leaves a gap. `hlines`: dashed reference lines.
    `title` above, `xlabel` under the x axis, `ylabel` along the y axis."""
    values = [v for vs in series.values() for v in vs if v is not None] + list((hlines or {}).values())
    parts, y = _frame(y_max if y_max is not None else max(values + [1e-9]) * 1.1, 0.0, title, xlabel, ylabel)
    n = max(1, len(xlabels) - 1)

    def x(i: float) -> float:
        return LEFT + (W - LEFT - RIGHT) * (i / n if len(xlabels) > 1 else 0.5)

    for name, v in (hlines or {}).items():
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{W - RIGHT - 4}" y="{y(v) - 3:.1f}" text-anchor="end" '
                     f'fill="#666">{escape(name)}</text>')
    for k, vs in enumerate(series.values()):
        colour = COLOURS[k % 6]
        segment: list[str] = []
        for i, v in enumerate([*vs, None]):
            if v is not None:
                segment.append(f"{x(i):.1f},{y(v):.1f}")
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>')
            elif segment:
                parts.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}"/>')
                segment = []
    _xlabels(parts, xlabels, x)
    _legend(parts, list(series))
    return "".join(parts) + "</svg>"


def bars(series: dict[str, list[float]], categories: list[str], title: str = "", xlabel: str = "",
         ylabel: str = "") -> str:
    """Grouped bars: one group per category, one bar per series (title and axis labels as in `lines`)."""
    parts, y = _frame(max([v for vs in series.values() for v in vs] + [1e-9]) * 1.1, 0.0, title, xlabel, ylabel)
    group = (W - LEFT - RIGHT) / max(1, len(categories))
    width = group * 0.8 / max(1, len(series))

    def x(i: float) -> float:
        return LEFT + group * (i + 0.5)

    for k, (_, vs) in enumerate(series.items()):
        for i, v in enumerate(vs):
            left = LEFT + group * i + group * 0.1 + width * k
            parts.append(f'<rect x="{left:.1f}" y="{y(v):.1f}" width="{width:.1f}" height="{y(0) - y(v):.1f}" '
                         f'fill="{COLOURS[k % 6]}"/>')
    _xlabels(parts, categories, x)
    _legend(parts, list(series))
    return "".join(parts) + "</svg>"
