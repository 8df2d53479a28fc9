"""What a comparison says, for people: the terminal table, its footnotes, a Markdown comment.

Also :func:`format_seconds`, the one way a time is shown, by ``imgstore compare`` and by the
benchmark suite's summary alike.
"""

from __future__ import annotations

import html
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgstore.analysis.load import Run
from imgstore.analysis.stats import Drift, rounds_needed
from imgstore.analysis.verdict import Comparison, Verdict, format_threshold, has_regression

__all__ = [
    "COLUMNS",
    "DEFAULT_COLUMNS",
    "format_markdown",
    "format_seconds",
    "format_table",
    "notes",
    "summary",
]

# column name -> (header, right-aligned?)
COLUMNS: dict[str, tuple[str, bool]] = {
    "name": ("benchmark", False),
    "fullname": ("benchmark", False),
    "group": ("group", False),
    "kind": ("kind", False),
    "backend": ("backend", False),
    "operation": ("operation", False),
    "images": ("images", True),
    "rounds": ("rounds", True),
    # Bench.figure: the median with one run a side, the runs' fastest rounds with several (what the ratio is of).
    "baseline": ("baseline", True),
    "candidate": ("candidate", True),
    "ratio": ("ratio", True),
    "interval": ("interval", True),
    "verdict": ("verdict", False),
}
DEFAULT_COLUMNS: tuple[str, ...] = ("name", "baseline", "candidate", "ratio", "interval", "verdict")


