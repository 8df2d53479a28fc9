"""Compare two pytest-benchmark runs and say, per benchmark, whether it regressed.

Why not ``pytest --benchmark-compare-fail``: it fails when one statistic moves by more than a
threshold, and on a noisy, shared machine a single statistic of a few rounds moves 10-30% between
two runs of the same code.  Here every verdict comes from the saved rounds (``stats.data``, written
by ``--benchmark-json`` always and by ``--benchmark-save``/``--benchmark-autosave`` with
``--benchmark-save-data``).

The interval
    For each benchmark in both runs we give a confidence interval for the ratio candidate/baseline
    of its round times: the Hodges-Lehmann / Mann-Whitney (Moses) interval for the shift between
    the *log* round times, turned back into a ratio.  Chosen over a bootstrap of the median because
    it is distribution-free and exact for the model "the candidate's times are the baseline's times
    times a factor", which is how a code change acts on timing noise; it stays honest with the 5-20
    rounds of slow benchmarks (a bootstrap of a median of 5 rounds covers far less than it claims);
    it is 1.5x as efficient as the median under near-normal log noise, so fewer rounds are needed;
    and it is deterministic, so the same two files always give the same verdict without a seed.
    The ratio shown is the ratio of the medians, the figure people check against the two medians.

The verdict
    The suite has ~40 benchmarks, so a 99% interval per benchmark would raise a false alarm in about
    one A/A comparison in five (40 x 0.5%, measured: 0.15-0.2 per comparison even with the
    threshold on top).  The intervals are therefore Bonferroni adjusted: with ``confidence=0.99``
    each one is at 1 - 0.01/k for the k benchmarks with rounds, so an A/A comparison shows any
    significant change at most 1% of the time.  Then:

    * ``regression``  -- the whole interval is above 1 (significant for the suite) AND the ratio of
      medians is above 1 + threshold (large enough to matter);
    * ``improvement`` -- the mirror image: interval below 1 and ratio below 1 / (1 + threshold), so
      that swapping the two runs swaps regressions and improvements;
    * ``unchanged``   -- anything else.

    Asking instead for the interval's *lower bound* to clear 1 + threshold costs about twice the
    rounds: with 20% log-normal round noise, 40 benchmarks and 50 rounds each, this rule caught 94%
    of 25% slowdowns at a 10% threshold, that one 69% with unadjusted and 26% with adjusted
    intervals; it needs ~100 rounds where this one needs ~60 for 95%.  False alarms measured
    0.3-0.8% of A/A comparisons (tests/test_compare.py repeats the measurement).

    The rounds must be independent within a run.  Drift the rounds cannot show -- a neighbour that
    slows one benchmark down for the whole run -- is what the threshold absorbs: keep it above the
    spread A/A comparisons show on the machine (a hidden 2% drift per benchmark already gives ~0.1
    false alarms per comparison at 80+ rounds).  Drift of the whole machine is estimated from the
    benchmarks the candidate's code cannot change (kinds ``tutorial`` and ``limit``, see
    :func:`machine_drift`) and divided out with ``normalize=True``.

Benchmarks without saved rounds (in either run) are compared on their medians alone and labelled
``... (medians only)``; those verdicts never count as regressions, because a threshold on one median
is exactly the noisy check this module replaces.  Benchmarks in one run only are ``added`` or
``removed``, which is not a failure either.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imgstore.errors import ImgStoreError

__all__ = [
    "Benchmark",
    "Comparison",
    "DEFAULT_COLUMNS",
    "Drift",
    "COLUMNS",
    "Run",
    "Verdict",
    "compare_runs",
    "format_markdown",
    "format_table",
    "has_regression",
    "load_run",
    "machine_drift",
    "notes",
    "parse_threshold",
    "ratio_interval",
    "summary",
]

# Kinds of benchmark whose code a change to imgstore cannot touch: if they moved, the machine did.
REFERENCE_KINDS = frozenset({"tutorial", "limit"})

# Above this many rounds a run is thinned to this many evenly spaced order statistics: the
# interval gets (slightly) wider, never narrower, and n*m pairwise ratios stay cheap.
_MAX_ROUNDS = 1000
# Exact Mann-Whitney null distribution up to this n*m; the normal approximation is within one
# rank of it beyond (checked for 50x50 and 30x80).
_EXACT_LIMIT = 2500


class Verdict(str, Enum):
    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    UNCHANGED = "unchanged"
    SLOWER_MEDIANS = "slower (medians only)"
    FASTER_MEDIANS = "faster (medians only)"
    UNCHANGED_MEDIANS = "unchanged (medians only)"
    ADDED = "added"
    REMOVED = "removed"

    def __str__(self) -> str:
        return self.value


# Order of the rows: what needs attention first.
_VERDICT_ORDER = {verdict: rank for rank, verdict in enumerate(Verdict)}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a run: identified across runs by ``fullname``; times in seconds."""

    fullname: str
    name: str
    group: str | None
    median: float
    rounds: tuple[float, ...] = ()
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    path: str
    benchmarks: dict[str, Benchmark]
    datetime: str | None = None
    commit: str | None = None


