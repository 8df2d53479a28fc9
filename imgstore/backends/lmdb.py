"""LMDB backend: one key per image, the raw pixels and the label as its value; no pickle.

Keys are the index as 8 big-endian bytes, so key order is index order and appends use LMDB's
fast append mode. The map grows by itself: a write that would not fit grows the map first (and a
``MapFullError`` that still happens grows it and retries), so ``map_size`` is never the user's problem.
"""

from __future__ import annotations

import os
import threading

import lmdb
import numpy as np

from imgstore.errors import CorruptStoreError, StoreBusyError
from imgstore.fileio import reserve
from imgstore.store import Store

_KEY = np.dtype(">u8")
_MAX_READERS = 512  # concurrent reading threads across all processes
_WRITE_BLOCK = 4096  # records assembled per putmulti call
_INITIAL_MAP_SIZE = 64 << 20  # address space only; it doubles as the data grows


class _SharedEnv:
    """The one LMDB environment of a directory in this process, shared by every store handle on it.

    LMDB forbids opening an environment twice in one process (its fcntl locks are per process), and
    forbids using one across ``fork()``. So handles share an environment, and before any fork the
    environments are closed, to be reopened lazily on first use in the parent and in the child.
    """

    def __init__(self, path: str, readonly: bool, sync: bool) -> None:
        self.path, self.readonly, self.sync = path, readonly, sync
        # A directory this process cannot write (read-only media, a shared dataset) has no usable
        # lock file; without one LMDB must not track readers, and no writer can be there anyway.
        self.lock = os.access(os.path.join(path, "lock.mdb"), os.W_OK) or (
            not os.path.exists(os.path.join(path, "lock.mdb")) and os.access(path, os.W_OK)
        )
        self.users = 0
        self._env: lmdb.Environment | None = None

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            self._env = lmdb.open(
                self.path,
                map_size=_INITIAL_MAP_SIZE,
                readonly=self.readonly,
                create=False,
                max_dbs=0,
                sync=self.sync,
                metasync=self.sync,
                meminit=False,  # never write uninitialised memory to disk pages
                max_readers=_MAX_READERS,
                lock=self.lock,
            )
            if not self.readonly and self.lock:
                # Free reader slots that exited processes (e.g. short-lived DataLoader workers) left.
                self._env.reader_check()
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


_shared: dict[str, _SharedEnv] = {}
_shared_lock = threading.Lock()


def _close_all_before_fork() -> None:
    for shared in _shared.values():
        shared.close()


os.register_at_fork(before=_close_all_before_fork)


