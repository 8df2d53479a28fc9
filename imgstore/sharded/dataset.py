"""Reading a sharded dataset: one global index over its shards, the shards opened (and fetched) as needed.

A :class:`ShardedDataset` reads the manifest once: it sees the dataset as it was committed then,
whatever is appended later (shards are never changed or deleted), until :meth:`refresh`. Remote
shards are fetched whole into a :class:`ShardCache` and opened there, or (a format that can, policy
``remote_reads``) read a few records at a time by byte ranges (:mod:`imgstore.sharded.ranges`); local
ones are read in place. At most ``open_shards`` shards are held open (and pinned in the cache) at
once, least recently used closed first.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.arguments import checked_index, checked_indices
from imgstore.errors import (
    CorruptStoreError,
    InvalidOptionError,
    StoreClosedError,
    StoreIndexError,
    StoreIOError,
    StoreNotFoundError,
)
from imgstore.opening import open_store
from imgstore.sharded.cache import Pin, ShardCache
from imgstore.sharded.holding import Holds
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import DatasetManifest, ShardInfo, common_classes, hash_file, parse_manifest
from imgstore.sharded.ranges import MAX_PARTIAL, RangedShard, checked_policy, use_ranges
from imgstore.sharded.writing import read_committed
from imgstore.store import Store

DEFAULT_CACHE_BYTES = 10 << 30


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgstore-shards"


def open_sharded(
    url: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    storage_options: Mapping[str, Any] | None = None,
    open_shards: int = 4,
    verify_reads: bool = True,
    remote_reads: str = "auto",
) -> ShardedDataset:
    """Open the sharded dataset at ``url`` (a local path or an fsspec URL) for reading.

    Remote shards are fetched into ``cache_dir`` (default ``~/.cache/imgstore-shards``), kept under
    ``cache_bytes`` by evicting the least recently used. ``storage_options`` go to fsspec (for
    s3fs: ``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``, ``retries``...).
    ``remote_reads``: ``"auto"`` (default) reads a request for a small part of a shard not cached by
    byte ranges when its format can (``tar``), and fetches the shard whole otherwise; ``"ranges"``
    always reads such shards by ranges; ``"whole"`` always fetches them whole.
    """
    checked_policy(remote_reads)
    location = Location(url, storage_options)
    manifest = read_committed(location)
    if manifest.revision == 0:
        raise StoreNotFoundError(f"no sharded dataset at {url} (no manifest)")
    cache = None
    if location.local is None:
        cache = ShardCache(cache_dir if cache_dir is not None else default_cache_dir(), cache_bytes)
    return ShardedDataset(location, manifest, cache, open_shards, verify_reads, remote_reads)


class ShardedDataset:
    """Records ``0 .. len - 1`` across the shards in manifest order: ``get``, ``get_many``, ``len``, shards."""

    def __init__(
        self,
        location: Location,
        manifest: DatasetManifest,
        cache: ShardCache | None,
        open_shards: int = 4,
        verify_reads: bool = True,
        remote_reads: str = "auto",
    ) -> None:
        if type(open_shards) is not int or open_shards < 1:
            raise InvalidOptionError(f"open_shards must be a positive integer, got {open_shards!r}")
        self.location, self.cache = location, cache
        self.open_shards, self.verify_reads = open_shards, verify_reads
        self.remote_reads = checked_policy(remote_reads)
        self._open: OrderedDict[int, tuple[Store, Pin | None]] = OrderedDict()
        self._partial: OrderedDict[int, RangedShard] = OrderedDict()  # shards read by byte ranges
        self._locking = (threading.RLock(), os.getpid())  # guards _open's and _partial's changes (and who made it)
        self._holds = Holds()  # stores and partial copies that reads in other threads use (imgstore.sharded.holding)
        self.ranged_bytes = 0  # fetched by byte ranges (partial copies' small files included), closed ones too
        self._closed = False
        self._fetcher: ThreadPoolExecutor | None = None  # prefetch's one background thread
        self._fetching: dict[int, Future[None]] = {}
        self._use(manifest)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles as how to reopen it (for worker processes): the URL, options, and this handle's manifest,
        so a worker reads the same dataset as its parent even if shards were appended since."""
        cache = (str(self.cache.dir), self.cache.max_bytes) if self.cache is not None else (None, 0)
        return _reopen, (
            self.url,
            self.location.storage_options,
            *cache,
            self.open_shards,
            self.verify_reads,
            self.manifest.to_json(),
            self.remote_reads,
        )

    def _use(self, manifest: DatasetManifest) -> None:
        self.manifest = manifest
        self.offsets = np.concatenate([[0], np.cumsum([s.count for s in manifest.shards], dtype=np.int64)])

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def classes(self) -> list[str] | None:
        """The class names (label ``i`` is ``classes[i]``) when every shard has the same ones, else None."""
        return common_classes(self.shards)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardedDataset({self.url!r}, {len(self)} records in {len(self.shards)} shards)"

    def refresh(self) -> int:
        """See shards committed since this handle read the manifest; returns the new length."""
        self._check_open()
        manifest = read_committed(self.location)
        if manifest.shards[: len(self.shards)] != self.shards:
            raise CorruptStoreError(f"{self.url}: the committed shards changed under this handle; open it again")
        self._use(manifest)
        return len(self)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index in that shard) of global record ``index`` (negative counts from the end)."""
        index = checked_index(index, len(self))  # a float or a bool is refused, as a Store does
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    def shard(self, k: int) -> Store:
        """Shard ``k``'s store, open read-only (fetched into the cache first if remote).

        The handle belongs to the dataset: it stays valid until ``open_shards`` other shards have
        been used since, or the dataset is closed.
        """
        with self._lock():  # threads: one handle per shard, none closed while being opened
            return self._shard_locked(k)

    def _shard_locked(self, k: int) -> Store:
        self._check_open()
        if not 0 <= k < len(self.shards):
            raise StoreIndexError(f"shard {k} is out of range ({len(self.shards)} shards)")
        held = self._open.get(k)
        if held is not None:
            self._open.move_to_end(k)
            return held[0]
        while len(self._open) >= self.open_shards:
            _k, (old, old_pin) = self._open.popitem(last=False)
            self._holds.retire(old, partial(_release, old, old_pin))  # closed now, or by the last thread reading it
        pending = self._fetching.pop(k, None)
        if pending is not None:
            wait([pending])  # its outcome does not matter: acquire finds the entry, or fetches (and raises)
        store, pin = self._open_shard(self.shards[k])
        self._open[k] = (store, pin)
        self._drop_partial(k)  # the whole shard supersedes a partial copy
        return store

    @contextmanager
    def _reading(self, k: int) -> Iterator[Store]:
        """Shard ``k``'s store for one read: other threads opening other shards do not close it meanwhile."""
        with self._lock():
            store = self._shard_locked(k)
            self._holds.enter(store)
        try:
            yield store
        finally:
            self._holds.leave(store, self._lock())

    def _ranged(self, k: int, requested: int) -> RangedShard | None:
        """Shard ``k``'s partial copy if this request of ``requested`` records reads byte ranges, else None;
        a copy returned counts this read among its readers (:meth:`_read_ranged` ends it)."""
        with self._lock():  # threads reading one shard at once: one partial copy, none orphaned
            ranged = self._ranged_locked(k, requested)
            if ranged is not None:
                self._holds.enter(ranged)
            return ranged

    def _lock(self) -> threading.RLock:
        if self._locking[1] != os.getpid():  # a lock a forked child inherited may be held by a thread it lacks
            self._locking = (threading.RLock(), os.getpid())
            # and prefetch's thread is not in the child: what it would submit, or what was pending, never runs
            self._fetcher, self._fetching = None, {}
        return self._locking[0]

    def _ranged_locked(self, k: int, requested: int) -> RangedShard | None:
        self._check_open()
        if self.cache is None or k in self._open or not 0 <= k < len(self.shards):
            return None
        info = self.shards[k]
        held = self._partial.get(k)
        if held is not None and held.pid != os.getpid():  # inherited by fork: the parent's to use and delete
            self._drop_partial(k, held)
            held = None
        if k in self._fetching or self.cache.entry_path(info).is_dir():
            return None  # cached whole, or being fetched: shard() opens it (and drops a partial copy)
        # Counted over the partial copy's life: small requests that add up to the whole shard's cost fetch it
        # whole from then on (at worst about twice a whole fetch, never a shard read entirely by ranges).
        asked = int(np.count_nonzero(held.have)) if held is not None else 0
        policy = self.remote_reads
        if policy == "auto" and info.bytes > self.cache.max_bytes:
            policy = "ranges"  # the whole shard cannot be cached: byte ranges are the only way to read it
        if not use_ranges(policy, info, asked + requested):
            return None
        if held is None:
            while len(self._partial) >= MAX_PARTIAL:
                oldest = next(iter(self._partial))
                self._drop_partial(oldest, self._partial[oldest])
            before = self.ranged_bytes
            held = self._partial[k] = RangedShard(self.location, info, self.cache.dir, self.verify_reads)
            self.ranged_bytes = before + held.fetched_bytes
        self._partial.move_to_end(k)
        return held

    def _read_ranged(
        self, k: int, ranged: RangedShard, local: np.ndarray, one: bool, size: tuple[int, int] | None = None
    ) -> tuple[Any, Any]:
        try:
            try:
                return self._read_partial(k, ranged, local, one, size)
            except StoreIOError:
                if ranged.intact():
                    raise  # the network, a full disk: not the copy's loss
            # The partial copy was deleted under us (by hand, a sweeper that took it for a dead reader's): a new
            # one, once, or the whole shard if the policy says so now.
            self._drop_partial(k, ranged)
        finally:
            self._holds.leave(ranged, self._lock())
        again = self._ranged(k, len(local))
        if again is None:
            with self._reading(k) as store:
                return store.get(int(local[0])) if one else store.get_many(local, size=size)
        try:
            return self._read_partial(k, again, local, one, size)
        finally:
            self._holds.leave(again, self._lock())

    def _read_partial(
        self, k: int, ranged: RangedShard, local: np.ndarray, one: bool, size: tuple[int, int] | None
    ) -> tuple[Any, Any]:
        before = ranged.fetched_bytes
        try:
            return ranged.read(local, one, size)
        except CorruptStoreError as exc:
            self._drop_partial(k, ranged)  # nothing damaged is kept
            raise CorruptStoreError(
                f"shard {ranged.info.name} of {self.url}, read by byte ranges: {exc} (nothing kept)"
            ) from exc
        finally:
            self.ranged_bytes += ranged.fetched_bytes - before

    def _drop_partial(self, k: int, ranged: RangedShard | None = None) -> None:
        """Forget shard ``k``'s partial copy (only if it is ``ranged``, when given); closed by its last reader."""
        with self._lock():
            held = self._partial.get(k)
            if held is None or (ranged is not None and held is not ranged):
                return
            del self._partial[k]
            self._holds.retire(held, held.close)

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start fetching these shards into the cache in a background thread (remote datasets; else nothing).

        A reader going through shards in a known order prefetches the next while it reads one, so
        downloads overlap reading. A failed prefetch is not reported: opening the shard fetches it
        again, and raises then. Prefetched shards are not pinned: a cache too small for them evicts them.
        """
        self._check_open()
        wanted = list(shards)
        bad = [k for k in wanted if not 0 <= k < len(self.shards)]
        if bad:
            raise StoreIndexError(f"shard {bad[0]} is out of range ({len(self.shards)} shards)")
        if self.cache is None:
            return
        with self._lock():  # threads prefetching at once: one background thread
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="imgstore-prefetch")
            for k in wanted:
                if k not in self._open and k not in self._fetching:
                    self._fetching[k] = self._fetcher.submit(self._fetch, self.shards[k])

    def _fetch(self, info: ShardInfo) -> None:
        assert self.cache is not None
        try:
            self.cache.acquire(self.location, info).release()
        except Exception:
            pass  # reported when the shard is opened (it is fetched again then)

    def _open_shard(self, info: ShardInfo) -> tuple[Store, Pin | None]:
        pin = None
        if self.cache is not None:
            pin = self.cache.acquire(self.location, info)
            path = pin.path
        else:
            path = self.location.shard_path(info.name)
            _check_sizes(path, info)
        try:
            store = open_store(path, verify_reads=self.verify_reads)
            if len(store) != info.count or store.backend != info.backend:
                raise CorruptStoreError(
                    f"{path} holds {len(store)} {store.backend} records; the manifest says {info.count} {info.backend}"
                )
        except BaseException:
            if pin is not None:
                pin.release()
            raise
        return store, pin

    def get(self, index: int) -> tuple[Any, int]:
        k, local = self.locate(index)
        ranged = self._ranged(k, 1)
        if ranged is not None:
            return self._read_ranged(k, ranged, np.array([local], dtype=np.int64), one=True)
        with self._reading(k) as store:
            return store.get(local)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.get(index)

    def get_many(self, indices: Any, *, size: tuple[int, int] | None = None) -> tuple[Any, np.ndarray]:
        """Images and labels of global ``indices``, in the order given (one array if the shapes agree, else a list).

        ``size=(h, w)``: every image resized to it (as :meth:`imgstore.Store.get_many`), so images of
        varied shapes (e.g. a folder converted with ``codec="keep"``) come as one batch array.
        """
        self._check_open()
        where = checked_indices(indices, len(self))  # as a Store checks them: integers, 1-D, in range
        shard_of = np.searchsorted(self.offsets, where, side="right") - 1
        labels = np.empty(len(where), np.int64)
        parts: list[tuple[np.ndarray, Any]] = []
        for k in np.unique(shard_of).tolist():  # shard by shard, each read in one get_many
            positions = np.flatnonzero(shard_of == k)
            local = where[positions] - self.offsets[k]
            info = self.shards[k]
            # raw pixels already of that size (a raw shard beside encoded ones) need no resize
            asked = None if size is not None and info.codec == "raw" and info.shape[:2] == size else size
            ranged = self._ranged(k, len(positions))
            if ranged is not None:
                images, shard_labels = self._read_ranged(k, ranged, local, one=False, size=asked)
            else:
                with self._reading(k) as store:
                    images, shard_labels = store.get_many(local, size=asked)
            labels[positions] = shard_labels
            parts.append((positions, images))
        if not parts and self.shards and self.shards[0].shape is not None:  # no index: an empty batch
            return np.empty((0, *self.shards[0].shape), np.uint8), labels
        return _gather(parts, len(where)), labels

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for k in range(len(self.shards)):
            with self._reading(k) as store:  # not closed under the iteration by other threads' reads
                for batch, labels in store.iter_batches(1024):
                    yield from zip(batch, labels.tolist(), strict=True)

    def verify(self) -> None:
        """Check every shard: its files against the manifest (remote ones when fetched), its records' checksums."""
        for k, info in enumerate(self.shards):
            if self.cache is None:
                root = self.location.shard_path(info.name)
                _check_sizes(root, info)  # a missing file or folder, a link: CorruptStoreError before any read
                for f in info.files:
                    if hash_file(root / f.path) != (f.bytes, f.xxh3_128):
                        raise CorruptStoreError(f"{root / f.path} differs from its entry in the manifest")
            with self._reading(k) as store:
                store.verify()

    def close(self) -> None:
        with self._lock():  # (a forked child forgets the parent's prefetch thread first: it cannot wait for it)
            fetcher, self._fetcher, self._fetching = self._fetcher, None, {}
        if fetcher is not None:
            fetcher.shutdown(wait=True, cancel_futures=True)  # no download outlives the handle
        with self._lock():
            was_closed, self._closed = self._closed, True  # reads refused from here on
            # A store another thread is reading is closed by that read's end, not under it (a crash, on
            # sqlite, leveldb or lmdb shards).
            while self._open:
                _k, (store, pin) = self._open.popitem()
                self._holds.retire(store, partial(_release, store, pin))
        if self.cache is not None and not was_closed:
            try:  # the shards this handle kept pinned above cache_bytes may go now
                self.cache.make_room(0)
            except OSError:
                pass  # a cache gone or read-only: the next download makes room again
        while self._partial:
            self._drop_partial(next(iter(self._partial)))
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed")

    def __enter__(self) -> ShardedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _reopen(
    url: str,
    storage_options: dict[str, Any],
    cache_dir: str | None,
    cache_bytes: int,
    open_shards: int,
    verify_reads: bool,
    manifest: bytes,
    remote_reads: str = "auto",
) -> ShardedDataset:
    location = Location(url, storage_options)
    cache = ShardCache(cache_dir, cache_bytes) if cache_dir is not None else None
    return ShardedDataset(location, parse_manifest(manifest, url), cache, open_shards, verify_reads, remote_reads)


