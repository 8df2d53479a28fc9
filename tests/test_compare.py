"""Tests of ``imgstore compare``: the statistics on synthetic noise, and the whole command on runs
written by pytest-benchmark itself."""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.stats import Stats

from imgstore.analysis import load, report, stats, verdict
from imgstore.analysis.load import Benchmark, Run, load_run
from imgstore.analysis.verdict import Verdict, compare_runs
from imgstore.cli import main
from imgstore.errors import ImgStoreError

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------- helpers


def bench_json(
    fullname: str,
    rounds: Sequence[float],
    *,
    extra_info: dict[str, Any] | None = None,
    save_data: bool = True,
) -> dict[str, Any]:
    """One benchmark as pytest-benchmark writes it (stats computed by its own Stats class)."""
    timing = Stats()
    for seconds in rounds:
        timing.update(seconds)
    fields = timing.as_dict()
    if save_data:
        fields["data"] = list(rounds)
    fields["iterations"] = 1
    return {
        "group": None,
        "name": fullname.rpartition("::")[2],
        "fullname": fullname,
        "params": None,
        "param": None,
        "extra_info": extra_info or {},
        "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5},
        "stats": fields,
    }


def write_run(path: Path, benchmarks: list[dict[str, Any]]) -> Path:
    doc = {
        "machine_info": {"node": "test"},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": benchmarks,
        "datetime": "2025-01-01T00:00:00.000000+00:00",
        "version": "5.2.3",
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def noisy_rounds(rng: np.random.Generator, n: int, seconds: float) -> np.ndarray:
    """Round times with 20% noise: log-normal (sigma 0.2) plus 5% of rounds hit 1.5-3x slower,
    the right tail a shared machine gives."""
    times = seconds * rng.lognormal(0.0, 0.2, n)
    hit = rng.random(n) < 0.05
    times[hit] *= rng.uniform(1.5, 3.0, hit.sum())
    return times


def noisy_run(
    rng: np.random.Generator,
    slowdown: dict[int, float] | float = 1.0,
    *,
    benchmarks: int = 40,
    rounds: int = 120,
) -> Run:
    """A synthetic suite; ``slowdown`` scales every benchmark (float) or some of them (dict)."""
    result = {}
    for index in range(benchmarks):
        factor = slowdown if isinstance(slowdown, float) else slowdown.get(index, 1.0)
        times = noisy_rounds(rng, rounds, 1e-3 * (index + 1) * factor)
        name = f"bench.py::test_{index}"
        result[name] = Benchmark(name, f"test_{index}", None, float(np.median(times)), tuple(times))
    return Run("synthetic", result)


def verdicts(rows: list[verdict.Comparison]) -> dict[str, Verdict]:
    return {row.fullname: row.verdict for row in rows}


def flagged(rows: list[verdict.Comparison]) -> list[verdict.Comparison]:
    """The rows a comparison alarms on (UNSURE asks for a rerun, it is no verdict)."""
    return [row for row in rows if row.verdict not in (Verdict.UNCHANGED, Verdict.UNSURE)]


# ------------------------------------------------------------------ statistics on synthetic noise
# The brief for this rule: at most 1 false alarm in 20 A/A comparisons of a 40-benchmark suite,
# and at least 19 of 20 injected 25% slowdowns caught at a 10% threshold.  The seeds are fixed,
# so these are measurements, repeated identically on every run.


def test_aa_comparisons_raise_no_false_alarm() -> None:
    rng = np.random.default_rng(20250101)
    alarms = [len(flagged(compare_runs(noisy_run(rng), noisy_run(rng)))) for _ in range(20)]
    # Measured: 0 in 20 comparisons x 40 benchmarks.
    assert sum(alarms) <= 1, alarms


def test_injected_25_percent_slowdowns_are_caught() -> None:
    rng = np.random.default_rng(7)
    caught = 0
    other_alarms = 0
    for attempt in range(20):
        victim = attempt * 2  # a different benchmark, fast or slow, each time
        rows = compare_runs(noisy_run(rng), noisy_run(rng, {victim: 1.25}), threshold=0.10)
        by_name = verdicts(rows)
        caught += by_name[f"bench.py::test_{victim}"] is Verdict.REGRESSION
        other_alarms += len([row for row in flagged(rows) if row.fullname != f"bench.py::test_{victim}"])
    # Measured: 20 of 20 caught, no other benchmark flagged.
    assert caught >= 19
    assert other_alarms <= 1


def test_power_for_25_percent_over_800_benchmarks() -> None:
    """The same target, measured on 20 runs where all 40 benchmarks are 25% slower."""
    rng = np.random.default_rng(11)
    caught = sum(
        row.verdict is Verdict.REGRESSION
        for _ in range(20)
        for row in compare_runs(noisy_run(rng), noisy_run(rng, 1.25), threshold=0.10)
    )
    # Measured: 777/800 = 0.97 (120 rounds; simulations give 0.92 at 100 rounds, 0.82 at 80).
    assert caught / 800 >= 0.95, caught


def test_5_percent_slowdown_at_10_percent_threshold_is_not_flagged() -> None:
    rng = np.random.default_rng(5)
    alarms = sum(len(flagged(compare_runs(noisy_run(rng), noisy_run(rng, 1.05), threshold=0.10))) for _ in range(20))
    # Measured: 0 of 800, although every benchmark really is 5% slower.
    assert alarms == 0


def drifting_run(rng: np.random.Generator, slowdown: dict[int, float] | None = None, *, reference: bool = True) -> Run:
    """20 reference rows (tutorial) and 20 imgstore rows of one operation, 50 rounds each with 10%
    noise, and each row shifted for the whole run by log-normal drift of sd 15% -- what this
    machine does between two runs, which no round can show."""
    result = {}
    for index in range(40):
        factor = (slowdown or {}).get(index, 1.0) * rng.lognormal(0.0, 0.15)
        times = 1e-3 * (index + 1) * factor * rng.lognormal(0.0, 0.1, 50)
        kind = "tutorial" if index < 20 and reference else "imgstore"
        name = f"bench.py::test_{index}"
        result[name] = Benchmark(
            name, f"test_{index}", None, float(np.median(times)), tuple(times), {"kind": kind, "operation": "read_many"}
        )
    return Run("drifting", result)


def test_drift_between_runs_is_measured_on_reference_rows_not_alarmed() -> None:
    rng = np.random.default_rng(17)
    pairs = [(drifting_run(rng), drifting_run(rng)) for _ in range(20)]
    with_reference = sum(len(flagged(compare_runs(a, b))) for a, b in pairs)
    rounds_only = sum(
        len(
            flagged(
                compare_runs(
                    *(
                        Run(r.path, {n: Benchmark(**{**b.__dict__, "extra_info": {}}) for n, b in r.benchmarks.items()})
                        for r in pair
                    )
                )
            )
        )
        for pair in pairs
    )
    # Measured: rounds alone raise 380 alarms in 20 comparisons; with the spread of the reference
    # rows in the intervals, none.
    assert rounds_only > 50
    assert with_reference <= 1


def test_under_drift_only_large_slowdowns_can_be_confirmed() -> None:
    rng = np.random.default_rng(23)
    caught = {3.0: 0, 2.0: 0}
    for factor in caught:
        for attempt in range(20):
            victim = 20 + attempt % 20  # an imgstore row
            rows = compare_runs(drifting_run(rng), drifting_run(rng, {victim: factor}))
            caught[factor] += verdicts(rows)[f"bench.py::test_{victim}"] is Verdict.REGRESSION
    # Measured: a 3x slowdown 16/20 here (16-20 with other draws), 2x 2-7/20, 1.5x 0/20: with 15%
    # drift per run, one pair of runs cannot confirm less (theory: 98% for 3x at 99% confidence).
    assert caught[3.0] >= 15
    assert caught[2.0] < 20  # the price of holding on noise, stated rather than hidden


def machine_run(rng: np.random.Generator, slowdown: dict[int, float] | None = None) -> Run:
    """One run as this machine gives them: 10 read rows whose level moves 2% (sd) between runs
    and 10 fsync-bound write rows that move 25%; 30 rounds each, slowed by interference that only
    adds time (exponential, 5% on average)."""
    result = {}
    for index in range(20):
        operation, drift = ("read_many", 0.02) if index < 10 else ("store_many", 0.25)
        factor = (slowdown or {}).get(index, 1.0) * rng.lognormal(0.0, drift)
        times = 1e-3 * (index + 1) * factor * (1 + rng.exponential(0.05, 30))
        name = f"bench.py::test_{index}"
        info = {"kind": "imgstore", "operation": operation}
        if operation == "store_many":
            info["judged_on"] = "wall"  # as the suite marks a durable write (benchmarks/timer.py)
        result[name] = Benchmark(name, f"test_{index}", None, float(np.median(times)), tuple(times), info)
    return Run("machine", result)


def interleaved(rng: np.random.Generator, slowdown: dict[int, float] | None = None) -> tuple[Run, Run]:
    """Base and head sides of two runs each, as .ci/bench-gate takes them."""
    base = [machine_run(rng), machine_run(rng)]
    head = [machine_run(rng, slowdown), machine_run(rng, slowdown)]
    return load.merge_runs(base), load.merge_runs(head)


def test_repeated_runs_measure_each_benchmarks_drift() -> None:
    rng = np.random.default_rng(29)
    one_pair = sum(bool(flagged(compare_runs(machine_run(rng), machine_run(rng)))) for _ in range(20))
    repeated = sum(bool(flagged(compare_runs(*interleaved(rng)))) for _ in range(20))
    caught_read = sum(
        verdicts(compare_runs(*interleaved(rng, {attempt % 10: 1.25})))[f"bench.py::test_{attempt % 10}"]
        is Verdict.REGRESSION
        for attempt in range(20)
    )
    caught_write = sum(
        verdicts(compare_runs(*interleaved(rng, {10 + attempt % 10: 1.25})))[f"bench.py::test_{10 + attempt % 10}"]
        is Verdict.REGRESSION
        for attempt in range(20)
    )
    # Measured: one pair of runs (no reference rows to learn the drift from) raises an alarm in
    # 20 of 20 A/A comparisons; two runs per side in 0 of 20 (0-1 with other seeds).  A 25%
    # slowdown of a read row is caught 20/20; of a write row that moves 25% between runs, 1/20
    # (the drift hides it).
    assert one_pair >= 15
    assert repeated <= 1
    assert caught_read >= 19
    assert caught_write < 10


def test_a_slower_reference_row_is_shown_but_never_fails() -> None:
    rng = np.random.default_rng(5)

    def run(slowdown: float) -> Run:
        rows = {}
        for index, kind in enumerate(("limit", "tutorial", "imgstore", "imgstore")):
            factor = slowdown if kind != "imgstore" else 1.0
            times = 1e-3 * (index + 1) * factor * (1 + rng.exponential(0.02, 30))
            info = {"kind": kind, "operation": "store_many"}
            rows[f"t{index}"] = Benchmark(f"t{index}", f"t{index}", None, float(np.median(times)), tuple(times), info)
        return Run("r", rows)

    for compared in (
        compare_runs(run(1.0), run(3.0)),
        compare_runs(load.merge_runs([run(1.0), run(1.0)]), load.merge_runs([run(3.0), run(3.0)])),
    ):
        assert {row.fullname: row.verdict for row in compared} == {
            "t0": Verdict.REFERENCE_SLOWER,
            "t1": Verdict.REFERENCE_SLOWER,
            "t2": Verdict.UNCHANGED,
            "t3": Verdict.UNCHANGED,
        }
        assert not verdict.has_regression(compared)


def test_variants_of_a_backend_lend_each_other_their_spread() -> None:
    # Four variants of one PNG write: each swings 2x between runs with the machine (file creation),
    # but one of them happened to agree with itself in both runs of each side.
    def run(levels: dict[str, float]) -> Run:
        rows = {}
        for variant, level in levels.items():
            times = tuple(level * (1 + 0.01 * k) for k in range(5))
            info = {"kind": "imgstore", "backend": "png", "operation": "store_many", "images": 1000}
            rows[variant] = Benchmark(variant, variant, None, times[2], times, info)
        for index in range(6):  # steady rows of other backends: a small usual spread for the operation
            times = tuple(0.005 * (1 + 0.001 * k) for k in range(5))
            info = {"kind": "imgstore", "backend": f"b{index}", "operation": "store_many", "images": 1000}
            rows[f"b{index}"] = Benchmark(f"b{index}", f"b{index}", None, times[2], times, info)
        return Run("r", rows)

    base_runs = [
        run({"png": 0.6, "nosync": 0.6, "level9": 0.3, "level0": 0.30}),
        run({"png": 0.3, "nosync": 0.6, "level9": 0.6, "level0": 0.32}),
    ]
    head_runs = [
        run({"png": 0.3, "nosync": 0.3, "level9": 0.6, "level0": 0.58}),
        run({"png": 0.6, "nosync": 0.6, "level9": 0.3, "level0": 0.57}),
    ]
    base, head = load.merge_runs(base_runs), load.merge_runs(head_runs)
    verdicts = {row.fullname: row.verdict for row in compare_runs(base, head)}
    # 1.8x, but its siblings move that much between runs: not a regression, a rerun settles it.
    assert verdicts["level0"] is Verdict.UNSURE
    assert not verdict.has_regression(compare_runs(base, head))

    # The gate's rerun: two more runs a side of just that row, judged on all four with the floors of all.
    def level0(level: float) -> Run:
        return Run("r", {"level0": run({"level0": level}).benchmarks["level0"]})

    rerun_base, rerun_head = [level0(0.58), level0(0.57)], [level0(0.30), level0(0.31)]
    pooled = compare_runs(
        load.merge_runs([*base_runs, *rerun_base], partial=True),
        load.merge_runs([*head_runs, *rerun_head], partial=True),
        paired=True,
    )
    assert {row.fullname: row.verdict for row in pooled}["level0"] is Verdict.UNCHANGED


def test_merge_runs_pools_rounds_and_keeps_each_runs_median(tmp_path: Path) -> None:
    for side, level in (("a", 1.0), ("b", 1.2)):
        write_run(tmp_path / f"{side}.json", [bench_json("b.py::t", [level, level * 1.01, level * 0.99])])
    merged = load.load_runs(tmp_path)
    bench = merged.benchmarks["b.py::t"]
    assert bench.run_rounds == ((1.0, 1.01, 0.99), (1.2, 1.212, 1.188))
    assert sorted(bench.rounds) == sorted([1.0, 1.01, 0.99, 1.2, 1.212, 1.188])
    assert load.load_runs(tmp_path / "a.json").benchmarks["b.py::t"].run_rounds == ()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgStoreError, match="no \\*.json"):
        load.load_runs(tmp_path / "empty")