def format_seconds(seconds: float) -> str:
    """A time as people read it: three significant digits in s, ms, µs or ns (``2.5 s``, ``12.3 ms``;
    from 1000 s on, whole seconds)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}" if seconds < 1000 else f"{seconds:.0f} s"
    return f"{seconds / 1e-9:.3g} ns"


def _interval_text(row: Comparison) -> str:
    if row.low is None or row.high is None:
        return "too few runs" if _few_runs(row) else "no rounds"
    if row.low == 0 and math.isinf(row.high):
        return "too few rounds"
    return f"[{row.low:.3f}, {row.high:.3f}]"


def _cell(row: Comparison, column: str, show_fullname: bool) -> str:
    bench = row.candidate or row.baseline
    assert bench is not None  # every row has at least one side
    if column == "name":
        return row.fullname if show_fullname else row.name
    if column == "fullname":
        return row.fullname
    if column == "group":
        return bench.group or ""
    if column in ("kind", "backend", "operation", "images"):
        value = getattr(bench.record, column)
        return "" if value is None else str(value)
    if column == "rounds":
        sides = [len(b.rounds) if b else "-" for b in (row.baseline, row.candidate)]
        return f"{sides[0]}/{sides[1]}"
    if column == "baseline":
        return format_seconds(row.baseline.figure) if row.baseline else "-"
    if column == "candidate":
        return format_seconds(row.candidate.figure) if row.candidate else "-"
    if column == "ratio":
        return f"{row.ratio:.3f}" if row.ratio is not None else "-"
    if column == "interval":
        return _interval_text(row) if row.ratio is not None else "-"
    if column == "verdict":
        wall = row.clock == "wall" and row.verdict is not Verdict.UNCHANGED
        return f"{row.verdict} (wall time)" if wall else str(row.verdict)
    raise ValueError(f"unknown column {column!r}; choose from {', '.join(COLUMNS)}")


def _cells(comparisons: Sequence[Comparison], columns: Sequence[str]) -> list[list[str]]:
    for column in columns:
        if column not in COLUMNS:
            raise ValueError(f"unknown column {column!r}; choose from {', '.join(COLUMNS)}")
    # A short name is only an identifier if no two benchmarks share it.
    names = Counter(row.name for row in comparisons)
    return [[_cell(row, column, names[row.name] > 1) for column in columns] for row in comparisons]


def format_table(comparisons: Sequence[Comparison], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """Aligned plain-text table, one row per comparison, in the given order."""
    body = _cells(comparisons, columns)
    header = [COLUMNS[c][0] for c in columns]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if COLUMNS[column][1] else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def summary(comparisons: Iterable[Comparison]) -> str:
    """'2 regressions, 1 improvement, 37 unchanged, 1 added' -- verdicts in table order."""
    counts: dict[Verdict, int] = {}
    for row in comparisons:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    parts = []
    for verdict in Verdict:
        count = counts.get(verdict, 0)
        if count or verdict in (Verdict.REGRESSION, Verdict.IMPROVEMENT, Verdict.UNCHANGED):
            label = str(verdict)
            if count != 1 and verdict is Verdict.REGRESSION:
                label = "regressions"
            elif count != 1 and verdict is Verdict.IMPROVEMENT:
                label = "improvements"
            parts.append(f"{count} {label}")
    return ", ".join(parts)


def notes(
    comparisons: Sequence[Comparison],
    drift: Drift | None = None,
    *,
    threshold: float,
    normalized: bool = False,
    paired: bool = False,
    suite: int | None = None,
) -> list[str]:
    """The footnotes a reader needs to trust (or distrust) the table (``suite``: how many benchmarks with
    rounds the Bonferroni count took, when the table shows fewer: ``--only``)."""
    lines = []
    tested = [row for row in comparisons if row.confidence is not None]
    if tested:
        lines.append(
            f"Intervals are at {tested[0].confidence:.4g} confidence; a regression's interval lies "
            f"above 1 + threshold and its slowdown stays significant after Bonferroni over the "
            f"{suite or len(tested)} benchmarks with saved rounds."
        )
    # Beyond the threshold at their own confidence, held back only by the suite-wide check.
    held_back = [
        row.name
        for row in tested
        if not row.significant
        and row.low is not None
        and row.high is not None
        and (row.low > 1 + threshold or row.high < 1 / (1 + threshold))
    ]
    if held_back:
        lines.append(
            f"{len(held_back)} benchmark(s) beyond the threshold at their own confidence are not "
            f"significant for the whole suite (more rounds would settle it): {', '.join(held_back)}."
        )
    unconfirmed = (Verdict.SLOWER_UNCONFIRMED, Verdict.FASTER_UNCONFIRMED, Verdict.UNCHANGED_UNCONFIRMED)
    few_runs = [row.name for row in comparisons if row.verdict in unconfirmed and _few_runs(row)]
    if few_runs:
        lines.append(
            f"{len(few_runs)} benchmark(s) held by too few of the runs (--partial-runs: one run a side, or, "
            f"paired, fewer than two runs both sides hold): unconfirmed, judged on the medians and never counted "
            f"as regressions: {', '.join(few_runs[:10])}{', ...' if len(few_runs) > 10 else ''}."
        )
    no_rounds = sum(row.verdict in unconfirmed and row.confidence is None and not _few_runs(row) for row in comparisons)
    if no_rounds:
        lines.append(
            f"{no_rounds} benchmark(s) have no saved rounds in one run: unconfirmed, judged on the "
            "medians and never counted as regressions (save runs with --benchmark-save-data)."
        )
    few = sum(row.verdict in unconfirmed and row.confidence is not None for row in comparisons)
    if few and tested:
        needed = rounds_needed(tested[0].confidence or 0.99, suite or len(tested))
        lines.append(
            f"{few} benchmark(s) have too few rounds for the suite-wide test (it needs at least "
            f"{needed} in each run): unconfirmed, judged on the medians and never counted as "
            "regressions."
        )
    unsettled = [row.name for row in comparisons if row.verdict is Verdict.UNSURE]
    if unsettled:
        lines.append(
            f"{len(unsettled)} benchmark(s) slower than the threshold by their ratio but not conclusively "
            f"(not a failure): {', '.join(unsettled)}. Run them again and judge them on every run "
            "(--rerun FILE lists them; .ci/bench-gate runs two more sessions and judges on all four, --partial-runs)."
        )
    regressions = [row for row in comparisons if row.verdict is Verdict.REGRESSION]
    repeated = [row for row in tested if _repeated(row)]
    if tested and not repeated:
        # Rounds show the noise within a run only; a neighbour can slow one benchmark for a whole run.
        lines.append(
            "Baseline and candidate are the runs' medians. One run a side cannot tell a benchmark that drifted "
            "between two runs of "
            "the same code from a change (seen here: x2.0, interval [1.66, 2.38], on identical code). "
            "For a verdict that can, save several runs a side, alternating, and compare the folders "
            '(imgstore compare base/ head/, or .ci/bench-gate: README, "Saving and comparing runs").'
        )
    if regressions and not repeated:
        # A neighbour can slow one benchmark for a whole run; a second run is the only cure.
        ids = " ".join(f"'{row.fullname}'" for row in regressions)
        sizes = sorted({str(row.baseline.record.images) for row in regressions if row.baseline})
        cutoffs = f" --cutoffs={','.join(sizes)}" if sizes and "None" not in sizes else ""
        lines.append(
            "A busy neighbour can slow one benchmark down for a whole run: confirm with "
            f"`pytest --benchmark-only{cutoffs} --benchmark-json=confirm.json {ids}` "
            "and compare the baseline with confirm.json."
        )
    if repeated:
        first = repeated[0]
        sides = f"{len(first.baseline.run_rounds) or 1} and {len(first.candidate.run_rounds) or 1}"  # type: ignore[union-attr]
        between = (
            "how far each benchmark's difference between the sides moves between paired sessions"
            if paired
            else "the spread between runs of the same code, per benchmark"
        )
        lines.append(
            f"Repeated runs ({sides} a side{', paired' if paired else ''}): baseline, candidate, ratio and interval "
            f"are of each run's fastest round (geometric mean over the runs); the interval includes {between}."
        )
    on_wall = sum(row.clock == "wall" for row in comparisons)
    if on_wall:
        lines.append(
            f"{on_wall} row(s) judged on wall time (cold cache, durable writes, or a wall check graver than "
            "the CPU verdict) show wall seconds; the others, the runs' timer."
        )
    spreads: dict[str, float] = {}
    if not repeated:  # one run a side: the spreads come from the reference rows, per operation
        for row in tested:
            if row.between_runs and row.baseline is not None:
                spreads[str(row.baseline.record.operation)] = row.between_runs
    if spreads:
        listed = ", ".join(f"{op} x{math.exp(sd):.2f}" for op, sd in sorted(spreads.items()))
        lines.append(f"Between-run spread (1 sd, from the tutorial/limit rows), included in the intervals: {listed}.")
    if drift is not None:
        source = "tutorial/limit" if drift.reference else "common"
        text = f"Machine drift: x{drift.factor:.3f}, the median ratio of {drift.count} {source} benchmarks"
        if normalized:
            text += "; every ratio above is divided by it (--normalize)."
        else:
            text += "; if it is far from 1, the machine changed speed (rerun, or use --normalize)."
        lines.append(text)
    return lines


def _few_runs(row: Comparison) -> bool:
    """Rounds on both sides, yet no interval: compare_runs found too few runs to judge it on (a partial merge)."""
    return row.confidence is None and bool(
        row.baseline and row.baseline.rounds and row.candidate and row.candidate.rounds
    )


def _repeated(row: Comparison) -> bool:
    return bool((row.baseline and row.baseline.run_rounds) or (row.candidate and row.candidate.run_rounds))


def _markdown_text(text: str) -> str:
    """Text from saved runs as Markdown shows it: a '|' in a parametrize id would end the cell, and
    '<', '&' in a name or path (anything can be in a JSON file) would be HTML in a pull request."""
    return html.escape(text, quote=False).replace("|", "\\|")


def _markdown_table(comparisons: Sequence[Comparison], columns: Sequence[str]) -> str:
    body = _cells(comparisons, columns)
    header = [COLUMNS[c][0] for c in columns]
    align = ["---:" if COLUMNS[c][1] else ":---" for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_markdown_text(cell) for cell in cells) + " |"

    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(c) for c in body)])


def format_markdown(
    comparisons: Sequence[Comparison],
    *,
    baseline: Run | None = None,
    candidate: Run | None = None,
    threshold: float = 0.10,
    confidence: float = 0.99,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    notes: Sequence[str] = (),
) -> str:
    """A pull-request comment: headline count line, the rows that changed, the rest folded."""
    mark = ":x:" if has_regression(comparisons) else ":white_check_mark:"
    lines = [f"### {mark} Benchmarks: {summary(comparisons)}", ""]
    if baseline is not None and candidate is not None:
        lines += [f"Baseline {_describe(baseline)} → candidate {_describe(candidate)}.", ""]
    lines += [
        f"A regression is a benchmark slower than the {format_threshold(threshold)} threshold at "
        f"{confidence:.4g} confidence, and significantly slower for the suite as a whole.",
        "",
    ]
    quiet = (Verdict.UNCHANGED, Verdict.UNCHANGED_UNCONFIRMED)
    changed = [row for row in comparisons if row.verdict not in quiet]
    same = [row for row in comparisons if row.verdict in quiet]
    if changed:
        lines += [_markdown_table(changed, columns), ""]
    if same:
        lines += [
            "<details>",
            f"<summary>{len(same)} without a change beyond the threshold</summary>",
            "",
            _markdown_table(same, columns),
            "",
            "</details>",
            "",
        ]
    lines += [f"- {_markdown_text(note)}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _describe(run: Run) -> str:
    if run.runs > 1:
        # A folder of runs (merge_runs joins their paths with " + "): named by the folder and its count,
        # not by its last file and its first run's time, which read as a one-run comparison.
        folder = Path(os.path.commonpath(run.path.split(" + "))).name
        details = [f"{run.runs} runs", run.commit and run.commit[:10]]
        name = f"{folder}/"
    else:
        details = [run.commit and run.commit[:10], run.datetime]
        name = Path(run.path).name
    shown = [detail for detail in details if detail]
    suffix = f" ({', '.join(shown)})" if shown else ""
    name = name.replace("`", "'")  # a code span shows '<' as it is; a backtick would end it
    return f"`{name}`{_markdown_text(suffix)}"
