"""The gate's CPU timer (benchmarks/timer.py) and what ``imgstore compare`` does with CPU and wall rounds
(imgstore/analysis/clocks.py): CPU time judged, wall time kept for what CPU time cannot see."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from benchmarks.inject import slowed_down, with_injected_slowdown  # noqa: E402
from benchmarks.timer import CPU_TIMER, cpu_seconds, judged_on_wall  # noqa: E402
from imgstore.analysis import clocks, load  # noqa: E402
from imgstore.analysis.load import Benchmark, Run, merge_runs  # noqa: E402
from imgstore.analysis.verdict import Verdict, compare_runs  # noqa: E402
from imgstore.cli import main  # noqa: E402
from imgstore.errors import ImgStoreError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


# ---------------------------------------------------------------------- the timer


def test_the_timer_counts_cpu_not_sleep_and_resolves_microseconds() -> None:
    start = cpu_seconds()
    time.sleep(0.1)
    slept = cpu_seconds() - start
    start = cpu_seconds()
    _spin(0.05)
    spun = cpu_seconds() - start
    assert slept < 0.02 and 0.045 < spun < 0.2
    ticks = {cpu_seconds() for _ in range(2000)}
    steps = np.diff(sorted(ticks))
    assert len(ticks) > 10 and steps.min() < 1e-3  # os.times() would step by 10 ms


def test_the_timer_counts_a_child_once_it_is_reaped() -> None:
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_spin, args=(0.2,))
    start = cpu_seconds()
    child.start()
    child.join()  # waited for: its CPU joins RUSAGE_CHILDREN
    assert cpu_seconds() - start > 0.18


def test_a_dataloader_epochs_workers_are_reaped_inside_the_round_and_counted(tmp_path: Path) -> None:
    """What the epoch rows time: the workers' CPU is in the round (joined when the epoch ends), none left alive."""
    pytest.importorskip("torch")
    import imgstore
    from imgstore.torch import make_loader

    images = np.random.default_rng(0).integers(0, 255, (2048, 32, 32, 3), dtype=np.uint8)
    with imgstore.open_store(tmp_path / "s", "lmdb", "w") as store:
        store.put_many(images, np.zeros(len(images), dtype=np.int64))
    loader = make_loader(tmp_path / "s", batch_size=256, num_workers=2, seed=0)
    cpu, own = cpu_seconds(), time.process_time()
    batches = sum(1 for _ in loader)
    cpu, own = cpu_seconds() - cpu, time.process_time() - own
    assert batches == 8
    assert multiprocessing.active_children() == []
    assert cpu > own + 0.005  # the two workers' reads, checks and copies counted beside the main process's


def test_rows_that_wait_are_judged_on_wall_time() -> None:
    assert judged_on_wall("read", "", "cold") and judged_on_wall("epoch", "", "cold")
    assert judged_on_wall("write", "", "warm")  # durable: waits for fsync
    assert judged_on_wall("write", "preset", "warm")
    assert not judged_on_wall("write", "nosync", "warm")
    assert not judged_on_wall("read", "noverify", "warm") and not judged_on_wall("epoch", "", "warm")


def test_an_injection_slows_the_clock_the_row_is_judged_on() -> None:
    """Under the CPU timer a busy-wait adds a fraction of the round's CPU time, not of its waits."""

    def body() -> None:
        time.sleep(0.05)  # a wait: no CPU

    start = time.perf_counter()
    with_injected_slowdown(body, 1.0, cpu_seconds)()
    on_cpu = time.perf_counter() - start
    start = time.perf_counter()
    with_injected_slowdown(body, 1.0)()
    on_wall = time.perf_counter() - start
    assert on_cpu < 0.08 < 0.095 < on_wall
    assert slowed_down(body, [], "a", "read_many", 10, cpu_seconds) is body