def test_swapping_the_runs_swaps_regression_and_improvement() -> None:
    rng = np.random.default_rng(3)
    slow, fast = noisy_run(rng, {0: 1.5, 1: 0.6}), noisy_run(rng)
    forward = verdicts(compare_runs(fast, slow))
    backward = verdicts(compare_runs(slow, fast))
    assert forward["bench.py::test_0"] is Verdict.REGRESSION
    assert forward["bench.py::test_1"] is Verdict.IMPROVEMENT
    assert backward["bench.py::test_0"] is Verdict.IMPROVEMENT
    assert backward["bench.py::test_1"] is Verdict.REGRESSION


def test_threshold_zero_still_controls_false_alarms_for_the_suite() -> None:
    # Without the Bonferroni condition a threshold of 0 would flag ~0.2 benchmarks per A/A run
    # (4 in 20).  Measured: 1 in 20 comparisons.
    rng = np.random.default_rng(99)
    alarms = sum(
        len(flagged(compare_runs(noisy_run(rng, rounds=30), noisy_run(rng, rounds=30), 0.0))) for _ in range(20)
    )
    assert alarms <= 1


def test_rows_are_sorted_regressions_first() -> None:
    rng = np.random.default_rng(4)
    rows = compare_runs(noisy_run(rng, benchmarks=6), noisy_run(rng, {2: 0.5, 4: 1.5, 5: 2.0}, benchmarks=6))
    assert [row.verdict for row in rows[:3]] == [Verdict.REGRESSION, Verdict.REGRESSION, Verdict.IMPROVEMENT]
    assert rows[0].fullname == "bench.py::test_5"  # the biggest slowdown first


