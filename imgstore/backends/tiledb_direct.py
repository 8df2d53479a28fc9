"""Direct reads of a TileDB store: one ``pread`` per record, at an offset found from the fragment list.

TileDB's query engine costs about a millisecond per query (a shuffled ``get`` would take 1-2 ms,
not microseconds) and copies every bulk read twice. The store's attributes have no compression
filter and a filter chunk as big as a tile, so in a fragment of format version 22 each attribute
file (``a<n>.tdb``) is its tiles in order, each tile one chunk: ``u64 chunks (1)``, ``u32 size``,
``u32 size``, ``u32 metadata (0)``, then the tile's cells. A variable-length attribute has its
tiles' cell offsets (u64, from the start of the tile's data) in ``a<n>.tdb`` and the data tiles,
framed the same way, in ``a<n>_var.tdb``. Every header is checked where the index is built and each
file must end with its last tile. Fragments of another format version are :class:`Unreadable`:
the store's records are then read through TileDB's own queries.

Fixed-size records are copied out of a read-only map of their attribute file (mapped once its size
is checked against its tiles, so never past its end): a scan is one strided copy per fragment (its
tiles lie equally spaced, a chunk header apart), where a ``preadv`` per tile cost ~1.4x the limit's
``np.fromfile`` before any check. Every read first asks the file's size (an ``lseek``, ~0.2 µs): a
file cut short by another program under an open reader is damage, not a SIGBUS (only a cut during
the copy itself could still be one); nothing rewrites a fragment file once written.

The newest fragment (by timestamp) that holds a record wins, as in TileDB. The index keeps each
committed record's file, offset and length, and the labels; the files stay open, so a vacuum that
deletes a consolidated fragment's files under a reader changes nothing for it.
"""

from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import tiledb

from imgstore.backends.mapped_rows import copy_records
from imgstore.errors import CorruptStoreError
from imgstore.fileio import holds, map_read_only

FORMAT_VERSIONS = (22,)  # the layout described above, as checked
_HEADER = struct.Struct("<III")  # a chunk: its size, its filtered size, its metadata size


class Unreadable(Exception):
    """The fragments are of another format version: use TileDB's queries.

    In a fragment of a known version anything but the expected layout is damage (CorruptStoreError):
    TileDB itself crashes on some damaged files (SIGSEGV on a truncated attribute file), so a damaged
    store never falls back to it.
    """