def _release(store: Store, pin: Pin | None) -> None:
    try:
        store.close()
    finally:
        if pin is not None:
            pin.release()


def _check_sizes(path: Path, info: ShardInfo) -> None:
    """A local shard's files are there with the sizes the manifest says (a cheap check; verify() hashes).

    A shard folder that is a link is refused: sealed shards are never links, and one planted could
    point at an altered copy of the same sizes.
    """
    if path.is_symlink():
        raise CorruptStoreError(f"{path} is a symbolic link: a sealed shard is a folder of the dataset")
    for f in info.files:
        try:
            size = os.lstat(path / f.path).st_size
        except FileNotFoundError:
            raise CorruptStoreError(f"{path}: {f.path} is missing (the manifest lists it)") from None
        if size != f.bytes:
            raise CorruptStoreError(f"{path / f.path} is {size} bytes; the manifest says {f.bytes}")


def _gather(parts: list[tuple[np.ndarray, Any]], n: int) -> Any:
    if all(isinstance(images, np.ndarray) for _p, images in parts):
        shapes = {images.shape[1:] for _p, images in parts}
        if len(shapes) == 1:
            first = parts[0][1] if parts else np.empty((0,), np.uint8)
            out = np.empty((n, *first.shape[1:]), first.dtype)
            for positions, images in parts:
                out[positions] = images
            return out
    listed: list[Any] = [None] * n
    for positions, images in parts:
        for p, image in zip(positions.tolist(), images, strict=True):
            listed[p] = image
    return listed
