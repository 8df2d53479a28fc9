"""LMDB backend: blocks of consecutive images, each one LMDB value of raw pixels then labels; no pickle.

Encoded stores (JPEG, PNG, WebP bytes...) keep one value per image instead: its label, then its bytes.

Keys are the block number as 8 big-endian bytes, so key order is index order and appends use
LMDB's fast append mode. A write rewrites the partly filled last block, if any, in the same
transaction. The map grows by itself: a write that would not fit grows the map first (and a
``MapFullError`` that still happens grows it and retries), so ``map_size`` is never the user's problem.

liblmdb kills the process (SIGABRT, SIGBUS) on a damaged page, so no transaction walks pages that
were not checked first (lmdb_pages): a damaged store is a ``CorruptStoreError``.

The environment itself (one per directory in a process, shared by the store handles on it and set
aside in a forked child) and the snapshots it has checked are lmdb_env's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import lmdb
import numpy as np

from imgstore.backends.lmdb_env import acquire, release, start_data_file
from imgstore.backends.lmdb_mapped import MappedBlocks
from imgstore.backends.lmdb_pages import Snapshot
from imgstore.backends.pixel_blocks import copy_rows, one_record, records_in
from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError
from imgstore.fileio import release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

_OVERFLOW_HEADER = 16  # bytes LMDB puts before a large value on its overflow pages
# Address space only (a file mapping: no memory is committed, and the file does not grow with it).
# So large that the map practically never has to grow: growing it (set_mapsize, in the writer, or
# in a reader adopting what another process grew) cancels every transaction of the environment,
# other threads' reads in progress included. Past it, the map still doubles as the data grows.
_INITIAL_MAP_SIZE = 1 << 40
_SNAPSHOT_TRIES = 8  # transactions begun before a damaged meta page is told from a busy writer


class LmdbStore(Store):
    name = "lmdb"
    # Records are grouped in blocks of about block_bytes (64 KiB: 16 whole pages for CIFAR): one
    # key per image would put each 3 080-byte record on its own 4 096-byte page (a third more
    # disk) and cost a B-tree lookup per image in a scan.
    option_specs = {"block_bytes": Option(1 << 16, 1, 1 << 30, fixed=True)}
    damage_errors = (lmdb.Error,)
    files = ("lmdb",)
    readers = ("py-lmdb and the lmdb C tools (key: index, 8 bytes big-endian)",)
    caveats = ()

    def _open(self, create: bool) -> None:
        path = self.file("lmdb")
        if create:
            path.mkdir()
            start_data_file(path / "data.mdb")
        shared = self._shared = acquire(os.path.realpath(path), self.writable, self.sync, _INITIAL_MAP_SIZE)
        self._per_block = 0  # records per block, known once the image shape is
        self._mapped: MappedBlocks | None = None  # shuffled batches out of a map of data.mdb
        self._mapping = threading.Lock()  # threads reading at once make one map (another's descriptor would leak)
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
        if getattr(self, "_mapped", None) is not None:
            self._mapped.close()  # type: ignore[union-attr]
        release(self._shared)

    def _reopen_after_fork(self) -> None:
        self._mapping = threading.Lock()  # a thread of the parent may have held it at the fork
        # the child set its inherited environments aside at the fork (lmdb_env) and opens its own on first use

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

        def fill(txn: lmdb.Transaction) -> None:
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

        self._commit(fill, buffers=True)

    def _commit(self, fill: Callable[[Any], None], *, buffers: bool = False) -> None:
        """Run ``fill`` in one write transaction and commit it, growing the map and retrying if it is full."""
        while True:
            try:
                txn = self._env.begin(write=True, buffers=True) if buffers else self._env.begin(write=True)
                with txn:
                    fill(txn)
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

        def fill(txn: lmdb.Transaction) -> None:
            self._check_tail(txn, start)
            cursor = txn.cursor()
            if cursor.set_range(_key(start)):  # leftovers of a crashed write
                while cursor.delete():
                    pass
            for k, blob in enumerate(blobs):
                cursor.put(_key(start + k), label_bytes[8 * k : 8 * k + 8] + blob, append=True)

        self._commit(fill)

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
        return records_in(value, block, size, per_block, f"{self.path}: block {block} of the LMDB store")

    def _mapped_blocks(self, pages: Snapshot, indices: np.ndarray, per_block: int) -> MappedBlocks:
        """The map of data.mdb, once the leaf pages liblmdb would walk to find ``indices``' blocks are checked."""
        if pages.unchecked:
            pages.check_keys(indices // per_block)
        if self._mapped is None:
            with self._mapping:
                if self._mapped is None:
                    self._mapped = MappedBlocks(str(self.file("lmdb") / "data.mdb"), self._env.stat()["psize"])
        return self._mapped

    def _read_new(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = self.image_shape
        layout = self._layout(int(np.prod(shape)))
        txn, pages = self._begin()
        with txn:  # the gather copies out of the map inside the transaction
            got = self._mapped_blocks(pages, indices, layout[1]).gather(txn, self._env, indices, layout)
        if got is None:
            return super()._read_new(indices)
        return got[0].reshape(len(indices), *shape), got[1]

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        # The loop of a shuffled batch: every image is one get, so the checks of _records are
        # inlined (a method call per image costs a third of the time).
        size, per_block = layout = self._layout(images[0].nbytes)
        record = size + 8
        txn, pages = self._begin()
        with txn:
            mapped = self._mapped_blocks(pages, indices, per_block)
            if mapped.gather(txn, self._env, indices, layout, (images.reshape(len(indices), size), labels)) is not None:
                return
            pixels, label_bytes = images.data.cast("B"), labels.data.cast("B")
            blocks, rows = np.divmod(indices, per_block)
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
                copy_rows(value, count, size, done - first, hi - first, pixels, label_bytes, done - start)
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
            return image, one_record(value, count, size, row, image)  # type: ignore[arg-type]


def _key(block: int) -> bytes:
    return block.to_bytes(8, "big")  # big-endian: key order is block order, so appends are cheap
