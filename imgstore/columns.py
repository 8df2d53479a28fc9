"""Per-record side files a store keeps beside the backend's own: fixed-width entries, shapes, and text.

Side files carry their own checks (an entry that is not what was written raises
:class:`CorruptStoreError` when read), as the records do. Like the backend's records, they are
written before the manifest commits; entries past the committed count are leftovers of a crashed
write, ignored by readers and overwritten by the next.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from xxhash import xxh3_64_intdigest

from imgstore.errors import CorruptStoreError
from imgstore.fileio import open_regular


def write_at(path: Path, index: int, width: int, data: bytes, *, sync: bool) -> None:
    """Write entries ``index ..`` (``width`` bytes each) of a fixed-width column file."""
    _write_file_at(path, index * width, data, sync=sync)


def _write_file_at(path: Path, offset: int, data: bytes, *, sync: bool) -> None:
    """Cut the file at ``offset`` (a crashed write's leftovers go) and write ``data`` there, all of it."""
    # O_NOFOLLOW: a link planted in the store must not make a write cut and overwrite a file elsewhere.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, offset)
        view = memoryview(data)
        while view:  # pwrite may write less (a file size limit, a full disk): never take that as written
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, f"{path}: no byte written", str(path))
            view, offset = view[written:], offset + written
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_column(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """The first ``count`` entries of a fixed-width column file; a short file is damage."""
    try:
        with open_regular(path) as f:
            # Never ask for more than the file holds: a tampered count may not allocate terabytes.
            size = min(count * dtype.itemsize, os.fstat(f.fileno()).st_size)
            values = np.frombuffer(f.read(size - size % dtype.itemsize), dtype=dtype)
    except FileNotFoundError:
        values = np.empty(0, dtype)
    except OSError as exc:
        raise CorruptStoreError(f"{path} cannot be read: {exc}") from None
    if len(values) < count:
        raise CorruptStoreError(f"{path} holds {len(values)} entries; {count} records are committed")
    return values


class ShapeColumn:
    """Each record's (height, width, channels), uint32, with a fourth word that checks the row.

    The check is a linear hash of the row and its index with odd multipliers (mod 2**32): any
    flipped bit of a row, or a row moved to another index, changes it; computed for the whole
    column at once in numpy when it is loaded.
    """

    _FACTORS = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=np.uint64)

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def _checks(cls, start: int, shapes: np.ndarray) -> np.ndarray:
        index = np.arange(start, start + len(shapes), dtype=np.uint64)
        rows = np.column_stack([shapes.astype(np.uint64), index])
        checks: np.ndarray = (rows * cls._FACTORS).sum(axis=1, dtype=np.uint64) + np.uint64(0x165667B1)
        low: np.ndarray = np.bitwise_and(checks, np.uint64(0xFFFFFFFF))
        return low

    def write(self, start: int, shapes: np.ndarray, *, sync: bool) -> None:
        rows = np.column_stack([shapes.astype(np.uint64), self._checks(start, shapes)]).astype("<u4")
        write_at(self.path, start, 16, rows.tobytes(), sync=sync)

    def load(self, count: int) -> np.ndarray:
        """``[count, 3]`` shapes, after checking every row."""
        rows = read_column(self.path, np.dtype("<u4"), count * 4)[: count * 4].reshape(count, 4)
        bad = np.flatnonzero(self._checks(0, rows[:, :3]) != rows[:, 3])
        if len(bad):
            raise CorruptStoreError(f"{self.path}: the shape of image {int(bad[0])} is damaged")
        return np.ascontiguousarray(rows[:, :3])


class TextColumn:
    """One string per record (e.g. its source path): UTF-8 bytes in ``data``; in ``ends`` per record the
    end offset of its bytes and their XXH3 hash (seeded with the index), uint64 each.

    Names that are not valid UTF-8 (possible on Linux) keep their bytes through ``surrogateescape``.
    """

    def __init__(self, data: Path, ends: Path) -> None:
        self.data, self.ends_path = data, ends
        self.ends = np.empty(0, "<u8")
        self.hashes = np.empty(0, "<u8")

    def load(self, count: int) -> None:
        rows = read_column(self.ends_path, np.dtype("<u8"), 2 * count)[: 2 * count].reshape(count, 2)
        self.ends, self.hashes = rows[:, 0].copy(), rows[:, 1].copy()
        if len(self.ends) and (bool(np.any(self.ends[1:] < self.ends[:-1])) or int(self.ends[-1]) > _size(self.data)):
            raise CorruptStoreError(f"{self.ends_path} holds impossible offsets")

    def write(self, start: int, texts: Sequence[str], *, sync: bool) -> np.ndarray:
        """Write the texts of records ``start ..``; returns their rows (for :meth:`extend`)."""
        encoded = [text.encode("utf-8", "surrogateescape") for text in texts]
        base = int(self.ends[start - 1]) if start else 0
        ends = base + np.cumsum([len(e) for e in encoded], dtype=np.int64).astype("<u8")
        hashes = np.array([xxh3_64_intdigest(e, start + k) for k, e in enumerate(encoded)], dtype="<u8")
        rows = np.column_stack([ends, hashes]).astype("<u8")
        _write_file_at(self.data, base, b"".join(encoded), sync=sync)
        write_at(self.ends_path, start, 16, rows.tobytes(), sync=sync)
        return rows

    def extend(self, start: int, rows: np.ndarray) -> None:
        self.ends = np.concatenate([self.ends[:start], rows[:, 0]])
        self.hashes = np.concatenate([self.hashes[:start], rows[:, 1]])

    def get(self, index: int) -> str:
        lo = int(self.ends[index - 1]) if index else 0
        hi = int(self.ends[index])
        try:
            with open_regular(self.data) as f:
                raw = os.pread(f.fileno(), hi - lo, lo)
        except OSError as exc:
            raise CorruptStoreError(f"{self.data} cannot be read: {exc}") from None
        if len(raw) != hi - lo or xxh3_64_intdigest(raw, index) != int(self.hashes[index]):
            raise CorruptStoreError(f"{self.data}: the text of record {index} is damaged")
        return raw.decode("utf-8", "surrogateescape")

    def check_all(self) -> None:
        """Check every record's text (``verify``)."""
        try:
            with open_regular(self.data) as f:
                data = f.read(int(self.ends[-1]) if len(self.ends) else 0)
        except OSError as exc:
            raise CorruptStoreError(f"{self.data} cannot be read: {exc}") from None
        lo = 0
        for index, (hi, expected) in enumerate(zip(self.ends.tolist(), self.hashes.tolist(), strict=True)):
            if hi > len(data) or xxh3_64_intdigest(data[lo:hi], index) != expected:
                raise CorruptStoreError(f"{self.data}: the text of record {index} is damaged")
            lo = hi


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
