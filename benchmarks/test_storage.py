"""The one benchmark: each (dataset, subject, operation, cutoff) case of conftest.py; operations in operations.py.

Only the operation is timed. Opening a fresh empty target (writes) or the store (reads) is untimed
setup; a write's timed body ends with the close/commit that makes the target durable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.inject import Injection, slowed_down
from benchmarks.operations import READ_BUDGET_SECONDS, Subject, get_operation
from benchmarks.timer import WallRounds, judged_clock, judged_on_wall
from imgstore.fileio import disk_usage, file_bytes

if TYPE_CHECKING:
    from benchmarks.conftest import BenchDataSet, ReadStores


def warm_up(body: Callable[..., Any], args: tuple[Any, ...], times: int = 2) -> float:
    """Run ``body`` untimed (by pytest-benchmark) and return how long a round takes, warm.

    A round that fits the read budget runs twice (``times``) and the faster counts: a first touch of
    hundreds of MB of fresh memory can take 10x a warm round (seen: 1.0 s against 0.1 s) and would
    wrongly leave a cheap row with two rounds.
    """
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        body(*args)
        seconds.append(time.perf_counter() - start)
        if seconds[0] > READ_BUDGET_SECONDS:
            break
    return min(seconds)


def _cold_rounds(
    benchmark: Any,
    subject: Subject,
    op: Any,
    body: Callable[..., Any],
    path: Path,
    argument: Any,
    shape: tuple[int, ...],
    cutoff: int,
    wall: WallRounds,
) -> Any:
    """Timed rounds that each start with the store's files out of the page cache (checked), reader opened after."""
    import pytest

    from benchmarks.pagecache import StillCachedError, files_under, make_cold

    readers: list[Any] = []
    files = files_under(path)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        while readers:  # the last round's reader maps the files: closed before they are evicted
            subject.close_reader(readers.pop())
        try:
            make_cold(files)
        except StillCachedError as exc:
            # pytest's Skipped is no Exception, so pytest-benchmark keeps the row: marked failed, it is not
            # saved (saved with no round, it crashed the run's --benchmark-json: min() of no rounds)
            benchmark.has_error = True
            pytest.skip(f"cold {subject.name}: {exc}")
        readers.append(subject.open_reader(path, shape))  # untimed; reads the store's header, as a cold start does
        return (readers[-1], argument), {}

    try:
        return benchmark.pedantic(wall.wrap(body), setup=setup, rounds=subject.timed_rounds(op, cutoff), iterations=1)
    finally:
        while readers:
            subject.close_reader(readers.pop())


def test_storage(
    benchmark: Any,
    subject_name: str,
    operation: str,
    cutoff: int,
    dataset_name: str,
    cache: str,
    subjects: dict[str, dict[str, Subject]],
    bench_data: BenchDataSet,
    read_stores: ReadStores,
    work_dir: Path,
    bench_results: list,
    injected_slowdown: list[Injection],
    pytestconfig: Any,
) -> None:
    subject = subjects[dataset_name][subject_name]
    data = bench_data.get(dataset_name)
    images, labels = data.images[:cutoff], data.labels[:cutoff]
    op = get_operation(operation)
    benchmark.group = data.group(op.name, cutoff) + (" cold" if cache == "cold" else "")
    body = subject.body(op.name)
    on_wall = judged_on_wall(op.kind, subject.variant_kind, cache)  # which clock the gate judges (benchmarks/timer.py)
    clock = judged_clock(pytestconfig, on_wall)
    body = slowed_down(body, injected_slowdown, subject.name, operation, cutoff, clock)  # the gate's validation
    wall = WallRounds()  # each round's wall time, whatever --benchmark-timer is

    if op.kind == "write":
        # Each round writes a fresh target, kept until the session ends (see work_dir).
        targets: list[Path] = []
        target_dir = work_dir / "write" / f"{data.name}-{subject.name}-{operation}-{cutoff}"

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            targets.append(target_dir / f"round-{len(targets)}")
            return (subject.open_writer(targets[-1], data.shape), images, labels), {}

        # Write rows keep their rounds: their first round is already the dear one.
        benchmark.pedantic(wall.wrap(body), setup=setup, rounds=subject.timed_rounds(op, cutoff), iterations=1)
        disk_bytes, stored_bytes = disk_usage(targets[-1]), file_bytes(targets[-1])
    else:
        path, disk_bytes, stored_bytes = read_stores.get(data, subject, cutoff)
        argument = op.argument(cutoff)  # n, or the shuffled order
        if cache == "cold":
            last = _cold_rounds(benchmark, subject, op, body, path, argument, data.shape, cutoff, wall)
        else:
            reader = subject.open_reader(path, data.shape)
            args = (reader, argument)
            try:
                # The untimed warmup round touches the store (and the result memory) right before timing:
                # page cache and memory left idle are partly reclaimed by the host on this machine class.
                warm = warm_up(body, args, subject.warmups) if subject.warmups else None
                rounds = subject.timed_rounds(op, cutoff, warm)
                last = benchmark.pedantic(wall.wrap(body), args=args, rounds=rounds, iterations=1)
            finally:
                subject.close_reader(reader)
        subject.check_last(op, last, argument, data)

    if benchmark.stats is None:  # --benchmark-disable: the case ran once, as a smoke test
        return
    # The result record: defined once, in imgstore.analysis.schema, which every reader parses.
    from imgstore.analysis.schema import ResultRecord

    judged_on = "wall" if on_wall else "timer"
    benchmark.extra_info.update({"cache": cache, "wall_rounds": wall.rounds, "judged_on": judged_on})
    record = ResultRecord(
        kind=subject.kind,
        backend=subject.backend,
        variant=subject.variant,
        operation=operation,
        images=cutoff,
        dataset=data.name,
        disk_bytes=int(disk_bytes),
        file_bytes=int(stored_bytes),
        images_per_second=cutoff / benchmark.stats.stats.median,
        ratio_to_limit=None,  # filled at the end of the session, from the reference rows of this run
        ratio_to_tutorial=None,
        speedup_over_single=None,
    )
    benchmark.extra_info.update(record.to_extra_info())
    bench_results.append(benchmark.stats)
