"""Per-record side files a store keeps beside the backend's own: fixed-width entries, and text.

Like the backend's records, they are written before the manifest commits; entries past the
committed count are leftovers of a crashed write, ignored by readers and overwritten by the next.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgstore.errors import CorruptStoreError


def write_at(path: Path, index: int, width: int, data: bytes, *, sync: bool) -> None:
    """Write entries ``index ..`` (``width`` bytes each) of a fixed-width column file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, index * width)  # a crashed write's entries past the committed count go
        os.pwrite(fd, data, index * width)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_column(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """The first ``count`` entries of a fixed-width column file; a short file is damage."""
    try:
        with open(path, "rb") as f:
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


class TextColumn:
    """One string per record (e.g. its source path): UTF-8 bytes in ``data``, their end offsets in ``ends``.

    Names that are not valid UTF-8 (possible on Linux) keep their bytes through ``surrogateescape``.
    """

    def __init__(self, data: Path, ends: Path) -> None:
        self.data, self.ends_path = data, ends
        self.ends = np.empty(0, "<u8")

    def load(self, count: int) -> None:
        self.ends = read_column(self.ends_path, np.dtype("<u8"), count).copy()
        if len(self.ends) and (
            np.any(np.diff(self.ends.astype(np.int64)) < 0) or int(self.ends[-1]) > _size(self.data)
        ):
            raise CorruptStoreError(f"{self.ends_path} holds impossible offsets")

    def write(self, start: int, texts: Sequence[str], *, sync: bool) -> np.ndarray:
        """Write the texts of records ``start ..``; returns the new end offsets (for :meth:`extend`)."""
        encoded = [text.encode("utf-8", "surrogateescape") for text in texts]
        base = int(self.ends[start - 1]) if start else 0
        ends = base + np.cumsum([len(e) for e in encoded], dtype=np.int64).astype("<u8")
        fd = os.open(self.data, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, base)
            os.pwrite(fd, b"".join(encoded), base)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        write_at(self.ends_path, start, 8, ends.tobytes(), sync=sync)
        return ends

    def extend(self, start: int, ends: np.ndarray) -> None:
        self.ends = np.concatenate([self.ends[:start], ends])

    def get(self, index: int) -> str:
        lo = int(self.ends[index - 1]) if index else 0
        hi = int(self.ends[index])
        with open(self.data, "rb") as f:
            raw = os.pread(f.fileno(), hi - lo, lo)
        if len(raw) != hi - lo:
            raise CorruptStoreError(f"{self.data} is shorter than its offsets say")
        return raw.decode("utf-8", "surrogateescape")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
