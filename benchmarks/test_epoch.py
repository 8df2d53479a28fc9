"""The ``epoch`` benchmark: one shuffled epoch of a training loader, warm or cold (see benchmarks/epoch.py).

Only the epoch is timed: from ``iter(loader)`` to its last batch. Building the loader's files (once a
session), making the loader object, evicting the files for a cold round and checking the epoch are
untimed (``benchmark.pedantic``'s per-round setup checks the round before).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Every epoch row trains through a torch DataLoader; without torch the rest of the suite still runs.
pytest.importorskip("torch", reason="the epoch rows need PyTorch: pip install torch (the CPU build: see the README)")

from benchmarks.epoch import SEED, EpochCheck, EpochRow, epoch_rounds, epoch_source, release, run_epoch
from benchmarks.inject import Injection, slowed_down
from benchmarks.loaders import EpochLoader, load_peer, missing_requirement
from benchmarks.operations import BATCH_SIZE, capped
from benchmarks.pagecache import StillCachedError, make_cold
from benchmarks.timer import WallRounds, judged_clock, judged_on_wall
from imgstore.fileio import disk_usage, file_bytes

if TYPE_CHECKING:
    from benchmarks.conftest import BenchDataSet

SLOW_EPOCH_SECONDS = 2.0


def loader_class(name: str) -> type[EpochLoader]:
    from benchmarks.loaders.imgstore_rows import loader_for_name
    from benchmarks.loaders.limit import LimitLoader

    if name == LimitLoader.name:
        return LimitLoader
    if name.startswith("imgstore-"):
        return loader_for_name(name)
    return load_peer(name)


class EpochRows:
    """Each (dataset, loader, N) built once a session, shared by its workers and cache rows; closed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str, int], EpochRow] = {}
        self.checks: dict[tuple[str, int], EpochCheck] = {}

    def get(self, data: Any, name: str, n: int) -> EpochRow:
        key = (data.name, name, n)
        if key not in self.built:
            source = epoch_source(data.name, data.images[:n], data.labels[:n])
            check = self.checks.setdefault((data.name, n), EpochCheck(source))
            loader = loader_class(name)()
            root = self.root / f"{data.name}-{name}-{n}"
            root.mkdir(parents=True)  # build() writes under an empty folder
            loader.build(source, root)
            self.built[key] = EpochRow(loader, root, check)
        return self.built[key]

    def close(self) -> None:
        for row in self.built.values():
            row.loader.close()


@pytest.fixture(scope="session")
def epoch_rows(work_dir: Path) -> Iterator[EpochRows]:
    rows = EpochRows(work_dir / "epoch")
    yield rows
    rows.close()


def test_epoch(
    benchmark: Any,
    loader_name: str,
    workers: int,
    cutoff: int,
    dataset_name: str,
    cache: str,
    bench_data: BenchDataSet,
    epoch_rows: EpochRows,
    bench_results: list,
    injected_slowdown: list[Injection],
    pytestconfig: Any,
) -> None:
    cls = loader_class(loader_name)
    missing = missing_requirement(cls)
    if missing:
        pytest.skip(missing)
    data = bench_data.get(dataset_name)
    cold = cache == "cold"
    benchmark.group = (
        f"epoch n={cutoff} w={workers}" + (f" {data.name}" if data.encoded else "") + (" cold" if cold else "")
    )
    row = epoch_rows.get(data, loader_name, cutoff)
    first_batch: list[float] = []
    cpu: list[float] = []
    delivered: list[list[Any]] = []
    notes: list[str] = []

    def check_last_round() -> None:
        if delivered:
            problem = row.check.problems(delivered.pop())
            if problem and cls.exact_epoch:
                raise AssertionError(f"{loader_name} w={workers}: {problem}")
            if problem:
                notes.append(problem)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        check_last_round()  # untimed: the round before
        if cold:
            row.loader.close()  # its maps pin pages in the cache
            release()
            try:
                make_cold(row.loader.files())
            except StillCachedError as exc:
                benchmark.has_error = True  # not saved with no round (see test_storage._cold_rounds)
                pytest.skip(f"cold {loader_name}: {exc}")
        delivered.append([])
        # a new seed a round: a peer that makes its DataLoader anew still shuffles each epoch differently
        loader = row.loader.loader(batch_size=BATCH_SIZE, num_workers=workers, seed=SEED + len(delivered))
        return (loader, delivered[-1], first_batch, cpu), {}

    # One untimed epoch first (imports, decoder checks, first touches), checked like the others.
    start = time.perf_counter()
    run_epoch(*setup()[0])
    warmup = time.perf_counter() - start
    first_batch.clear()
    cpu.clear()
    # a row whose epoch takes seconds (a peer's per-file loop) gets 2 rounds: the default run stays affordable
    rounds = capped(2 if warmup > SLOW_EPOCH_SECONDS else epoch_rounds(cutoff, data.encoded))  # --max-rounds
    on_wall = judged_on_wall("epoch", "", cache)  # a cold epoch waits on the disk (benchmarks/timer.py)
    clock = judged_clock(pytestconfig, on_wall)
    # IMGSTORE_BENCH_INJECT_SLOWDOWN
    body = slowed_down(run_epoch, injected_slowdown, loader_name, "epoch", cutoff, clock)
    wall = WallRounds()  # each round's wall time, whatever --benchmark-timer is (the workers are joined inside)
    benchmark.pedantic(wall.wrap(body), setup=setup, rounds=rounds, iterations=1)
    check_last_round()

    if benchmark.stats is None:  # --benchmark-disable: ran once, checked
        return
    from imgstore.analysis.schema import ResultRecord

    median = benchmark.stats.stats.median
    record = ResultRecord(
        kind=cls.kind,
        backend="raw" if cls.kind == "limit" else getattr(cls, "backend", "") or cls.name,
        variant="",
        operation="epoch",
        images=cutoff,
        dataset=data.name,
        disk_bytes=int(disk_usage(row.root)),
        file_bytes=int(file_bytes(row.root)),
        images_per_second=cutoff / median,
        ratio_to_limit=None,  # filled at the end of the session
        ratio_to_tutorial=None,
        speedup_over_single=None,
    )
    benchmark.extra_info.update(record.to_extra_info())
    benchmark.extra_info.update(
        {
            "cache": cache,
            "wall_rounds": wall.rounds,
            "judged_on": "wall" if on_wall else "timer",
            "workers": workers,
            "loader": loader_name,
            "first_batch_seconds": statistics.median(first_batch),
            "main_cpu_seconds_per_image": statistics.median(cpu) / cutoff,
            "exact_epoch": not notes,
            "epoch_note": notes[-1] if notes else "",
        }
    )
    bench_results.append(benchmark.stats)