class LmdbStore(Store):
    name = "lmdb"
    damage_errors = (lmdb.Error,)

    def _open(self, create: bool) -> None:
        path = self.path / "lmdb"
        if create:
            path.mkdir()
        key = os.path.realpath(path)
        with _shared_lock:
            shared = _shared.get(key)
            if shared is None:
                readonly = not self.writable and not os.access(path, os.W_OK)
                shared = _shared[key] = _SharedEnv(key, readonly, self.sync)
            shared.users += 1
        self._shared = shared
        if self.writable and shared.readonly:
            self._close()
            raise StoreBusyError(f"{path} is open read-only in this process; close those handles to write")
        try:
            info = shared.env.info()  # open now, so a damaged store fails at open_store, not at the first read
            # A data file shorter than the pages LMDB uses would fault (SIGBUS) when those are read.
            if os.path.getsize(path / "data.mdb") < (info["last_pgno"] + 1) * shared.env.stat()["psize"]:
                raise CorruptStoreError(f"{path / 'data.mdb'} is truncated")
        except (lmdb.Error, OSError, CorruptStoreError) as exc:
            self._close()
            if isinstance(exc, CorruptStoreError):
                raise
            raise CorruptStoreError(f"{path} cannot be opened as LMDB: {exc}") from exc

    def _close(self) -> None:
        with _shared_lock:
            self._shared.users -= 1
            if self._shared.users == 0:
                self._shared.close()
                del _shared[self._shared.path]

    def _reopen_after_fork(self) -> None:
        pass  # environments were closed before the fork and reopen on first use

    @property
    def _env(self) -> lmdb.Environment:
        return self._shared.env

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        n = len(images)
        record = np.dtype([("image", np.uint8, images.shape[1:]), ("label", "<i8")])
        self._ensure_room(n, record.itemsize)
        # Values are assembled in a reused buffer, a block at a time: LMDB copies each value at put.
        block = np.empty(min(n, _WRITE_BLOCK), dtype=record)
        values = memoryview(block).cast("B")
        size = record.itemsize
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    cursor = txn.cursor()
                    # Records past the committed count are leftovers of a crashed write: drop them.
                    if cursor.set_range(start.to_bytes(8, "big")):
                        while cursor.delete():
                            pass
                    for lo in range(0, n, len(block)):
                        hi = min(lo + len(block), n)
                        block["image"][: hi - lo] = images[lo:hi]
                        block["label"][: hi - lo] = labels[lo:hi]
                        cursor.putmulti(
                            (((start + lo + k).to_bytes(8, "big"), values[k * size : (k + 1) * size]) for k in range(hi - lo)),
                            append=True,
                        )
                if self.sync and not self._shared.sync:
                    self._env.sync(True)  # the environment was opened without sync by another handle
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _ensure_room(self, n: int, record_size: int) -> None:
        """Grow the map ahead of a write so the common case never hits MapFullError."""
        info, stat = self._env.info(), self._env.stat()
        page = stat["psize"]
        used = (info["last_pgno"] + 1) * page
        # A value larger than half a page sits on its own overflow pages; add room for the tree.
        per_record = -(-(record_size + 16) // page) * page + 64
        needed = used + 2 * n * per_record + (1 << 20)
        if needed > info["map_size"]:
            self._env.set_mapsize(max(needed, 2 * info["map_size"]))
        data = self.path / "lmdb" / "data.mdb"
        reserve(data, max(0, used + n * per_record + (1 << 20) - data.stat().st_size))

    # -------------------------------------------------------------- reading

    def _begin(self) -> lmdb.Transaction:
        try:
            return self._env.begin(buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            return self._env.begin(buffers=True)

    # Reads copy each value straight from LMDB's memory map into the caller's arrays through
    # memoryview slices: no per-image numpy object, which halves the time of a scan.

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        pixels, label_bytes = memoryview(images).cast("B"), memoryview(labels).cast("B")
        size = images[0].nbytes
        keys = memoryview(indices.astype(_KEY)).cast("B")
        with self._begin() as txn:
            get = txn.get
            for k in range(len(indices)):
                value = get(keys[8 * k : 8 * k + 8])
                if value is None or len(value) != size + 8:
                    raise self._missing_record(int(indices[k]), value)
                pixels[k * size : (k + 1) * size] = value[:size]
                label_bytes[8 * k : 8 * k + 8] = value[size:]

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        pixels, label_bytes = memoryview(images).cast("B"), memoryview(labels).cast("B")
        size = images[0].nbytes
        count = stop - start
        k = 0
        with self._begin() as txn:
            cursor = txn.cursor()
            cursor.set_key(start.to_bytes(8, "big"))
            for value in cursor.iternext(keys=False, values=True):
                if k == count:
                    break
                if len(value) != size + 8:
                    raise self._missing_record(start + k, value)
                pixels[k * size : (k + 1) * size] = value[:size]
                label_bytes[8 * k : 8 * k + 8] = value[size:]
                k += 1
        if k != count:
            raise self._missing_record(start + k, None)

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.shape, dtype=np.uint8)
        size = image.nbytes
        with self._begin() as txn:
            value = txn.get(index.to_bytes(8, "big"))
            if value is None or len(value) != size + 8:
                raise self._missing_record(index, value)
            memoryview(image).cast("B")[:] = value[:size]
            return image, int.from_bytes(value[size:], "little")

    def _missing_record(self, index: int, value: memoryview | None) -> CorruptStoreError:
        found = "no record" if value is None else f"a record of {len(value)} bytes"
        return CorruptStoreError(f"{self.path}: image {index} is committed but LMDB holds {found}")
