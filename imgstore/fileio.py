"""Small file-system helpers the commit protocol and the backends share."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve(path: Path, extra_bytes: int) -> None:
    """Allocate ``extra_bytes`` past the end of ``path`` before a C library writes there.

    LMDB and HDF5 report a full disk in the middle of a write (LMDB as an I/O error, HDF5 with a
    handle left unusable, sometimes crashing the process at close). Claiming the blocks first turns
    a full disk or a file size limit into a clean ``OSError`` (ENOSPC, EFBIG) before anything is written.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size + extra_bytes)
    finally:
        os.close(fd)