def test_too_few_rounds_are_judged_on_medians_unconfirmed() -> None:
    rows = compare_runs(
        Run("a", {"t": Benchmark("t", "t", None, 1.0, (1.0, 1.1, 0.9))}),
        Run("b", {"t": Benchmark("t", "t", None, 3.0, (3.0, 3.1, 2.9))}),
    )
    assert (rows[0].low, rows[0].high) == (0.0, math.inf)  # no 99% interval from 3 rounds
    assert rows[0].verdict is Verdict.SLOWER_UNCONFIRMED
    assert not verdict.has_regression(rows)
    assert any("too few rounds" in note and "at least 5" in note for note in report.notes(rows, threshold=0.1))
    assert "too few rounds" in report.format_table(rows)


def test_rounds_for_one_benchmark_but_not_for_the_suite_are_unconfirmed() -> None:
    # 6 rounds allow a 99% interval for one benchmark (P(U=0) = 1/924) but not at 99.9%, the
    # Bonferroni level for 10 benchmarks: the doubling shows, unconfirmed, with its interval.
    def run(factor: float) -> Run:
        rounds = (1.0, 1.02, 0.98, 1.01, 0.99, 1.03)
        return Run(
            "r",
            {
                f"t{i}": Benchmark(
                    f"t{i}",
                    f"t{i}",
                    None,
                    factor if i == 0 else 1.0,
                    tuple(r * (factor if i == 0 else 1.0) for r in rounds),
                )
                for i in range(10)
            },
        )

    assert stats.rounds_needed(0.99, 10) == 7
    rows = compare_runs(run(1.0), run(2.0))
    assert rows[0].fullname == "t0" and rows[0].verdict is Verdict.SLOWER_UNCONFIRMED
    assert rows[0].low is not None and 1.9 < rows[0].low < 2.0 < rows[0].high  # type: ignore[operator]


