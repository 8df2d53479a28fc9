"""What the benchmarks measure: the table of operations, and the protocol a subject implements for them.

Every operation is one :class:`Operation` record in :data:`OPERATIONS`: its name (the test id and
``extra_info["operation"]``), whether it writes or reads, what its body takes, where in the dataset
its last result must lie, its rounds, its title. A *subject* (``subjects.py``, ``tutorial.py``) is a
way of storing images; it declares the operations it supports in ``supports`` and has one method
per operation, named after it:

- a write body takes ``(target, images, labels)``, where ``target`` is what ``open_writer`` returned
  in the untimed setup, and ends with whatever makes the target durable and closed;
- a read body takes ``(reader, n)`` or, for a record with ``takes="order"``, ``(reader, order)``
  (every index of ``range(n)`` once, shuffled with seed 0), with the reader already open, and
  returns ``(images, labels)`` of what it read last; that is checked (untimed) against the dataset.

The suite's parametrization, its summary and its tests iterate the table; adding an operation is one
record here plus the method in each subject that supports it (see README.md, "Adding an operation").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

BATCH_SIZE = 256  # images per call of the batched operations


# ---------------------------------------------------------------------- rounds policies


def rounds_for(n: int) -> int:
    """Timed rounds at ``n`` images: the least every row of a group gets (the default policy).

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


def one_commit_per_image_rounds(n: int) -> int:
    """rounds_for(n), except 2 rounds at 10 000 images and more.

    A round of one durable commit per image takes 5-16 s per row there (10 rows), the dearest part
    of the default run; its rows are reported, not gated (the gate runs store_many at 1 000).
    """
    return 2 if n >= 10_000 else rounds_for(n)


READ_BUDGET_SECONDS = 2.0  # timed rounds a cheap read row may add, at most (--read-budget: the session's)
MAX_ROUNDS = 50
_limits: dict[str, Any] = {"read_budget": READ_BUDGET_SECONDS, "most": None}  # the session's (set_round_limits)


def set_round_limits(read_budget: float | None = None, most: int | None = None) -> None:
    """The session's round limits: ``--read-budget`` (seconds of extra rounds a cheap read row may add)
    and ``--max-rounds`` (at most this many least rounds a row); None: the defaults. The gate, four runs
    judged on each run's fastest round, takes less of both."""
    if read_budget is not None and not read_budget >= 0:
        raise ValueError(f"the read budget is seconds >= 0, not {read_budget}")
    if most is not None and most < 1:
        raise ValueError(f"the most rounds are at least 1, not {most}")
    _limits.update(read_budget=READ_BUDGET_SECONDS if read_budget is None else read_budget, most=most)


def capped(rounds: int) -> int:
    """``rounds``, at most ``--max-rounds``."""
    most = _limits["most"]
    return rounds if most is None else min(rounds, most)


def read_rounds(least: int, warmup_seconds: float) -> int:
    """``least`` rounds, or more for a read row whose warmup round was cheap: up to ~2 s of rounds.

    A round or two of a 60 ms read is at the mercy of one page-fault storm (freed memory goes back
    to the host on this machine class); twenty are not, and cost little.
    """
    return max(least, min(MAX_ROUNDS, int(_limits["read_budget"] / max(warmup_seconds, 1e-9))))


def random_order(n: int) -> list[int]:
    """The shuffled order of a ``takes="order"`` operation: fixed seed, so every subject reads the same sequence."""
    return np.random.default_rng(0).permutation(n).tolist()


# ---------------------------------------------------------------------- the record

VARIANT_KINDS = ("nosync", "noverify", "preset")  # see Operation.variants

Where = int | slice | list[int]  # an index into the dataset's images and labels


