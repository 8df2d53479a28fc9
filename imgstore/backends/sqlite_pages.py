"""Rows of a reader's SQLite snapshot read straight out of the database file, by SQLite's file format.

The ``sqlite3`` module's ``execute(...).fetchone()`` alone costs ~2x an ``os.pread`` of the image
(the statement's VM steps, a row tuple, a ``bytes`` copy). When a reader's read transaction sees no
frame of the write-ahead log, SQLite itself reads every page from the database file, and no
checkpoint can write that file until the transaction ends: a reader that began with every WAL frame
already copied into the file holds WAL read-lock 0, and a checkpoint needs that lock exclusively
before it copies a frame (SQLite's ``wal.c``, ``walCheckpoint``). So while the handle holds such a
transaction, the file is the snapshot: a row can be read from a read-only map of it, where SQLite's
B-tree says it lies (``fileformat2.html``: table interior pages 0x05, leaf pages 0x0D, a cell per row:
``varint payload size, varint rowid, record``; the record: a header of serial types, then the values).

The B-tree's interior pages are walked once a snapshot; a leaf's rows are learned when a read first
needs one (offset of the image's bytes, and the label). A row this reader cannot vouch for (its
payload spills to overflow pages, a value of another type or length) is read with SQL, as is every
row when the file does not look like the table imgstore made (the caller then reads with SQL).
"""

from __future__ import annotations

import bisect
import os

import numpy as np

from imgstore.backends.mapped_rows import LIBRARY, UNKNOWN, LearnedOffsets
from imgstore.fileio import map_read_only

_INTERIOR, _LEAF = 0x05, 0x0D
_LABEL_BYTES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}  # integer serial types: their big-endian bytes


class Unreadable(Exception):
    """The file is not what this reader reads: every row through SQL."""


