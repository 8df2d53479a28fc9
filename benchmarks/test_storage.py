"""The one benchmark: every subject x operation x cutoff (cases made in conftest.py, operations defined in subjects.py).

Only the operation is timed. Opening a fresh empty target (writes) or the store (reads) is untimed
setup; a write's timed body ends with the close/commit that makes the target durable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.subjects import BATCH_SIZE, SHUFFLED_OPERATIONS, WRITE_OPERATIONS, Subject, disk_usage, file_bytes

if TYPE_CHECKING:
    from benchmarks.conftest import ReadStores


def rounds_for(n: int) -> int:
    """Timed rounds at ``n`` images: the least every row of a group gets.

    Many rounds where a round is cheap, so medians are steady; fewer as a round gets dear, so a
    benchmark's time stays bounded: the slowest rows (durable single puts, PNG) take ~10 s a round
    at 10 000 images and ~100 s at 100 000. Read rows that are cheap get more (see read_rounds).
    """
    if n <= 10:
        return 20
    if n <= 100:
        return 10
    if n <= 1_000:
        return 5
    if n <= 10_000:
        return 3
    return 2


def write_rounds(operation: str, n: int) -> int:
    """rounds_for(n), except one durable commit per image at 10 000 images and more: 2 rounds.

    A round of store_single there takes 5-16 s per row (10 rows), the dearest part of the
    default run; its rows are reported, not gated (the gate runs store_many at 1 000).
    """
    return 2 if operation == "store_single" and n >= 10_000 else rounds_for(n)


READ_BUDGET_SECONDS = 2.0  # timed rounds a cheap read row may add, at most
MAX_ROUNDS = 50


def read_rounds(n: int, warmup_seconds: float) -> int:
    """rounds_for(n), or more for a read row whose warmup round was cheap: up to ~2 s of rounds.

    A round or two of a 60 ms read is at the mercy of one page-fault storm (freed memory goes back
    to the host on this machine class); twenty are not, and cost little.
    """
    return max(rounds_for(n), min(MAX_ROUNDS, int(READ_BUDGET_SECONDS / max(warmup_seconds, 1e-9))))


def warm_up(body: Callable[..., Any], args: tuple[Any, ...]) -> float:
    """Run ``body`` untimed (by pytest-benchmark) and return how long a round takes, warm.

    A round that fits the read budget runs twice and the faster counts: a first touch of hundreds of
    MB of fresh memory can take 10x a warm round (seen: 1.0 s against 0.1 s) and would wrongly
    leave a cheap row with two rounds.
    """
    times = []
    for _ in range(2):
        start = time.perf_counter()
        body(*args)
        times.append(time.perf_counter() - start)
        if times[0] > READ_BUDGET_SECONDS:
            break
    return min(times)


def random_order(n: int) -> list[int]:
    """The shuffled order of read_random(_many): fixed seed, so every subject reads the same sequence."""
    return np.random.default_rng(0).permutation(n).tolist()


def with_injected_slowdown(body: Callable[..., Any], fraction: float) -> Callable[..., Any]:
    """``body`` made slower by ``fraction`` of its own elapsed time (busy-wait inside the timed call)."""

    def slowed(*args: Any) -> Any:
        start = time.perf_counter()
        result = body(*args)
        until = time.perf_counter() + (time.perf_counter() - start) * fraction
        while time.perf_counter() < until:
            pass
        return result

    return slowed


def check_last_read(
    operation: str, n: int, order: list[int] | None, last: tuple[Any, Any], images: np.ndarray, labels: np.ndarray
) -> None:
    """What a read operation returned last is what the dataset holds there: the benchmark read real data."""
    if operation == "read_single":
        where: int | slice = n - 1
    elif operation == "read_random":
        where = order[-1]
    elif operation == "read_random_many":
        where = order[(n - 1) // BATCH_SIZE * BATCH_SIZE :]
    elif operation == "read_many":
        where = slice(0, n)
    else:  # iterate: the last batch
        where = slice((n - 1) // BATCH_SIZE * BATCH_SIZE, n)
    got_images, got_labels = last
    assert np.array_equal(np.asarray(got_images), images[where]), f"{operation} read wrong pixels"
    assert np.array_equal(np.asarray(got_labels), labels[where]), f"{operation} read wrong labels"


def test_storage(
    benchmark: Any,
    subject_name: str,
    operation: str,
    cutoff: int,
    subjects: dict[str, Subject],
    dataset: tuple[str, np.ndarray, np.ndarray],
    read_stores: ReadStores,
    work_dir: Path,
    bench_results: list,
    injected_slowdown: tuple[str, str, float] | None,
) -> None:
    subject = subjects[subject_name]
    dataset_name, all_images, all_labels = dataset
    images, labels = all_images[:cutoff], all_labels[:cutoff]
    benchmark.group = f"{operation} n={cutoff}"
    body = getattr(subject, operation)
    if injected_slowdown and injected_slowdown[:2] == (subject.name, operation):
        body = with_injected_slowdown(body, injected_slowdown[2])

    if operation in WRITE_OPERATIONS:
        # Each round writes a fresh target, kept until the session ends (see work_dir).
        targets: list[Path] = []
        target_dir = work_dir / "write" / f"{dataset_name}-{subject.name}-{operation}-{cutoff}"

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            targets.append(target_dir / f"round-{len(targets)}")
            return (subject.open_writer(targets[-1], images.shape[1:]), images, labels), {}

        benchmark.pedantic(body, setup=setup, rounds=write_rounds(operation, cutoff), iterations=1)
        disk_bytes, stored_bytes = disk_usage(targets[-1]), file_bytes(targets[-1])
    else:
        path, disk_bytes, stored_bytes = read_stores.get(subject, cutoff)
        order = random_order(cutoff) if operation in SHUFFLED_OPERATIONS else None
        reader = subject.open_reader(path, images.shape[1:])
        args = (reader, order if order is not None else cutoff)
        try:
            # The untimed warmup round touches the store (and the result memory) right before timing:
            # page cache and memory left idle are partly reclaimed by the host on this machine class.
            rounds = read_rounds(cutoff, warm_up(body, args))
            last = benchmark.pedantic(body, args=args, rounds=rounds, iterations=1)
        finally:
            subject.close_reader(reader)
        check_last_read(operation, cutoff, order, last, images, labels)

    if benchmark.stats is None:  # --benchmark-disable: the case ran once, as a smoke test
        return
    benchmark.extra_info.update(
        kind=subject.kind,
        backend=subject.backend,
        variant=subject.variant,
        operation=operation,
        images=cutoff,
        dataset=dataset_name,
        disk_bytes=int(disk_bytes),
        file_bytes=int(stored_bytes),
        images_per_second=cutoff / benchmark.stats.stats.median,
        ratio_to_limit=None,  # filled at the end of the session, from the reference rows of this run
        ratio_to_tutorial=None,
        speedup_over_single=None,
    )
    bench_results.append(benchmark.stats)