@pytest.mark.slow
def test_pytest_benchmark_times_rounds_with_the_cpu_timer_and_keeps_wall_rounds(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=20", "--ops=read_many,store_many",
         "--backends=memmap", "--dataset=synthetic", "--cache=both", "-k", "imgstore-memmap-r or imgstore-memmap-s",
         "-q", "-p", "no:cacheprovider", f"--benchmark-timer={CPU_TIMER}", f"--benchmark-json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    run = load.load_run(out)
    judged = {b.name.partition("[")[2].rstrip("]"): b.extra_info["judged_on"] for b in run.benchmarks.values()}
    assert judged == {
        "imgstore-memmap-read_many-20-synthetic": "timer",
        "imgstore-memmap-read_many-20-synthetic-cold": "wall",
        "imgstore-memmap-store_many-20-synthetic": "wall",
    }
    for bench in run.benchmarks.values():
        assert bench.timer == "cpu_seconds"
        assert len(bench.wall_rounds) == len(bench.rounds) > 0


# ---------------------------------------------------------------------- compare on two clocks


def _run(rng: np.random.Generator, *, cpu: float = 1.0, wall: float = 1.0, wall_noise: float = 0.4) -> Run:
    """One run of 8 warm read rows and 2 durable writes (judged on wall), CPU-timed, wall rounds kept.

    CPU time steady to 2% between runs; wall time swinging by ``wall_noise`` (a neighbour's load).
    ``cpu``/``wall`` slow row 0 (a read) on that clock."""
    benchmarks = {}
    for k in range(10):
        write = k >= 8
        key = f"imgstore-b{k}-{'store_many' if write else 'read_many'}-10000-synthetic"
        fullname = f"benchmarks/test_storage.py::test_storage[{key}]"
        base = 1e-2 * (k + 1) * rng.lognormal(0, 0.02)
        load_factor = rng.lognormal(0, wall_noise)
        cpu_rounds = tuple(base * (cpu if k == 0 else 1.0) * rng.lognormal(0, 0.01, 3))
        wall_rounds = tuple(
            t * 1.5 * load_factor * (wall if k == 0 else 1.0) * rng.lognormal(0, 0.01) for t in cpu_rounds
        )
        info = {"kind": "imgstore", "backend": f"b{k}", "variant": "", "images": 10000, "dataset": "synthetic",
                "operation": "store_many" if write else "read_many", "cache": "warm",
                "judged_on": "wall" if write else "timer", "wall_rounds": list(wall_rounds)}  # fmt: skip
        benchmarks[fullname] = Benchmark(
            fullname, key, None, float(np.median(cpu_rounds)), cpu_rounds, info, timer="cpu_seconds",
            wall_rounds=wall_rounds,
        )  # fmt: skip
    return Run("synthetic", benchmarks)


def _verdicts(base: list[Run], head: list[Run], **kwargs: Any) -> dict[str, tuple[Verdict, str]]:
    rows = clocks.compare_clocks(merge_runs(base), merge_runs(head), **kwargs)
    return {row.name: (row.verdict, row.clock) for row in rows}


def test_same_code_under_a_swinging_load_raises_no_alarm_on_either_clock() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        verdicts = _verdicts([_run(rng), _run(rng)], [_run(rng), _run(rng)])
        assert all(verdict is not Verdict.REGRESSION for verdict, _ in verdicts.values()), verdicts


def test_a_cpu_slowdown_is_judged_on_cpu_time_through_wall_noise_that_hides_it() -> None:
    rng = np.random.default_rng(2)
    caught_on_cpu = caught_on_wall_alone = 0
    for _ in range(10):
        base, head = [_run(rng), _run(rng)], [_run(rng, cpu=1.25), _run(rng, cpu=1.25)]
        verdicts = _verdicts(base, head)
        caught_on_cpu += verdicts["imgstore-b0-read_many-10000-synthetic"] == (Verdict.REGRESSION, "")
        walls = compare_runs(merge_runs([clocks.wall_view(r, set(r.benchmarks)) for r in base]),
                             merge_runs([clocks.wall_view(r, set(r.benchmarks)) for r in head]))  # fmt: skip
        caught_on_wall_alone += any(
            row.name == "imgstore-b0-read_many-10000-synthetic" and row.verdict is Verdict.REGRESSION for row in walls
        )
    assert caught_on_cpu == 10 and caught_on_wall_alone <= 2


def test_lost_parallelism_cpu_cannot_see_fails_on_wall_time_when_large() -> None:
    """The same CPU time spent on one core instead of two: wall time x2.5, CPU unchanged."""
    rng = np.random.default_rng(3)
    base, head = [_run(rng, wall_noise=0.1) for _ in range(2)], [_run(rng, wall=2.5, wall_noise=0.1) for _ in range(2)]
    verdicts = _verdicts(base, head)
    assert verdicts["imgstore-b0-read_many-10000-synthetic"] == (Verdict.REGRESSION, "wall")
    assert _verdicts(base, head, wall_threshold=None)["imgstore-b0-read_many-10000-synthetic"][0] is Verdict.UNCHANGED
    from imgstore.analysis.report import format_table

    table = format_table(clocks.compare_clocks(merge_runs(base), merge_runs(head)))
    assert "regression (wall time)" in table


def test_a_row_that_waits_is_judged_on_its_wall_rounds() -> None:
    """A durable write (judged_on wall): an fsync added shows in wall time only, and fails at the threshold."""
    rng = np.random.default_rng(4)

    def slower_write(run: Run, factor: float) -> Run:
        name = "benchmarks/test_storage.py::test_storage[imgstore-b8-store_many-10000-synthetic]"
        bench = run.benchmarks[name]
        wall = tuple(t * factor for t in bench.wall_rounds)
        run.benchmarks[name] = Benchmark(bench.fullname, bench.name, None, bench.median, bench.rounds,
                                         bench.extra_info, timer=bench.timer, wall_rounds=wall)  # fmt: skip
        return run

    base = [_run(rng, wall_noise=0.02) for _ in range(2)]
    head = [slower_write(_run(rng, wall_noise=0.02), 1.4) for _ in range(2)]
    verdicts = _verdicts(base, head)
    assert verdicts["imgstore-b8-store_many-10000-synthetic"] == (Verdict.REGRESSION, "wall")
    assert verdicts["imgstore-b9-store_many-10000-synthetic"] == (Verdict.UNCHANGED, "wall")


def test_runs_without_wall_rounds_are_judged_as_before() -> None:
    rng = np.random.default_rng(5)

    def plain(run: Run) -> Run:
        return Run(run.path, {n: Benchmark(b.fullname, b.name, None, b.median, b.rounds, {
            k: v for k, v in b.extra_info.items() if k not in ("wall_rounds", "judged_on")})
            for n, b in run.benchmarks.items()})  # fmt: skip

    base, head = [plain(_run(rng)) for _ in range(2)], [plain(_run(rng, cpu=1.3)) for _ in range(2)]
    ours = clocks.compare_clocks(merge_runs(base), merge_runs(head))
    theirs = compare_runs(merge_runs(base), merge_runs(head))
    assert [(r.name, r.verdict, r.ratio) for r in ours] == [(r.name, r.verdict, r.ratio) for r in theirs]
    assert all(row.clock == "" for row in ours)


def test_rounds_of_different_timers_are_never_compared_or_pooled() -> None:
    rng = np.random.default_rng(6)
    cpu_run = _run(rng)
    wall_run = Run("w", {n: Benchmark(b.fullname, b.name, None, b.median, b.rounds, b.extra_info,
                                      timer="perf_counter") for n, b in _run(rng).benchmarks.items()})  # fmt: skip
    with pytest.raises(ImgStoreError, match="not comparable"):
        clocks.compare_clocks(cpu_run, wall_run)
    with pytest.raises(ImgStoreError, match="different timers"):
        merge_runs([cpu_run, wall_run])


def _bench_doc(name: str, rounds: list[float], wall: object, timer: str = "cpu_seconds") -> dict[str, Any]:
    return {"fullname": f"b.py::t[{name}]", "name": f"t[{name}]", "options": {"timer": timer},
            "extra_info": {"wall_rounds": wall, "judged_on": "timer"},
            "stats": {"median": float(np.median(rounds)), "data": rounds}}  # fmt: skip


def test_saved_runs_give_their_timer_and_wall_rounds_and_bad_wall_rounds_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"benchmarks": [_bench_doc("x", [1.0, 1.1], [2.0, 2.5])]}))
    bench = load.load_run(good).benchmarks["b.py::t[x]"]
    assert bench.timer == "cpu_seconds" and bench.wall_rounds == (2.0, 2.5)
    for bad in ("fast", [1.0, -1.0], [True]):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"benchmarks": [_bench_doc("x", [1.0], bad)]}))
        with pytest.raises(ImgStoreError, match="wall_rounds"):
            load.load_run(path)


