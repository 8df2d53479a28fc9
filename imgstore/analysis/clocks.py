"""Which clock a verdict is taken on: the gate's CPU timer, and wall time where CPU time cannot see.

The regression gate times rounds in CPU seconds (``--benchmark-timer=benchmarks.timer.cpu_seconds``:
the process and its reaped children, so a DataLoader's workers count): on a shared machine a
neighbour stretches wall time 1.5-4x between runs of the same code at 10 000 images and CPU time
far less (README, "Regression gate"). The suite keeps each round's wall time beside it
(``extra_info["wall_rounds"]``) and marks the rows whose cost is a wait (``extra_info["judged_on"]
== "wall"``: cold-cache rows and durable writes, which wait on the disk). :func:`compare_clocks` then

* judges every row on its judged clock: the saved rounds (CPU), or the wall rounds of a row marked
  ``wall``, at ``threshold``;
* judges the CPU-judged rows a second time on their wall rounds at the wider ``wall_threshold``:
  what CPU time cannot see -- lost parallelism (threads in ``get_many``, loader workers), a sleep, a
  lock, an fsync or I/O pattern added -- still fails the gate when it is large, while a neighbour's
  load (which moves wall time by tens of percent) does not.

A row regressed on either clock is a regression; ``Comparison.clock`` says which clock gave the
verdict shown. Runs without wall rounds (an older suite, or plain ``pytest-benchmark`` runs) are
judged on their rounds alone, as before.
"""

from __future__ import annotations

import dataclasses
import statistics

from imgstore.analysis.load import Benchmark, Run
from imgstore.analysis.verdict import Comparison, Verdict, compare_runs, sorted_rows
from imgstore.errors import ImgStoreError

__all__ = ["DEFAULT_WALL_THRESHOLD", "WALL_TIMERS", "compare_clocks", "judged_on_wall", "wall_view"]

# A CPU-timed row's wall time is judged at this threshold: between runs of the same code at
# 10 000 images wall time moved 1.5-4x here, and the interval of two runs a side rarely shows
# less than a 50% change through that (measured: README, "Regression gate").
DEFAULT_WALL_THRESHOLD = 0.50
# pytest-benchmark's timers (options.timer) that measure wall time: their rounds need no second look.
WALL_TIMERS = frozenset({"perf_counter", "time", "monotonic", "default_timer", "clock"})


def judged_on_wall(bench: Benchmark) -> bool:
    """The suite marked this row as waiting (cold cache, fsync) and its rounds are not wall time already:
    its verdict is on its wall rounds."""
    return bench.extra_info.get("judged_on") == "wall" and bool(bench.wall_rounds) and bench.timer not in WALL_TIMERS


def _on_wall(bench: Benchmark) -> Benchmark:
    rounds = bench.wall_rounds
    return dataclasses.replace(
        bench,
        median=statistics.median(rounds),
        rounds=rounds,
        run_rounds=bench.run_wall_rounds,
        timer="wall",
    )


def judged_view(run: Run, names: set[str]) -> Run:
    """``run`` with the rows in ``names`` timed by their wall rounds (the rest as they are)."""
    benchmarks = {name: _on_wall(b) if name in names else b for name, b in run.benchmarks.items()}
    return dataclasses.replace(run, benchmarks=benchmarks)


def wall_view(run: Run, names: set[str]) -> Run:
    """Only the rows in ``names``, timed by their wall rounds."""
    return dataclasses.replace(run, benchmarks={name: _on_wall(run.benchmarks[name]) for name in names})


def compare_clocks(
    baseline: Run,
    candidate: Run,
    threshold: float = 0.10,
    confidence: float = 0.99,
    *,
    normalize: bool = False,
    wall_threshold: float | None = DEFAULT_WALL_THRESHOLD,
    paired: bool = False,
) -> list[Comparison]:
    """:func:`~imgstore.analysis.verdict.compare_runs` on each row's judged clock, plus the wall check
    of CPU-judged rows at ``wall_threshold`` (None: no wall check). See the module docstring."""
    common = [name for name in baseline.benchmarks if name in candidate.benchmarks]
    for name in common:
        base, cand = baseline.benchmarks[name].timer, candidate.benchmarks[name].timer
        if base and cand and base != cand:
            raise ImgStoreError(
                f"{name}: the baseline was timed with {base} and the candidate with {cand}: not comparable "
                "(run both sides with the same --benchmark-timer)"
            )
    pairs = [(name, baseline.benchmarks[name], candidate.benchmarks[name]) for name in common]
    on_wall = {name for name, base, cand in pairs if judged_on_wall(base) and judged_on_wall(cand)}
    rows = compare_runs(
        judged_view(baseline, on_wall),
        judged_view(candidate, on_wall),
        threshold,
        confidence,
        normalize=normalize,
        paired=paired,
    )
    rows = [dataclasses.replace(row, clock="wall") if row.fullname in on_wall else row for row in rows]
    wall_checked = {
        name
        for name, base, cand in pairs
        if name not in on_wall and base.wall_rounds and cand.wall_rounds and base.timer not in WALL_TIMERS
    }
    if wall_threshold is None or not wall_checked:
        return rows
    walls = compare_runs(
        wall_view(baseline, wall_checked), wall_view(candidate, wall_checked), wall_threshold, confidence, paired=paired
    )
    flagged = {row.fullname: row for row in walls if row.verdict in (Verdict.REGRESSION, Verdict.UNSURE)}
    return sorted_rows([_graver(row, flagged.get(row.fullname)) for row in rows])


_GRAVITY = {Verdict.REGRESSION: 2, Verdict.UNSURE: 1}


def _graver(row: Comparison, wall: Comparison | None) -> Comparison:
    """The row's verdict, or the wall check's where that is graver (a regression, or a rerun to settle it)."""
    if wall is None or _GRAVITY.get(wall.verdict, 0) <= _GRAVITY.get(row.verdict, 0):
        return row
    return dataclasses.replace(wall, clock="wall")
