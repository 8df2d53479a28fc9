"""LevelDB backend (plyvel): blocks of consecutive raw images per key, or one encoded record per key; no pickle.

Raw stores of one shape: key = block number (8 bytes, big-endian), value = the block's images'
pixels, then their int64 labels (little-endian), as the LMDB backend lays them out; a block holds
``max(1, block_bytes // (image bytes + 8))`` records. Encoded and varied-shape stores: key = image
index (8 bytes, big-endian), value = its label (int64, little-endian) then its bytes. Big-endian
keys sort in index order, so LevelDB's tables hold disjoint key ranges and its compactions are
trivial moves (a manifest edit), never a rewrite.

A write is a few ``WriteBatch`` es (about 4 MiB each); the imgstore manifest commits them. The
writer flushes LevelDB's memory table to a table file whenever 4 MiB are in its log and at close,
so a reader's view (leveldb_view: LevelDB admits one process per database) replays at most that
much of the log. Disk space for the log is reserved (``fileio.reserve``) and for a flush checked
before LevelDB writes: a LevelDB log append that fails half-way leaves a torn record that its
recovery, with ``paranoid_checks``, refuses.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import plyvel

from imgstore.backends.leveldb_tables import DirectTables
from imgstore.backends.leveldb_view import View, background_works, may_start_background, open_db, set_aside
from imgstore.backends.pixel_blocks import copy_rows, one_record, records_in
from imgstore.errors import CorruptStoreError, ImgStoreError, StoreFullError, StoreIOError
from imgstore.fileio import fsync_dir, release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

FLUSH_BYTES = 4 << 20  # log bytes after which a commit flushes the memory table (what a reader replays)
_BATCH_BYTES = 4 << 20  # values per WriteBatch (a batch is copied whole into the log and memory table)
_PAST_EVERY_KEY = b"\xff" * 9  # compacting this empty range only flushes the memory table


class LeveldbStore(Store):
    name = "leveldb"
    # 16 KiB blocks (5 CIFAR images): a shuffled get copies its whole block twice (LevelDB's
    # std::string, then Python bytes), a scan pays per value; measured in the README.
    option_specs = {"block_bytes": Option(1 << 14, 1, 1 << 30, fixed=True)}
    damage_errors = (plyvel.Error,)
    files = ("leveldb", "leveldb-views")
    # Readers' private views: a dead one is removed, links in it unfollowed (leveldb_view), never refused.
    link_check_depths = {"leveldb-views": 0}
    readers = ("plyvel.DB on the closed store's leveldb-<gen>/ (key: block or index, 8 bytes big-endian)",)
    caveats = (
        "plyvel sees a killed write's keys until a writer opens the store",
        "each reader opens a private view (hard links to the tables, copies of the log and manifest)",
        "on read-only media or a full disk each reader copies the whole database to $TMPDIR at open",
    )

    def _open(self, create: bool) -> None:
        self._dir, self._views = self.file("leveldb"), self.file("leveldb-views")
        self._db: plyvel.DB | None = None  # the writer's own database
        self._view: View | None = None  # a reader's private view of it
        self._tables: tuple[View, DirectTables] | None = None  # where the view's records lie in its files
        self._unflushed = 0  # bytes in the writer's log since its last flush
        self._dir_synced = False  # the log file's directory entry is durable
        if create:
            self._dir.mkdir()
            self._views.mkdir()
        if self.writable:
            self._db = self._open_writer(create)
            self._drop_leftovers()
        else:
            self._view = self._open_view()

    def _open_writer(self, create: bool = False) -> plyvel.DB:
        try:
            # No paranoid checks for the writer: its recovery then takes a torn log tail as the end
            # (records there were never committed); readers' views check everything.
            return open_db(self._dir, create=create, paranoid=False)
        except plyvel.Error as exc:
            raise _error(exc, f"opening {self._dir}") from exc

    def _open_view(self) -> View:
        return View(self._dir, self._views, self._last_key())

    def _last_key(self) -> bytes | None:
        """The key of the newest committed record's value: a view must hold it."""
        count = len(self)
        if not count:
            return None
        if self._encoded is not None:
            return _key(count - 1)
        return _key((count - 1) // self._per_block(int(np.prod(self.image_shape))))

    def _close(self) -> None:
        try:
            if self._db is not None:
                if self._unflushed and background_works():
                    try:
                        self._flush(self._db)
                    except (plyvel.Error, OSError):
                        pass  # a full disk: the records stay in the log, which readers replay
                self._db.close()
        finally:
            if self._view is not None:
                self._view.close()

    def _reopen_after_fork(self) -> None:
        set_aside(self._db)  # the parent's: its lock and threads are not this process's
        if self._view is not None:
            set_aside(self._view.db)
        self._db, self._view = None, self._open_view()

    def _refresh(self, old_count: int) -> None:
        if self._view is not None:  # a reader: a new view holds the new commits
            old, self._view = self._view, self._open_view()
            old.retire()  # not close(): another thread may be reading it

    @property
    def _reader(self) -> plyvel.DB:
        if self._db is not None:
            return self._db
        if self._view is None:
            self._view = self._open_view()  # the writer's database was dropped after a failure
        return self._view.db

    def _per_block(self, image_nbytes: int) -> int:
        return max(1, int(self.options["block_bytes"]) // (image_nbytes + 8))

    def _direct(self) -> DirectTables | None:
        """Where the records of this reader's view lie in its table files (leveldb_tables); None for
        the writer, whose database changes under it."""
        view = self._view
        if view is None or self._db is not None or view.db is None:
            return None
        tables = self._tables
        if tables is None or tables[0] is not view:
            raw = self._encoded is None
            size = int(np.prod(self.image_shape)) if raw and len(self) else None
            if raw and size is None:
                return None
            tables = (view, DirectTables(view.path, len(self), size, self._per_block(size) if size else 1))
            self._tables = tables
        return tables[1]

    # -------------------------------------------------------------- writing

    def _writer(self) -> plyvel.DB:
        if self._db is None:  # dropped after a failed write: LevelDB's error state dies with the handle
            self._db = self._open_writer()
            self._unflushed, self._dir_synced = 0, False
        return self._db

    def _drop_leftovers(self) -> None:
        """Delete what a killed writer left past the committed records (other readers of the database see it)."""
        last = self._last_key()
        first = _key(int.from_bytes(last, "big") + 1) if last is not None else _key(0)
        self._put([], first)

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        per_block = self._per_block(size)
        stop = start + len(images)
        first, last = start // per_block, (stop - 1) // per_block
        pixels = images.data.cast("B")
        label_bytes = np.ascontiguousarray(labels, dtype="<i8").data.cast("B")
        head = (b"", b"")
        kept = start - first * per_block  # committed records of a partly filled block are rewritten with it
        if kept:
            value = self._writer().get(_key(first))
            held = len(value) // (size + 8) if value is not None else 0
            if value is None or held < kept or len(value) != held * (size + 8):
                raise CorruptStoreError(f"{self.path}: block {first} holds fewer records than committed")
            head = (value[: kept * size], value[held * size : held * size + kept * 8])

        def values() -> Iterable[tuple[bytes, bytes]]:
            for block in range(first, last + 1):
                lo, hi = max(start, block * per_block) - start, min(stop, (block + 1) * per_block) - start
                old = head if block == first else (b"", b"")
                parts = (old[0], pixels[lo * size : hi * size], old[1], label_bytes[lo * 8 : hi * 8])
                yield _key(block), b"".join(parts)

        self._put(values(), _key(last + 1), len(images) * (size + 8) + len(head[0]) + len(head[1]))

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        label_bytes = np.ascontiguousarray(labels, dtype="<i8").tobytes()
        values = ((_key(start + k), label_bytes[8 * k : 8 * k + 8] + blob) for k, blob in enumerate(blobs))
        self._put(values, _key(start + len(blobs)), sum(len(blob) + 8 for blob in blobs))

    def _put(self, values: Iterable[tuple[bytes, bytes]], end: bytes, nbytes: int = 0) -> None:
        """Put ``values`` (keys in order) and delete every key from ``end`` on (a crashed write's leftovers)."""
        db = self._writer()
        log = self._ensure_room(nbytes)
        written = 0
        try:
            stale = list(db.iterator(start=end, include_value=False))
            batch, size = db.write_batch(sync=False), 0
            for key in stale:
                batch.delete(key)
            for key, value in values:
                batch.put(key, value)
                size += len(value) + len(key)
                if size >= _BATCH_BYTES:
                    batch.write()
                    self._unflushed, written = self._unflushed + size, written + size
                    batch, size = db.write_batch(sync=False), 0
                    if self._unflushed >= FLUSH_BYTES and background_works():
                        self._flush(db)  # a new log: reserve the rest of the write there
                        _release(log)
                        log = self._ensure_room(max(0, nbytes - written))
            batch.write()
            self._unflushed += size
            if self._unflushed >= FLUSH_BYTES and background_works():
                self._flush(db)
            elif self.sync and (nbytes or stale):
                db.write_batch(sync=True).write()  # an empty synced batch: fsync of the log
            if self.sync and not self._dir_synced:
                fsync_dir(self._dir)  # the log's (and new tables') directory entries
                self._dir_synced = True
        except plyvel.Error as exc:
            self._drop_writer()
            raise _error(exc, f"writing to {self._dir}") from exc
        finally:
            _release(log)

    def _flush(self, db: plyvel.DB) -> None:
        """Write the memory table to a table file (LevelDB fsyncs it and its manifest) and start a new log."""
        may_start_background()
        db.compact_range(start=_PAST_EVERY_KEY, stop=_PAST_EVERY_KEY)
        self._unflushed, self._dir_synced = 0, False

    def _drop_writer(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except plyvel.Error:
                pass

    def _ensure_room(self, nbytes: int) -> Path | None:
        """Reserve the log's disk blocks, and check room for a flush, before LevelDB writes."""
        if not nbytes:
            return None
        need = nbytes + nbytes // 16 + (64 << 10)  # the log's record headers, and the batches' keys
        logs = sorted((entry for entry in os.scandir(self._dir) if entry.name.endswith(".log")), key=_number)
        log = self._dir / logs[-1].name if logs else None
        if log is not None:
            reserve(log, need)
        if self._unflushed + nbytes >= FLUSH_BYTES:  # this commit flushes: a table file of the memory table
            table = self._unflushed + need
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and table > limit:
                raise OSError(errno.EFBIG, f"a {table}-byte table would exceed the file size limit")
            stat = os.statvfs(self._dir)
            if stat.f_bavail * stat.f_frsize < table + (1 << 20):
                raise OSError(errno.ENOSPC, f"no room for a {table}-byte table in {self._dir}")
        return log

    # -------------------------------------------------------------- reading

    def _records(self, value: bytes | None, block: int, size: int, per_block: int) -> int:
        """How many records ``value`` holds, after checking its length."""
        return records_in(value, block, size, per_block, f"{self.path}: block {block} of the LevelDB store")

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        direct = self._direct()
        if direct is not None and direct.located(indices) is not None:
            direct.gather(indices, images)
            labels[:] = direct.labels[indices]
            return
        per_block = self._per_block(size)
        record = size + 8
        pixels, label_bytes = images.data.cast("B"), labels.data.cast("B")
        blocks, rows = np.divmod(indices, per_block)
        get = self._reader.get
        for at, (block, row) in enumerate(zip(blocks.tolist(), rows.tolist(), strict=True)):
            value = get(block.to_bytes(8, "big"))
            length = len(value) if value is not None else 0
            count = length // record
            if row >= count or length != count * record or count > per_block:
                self._records(value, block, size, per_block)  # raises if the block is damaged
                raise CorruptStoreError(f"{self.path}: image {block * per_block + row} is committed but missing")
            view = memoryview(value)  # not None: count > row >= 0
            pixels[at * size : at * size + size] = view[row * size : row * size + size]
            label = count * size + 8 * row
            label_bytes[8 * at : 8 * at + 8] = view[label : label + 8]

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        direct = self._direct()
        if direct is not None and direct.located(np.arange(start, stop)) is not None:
            direct.copy_range(start, stop, images)
            labels[:] = direct.labels[start:stop]
            return
        per_block = self._per_block(size)
        pixels, label_bytes = images.data.cast("B"), labels.data.cast("B")
        first, last = start // per_block, (stop - 1) // per_block
        done = start  # records up to here are copied
        values = self._reader.iterator(start=_key(first), stop=_key(last + 1), fill_cache=False)
        for block, (key, value) in enumerate(values, first):
            if key != _key(block):
                break  # a block is missing
            count = self._records(value, block, size, per_block)
            lo, hi = done - block * per_block, min(stop, block * per_block + count)
            if hi <= done:
                break  # a short block: the records after it are missing
            copy_rows(memoryview(value), count, size, lo, hi - block * per_block, pixels, label_bytes, done - start)
            done = hi
            if done == stop or count < per_block:
                break
        if done != stop:
            raise CorruptStoreError(f"{self.path}: image {done} is committed but missing from the LevelDB store")

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.image_shape, dtype=np.uint8)
        tables = self._tables  # the path of every shuffled get: _direct()'s checks only when the view changed
        direct = tables[1] if tables is not None and tables[0] is self._view and self._db is None else self._direct()
        offset = direct.offset(index) if direct is not None else -1
        if direct is not None and offset >= 0:
            image.data.cast("B")[:] = direct.maps[direct.tables.item(index)][offset : offset + image.nbytes]
            return image, direct.labels.item(index)
        size = image.nbytes
        per_block = self._per_block(size)
        block, row = divmod(index, per_block)
        value = self._reader.get(block.to_bytes(8, "big"))
        count = self._records(value, block, size, per_block)
        if row >= count:
            raise CorruptStoreError(f"{self.path}: image {index} is committed but missing")
        return image, one_record(memoryview(value), count, size, row, image)  # value: checked by _records

    def _direct_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray] | None:
        """Records ``indices`` of an encoded store read out of the view's table files, or None."""
        direct = self._direct()
        offsets = direct.located(indices) if direct is not None else None
        if direct is None or offsets is None or direct.lengths is None:
            return None
        maps = direct.maps
        blobs = [
            maps[slot][offset : offset + length].tobytes()
            for slot, offset, length in zip(
                direct.tables[indices].tolist(), offsets.tolist(), direct.lengths[indices].tolist(), strict=True
            )
        ]
        return blobs, direct.labels[indices]

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        direct = self._direct_blobs(indices)
        if direct is not None:
            return direct
        labels = np.empty(len(indices), dtype=np.int64)
        blobs: list[bytes] = []
        get = self._reader.get
        for k, index in enumerate(indices.tolist()):
            value = get(index.to_bytes(8, "big"))
            if value is None or len(value) < 9:
                raise CorruptStoreError(f"{self.path}: image {index} is committed but missing or empty")
            labels[k] = int.from_bytes(value[:8], "little", signed=True)
            blobs.append(value[8:])
        return blobs, labels

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        direct = self._direct_blobs(np.arange(start, stop))
        if direct is not None:
            return direct
        labels = np.empty(stop - start, dtype=np.int64)
        blobs: list[bytes] = []
        for index, (key, value) in enumerate(self._reader.iterator(start=_key(start), stop=_key(stop)), start):
            if key != _key(index) or len(value) < 9:
                break
            labels[index - start] = int.from_bytes(value[:8], "little", signed=True)
            blobs.append(value[8:])
        if len(blobs) != stop - start:
            raise CorruptStoreError(f"{self.path}: image {start + len(blobs)} is committed but missing")
        return blobs, labels


def _release(log: Path | None) -> None:
    """Give back a log's unused reserved blocks; a log a flush deleted took them with it."""
    if log is not None:
        try:
            release_reserve(log)
        except FileNotFoundError:
            pass


def _key(number: int) -> bytes:
    return number.to_bytes(8, "big")  # big-endian: key order is index order


def _number(entry: os.DirEntry[str]) -> int:
    stem = entry.name.partition(".")[0]
    return int(stem) if stem.isdigit() else -1


def _error(exc: plyvel.Error, doing: str) -> ImgStoreError:
    """imgstore's error for a LevelDB one: a full disk, damage, or another I/O error."""
    message = str(exc)
    if any(word in message for word in ("No space left", "File too large", "Disk quota")):
        return StoreFullError(f"{doing}: no space left (or a file size limit): {message}")
    if isinstance(exc, plyvel.CorruptionError):
        return CorruptStoreError(f"{doing}: {message}")
    return StoreIOError(f"{doing} failed: {message}")