def varint(data: memoryview | bytes, at: int) -> tuple[int, int]:
    """SQLite's varint at ``at``: big-endian groups of 7 bits, the 9th byte whole."""
    value = 0
    for k in range(8):
        byte = data[at + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + k + 1
    return (value << 8) | data[at + 8], at + 9


class SnapshotRows(LearnedOffsets):
    """Where each row of table ``images`` lies in the database file (one read snapshot)."""

    def __init__(self, fd: int, root: int, count: int, size: int) -> None:
        """``fd``: the database file, open in sqlite_files (a map that kept a descriptor of its own
        would close it when unmapped, dropping SQLite's locks: fileio.map_read_only keeps none)."""
        length = os.fstat(fd).st_size
        if length < 100:
            raise Unreadable("no SQLite header")
        self._buffer = map_read_only(fd, length)
        self._map = data = memoryview(self._buffer).cast("B")
        if data[:16].tobytes() != b"SQLite format 3\x00":
            raise Unreadable("no SQLite header")
        page = int.from_bytes(data[16:18], "big")
        self._page = 65536 if page == 1 else page
        self._usable = usable = self._page - data[20]  # the bytes of a page past its reserved tail
        if self._page < 512 or self._page & (self._page - 1) or usable < 480:
            raise Unreadable("a page size SQLite does not write")
        self._max_local = usable - 35  # a table leaf's payload up to this lies wholly in its cell
        self._size, self._count = size, count
        self.offsets = np.full(count, UNKNOWN, np.int64)
        self.labels = np.zeros(count, np.int64)
        self.view = data
        # every size-byte window of the file as one item: a gather of rows is one NumPy indexing
        array = np.frombuffer(data, np.uint8)
        self._windows = np.ndarray((max(0, len(array) - size + 1),), np.dtype((np.void, size)), array, strides=(1,))
        self._leaves: list[int] = []  # leaf page numbers in rowid order
        self._bounds: list[int] = []  # the largest rowid each may hold (the last: unbounded)
        self._walk(root)

    def _start(self, number: int) -> int:
        """The file offset of page ``number``'s header (page 1's follows the 100-byte file header)."""
        if not 1 <= number or number * self._page > len(self._map):
            raise Unreadable(f"page {number} is past the file's end")
        return (number - 1) * self._page + (100 if number == 1 else 0)

    def _walk(self, root: int) -> None:
        """List the leaves from the root down, each with the largest rowid its parent's key allows.

        Each page once: a B-tree reaches every page by one path, and a forged tree whose pointers
        lead back to a page it walked (a cycle) would otherwise never end."""
        data, pending, seen = self._map, [(root, 1 << 63)], set()
        while pending:
            number, bound = pending.pop()
            if number in seen:
                raise Unreadable(f"page {number} is reached twice: not a B-tree")
            seen.add(number)
            at = self._start(number)
            kind = data[at]
            if kind == _LEAF:
                self._leaves.append(number)
                self._bounds.append(bound)
                continue
            if kind != _INTERIOR:
                raise Unreadable(f"page {number} is not a table page")
            cells = int.from_bytes(data[at + 3 : at + 5], "big")
            children = []
            base = at - (100 if number == 1 else 0)
            for k in range(cells):
                cell = base + int.from_bytes(data[at + 12 + 2 * k : at + 14 + 2 * k], "big")
                key, _ = varint(data, cell + 4)
                children.append((int.from_bytes(data[cell : cell + 4], "big"), min(key, bound)))
            children.append((int.from_bytes(data[at + 8 : at + 12], "big"), bound))
            pending.extend(reversed(children))  # popped in key order: leaves listed in rowid order
        if any(b > a for a, b in zip(self._bounds[1:], self._bounds, strict=False)):
            raise Unreadable("the B-tree's keys are out of order")

    def gather(self, offsets: np.ndarray, images: np.ndarray) -> None:
        """Copy the rows' images at ``offsets`` (learned) into ``images`` (uint8, C order), ~256 KiB at a
        time: NumPy gathers through a temporary, which then stays in the CPU cache (100 000 CIFAR rows
        at once 130 ms, in pieces 80 ms). A piece whose rows lie at falling offsets (a leaf's cells are
        laid from its end: consecutive rows run backwards) is copied in the file's order: 100 000 CIFAR
        rows 42 against 37 ms."""
        windows, n = self._windows, len(offsets)
        rows = images.reshape(n, -1).view(windows.dtype).reshape(n)
        step = max(1, (1 << 18) // self._size)
        for at in range(0, n, step):
            end = min(n, at + step)
            if offsets[at] > offsets[end - 1]:
                rows[at:end][::-1] = windows[offsets[at:end][::-1]]
            else:
                rows[at:end] = windows[offsets[at:end]]

    def learn(self, index: int) -> None:
        """Learn the rows of the leaf that holds row ``index`` (or mark it for SQL). The caller holds
        the store handle's guard, as for every use of its snapshot: one thread at a time."""
        at = bisect.bisect_left(self._bounds, index)
        if at < len(self._leaves):
            low = self._bounds[at - 1] if at else -1
            try:
                self._learn_leaf(self._leaves[at], low, self._bounds[at])
            except (Unreadable, IndexError):
                pass  # a damaged page: SQL says what it holds
        if self.offsets[index] == UNKNOWN:
            self.offsets[index] = LIBRARY

    def _learn_leaf(self, number: int, low: int, high: int) -> None:
        """The rows of leaf ``number`` in ``low < rowid <= high`` (where its parents' keys put them:
        SQLite finds no other there, so a row elsewhere, say a damaged page's stale copy, is not one).

        SQLite finds a row in a leaf by binary search over its cells, in rowid order: a leaf whose
        cells are out of order (or two of one rowid), or point outside the page, is damaged, and
        which cell SQLite finds there is its own to say: none of its rows is learned."""
        data, size = self._map, self._size
        at = self._start(number)
        if data[at] != _LEAF:
            raise Unreadable(f"page {number} is not a leaf")
        base = at - (100 if number == 1 else 0)
        cells = int.from_bytes(data[at + 3 : at + 5], "big")
        first, end = at + 8 + 2 * cells, base + self._usable  # cell contents lie between
        if first > end:
            raise Unreadable(f"page {number}'s cells do not fit in it")
        rows, offsets, labels, previous = [], [], [], -(1 << 64)
        for k in range(cells):
            cell = base + int.from_bytes(data[at + 8 + 2 * k : at + 10 + 2 * k], "big")
            if not first <= cell < end:
                raise Unreadable(f"a cell of page {number} lies outside its content")
            payload, cell = varint(data, cell)
            rowid, record = varint(data, cell)
            if rowid <= previous:
                raise Unreadable(f"page {number}'s rows are out of order")
            previous = rowid
            if (
                not max(low, -1) < rowid <= min(high, self._count - 1)
                or payload > self._max_local
                or record + payload > end
            ):
                continue  # not a committed row, or spilled to overflow pages: SQL reads it
            header, column = varint(data, record)
            types: list[int] = []
            while column < record + header and len(types) < 4:
                kind, column = varint(data, column)
                types.append(kind)
            if len(types) != 3 or column != record + header or types[0] != 0 or types[2] != 12 + 2 * size:
                continue  # id is the rowid (stored as NULL); the image a blob of the image's size
            value = record + header
            if types[1] in _LABEL_BYTES:
                width = _LABEL_BYTES[types[1]]
                label = int.from_bytes(data[value : value + width], "big", signed=True)
            elif types[1] in (8, 9):
                label, width = types[1] - 8, 0
            else:
                continue
            if value + width + size != record + payload:
                continue  # the values fill the payload exactly, or SQLite calls the record damaged
            rows.append(rowid)
            offsets.append(value + width)
            labels.append(label)
        if rows:
            picked = np.array(rows, np.int64)
            self.labels[picked] = labels
            self.offsets[picked] = offsets
