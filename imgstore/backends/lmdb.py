"""LMDB backend: blocks of consecutive images, each one LMDB value of raw pixels then labels; no pickle.

Encoded stores (JPEG, PNG, WebP bytes...) keep one value per image instead: its label, then its bytes.

Keys are the block number as 8 big-endian bytes, so key order is index order and appends use
LMDB's fast append mode. A write rewrites the partly filled last block, if any, in the same
transaction. The map grows by itself: a write that would not fit grows the map first (and a
``MapFullError`` that still happens grows it and retries), so ``map_size`` is never the user's problem.

liblmdb kills the process (SIGABRT, SIGBUS) on a damaged page, so no transaction walks pages that
were not checked first (lmdb_pages): a damaged store is a ``CorruptStoreError``.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np

from imgstore.arguments import io_error
from imgstore.backends.lmdb_pages import Snapshot, SnapshotMoved
from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError
from imgstore.fileio import back_with_blocks, release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

try:  # py-lmdb >= 3 identifies an open environment by its files (see _registry_keys)
    from lmdb._envid import env_keys as _lmdb_env_keys
except ImportError:  # pragma: no cover - older py-lmdb
    _lmdb_env_keys = None  # type: ignore[assignment]

_MAX_READERS = 512  # concurrent reading threads across all processes
_OVERFLOW_HEADER = 16  # bytes LMDB puts before a large value on its overflow pages
# Address space only (a file mapping: no memory is committed, and the file does not grow with it).
# So large that the map practically never has to grow: growing it (set_mapsize, in the writer, or
# in a reader adopting what another process grew) cancels every transaction of the environment,
# other threads' reads in progress included. Past it, the map still doubles as the data grows.
_INITIAL_MAP_SIZE = 1 << 40
# LMDB's lock file is a header, then 64 bytes per reader slot (32 896 bytes for 512 readers on
# x86-64); it is mapped and written through the mapping. This covers it, header room to spare.
_LOCK_FILE_BYTES = 36 << 10
_NO_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
_SNAPSHOTS_KEPT = 4  # checked snapshots an environment remembers (threads may read different ones)
_SNAPSHOT_TRIES = 8  # transactions begun before a damaged meta page is told from a busy writer


class _SharedEnv:
    """The one LMDB environment of a directory in this process, shared by every store handle on it.

    LMDB forbids opening an environment twice in one process (its fcntl locks are per process), and
    forbids using one across ``fork()``. So handles share an environment, opened on first use; a
    forked child sets the one it inherited aside, never to use, close or free it (see
    :func:`_after_fork_in_child`), and opens its own on first use. Nothing is closed for a fork:
    the parent's threads go on reading.
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
        self.keys: tuple[object, ...] = ()  # the environment's entries in py-lmdb's set of open ones
        self.opening = threading.Lock()
        # liblmdb aborts the process on a damaged page, so every snapshot a transaction reads is
        # checked first (lmdb_pages): by transaction id. Kept through a fork: the file is the same.
        self.snapshots: dict[int, Snapshot] = {}
        self.checking = threading.Lock()
        self.psize = 0

    @property
    def env(self) -> lmdb.Environment:
        env = self._env
        return env if env is not None else self._open_env()

    def _open_env(self) -> lmdb.Environment:
        with self.opening:  # one open per process, even when two threads read first at once
            if self._env is None:
                if self.lock:
                    _back_lock_file(self.path)
                # Taken before opening: a fork from here on must take them out in the child.
                self.keys = _registry_keys(self.path)
                try:
                    env = lmdb.open(
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
                except BaseException:
                    self.keys = ()
                    raise
                if not self.readonly and self.lock:
                    try:  # free reader slots that exited processes (e.g. short-lived DataLoader workers) left
                        env.reader_check()
                    except BaseException:
                        env.close()
                        self.keys = ()
                        raise
                self.psize = env.stat()["psize"]
                self._env = env
            return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self.keys = ()

    def snapshot(self, txnid: int) -> Snapshot | None:
        """Snapshot ``txnid``, checked (a transaction of it must be open); None if its meta page was rewritten."""
        pages = self.snapshots.get(txnid)
        if pages is None:
            with self.checking:  # one check of a snapshot, whichever thread reads it first
                pages = self.snapshots.get(txnid)
                if pages is None:
                    try:
                        path, psize = os.path.join(self.path, "data.mdb"), self.psize or self.env.stat()["psize"]
                        pages = Snapshot(path, psize, txnid, self.snapshots.get(txnid - 1))
                    except SnapshotMoved:
                        return None
                    while len(self.snapshots) >= _SNAPSHOTS_KEPT:
                        del self.snapshots[min(self.snapshots)]
                    self.snapshots[txnid] = pages
        return pages


_shared: dict[str, _SharedEnv] = {}
_shared_lock = threading.Lock()

# In a forked child, the environments it inherited from its parent. Closing one there (or freeing
# it, which closes it) aborts the transactions still linked to it, the reads the parent's threads
# have in progress: that marks their reader slots in the lock file, shared with the parent, ended
# and free, so a writer may reuse the pages they are reading; and it waits for LMDB calls that
# were in flight in those threads, which never end in the child. So they are kept, pinned by a
# reference never given back so that not even the interpreter's exit frees them.
_inherited: list[lmdb.Environment] = []
# py-lmdb's set of the environments open in this process, which refuses to open one twice; found
# before the first fork (gc.get_objects, once), so a child can take the inherited ones out of it.
_registry: set[object] | None = None
_registry_searched = False


def _registry_keys(path: str) -> tuple[object, ...]:
    """What py-lmdb puts in its set of open environments for the environment at ``path``."""
    if _lmdb_env_keys is not None:  # py-lmdb >= 3: the (st_dev, st_ino) of data.mdb and lock.mdb
        return tuple(_lmdb_env_keys(path, True))  # type: ignore[no-untyped-call]
    if int(lmdb.__version__.split(".")[0]) >= 2:  # pragma: no cover - py-lmdb 2: the resolved path
        return (os.path.realpath(path),)
    return ()  # pragma: no cover - py-lmdb 1 has no such set


def _find_registry_before_fork() -> None:
    """Find py-lmdb's set of open environments (once): the one set that holds an open environment's
    keys and only keys of their kind. It is not reachable otherwise; a child inherits the reference."""
    global _registry, _registry_searched
    if _registry_searched:
        return
    keys = next((shared.keys for shared in list(_shared.values()) if shared.keys), ())
    if not keys:
        return  # nothing open: nothing for a child to take out
    _registry_searched = True
    kind = type(keys[0])
    try:
        found = [
            obj
            for obj in gc.get_objects()
            if type(obj) is set and obj.issuperset(keys) and all(type(key) is kind for key in obj)
        ]
    except Exception:  # pragma: no cover - a hook must not break fork()
        found = []
    _registry = found[0] if len(found) == 1 else None


def _after_fork_in_child() -> None:
    """Set the inherited environments aside (see ``_inherited``); each opens anew on first use."""
    global _shared_lock
    _shared_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    for shared in list(_shared.values()):
        shared.opening = threading.Lock()
        shared.checking = threading.Lock()
        for pages in list(shared.snapshots.values()):
            pages.after_fork()
        env, shared._env = shared._env, None
        if env is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(env))
            _inherited.append(env)
        if _registry is not None:
            _registry.difference_update(shared.keys)  # this process may open the files again
        shared.keys = ()


