"""Compare two pytest-benchmark runs and say, per benchmark, whether it regressed.

Why not ``pytest --benchmark-compare-fail``: it fails when one statistic moves by more than a
threshold, and on a noisy, shared machine a single statistic of a few rounds moves 10-30% between
two runs of the same code.  Here every verdict comes from the saved rounds (``stats.data``, written
by ``--benchmark-json`` always and by ``--benchmark-save``/``--benchmark-autosave`` with
``--benchmark-save-data``), through the interval of :func:`imgstore.analysis.stats.ratio_interval`
(Hodges-Lehmann / Mann-Whitney on the log round times; why that one: :mod:`imgstore.analysis.stats`).
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
    can move (kinds ``tutorial`` and ``limit``; see
    :func:`~imgstore.analysis.stats.between_run_spreads`).  The same A/A pair then flagged nothing
    that fails (one "improvement").  The price is honest: an operation whose reference rows swing
    by 2x cannot gate on a 25% slowdown from one pair of runs.  What remains is a neighbour
    slowing a single imgstore row for a whole run (seen once: x2 on one read row while the tests
    ran beside the suite); the output then names the flagged benchmarks and the command that
    reruns just them to confirm.
    Without reference rows (as in the synthetic tests) intervals rest on the rounds alone.
    A drift of the whole machine is also estimated (:func:`~imgstore.analysis.stats.machine_drift`)
    and can be divided out with ``normalize=True``.

Repeated runs (the gate)
    Widening by the reference rows is coarse: it gives every row of an operation the drift of
    the worst reference row, so a 25% slowdown is lost in it.  What settles the question is to
    measure each benchmark's own drift: run each side twice, alternating (base, head, base, head;
    ``.ci/bench-gate`` takes them as paired sessions, below), and give :func:`compare_runs` the merged runs
    (:func:`~imgstore.analysis.load.merge_runs`, or a directory per side on the command line).
    Then:

    * a run's figure for a benchmark is its fastest round.  Interference on a shared machine
      only adds time; it hits the median of a run whenever it lasts a few seconds (seen: +27%
      on every round of a read benchmark while the rest of the run was clean) while the fastest
      round stays within 1-3% between runs.  A slower code path slows every round, the fastest
      too.  (BenchmarkTools.jl judges on minimums for the same reason.)  The ratio shown is
      that of the geometric means of these figures, candidate over baseline;
    * its interval is ratio x/÷ exp(z sd), sd from how far the runs of the same code spread
      (:func:`~imgstore.analysis.stats.repeated_run_spreads`): the change cannot move that, so it
      is measured on both sides, per benchmark, and never taken below three floors among the rows
      run the same way (size, cache, workers, clock): what is typical for its operation, for all
      such rows, and what the other variants of its backend show on that operation (``-nosync``,
      presets); the tutorial and limit rows set none of them for imgstore's rows;
    * the verdict rule is the one above: beyond the threshold at ``confidence`` and significant
      after Bonferroni;
    * ``slower? (rerun)`` when it is not, but its ratio is over the threshold: two runs a side
      cannot tell that from drift (its own runs disagreed, one of them hit by a neighbour, or its
      spread is wide), and more runs can.  No failure; ``--rerun FILE`` lists them, after the
      regressions (to confirm), and ``.ci/bench-gate`` runs all of those in two more paired sessions,
      then judges them on all four (``--partial-runs --only FILE``: the rerun sessions hold just
      those benchmarks, while the spread floors and the Bonferroni count still come from the whole
      matrix); the gate fails only on a regression confirmed there.
      Until ``44fa472`` (2026-11-30) only rows whose own runs disagreed were rerun, and a 2-worker
      epoch slowed 25% whose spread floor was wide was missed 3-4 times in 20 (README, "Regression gate").

    Paired sessions (``paired=True``, ``imgstore compare --paired``: what ``.ci/bench-gate`` now
    runs): run i of each side was taken in turns with the other, one benchmark at a time
    (benchmarks/turns.py), so a neighbour's load that moves whole runs by 5-10% touches both
    measurements of a benchmark alike.  The spread is then that of each benchmark's differences
    between the sessions (same floors), and the rule is the one above; a row the two sides hold in
    fewer than two of the same sessions (a partial merge) has no pairs, and is judged on its medians
    like a row without rounds: never a regression.  Measured with the gate of the day, two
    sessions deciding (README, "Regression gate", earlier measurements), on a quiet machine: the same
    sessions taken as unpaired runs caught a 25% slowdown at 10 000 images 11-16 times in 20, paired
    18-20 times, with no A/A false alarm either way; while a CI run loaded the machine, paired 4-9
    times in 10 (unpaired 2-6), with 2 A/A false alarms in 11.  The gate now (four sessions decide):
    every slowdown 20 times in 20 and no A/A false alarm in 21 on a holdout set of sessions.

    In both modes a tutorial or limit row is at most ``slower (reference row)``, never a
    regression: it measures the machine or the reference code, not imgstore.

    Measured on this project's 2-core machine (README, "Regression gate"): false alarms in A/A
    comparisons and detections of 25% slowdowns injected into benchmarks of two backends and of a
    real code change in a third, from paired sessions of the gated matrix (narrowed to those
    backends and the limit rows).

Benchmarks without saved rounds (in either run), or with too few for the suite-wide test ever to
pass (at 99%: fewer than 5 rounds for one benchmark, 8 for 40, 9 for 100; see
:func:`~imgstore.analysis.stats.rounds_needed`), are judged on their medians alone against the
threshold and labelled ``... (unconfirmed)``; those verdicts never count as regressions, because
a threshold on one median is exactly the noisy check this module replaces.  Benchmarks in one run
only are ``added`` or ``removed``, which is not a failure either.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from imgstore.analysis.load import Benchmark, Run
from imgstore.analysis.schema import REFERENCE_KINDS
from imgstore.analysis.stats import (
    between_run_spreads,
    machine_drift,
    ratio_interval,
    repeated_run_spreads,
    widen,
)
from imgstore.errors import ImgStoreError

__all__ = [
    "CONFIDENCE_RANGE",
    "Comparison",
    "Verdict",
    "compare_runs",
    "has_regression",
    "format_threshold",
    "parse_threshold",
    "sorted_rows",
    "to_rerun",
    "unsure",
]

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
    # "wall" when the verdict is on the rounds' wall time, the run's timer being CPU time
    # (imgstore.analysis.clocks); "" when on the run's own rounds.
    clock: str = ""


def compare_runs(
    baseline: Run,
    candidate: Run,
    threshold: float = 0.10,
    confidence: float = 0.99,
    *,
    normalize: bool = False,
    paired: bool = False,
) -> list[Comparison]:
    """Compare every benchmark of the two runs; rows sorted with regressions first.

    ``threshold`` is a fraction (0.10 for 10%); ``confidence`` is that of each interval, and the
    suite-wide significance check uses it Bonferroni-adjusted (see the module docstring);
    ``normalize`` divides every ratio by :func:`~imgstore.analysis.stats.machine_drift`.
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a non-negative fraction, not {threshold}")
    if not CONFIDENCE_RANGE[0] <= confidence <= CONFIDENCE_RANGE[1]:  # also rejects nan
        raise ValueError(
            f"confidence must be between {CONFIDENCE_RANGE[0]:f} and {CONFIDENCE_RANGE[1]:f}, not {confidence}"
        )
    if paired and not baseline.runs == candidate.runs >= 2:
        # No pairs to take: judging them unpaired while the report says "paired" would hide it.
        raise ImgStoreError(
            f"--paired takes as many runs a side, at least two, run N of one side taken in turns with run N of "
            f"the other (.ci/bench-gate's sessions); the baseline has {_runs(baseline)} and the candidate "
            f"{_runs(candidate)}"
        )
    measured = machine_drift(baseline, candidate) if normalize else None
    drift = measured.factor if measured else 1.0

    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    with_rounds = {name for name in common if baseline.benchmarks[name].rounds and candidate.benchmarks[name].rounds}
    if paired:
        # A row whose sides share fewer than two runs (merge_runs(partial=True): held by different runs
        # on each side) has no pairs to take: pairing run i with run j would judge two different
        # sessions' machines, and its spread against the paired rows' floors. Judged on its medians.
        with_rounds = {name for name in with_rounds if len(_shared_runs(baseline, candidate, name)) >= 2}
    repeated = [
        name
        for name in with_rounds
        if max(len(baseline.benchmarks[name].run_rounds), len(candidate.benchmarks[name].run_rounds)) > 1
    ]
    # Bonferroni: "did anything change at all" keeps the asked-for confidence for the whole suite, over
    # the rows judged on rounds (with repeated runs, a row a single run holds a side is not).
    suite = 1 - (1 - confidence) / max(len(repeated or with_rounds), 1)

    if repeated:
        rows = list(_repeated_comparisons(baseline, candidate, repeated, threshold, confidence, suite, drift, paired))
        return sorted_rows(rows + _other_rows(baseline, candidate, set(repeated), threshold, drift))

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
        spread = spreads.get(base.record.operation, 0.0)
        low, high = widen(ratio, low, high, z_each * spread)
        suite_low, suite_high = widen(ratio, suite_low, suite_high, z_suite * spread)
        significant = suite_low > 1 or suite_high < 1
        if math.isinf(suite_high):  # too few rounds for the suite-wide test to ever pass
            verdict = _unconfirmed_verdict(ratio, threshold)
        else:
            verdict = _verdict(low, high, significant, threshold, base.record.kind)
        rows.append(Comparison(name, base.name, verdict, base, cand, ratio, low, high, confidence, significant, spread))
    return sorted_rows(rows)


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


