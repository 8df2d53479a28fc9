"""Records of a reader's LevelDB view read straight out of its table files, by LevelDB's table format.

plyvel's ``DB.get`` costs 3-16 µs a value (LevelDB's lookup, its ``std::string`` copy, then a Python
``bytes`` copy of the whole 16 KiB block) against 2-3 µs for one ``pread`` of an image: 88% of a
shuffled ``get``. A view is a snapshot that never changes (leveldb_view: nobody writes to it, and
opening it wrote its log's records to a table), and LevelDB never changes a table file it has
written. So where each value lies can be learned once per view from the files themselves, as
LevelDB's ``doc/table_format.md`` lays them out: a 48-byte footer names the index block, whose
entries name the data blocks (each followed by a 1-byte compression type and a 4-byte CRC), whose
entries are ``varint shared, varint non_shared, varint value_length, key delta, value``, with keys
``user key + 8-byte (sequence << 8 | type)``. A key's newest entry (highest sequence) of every
table whose key range (from the view's manifest) covers it is the value; a deletion means none.

Learning is lazy and by *segment*: the manifest's table ranges cut the key space into segments,
each covered by the same tables; the first read in a segment parses those tables and learns every
record in it (pixels' file offset, table, length and label). A read then is one ``preadv`` into the
output, out of a read-only map of its table (a batch: a copy per run of records back to back).
Anything this reader cannot vouch for (a compressed block, a table gone since the manifest was
read, a value of the wrong length, a damaged table) is left to plyvel: the caller reads it with
``DB.get``.
"""

from __future__ import annotations

import bisect
import os
import threading
from pathlib import Path

import numpy as np

from imgstore.backends.leveldb_view import read_manifest, varint
from imgstore.backends.mapped_rows import LIBRARY, UNKNOWN, LearnedOffsets, copy_records
from imgstore.errors import CorruptStoreError
from imgstore.fileio import map_read_only, open_regular

_FOOTER, _MAGIC = 48, 0xDB4775248B80FB57
_TRAILER = 5  # a block's compression type (1 byte; 0: none) and masked CRC-32C (4 bytes)
_KEY = 16  # imgstore's keys: 8 bytes (block or index, big-endian) + LevelDB's 8-byte tag


class Unreadable(Exception):
    """A table this reader does not read (compressed, damaged, gone): plyvel reads its records."""


def table_values(data: bytes | memoryview) -> tuple[np.ndarray, ...]:
    """A table file's entries with 8-byte user keys: arrays of key, sequence, type, value offset and
    value length, in the file's (key) order."""
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != _MAGIC:
        raise Unreadable("no table footer")
    try:
        at = len(data) - _FOOTER
        for _ in range(2):  # the metaindex handle, then the index block's
            offset, at = varint(data, at)
            size, at = varint(data, at)
        entries: list[tuple[int, int, int, int, int]] = []
        for handle in _block(data, offset, size):
            block_offset, at = varint(handle, 0)
            block_size, _ = varint(handle, at)
            for key, value_offset, value_length in _block_entries(data, block_offset, block_size):
                if len(key) == _KEY and key[0] < 0x80:  # imgstore's keys (past 2**63: another program's)
                    tag = int.from_bytes(key[8:], "little")
                    entries.append((int.from_bytes(key[:8], "big"), tag >> 8, tag & 0xFF, value_offset, value_length))
    except ValueError as exc:
        raise Unreadable(str(exc)) from exc
    columns = np.array(entries, dtype=np.int64).reshape(-1, 5) if entries else np.empty((0, 5), np.int64)
    return tuple(columns[:, k] for k in range(5))


def _block(data: bytes | memoryview, offset: int, size: int) -> list[bytes | memoryview]:
    """The values of the entries of the (index) block at ``offset``."""
    return [data[at : at + length] for _, at, length in _block_entries(data, offset, size)]


def _block_entries(data: bytes | memoryview, offset: int, size: int) -> list[tuple[bytes, int, int]]:
    """(key, value offset in the file, value length) of each entry of the block at ``offset``."""
    end = offset + size
    if offset < 0 or size < 4 or end + _TRAILER > len(data):
        raise ValueError("a block past the file's end")
    if data[end] != 0:
        raise Unreadable("a compressed block")
    restarts = int.from_bytes(data[end - 4 : end], "little")
    limit = end - 4 - 4 * restarts
    if limit < offset:
        raise ValueError("a block's restart array overruns it")
    entries: list[tuple[bytes, int, int]] = []
    key = b""
    at = offset
    while at < limit:
        shared, at = varint(data, at)
        own, at = varint(data, at)
        length, at = varint(data, at)
        if shared > len(key) or at + own + length > limit:
            raise ValueError("an entry overruns its block")
        key = key[:shared] + data[at : at + own]
        entries.append((key, at + own, length))
        at += own + length
    return entries