@dataclass(frozen=True)
class Operation:
    name: str  # method name on a subject, test id part, group "<name> n=<N>", extra_info["operation"]; never renamed
    # "epoch": measured on the training loaders (benchmarks/loaders, benchmarks/test_epoch.py), not on subjects
    kind: Literal["read", "write", "epoch"]
    title: str  # the summary's heading of its groups
    definition: str  # what is timed, for people (``--ops`` help, README)
    # Read bodies only: "count" -> (reader, n); "order" -> (reader, random_order(n)).
    takes: Literal["count", "order"] = "count"
    # Read operations: where in the dataset the last (images, labels) a body returns lie, from what
    # the body took after the reader (n or the order).
    last_at: Callable[[Any], Where] | None = None
    # The least timed rounds at n images; a read row whose warmup was cheap gets more (read_rounds).
    rounds: Callable[[int], int] = rounds_for
    # speedup_over_single: the same subject's median of this operation over this row's median; None: not applicable.
    speedup_over: str | None = None
    # Variant rows measured on it besides every subject's default row: "nosync" (writes without
    # fsync), "noverify" (reads without checksum checks), "preset" (a backend's named option sets).
    variants: tuple[str, ...] = ()
    # Also measured with the files evicted from the page cache first (--cache cold|both): a "-cold" row.
    cold: bool = False

    def __post_init__(self) -> None:  # a wrong record fails at import, with its name
        if self.kind not in ("read", "write", "epoch") or self.takes not in ("count", "order"):
            raise ValueError(f"operation {self.name!r}: kind must be read/write/epoch and takes count/order")
        if (self.kind == "read") != (self.last_at is not None):
            raise ValueError(f"operation {self.name!r}: a read operation, and only one, says where its last result is")
        unknown = set(self.variants) - set(VARIANT_KINDS)
        if unknown:
            raise ValueError(f"operation {self.name!r}: unknown variant kinds {sorted(unknown)}")

    def argument(self, n: int) -> int | list[int]:
        """What a read body takes after the reader, for ``n`` images."""
        return random_order(n) if self.takes == "order" else n

    def timed_rounds(self, n: int, warmup_seconds: float | None = None) -> int:
        """Rounds at ``n`` images; a read row passes the time of its (untimed) warmup round."""
        least = capped(self.rounds(n))
        return least if warmup_seconds is None else read_rounds(least, warmup_seconds)

    def check_last(
        self, last: tuple[Any, Any], argument: int | list[int], images: np.ndarray, labels: np.ndarray
    ) -> None:
        """What a read body returned last is what the dataset holds there: the benchmark read real data."""
        if self.last_at is None:
            return
        where = self.last_at(argument)
        got_images, got_labels = last
        if not np.array_equal(np.asarray(got_images), images[where]):
            raise AssertionError(f"{self.name} read wrong pixels")
        if not np.array_equal(np.asarray(got_labels), labels[where]):
            raise AssertionError(f"{self.name} read wrong labels")


def _last_batch(n: int) -> slice:
    return slice((n - 1) // BATCH_SIZE * BATCH_SIZE, n)


# ---------------------------------------------------------------------- the table (its order: groups, summary, runs)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "store_single", "write", "Storing images one at a time",
        "N images into a fresh, empty target, one call per image (imgstore: one committed put each), then close",
        rounds=one_commit_per_image_rounds, variants=("nosync",),
    ),
    Operation(
        "store_many", "write", "Storing many images at once",
        "N images into a fresh, empty target in one call (put_many), then close",
        variants=("nosync", "preset"),
    ),
    Operation(
        "read_single", "read", "Reading images one at a time",
        "N calls get(i) in index order, handle open",
        last_at=lambda n: n - 1,
    ),
    Operation(
        "read_many", "read", "Reading many images at once",
        "one call get_many(range(N)), handle open; allocating the result is part of it",
        last_at=lambda n: slice(0, n), variants=("noverify", "preset"), cold=True,
    ),
    Operation(
        "read_random", "read", "Reading images in random order",
        "every image once by get, in a shuffled order (seed 0): a shuffled epoch",
        takes="order", last_at=lambda order: order[-1], variants=("noverify",), cold=True,
    ),
    Operation(
        "read_random_many", "read", "Reading shuffled batches",
        f"the same epoch in the same order, get_many of {BATCH_SIZE} indices at a time (a shuffling batch sampler)",
        takes="order", last_at=lambda order: order[_last_batch(len(order)).start :],
        speedup_over="read_random", variants=("noverify",),
    ),
    Operation(
        "iterate", "read", "Iterating over all images",
        f"one full pass iter_batches({BATCH_SIZE}) in index order, handle open",
        last_at=_last_batch,
    ),
    Operation(
        "epoch", "epoch", "One shuffled training epoch through a DataLoader",
        f"iter() of a torch DataLoader (batch {BATCH_SIZE}, shuffled, num_workers 0 or 2) to its last batch: "
        "every record once, as uint8 [B, H, W, C] and int64 [B] tensors (benchmarks/loaders: LIMIT, imgstore, peers)",
        cold=True,
    ),
)  # fmt: skip