def test_slowdown_not_significant_for_the_suite_is_named_in_the_notes() -> None:
    # 8 rounds: the suite-wide test can pass (1/C(16, 8) is small enough for 10 benchmarks) but
    # here one candidate round is faster than the three slowest baseline rounds, so it does not.
    base_rounds = tuple(1.0 + 0.01 * i for i in range(8))
    slow_rounds = (1.045, *(1.5 + 0.01 * i for i in range(7)))

    def run(first: tuple[float, ...]) -> Run:
        return Run(
            "r",
            {
                f"t{i}": Benchmark(
                    f"t{i}",
                    f"t{i}",
                    None,
                    float(np.median(first if i == 0 else base_rounds)),
                    first if i == 0 else base_rounds,
                )
                for i in range(10)
            },
        )

    rows = compare_runs(run(base_rounds), run(slow_rounds), threshold=0.0)
    row = next(r for r in rows if r.fullname == "t0")
    assert row.low is not None and row.low > 1 and not row.significant
    assert row.verdict is Verdict.UNCHANGED
    assert any(
        "not significant for the whole suite" in note and "t0" in note for note in report.notes(rows, threshold=0.0)
    )


# ---------------------------------------------------------------------------- interval internals


def test_interval_of_an_exact_scale_change() -> None:
    base = np.random.default_rng(1).lognormal(0, 0.2, 50)
    low, high = stats.ratio_interval(base, base * 1.5, 0.99)
    assert low <= 1.5 <= high
    assert 1.3 < low and high < 1.75


@pytest.mark.parametrize("n,m", [(1, 1), (3, 4), (5, 5), (4, 7)])
def test_mann_whitney_distribution_matches_enumeration(n: int, m: int) -> None:
    counts = np.zeros(n * m + 1)
    arrangements = list(itertools.combinations(range(n + m), n))
    for first in arrangements:  # positions of the first sample in the sorted order
        u = sum(sum(1 for j in range(n + m) if j not in first and j < pos) for pos in first)
        counts[u] += 1
    assert np.allclose(stats._mann_whitney_pmf(n, m), counts / len(arrangements))


def test_mann_whitney_cut_matches_published_table() -> None:
    # Critical U, two-sided 1%: n=m=10 -> 16, n=m=20 -> 105 (standard tables); 5%: n=m=10 -> 23.
    assert stats._mann_whitney_cut(10, 10, 0.01) == 16
    assert stats._mann_whitney_cut(20, 20, 0.01) == 105
    assert stats._mann_whitney_cut(10, 10, 0.05) == 23
    assert stats._mann_whitney_cut(4, 4, 0.01) is None  # 2/70 > 1%: no 99% interval exists


def test_many_rounds_are_thinned_not_refused() -> None:
    rng = np.random.default_rng(2)
    low, high = stats.ratio_interval(rng.lognormal(0, 0.2, 20000), rng.lognormal(0, 0.2, 20000) * 1.1, 0.99)
    assert low < 1.1 < high and high / low < 1.1


# --------------------------------------------------------------------- fallbacks, drift, parsing


def test_benchmarks_without_rounds_are_compared_on_medians_only(tmp_path: Path) -> None:
    base = write_run(tmp_path / "a.json", [bench_json("m::t", [1.0] * 5, save_data=False)])
    cand = write_run(tmp_path / "b.json", [bench_json("m::t", [1.5] * 5)])
    rows = compare_runs(load_run(base), load_run(cand))
    assert rows[0].verdict is Verdict.SLOWER_UNCONFIRMED
    assert rows[0].low is None and rows[0].ratio == pytest.approx(1.5)
    assert not verdict.has_regression(rows)
    assert main(["compare", str(base), str(cand)]) == 0


def test_added_and_removed_are_listed_not_failures(tmp_path: Path, capsys: Any) -> None:
    kept = bench_json("m::kept", [1.0] * 10)
    base = write_run(tmp_path / "a.json", [kept, bench_json("m::old", [1.0] * 10)])
    cand = write_run(tmp_path / "b.json", [kept, bench_json("m::new", [9.0] * 10)])
    rows = compare_runs(load_run(base), load_run(cand))
    assert verdicts(rows) == {"m::kept": Verdict.UNCHANGED, "m::new": Verdict.ADDED, "m::old": Verdict.REMOVED}
    assert main(["compare", str(base), str(cand)]) == 0
    out = capsys.readouterr().out
    assert "added" in out and "removed" in out


def test_machine_drift_widens_intervals_unless_normalized() -> None:
    # The whole machine is 1.3x slower in the candidate run, and test_9 really is 1.5x slower.
    rng = np.random.default_rng(8)
    base, cand = noisy_run(rng, benchmarks=12), noisy_run(rng, {i: 1.3 for i in range(12)} | {9: 1.95}, benchmarks=12)
    for run in (base, cand):  # the first 6 play the tutorial/limit rows
        for index, name in enumerate(list(run.benchmarks)):
            kind = "tutorial" if index < 6 else "imgstore"
            run.benchmarks[name] = Benchmark(**{**run.benchmarks[name].__dict__, "extra_info": {"kind": kind}})
    drift = stats.machine_drift(base, cand)
    assert drift is not None and drift.reference and drift.count == 6
    assert drift.factor == pytest.approx(1.3, rel=0.05)
    # By default the drift is noise: no false alarm on the 1.3x rows, and test_9 is hidden in it.
    assert not flagged(compare_runs(base, cand))
    # Divided out, the drift is gone and the real slowdown stands alone.
    normalized = compare_runs(base, cand, normalize=True)
    assert [row.fullname for row in flagged(normalized)] == ["bench.py::test_9"]
    assert normalized[0].verdict is Verdict.REGRESSION


@pytest.mark.parametrize(
    "text,value",
    [("10%", 0.10), ("0.10", 0.10), ("0.1", 0.10), ("0.1%", 0.001), (" 2.5 % ", 0.025), ("0%", 0.0), ("0", 0.0)],
)
def test_parse_threshold(text: str, value: float) -> None:
    assert verdict.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "-5%", "nan", "inf%", "10", "1", "-0.1"])
