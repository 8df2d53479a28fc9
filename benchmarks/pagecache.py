"""Cold rounds: evict files from the page cache, and check with ``mincore`` that they left.

``posix_fadvise(POSIX_FADV_DONTNEED)`` needs no root, but it is advice: the kernel keeps dirty
pages (so each file is fsynced first) and pages mapped into any process's address space (an open
LMDB map, a NumPy memmap someone touched). So :func:`evict` is always followed by a check:
:func:`resident_bytes` maps the file and asks ``mincore(2)`` which of its pages are in memory, and
:func:`make_cold` raises :class:`StillCachedError` naming the files the kernel kept, rather than
letting a "cold" round run warm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
# Pages a file may keep and still count as evicted: none. A cold round is only what it says if
# nothing of what it reads is in memory; a store's own handle opened after the eviction reads its
# header pages, as any cold start does.
TOLERATED_BYTES = 0
EVICT_ATTEMPTS = 5  # evictions tried before a file still cached is an error (make_cold)
EVICT_RETRY_SECONDS = 0.2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_libc.mincore.restype = ctypes.c_int


class StillCachedError(RuntimeError):
    """The kernel kept pages of files that were evicted (mapped by a process, or not evictable here)."""


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root`` (what a store's reader may read), symbolic links not followed."""
    found = []
    for folder, _dirs, names in os.walk(root):
        paths = (Path(folder, name) for name in names)
        found += [path for path in paths if path.is_file() and not path.is_symlink()]
    return sorted(found)


def evict(paths: Iterable[Path]) -> None:
    """Write back and drop every page of ``paths`` from the page cache (``POSIX_FADV_DONTNEED``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (``mincore`` on a fresh read-only map of it, never touched)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) as mapped:
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(mapped, dtype=np.uint8)  # its address only: no page is touched
        try:
            if _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"mincore failed on {path}: {os.strerror(errno)}")
        finally:
            del view  # the map cannot close while an array holds it
        resident = int(np.count_nonzero(np.ctypeslib.as_array(vector) & 1))
    return min(resident * PAGE, size)


def make_cold(paths: Iterable[Path]) -> int:
    """Evict ``paths`` and check they left; returns their total size. Raises StillCachedError if not."""
    paths = list(paths)
    for _ in range(EVICT_ATTEMPTS):
        evict(paths)
        kept = {path: resident_bytes(path) for path in paths}
        total_kept = sum(kept.values())
        if total_kept <= TOLERATED_BYTES:
            break
        # A DataLoader worker of the round before may still be exiting, its maps pinning a few pages
        # (seen once: 36 KB of LMDB's data.mdb after a 2-worker round): give it a moment, then again.
        time.sleep(EVICT_RETRY_SECONDS)
    if total_kept > TOLERATED_BYTES:
        worst = sorted(kept.items(), key=lambda item: -item[1])[:3]
        raise StillCachedError(
            f"the kernel kept {total_kept:,} bytes of {len(paths)} evicted files in the page cache "
            f"(mapped by a process?): " + ", ".join(f"{p.name} {b:,} B" for p, b in worst if b)
        )
    return sum(path.stat().st_size for path in paths)