@dataclass(frozen=True)
class Comparison:
    """One row of the comparison.

    ``ratio`` is candidate/baseline of the medians (divided by the machine drift when normalized).
    ``low``/``high`` bound it at ``confidence``; they are None without rounds, and 0/inf when there
    are too few rounds for an interval at that confidence.
    """

    fullname: str
    name: str
    verdict: Verdict
    baseline: Benchmark | None
    candidate: Benchmark | None
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    confidence: float | None = None


# --------------------------------------------------------------------------------------- loading


def load_run(path: str | Path) -> Run:
    """Read a pytest-benchmark JSON file; raise :class:`ImgStoreError` with a one-line reason."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ImgStoreError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ImgStoreError(f"{path}: not a text file") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImgStoreError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ImgStoreError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")

    benchmarks: dict[str, Benchmark] = {}
    for index, raw in enumerate(doc["benchmarks"]):
        bench = _parse_benchmark(raw, f"{path}: benchmarks[{index}]")
        if bench.fullname in benchmarks:
            raise ImgStoreError(f"{path}: benchmark {bench.fullname!r} appears twice")
        benchmarks[bench.fullname] = bench
    commit_info = doc.get("commit_info")
    commit = commit_info.get("id") if isinstance(commit_info, dict) else None
    return Run(
        path=str(path),
        benchmarks=benchmarks,
        datetime=doc.get("datetime") if isinstance(doc.get("datetime"), str) else None,
        commit=commit if isinstance(commit, str) else None,
    )


def _parse_benchmark(raw: object, where: str) -> Benchmark:
    if not isinstance(raw, dict):
        raise ImgStoreError(f"{where} is not an object")
    fullname = raw.get("fullname")
    stats = raw.get("stats")
    if not isinstance(fullname, str) or not fullname:
        raise ImgStoreError(f"{where} has no 'fullname'")
    if not isinstance(stats, dict):
        raise ImgStoreError(f"{where} ({fullname}) has no 'stats'")
    median = stats.get("median")
    if not _is_positive(median):
        raise ImgStoreError(f"{where} ({fullname}) has no positive 'stats.median'")
    data = stats.get("data", [])
    if not isinstance(data, list) or not all(_is_positive(t) for t in data):
        raise ImgStoreError(f"{where} ({fullname}): 'stats.data' is not a list of positive times")
    extra_info = raw.get("extra_info")
    name = raw.get("name")
    group = raw.get("group")
    return Benchmark(
        fullname=fullname,
        name=name if isinstance(name, str) and name else fullname,
        group=group if isinstance(group, str) else None,
        median=float(median),
        rounds=tuple(float(t) for t in data),
        extra_info=extra_info if isinstance(extra_info, dict) else {},
    )


def _is_positive(value: object) -> bool:
    # bool is an int; a time of True seconds is a broken file, not a time.
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


# ------------------------------------------------------------------------------------ statistics


def ratio_interval(
    baseline: Sequence[float], candidate: Sequence[float], confidence: float
) -> tuple[float, float]:
    """Confidence interval for the factor candidate/baseline between two sets of round times.

    The Hodges-Lehmann (Moses) interval of the shift between log times: the k-th smallest and
    k-th largest of all pairwise differences log(c_j) - log(b_i), with k from the Mann-Whitney null
    distribution.  Returns (0, inf) when there are too few rounds for that confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    x = _thin(np.log(np.asarray(baseline, dtype=float)))
    y = _thin(np.log(np.asarray(candidate, dtype=float)))
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        return 0.0, math.inf
    k = _mann_whitney_cut(n, m, 1 - confidence)
    if k is None:
        return 0.0, math.inf
    diffs = (y[:, None] - x[None, :]).ravel()
    low_i, high_i = k, n * m - 1 - k
    part = np.partition(diffs, [low_i, high_i])
    return math.exp(part[low_i]), math.exp(part[high_i])