def test_parse_threshold_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        verdict.parse_threshold(text)


def test_ambiguous_threshold_says_how_to_write_it() -> None:
    with pytest.raises(ValueError, match="write 10% for a percentage, or a fraction below 1 such as 0.1"):
        verdict.parse_threshold("10")


@pytest.mark.parametrize("threshold,shown", [(0.10, "10%"), (0.001, "0.1%"), (0.025, "2.5%"), (0.0, "0%")])
def test_threshold_is_printed_as_given(threshold: float, shown: str) -> None:
    assert verdict.format_threshold(threshold) == shown


def test_format_seconds() -> None:
    assert [report.format_seconds(s) for s in (2.5, 0.0123, 4.5e-6, 3e-9, 1234.0)] == [
        "2.5 s",
        "12.3 ms",
        "4.5 µs",
        "3 ns",
        "1234 s",
    ]


def test_the_suite_formats_seconds_with_the_same_function() -> None:
    # One formatter of times: the benchmark suite's summary uses the analysis package's.
    from benchmarks import conftest

    assert conftest.format_seconds is report.format_seconds
    assert not hasattr(conftest, "_seconds")


# --------------------------------------------------------------- real runs from pytest-benchmark

BENCH_FILE = textwrap.dedent(
    """
    import os
    import pytest

    WORK = float(os.environ["IMGSTORE_TEST_WORK"])

    def work(units):
        return sum(range(int(units)))

    @pytest.mark.parametrize("images", [10, 100])
    @pytest.mark.parametrize("backend", ["png", "lmdb"])
    def test_store(benchmark, backend, images):
        benchmark.group = f"store_many n={images}"
        benchmark.extra_info.update(
            kind="imgstore", backend=backend, operation="store_many", images=images,
            dataset="synthetic", disk_bytes=images * 3072, images_per_second=0.0,
            ratio_to_limit=None, ratio_to_tutorial=None,
        )
        benchmark.pedantic(work, args=(2000 * images * WORK,), rounds=20, iterations=1)
    """
)


