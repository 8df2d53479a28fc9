"""SQLite backend: one table, one row per image, in one database file in WAL mode; no pickle.

Layout (``<gen>`` is the store's generation)::

    sqlite-<gen>/images.sqlite   table images(id INTEGER PRIMARY KEY, label INTEGER NOT NULL, image BLOB NOT NULL)
    sqlite-<gen>/images.sqlite-wal, -shm   SQLite's own, while connections are open (or after a kill)

A folder, not the bare file: SQLite makes and removes its -wal and -shm files as connections come
and go, and everything in the folder is the store's (so ``"w"`` deletes them too).

``id`` is the record's index, ``label`` its label, ``image`` its bytes: the raw pixels of a raw
store of one shape (C order), or the record's bytes in an encoded store (the JPEG/PNG/WebP file, or
imgstore's raw record with its shape header). Any SQLite client reads it, e.g.
``sqlite3 sqlite-<gen>/images.sqlite "SELECT label, length(image) FROM images WHERE id < 10"``; the
committed count is the manifest's (``imgstore.json``): rows at ``id >= count`` are leftovers of a
killed write (the next write deletes them). At open, ``images`` must be that table, with no trigger
and not a view (a forged file could otherwise hang a query or a write): else ``CorruptStoreError``.

Commits: one SQLite transaction per ``put``/``put_many`` call, ``synchronous=FULL`` (the WAL is
fsynced at each commit) when the store syncs, ``OFF`` otherwise; then the manifest commits.
Checkpoints are SQLite's own: automatic once the WAL holds 1 MiB (then it is cut back to that),
and a full one that removes the WAL when the last connection closes. A killed writer leaves a
WAL that SQLite recovers on the next open. Disk space is reserved before each write
(:func:`imgstore.fileio.reserve`), so a full disk or a file size limit is a clean
``StoreFullError`` before SQLite writes.

Reads: a handle keeps one read transaction (one WAL snapshot) open from its first read until
``refresh()`` or ``close()``: starting one per statement takes the WAL-index locks each time (2.4
against 1.2 us a lookup, measured). A forked child never uses, closes or frees the connections it
inherited (they are set aside at the fork) and opens its own.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from imgstore.arguments import io_error
from imgstore.backends import sqlite_files
from imgstore.backends.sqlite_pages import SnapshotRows, Unreadable
from imgstore.errors import CorruptStoreError, InvalidOptionError
from imgstore.fileio import reserve_at
from imgstore.options import Option
from imgstore.store import Store

_DIR, _FILE = "sqlite", "images.sqlite"
_SCHEMA = "CREATE TABLE images(id INTEGER PRIMARY KEY, label INTEGER NOT NULL, image BLOB NOT NULL)"
_GET = "SELECT label, image FROM images WHERE id = ?"
_SCAN = "SELECT id, label, image FROM images WHERE id >= ? AND id < ? ORDER BY id"
_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_READONLY, _SQLITE_CANTOPEN = 13, 10, 8, 14
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_WAL_BYTES = 1 << 20
_OPEN_STEPS = 50_000_000  # SQLite VM steps a query at open may take (~0.2 s); imgstore's own take a few hundred
_SQLITE_IOERR_SHMSIZE = _SQLITE_IOERR | (19 << 8)  # the -shm file could not grow: a full disk


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (the plain class cannot), so forks can set it aside."""


# Connections of this process; at a fork the child moves them to _inherited, never to be used,
# closed or freed there: closing one in the child could checkpoint or delete the parent's WAL.
_open_connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
_inherited: list[_Connection] = []


def _set_aside_in_child() -> None:
    _inherited.extend(_open_connections)
    _open_connections.clear()


os.register_at_fork(after_in_child=_set_aside_in_child)