def _thin(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values)
    if len(ordered) <= _MAX_ROUNDS:
        return ordered
    return ordered[np.linspace(0, len(ordered) - 1, _MAX_ROUNDS).round().astype(int)]


@functools.lru_cache(maxsize=256)  # a suite asks for the same (n, m, alpha) again and again
def _mann_whitney_cut(n: int, m: int, alpha: float) -> int | None:
    """Largest K with P(U <= K) <= alpha/2 when nothing changed, or None if there is none."""
    if n * m <= _EXACT_LIMIT:
        cdf = np.cumsum(_mann_whitney_pmf(n, m))
        fits = np.nonzero(cdf <= alpha / 2 * (1 + 1e-9))[0]  # tolerance: float sums of exact ratios
        return int(fits[-1]) if fits.size else None
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    k = math.floor(n * m / 2 - z * math.sqrt(n * m * (n + m + 1) / 12) - 0.5)
    return k if k >= 0 else None


def _mann_whitney_pmf(n: int, m: int) -> np.ndarray:
    """Null distribution of the Mann-Whitney U for samples of n and m (no ties).

    Recurrence on the largest of the i + j values: it belongs to the first sample with probability
    i/(i+j) and then beats all j of the second (U grows by j), else it adds nothing.
    """
    previous = [np.ones(1) for _ in range(m + 1)]  # i = 0: U is 0
    for i in range(1, n + 1):
        current = [np.ones(1)]  # j = 0: U is 0
        for j in range(1, m + 1):
            pmf = np.zeros(i * j + 1)
            pmf[j:] += i / (i + j) * previous[j]
            pmf[: len(current[j - 1])] += j / (i + j) * current[j - 1]
            current.append(pmf)
        previous = current
    return previous[m]


class Drift(NamedTuple):
    factor: float  # candidate/baseline
    count: int  # benchmarks it is the median of
    reference: bool  # True: tutorial/limit benchmarks only; False: all common benchmarks


def machine_drift(baseline: Run, candidate: Run) -> Drift | None:
    """How much the machine itself moved between the runs.

    The median candidate/baseline ratio of the benchmarks a change to imgstore cannot affect
    (``extra_info.kind`` "tutorial" or "limit"), or of all common benchmarks if the runs have fewer
    than three of those.  None when the runs have nothing in common.
    """
    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    reference = [
        name
        for name in common
        if baseline.benchmarks[name].extra_info.get("kind") in REFERENCE_KINDS
    ]
    chosen = reference if len(reference) >= 3 else common
    if not chosen:
        return None
    logs = [
        math.log(candidate.benchmarks[name].median / baseline.benchmarks[name].median)
        for name in chosen
    ]
    return Drift(math.exp(statistics.median(logs)), len(chosen), chosen is reference)