# The operations measured on subjects (benchmarks/test_storage.py); "epoch" is measured on loaders.
STORAGE_OPERATIONS: tuple[Operation, ...] = tuple(op for op in OPERATIONS if op.kind != "epoch")
BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
if len(NAMES) != len(OPERATIONS):
    raise ValueError("operation names must be unique")
for _op in OPERATIONS:
    _over = BY_NAME.get(_op.speedup_over or "")
    if _op.speedup_over is not None and (_over is None or _over is _op or _over.kind != "read"):
        raise ValueError(f"operation {_op.name!r}: speedup_over must name another read operation")


def get_operation(name: str) -> Operation:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown operation {name!r}; known: {', '.join(NAMES)}") from None


# ---------------------------------------------------------------------- the protocol of a subject


class Subject:
    """One way of storing images. Subclasses set the names, declare ``supports`` and implement those operations."""

    name: str  # row label and test id, e.g. "imgstore-lmdb"; unique
    kind: str  # "imgstore" | "tutorial" | "limit"
    backend: str  # e.g. "lmdb", "raw"; a tutorial row is the reference for the imgstore backend of the same name
    variant: str = ""  # a non-default setting of the same backend (imgstore rows only; extra_info["variant"])
    # "" for a default row; else one of VARIANT_KINDS: the row is measured only on the operations whose record lists it.
    variant_kind: str = ""
    supports: ClassVar[tuple[str, ...]] = ()  # names of the operations this class has a method for
    warmups = 2  # untimed warmup rounds of a read row, at most (see warm_up in test_storage.py)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.supports:
            if name not in BY_NAME:
                raise TypeError(f"{cls.__name__}.supports names {name!r}, which is not in benchmarks.operations")
            if not callable(getattr(cls, name, None)):
                raise TypeError(f"{cls.__name__} declares {name!r} in supports but has no method {name}()")

    @property
    def operations(self) -> tuple[str, ...]:
        """The operations this row is benchmarked on, in the table's order."""
        return tuple(
            op.name
            for op in OPERATIONS
            if op.name in self.supports and (not self.variant_kind or self.variant_kind in op.variants)
        )

    @property
    def store_key(self) -> str:
        """Rows with the same key read one store (built once per dataset and cutoff)."""
        return self.name

    def timed_rounds(self, op: Operation, n: int, warmup_seconds: float | None = None) -> int:
        """Rounds of this row on ``op`` at ``n`` images; a read row passes its warmup round's time."""
        return op.timed_rounds(n, warmup_seconds)

    def check_last(self, op: Operation, last: tuple[Any, Any], argument: int | list[int], data: Any) -> None:
        """What a read body returned last is the dataset's there (``data``: benchmarks.data.BenchData)."""
        op.check_last(last, argument, data.images, data.labels)

    def body(self, operation: str) -> Callable[..., Any]:
        """The method that is timed for ``operation``."""
        if operation not in self.supports:
            raise KeyError(f"{self.name} does not support {operation!r}")
        method: Callable[..., Any] = getattr(self, operation)
        return method

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> Any:
        """Make a fresh, empty target at ``path`` (untimed setup of the write operations)."""
        raise NotImplementedError

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> Any:
        """Open the store at ``path`` for the read operations (untimed)."""
        return path

    def close_reader(self, reader: Any) -> None:
        pass

    def build(self, path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        """Make the store the read benchmarks read (untimed, once per session)."""
        self.body("store_many")(self.open_writer(path, images.shape[1:]), images, labels)

    def __repr__(self) -> str:
        return self.name