@dataclass
class DirectIndex:
    fds: list[int]
    fd: np.ndarray  # per record: index into fds (int32)
    offset: np.ndarray  # per record: file offset of its bytes (int64)
    length: np.ndarray  # per record: its bytes (int64)
    labels: np.ndarray  # per record (int64)
    maps: dict[int, np.ndarray] = field(default_factory=dict)  # fixed-size images' files (by fds index), uint8

    def __post_init__(self) -> None:
        # An index built for one read only (a refresh ran meanwhile: tiledb.py) is never closed: its
        # descriptors go with it (they leaked before, ~4 a read, until every open failed with EMFILE).
        self._closer = weakref.finalize(self, _close_all, self.fds)

    def close(self) -> None:
        self._closer()  # once: the list build() filled
        self.fds, self.maps = [], {}

    def read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        self.read_into(np.arange(start, stop), images, labels)

    def read_one(self, index: int, image: np.ndarray) -> int:
        size, offset, slot = image.nbytes, self.offset.item(index), self.fd.item(index)
        if not holds(self.fds[slot], offset + size):
            raise CorruptStoreError("a TileDB fragment file was cut short under this reader")
        image.reshape(-1)[:] = self.maps[slot][offset : offset + size]
        return int(self.labels[index])

    def read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """Fixed-size records ``indices`` into ``images`` (C order): runs in one file are one copy each."""
        labels[:] = self.labels[indices]
        maps = self.maps
        for slot, mapped in maps.items():  # a few fragments (merges keep them few): each file's size, not SIGBUS
            if not holds(self.fds[slot], len(mapped)):
                raise CorruptStoreError("a TileDB fragment file was cut short under this reader")
        copy_records(maps, self.fd[indices], self.offset[indices], images[0].nbytes, images)

    def read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        blobs = []
        for fd, offset, length in zip(
            self.fd[indices].tolist(), self.offset[indices].tolist(), self.length[indices].tolist(), strict=True
        ):
            blob = os.pread(self.fds[fd], length, offset)
            if len(blob) != length:
                raise CorruptStoreError("a TileDB fragment file ends before record data")
            blobs.append(blob)
        return blobs, self.labels[indices]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _path(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


@dataclass
class Tile:
    """Where one tile's data lies in its file: chunk by chunk (each chunk ``start`` bytes into the tile)."""

    starts: np.ndarray  # int64, offset of each chunk's data in the tile's data
    offsets: np.ndarray  # int64, file offset of each chunk's data
    nbytes: int
    end: int  # file offset just past the tile

    def locate(self, at: np.ndarray, length: np.ndarray | int, name: str) -> np.ndarray:
        """File offsets of the records at byte ``at`` of the tile's data (each within one chunk)."""
        chunk = np.searchsorted(self.starts, at, side="right") - 1
        ends = np.append(self.starts[1:], self.nbytes)
        if np.any(chunk < 0) or np.any(at + length > ends[chunk]):
            raise Unreadable(f"{name}: a record spans filter chunks")
        located: np.ndarray = self.offsets[chunk] + (at - self.starts[chunk])
        return located

    def read(self, fd: int, name: str) -> bytes:
        sizes = np.diff([*self.starts.tolist(), self.nbytes])
        parts = [os.pread(fd, int(n), int(o)) for o, n in zip(self.offsets.tolist(), sizes.tolist(), strict=True)]
        data = b"".join(parts)
        if len(data) != self.nbytes:
            raise CorruptStoreError(f"{name} ends within a tile")
        return data


def _tiles(fd: int, count: int, name: str) -> list[Tile]:
    """The ``count`` tiles of an attribute file, each unfiltered chunks after a chunk count."""
    size, position, tiles = os.fstat(fd).st_size, 0, []
    for _ in range(count):
        head = os.pread(fd, 8, position)
        if len(head) != 8:
            raise CorruptStoreError(f"{name} ends within its tiles")
        chunks = int.from_bytes(head, "little")
        position += 8
        if not 0 < chunks <= size // _HEADER.size:
            raise CorruptStoreError(f"{name}: a tile of {chunks} chunks")
        starts, offsets, nbytes = [], [], 0
        for _ in range(chunks):
            header = os.pread(fd, _HEADER.size, position)
            if len(header) != _HEADER.size:
                raise CorruptStoreError(f"{name} ends within its tiles")
            original, filtered, metadata = _HEADER.unpack(header)
            if original != filtered or metadata != 0:
                raise CorruptStoreError(f"{name}: a chunk of {original}/{filtered} bytes, {metadata} of metadata")
            starts.append(nbytes)
            offsets.append(position + _HEADER.size)
            nbytes += original
            position += _HEADER.size + original
        tiles.append(Tile(np.array(starts, np.int64), np.array(offsets, np.int64), nbytes, position))
    if position != size:
        raise CorruptStoreError(f"{name} holds {size} bytes, its {count} tiles {position}")
    return tiles


def build(uri: str, ctx: Any, count: int, tile: int, cell_bytes: int | None) -> DirectIndex:
    """The index of records ``0 .. count - 1``: ``cell_bytes`` for a fixed-size ``image``, None for variable."""
    info = tiledb.FragmentInfoList(uri, ctx=ctx)
    vacuumed = {_path(u) for u in info.to_vacuum}
    fragments = sorted(
        (f for f in info if _path(f.uri) not in vacuumed), key=lambda f: (f.timestamp_range[1], f.timestamp_range[0])
    )
    owner = np.full(count, -1, dtype=np.int32)
    for k, fragment in enumerate(fragments):
        if fragment.sparse or fragment.version not in FORMAT_VERSIONS:
            raise Unreadable(f"fragment {fragment.uri}: format version {fragment.version}")
        lo, hi = (int(n) for n in fragment.nonempty_domain[0])
        owner[max(0, lo) : max(0, min(count, hi + 1))] = k  # newer fragments win
    if count and owner.min() < 0:
        raise CorruptStoreError(f"{uri}: record {int(np.argmin(owner))} is committed but in no fragment")
    offset, length, labels = (np.zeros(count, np.int64) for _ in range(3))
    index = DirectIndex([], np.zeros(count, np.int32), offset, length, labels)
    try:
        for k in np.unique(owner).tolist():
            _add_fragment(index, fragments[k], owner == k, tile, cell_bytes)
    except BaseException:
        index.close()
        raise
    return index


def _open(index: DirectIndex, path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    index.fds.append(fd)
    return fd


def _add_fragment(index: DirectIndex, fragment: Any, mine: np.ndarray, tile: int, cell_bytes: int | None) -> None:
    folder = _path(fragment.uri)
    lo, hi = (int(n) for n in fragment.nonempty_domain[0])
    first_tile, tiles = lo // tile, hi // tile - lo // tile + 1
    records = np.flatnonzero(mine)
    tile_of = records // tile - first_tile
    # Labels: attribute 1, int64 cells, kept in memory.
    name = os.path.join(folder, "a1.tdb")
    label_fd = _open(index, name)
    label_tiles = _tiles(label_fd, tiles, name)
    for t in np.unique(tile_of).tolist():
        if label_tiles[t].nbytes != tile * 8:
            raise CorruptStoreError(f"{name}: a tile of {label_tiles[t].nbytes} bytes")
        at = records[tile_of == t]
        index.labels[at] = np.frombuffer(label_tiles[t].read(label_fd, name), dtype="<i8")[at % tile]
    name = os.path.join(folder, "a0.tdb")
    image_fd = _open(index, name)
    image_tiles = _tiles(image_fd, tiles, name)
    index.fd[records] = len(index.fds) - 1
    if cell_bytes is not None:  # fixed-size cells
        view = memoryview(map_read_only(image_fd, image_tiles[-1].end)).cast("B").toreadonly()
        mapped = np.frombuffer(view, np.uint8)
        if os.fstat(image_fd).st_size < len(mapped):  # cut short since its tiles were read: no page past its end
            raise CorruptStoreError(f"{name} is shorter than its tiles")
        index.maps[len(index.fds) - 1] = mapped
        for t in np.unique(tile_of).tolist():
            if image_tiles[t].nbytes != tile * cell_bytes:
                raise CorruptStoreError(f"{name}: a tile of another size than {tile} cells")
            at = records[tile_of == t]
            index.offset[at] = image_tiles[t].locate((at % tile) * cell_bytes, cell_bytes, name)
        index.length[records] = cell_bytes
        return
    # Variable-length cells: offsets per tile in a0.tdb, data tiles in a0_var.tdb.
    var_name = os.path.join(folder, "a0_var.tdb")
    var_fd = _open(index, var_name)
    index.fd[records] = len(index.fds) - 1
    var_tiles = _tiles(var_fd, tiles, var_name)
    for t in np.unique(tile_of).tolist():
        if image_tiles[t].nbytes != tile * 8:
            raise CorruptStoreError(f"{name}: an offsets tile of {image_tiles[t].nbytes} bytes")
        starts = np.frombuffer(image_tiles[t].read(image_fd, name), dtype="<u8").astype(np.int64)
        data = var_tiles[t]
        ends = np.append(starts[1:], data.nbytes)
        if starts[0] != 0 or np.any(ends < starts) or ends[-1] > data.nbytes:
            raise CorruptStoreError(f"{name}: cell offsets out of order")
        at = records[tile_of == t]
        lengths = (ends - starts)[at % tile]
        index.offset[at] = data.locate(starts[at % tile], lengths, var_name)
        index.length[at] = lengths