def _runs(run: Run) -> str:
    return f"{run.runs} run{'s' if run.runs != 1 else ''}"


def sorted_rows(rows: list[Comparison]) -> list[Comparison]:
    """Rows in the report's order: what needs attention first."""
    return sorted(rows, key=_row_order)


def _repeated_comparisons(
    baseline: Run,
    candidate: Run,
    names: Sequence[str],
    threshold: float,
    confidence: float,
    suite: float,
    drift: float,
    paired: bool = False,
) -> Iterator[Comparison]:
    """Verdicts from runs repeated on each side (see the module docstring, "Repeated runs").

    A run's figure for a benchmark is its fastest round: interference only ever adds time, so
    the fastest round is the one least touched by it, while a slower code path slows it like
    every other round.  The ratio is that of the geometric means of these figures, candidate
    over baseline; its interval comes from how much they spread between runs of the same code
    (:func:`~imgstore.analysis.stats.repeated_run_spreads`), on a normal approximation.
    """
    fastest = {name: _fastest(baseline.benchmarks[name], candidate.benchmarks[name], paired) for name in names}
    spreads = repeated_run_spreads(baseline, fastest, paired=paired)
    z_each, z_suite = (statistics.NormalDist().inv_cdf(0.5 + c / 2) for c in (confidence, suite))
    step = math.log1p(threshold)
    for name in names:
        base, cand = baseline.benchmarks[name], candidate.benchmarks[name]
        base_logs, cand_logs = fastest[name]
        centre = statistics.fmean(cand_logs) - statistics.fmean(base_logs) - math.log(drift)
        spread = spreads[name]
        low, high = math.exp(centre - z_each * spread), math.exp(centre + z_each * spread)
        significant = centre - z_suite * spread > 0 or centre + z_suite * spread < 0
        verdict = _verdict(low, high, significant, threshold, base.record.kind)
        # Slower than the threshold, but two sessions cannot tell it from drift: its own runs disagreed
        # (one hit by a neighbour), or its spread is wide. More sessions settle it: the gate's rerun
        # stage runs it twice more and judges it on every session (merge_runs(partial=True)).
        reference = base.record.kind in REFERENCE_KINDS  # no imgstore change to settle there
        if verdict is Verdict.UNCHANGED and not reference and centre > step:
            verdict = Verdict.UNSURE
        yield Comparison(
            name, base.name, verdict, base, cand, math.exp(centre), low, high, confidence, significant, spread
        )


