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
    Two conditions, each guarding against a different false alarm:

    * the benchmark's own interval (at ``confidence``) lies above 1 + threshold: the slowdown
      exceeds the threshold with that confidence, so a slowdown below the threshold, or drift of a
      benchmark smaller than the threshold, is flagged at most (1 - confidence)/2 of the time;
    * the slowdown is significant for the whole suite: the interval at 1 - (1 - confidence)/k,
      Bonferroni over the k benchmarks with rounds, lies above 1.  With a threshold of 0 (or very
      few rounds) the first condition alone would raise a false alarm in one A/A comparison in
      five for a 40-benchmark suite (40 x 0.5%); with this one, in at most 1 - confidence.

    ``regression`` when both hold, ``improvement`` for the mirror image (interval below
    1 / (1 + threshold), so swapping the runs swaps the verdicts), ``unchanged`` otherwise.

    Measured on synthetic rounds (log-normal, 20% noise, 40 benchmarks, 20 comparisons, in
    tests/test_compare.py): no false alarm in A/A comparisons, no 5% slowdown flagged at a 10%
    threshold, and ~97% of 25% slowdowns caught with 100 rounds per benchmark (99% with 120).
    The rounds needed grow with the noise squared: ~25 rounds at 10% noise.  The alternative rule
    "significant and ratio of medians above 1 + threshold" needs ~60 rounds at 20% noise but flags
    1-2% of benchmarks that are truly only 5% slower, so a suite-wide 5% slowdown would fail one CI
    run in three; we prefer a verdict that holds to one that is quick.

    Rounds only show noise *within* a run.  On this machine whole runs drift: in a real A/A pair of
    the suite (same code, back to back) rows moved by up to x0.6-x1.4 on reads and x0.3-x11 on
    fsync-bound writes while their rounds agreed to a few percent, and the rule above flagged 24
    of 88 rows.  So every interval is widened, in quadrature on the log scale, by the spread
    between runs of its operation, measured in the same comparison on the rows no imgstore change
    can move (kinds ``tutorial`` and ``limit``; see :func:`between_run_spreads`).  The same A/A
    pair then flagged nothing that fails (one "improvement").  The price is honest: an operation
    whose reference rows swing by 2x cannot gate on a 25% slowdown from one pair of runs.  What
    remains is a neighbour slowing a single imgstore row for a whole run (seen once: x2 on one
    read row while the tests ran beside the suite); the output then names the flagged benchmarks
    and the command that reruns just them to confirm.
    Without reference rows (as in the synthetic tests) intervals rest on the rounds alone.
    A drift of the whole machine is also estimated (:func:`machine_drift`) and can be divided
    out with ``normalize=True``.

Repeated runs (the gate)
    Widening by the reference rows is coarse: it gives every row of an operation the drift of
    the worst reference row, so a 25% slowdown is lost in it.  What settles the question is to
    measure each benchmark's own drift: run each side twice, interleaved (base, head, base,
    head: ``.ci/bench-gate``), and give :func:`compare_runs` the merged runs
    (:func:`merge_runs`, or a directory per side on the command line).  Then:

    * a run's figure for a benchmark is its fastest round.  Interference on a shared machine
      only adds time; it hits the median of a run whenever it lasts a few seconds (seen: +27%
      on every round of a read benchmark while the rest of the run was clean) while the fastest
      round stays within 1-3% between runs.  A slower code path slows every round, the fastest
      too.  (BenchmarkTools.jl judges on minimums for the same reason.)  The ratio shown is
      that of the geometric means of these figures, candidate over baseline;
    * its interval is ratio x/÷ exp(z sd), sd from how far the runs of the same code spread
      (:func:`repeated_run_spreads`): the change cannot move that, so it is measured on both
      sides, per benchmark, and never taken below what is typical for its operation, nor below
      what the other variants of its backend show on that operation (``-nosync``, presets);
    * the verdict rule is the one above: beyond the threshold at ``confidence`` and significant
      after Bonferroni;
    * ``slower? (rerun)`` when it is not, but would be at the spread usual for its operation:
      the benchmark's own runs disagreed (one of them hit by a neighbour, typically), which more
      runs settle.  No failure; ``--rerun FILE`` lists them and ``.ci/bench-gate`` runs both
      sides twice more and judges just those (``--only FILE``) on the new runs.

    In both modes a tutorial or limit row is at most ``slower (reference row)``, never a
    regression: it measures the machine or the reference code, not imgstore.

    Measured on this project's 2-core machine (README, "Regression gate"): false alarms in A/A
    comparisons and detections of a 25% slowdown injected into one benchmark, from runs of
    the gated matrix.