def start_benchmark_run(directory: Path, work: float) -> tuple[subprocess.Popen[str], Path]:
    """Start a tiny suite under pytest-benchmark; return the process and its --benchmark-json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "test_tiny_bench.py").write_text(BENCH_FILE, encoding="utf-8")
    output = directory / "run.json"
    env = {**os.environ, "IMGSTORE_TEST_WORK": str(work)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            f"--benchmark-json={output}",
            "--benchmark-save-data",
            str(directory),
        ],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, output


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("real")
    outputs = []
    # One after the other: run side by side on 2 cores, each run would slow the other down.
    for name, work in (("base", 1.0), ("slow", 3.0)):
        process, output = start_benchmark_run(root / name, work)
        log, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log
        outputs.append(output)
    return outputs[0], outputs[1]


def test_real_run_is_read_with_rounds_and_extra_info(real_runs: tuple[Path, Path]) -> None:
    run = load_run(real_runs[0])
    assert len(run.benchmarks) == 4
    bench = run.benchmarks["test_tiny_bench.py::test_store[lmdb-100]"]
    assert bench.name == "test_store[lmdb-100]" and bench.group == "store_many n=100"
    assert len(bench.rounds) == 20
    assert bench.median == pytest.approx(float(np.median(bench.rounds)))
    assert bench.extra_info["operation"] == "store_many" and bench.extra_info["images"] == 100


def test_real_threefold_slowdown_fails_and_speedup_passes(real_runs: tuple[Path, Path], capsys: Any) -> None:
    base, slow = (str(path) for path in real_runs)
    assert main(["compare", base, slow]) == 1
    out = capsys.readouterr().out
    assert out.count("regression") >= 4
    assert main(["compare", slow, base]) == 0
    assert "4 improvements" in capsys.readouterr().out


def test_directories_of_repeated_runs_gate_on_the_fastest_rounds(tmp_path: Path, capsys: Any) -> None:
    rng = np.random.default_rng(3)

    def side(name: str, slowdown: float) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for run in range(2):
            rows = []
            for index in range(6):
                factor = slowdown if index == 0 else 1.0
                rounds = 1e-3 * (index + 1) * factor * rng.lognormal(0, 0.01) * (1 + rng.exponential(0.05, 20))
                info = {"kind": "imgstore", "operation": "read_many"}
                rows.append(bench_json(f"b.py::test_{index}", list(rounds), extra_info=info))
            write_run(directory / f"{run}.json", rows)
        return directory

    base, same, slow = side("base", 1.0), side("same", 1.0), side("slow", 1.3)
    assert main(["compare", str(base), str(same)]) == 0
    # One run of a side hit by a neighbour for its whole length: slower, but not settled.
    hit = side("hit", 1.3)
    doc = json.loads((hit / "1.json").read_text())
    doc["benchmarks"][0]["stats"]["data"] = [t * 1.6 for t in doc["benchmarks"][0]["stats"]["data"]]
    (hit / "1.json").write_text(json.dumps(doc))
    rerun = tmp_path / "rerun.txt"
    assert main(["compare", str(base), str(hit), "--rerun", str(rerun)]) == 0
    assert rerun.read_text() == "b.py::test_0\n"
    assert "slower? (rerun)" in capsys.readouterr().out
    assert main(["compare", str(base), str(slow), "--rerun", str(rerun)]) == 1
    assert rerun.read_text() == "b.py::test_0\n"  # a regression, listed to be confirmed on more runs
    out = capsys.readouterr().out
    only = tmp_path / "only.txt"
    only.write_text("b.py::test_3\n")
    assert main(["compare", str(base), str(slow), "--only", str(only)]) == 0  # test_0 is not judged
    assert "test_0" not in capsys.readouterr().out
    regressions = [line for line in out.splitlines() if line.rstrip().endswith(" regression")]
    assert len(regressions) == 1 and "test_0" in regressions[0]
    assert "1 regression" in out
    assert "Repeated runs (2 and 2 a side)" in out


def test_paired_sessions_see_a_slowdown_through_drift_that_moves_whole_sessions(tmp_path: Path, capsys: Any) -> None:
    """--paired: run N of each side taken in turns (.ci/bench-gate). A session's drift (here 1.0x then 1.4x, on
    both sides alike) hides a 25% slowdown from the unpaired verdict; the paired one sees it, and passes
    the same code."""
    rng = np.random.default_rng(5)
    drifts = (1.0, 1.4)

    def sides(name: str, slowdown: float) -> tuple[Path, Path]:
        folders = tmp_path / f"{name}-base", tmp_path / f"{name}-head"
        for folder in folders:
            folder.mkdir()
        for session, drift in enumerate(drifts):
            for folder, factor in zip(folders, (1.0, slowdown), strict=True):
                rows = []
                for index in range(8):
                    seconds = 1e-3 * (index + 1) * drift * (factor if index == 0 else 1.0) * rng.lognormal(0, 0.01)
                    info = {"kind": "imgstore", "operation": "read_many"}
                    rounds = list(seconds * (1 + rng.exponential(0.02, 3)))
                    rows.append(bench_json(f"b.py::test_{index}", rounds, extra_info=info))
                write_run(folder / f"{session + 1}.json", rows)
        return folders

    same, slow = sides("same", 1.0), sides("slow", 1.25)
    assert main(["compare", *map(str, same), "--paired"]) == 0
    assert main(["compare", *map(str, slow)]) == 0  # unpaired: lost in the sessions' drift
    capsys.readouterr()
    assert main(["compare", *map(str, slow), "--paired"]) == 1
    out = capsys.readouterr().out
    regressions = [line for line in out.splitlines() if line.rstrip().endswith(" regression")]
    assert len(regressions) == 1 and "test_0" in regressions[0]
    assert "Repeated runs (2 and 2 a side, paired)" in out


def test_paired_refuses_sides_that_cannot_have_been_taken_in_turns(tmp_path: Path, capsys: Any) -> None:
    """--paired pairs run N with run N: with unequal run counts or one run a side there are no pairs, and
    taking them unpaired while the notes say "paired" would hide that the sessions were not what was asked."""
    rows = [bench_json(f"b.py::test_{index}", [1e-3 * (index + 1)] * 3) for index in range(4)]
    for side, runs in (("base", 3), ("head", 2), ("one", 1)):
        (tmp_path / side).mkdir()
        for run in range(runs):
            write_run(tmp_path / side / f"{run + 1}.json", rows)
    two = tmp_path / "base-two"
    two.mkdir()
    for run in range(2):
        write_run(two / f"{run + 1}.json", rows)
    cases = [
        (tmp_path / "base", tmp_path / "head", "3 runs and the candidate 2"),
        (tmp_path / "one", tmp_path / "head", "1 run and the candidate 2"),
        (tmp_path / "one" / "1.json", tmp_path / "one" / "1.json", "1 run and the candidate 1"),
    ]
    for baseline, candidate, counts in cases:
        assert main(["compare", str(baseline), str(candidate), "--paired"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgstore compare: error: --paired") and counts in err, err
        assert "Traceback" not in err
    assert main(["compare", str(two), str(tmp_path / "head"), "--paired"]) == 0
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "head")]) == 0  # unpaired: any counts


def test_markdown_summary(real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    comment = tmp_path / "comment.md"
    assert main(["compare", *map(str, real_runs), "--markdown", str(comment)]) == 1
    text = comment.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("### :x: Benchmarks: 4 regressions, 0 improvements")
    assert "| benchmark | baseline | candidate | ratio | interval | verdict |" in lines
    assert "|:---|---:|---:|---:|---:|:---|" in lines
    assert sum(line.endswith("| regression |") for line in lines) == 4


def test_markdown_escapes_pipes_and_folds_unchanged() -> None:
    rows = compare_runs(
        Run("a", {"m::t[a|b]": Benchmark("m::t[a|b]", "t[a|b]", None, 1.0, (1.0,) * 10)}),
        Run("b", {"m::t[a|b]": Benchmark("m::t[a|b]", "t[a|b]", None, 1.0, (1.0,) * 10)}),
    )
    text = report.format_markdown(rows)
    assert "t[a\\|b]" in text and "<details>" in text
    assert text.startswith("### :white_check_mark: Benchmarks: 0 regressions")


def test_columns_option(real_runs: tuple[Path, Path], capsys: Any) -> None:
    assert main(["compare", *map(str, real_runs), "--columns", "backend,images,ratio,verdict"]) == 1
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["backend", "images", "ratio", "verdict"]
    assert main(["compare", *map(str, real_runs), "--columns", "name,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- bad input

MALFORMED: dict[str, str] = {
    "not json": "{ this is not json",
    "no benchmarks": json.dumps({"machine_info": {}}),
    "benchmarks not a list": json.dumps({"benchmarks": {}}),
    "no fullname": json.dumps({"benchmarks": [{"stats": {"median": 1.0}}]}),
    "no stats": json.dumps({"benchmarks": [{"fullname": "t"}]}),
    "negative median": json.dumps({"benchmarks": [{"fullname": "t", "stats": {"median": -1}}]}),
    "bad rounds": json.dumps({"benchmarks": [{"fullname": "t", "stats": {"median": 1, "data": [1, "x"]}}]}),
    "duplicate": json.dumps({"benchmarks": [{"fullname": "t", "stats": {"median": 1}}] * 2}),
}


@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_malformed_file_exits_2_with_one_line(problem: str, tmp_path: Path, capsys: Any) -> None:
    good = write_run(tmp_path / "good.json", [bench_json("m::t", [1.0] * 10)])
    bad = tmp_path / "bad.json"
    bad.write_text(MALFORMED[problem], encoding="utf-8")
    assert main(["compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgstore compare: error: ") and str(bad) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: Any) -> None:
    good = write_run(tmp_path / "good.json", [bench_json("m::t", [1.0] * 10)])
    assert main(["compare", str(tmp_path / "nope.json"), str(good)]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "cannot read" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "option", [["--threshold", "ten"], ["--threshold", "10"], ["--confidence", "1.5"], ["--confidence", "nan"]]
)
def test_bad_options_exit_2(option: list[str], tmp_path: Path, capsys: Any) -> None:
    good = str(write_run(tmp_path / "good.json", [bench_json("m::t", [1.0] * 10)]))
    assert main(["compare", good, good, *option]) == 2
    assert option[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "given,shown", [("0.1", "threshold 10%"), ("10%", "threshold 10%"), ("0.1%", "threshold 0.1%")]
)
def test_threshold_as_fraction_or_percent(given: str, shown: str, tmp_path: Path, capsys: Any) -> None:
    good = str(write_run(tmp_path / "good.json", [bench_json("m::t", [1.0] * 10)]))
    assert main(["compare", good, good, "--threshold", given]) == 0
    assert shown in capsys.readouterr().out


def test_one_run_a_side_says_it_cannot_tell_drift_from_a_change(tmp_path: Path, capsys: Any) -> None:
    # One benchmark 2x slower in the second file: with one run a side it is a regression (exit 1),
    # and the output says that one run a side cannot tell that from drift, and what can.
    base = write_run(
        tmp_path / "a.json", [bench_json(f"m::t{i}", [1.0 + 0.01 * k for k in range(20)]) for i in range(5)]
    )
    rounds = [2.0 + 0.02 * k for k in range(20)]
    head = write_run(
        tmp_path / "b.json",
        [bench_json(f"m::t{i}", rounds if i == 0 else [1.0 + 0.01 * k for k in range(20)]) for i in range(5)],
    )
    assert main(["compare", str(base), str(head)]) == 1
    out = capsys.readouterr().out.lower()
    assert "one run a side cannot tell" in out and "several runs a side" in out
    (tmp_path / "base").mkdir()
    (tmp_path / "head").mkdir()
    for side, path in (("base", base), ("head", head)):
        for i in (1, 2):
            (tmp_path / side / f"{i}.json").write_text(path.read_text())
    main(["compare", str(tmp_path / "base"), str(tmp_path / "head")])
    assert "one run a side cannot tell" not in capsys.readouterr().out.lower()


def test_unwritable_markdown_exits_2(tmp_path: Path, capsys: Any) -> None:
    good = str(write_run(tmp_path / "good.json", [bench_json("m::t", [1.0] * 10)]))
    target = tmp_path / "missing-dir" / "comment.md"
    assert main(["compare", good, good, "--markdown", str(target)]) == 2
    assert "cannot write" in capsys.readouterr().err


# ------------------------------------------------------------------- layering of the package

# The layers, each importing only the ones before it: storage core <- backends <- integrations
# (torch, datasets) <- analysis / CLI <- benchmarks.  The analysis and the CLI: these.
ANALYSIS_SIDE = ("imgstore/analysis/", "imgstore/cli.py", "imgstore/compare.py")


def imgstore_imports(path: Path) -> set[str]:
    """Every imgstore module ``path`` imports, anywhere in it (lazy imports in functions included)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(REPO).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # "from imgstore.analysis import load" imports imgstore.analysis.load when that is a module.
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}"))
    return {name for name in found if name == "imgstore" or name.startswith("imgstore.")}


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_analysis_imports_nothing_of_imgstore_but_errors() -> None:
    files = sorted((REPO / "imgstore" / "analysis").glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "schema", "load", "stats", "verdict", "report", "plot"}
    for path in [*files, REPO / "imgstore" / "compare.py"]:
        for name in imgstore_imports(path):
            allowed = name in ("imgstore.errors", "imgstore.analysis") or name.startswith("imgstore.analysis.")
            assert allowed, f"{path.relative_to(REPO)} imports {name}"