def _run_numbers(bench: Benchmark) -> tuple[int, ...]:
    """Which runs (0-based, in merge order) hold the benchmark's run_rounds."""
    return bench.run_numbers or tuple(range(len(bench.run_rounds) or 1))


def _shared_runs(baseline: Run, candidate: Run, name: str) -> set[int]:
    return set(_run_numbers(baseline.benchmarks[name])) & set(_run_numbers(candidate.benchmarks[name]))


def _fastest(base: Benchmark, cand: Benchmark, paired: bool) -> list[list[float]]:
    """Each side's log fastest round per run; paired, only the runs (sessions) both sides have the
    benchmark in (compare_runs judges a row paired only when there are two), so that run i of one side
    still pairs with run i of the other."""
    sides = [list(bench.run_rounds or (bench.rounds,)) for bench in (base, cand)]
    numbers = [_run_numbers(base), _run_numbers(cand)]
    if paired and numbers[0] != numbers[1]:
        common = set(numbers[0]) & set(numbers[1])
        sides = [
            [rounds for number, rounds in zip(held, side, strict=True) if number in common]
            for held, side in zip(numbers, sides, strict=True)
        ]
    return [[math.log(min(rounds)) for rounds in side] for side in sides]


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


def _row_order(row: Comparison) -> tuple[int, float, str]:
    # Within a verdict the biggest change (either way) first.
    change = abs(math.log(row.ratio)) if row.ratio else 0.0
    return _VERDICT_ORDER[row.verdict], -change, row.fullname