Benchmarks without saved rounds (in either run), or with too few for the suite-wide test ever to
pass (at 99%: fewer than 5 rounds for one benchmark, 8 for 40, 9 for 100; see
:func:`rounds_needed`), are judged on their medians alone against the threshold and labelled
``... (unconfirmed)``; those verdicts never count as regressions, because a threshold on one
median is exactly the noisy check this module replaces.  Benchmarks in one run only are ``added``
or ``removed``, which is not a failure either.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imgstore.errors import ImgStoreError  # noqa: F401  (re-exported: callers catch compare.ImgStoreError)

# Reading and checking saved runs: in one place for compare and plot (re-exported here).
from imgstore.runs import Benchmark, Run, load_run, load_runs, merge_runs

__all__ = [
    "Benchmark",
    "Comparison",
    "DEFAULT_COLUMNS",
    "Drift",
    "COLUMNS",
    "CONFIDENCE_RANGE",
    "Run",
    "Verdict",
    "compare_runs",
    "format_markdown",
    "format_table",
    "has_regression",
    "unsure",
    "load_run",
    "machine_drift",
    "load_runs",
    "merge_runs",
    "repeated_run_spreads",
    "notes",
    "parse_threshold",
    "between_run_spreads",
    "ratio_interval",
    "rounds_needed",
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
# Confidences accepted by compare_runs: beyond these its Bonferroni-adjusted level rounds to 1 in
# floating point (or its z to 0), and no gate wants them anyway.
CONFIDENCE_RANGE = (1e-6, 1 - 1e-6)


class Verdict(str, Enum):
    REGRESSION = "regression"
    # Slower than the threshold by its ratio, but the interval does not settle it: not a failure;
    # rerun those benchmarks (``--rerun FILE`` lists them; .ci/bench-gate does it) and judge again.
    UNSURE = "slower? (rerun)"
    # A tutorial or limit row judged slower: the machine or the reference code moved, not imgstore;
    # shown, never a failure.
    REFERENCE_SLOWER = "slower (reference row)"
    IMPROVEMENT = "improvement"
    UNCHANGED = "unchanged"
    # Judged on the medians alone (no saved rounds, or too few for the suite-wide test): never a
    # failure, since a threshold on medians is the noisy check this module replaces.
    SLOWER_UNCONFIRMED = "slower (unconfirmed)"
    FASTER_UNCONFIRMED = "faster (unconfirmed)"
    UNCHANGED_UNCONFIRMED = "unchanged (unconfirmed)"
    ADDED = "added"
    REMOVED = "removed"

    def __str__(self) -> str:
        return self.value


# Order of the rows: what needs attention first.
_VERDICT_ORDER = {verdict: rank for rank, verdict in enumerate(Verdict)}


@dataclass(frozen=True)
class Comparison:
    """One row of the comparison.

    ``ratio`` is candidate/baseline of the medians (divided by the machine drift when normalized);
    with repeated runs on a side, of the geometric means of each run's fastest round.
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
    significant: bool = False  # the Bonferroni-adjusted interval excludes 1
    between_runs: float = 0.0  # log-scale spread between runs added to the interval (see module)


# ------------------------------------------------------------------------------------ statistics


def ratio_interval(baseline: Sequence[float], candidate: Sequence[float], confidence: float) -> tuple[float, float]:
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
    count: int  # type: ignore[assignment]  # benchmarks it is the median of (shadows tuple.count)
    reference: bool  # True: tutorial/limit benchmarks only; False: all common benchmarks


def machine_drift(baseline: Run, candidate: Run) -> Drift | None:
    """How much the machine itself moved between the runs.

    The median candidate/baseline ratio of the benchmarks a change to imgstore cannot affect
    (``extra_info.kind`` "tutorial" or "limit"), or of all common benchmarks if the runs have fewer
    than three of those.  None when the runs have nothing in common.
    """
    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    reference = [name for name in common if baseline.benchmarks[name].extra_info.get("kind") in REFERENCE_KINDS]
    chosen = reference if len(reference) >= 3 else common
    if not chosen:
        return None
    logs = [math.log(candidate.benchmarks[name].median / baseline.benchmarks[name].median) for name in chosen]
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

    ``threshold`` is a fraction (0.10 for 10%); ``confidence`` is that of each interval, and the
    suite-wide significance check uses it Bonferroni-adjusted (see the module docstring);
    ``normalize`` divides every ratio by :func:`machine_drift`.
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a non-negative fraction, not {threshold}")
    if not CONFIDENCE_RANGE[0] <= confidence <= CONFIDENCE_RANGE[1]:  # also rejects nan
        raise ValueError(
            f"confidence must be between {CONFIDENCE_RANGE[0]:f} and {CONFIDENCE_RANGE[1]:f}, not {confidence}"
        )
    measured = machine_drift(baseline, candidate) if normalize else None
    drift = measured.factor if measured else 1.0

    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    with_rounds = {name for name in common if baseline.benchmarks[name].rounds and candidate.benchmarks[name].rounds}
    # Bonferroni: "did anything change at all" keeps the asked-for confidence for the whole suite.
    suite = 1 - (1 - confidence) / max(len(with_rounds), 1)

    repeated = [
        name
        for name in with_rounds
        if max(len(baseline.benchmarks[name].run_rounds), len(candidate.benchmarks[name].run_rounds)) > 1
    ]
    if repeated:
        rows = list(_repeated_comparisons(baseline, candidate, repeated, threshold, confidence, suite, drift))
        return _sorted_rows(rows + _other_rows(baseline, candidate, set(repeated), threshold, drift))

    # First the within-run intervals, then the between-run spread that the reference rows of
    # each operation show, which widens every interval of that operation.
    within: dict[str, tuple[float, float, float, float, float]] = {}
    for name in with_rounds:
        base, cand = baseline.benchmarks[name], candidate.benchmarks[name]
        rounds = [t / drift for t in cand.rounds]
        ratio = cand.median / base.median / drift
        within[name] = (
            ratio,
            *ratio_interval(base.rounds, rounds, confidence),
            *ratio_interval(base.rounds, rounds, suite),
        )
    spreads = between_run_spreads(baseline, within, confidence)

    z_each, z_suite = (statistics.NormalDist().inv_cdf(0.5 + c / 2) for c in (confidence, suite))
    rows = _other_rows(baseline, candidate, set(within), threshold, drift)
    for name in within:
        base, cand = baseline.benchmarks[name], candidate.benchmarks[name]
        ratio, low, high, suite_low, suite_high = within[name]
        spread = spreads.get(base.extra_info.get("operation"), 0.0)
        low, high = _widen(ratio, low, high, z_each * spread)
        suite_low, suite_high = _widen(ratio, suite_low, suite_high, z_suite * spread)
        significant = suite_low > 1 or suite_high < 1
        if math.isinf(suite_high):  # too few rounds for the suite-wide test to ever pass
            verdict = _unconfirmed_verdict(ratio, threshold)
        else:
            verdict = _verdict(low, high, significant, threshold, base.extra_info.get("kind"))
        rows.append(Comparison(name, base.name, verdict, base, cand, ratio, low, high, confidence, significant, spread))
    return _sorted_rows(rows)


def _other_rows(baseline: Run, candidate: Run, judged: set[str], threshold: float, drift: float) -> list[Comparison]:
    """The rows not judged on rounds: unconfirmed (medians only), added, removed."""
    rows = []
    for name, base in baseline.benchmarks.items():
        cand = candidate.benchmarks.get(name)
        if cand is None:
            rows.append(Comparison(name, base.name, Verdict.REMOVED, base, None))
        elif name not in judged:
            ratio = cand.median / base.median / drift
            rows.append(Comparison(name, base.name, _unconfirmed_verdict(ratio, threshold), base, cand, ratio))
    for name, bench in candidate.benchmarks.items():
        if name not in baseline.benchmarks:
            rows.append(Comparison(name, bench.name, Verdict.ADDED, None, bench))
    return rows


def _sorted_rows(rows: list[Comparison]) -> list[Comparison]:
    return sorted(rows, key=_row_order)


def _repeated_comparisons(
    baseline: Run,
    candidate: Run,
    names: Sequence[str],
    threshold: float,
    confidence: float,
    suite: float,
    drift: float,
) -> Iterator[Comparison]:
    """Verdicts from runs repeated on each side (see the module docstring, "Repeated runs").

    A run's figure for a benchmark is its fastest round: interference only ever adds time, so
    the fastest round is the one least touched by it, while a slower code path slows it like
    every other round.  The ratio is that of the geometric means of these figures, candidate
    over baseline; its interval comes from how much they spread between runs of the same code
    (:func:`repeated_run_spreads`), on a normal approximation.
    """
    fastest = {
        name: [
            [math.log(min(rounds)) for rounds in bench.run_rounds or (bench.rounds,)]
            for bench in (baseline.benchmarks[name], candidate.benchmarks[name])
        ]
        for name in names
    }
    spreads = repeated_run_spreads(baseline, fastest)
    z_each, z_suite = (statistics.NormalDist().inv_cdf(0.5 + c / 2) for c in (confidence, suite))
    for name in names:
        base, cand = baseline.benchmarks[name], candidate.benchmarks[name]
        base_logs, cand_logs = fastest[name]
        centre = statistics.fmean(cand_logs) - statistics.fmean(base_logs) - math.log(drift)
        spread, typical = spreads[name]
        low, high = math.exp(centre - z_each * spread), math.exp(centre + z_each * spread)
        significant = centre - z_suite * spread > 0 or centre + z_suite * spread < 0
        verdict = _verdict(low, high, significant, threshold, base.extra_info.get("kind"))
        # Unsettled only because this benchmark's runs disagreed (one run hit by a neighbour, say):
        # at its operation's usual spread the same ratio would be a regression, so a rerun can settle it.
        reference = base.extra_info.get("kind") in REFERENCE_KINDS  # no imgstore change to settle there
        if (
            verdict is Verdict.UNCHANGED
            and not reference
            and centre - max(z_each, z_suite) * typical > math.log1p(threshold)
        ):
            verdict = Verdict.UNSURE
        yield Comparison(
            name, base.name, verdict, base, cand, math.exp(centre), low, high, confidence, significant, spread
        )


def between_run_spreads(
    baseline: Run,
    within: dict[str, tuple[float, float, float, float, float]],
    confidence: float,
) -> dict[Any, float]:
    """Per operation, the spread (sd of the log ratio) between two runs that rounds cannot show.

    The reference rows (kinds tutorial/limit) are an A/A comparison inside every comparison: a
    change to imgstore cannot move them.  Their log ratios spread by within-run noise, which their
    intervals already cover, plus between-run drift; the latter is estimated as
    sqrt(total^2 - within^2): total = root mean square of their log ratios (about 0, so drift of
    the whole run counts too unless normalized; not a robust estimate, because every reference row
    is noise and the tails are what a verdict must survive), within = mean squared half-width of
    their log intervals / z.  Operations with fewer than 3 reference rows get none.
    ``within`` maps fullname -> (ratio, low, high, ...) as computed in :func:`compare_runs`.
    """
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    by_operation: dict[Any, list[tuple[float, float]]] = {}
    for name, (ratio, low, high, *_) in within.items():
        info = baseline.benchmarks[name].extra_info
        if info.get("kind") in REFERENCE_KINDS and low > 0 and math.isfinite(high):
            half_width = (math.log(high) - math.log(low)) / 2 / z
            by_operation.setdefault(info.get("operation"), []).append((math.log(ratio), half_width))
    spreads = {}
    for operation, pairs in by_operation.items():
        if len(pairs) < 3:
            continue
        total = statistics.fmean(log_ratio**2 for log_ratio, _ in pairs)
        noise = statistics.fmean(half**2 for _, half in pairs)
        spreads[operation] = math.sqrt(max(0.0, total - noise))
    return spreads


def repeated_run_spreads(baseline: Run, fastest: dict[str, list[list[float]]]) -> dict[str, tuple[float, float]]:
    """Per benchmark, the sd (log scale) of the difference between the two sides' means, and the
    sd its operation usually has (both times sqrt(1/k + 1/m)).

    ``fastest`` maps a benchmark to [baseline logs, candidate logs], one figure per run.  Runs of
    the same code differ only by the machine, so their spread holds whatever the change did: the
    sd of a run's figure about its side's mean, pooled over both sides, times sqrt(1/k + 1/m)
    for k and m runs.  With two runs a side a benchmark's own estimate rests on two degrees of
    freedom and now and then comes out far too small, so it is never taken below the two floors
    described in the body (its operation's usual spread, its backend's other variants').
    """
    variance: dict[str, float] = {}
    factor: dict[str, float] = {}
    freedoms = []
    for name, sides in fastest.items():
        squares, freedom = 0.0, 0
        for logs in sides:
            mean = statistics.fmean(logs)
            squares += sum((x - mean) ** 2 for x in logs)
            freedom += len(logs) - 1
        variance[name] = squares / freedom if freedom else 0.0
        freedoms.append(freedom)
        factor[name] = math.sqrt(sum(1 / len(logs) for logs in sides))
    # Two floors. What is usual for the operation: the median over its benchmarks, robust to a few
    # odd ones. And what the variants of the same backend on the same operation show (the mean over
    # the other rows of the same kind and backend: imgstore-png, -png-nosync, -png-level0, ...):
    # they run the same code path, and a PNG write swings with the cost of creating files for
    # seconds at a time, which two runs of one benchmark can miss.
    by_operation: dict[Any, list[float]] = {}
    by_backend: dict[Any, list[tuple[str, float]]] = {}
    for name, value in variance.items():
        info = baseline.benchmarks[name].extra_info
        by_operation.setdefault(info.get("operation"), []).append(value)
        by_backend.setdefault(_variant_group(info), []).append((name, value))
    # The median of variances with few degrees of freedom falls short of their mean (0.69x at 2):
    # scaled back by the median of chi-square/df (Wilson-Hilferty), so the floor is not too low.
    median_freedom = statistics.median(freedoms) if freedoms else 0
    shortfall = (1 - 2 / (9 * median_freedom)) ** 3 if median_freedom else 1.0
    typical = {operation: statistics.median(values) / shortfall for operation, values in by_operation.items()}
    spreads = {}
    for name, value in variance.items():
        info = baseline.benchmarks[name].extra_info
        siblings = [v for other, v in by_backend[_variant_group(info)] if other != name]
        usual = max(typical[info.get("operation")], statistics.fmean(siblings) if siblings else 0.0)
        spreads[name] = (math.sqrt(max(value, usual)) * factor[name], math.sqrt(usual) * factor[name])
    return spreads


def _variant_group(info: dict[str, Any]) -> tuple[Any, ...]:
    return info.get("operation"), info.get("kind"), info.get("backend"), info.get("images")


def _widen(ratio: float, low: float, high: float, extra: float) -> tuple[float, float]:
    """Add ``extra`` (log scale) to both half-widths of an interval, in quadrature."""
    if extra == 0 or low <= 0 or math.isinf(high):
        return low, high
    centre = math.log(ratio)
    down = math.hypot(centre - math.log(low), extra)
    up = math.hypot(math.log(high) - centre, extra)
    return math.exp(centre - down), math.exp(centre + up)


def _verdict(low: float, high: float, significant: bool, threshold: float, kind: object = None) -> Verdict:
    if significant and low > 1 + threshold:
        return Verdict.REFERENCE_SLOWER if kind in REFERENCE_KINDS else Verdict.REGRESSION
    if significant and high < 1 / (1 + threshold):
        return Verdict.IMPROVEMENT
    return Verdict.UNCHANGED


def _unconfirmed_verdict(ratio: float, threshold: float) -> Verdict:
    if ratio > 1 + threshold:
        return Verdict.SLOWER_UNCONFIRMED
    if ratio < 1 / (1 + threshold):
        return Verdict.FASTER_UNCONFIRMED
    return Verdict.UNCHANGED_UNCONFIRMED


def rounds_needed(confidence: float, benchmarks: int) -> int:
    """Fewest rounds (the same in both runs) for which the suite-wide test can pass at all:
    the most extreme ordering, every candidate round slower than every baseline round, has
    probability 1 / C(2n, n) when nothing changed, and must fall below (1 - confidence)/(2k)."""
    alpha = (1 - confidence) / max(benchmarks, 1)
    n = 1
    while 1 / math.comb(2 * n, n) > alpha / 2:
        n += 1
    return n


def _row_order(row: Comparison) -> tuple[int, float, str]:
    # Within a verdict the biggest change (either way) first.
    change = abs(math.log(row.ratio)) if row.ratio else 0.0
    return _VERDICT_ORDER[row.verdict], -change, row.fullname


def unsure(comparisons: Iterable[Comparison]) -> list[str]:
    """Full names of the benchmarks to rerun before a verdict (see :attr:`Verdict.UNSURE`)."""
    return [row.fullname for row in comparisons if row.verdict is Verdict.UNSURE]


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
) -> list[str]:
    """The footnotes a reader needs to trust (or distrust) the table."""
    lines = []
    tested = [row for row in comparisons if row.confidence is not None]
    if tested:
        lines.append(
            f"Intervals are at {tested[0].confidence:.4g} confidence; a regression's interval lies "
            f"above 1 + threshold and its slowdown stays significant after Bonferroni over the "
            f"{len(tested)} benchmarks with saved rounds."
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
    no_rounds = sum(row.verdict in unconfirmed and row.confidence is None for row in comparisons)
    if no_rounds:
        lines.append(
            f"{no_rounds} benchmark(s) have no saved rounds in one run: unconfirmed, judged on the "
            "medians and never counted as regressions (save runs with --benchmark-save-data)."
        )
    few = sum(row.verdict in unconfirmed and row.confidence is not None for row in comparisons)
    if few and tested:
        needed = rounds_needed(tested[0].confidence or 0.99, len(tested))
        lines.append(
            f"{few} benchmark(s) have too few rounds for the suite-wide test (it needs at least "
            f"{needed} in each run): unconfirmed, judged on the medians and never counted as "
            "regressions."
        )
    unsettled = [row.name for row in comparisons if row.verdict is Verdict.UNSURE]
    if unsettled:
        lines.append(
            f"{len(unsettled)} benchmark(s) slower than the threshold by their ratio but not conclusively "
            f"(not a failure): {', '.join(unsettled)}. Rerun just them and compare the new runs "
            "(--rerun FILE lists them; .ci/bench-gate does this once)."
        )
    regressions = [row for row in comparisons if row.verdict is Verdict.REGRESSION]
    repeated = [row for row in tested if _repeated(row)]
    if regressions and not repeated:
        # A neighbour can slow one benchmark for a whole run; a second run is the only cure.
        ids = " ".join(f"'{row.fullname}'" for row in regressions)
        sizes = sorted({str(row.baseline.extra_info.get("images")) for row in regressions if row.baseline})
        cutoffs = f" --cutoffs={','.join(sizes)}" if sizes and "None" not in sizes else ""
        lines.append(
            "A busy neighbour can slow one benchmark down for a whole run: confirm with "
            f"`pytest --benchmark-only{cutoffs} --benchmark-json=confirm.json {ids}` "
            "and compare the baseline with confirm.json."
        )
    if repeated:
        first = repeated[0]
        sides = f"{len(first.baseline.run_rounds) or 1} and {len(first.candidate.run_rounds) or 1}"  # type: ignore[union-attr]
        lines.append(
            f"Repeated runs ({sides} a side): ratio and interval are of each run's fastest round; "
            "the interval includes the spread between runs of the same code, per benchmark."
        )
    spreads: dict[str, float] = {}
    if not repeated:  # one run a side: the spreads come from the reference rows, per operation
        for row in tested:
            if row.between_runs and row.baseline is not None:
                spreads[str(row.baseline.extra_info.get("operation"))] = row.between_runs
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


def _repeated(row: Comparison) -> bool:
    return bool((row.baseline and row.baseline.run_rounds) or (row.candidate and row.candidate.run_rounds))


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
        f"A regression is a benchmark slower than the {threshold:.0%} threshold at "
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
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _describe(run: Run) -> str:
    details = [detail for detail in (run.commit and run.commit[:10], run.datetime) if detail]
    suffix = f" ({', '.join(details)})" if details else ""
    return f"`{Path(run.path).name}`{suffix}"
