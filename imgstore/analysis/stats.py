"""Statistics of benchmark runs: intervals for a ratio of timings, spreads between runs, machine drift.

The interval
    For each benchmark in both runs we give a confidence interval for the ratio candidate/baseline
    of its round times: the Hodges-Lehmann / Mann-Whitney (Moses) interval for the shift between
    the *log* round times, turned back into a ratio (:func:`ratio_interval`).  Chosen over a
    bootstrap of the median because it is distribution-free and exact for the model "the
    candidate's times are the baseline's times times a factor", which is how a code change acts on
    timing noise; it stays honest with the 5-20 rounds of slow benchmarks (a bootstrap of a median
    of 5 rounds covers far less than it claims); it is 1.5x as efficient as the median under
    near-normal log noise, so fewer rounds are needed; and it is deterministic, so the same two
    files always give the same verdict without a seed.

Between runs
    Rounds only show noise *within* a run; whole runs drift on a shared machine.  With one run a
    side, :func:`between_run_spreads` measures that drift per operation on the rows no imgstore
    change can move (kinds ``tutorial`` and ``limit``), and every interval of the operation is
    widened by it (:func:`widen`).  With repeated runs a side, :func:`repeated_run_spreads` measures
    it per benchmark, from how far runs of the same code spread.  :func:`machine_drift` estimates
    how much the whole machine moved.  How the verdicts use these: :mod:`imgstore.analysis.verdict`.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from imgstore.analysis.load import Run
from imgstore.analysis.schema import REFERENCE_KINDS, ResultRecord

__all__ = [
    "Drift",
    "between_run_spreads",
    "machine_drift",
    "ratio_interval",
    "repeated_run_spreads",
    "rounds_needed",
    "widen",
]

# Above this many rounds a run is thinned to this many evenly spaced order statistics: the
# interval gets (slightly) wider, never narrower, and n*m pairwise ratios stay cheap.
_MAX_ROUNDS = 1000
# Exact Mann-Whitney null distribution up to this n*m; the normal approximation is within one
# rank of it beyond (checked for 50x50 and 30x80).
_EXACT_LIMIT = 2500


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
    thinned: np.ndarray = ordered[np.linspace(0, len(ordered) - 1, _MAX_ROUNDS).round().astype(int)]
    return thinned


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
    (record kind "tutorial" or "limit"), or of all common benchmarks if the runs have fewer
    than three of those.  None when the runs have nothing in common.
    """
    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    reference = [name for name in common if baseline.benchmarks[name].record.kind in REFERENCE_KINDS]
    chosen = reference if len(reference) >= 3 else common
    if not chosen:
        return None
    # The figure each ratio is of (with repeated runs, the runs' fastest rounds, not the pooled median:
    # one slow run moves the median, not the ratio, and dividing by it made false regressions).
    logs = [math.log(candidate.benchmarks[name].figure / baseline.benchmarks[name].figure) for name in chosen]
    return Drift(math.exp(statistics.median(logs)), len(chosen), chosen is reference)


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
    ``within`` maps fullname -> (ratio, low, high, ...) as computed in :func:`imgstore.analysis.verdict.compare_runs`.
    """
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    by_operation: dict[Any, list[tuple[float, float]]] = {}
    for name, (ratio, low, high, *_) in within.items():
        record = baseline.benchmarks[name].record
        if record.kind in REFERENCE_KINDS and low > 0 and math.isfinite(high):
            half_width = (math.log(high) - math.log(low)) / 2 / z
            by_operation.setdefault(record.operation, []).append((math.log(ratio), half_width))
    spreads = {}
    for operation, pairs in by_operation.items():
        if len(pairs) < 3:
            continue
        total = statistics.fmean(log_ratio**2 for log_ratio, _ in pairs)
        noise = statistics.fmean(half**2 for _, half in pairs)
        spreads[operation] = math.sqrt(max(0.0, total - noise))
    return spreads


def repeated_run_spreads(
    baseline: Run, fastest: dict[str, list[list[float]]], *, paired: bool = False
) -> dict[str, float]:
    """Per benchmark, the sd (log scale) of the difference between the two sides' means (times
    sqrt(1/k + 1/m)), never below what its kind of row usually shows.

    ``fastest`` maps a benchmark to [baseline logs, candidate logs], one figure per run.  Runs of
    the same code differ only by the machine, so their spread holds whatever the change did: the
    sd of a run's figure about its side's mean, pooled over both sides, times sqrt(1/k + 1/m)
    for k and m runs.  With two runs a side a benchmark's own estimate rests on two degrees of
    freedom and now and then comes out far too small, so it is never taken below the three floors
    described in the body (its operation's usual spread, that of every row run the same way, its
    backend's other variants'), which the reference rows (tutorial, limit) do not set.

    ``paired``: run i of one side was taken in turns with run i of the other, benchmark by benchmark
    (``.ci/bench-gate``, benchmarks/turns.py), so the machine's slow swings touch both alike: the
    spread is that of the k differences candidate - baseline (k - 1 degrees of freedom), expressed
    per run (half their variance) so that the floors and the factor sqrt(2/k) read as above.  A
    benchmark with unequal run counts on the two sides is taken unpaired.
    """
    variance: dict[str, float] = {}
    factor: dict[str, float] = {}
    freedoms = []
    for name, sides in fastest.items():
        base_logs, cand_logs = sides
        if paired and len(base_logs) == len(cand_logs) >= 2:
            differences = [c - b for b, c in zip(base_logs, cand_logs, strict=True)]
            variance[name] = statistics.variance(differences) / 2
            freedoms.append(len(differences) - 1)
            factor[name] = math.sqrt(2 / len(differences))
            continue
        squares, freedom = 0.0, 0
        for logs in sides:
            mean = statistics.fmean(logs)
            squares += sum((x - mean) ** 2 for x in logs)
            freedom += len(logs) - 1
        variance[name] = squares / freedom if freedom else 0.0
        freedoms.append(freedom)
        factor[name] = math.sqrt(sum(1 / len(logs) for logs in sides))
    # Three floors. What is usual for the operation: the median over its benchmarks, robust to a few
    # odd ones. What is usual for every row run the same way (size, cache, workers, clock), whatever
    # its operation: an operation has few rows at one setting (4 epoch rows of a backend set at 10 000
    # images), and the median of 4 one-degree-of-freedom variances is often far too low (an A/A false
    # alarm here, README "Regression gate"). And what the variants of the same backend on the same
    # operation show (the mean over the other rows of the same kind and backend: imgstore-png,
    # -png-nosync, -png-level0, ...):
    # they run the same code path, and a PNG write swings with the cost of creating files for
    # seconds at a time, which two runs of one benchmark can miss.
    # A cold row (files read from disk), an epoch with worker processes or a round of tens of ms at 10 000
    # images swings far more between runs than a warm, in-process read of a few ms at 1 000: each size,
    # cache and worker count is its own kind of row for both floors.
    by_operation: dict[Any, list[float]] = {}
    by_setting: dict[Any, list[float]] = {}
    by_backend: dict[Any, list[tuple[str, float]]] = {}
    records = {name: baseline.benchmarks[name].record for name in variance}
    setting = {name: (records[name].images, *_setting(baseline.benchmarks[name].extra_info)) for name in variance}
    for name, value in variance.items():
        by_backend.setdefault((_variant_group(records[name]), setting[name]), []).append((name, value))
        # The reference rows (tutorial, limit: no imgstore code) set no floor for imgstore's rows: their
        # noise is their own (the LIMIT store_many row at 10 000 images, a raw write + fsync, swung 4x
        # between sessions while imgstore's durable writes moved 1-3%), and in a narrowed matrix one of
        # them is a quarter of its pool (README, "Regression gate").
        reference = records[name].kind in REFERENCE_KINDS
        for pool, key in ((by_operation, (records[name].operation, setting[name])), (by_setting, setting[name])):
            pool.setdefault(key, []).extend(() if reference else (value,))
    # The median of variances with few degrees of freedom falls short of their mean (0.69x at 2):
    # scaled back by the median of chi-square/df (Wilson-Hilferty), so the floor is not too low.
    median_freedom = statistics.median(freedoms) if freedoms else 0
    shortfall = (1 - 2 / (9 * median_freedom)) ** 3 if median_freedom else 1.0
    typical = {key: statistics.median(values) / shortfall if values else 0.0 for key, values in by_operation.items()}
    alike = {key: statistics.median(values) / shortfall if values else 0.0 for key, values in by_setting.items()}
    spreads = {}
    for name, value in variance.items():
        siblings = [v for other, v in by_backend[(_variant_group(records[name]), setting[name])] if other != name]
        usual = max(
            typical[(records[name].operation, setting[name])],
            alike[setting[name]],
            statistics.fmean(siblings) if siblings else 0.0,
        )
        spreads[name] = math.sqrt(max(value, usual)) * factor[name]
    return spreads


def _setting(extra_info: dict[str, Any]) -> tuple[str, str, str]:
    """The page cache and worker count a row ran with (the suite's ``cache``/``workers``; none: warm, in-process),
    and the clock it is judged on (``judged_on``: a durable write's wall time swings more than a ``-nosync``
    write's CPU time; imgstore.analysis.clocks)."""
    cache, workers = str(extra_info.get("cache", "warm")), str(extra_info.get("workers", 0))
    return cache, workers, str(extra_info.get("judged_on", "timer"))


def _variant_group(record: ResultRecord) -> tuple[Any, ...]:
    return record.operation, record.kind, record.backend, record.images


def widen(ratio: float, low: float, high: float, extra: float) -> tuple[float, float]:
    """Add ``extra`` (log scale) to both half-widths of an interval, in quadrature."""
    if extra == 0 or low <= 0 or math.isinf(high):
        return low, high
    centre = math.log(ratio)
    down = math.hypot(centre - math.log(low), extra)
    up = math.hypot(math.log(high) - centre, extra)
    return math.exp(centre - down), math.exp(centre + up)


def rounds_needed(confidence: float, benchmarks: int) -> int:
    """Fewest rounds (the same in both runs) for which the suite-wide test can pass at all:
    the most extreme ordering, every candidate round slower than every baseline round, has
    probability 1 / C(2n, n) when nothing changed, and must fall below (1 - confidence)/(2k)."""
    alpha = (1 - confidence) / max(benchmarks, 1)
    n = 1
    while 1 / math.comb(2 * n, n) > alpha / 2:
        n += 1
    return n