def unsure(comparisons: Iterable[Comparison]) -> list[str]:
    """Full names of the benchmarks to rerun before a verdict (see :attr:`Verdict.UNSURE`)."""
    return [row.fullname for row in comparisons if row.verdict is Verdict.UNSURE]


def to_rerun(comparisons: Iterable[Comparison]) -> list[str]:
    """Full names of the benchmarks the gate runs again (``--rerun FILE``): the regressions, to confirm on
    four sessions, then the unsure rows, to settle.  Two sessions that agree by chance on a row that swings
    (a cold 2-worker epoch: x0.74-x1.30 between sessions) made a false alarm; confirmed on four they did not
    (README, "Regression gate")."""
    return [row.fullname for row in comparisons if row.verdict is Verdict.REGRESSION] + unsure(comparisons)


def has_regression(comparisons: Iterable[Comparison]) -> bool:
    return any(row.verdict is Verdict.REGRESSION for row in comparisons)


def parse_threshold(text: str) -> float:
    """A threshold as a fraction, from '10%' (percent: a '%' sign) or '0.10' (a fraction, below 1).

    '10%' and '0.10' are both 10%; '0.1%' is 0.1%.  A bare number of 1 or more ('10') is refused:
    it reads as 10% to some and as 1000% to others, and '0.1' was once taken as 0.1%.
    """
    stripped = text.strip()
    percent = stripped.endswith("%")
    number = stripped.removesuffix("%").strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(
            f"threshold must be a percentage such as 10% or a fraction such as 0.10, not {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold must be a non-negative percentage (10%) or fraction (0.10), not {text!r}")
    if percent:
        return value / 100
    if value >= 1:
        raise ValueError(
            f"threshold {text!r} is ambiguous: write {value:g}% for a percentage, or a fraction below 1 "
            f"such as {value / 100:g}"
        )
    return value


def format_threshold(threshold: float) -> str:
    """A threshold as people wrote it: 0.1 -> '10%', 0.001 -> '0.1%' (never rounded to 0%)."""
    return f"{threshold * 100:.4g}%"
