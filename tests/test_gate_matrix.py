"""The regression gate's parts: its matrix (.ci/gate-matrix, --op-cutoffs, --read-budget), the injected
slowdowns that measure it (@CUTOFF), and the counting of benchmarks/validate_gate.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks import operations  # noqa: E402
from benchmarks.data import parse_op_cutoffs  # noqa: E402
from benchmarks.inject import Injection, parse_slowdown, slowed_down  # noqa: E402
from benchmarks.validate_gate import Outcome, benchmark_id, gate_outcomes, tally  # noqa: E402
from imgstore.analysis.load import Benchmark, Run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def gate_args() -> list[str]:
    """gate_args as .ci/gate-matrix defines them (bash, sourced: the script's own parsing)."""
    out = subprocess.run(
        ["bash", "-c", 'source .ci/gate-matrix && printf "%s\\0" "${gate_args[@]}"'],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split("\0")[:-1]


# ---------------------------------------------------------------------- the matrix


def test_op_cutoffs_parse_and_refuse_what_they_cannot_mean() -> None:
    known = ("store_single", "read_many")
    assert parse_op_cutoffs(None, known) == {}
    assert parse_op_cutoffs(["store_single=100,1000", " read_many = 10 "], known) == {
        "store_single": [100, 1000],
        "read_many": [10],
    }
    for bad in (["store_single"], ["nope=10"], ["read_many=0"], ["read_many=ten"], ["read_many=10", "read_many=20"]):
        with pytest.raises(pytest.UsageError, match="--op-cutoffs"):
            parse_op_cutoffs(bad, known)


def test_the_gated_matrix_has_every_operation_at_two_sizes_and_the_cold_and_epoch_rows() -> None:
    """Collect (not run) the gate's benchmarks: every operation of the suite, every installed backend."""
    import imgstore

    result = subprocess.run(
        [sys.executable, "-m", "pytest", *gate_args(), "--collect-only"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines() if "::" in line]
    sizes: dict[str, set[int]] = {}
    for name in ids:
        for op in operations.NAMES:
            if f"-{op}-" in name:
                n = int(re.search(r"-(\d+)-synthetic", name).group(1))  # type: ignore[union-attr]
                sizes.setdefault(op + ("-cold" if name.endswith("-cold") else ""), set()).add(n)
    for op in operations.NAMES:
        assert len(sizes.get(op, ())) >= 2, (op, sizes.get(op))
    for op in ("read_many", "read_random"):
        assert len(sizes.get(f"{op}-cold", ())) >= 2, (op, sizes.get(f"{op}-cold"))
    assert sizes.get("epoch-cold") == {10000}  # the cold epochs at the larger size: a first batch's cost, the rest
    for backend in imgstore.installed_backends():
        for op in ("store_many", "read_many", "read_random", "iterate"):
            for n in (1000, 10000) if backend != "png" or op in ("store_many", "read_many") else (1000,):
                assert f"imgstore-{backend}-{op}-{n}-synthetic" in ids
        big = 1000 if backend == "png" else 10000  # PNG: one file per image, 10-50 s a row at 10 000
        assert f"imgstore-{backend}-epoch-w0-{big}-synthetic" in ids
        assert f"imgstore-{backend}-epoch-w2-{big}-synthetic" in ids
        assert f"imgstore-{backend}-read_random-{big}-synthetic-cold" in ids
        if backend != "png":
            assert f"imgstore-{backend}-epoch-w0-10000-synthetic-cold" in ids
    assert not [name for name in ids if name.startswith("tutorial-")]  # never fail: not worth the gate's time


def test_the_round_limits_bound_the_rounds_of_a_row() -> None:
    read_many = operations.get_operation("read_many")
    try:
        assert operations.read_rounds(5, 0.01) == 50  # default: 2 s of 10 ms rounds, at most 50
        assert read_many.timed_rounds(10) == 20
        operations.set_round_limits(read_budget=0.1, most=3)
        assert operations.read_rounds(5, 0.01) == 10
        assert operations.read_rounds(5, 1.0) == 5  # never below the least it is given
        assert read_many.timed_rounds(10) == 3  # the least, capped
        assert read_many.timed_rounds(10, 0.01) == 10  # a cheap read row still adds rounds within the budget
        assert read_many.timed_rounds(10, 1.0) == 3
        for bad in ({"read_budget": -1.0}, {"most": 0}):
            with pytest.raises(ValueError):
                operations.set_round_limits(**bad)
    finally:
        operations.set_round_limits()
    assert operations.read_rounds(3, 0.1) == 20 and read_many.timed_rounds(10) == 20


# ---------------------------------------------------------------------- injected slowdowns


def test_injections_parse_with_an_optional_cutoff_and_apply_to_their_rows_only() -> None:
    assert parse_slowdown("") == []
    got = parse_slowdown("imgstore-lmdb:read_random:0.25, imgstore-hdf5:store_many:0.5@10000")
    assert got == [
        Injection("imgstore-lmdb", "read_random", 0.25, None),
        Injection("imgstore-hdf5", "store_many", 0.5, 10000),
    ]
    assert got[0].applies("imgstore-lmdb", "read_random", 10) and got[0].applies("imgstore-lmdb", "read_random", 10000)
    assert not got[0].applies("imgstore-lmdb-noverify", "read_random", 10)
    assert got[1].applies("imgstore-hdf5", "store_many", 10000)
    assert not got[1].applies("imgstore-hdf5", "store_many", 1000)
    for bad in ("lmdb:read_many", "x:nope:0.1", "x:read_many:-1", "x:read_many:0.1@0", "x:read_many:0.1@ten"):
        with pytest.raises(pytest.UsageError, match="IMGSTORE_BENCH_INJECT_SLOWDOWN"):
            parse_slowdown(bad)


def test_a_slowed_body_returns_what_the_body_returns_and_an_unslowed_one_is_the_body() -> None:
    def body(x: int) -> int:
        return x + 1

    injections = [Injection("a", "read_many", 0.5, 100)]
    assert slowed_down(body, injections, "a", "read_many", 10) is body
    slowed = slowed_down(body, injections, "a", "read_many", 100)
    assert slowed is not body and slowed(1) == 2


@pytest.mark.slow
def test_a_cutoff_injection_slows_that_size_only_in_a_real_run(tmp_path: Path) -> None:
    """Ten times slower at 20 images only: its median, against the row at 10 images and the other rows."""
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    env["IMGSTORE_BENCH_INJECT_SLOWDOWN"] = "imgstore-memmap:read_many:9@20"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10,20", "--ops=read_many",
         "--backends=memmap,lmdb", "--dataset=synthetic", "-k", "not tutorial and not noverify", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    fastest = {b["param"]: min(b["stats"]["data"]) for b in json.loads(out.read_text())["benchmarks"]}
    per_image = {name: seconds / int(name.split("-")[-2]) for name, seconds in fastest.items()}
    slowed = per_image["imgstore-memmap-read_many-20-synthetic"]
    assert slowed > 4 * per_image["imgstore-memmap-read_many-10-synthetic"]
    assert slowed > 4 * per_image["imgstore-lmdb-read_many-20-synthetic"] / 3  # lmdb: never 3x memmap's time here


# ---------------------------------------------------------------------- counting the protocol


def test_tally_counts_catches_per_target_and_other_rows_as_false_alarms() -> None:
    name = "benchmarks/test_storage.py::test_storage[{}]".format
    outcomes = [
        Outcome([name("t1"), name("t2")], []),
        Outcome([name("t1"), name("memmap-x")], [name("t2")]),  # memmap-x: affected by the real change
        Outcome([name("other")], []),
    ]
    counted = tally(outcomes, ("t1", "t2"), ("memmap-",))
    assert counted.comparisons == 3
    assert counted.caught == {"t1": 2, "t2": 1}
    assert counted.alarms == 1 and counted.flagged == {"other": 1}
    assert counted.reruns == 1
    assert tally(outcomes).alarms == 3  # A/A: every regression is a false alarm
    assert benchmark_id(name("imgstore-lmdb-read_many-1000-synthetic")) == "imgstore-lmdb-read_many-1000-synthetic"


def _sessions(rng: np.random.Generator, count: int, slowed: dict[str, float]) -> list[tuple[Run, Run]]:
    """Paired sessions of 12 benchmarks, 3 rounds each: 2% noise in a run, 2% between the two sides of a
    session, and a session's drift (up to 30%) that touches both sides alike; ``slowed`` on the head side."""
    sessions = []
    for _ in range(count):
        drift = rng.uniform(1.0, 1.3)
        sides = []
        for factor in ({}, slowed):
            benchmarks = {}
            for k in range(12):
                key = f"row{k}-read_many-1000-synthetic"
                fullname = f"benchmarks/test_storage.py::test_storage[{key}]"
                seconds = 1e-2 * (k + 1) * drift * factor.get(key, 1.0) * rng.lognormal(0, 0.02)
                rounds = tuple(seconds * rng.lognormal(0, 0.02, 3))
                benchmarks[fullname] = Benchmark(fullname, key, None, float(np.median(rounds)), rounds)
            sides.append(Run("synthetic", benchmarks))
        sessions.append((sides[0], sides[1]))
    return sessions


def test_the_replayed_protocol_catches_slowed_rows_and_counts_no_false_alarm_on_steady_sessions() -> None:
    rng = np.random.default_rng(14)
    slowed = {"row3-read_many-1000-synthetic": 1.25, "row7-read_many-1000-synthetic": 1.6}
    aa = tally(gate_outcomes(_sessions(rng, 10, {})))
    assert aa.comparisons == 9 and aa.alarms == 0
    injected = _sessions(rng, 9, slowed)
    counted = tally(gate_outcomes(injected), ("row3-read_many-1000-synthetic",), ("row7-",))
    assert counted.comparisons == 8
    assert counted.caught["row3-read_many-1000-synthetic"] == 8
    assert counted.alarms == 0  # row7 is slowed too, and named affected
    assert tally(gate_outcomes(injected), ("row3-read_many-1000-synthetic",)).alarms == 8


# ---------------------------------------------------------------------- the real slowdown


@pytest.mark.parametrize("change", ["range-copy", "take-copy", "no-range", "label-loop"])
def test_each_real_change_applies_and_the_changed_code_still_reads_right(tmp_path: Path, change: str) -> None:
    """A real change, not a breakage: it applies to today's code, and the changed store reads the same images."""
    import shutil

    shutil.copytree(REPO / "imgstore", tmp_path / "imgstore", ignore=shutil.ignore_patterns("__pycache__"))
    before = (tmp_path / "imgstore/backends/memmap.py").read_text()
    subprocess.run([str(REPO / ".ci/real-slowdown"), str(tmp_path), change], check=True)
    assert (tmp_path / "imgstore/backends/memmap.py").read_text() != before
    again = subprocess.run([str(REPO / ".ci/real-slowdown"), str(tmp_path), change], capture_output=True, text=True)
    assert again.returncode == 2 and "does not apply" in again.stderr  # applied once: the code it edits is gone
    check = """
import sys, numpy as np, imgstore
assert imgstore.__file__.startswith(sys.argv[1]), imgstore.__file__
images = np.random.default_rng(0).integers(0, 256, (600, 8, 8, 3), dtype=np.uint8)
with imgstore.open_store(sys.argv[1] + "/s", "memmap", mode="w") as store:
    store.put_many(images, np.arange(600) % 10)
with imgstore.open_store(sys.argv[1] + "/s", mode="r") as store:
    got, labels = store.get_many(range(600))
    assert (got == images).all() and (labels == np.arange(600) % 10).all()
    got, _ = store.get_many([5, 599, 0])
    assert (got == images[[5, 599, 0]]).all()
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_unknown_real_change_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([str(REPO / ".ci/real-slowdown"), str(tmp_path), "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown change" in result.stderr


# ---------------------------------------------------------------------- the verdict on the gate's rows


def _side(rng: np.random.Generator, runs: int, slowed: float = 1.0) -> Run:
    """One side's runs merged: 6 warm read rows steady to 2% between runs, 6 cold ones swinging by 50%."""
    from imgstore import compare

    merged = []
    for _ in range(runs):
        benchmarks = {}
        for k in range(12):
            cache = "cold" if k >= 6 else "warm"
            key = f"imgstore-b{k % 6}-read_many-1000-synthetic" + ("-cold" if cache == "cold" else "")
            fullname = f"benchmarks/test_storage.py::test_storage[{key}]"
            noise = rng.lognormal(0, 0.5 if cache == "cold" else 0.02)
            seconds = 1e-3 * (k + 1) * noise * (slowed if key == "imgstore-b0-read_many-1000-synthetic" else 1.0)
            rounds = tuple(seconds * rng.lognormal(0, 0.01, 3))
            info = {"kind": "imgstore", "backend": f"b{k % 6}", "variant": "", "operation": "read_many",
                    "images": 1000, "dataset": "synthetic", "cache": cache}  # fmt: skip
            benchmarks[fullname] = Benchmark(fullname, key, None, float(np.median(rounds)), rounds, info)
        merged.append(Run("synthetic", benchmarks))
    return compare.merge_runs(merged)


def test_cold_rows_swinging_between_runs_do_not_blind_the_warm_rows() -> None:
    """A row's spread floors come from rows run the same way: a warm row is not judged at the cold rows' noise."""
    from imgstore.compare import Verdict, compare_runs

    rng = np.random.default_rng(7)
    rows = compare_runs(_side(rng, 2), _side(rng, 2, slowed=1.25))
    verdicts = {benchmark_id(row.fullname): row.verdict for row in rows}
    assert verdicts["imgstore-b0-read_many-1000-synthetic"] is Verdict.REGRESSION
    assert all(v is not Verdict.REGRESSION for k, v in verdicts.items() if k != "imgstore-b0-read_many-1000-synthetic")


def test_the_replay_leaves_out_a_failed_run_and_stops_at_one_being_written(tmp_path: Path) -> None:
    from benchmarks.validate_gate import _series

    doc = {"benchmarks": [{"fullname": "b.py::t[x]", "stats": {"median": 1.0, "data": [1.0]}}]}
    for index in (0, 2, 3):
        for side in ("base", "head"):
            (tmp_path / f"aa_{index}_{side}.json").write_text(json.dumps(doc))
    for side in ("base", "head"):
        (tmp_path / f"aa_1_{side}.failed").touch()  # .ci/validate-gate: that session failed, see its log
    (tmp_path / "aa_3_head.json").write_text("")  # still being written
    for side in ("base", "head"):
        (tmp_path / f"aa_5_{side}.json").write_text(json.dumps(doc))  # after a gap: not part of the series
    names = [(Path(base.path).name, Path(head.path).name) for base, head in _series(tmp_path, "aa")]
    assert names == [("aa_0_base.json", "aa_0_head.json"), ("aa_2_base.json", "aa_2_head.json")]
