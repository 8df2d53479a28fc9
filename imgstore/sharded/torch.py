"""Reading a sharded dataset on many ranks: a PyTorch ``IterableDataset`` split over ranks and DataLoader workers.

Each epoch is planned the same way in every process, from ``(seed, epoch)`` only: the shard order
is shuffled, every shard's records are shuffled, and the records, in that order, form one stream
of ``N`` records. The stream is cut into ``S = world_size * num_workers`` equal contiguous slices,
one per (rank, worker), rank-major: slice ``rank * num_workers + worker``. So

- every record is read exactly once per epoch across all ranks and workers, and
- every rank reads the same number of records and yields the same number of items (steps), so
  collectives in the training loop never wait on a rank that ran out. The policy for ``N % S``
  is ``DistributedSampler``'s: ``drop_last=False`` pads, every slice has ``ceil(N / S)`` records,
  the last slices wrapping around to the start of the stream (fewer than ``S`` records are read
  twice); ``drop_last=True`` gives every slice ``floor(N / S)`` records and drops the tail.

Why slices of the stream and not whole shards per worker: whole shards balance only when there are
many more shards than ``S`` and they hold equal counts; a contiguous slice balances exactly and
still keeps reads local: a slice touches about ``N / (S * shard size) + 1`` shards, each read from
one cached file, so a worker's cache holds a few shards, not the dataset. A shard cut between two
slices gives each a disjoint random part of it. Mixing is per shard (like WebDataset's shard
shuffle plus a shuffle within each shard): a batch is drawn from one or two shards; make shards
small enough (many per slice) and their contents mixed when written if that matters for training.

All ranks must use the same ``num_workers``. ``set_epoch(epoch)`` before each epoch, as with
``DistributedSampler``; the epoch lives in shared memory, so it reaches worker processes however
they were started, ``persistent_workers=True`` included.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from multiprocessing import RawValue
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np

from imgstore.arguments import checked_size
from imgstore.errors import InvalidOptionError, MissingDependencyError
from imgstore.sharded.dataset import ShardedDataset, _reopen, open_sharded

try:
    import torch
    import torch.distributed as dist
    from torch.utils.data import IterableDataset, get_worker_info
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError(
        f"imgstore.sharded.torch needs PyTorch: pip install 'imgstore-ml[torch]' ({exc})"
    ) from exc

from imgstore.torch_loader import Layout, arrange, checked_layout

#: records read per get_many when yielding samples
_SAMPLE_CHUNK = 256


def _non_negative(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidOptionError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def slice_records(
    counts: list[int] | tuple[int, ...],
    *,
    seed: int,
    epoch: int,
    slot: int,
    slots: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[tuple[int, np.ndarray]]:
    """Slice ``slot`` of ``slots`` of epoch ``epoch``: ``(shard, local indices)`` segments in reading order.

    A pure function of its arguments: every process computes the same plan.
    """
    n = sum(counts)
    if n == 0:
        return []
    per = n // slots if drop_last else -(-n // slots)
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    starts = np.concatenate([[0], np.cumsum([counts[k] for k in order])])  # stream position of each shard
    out: list[tuple[int, np.ndarray]] = []
    begin = slot * per
    for lo, hi in _wrapped(begin, begin + per, n):  # the padding wraps to the start
        for j in range(int(np.searchsorted(starts, lo, side="right")) - 1, len(order)):
            a, b = max(lo, int(starts[j])), min(hi, int(starts[j + 1]))
            if a >= b:
                if starts[j] >= hi:
                    break
                continue
            k = int(order[j])
            records = (
                np.random.default_rng([seed, epoch, k]).permutation(counts[k]) if shuffle else np.arange(counts[k])
            )
            out.append((k, records[a - int(starts[j]) : b - int(starts[j])]))
    return out


def _wrapped(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """Stream positions ``lo .. hi - 1`` taken modulo ``n``, as ranges (padding wraps to the stream's start)."""
    out = []
    while lo < hi:
        start = lo % n
        take = min(hi - lo, n - start)
        out.append((start, start + take))
        lo += take
    return out


class _Epoch:
    """An epoch number where a shared one cannot go (a pickle that is not a worker's start)."""

    def __init__(self, value: int) -> None:
        self.value = value


class ShardedIterable(IterableDataset[Any]):
    """Batches (or samples) of a sharded dataset for one rank, split over its DataLoader workers.

    ``data``: an open :class:`ShardedDataset` or its URL (opened with ``open_options``, e.g.
    ``cache_dir=``, ``storage_options=``). ``batch_size`` given: items are ``(images, labels)``,
    one ``uint8`` tensor [B, H, W, C] (``layout="chw"``: [B, C, H, W]) read with one ``get_many``,
    and ``int64`` labels [B]; use ``DataLoader(it, batch_size=None, num_workers=...)``. The last
    batch of a worker's slice may be short (the same on every rank). ``batch_size=None``: items
    are ``(image, label)`` samples, to batch with the DataLoader's own ``batch_size`` (or to
    transform one by one: images of varied shapes come as they are).
    ``size=(h, w)``: every image resized to it on reading (``get_many(size=)``): needed to batch
    a dataset of varied shapes, such as a folder converted with the default ``codec="keep"``.
    ``rank``/``world_size``: from ``torch.distributed`` when initialised, else 0 and 1, unless given.
    See the module's documentation for the split, the shuffle and the padding policy.
    """

    def __init__(
        self,
        data: ShardedDataset | str | os.PathLike[str],
        *,
        batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        layout: Layout = "hwc",
        size: tuple[int, int] | None = None,
        open_options: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size is not None and (_non_negative("batch_size", batch_size) == 0):
            raise InvalidOptionError("batch_size must be a positive integer or None, got 0")
        self.batch_size = batch_size
        self.seed = _non_negative("seed", seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.layout = checked_layout(layout)
        self.size = checked_size(size)
        if (rank is None) != (world_size is None):
            raise InvalidOptionError("give both rank and world_size, or neither")
        if rank is None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = (rank or 0), (world_size or 1)
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise InvalidOptionError(f"world_size must be a positive integer, got {world_size!r}")
        if not 0 <= _non_negative("rank", self.rank) < self.world_size:
            raise InvalidOptionError(f"rank must be in 0 .. {self.world_size - 1}, got {rank!r}")
        self.data = data if isinstance(data, ShardedDataset) else open_sharded(data, **dict(open_options or {}))
        if self.size is not None and any(
            s.codec == "raw" and s.shape is not None and s.shape[:2] != self.size for s in self.data.shards
        ):
            raise InvalidOptionError(
                f"size={self.size}: {self.data.url} holds shards of raw pixels of another size, which are not "
                "resized; leave size out, or give their size"
            )
        self.counts = tuple(s.count for s in self.data.shards)
        self._epoch: Any = RawValue("q", 0)  # shared with workers, persistent ones included
        self._pid = os.getpid()

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``: its order depends on ``(seed, epoch)`` only.

        Seen by DataLoader workers already running (``persistent_workers=True``) at their next epoch."""
        self._epoch.value = _non_negative("epoch", epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:  # pickled for something else than a new worker: the epoch's value
            state["_epoch"] = _Epoch(self.epoch)
        return state

    def per_worker(self, num_workers: int = 0) -> int:
        """Records each worker reads per epoch (``num_workers=0``: the rank's own process reads)."""
        n, slots = sum(self.counts), self.world_size * max(num_workers, 1)
        return n // slots if self.drop_last else -(-n // slots)

    def steps(self, num_workers: int = 0) -> int:
        """Items every rank yields per epoch with this many DataLoader workers (batches, or samples)."""
        per = self.per_worker(num_workers)
        return max(num_workers, 1) * (-(-per // self.batch_size) if self.batch_size else per)

    def _plan(self) -> list[tuple[int, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return slice_records(
            self.counts,
            seed=self.seed,
            epoch=self.epoch,
            slot=self.rank * workers + worker,
            slots=self.world_size * workers,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
        )

    def _dataset(self) -> ShardedDataset:
        if self._pid != os.getpid():  # a forked worker: its own handle, never the parent's open stores
            self.data = _reopen(*self.data.__reduce__()[1])
            self._pid = os.getpid()
        return self.data

    def __iter__(self) -> Iterator[Any]:
        data = self._dataset()
        segments = self._plan()
        offsets = data.offsets
        order = np.concatenate([offsets[k] + local for k, local in segments]) if segments else np.empty(0, np.int64)
        shard_at = np.concatenate([np.full(len(local), k) for k, local in segments]) if segments else order
        step = self.batch_size or _SAMPLE_CHUNK
        for start in range(0, len(order), step):
            upcoming = list(dict.fromkeys(shard_at[start + step : start + 3 * step].tolist()))
            if upcoming:
                data.prefetch(upcoming)  # the next shards download while this batch is read
            images, labels = data.get_many(np.sort(order[start : start + step]), size=self.size)  # in file order
            if not isinstance(images, np.ndarray) and not self.batch_size:  # samples of their own shapes
                for image, label in zip(images, labels.tolist(), strict=True):
                    yield arrange(torch.from_numpy(image), self.layout, batched=False), label
                continue
            if not isinstance(images, np.ndarray):
                raise InvalidOptionError(
                    f"{data.url}: its images vary in shape and do not batch into one tensor: pass size=(h, w) to "
                    "resize them as they are read, or convert with --codec raw --shape HxWxC"
                )
            tensor = arrange(torch.from_numpy(images), self.layout, batched=True)
            if self.batch_size:
                yield tensor, torch.from_numpy(labels)
            else:
                yield from zip(tensor, labels.tolist(), strict=True)
