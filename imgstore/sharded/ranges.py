"""Reading a few records of a remote shard by byte ranges, instead of fetching the shard whole.

A format whose records lie at offsets its index gives (the indexed ``tar`` backend, as WebDataset
shards) can be read a record at a time from object storage. A :class:`RangedShard` is a partial
copy of one remote shard, private to one reader, in the cache directory under
``.ranges-<pid>-<random>/`` (not a cache entry: never shared, never opened whole, deleted when the
reader closes it or its process exits; its creator holds an exclusive ``flock`` on it for its life,
and a copy nobody holds, a killed process's, is swept by the cache and before a new copy is made):

- its small files (the store's manifest, the record checksums, the tar index) are fetched whole
  once and checked against their size and XXH3-128 in the dataset manifest (a damaged one is
  fetched once more, then :class:`CorruptStoreError`);
- its tar files are sparse files of their full size, into which the byte spans of the records
  asked for are written as they arrive: concurrent ranged GETs (``fs.cat_ranges``; s3fs retries
  a range's transient faults itself), spans less than :data:`MERGE_GAP` apart merged into one GET;
- it is opened as an ordinary store, so every record read is checked against its checksum exactly
  as a local read is. Records that fail are fetched once more, then :class:`CorruptStoreError`
  (and the dataset deletes the partial copy: nothing damaged is kept).

Which to use is the dataset's ``remote_reads`` policy: ``"whole"`` (always fetch into the cache),
``"ranges"`` (ranges for every shard of a ranged format not already cached), ``"auto"`` (ranges when
they cost less than the whole shard by :func:`use_ranges`'s model: a GET costs as much time as
:data:`REQUEST_BYTES` more bytes of a body; else the whole shard into the cache). The model and its
constant come from ``benchmarks/sharded_ranges.py`` (README, "Sharded datasets").
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.errors import CorruptStoreError, InvalidOptionError, StoreIOError, StoreNotFoundError
from imgstore.opening import open_store
from imgstore.sharded.cache import fetch_files, locked_dir, sweep_leftovers, unlock_dir
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import ShardInfo

POLICIES = ("auto", "ranges", "whole")
# Backends whose stores can be read by ranges: which of their files are (the rest are fetched whole).
RANGED_FILES: dict[str, Callable[[str], bool]] = {"tar": lambda path: path.endswith(".tar")}
# A GET costs about as much time as this many more bytes of a body: measured against moto on 127.0.0.1
# (~7 ms a GET, ~270 MB/s; README). Real object storage has a longer first byte but serves GETs in
# parallel; set this to its ratio (latency x bandwidth per connection / concurrency) to move auto's choice.
REQUEST_BYTES = 2 << 20
# Spans closer than this are one GET (the gap's bytes cost less than another request).
MERGE_GAP = 1 << 20
MAX_PARTIAL = 16  # partial copies a reader keeps (each an open store), least recently used closed first
_ATTEMPTS = 2


def checked_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise InvalidOptionError(f"remote_reads must be one of {', '.join(POLICIES)}; got {policy!r}")
    return str(policy)


def use_ranges(policy: str, info: ShardInfo, records: int) -> bool:
    """Whether ``records`` records of a shard not cached are read by byte ranges under ``policy``.

    ``"auto"``: when, at worst (a GET a record, plus one for each of the partial copy's small files),
    the GETs and bytes cost less than the whole shard's bytes, a GET counted as :data:`REQUEST_BYTES`.
    The dataset counts ``records`` over a partial copy's life, so small requests adding up to a
    whole shard's cost turn to the whole fetch.
    """
    if policy == "whole" or info.backend not in RANGED_FILES:
        return False
    if policy == "ranges":
        return True
    small = [f for f in info.files if not RANGED_FILES[info.backend](f.path)]
    setup = len(small) * REQUEST_BYTES + sum(f.bytes for f in small)
    record = (info.bytes - sum(f.bytes for f in small)) / max(1, info.count)
    return setup + records * (REQUEST_BYTES + record) <= info.bytes


class RangedShard:
    """A partial copy of a remote shard: the records read so far, fetched by byte ranges (see the module)."""

    def __init__(self, location: Location, info: ShardInfo, parent: Path, verify_reads: bool) -> None:
        self.location, self.info = location, info
        self.pid = os.getpid()  # a forked child inherits the object; the copy is its creator's to delete
        sweep_leftovers(parent)  # copies of readers gone (a DataLoader worker killed) go before one more is made
        try:
            # Locked for its life: how other processes (in any PID namespace) tell it is in use.
            self.dir, self._lock = locked_dir(parent, f".ranges-{self.pid}-")
        except OSError as exc:
            if isinstance(exc, StoreIOError):
                raise
            raise StoreIOError(f"{parent}: {exc}") from exc
        _LIVE[self.dir] = self.pid
        _delete_at_exit()
        self.fetched_bytes = self.requests = 0
        ranged = RANGED_FILES[info.backend]
        try:
            self._fetch_small([f for f in info.files if not ranged(f.path)])
            for f in info.files:
                if ranged(f.path):  # sparse: only the spans fetched take space
                    path = self.dir / f.path
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    try:
                        os.ftruncate(fd, f.bytes)
                    finally:
                        os.close(fd)
            self.store: Any = open_store(self.dir, verify_reads=verify_reads)
            if len(self.store) != info.count or self.store.backend != info.backend:
                self.store.close()
                raise CorruptStoreError(
                    f"shard {info.name} holds {len(self.store)} {self.store.backend} records; "
                    f"the manifest says {info.count} {info.backend}"
                )
        except BaseException as exc:
            self._delete()
            if isinstance(exc, OSError) and not isinstance(exc, StoreIOError):
                raise StoreIOError(f"{self.dir}: {exc}") from exc
            raise
        self.have = np.zeros(info.count, dtype=bool)  # records whose spans are here

    def _fetch_small(self, files: list[Any]) -> None:
        problem = ""
        for _attempt in range(_ATTEMPTS):
            for old in self.dir.iterdir():  # a damaged first copy; the folder (and its lock) stays
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            try:
                problem = fetch_files(self.location, self.info.name, files, self.dir)
            except StoreNotFoundError as exc:
                raise CorruptStoreError(f"shard {self.info.name} of {self.location.url} lacks a file: {exc}") from exc
            self.fetched_bytes += sum(f.bytes for f in files)
            self.requests += len(files)
            if not problem:
                return
        raise CorruptStoreError(
            f"shard {self.info.name} of {self.location.url}: {problem} (fetched {_ATTEMPTS} times; nothing kept)"
        )

    def read(self, local: np.ndarray, one: bool, size: tuple[int, int] | None = None) -> tuple[Any, Any]:
        """Records ``local`` of this shard (``one``: ``local[0]`` as ``get`` returns it), fetched first if missing."""
        for attempt in range(_ATTEMPTS):
            self._fill(local)
            try:
                got: tuple[Any, Any] = self.store.get(int(local[0])) if one else self.store.get_many(local, size=size)
                return got
            except CorruptStoreError:
                self.have[local] = False  # fetched again (once), never read again as they are
                if attempt + 1 == _ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _fill(self, local: np.ndarray) -> None:
        need = np.unique(local[~self.have[local]])
        if not need.size:
            return
        rels, starts, ends = self.store.byte_spans(need)  # in file order: the index is
        merged: list[list[Any]] = []
        for rel, start, end in zip(rels, starts.tolist(), ends.tolist(), strict=True):
            if merged and merged[-1][0] == rel and start <= merged[-1][2] + MERGE_GAP:
                merged[-1][2] = max(merged[-1][2], end)
            else:
                merged.append([rel, start, end])
        try:
            got = self.location.read_ranges(self.info.name, *(list(column) for column in zip(*merged, strict=True)))
        except (StoreIOError, StoreNotFoundError) as exc:
            self._check_remote({rel for rel, _start, _end in merged}, exc)
            raise
        self.requests += len(merged)
        for (rel, start, end), data in zip(merged, got, strict=True):
            if len(data) != end - start:
                raise CorruptStoreError(
                    f"shard {self.info.name} of {self.location.url}: {rel} ends before byte {end} "
                    "(truncated or replaced)"
                )
            self._write(rel, start, data)
            self.fetched_bytes += len(data)
        self.have[need] = True

    def _check_remote(self, rels: set[str], failure: Exception) -> None:
        """CorruptStoreError if a file a ranged read failed on is missing or not the size the manifest says (a
        range past a truncated object's end is HTTP 416, not a network fault)."""
        sizes = {f.path: f.bytes for f in self.info.files}
        for rel in sorted(rels):
            try:
                size = self.location.remote_size(self.info.name, rel)
            except StoreIOError:
                return  # the server is not answering: the failure stands as it is
            where = f"shard {self.info.name} of {self.location.url}: {rel}"
            if size is None:
                raise CorruptStoreError(f"{where} is missing (the manifest lists it)") from failure
            if size != sizes[rel]:
                raise CorruptStoreError(
                    f"{where} is {size} bytes, the manifest says {sizes[rel]} (truncated or replaced)"
                ) from failure

    def _write(self, rel: str, start: int, data: bytes) -> None:
        try:
            fd = os.open(self.dir / rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, start)
                    view, start = view[written:], start + written
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk, the copy deleted under us: not the data's fault
            raise StoreIOError(f"{self.dir / rel}: {exc}") from exc

    def intact(self) -> bool:
        """Whether the partial copy is still where it was made (not deleted under this reader)."""
        try:
            here, mine = os.stat(self.dir, follow_symlinks=False), os.fstat(self._lock)
        except OSError:
            return False
        return (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev)

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.pid == os.getpid():
                self._delete()

    def _delete(self) -> None:
        _LIVE.pop(self.dir, None)
        shutil.rmtree(self.dir, ignore_errors=True)
        lock, self._lock = self._lock, -1
        if lock >= 0:
            unlock_dir(lock)


# This process's partial copies (folder -> creator's PID), deleted at its exit even if never closed: a
# DataLoader worker never closes its dataset. A forked child inherits the dict, and deletes only its own.
_LIVE: dict[Path, int] = {}
_HOOKED: list[int] = []  # the PID whose exit is hooked


def _delete_at_exit() -> None:
    if _HOOKED == [os.getpid()]:
        return
    _HOOKED[:] = [os.getpid()]
    # multiprocessing's children (DataLoader workers) leave by os._exit after running its finalizers
    # (exitpriority set), never atexit's; other processes run atexit.
    multiprocessing.util.Finalize(None, _delete_mine, exitpriority=100)
    atexit.register(_delete_mine)


def _delete_mine() -> None:
    pid = os.getpid()
    for path, owner in list(_LIVE.items()):
        if owner == pid:
            _LIVE.pop(path, None)
            shutil.rmtree(path, ignore_errors=True)