def compare_runs(
    baseline: Run,
    candidate: Run,
    threshold: float = 0.10,
    confidence: float = 0.99,
    *,
    normalize: bool = False,
) -> list[Comparison]:
    """Compare every benchmark of the two runs; rows sorted with regressions first.

    ``threshold`` is a fraction (0.10 for 10%); ``confidence`` is for the whole suite (see the
    module docstring); ``normalize`` divides every ratio by :func:`machine_drift`.
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a non-negative fraction, not {threshold}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    measured = machine_drift(baseline, candidate) if normalize else None
    drift = measured.factor if measured else 1.0

    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    with_rounds = [
        name
        for name in common
        if baseline.benchmarks[name].rounds and candidate.benchmarks[name].rounds
    ]
    # Bonferroni: the suite as a whole keeps the asked-for confidence.
    each = 1 - (1 - confidence) / max(len(with_rounds), 1)

    rows: list[Comparison] = []
    for name in common:
        base, cand = baseline.benchmarks[name], candidate.benchmarks[name]
        ratio = cand.median / base.median / drift
        if name in with_rounds:
            low, high = ratio_interval(base.rounds, [t / drift for t in cand.rounds], each)
            verdict = _verdict(ratio, low, high, threshold)
            rows.append(Comparison(name, base.name, verdict, base, cand, ratio, low, high, each))
        else:
            verdict = _medians_only_verdict(ratio, threshold)
            rows.append(Comparison(name, base.name, verdict, base, cand, ratio))
    for name, bench in candidate.benchmarks.items():
        if name not in baseline.benchmarks:
            rows.append(Comparison(name, bench.name, Verdict.ADDED, None, bench))
    for name, bench in baseline.benchmarks.items():
        if name not in candidate.benchmarks:
            rows.append(Comparison(name, bench.name, Verdict.REMOVED, bench, None))
    return sorted(rows, key=_row_order)


def _verdict(ratio: float, low: float, high: float, threshold: float) -> Verdict:
    if low > 1 and ratio > 1 + threshold:
        return Verdict.REGRESSION
    if high < 1 and ratio < 1 / (1 + threshold):
        return Verdict.IMPROVEMENT
    return Verdict.UNCHANGED


def _medians_only_verdict(ratio: float, threshold: float) -> Verdict:
    if ratio > 1 + threshold:
        return Verdict.SLOWER_MEDIANS
    if ratio < 1 / (1 + threshold):
        return Verdict.FASTER_MEDIANS
    return Verdict.UNCHANGED_MEDIANS


def _row_order(row: Comparison) -> tuple[int, float, str]:
    # Within a verdict the biggest change (either way) first.
    change = abs(math.log(row.ratio)) if row.ratio else 0.0
    return _VERDICT_ORDER[row.verdict], -change, row.fullname


def has_regression(comparisons: Iterable[Comparison]) -> bool:
    return any(row.verdict is Verdict.REGRESSION for row in comparisons)


def parse_threshold(text: str) -> float:
    """'10%' or '10' -> 0.10: a threshold is always given in percent, to avoid 0.1 vs 10 mix-ups."""
    number = text.strip().removesuffix("%").strip()
    try:
        percent = float(number)
    except ValueError:
        raise ValueError(f"threshold must be a percentage such as 10%, not {text!r}") from None
    if not math.isfinite(percent) or percent < 0:
        raise ValueError(f"threshold must be a non-negative percentage, not {text!r}")
    return percent / 100


# ------------------------------------------------------------------------------------ formatting

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
    "baseline": ("baseline median", True),
    "candidate": ("candidate median", True),
    "ratio": ("ratio", True),
    "interval": ("interval", True),
    "verdict": ("verdict", False),
}
DEFAULT_COLUMNS: tuple[str, ...] = ("name", "baseline", "candidate", "ratio", "interval", "verdict")


def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}" if seconds < 1000 else f"{seconds:.0f} s"
    return f"{seconds / 1e-9:.3g} ns"


def _interval_text(row: Comparison) -> str:
    if row.low is None or row.high is None:
        return "no rounds"
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
        value = bench.extra_info.get(column)
        return "" if value is None else str(value)
    if column == "rounds":
        sides = [len(b.rounds) if b else "-" for b in (row.baseline, row.candidate)]
        return f"{sides[0]}/{sides[1]}"
    if column == "baseline":
        return format_seconds(row.baseline.median) if row.baseline else "-"
    if column == "candidate":
        return format_seconds(row.candidate.median) if row.candidate else "-"
    if column == "ratio":
        return f"{row.ratio:.3f}" if row.ratio is not None else "-"
    if column == "interval":
        return _interval_text(row) if row.ratio is not None else "-"
    if column == "verdict":
        return str(row.verdict)
    raise ValueError(f"unknown column {column!r}; choose from {', '.join(COLUMNS)}")


def _cells(comparisons: Sequence[Comparison], columns: Sequence[str]) -> list[list[str]]:
    for column in columns:
        if column not in COLUMNS:
            raise ValueError(f"unknown column {column!r}; choose from {', '.join(COLUMNS)}")
    # A short name is only an identifier if no two benchmarks share it.
    names = Counter(row.name for row in comparisons)
    return [
        [_cell(row, column, names[row.name] > 1) for column in columns]
        for row in comparisons
    ]


def format_table(
    comparisons: Sequence[Comparison], columns: Sequence[str] = DEFAULT_COLUMNS
) -> str:
    """Aligned plain-text table, one row per comparison, in the given order."""
    body = _cells(comparisons, columns)
    header = [COLUMNS[c][0] for c in columns]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if COLUMNS[column][1] else cell.ljust(width)
            for cell, width, column in zip(cells, widths, columns)
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
    comparisons: Sequence[Comparison], drift: Drift | None = None, *, normalized: bool = False
) -> list[str]:
    """The footnotes a reader needs to trust (or distrust) the table."""
    lines = []
    each = next((row.confidence for row in comparisons if row.confidence is not None), None)
    if each is not None:
        tested = sum(row.confidence is not None for row in comparisons)
        lines.append(
            f"Intervals are at {each * 100:.5g}% each: Bonferroni over the {tested} benchmarks "
            "with saved rounds."
        )
    medians_only = (Verdict.SLOWER_MEDIANS, Verdict.FASTER_MEDIANS, Verdict.UNCHANGED_MEDIANS)
    count = sum(row.verdict in medians_only for row in comparisons)
    if count:
        lines.append(
            f"{count} benchmark(s) have no saved rounds in one run: compared on medians only and "
            "never counted as regressions (save runs with --benchmark-save-data)."
        )
    count = sum(row.low == 0 and row.high == math.inf for row in comparisons)
    if count:
        lines.append(
            f"{count} benchmark(s) have too few rounds for an interval at this confidence: "
            "they cannot be flagged (give them more rounds)."
        )
    if drift is not None:
        source = "tutorial/limit" if drift.reference else "common"
        text = f"Machine drift: x{drift.factor:.3f}, the median ratio of {drift.count} {source} benchmarks"
        if normalized:
            text += "; every ratio above is divided by it (--normalize)."
        else:
            text += "; if it is far from 1, the machine changed speed (rerun, or use --normalize)."
        lines.append(text)
    return lines


def _markdown_table(comparisons: Sequence[Comparison], columns: Sequence[str]) -> str:
    body = _cells(comparisons, columns)
    header = [COLUMNS[c][0] for c in columns]
    align = ["---:" if COLUMNS[c][1] else ":---" for c in columns]

    def line(cells: Sequence[str]) -> str:
        # A '|' in a parametrize id would end the cell.
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

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
        f"A regression is a slowdown significant at {confidence:.4g} confidence for the whole "
        f"suite whose ratio of medians exceeds {1 + threshold:.4g} (threshold {threshold:.0%}).",
        "",
    ]
    quiet = (Verdict.UNCHANGED, Verdict.UNCHANGED_MEDIANS)
    changed = [row for row in comparisons if row.verdict not in quiet]
    same = [row for row in comparisons if row.verdict in quiet]
    if changed:
        lines += [_markdown_table(changed, columns), ""]
    if same:
        lines += [
            "<details>",
            f"<summary>{len(same)} unchanged</summary>",
            "",
            _markdown_table(same, columns),
            "",
            "</details>",
            "",
        ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _describe(run: Run) -> str:
    details = [detail for detail in (run.commit and run.commit[:10], run.datetime) if detail]
    suffix = f" ({', '.join(details)})" if details else ""
    return f"`{Path(run.path).name}`{suffix}"