class DirectTables(LearnedOffsets):
    """Where each record of one view lies in its table files, learned a segment at a time.

    ``size`` is a raw record's pixel bytes and ``per_block`` the records a value holds (the raw
    layout: pixels, then int64 labels); ``size=None`` is the encoded layout (a value per record: an
    int64 label, then the record's bytes)."""

    def __init__(self, view: Path, count: int, size: int | None, per_block: int) -> None:
        self._view, self._count, self._size, self._per_block = view, count, size, per_block
        self.offsets = np.full(count, UNKNOWN, np.int64)  # per record: its bytes' offset in its table
        self.tables = np.zeros(count, np.int32)
        self.lengths = np.zeros(count, np.int64) if size is None else None
        self.labels = np.zeros(count, np.int64)
        self._full = (size + 8) * per_block if size is not None else 0  # a full block's value bytes
        # per block: its strided group (-1: none), and the groups (first block, [blocks, pixels] view)
        self.block_groups = np.full(-(-count // per_block) if size is not None else 0, -1, np.int32)
        self._groups: list[tuple[int, np.ndarray]] = []
        self.maps: list[memoryview] = []  # per table slot: its bytes (a read-only map)
        self.arrays: list[np.ndarray] = []  # the same, as NumPy arrays
        self._lock = threading.Lock()
        self._segments: list[tuple[int, list[str]]] | None = None  # (first key, tables covering it)
        self._starts: list[int] = []

    def learn(self, index: int) -> None:
        """Learn record ``index`` and every other record of its segment (or mark them for plyvel)."""
        with self._lock:
            if self.offsets[index] != UNKNOWN:
                return  # another thread learned it meanwhile
            if self._segments is None:
                self._segments = self._cut()
                self._starts = [first for first, _ in self._segments]
            key = index // self._per_block if self._size is not None else index
            at = bisect.bisect_right(self._starts, key) - 1
            first = self._segments[at][0] if at >= 0 else 0
            stop = self._segments[at + 1][0] if at + 1 < len(self._segments) else first + 1
            names = self._segments[at][1] if at >= 0 else []
            try:
                values = [self._table(name) for name in names]
                self._publish(first, stop, values)
            except (Unreadable, OSError):
                self._mark(first, stop, LIBRARY)
            if self.offsets[index] == UNKNOWN:
                self.offsets[index] = LIBRARY  # not in any table: plyvel says what it is

    def _cut(self) -> list[tuple[int, list[str]]]:
        """The segments of the key space the view's tables cover: (first key, names of the tables)."""
        try:
            manifest = (self._view / "CURRENT").read_text(errors="replace").strip()
            state = read_manifest(self._view / manifest)
            listing = os.listdir(self._view)
        except (OSError, CorruptStoreError):
            return []  # every record through plyvel
        names = {int(name.partition(".")[0]): name for name in listing if name.endswith((".ldb", ".sst"))}
        # A bound of another length still bounds the 8-byte keys in the table (a shorter one padded below
        # or above them): a table holding a key's newest value is never left out of its segment.
        ranges = sorted(
            (
                int.from_bytes(low[:8].ljust(8, b"\0"), "big"),
                int.from_bytes(high[:8].ljust(8, b"\xff"), "big"),
                names.get(number, ""),
            )
            for number, (low, high) in state.ranges.items()
        )
        bounds = sorted({low for low, _, _ in ranges} | {high + 1 for _, high, _ in ranges})
        segments: list[tuple[int, list[str]]] = []
        active: dict[str, int] = {}  # tables covering the sweep's key -> their last key
        following = 0
        for start in bounds:  # a sweep: tables rarely overlap, so `active` holds one or two
            while following < len(ranges) and ranges[following][0] <= start:
                active[ranges[following][2]] = ranges[following][1]
                following += 1
            active = {name: high for name, high in active.items() if high >= start}
            segments.append((start, list(active)))
        return segments

    def _table(self, name: str) -> tuple[int, tuple[np.ndarray, ...], memoryview]:
        """Table ``name``'s slot, entries and map (opened and parsed once a segment that needs it).

        Mapped at its size now, and only the bytes its entries name are read: a table is never cut
        short by LevelDB or imgstore (as the memmap backend's files), so no read touches a page past
        its end (SIGBUS). The map holds no descriptor (a store may have thousands of tables)."""
        if not name:
            raise Unreadable("a table the manifest names is missing")
        with open_regular(self._view / name) as file:  # never a FIFO's endless wait
            size = os.fstat(file.fileno()).st_size
            if size < _FOOTER:
                raise Unreadable("no table footer")
            buffer = map_read_only(file.fileno(), size)
        data = memoryview(buffer).cast("B").toreadonly()
        entries = table_values(data)
        self.maps.append(data)
        self.arrays.append(np.frombuffer(data, np.uint8))  # read-only, as its memoryview
        return len(self.maps) - 1, entries, data

    def _publish(self, first: int, stop: int, values: list[tuple[int, tuple[np.ndarray, ...], memoryview]]) -> None:
        """Learn the records of keys ``first .. stop - 1`` from the newest entry of each key."""
        newest: dict[int, tuple[int, int, int, int, int, memoryview]] = {}
        for slot, (keys, seqs, kinds, offsets, lengths), data in values:
            lo, hi = np.searchsorted(keys, [first, stop])
            for key, seq, kind, offset, length in zip(
                keys[lo:hi].tolist(),
                seqs[lo:hi].tolist(),
                kinds[lo:hi].tolist(),
                offsets[lo:hi].tolist(),
                lengths[lo:hi].tolist(),
                strict=True,
            ):
                if key not in newest or seq > newest[key][0]:
                    newest[key] = (seq, kind, slot, offset, length, data)
        self._mark(first, stop, LIBRARY)  # keys with no value: plyvel says they are missing
        for key, (_, kind, slot, offset, length, data) in newest.items():
            if kind == 1:
                self._record(key, slot, offset, length, data)
        if self._size is not None:
            self._group([(key, v[2], v[3]) for key, v in sorted(newest.items()) if v[1] == 1 and v[4] == self._full])

    def _group(self, blocks: list[tuple[int, int, int]]) -> None:
        """Full blocks (key, slot, value offset) of consecutive keys, one table and equal spacing, as one
        strided view of their pixels each: a range read copies them with one NumPy assignment."""
        at = 0
        while at < len(blocks):
            key, slot, offset = blocks[at]
            end, step = at + 1, 0
            while end < len(blocks) and blocks[end][0] == key + end - at and blocks[end][1] == slot:
                if end == at + 1:
                    step = blocks[end][2] - offset
                elif blocks[end][2] - blocks[end - 1][2] != step:
                    break
                end += 1
            if end - at > 1 and step >= self._full:
                pixels = self._per_block * self._size  # type: ignore[operator]
                view = np.lib.stride_tricks.as_strided(self.arrays[slot][offset:], (end - at, pixels), (step, 1))
                self._groups.append((key, view))
                self.block_groups[key : key + end - at] = len(self._groups) - 1
            at = end

    def _record(self, key: int, slot: int, offset: int, length: int, data: memoryview) -> None:
        # The offset last: a read in another thread trusts a record's table and label once it has one.
        if self._size is None:  # encoded: the label, then the record's bytes
            if key >= self._count or length < 9:
                return
            self.tables[key] = slot
            self.lengths[key] = length - 8  # type: ignore[index]
            self.labels[key] = int.from_bytes(data[offset : offset + 8], "little", signed=True)
            self.offsets[key] = offset + 8
            return
        size, record = self._size, self._size + 8
        count = length // record
        first = key * self._per_block
        if length != count * record or not 1 <= count <= self._per_block or first >= self._count:
            return  # a damaged value: plyvel's reading of it says so
        stop = min(first + count, self._count)
        self.tables[first:stop] = slot
        self.labels[first:stop] = np.frombuffer(data, "<i8", stop - first, offset + count * size)
        self.offsets[first:stop] = offset + size * np.arange(stop - first)

    def _mark(self, first: int, stop: int, value: int) -> None:
        if self._size is None:
            self.offsets[min(first, self._count) : min(stop, self._count)] = value
        else:
            lo, hi = first * self._per_block, stop * self._per_block
            self.offsets[min(lo, self._count) : min(hi, self._count)] = value

    def copy_range(self, start: int, stop: int, images: np.ndarray) -> None:
        """Copy raw records ``start .. stop - 1`` (all learned, none LIBRARY) into ``images`` (uint8, C
        order): a strided group's whole blocks in one assignment, else a block's records in one copy."""
        size, per = self._size, self._per_block
        assert size is not None
        flat = images.reshape(-1)
        at = start
        while at < stop:
            block = at // per
            group = self.block_groups.item(block)
            if group >= 0 and at == block * per and stop - at >= per:
                first, view = self._groups[group]
                blocks = min(len(view) - (block - first), (stop - at) // per)
                done = (at - start) * size
                flat[done : done + blocks * per * size].reshape(blocks, per * size)[:] = view[
                    block - first : block - first + blocks
                ]
                at += blocks * per
                continue
            end = min(stop, (block + 1) * per)  # the rest of this block: its records lie back to back
            offset = self.offsets.item(at)
            flat[(at - start) * size : (end - start) * size] = self.arrays[self.tables.item(at)][
                offset : offset + (end - at) * size
            ]
            at = end

    def gather(self, indices: np.ndarray, images: np.ndarray) -> None:
        """Copy raw records ``indices`` (all learned, none LIBRARY) into ``images`` (uint8, C order)."""
        assert self._size is not None
        copy_records(self.arrays, self.tables[indices], self.offsets[indices], self._size, images)