def test_analysis_modules_import_each_other_without_cycles() -> None:
    graph = {
        f"imgstore.analysis.{path.stem}": {
            name for name in imgstore_imports(path) if name.startswith("imgstore.analysis.")
        }
        for path in (REPO / "imgstore" / "analysis").glob("*.py")
        if path.name != "__init__.py"
    }
    done: list[str] = []
    while len(done) < len(graph):  # peel off the modules whose imports are all done: a cycle stops this
        ready = sorted(module for module, needs in graph.items() if module not in done and needs <= set(done))
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}"
        done += ready
    assert (
        done.index("imgstore.analysis.schema")
        < done.index("imgstore.analysis.load")
        < done.index("imgstore.analysis.verdict")
    )


def test_the_storage_library_never_imports_the_analysis() -> None:
    library = [
        path
        for path in sorted((REPO / "imgstore").rglob("*.py"))
        if not str(path.relative_to(REPO)).startswith(ANALYSIS_SIDE)
    ]
    assert len(library) > 10 and REPO / "imgstore" / "store.py" in library
    for path in library:
        for name in imgstore_imports(path):
            assert not name.startswith(("imgstore.analysis", "imgstore.cli", "imgstore.compare")), (
                f"{path.relative_to(REPO)} imports {name}"
            )
    # And at run time: importing the library (every module of it that imports here) loads none of it.
    modules = [".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for path in library]
    code = textwrap.dedent(
        """
        import importlib, sys
        import imgstore
        assert not [name for name in sys.modules if name.startswith("imgstore.analysis")], "import imgstore"
        for name in sys.argv[1:]:
            try:
                importlib.import_module(name)
            except ImportError:  # an optional dependency (torch) not installed here
                pass
        side = ("imgstore.analysis", "imgstore.cli", "imgstore.compare")
        print(" ".join(sorted(name for name in sys.modules if name.startswith(side))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_the_analysis_is_importable_without_the_package_init() -> None:
    # imgstore/__init__.py (the storage library) is written elsewhere; the analysis, the CLI and the
    # compare shim must load with an empty package in its place, pulling in imgstore.errors only.
    code = textwrap.dedent(
        """
        import sys, types
        package = types.ModuleType("imgstore")
        package.__path__ = [sys.argv[1]]
        sys.modules["imgstore"] = package
        import imgstore.compare, imgstore.cli, imgstore.analysis.plot
        print(" ".join(sorted(name for name in sys.modules if name.startswith("imgstore"))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "imgstore")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    names = ("clocks", "load", "plot", "report", "schema", "stats", "verdict")
    analysis = [f"imgstore.analysis.{name}" for name in names]
    assert result.stdout.split() == [
        "imgstore", "imgstore.analysis", *analysis, "imgstore.cli", "imgstore.compare", "imgstore.errors"
    ]  # fmt: skip


def test_the_compare_shim_is_the_analysis_package() -> None:
    # Code written against imgstore.compare (benchmarks/validate_gate.py) gets the very same objects.
    import imgstore.compare as shim
    from imgstore.analysis import schema

    for name in shim.__all__:
        assert hasattr(shim, name), name
    assert shim.compare_runs is verdict.compare_runs and shim.load_run is load.load_run
    assert shim.Run is load.Run and shim.Verdict is Verdict and shim.format_table is report.format_table
    assert shim.machine_drift is stats.machine_drift and shim.REFERENCE_KINDS is schema.REFERENCE_KINDS


# ------------------------------------------------------------------- extreme but valid timings


def extreme_side(directory: Path, fast: float, slow: float, *, rounds: int, runs: int = 1) -> Path:
    """A side whose rows sit at the extremes: an imgstore row and two reference rows per operation
    at ``fast``, two reference rows at ``slow`` (so the between-run spread is as wide as it gets)."""
    directory.mkdir()
    for run in range(runs):
        rows = []
        for index, (kind, seconds) in enumerate(
            [("imgstore", fast), ("tutorial", fast), ("limit", slow), ("tutorial", slow), ("limit", fast)]
        ):
            times = [min(seconds * (1 + 0.01 * i + 0.05 * run), 1e9) for i in range(rounds)] or [seconds]
            info = {"kind": kind, "backend": "b", "operation": "read_many", "images": 10}
            rows.append(bench_json(f"b.py::test_{index}", times, extra_info=info, save_data=bool(rounds)))
        write_run(directory / f"{run}.json", rows)
    return directory


@pytest.mark.parametrize("fast,slow", [(1e-12, 1e9), (1e-9, 1e6), (1e-6, 1e-3)])
@pytest.mark.parametrize("rounds", [0, 3, 30, 1500])
def test_extreme_valid_timings_give_finite_ratios(fast: float, slow: float, rounds: int, tmp_path: Path) -> None:
    # A run at the two ends of the accepted range against its mirror image: every ratio is
    # finite and positive, every interval finite or the documented (0, inf) of too few rounds.
    for runs in (1, 2):
        base = extreme_side(tmp_path / f"base{runs}", fast, slow, rounds=rounds, runs=runs)
        cand = extreme_side(tmp_path / f"cand{runs}", slow, fast, rounds=rounds, runs=runs)
        for a, b in ((base, cand), (cand, base)):
            for normalize in (False, True):
                rows = compare_runs(load.load_runs(a), load.load_runs(b), normalize=normalize)
                for row in rows:
                    assert row.ratio is not None and 0 < row.ratio < math.inf
                    if row.low is not None and row.high is not None:
                        assert not math.isnan(row.low) and not math.isnan(row.high)
                        assert (row.low, row.high) == (0.0, math.inf) or 0 < row.low <= row.high < math.inf
                report.notes(rows, stats.machine_drift(load.load_runs(a), load.load_runs(b)), threshold=0.1)
                report.format_table(rows)
            for confidence in ("0.000001", "0.5", "0.999999"):
                assert main(["compare", str(a), str(b), "--confidence", confidence]) in (0, 1)


@pytest.mark.parametrize("confidence", ["0.9999999999999999", "1e-300", "0", "1", "-0.5", "inf"])
def test_confidence_too_close_to_0_or_1_is_a_usage_error(confidence: str, tmp_path: Path, capsys: Any) -> None:
    # 0.9999999999999999 used to reach NormalDist.inv_cdf(1.0), 1e-300 a division by zero: tracebacks, exit 1.
    base = extreme_side(tmp_path / "base", 1e-3, 2e-3, rounds=30)
    cand = extreme_side(tmp_path / "cand", 2e-3, 1e-3, rounds=30)
    assert main(["compare", str(base), str(cand), "--confidence", confidence]) == 2
    err = capsys.readouterr().err
    assert "--confidence" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="confidence"):
        compare_runs(load.load_runs(base), load.load_runs(cand), confidence=float(confidence))


def test_markdown_escapes_html_in_names_and_paths() -> None:
    name = "m::t[<img src=x onerror=alert(1)>&amp]"
    rows = compare_runs(
        Run("a<b>`x.json", {name: Benchmark(name, name, None, 1.0, (1.0,) * 10)}),
        Run("b.json", {name: Benchmark(name, name, None, 1.0, (1.0,) * 10)}),
    )
    text = report.format_markdown(rows, baseline=Run("a<b>`x.json", {}), candidate=Run("b.json", {}))
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;&amp;amp" in text
    assert "`a<b>'x.json`" in text  # inside a code span, as it is, with no backtick to end the span early


def test_markdown_names_a_folder_of_runs_by_the_folder(tmp_path: Path) -> None:
    """A folder a side was shown as its last file and its first run's time ("Baseline `2.json` (...)"),
    which reads as one run a side: the folder and its count of runs instead."""
    sides = {}
    for side in ("base", "head"):
        (tmp_path / side).mkdir()
        for n in (1, 2):
            write_run(tmp_path / side / f"{n}.json", [bench_json("m::t", [0.010 + 0.0001 * i for i in range(10)])])
        sides[side] = str(tmp_path / side)
    markdown = tmp_path / "summary.md"
    assert main(["compare", sides["base"], sides["head"], "--markdown", str(markdown)]) == 0
    text = markdown.read_text(encoding="utf-8")
    assert "Baseline `base/` (2 runs, 0123456789) → candidate `head/` (2 runs, 0123456789)." in text, text
    assert "2.json" not in text
    assert main(["compare", f"{sides['base']}/1.json", f"{sides['head']}/2.json", "--markdown", str(markdown)]) == 0
    assert "Baseline `1.json` (0123456789, 2025-01-01" in markdown.read_text(encoding="utf-8")
