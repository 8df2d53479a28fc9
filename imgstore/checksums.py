"""Per-record CRC-32 checksums, kept for every backend in one file beside the backend's own.

LMDB and HDF5 keep no checksum of their values, and a PNG's CRCs do not cover its label, so the
store keeps its own: ``crc32(pixels, then the label as 8 little-endian bytes)`` per record, as
uint32 little-endian in ``checksums.crc32``. Like the backends' files it is written before the
manifest commits, and entries past the committed count are ignored and overwritten.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

CHECKSUMS_NAME = "checksums.crc32"


def record_checksums(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    pixels = memoryview(np.ascontiguousarray(images)).cast("B")
    label_bytes = memoryview(np.ascontiguousarray(labels, dtype="<i8")).cast("B")
    size = images[0].nbytes if len(images) else 0
    return np.fromiter(
        (
            zlib.crc32(label_bytes[8 * k : 8 * k + 8], zlib.crc32(pixels[k * size : (k + 1) * size]))
            for k in range(len(images))
        ),
        dtype="<u4",
        count=len(images),
    )


def write_checksums(store_path: Path, start: int, checksums: np.ndarray, *, sync: bool) -> None:
    fd = os.open(store_path / CHECKSUMS_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, start * 4)  # a crashed write's entries past the committed count go
        os.pwrite(fd, checksums.astype("<u4").tobytes(), start * 4)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_checksums(store_path: Path, count: int) -> np.ndarray:
    try:
        checksums = np.fromfile(store_path / CHECKSUMS_NAME, dtype="<u4", count=count)
    except FileNotFoundError:
        checksums = np.empty(0, dtype="<u4")
    return checksums
