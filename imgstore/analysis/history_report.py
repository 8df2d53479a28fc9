"""What ``imgstore history`` prints: a terminal table, or Markdown for a pull request.

The HTML report is :mod:`imgstore.analysis.history_html`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from imgstore.analysis.changepoints import Change
from imgstore.analysis.history import History, Machine, Series
from imgstore.analysis.report import format_seconds

__all__ = ["change_rows", "format_history_markdown", "format_history_table", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 40  # the last points of a series shown in its sparkline


def sparkline(values: Sequence[float]) -> str:
    """The values as bars from low to high (the last :data:`SPARK_POINTS`), for a terminal."""
    shown = list(values)[-SPARK_POINTS:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    if high <= low:
        return _BARS[0] * len(shown)
    return "".join(_BARS[min(len(_BARS) - 1, int((v - low) / (high - low) * len(_BARS)))] for v in shown)


def verdict(series: Series, change: Change) -> str:
    word = "slower" if change.ratio > 1 else "faster"
    return f"{word} (reference row: the machine moved)" if series.reference else word


def change_rows(machine: Machine, series: Series) -> list[list[str]]:
    """One row per change: benchmark, last commit before, first commit after, ratio, interval, p, verdict."""
    rows = []
    for change in series.changes:
        before = machine.commits[series.points[change.index - 1]]
        after = machine.commits[series.points[change.index]]
        rows.append(
            [
                series.name,
                before.label,
                after.label,
                f"{change.ratio:.3f}",
                f"[{change.low:.3f}, {change.high:.3f}]",
                f"{change.p_value:.1e}",
                f"{change.before_runs}/{change.after_runs}",
                verdict(series, change),
            ]
        )
    return rows


CHANGE_HEADER = ["benchmark", "last before", "first after", "ratio", "interval", "p", "runs", "change"]
SERIES_HEADER = ["benchmark", "commits", "runs", "latest", "series (fastest round per commit)", "changes"]


def _series_rows(machine: Machine) -> list[list[str]]:
    short = Counter(series.name for series in machine.series)
    rows = []
    for series in machine.series:
        medians = [series.median(i) for i in range(len(series.points))]
        rows.append(
            [
                series.name if short[series.name] == 1 else series.fullname,
                str(len(series.points)),
                str(sum(len(f) for f in series.figures)),
                format_seconds(medians[-1]),
                sparkline(medians),
                str(len(series.changes)),
            ]
        )
    return rows


def _align(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _headline(history: History) -> str:
    count = sum(1 for _ in history.changes())
    slower = len(history.slowdowns())
    return (
        f"{history.files} run(s), {len(history.machines)} machine(s): {count} change point(s), "
        f"{slower} of them imgstore slowdowns (confidence {history.confidence:g}, smallest change "
        f"{history.min_change:.0%})"
    )


def _method_note(history: History) -> str:
    return (
        "Per commit, the median over its runs of each run's fastest round. Change points: ruptures "
        "(binary segmentation, l1 cost, penalty calibrated on noise), each confirmed on the runs before "
        f"against after (Mann-Whitney, Bonferroni over the benchmarks of a machine, at {history.confidence:g}) "
        f"with a bootstrap interval of the ratio of medians excluding 1 and a change of {history.min_change:.0%} "
        "or more."
    )


def format_history_table(history: History) -> str:
    lines = [_headline(history), ""]
    for machine in history.machines:
        lines += [f"machine {machine.name}: {len(machine.commits)} commit(s)", ""]
        changes = [row for series in machine.series for row in change_rows(machine, series)]
        if changes:
            lines += _align(CHANGE_HEADER, changes, {3, 4, 5, 6}) + [""]
        lines += _align(SERIES_HEADER, _series_rows(machine), {1, 2, 3, 5}) + [""]
    unconfirmed = sum(series.unconfirmed for machine in history.machines for series in machine.series)
    notes = [_method_note(history), *history.notes]
    if unconfirmed:
        notes.append(f"{unconfirmed} proposed change point(s) were not confirmed by the runs and are not shown.")
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _markdown(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join("---:" if i in right else ":---" for i in range(len(header))) + "|"
    return [line(header), align, *(line(r) for r in rows)]


def format_history_markdown(history: History) -> str:
    mark = ":x:" if history.slowdowns() else ":white_check_mark:"
    lines = [f"### {mark} Benchmark history: {_headline(history)}", ""]
    for machine in history.machines:
        lines += [f"#### {machine.name} ({len(machine.commits)} commits)", ""]
        changes = [row for series in machine.series for row in change_rows(machine, series)]
        if changes:
            lines += _markdown(CHANGE_HEADER, changes, {3, 4, 5, 6}) + [""]
        else:
            lines += ["No change point.", ""]
        lines += [
            "<details>",
            f"<summary>{len(machine.series)} benchmark series</summary>",
            "",
            *_markdown(SERIES_HEADER, _series_rows(machine), {1, 2, 3, 5}),
            "",
            "</details>",
            "",
        ]
    lines += [f"- {note}" for note in [_method_note(history), *history.notes]]
    return "\n".join(lines).rstrip() + "\n"