os.register_at_fork(before=_find_registry_before_fork, after_in_child=_after_fork_in_child)


def _back_lock_file(directory: str) -> None:
    """Give LMDB's lock file disk blocks before LMDB maps it and writes through the mapping.

    LMDB sizes a new lock file with ``ftruncate`` (a hole) and writes its header and reader slots
    through a shared mapping: on a full disk the first store to a page without a block kills the
    process with SIGBUS (when a store is created, or when a reader takes a slot on a page no reader
    took before). With the blocks claimed first, a full disk is a :class:`StoreFullError` here.
    """
    lock = os.path.join(directory, "lock.mdb")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in _NO_ACCESS_ERRNOS:
            return  # LMDB opens it read-only, or not at all (lock=False)
        raise io_error(exc, f"opening {lock}") from exc
    try:
        back_with_blocks(fd, max(os.fstat(fd).st_size, _LOCK_FILE_BYTES), lock)
    except OSError as exc:
        raise io_error(exc, f"claiming disk space for {lock}") from exc
    finally:
        os.close(fd)


def _start_data_file(path: Path) -> None:
    """An empty ``data.mdb`` with disk blocks for the two meta pages LMDB writes when it creates the environment."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            back_with_blocks(fd, 2 * mmap.PAGESIZE, path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise io_error(exc, f"creating {path}") from exc


class LmdbStore(Store):
    name = "lmdb"
    # Records are grouped in blocks of about block_bytes (64 KiB: 16 whole pages for CIFAR): one
    # key per image would put each 3 080-byte record on its own 4 096-byte page (a third more
    # disk) and cost a B-tree lookup per image in a scan.
    option_specs = {"block_bytes": Option(1 << 16, 1, 1 << 30, fixed=True)}
    damage_errors = (lmdb.Error,)
    files = ("lmdb",)

    def _open(self, create: bool) -> None:
        path = self.file("lmdb")
        if create:
            path.mkdir()
            _start_data_file(path / "data.mdb")
        key = os.path.realpath(path)
        with _shared_lock:
            shared = _shared.get(key)
            if shared is None:
                readonly = not self.writable and not os.access(path, os.W_OK)
                shared = _shared[key] = _SharedEnv(key, readonly, self.sync)
            shared.users += 1
        self._shared = shared
        self._per_block = 0  # records per block, known once the image shape is
        if self.writable and shared.readonly:
            self._close()
            raise StoreBusyError(f"{path} is open read-only in this process; close those handles to write")
        try:
            info = shared.env.info()  # open now, so a damaged store fails at open_store, not at the first read
            # A data file shorter than the pages LMDB uses would fault (SIGBUS) when those are read.
            if os.path.getsize(path / "data.mdb") < (info["last_pgno"] + 1) * shared.env.stat()["psize"]:
                raise CorruptStoreError(f"{path / 'data.mdb'} is truncated")
            self._check_snapshot()
        except (lmdb.Error, OSError, CorruptStoreError) as exc:
            self._close()
            if isinstance(exc, ImgStoreError):  # damage, or a full disk (StoreFullError)
                raise
            raise CorruptStoreError(f"{path} cannot be opened as LMDB: {exc}") from exc

    def _close(self) -> None:
        with _shared_lock:
            self._shared.users -= 1
            if self._shared.users == 0:
                self._shared.close()
                del _shared[self._shared.path]

    def _reopen_after_fork(self) -> None:
        pass  # the child set its inherited environments aside at the fork and opens its own on first use

    def _refresh(self, old_count: int) -> None:
        self._check_snapshot()  # new commits: a damaged page is an error of refresh(), not of a later read

    def _check_snapshot(self) -> None:
        """Check the newest snapshot's pages now (all of them in a small store), not at the first read."""
        txn, pages = self._begin()
        with txn:
            pages.check_if_few()

    @property
    def _env(self) -> lmdb.Environment:
        return self._shared.env

    # -------------------------------------------------------------- layout

    def _layout(self, image_nbytes: int) -> tuple[int, int]:
        """(image bytes, records per block) for this store."""
        per_block = max(1, (self.options["block_bytes"] - _OVERFLOW_HEADER) // (image_nbytes + 8))
        return image_nbytes, per_block

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        size, per_block = self._layout(images[0].nbytes)
        first_block, stop = start // per_block, start + len(images)
        self._ensure_room(len(images) * (size + 8) + self.options["block_bytes"])
        pixels = images.data.cast("B")
        label_bytes = np.ascontiguousarray(labels, dtype="<i8").data.cast("B")
        while True:
            try:
                with self._env.begin(write=True, buffers=True) as txn:
                    self._check_tail(txn, first_block)
                    cursor = txn.cursor()
                    # The committed records of a partly filled last block are rewritten with the new ones.
                    kept = start - first_block * per_block
                    head = bytes(txn.get(_key(first_block)) or b"") if kept else b""
                    if kept and len(head) < kept * (size + 8):
                        raise CorruptStoreError(f"{self.path}: block {first_block} holds fewer records than committed")
                    # Blocks past the committed count are leftovers of a crashed write: drop them.
                    if cursor.set_range(_key(first_block)):
                        while cursor.delete():
                            pass
                    for block in range(first_block, (stop - 1) // per_block + 1):
                        lo = max(start, block * per_block) - start  # offsets into this call's arrays
                        hi = min(stop, (block + 1) * per_block) - start
                        held = len(head) // (size + 8)  # may exceed kept: a crashed write's records
                        old = (
                            (head[: kept * size], head[held * size : held * size + kept * 8])
                            if block == first_block
                            else (b"", b"")
                        )
                        value = b"".join((old[0], pixels[lo * size : hi * size], old[1], label_bytes[lo * 8 : hi * 8]))
                        cursor.put(_key(block), value, append=True)
                if self.sync and not self._shared.sync:
                    self._env.sync(True)  # the environment was opened without sync by another handle
                release_reserve(self.file("lmdb") / "data.mdb")
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:  # damage the page checks did not see
                raise CorruptStoreError(f"{self.path} is damaged: {exc}") from exc

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        # Encoded stores: one value per record (key: its index), its label's 8 bytes then its bytes.
        # Encoded images are large (a photo: ~100 KB, LMDB overflow pages of its own), so blocks
        # would save nothing and cost a copy of the block per read.
        total = sum(len(blob) for blob in blobs)
        self._ensure_room(total + len(blobs) * (8 + 2 * _OVERFLOW_HEADER + 64))
        label_bytes = np.ascontiguousarray(labels, dtype="<i8").tobytes()
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    self._check_tail(txn, start)
                    cursor = txn.cursor()
                    if cursor.set_range(_key(start)):  # leftovers of a crashed write
                        while cursor.delete():
                            pass
                    for k, blob in enumerate(blobs):
                        cursor.put(_key(start + k), label_bytes[8 * k : 8 * k + 8] + blob, append=True)
                if self.sync and not self._shared.sync:
                    self._env.sync(True)
                release_reserve(self.file("lmdb") / "data.mdb")
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except (lmdb.CorruptedError, lmdb.PageNotFoundError) as exc:  # damage the page checks did not see
                raise CorruptStoreError(f"{self.path} is damaged: {exc}") from exc

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        labels = np.empty(len(indices), dtype=np.int64)
        blobs: list[bytes] = []
        txn, pages = self._begin()
        with txn:
            pages.check_keys(indices)
            get = txn.get
            for k, index in enumerate(indices.tolist()):
                value = get(index.to_bytes(8, "big"))
                if value is None or len(value) < 9:
                    raise CorruptStoreError(f"{self.path}: image {index} is committed but missing or empty")
                labels[k] = int.from_bytes(value[:8], "little", signed=True)
                blobs.append(bytes(value[8:]))
        return blobs, labels

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        labels = np.empty(stop - start, dtype=np.int64)
        blobs: list[bytes] = []
        txn, pages = self._begin()
        with txn:
            pages.check_range(start, stop)  # the cursor takes the record after the range too
            cursor = txn.cursor()
            if cursor.set_key(_key(start)):
                for key, value in cursor.iternext():
                    index = start + len(blobs)
                    if index == stop or bytes(key) != _key(index) or len(value) < 9:
                        break
                    labels[len(blobs)] = int.from_bytes(value[:8], "little", signed=True)
                    blobs.append(bytes(value[8:]))
        if len(blobs) != stop - start:
            raise CorruptStoreError(f"{self.path}: image {start + len(blobs)} is committed but missing")
        return blobs, labels

    def _ensure_room(self, nbytes: int) -> None:
        """Grow the map, and reserve disk blocks, ahead of a write: no MapFullError, no full disk mid-commit."""
        info, stat = self._env.info(), self._env.stat()
        page = stat["psize"]
        used = (info["last_pgno"] + 1) * page
        needed = used + 2 * (nbytes + nbytes // 16) + (1 << 20)  # x2: copy-on-write keeps old pages until commit
        if needed > info["map_size"]:
            self._env.set_mapsize(max(needed, 2 * info["map_size"]))
        data = self.file("lmdb") / "data.mdb"
        reserve(data, used + nbytes + nbytes // 16 + (1 << 20) - data.stat().st_size)

    # -------------------------------------------------------------- reading

    def _begin(self) -> tuple[lmdb.Transaction, Snapshot]:
        """A read transaction, and its snapshot with the pages checked that liblmdb walks first (the
        caller checks the leaf pages it reads: see lmdb_pages)."""
        for _ in range(_SNAPSHOT_TRIES):
            txn = self._begin_txn()
            try:
                pages = self._shared.snapshot(txn.id())
            except BaseException:
                txn.abort()
                raise
            if pages is not None:
                return txn, pages
            txn.abort()  # a writer committed twice since the transaction began: begin on its newest
        raise CorruptStoreError(f"{self.path}: LMDB's meta pages do not hold the snapshot it reads")

    def _begin_txn(self) -> lmdb.Transaction:
        try:
            return self._env.begin(buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            return self._env.begin(buffers=True)
        except lmdb.ReadersFullError:
            if not self._shared.lock:
                raise
            self._env.reader_check()  # slots that killed processes (e.g. DataLoader workers) left are free again
            return self._env.begin(buffers=True)

    def _check_tail(self, txn: lmdb.Transaction, first: int) -> None:
        """Before a write deletes the records from key ``first`` on and appends: the pages it walks.

        A write transaction starts from the newest snapshot, whose meta page cannot change while it
        holds LMDB's writer lock."""
        pages = self._shared.snapshot(txn.id() - 1)
        if pages is None:
            raise CorruptStoreError(f"{self.path}: LMDB's meta pages do not hold the snapshot it writes on")
        pages.check_tail(first)

    # A block's value is its images' pixels, then their labels; reads copy slices of it straight
    # from LMDB's memory map into the caller's arrays, one block at a time for scans.

    def _records(self, value: bytes | memoryview | None, block: int, size: int, per_block: int) -> int:
        """How many records ``value`` holds, after checking its length."""
        count = len(value) // (size + 8) if value is not None else 0
        if value is None or len(value) != count * (size + 8) or not 1 <= count <= per_block:
            found = "nothing" if value is None else f"{len(value)} bytes"
            raise CorruptStoreError(f"{self.path}: block {block} of the LMDB store holds {found}")
        return count

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        # The loop of a shuffled batch: every image is one get, so the checks of _records are
        # inlined (a method call per image costs a third of the time).
        size, per_block = self._layout(images[0].nbytes)
        record = size + 8
        pixels, label_bytes = images.data.cast("B"), labels.data.cast("B")
        blocks, rows = np.divmod(indices, per_block)
        txn, pages = self._begin()
        with txn:
            pages.check_keys(blocks)
            get = txn.get
            at = 0
            for block, row in zip(blocks.tolist(), rows.tolist(), strict=True):
                value = get(block.to_bytes(8, "big"))
                length = len(value) if value is not None else 0
                count = length // record
                if row >= count or length != count * record or count > per_block:
                    self._records(value, block, size, per_block)  # raises if the block is damaged
                    raise CorruptStoreError(f"{self.path}: image {block * per_block + row} is committed but missing")
                # value is not None here (count > row >= 0); typing cannot see it, and a check costs.
                pixels[at * size : at * size + size] = value[row * size : row * size + size]  # type: ignore[index]
                label = count * size + 8 * row
                label_bytes[8 * at : 8 * at + 8] = value[label : label + 8]  # type: ignore[index]
                at += 1

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        size, per_block = self._layout(images[0].nbytes)
        pixels, label_bytes = images.data.cast("B"), labels.data.cast("B")
        block, done = start // per_block, start  # done: records up to here are copied
        txn, pages = self._begin()
        with txn:
            pages.check_range(block, (stop - 1) // per_block)
            cursor = txn.cursor()
            values = cursor.iternext(keys=False, values=True) if cursor.set_key(_key(block)) else iter(())
            for value in values:
                first = block * per_block
                count = self._records(value, block, size, per_block)
                hi = min(stop, first + count)
                if hi <= done:
                    break  # a short block: the records after it are missing
                lo = done - first
                pixels[(done - start) * size : (hi - start) * size] = value[lo * size : (hi - first) * size]
                label_bytes[(done - start) * 8 : (hi - start) * 8] = value[
                    count * size + lo * 8 : count * size + (hi - first) * 8
                ]
                done, block = hi, block + 1
                if done == stop or count < per_block:
                    break
        if done != stop:
            raise CorruptStoreError(f"{self.path}: image {done} is committed but missing from the LMDB store")

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        # The hot path of a shuffled epoch: the checks of _records inlined.
        image = np.empty(self.image_shape, dtype=np.uint8)
        size = image.nbytes
        per_block = self._per_block or self._layout(size)[1]
        self._per_block = per_block
        block, row = divmod(index, per_block)
        txn, pages = self._begin()
        with txn:
            pages.check_key(block)
            value = txn.get(block.to_bytes(8, "big"))
            count = len(value) // (size + 8) if value is not None else 0
            if row >= count or len(value) != count * (size + 8):  # type: ignore[arg-type]
                self._records(value, block, size, per_block)
                raise CorruptStoreError(f"{self.path}: image {index} is committed but missing")
            # value is not None here (count > row >= 0); typing cannot see it, and a check costs.
            image.data.cast("B")[:] = value[row * size : (row + 1) * size]  # type: ignore[index]
            at = count * size + 8 * row
            return image, int.from_bytes(value[at : at + 8], "little")  # type: ignore[index]


def _key(block: int) -> bytes:
    return block.to_bytes(8, "big")  # big-endian: key order is block order, so appends are cheap
