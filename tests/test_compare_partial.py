"""`imgstore compare --partial-runs` and `--only` on inputs the gate's rerun stage should never produce, but
a broken session or a hand-edited file can: sides that hold a row in different runs, rows held by one run a
side, names in `--only` that are not compared, more than nine runs a side (README, "Regression gate")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.validate_gate import gate
from imgstore.analysis import load
from imgstore.analysis.load import Benchmark, Run
from imgstore.analysis.verdict import Verdict, compare_runs
from imgstore.cli import main

INFO = {"kind": "imgstore", "operation": "read_random", "images": 10000}


def bench(name: str, seconds: float, spread: float = 0.01) -> Benchmark:
    rounds = tuple(seconds * (1 + spread * k) for k in range(5))
    info = {**INFO, "backend": name}
    return Benchmark(f"bench.py::{name}", name, None, rounds[2], rounds, info)


def write_run(path: Path, run: Run) -> None:
    """``run`` as pytest-benchmark writes it (--benchmark-json), rounds in stats.data."""
    benchmarks = [
        {
            "name": b.name,
            "fullname": b.fullname,
            "group": b.group,
            "extra_info": b.extra_info,
            "stats": {"min": min(b.rounds), "max": max(b.rounds), "median": b.median, "data": list(b.rounds)},
        }
        for b in run.benchmarks.values()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks}), encoding="utf-8")


def sessions_with_a_drifting_machine(rng: np.random.Generator) -> list[tuple[Run, Run]]:
    """Four paired sessions of the same code on both sides, 20 rows each; the machine is 30% slower in
    sessions 3-4, which moves both sides of a session alike (pairing cancels it)."""
    levels = [1.0, 1.02, 1.3, 1.34]
    result = []
    for level in levels:
        sides = [
            Run(
                "r", {b.fullname: b for b in (bench(f"f{i}", 0.01 * level * rng.lognormal(0, 0.01)) for i in range(20))}
            )
            for _ in range(2)
        ]
        result.append((sides[0], sides[1]))
    return result


@pytest.mark.parametrize(("base_runs", "head_runs"), [((0, 1), (2, 3)), ((0, 1), (1, 2)), ((1,), (0, 1, 2, 3))])
def test_paired_never_pairs_run_i_with_run_j_when_the_sides_hold_a_row_in_different_runs(
    base_runs: tuple[int, ...], head_runs: tuple[int, ...]
) -> None:
    # Row X, the same code on both sides, held by base in some sessions and by head in others: paired run
    # by run (0 with 2, 1 with 3) it showed the machine's 30% as a regression with a tight interval.
    rng = np.random.default_rng(3)
    sessions = sessions_with_a_drifting_machine(rng)
    levels = [1.0, 1.02, 1.3, 1.34]
    base = [s[0] for s in sessions]
    head = [s[1] for s in sessions]
    x = "bench.py::X"
    for number in range(4):
        for runs, held in ((base, base_runs), (head, head_runs)):
            if number in held:
                runs[number] = Run("r", {**runs[number].benchmarks, x: bench("X", 0.01 * levels[number])})
    rows = {
        row.fullname: row
        for row in compare_runs(load.merge_runs(base, partial=True), load.merge_runs(head, partial=True), paired=True)
    }
    assert rows[x].verdict is Verdict.SLOWER_UNCONFIRMED or rows[x].verdict is Verdict.UNCHANGED_UNCONFIRMED
    assert rows[x].confidence is None  # not judged on rounds: never a regression
    assert rows["bench.py::f0"].verdict is Verdict.UNCHANGED


def test_paired_partial_runs_with_no_row_in_two_runs_judges_nothing_on_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each row in one run a side: the --paired check (two runs a side) passed, and every row was judged as
    # from one run a side (rounds only), the report calling it "Repeated runs (1 and 1 a side, paired)".
    for number in range(2):
        names = range(number * 10, number * 10 + 10)
        for side, level in (("base", 0.01), ("head", 0.0125)):
            write_run(
                tmp_path / side / f"{number + 1}.json",
                Run("r", {f"bench.py::f{i}": bench(f"f{i}", level) for i in names}),
            )
    args = ["compare", str(tmp_path / "base"), str(tmp_path / "head"), "--paired", "--partial-runs"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "20 slower (unconfirmed)" in out
    assert "too few runs" in out and "20 benchmark(s) held by too few of the runs" in out
    assert "Repeated runs" not in out and "no saved rounds" not in out


def test_rows_held_by_one_run_a_side_do_not_count_in_bonferroni() -> None:
    # One row in two runs a side, 50 rows in one run a side (unpaired): those 50 are judged on their medians,
    # so they must not make the one row's suite-wide test 50 times stricter.
    def side(slowdown: float) -> list[Run]:
        first = {f"bench.py::g{i}": bench(f"g{i}", 0.01) for i in range(50)}
        return [
            Run("r", {**first, "bench.py::A": bench("A", 0.01 * slowdown, 0.002)}),
            Run("r", {"bench.py::A": bench("A", 0.0104 * slowdown, 0.002)}),
        ]

    alone = compare_runs(load.merge_runs(side(1.0)), load.merge_runs(side(1.11)), threshold=0.0)
    mixed = compare_runs(
        load.merge_runs(side(1.0), partial=True), load.merge_runs(side(1.11), partial=True), threshold=0.0
    )
    a_alone = next(row for row in alone if row.fullname == "bench.py::A")
    a_mixed = next(row for row in mixed if row.fullname == "bench.py::A")
    assert a_alone.verdict is Verdict.REGRESSION
    assert (a_mixed.verdict, a_mixed.significant) == (a_alone.verdict, a_alone.significant)
    assert sum(row.confidence is not None for row in mixed) == 1


def test_only_reads_one_name_a_line_and_refuses_names_it_cannot_judge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A parametrize id with a space: split on whitespace it matched nothing, and with another name beside it
    # the regression was left out and the gate passed (exit 0).
    slow = "bench.py::slow[a b]"
    for number in range(2):
        for side, factor in (("base", 1.0), ("head", 1.3)):
            rows = {f"bench.py::f{i}": bench(f"f{i}", 0.01 * (1 + 0.01 * number)) for i in range(20)}
            rows[slow] = Benchmark(
                slow, "slow[a b]", None, 0.01, bench("slow", 0.01 * factor).rounds, {**INFO, "backend": "s"}
            )
            write_run(tmp_path / side / f"{number + 1}.json", Run("r", rows))
    only = tmp_path / "rerun.txt"
    args = ["compare", str(tmp_path / "base"), str(tmp_path / "head"), "--paired", "--only", str(only)]
    only.write_text(f"bench.py::f0\n{slow}\n", encoding="utf-8")
    assert main(args) == 1
    assert "slow[a b]" in capsys.readouterr().out
    only.write_text("bench.py::f0\nbench.py::gone\n", encoding="utf-8")
    assert main(args) == 2
    assert "names benchmarks neither side has: 'bench.py::gone'" in capsys.readouterr().err
    only.write_text("\n  \n", encoding="utf-8")
    assert main(args) == 2
    assert "names no benchmark" in capsys.readouterr().err


def test_ten_runs_a_side_are_merged_in_number_order_whatever_the_padding(tmp_path: Path) -> None:
    # Sorted as text, base/1, 10, 11, 2, ... paired with head/01, 02, ..., 11: run 2 of base with run 4 of
    # head. Each session's machine is 1.5x the last: paired wrongly, the interval spread over all of it.
    for number in range(1, 12):
        level = 0.001 * 1.5**number
        run = Run("r", {f"bench.py::f{i}": bench(f"f{i}", level * (1 + 0.001 * i)) for i in range(5)})
        write_run(tmp_path / "base" / f"{number}.json", run)
        write_run(tmp_path / "head" / f"{number:02d}.json", run)
    base, head = load.load_runs(tmp_path / "base"), load.load_runs(tmp_path / "head")
    assert [Path(p).stem for p in base.path.split(" + ")] == [str(n) for n in range(1, 12)]
    for row in compare_runs(base, head, paired=True):
        assert row.verdict is Verdict.UNCHANGED
        assert row.high is not None and math.log(row.high) < 0.01


def test_the_replay_judges_as_the_script_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # benchmarks/validate_gate.py's gate() against what .ci/bench-gate runs on the same sessions written to
    # files: first/{base,head}/{1,2}.json, rerun/ cut to rerun.txt, all/ = first 1-2 + rerun as 3-4.
    rng = np.random.default_rng(11)
    sessions = []
    for _ in range(4):
        base, head = {}, {}
        for i in range(30):
            shared = rng.lognormal(0, 0.08)
            level = 0.01 * (1 + i % 5) * shared
            factor = 1.2 if i in (3, 7) else 1.0
            base[f"bench.py::f{i}"] = bench(f"f{i}", level * rng.lognormal(0, 0.03), 0.02)
            head[f"bench.py::f{i}"] = bench(f"f{i}", level * factor * rng.lognormal(0, 0.03), 0.02)
        sessions.append((Run("b", base), Run("h", head)))
    outcome = gate(
        [s[0] for s in sessions[:2]],
        [s[1] for s in sessions[:2]],
        [s[0] for s in sessions[2:]],
        [s[1] for s in sessions[2:]],
    )
    assert outcome.rerun  # the case under test: a rerun stage
    rerun = set(outcome.rerun)
    for n in (1, 2):
        for side, index in (("base", 0), ("head", 1)):
            write_run(tmp_path / "first" / side / f"{n}.json", sessions[n - 1][index])
            cut = sessions[n + 1][index]
            cut = Run("r", {name: b for name, b in cut.benchmarks.items() if name in rerun})
            write_run(tmp_path / "all" / side / f"{n}.json", sessions[n - 1][index])
            write_run(tmp_path / "all" / side / f"{n + 2}.json", cut)
    listed = tmp_path / "rerun.txt"
    first = main(
        [
            "compare",
            str(tmp_path / "first/base"),
            str(tmp_path / "first/head"),
            "--paired",
            "--threshold",
            "10%",
            "--rerun",
            str(listed),
        ]
    )
    assert listed.read_text(encoding="utf-8").split("\n")[:-1] == outcome.rerun
    assert first == (1 if any(name not in rerun for name in outcome.regressions) else 0)
    capsys.readouterr()
    args = ["compare", str(tmp_path / "all/base"), str(tmp_path / "all/head"), "--paired", "--partial-runs"]
    second = main([*args, "--threshold", "10%", "--only", str(listed), "--rerun", str(tmp_path / "again.txt")])
    regressions_after = [name for name in outcome.regressions if name in rerun]
    assert second == (1 if regressions_after else 0)
    out = capsys.readouterr().out
    for name in regressions_after:
        assert any(line.startswith(name.split("::")[1] + " ") and "regression" in line for line in out.splitlines())