class SqliteStore(Store):
    name = "sqlite"
    damage_errors = (sqlite3.DatabaseError,)
    files = (_DIR,)
    readers = ("the sqlite3 shell and any SQLite client: table images(id, label, image)",)
    caveats = ("the sqlite3 shell sees a killed write's rows (query WHERE id < count)",)
    option_specs = {
        # SQLite's page (a power of two). 64 KiB, measured on 10 000 CIFAR images against 16 KiB and
        # 4 KiB: read_many 0.8x and store_many 0.6x the time of 16 KiB, lookups alike, 31.5 MB on disk
        # (16 KiB: 32.9, 4 KiB: 41.2: one 3 KiB row a page); single puts ~15% slower (a page each).
        "page_size": Option(1 << 16, 512, 1 << 16, fixed=True),
        # Bytes of the file SQLite reads through a memory map instead of read(): 1.3-1.9x faster lookups.
        "mmap_size": Option(1 << 30, 0, 1 << 40),
    }

    def _open(self, create: bool) -> None:
        self._path = self.file(_DIR) / _FILE
        self._con: _Connection | None = None
        self._reading = False  # whether the connection holds its read transaction
        self._immutable = False  # opened with immutable=1 (read-only media): the file never changes
        # Where the rows of the read transaction's snapshot lie in the file, when the file is that
        # snapshot (sqlite_pages); checked once a transaction (_rows_checked).
        self._rows: SnapshotRows | None = None
        self._rows_checked = False
        self._files: sqlite_files.Key | None = None  # this connection's count in sqlite_files
        self._guard = threading.Lock()  # one statement at a time on the handle's cursor
        page = self.options["page_size"]
        if page & (page - 1):
            raise InvalidOptionError(f"option page_size takes a power of two in 512 .. 65536, got {page}")
        if create:
            self._path.parent.mkdir()
            try:
                self._connect(create=True)
            except sqlite3.Error as exc:
                self._close()
                raise _os_error(exc, self._path) from exc
            return
        self._connect(create=False)
        try:
            self._check_schema()
            self._check_rows()
        except BaseException:
            self._close()
            raise

    def _connect(self, create: bool) -> None:
        uri = f"file:{quote(str(self._path))}"
        if create:
            con = self._new_connection(uri + "?mode=rwc")
            con.execute(f"PRAGMA page_size = {int(self.options['page_size'])}")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(_SCHEMA)
        elif self.writable:
            con = self._new_connection(uri + "?mode=rw")
            if con.execute("PRAGMA journal_mode = WAL").fetchone() != ("wal",):
                raise CorruptStoreError(f"{self._path} cannot be put in WAL mode")
        else:
            con = self._new_connection(uri + "?mode=ro", read_only=True)
        con.execute(f"PRAGMA synchronous = {'FULL' if self.sync else 'OFF'}")
        con.execute(f"PRAGMA mmap_size = {int(self.options['mmap_size'])}")
        if self.writable:
            # Checkpoint once the WAL holds 1 MiB (SQLite's default, 1 000 pages, is 64 MiB of 64 KiB
            # pages: single puts, a page or two each, left a WAL many times the data); cut it back to 1 MiB.
            con.execute(f"PRAGMA wal_autocheckpoint = {max(16, _WAL_BYTES // int(self.options['page_size']))}")
            con.execute(f"PRAGMA journal_size_limit = {_WAL_BYTES}")
        self._cur = con.cursor()
        self._files = sqlite_files.hold(self._path)

    def _new_connection(self, uri: str, read_only: bool = False) -> _Connection:
        con: _Connection = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, factory=_Connection, timeout=30
        )
        self._con = con
        _open_connections.add(con)
        try:
            con.execute("PRAGMA trusted_schema = OFF")  # a forged schema's views and triggers call nothing
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # reads the header now
        except sqlite3.OperationalError as exc:
            if not (read_only and self._immutable_instead(exc)):
                raise
            self._close()
            # Read-only media: a WAL database without its -wal and -shm files cannot create them; with
            # no -wal, the main file holds every commit and nothing can change it, so read it as such.
            self._immutable = True
            return self._new_connection(uri + "&immutable=1")
        return con

    def _immutable_instead(self, exc: sqlite3.Error) -> bool:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        return (
            code in (_SQLITE_CANTOPEN, _SQLITE_READONLY)
            and self._path.is_file()
            and not os.path.exists(f"{self._path}-wal")
            and not os.access(self._path.parent, os.W_OK)
        )

    def _check_schema(self) -> None:
        """``images`` is the table imgstore made, and nothing runs when it is written: else damage, at open.

        ``trusted_schema=OFF`` keeps a forged schema from calling functions, not from running SQL: a
        view named ``images`` (a recursive CTE that never ends) would hang the first query, a trigger
        on it every write. Indexes a user added are kept (they only cost writes).
        """
        objects = self._bounded(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'images' COLLATE NOCASE "
            "OR name = 'images' COLLATE NOCASE"
        )
        tables = [row for row in objects if row[0] == "table" and row[1] == "images"]
        if not tables or " ".join(str(tables[0][2]).split()) != _SCHEMA:
            raise CorruptStoreError(f"{self._path}: 'images' is not the table imgstore made ({_SCHEMA})")
        others = [f"{kind} {name}" for kind, name, _ in objects if kind not in ("table", "index")]
        if others:
            raise CorruptStoreError(f"{self._path}: the images table has {', '.join(others)[:200]}, not imgstore's")

    def _check_rows(self) -> None:
        """A table that ends before the committed count is damage: say so at open, not at a read."""
        count = len(self)
        if count:
            self._cursor()  # the handle's read transaction
            last = self._bounded("SELECT max(id) FROM images")[0]
            if last is None or not isinstance(last[0], int) or last[0] < count - 1:
                raise CorruptStoreError(f"{self._path} holds fewer images than its manifest commits")

    def _bounded(self, query: str) -> list[Any]:
        """The rows of a query at open, cut off (damage) past _OPEN_STEPS of SQLite's steps: never a hang."""
        assert self._con is not None
        steps = [0]

        def progress() -> int:
            steps[0] += 1
            return steps[0] > _OPEN_STEPS // 1000

        self._con.set_progress_handler(progress, 1000)
        try:
            rows = self._cur.execute(query).fetchall()
        except sqlite3.OperationalError as exc:
            if steps[0] > _OPEN_STEPS // 1000:
                raise CorruptStoreError(f"{self._path}: a query at open did not end (a forged schema?)") from exc
            raise
        finally:
            self._con.set_progress_handler(None, 0)
        return rows

    def _close(self) -> None:
        con, self._con = self._con, None
        self._reading = False
        self._rows, self._rows_checked = None, False
        if con is not None:
            _open_connections.discard(con)
            con.close()
        files, self._files = self._files, None
        if files is not None:
            sqlite_files.release(files)  # after the close: no lock of SQLite's is left to drop

    def _reopen_after_fork(self) -> None:
        self._con = None  # the parent's connection was set aside at the fork: never touched here
        self._open(create=False)

    def _refresh(self, old_count: int) -> None:
        with self._guard:
            self._end_read()  # the next read takes a new snapshot, with the new commits

    def _end_read(self) -> None:
        if self._reading:
            self._reading = False
            self._rows, self._rows_checked = None, False  # the file may change once the snapshot ends
            self._cur.execute("COMMIT")

    def _snapshot_rows(self) -> SnapshotRows | None:
        """Where the rows of this read transaction lie in the file, if the file is its snapshot (a
        reader of a raw store, every WAL frame of the snapshot copied into the file); else None."""
        if self._rows_checked:
            return self._rows
        cursor = self._cursor()
        self._rows_checked = True
        if self.writable or self._encoded is not None or not len(self):
            return None
        # the first statement of the transaction: the snapshot (and its WAL read lock) begins here
        root = cursor.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone()
        if root is None or type(root[0]) is not int or not self._file_is_snapshot(cursor):
            return None
        try:
            assert self._files is not None
            fd = sqlite_files.descriptor(self._files, self._path)
            if sqlite_files.file_of(fd) != self._files:
                return None  # another file moved to the path since the connection opened the one it reads
            self._rows = SnapshotRows(fd, root[0], len(self), int(np.prod(self.image_shape)))
        except (Unreadable, OSError, IndexError):
            self._rows = None
        return self._rows

    def _file_is_snapshot(self, cursor: sqlite3.Cursor) -> bool:
        """Whether this transaction reads every page from the database file, which then stays as it is.

        SQLite gives such a reader WAL read-lock 0 when every frame is copied into the file
        (``nBackfill == mxFrame`` in the -shm file's header; an empty WAL), and a checkpoint waits for
        that lock before it writes the file. A reader of some frames (read-lock 1-4, mark m) holds the
        WAL from being reset, so ``nBackfill`` cannot pass m nor ``mxFrame`` fall below it: seeing
        them equal after the transaction began means every frame up to m is in the file."""
        if self._immutable:
            return True
        if cursor.execute("PRAGMA journal_mode").fetchone() != ("wal",):
            return False
        try:
            if os.stat(f"{self._path}-wal").st_size == 0:
                return True
            assert self._files is not None
            header = os.pread(sqlite_files.descriptor(self._files, self._path, "-shm"), 100, 0)
        except OSError:
            return False
        mx_frame = int.from_bytes(header[16:20], sys.byteorder)
        backfilled = int.from_bytes(header[96:100], sys.byteorder)
        return len(header) == 100 and mx_frame == backfilled

    def _cursor(self) -> sqlite3.Cursor:
        """The handle's cursor, inside its read transaction (begun here on first use)."""
        if self._con is None:
            raise CorruptStoreError(f"{self._path}: the store's connection was lost after an error; open it again")
        if not self._reading:
            self._cur.execute("BEGIN")
            self._reading = True
        return self._cur

    def verify(self, batch_size: int = 4096) -> None:
        """SQLite's ``PRAGMA quick_check`` of the file's structure, then every record against its checksum."""
        self._check_usable()
        with self._guard:
            try:
                problems = self._cursor().execute("PRAGMA quick_check").fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._damaged(exc) from exc
        if problems != [("ok",)]:
            raise CorruptStoreError(f"{self._path} is damaged: {str(problems[:3])[:300]}")
        super().verify(batch_size)

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        pixels = images.data.cast("B")
        rows = ((start + k, label, pixels[k * size : k * size + size]) for k, label in enumerate(labels.tolist()))
        self._put(start, rows, images.nbytes, len(images))

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        rows = ((start + k, label, blob) for k, (label, blob) in enumerate(zip(labels.tolist(), blobs, strict=True)))
        self._put(start, rows, sum(len(blob) for blob in blobs), len(blobs))

    def _put(self, start: int, rows: Iterable[tuple[int, int, Any]], nbytes: int, count: int) -> None:
        """One transaction: drop leftovers of a crashed write from ``start`` on, insert ``rows``, commit."""
        with self._guard:
            con = self._con
            if con is None:
                raise CorruptStoreError(f"{self._path}: the store's connection was lost after an error; open it again")
            self._end_read()
            # Rows take their bytes plus headers and unused page tails; the WAL holds them, then a
            # checkpoint copies them into the main file: claim blocks for both before SQLite writes.
            need = nbytes + nbytes // 4 + count * 32 + 4 * self.options["page_size"] + (64 << 10)
            reserved: list[int] = []
            try:
                for fd, path in self._reservable():
                    reserve_at(fd, need, path)
                    reserved.append(fd)
                self._cur.execute("BEGIN IMMEDIATE")
                try:
                    self._cur.execute("DELETE FROM images WHERE id >= ?", (start,))
                    self._cur.executemany("INSERT INTO images (id, label, image) VALUES (?, ?, ?)", rows)
                    self._cur.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        self._cur.execute("ROLLBACK")
                    raise
                for fd in reserved:
                    os.ftruncate(fd, os.fstat(fd).st_size)  # gives back the blocks the write did not use
            except sqlite3.Error as exc:
                self._release_quietly(reserved)
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                    raise CorruptStoreError(f"{self._path} is damaged: {exc}") from exc
                raise io_error(_os_error(exc, self._path), f"writing {count} images to {self.path}") from exc
            except OSError:
                self._release_quietly(reserved)
                raise

    def _reservable(self) -> list[tuple[int, Path]]:
        """The database file and its WAL (if there is one), as descriptors kept in sqlite_files: never
        opened and closed here, which would drop SQLite's locks on them."""
        assert self._files is not None
        files = [(sqlite_files.descriptor(self._files, self._path, "", writable=True), self._path)]
        wal = Path(f"{self._path}-wal")
        try:
            info = os.stat(wal)
        except FileNotFoundError:
            return files
        fd = sqlite_files.descriptor(self._files, self._path, "-wal", writable=True)
        if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (info.st_dev, info.st_ino):
            files.append((fd, wal))  # else a WAL made since the one kept: its room goes unclaimed
        return files

    @staticmethod
    def _release_quietly(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.ftruncate(fd, os.fstat(fd).st_size)
            except OSError:
                pass  # blocks past the end stay claimed until the next write's release; nothing is lost

    # -------------------------------------------------------------- reading

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.image_shape, dtype=np.uint8)
        with self._guard:
            rows = self._rows if self._rows_checked else self._snapshot_rows()
            offset = rows.offset(index) if rows is not None else -1
            if rows is not None and offset >= 0:
                image.data.cast("B")[:] = rows.view[offset : offset + image.nbytes]
                return image, rows.labels.item(index)
            row = self._cursor().execute(_GET, (index,)).fetchone()
        if row is None:
            raise CorruptStoreError(f"{self._path}: image {index} is committed but missing")
        label, blob = row
        if type(label) is not int or type(blob) is not bytes or len(blob) != image.nbytes:
            raise CorruptStoreError(f"{self._path}: the row of image {index} is damaged")
        image.data.cast("B")[:] = blob
        return image, label

    def _read_mapped(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> bool:
        """Rows ``indices`` copied out of the file (the caller holds the guard); False: read them with SQL."""
        rows = self._rows if self._rows_checked else self._snapshot_rows()
        offsets = rows.located(indices) if rows is not None and len(indices) else None
        if rows is None or offsets is None:
            return False
        rows.gather(offsets, images)
        labels[:] = rows.labels[indices]
        return True

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        pixels = images.data.cast("B")
        found = []
        with self._guard:
            if self._read_mapped(indices, images, labels):
                return
            execute = self._cursor().execute
            for k, index in enumerate(indices.tolist()):
                row = execute(_GET, (index,)).fetchone()
                if row is None:
                    raise CorruptStoreError(f"{self._path}: image {index} is committed but missing")
                label, blob = row
                if type(label) is not int or type(blob) is not bytes or len(blob) != size:
                    raise CorruptStoreError(f"{self._path}: the row of image {index} is damaged")
                pixels[k * size : k * size + size] = blob
                found.append(label)
        labels[:] = found

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        size = images[0].nbytes
        pixels = images.data.cast("B")
        found = []
        at = 0
        with self._guard:
            if self._read_mapped(np.arange(start, stop), images, labels):
                return
            for index, label, blob in self._cursor().execute(_SCAN, (start, stop)):
                if index != start + at or type(label) is not int or type(blob) is not bytes or len(blob) != size:
                    raise CorruptStoreError(f"{self._path}: the row of image {start + at} is missing or damaged")
                pixels[at * size : at * size + size] = blob
                found.append(label)
                at += 1
        if at != stop - start:
            raise CorruptStoreError(f"{self._path}: image {start + at} is committed but missing")
        labels[:] = found

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        blobs: list[bytes] = []
        found = []
        with self._guard:
            execute = self._cursor().execute
            for index in indices.tolist():
                row = execute(_GET, (index,)).fetchone()
                if row is None or type(row[0]) is not int or type(row[1]) is not bytes:
                    raise CorruptStoreError(f"{self._path}: the row of image {index} is missing or damaged")
                found.append(row[0])
                blobs.append(row[1])
        return blobs, np.array(found, dtype=np.int64).reshape(-1)

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        blobs: list[bytes] = []
        found = []
        with self._guard:
            for index, label, blob in self._cursor().execute(_SCAN, (start, stop)):
                if index != start + len(blobs) or type(label) is not int or type(blob) is not bytes:
                    raise CorruptStoreError(f"{self._path}: the row of image {start + len(blobs)} is damaged")
                found.append(label)
                blobs.append(blob)
        if len(blobs) != stop - start:
            raise CorruptStoreError(f"{self._path}: image {start + len(blobs)} is committed but missing")
        return blobs, np.array(found, dtype=np.int64).reshape(-1)


def _os_error(exc: sqlite3.Error, path: Path) -> OSError:
    """The OS error an SQLite error stands for: a full disk, read-only media, or an I/O error."""
    code = getattr(exc, "sqlite_errorcode", 0)
    if code & 0xFF == _SQLITE_FULL or code == _SQLITE_IOERR_SHMSIZE:
        return OSError(errno.ENOSPC, f"SQLite: {exc}", str(path))
    if code & 0xFF == _SQLITE_READONLY:
        return OSError(errno.EROFS, f"SQLite: {exc}", str(path))
    return OSError(errno.EIO, f"SQLite: {exc}", str(path))
