"""Records of one size gathered out of a read-only memory map of a store file, by byte offset.

A shuffled batch read as one ``pread`` per record costs a system call and a Python loop turn per
image (~3-5 µs a CIFAR image on a busy 2-core machine); one NumPy gather over a map of the file
costs what the limit's ``.npy`` gather costs (~1-2 µs). The map is this handle's own, of the file's
size when it was made, and grows (a new map) when a read needs bytes past it; a read past the
file's end (the file's size at each read) is refused (the caller reports the damage), never a
SIGBUS. Only a file cut short by another program during a read itself could still kill the reader
with SIGBUS; imgstore never shrinks a store file below a committed record.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

_PIECE_BYTES = 1 << 16


class MappedRows:
    """Gathers ``nbytes``-byte records at given file offsets from the file open as ``fd`` (not owned)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._bytes: np.ndarray | None = None  # the whole map, uint8

    def holds(self, offset: int, value: np.ndarray, sample: int = 64) -> bool:
        """Whether the file holds ``value`` (uint8) at ``offset``, judged by its first ``sample``
        bytes (comparing more would fault in the pages of ``value``'s own mapping: ~0.5 µs a page)."""
        if offset < 0 or not self._cover(offset + len(value)):
            return False
        return self._bytes[offset : offset + sample].tobytes() == value[:sample].tobytes()  # type: ignore[index]

    def _cover(self, need: int) -> bool:
        """Map the file anew if the map ends before ``need``; False if the file does."""
        # The file's size now, at every read: a file cut short since it was mapped (another program
        # copying over it) must not be read through the old map's pages past its end (SIGBUS).
        size = os.fstat(self._fd).st_size
        if size < need:
            return False
        if self._bytes is None or len(self._bytes) < need:
            self._bytes = np.frombuffer(mmap.mmap(self._fd, size, prot=mmap.PROT_READ), dtype=np.uint8)
        return True

    def gather(self, offsets: np.ndarray, nbytes: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """The records at ``offsets`` (int64, ascending or not) as rows ``[n, nbytes]``, copied into ``out``
        if given, else into a new array; None, copying nothing, if the file does not hold them all."""
        if not len(offsets):
            return np.empty((0, nbytes), np.uint8) if out is None else out
        if int(offsets.min()) < 0 or not self._cover(int(offsets.max()) + nbytes):
            return None
        assert self._bytes is not None
        # Every nbytes-long window of the file as one item (a void of nbytes at a stride of 1 byte):
        # the gather is one fancy index, straight into the new array it makes.
        item = np.dtype((np.void, nbytes))
        windows = np.ndarray((len(self._bytes) - nbytes + 1,), item, self._bytes, strides=(1,))
        if out is None:
            return windows[offsets].view(np.uint8).reshape(len(offsets), nbytes)  # type: ignore[no-any-return]
        # Into a given array the gather goes through a temporary: in pieces of ~64 KiB that stay in
        # the CPU cache until copied out (a whole batch at once is ~1.5x slower for CIFAR).
        assert out.flags.c_contiguous  # so the view below is out's own memory, not a copy
        rows = out.reshape(len(offsets), nbytes).view(item).reshape(len(offsets))
        step = max(1, _PIECE_BYTES // nbytes)
        for lo in range(0, len(offsets), step):
            rows[lo : lo + step] = windows[offsets[lo : lo + step]]
        return out