def test_imgstore_compare_fails_a_large_wall_slowdown_and_takes_a_wall_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for side, wall in (("base", 1.0), ("head", 2.0)):
        (tmp_path / side).mkdir()
        for i, jitter in enumerate((1.0, 1.02)):
            rows = [_bench_doc(f"r{k}", [0.01 * (k + 1)] * 3, [0.02 * (k + 1) * jitter * (wall if k == 0 else 1)] * 3)
                    for k in range(4)]  # fmt: skip
            (tmp_path / side / f"{i}.json").write_text(json.dumps({"benchmarks": rows}))
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "head")]) == 1
    assert "regression (wall time)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "head"), "--wall-threshold", "150%"]) == 0


def test_history_keeps_cpu_timed_runs_off_the_wall_timed_timeline(tmp_path: Path) -> None:
    from imgstore.analysis.history import load_history

    for index in range(6):
        timer = "cpu_seconds" if index % 2 else "perf_counter"
        doc = {"machine_info": {"node": "ci"}, "datetime": f"2026-01-0{index + 1}T00:00:00",
               "commit_info": {"id": f"{index:040d}", "time": f"2026-01-0{index + 1}T00:00:00", "dirty": False},
               "benchmarks": [_bench_doc("x", [1.0 + index / 100] * 3, [], timer)]}  # fmt: skip
        (tmp_path / f"{index}.json").write_text(json.dumps(doc))
    history = load_history([tmp_path])
    assert sorted((m.name, len(m.commits)) for m in history.machines) == [("ci", 3), ("ci, timed with cpu_seconds", 3)]
