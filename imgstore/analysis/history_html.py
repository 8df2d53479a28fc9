"""The HTML report of ``imgstore history --html FILE``: one file, viewable offline.

No script, no stylesheet or font from elsewhere: one inline SVG plot per benchmark (each run's
figure as a dot, the per-commit median as a line, change points as dashed lines with their ratio;
every dot and line has a ``<title>`` the browser shows on hover), and a table of the figures of
each change point.  Every text from a run file is escaped.
"""

from __future__ import annotations

import math
from html import escape

from imgstore.analysis.history import History, Machine, Series
from imgstore.analysis.history_report import CHANGE_HEADER, change_rows
from imgstore.analysis.report import format_seconds

__all__ = ["format_history_html"]

WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 18, 34

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
section.benchmark { margin-bottom: 1.5em; }
svg.series { background: #fafafa; border: 1px solid #ddd; }
.slower { color: #b00; } .faster { color: #060; }
"""


def format_history_html(history: History) -> str:
    body = ["<h1>Benchmark history</h1>", f"<p>{escape(_headline(history))}</p>"]
    for note in history.notes:
        body.append(f"<p class='note'>{escape(note)}</p>")
    for number, machine in enumerate(history.machines):
        body.append(f"<h2>{escape(machine.name)}: {len(machine.commits)} commit(s)</h2>")
        rows = [row for series in machine.series for row in change_rows(machine, series)]
        body.append(_table(CHANGE_HEADER, rows) if rows else "<p>No change point.</p>")
        for index, series in enumerate(machine.series):
            body.append(_section(machine, series, f"m{number}-b{index}"))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>imgstore benchmark history</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _headline(history: History) -> str:
    changes = sum(1 for _ in history.changes())
    return (
        f"{history.files} run(s), {len(history.machines)} machine(s), {changes} change point(s) "
        f"({len(history.slowdowns())} imgstore slowdowns); confidence {history.confidence:g}, "
        f"smallest change reported {history.min_change:.0%}. Each dot is a run's fastest round; the line "
        "joins each commit's median; dashed lines are confirmed change points."
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    lines = []
    for row in rows:
        css = "slower" if row[-1].startswith("slower") else "faster"
        lines.append(f"<tr class='{css}'>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _section(machine: Machine, series: Series, anchor: str) -> str:
    rows = change_rows(machine, series)
    parts = [
        f"<section class='benchmark' id='{anchor}' data-benchmark='{escape(series.fullname, quote=True)}'>",
        f"<h3>{escape(series.name)}</h3>",
        _plot(machine, series),
        _table(CHANGE_HEADER, rows) if rows else "",
        "</section>",
    ]
    return "\n".join(part for part in parts if part)


def _plot(machine: Machine, series: Series) -> str:
    values = [t for figures in series.figures for t in figures]
    low, high = min(values), max(values)
    if high <= low:
        low, high = low * 0.95, high * 1.05
    pad = (high - low) * 0.08
    low, high = max(low - pad, 0.0), high + pad
    count = len(series.points)
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(position: float) -> float:
        return LEFT + (inner_w * (position + 0.5) / count)

    def y(seconds: float) -> float:
        return TOP + inner_h * (1 - (seconds - low) / (high - low))

    out = [
        f"<svg class='series' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' data-benchmark='{escape(series.fullname, quote=True)}' "
        f"data-points='{count}' data-changes='{len(series.changes)}'>",
        f"<title>{escape(series.fullname)}: time of the fastest round against commit</title>",
        f"<line x1='{LEFT}' y1='{TOP + inner_h}' x2='{WIDTH - RIGHT}' y2='{TOP + inner_h}' stroke='#888'/>",
        f"<line x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{TOP + inner_h}' stroke='#888'/>",
    ]
    for tick in _ticks(low, high):
        ty = y(tick)
        out.append(f"<line x1='{LEFT - 4}' y1='{ty:.1f}' x2='{WIDTH - RIGHT}' y2='{ty:.1f}' stroke='#e4e4e4'/>")
        out.append(
            f"<text x='{LEFT - 6}' y='{ty + 4:.1f}' font-size='11' text-anchor='end'>"
            f"{escape(format_seconds(tick))}</text>"
        )
    step = max(1, math.ceil(count / 8))
    for position in range(0, count, step):
        label = machine.commits[series.points[position]].label[:7]
        out.append(
            f"<text x='{x(position):.1f}' y='{HEIGHT - 14}' font-size='10' text-anchor='middle'>{escape(label)}</text>"
        )
    out.append(f"<text x='{LEFT + inner_w / 2}' y='{HEIGHT - 2}' font-size='11' text-anchor='middle'>commit</text>")
    for change in series.changes:
        cx = (x(change.index - 1) + x(change.index)) / 2
        colour = "#b00" if change.ratio > 1 else "#060"
        before = machine.commits[series.points[change.index - 1]].label
        after = machine.commits[series.points[change.index]].label
        tip = f"{before} → {after}: x{change.ratio:.3f} [{change.low:.3f}, {change.high:.3f}]"
        out.append(
            f"<g class='change'><title>{escape(tip)}</title><line x1='{cx:.1f}' y1='{TOP}' x2='{cx:.1f}' "
            f"y2='{TOP + inner_h}' stroke='{colour}' stroke-dasharray='5,4' stroke-width='2'/>"
            f"<text x='{cx + 4:.1f}' y='{TOP + 12}' font-size='11' fill='{colour}'>x{change.ratio:.2f}</text></g>"
        )
    medians = [series.median(i) for i in range(count)]
    line = " ".join(f"{x(i):.1f},{y(m):.1f}" for i, m in enumerate(medians))
    out.append(f"<polyline points='{line}' fill='none' stroke='#2a6fb0' stroke-width='1.5'/>")
    for position, figures in enumerate(series.figures):
        commit = machine.commits[series.points[position]]
        for seconds in figures:
            tip = f"{commit.label} ({commit.time or 'no time'}): {format_seconds(seconds)}"
            out.append(
                f"<circle cx='{x(position):.1f}' cy='{y(seconds):.1f}' r='2.5' fill='#2a6fb0' fill-opacity='0.55'>"
                f"<title>{escape(tip)}</title></circle>"
            )
    out.append("</svg>")
    return "".join(out)


def _ticks(low: float, high: float) -> list[float]:
    span = high - low
    raw = span / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step) + 1)]
