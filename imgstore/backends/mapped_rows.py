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
from collections.abc import Mapping, Sequence

import numpy as np

_PIECE_BYTES = 1 << 16
UNKNOWN, LIBRARY = -1, -2  # a record's offset in LearnedOffsets: not learned yet; read it through the library


class LearnedOffsets:
    """Where each record's bytes lie in a store's files, learned lazily (LevelDB tables, SQLite pages).

    ``offsets`` per record: the bytes' offset, UNKNOWN until ``learn(index)`` (which learns that
    record and its neighbours) is asked, LIBRARY where the backend's library must read it instead."""

    offsets: np.ndarray

    def learn(self, index: int) -> None:
        raise NotImplementedError

    def offset(self, index: int) -> int:
        """Record ``index``'s offset, learned if need be; negative: the library reads it."""
        if index >= len(self.offsets):
            return LIBRARY
        offset: int = self.offsets.item(index)
        if offset == UNKNOWN:
            self.learn(index)
            offset = self.offsets.item(index)
        return offset

    def located(self, indices: np.ndarray) -> np.ndarray | None:
        """The offsets of records ``indices``, learned where need be; None if the library must read any."""
        if len(indices) and int(indices.max()) >= len(self.offsets):
            return None
        offsets = self.offsets[indices]
        if len(offsets) and offsets.min() == UNKNOWN:
            for index in indices[offsets == UNKNOWN].tolist():
                self.offset(index)
            offsets = self.offsets[indices]
        return offsets if not len(offsets) or offsets.min() >= 0 else None


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


Sources = Sequence[np.ndarray] | Mapping[int, np.ndarray]


def copy_records(sources: Sources, slots: np.ndarray, offsets: np.ndarray, size: int, out: np.ndarray) -> None:
    """Copy ``size``-byte records, record k at ``offsets[k]`` of ``sources[slots[k]]`` (uint8 arrays, e.g. maps
    of files; TileDB's attribute files by descriptor slot), into ``out`` (uint8, C order, ``len(offsets) * size``
    bytes), with as few copies as NumPy allows.

    Records back to back in one source are one run (one slice copy); runs of one source and length
    that lie equally spaced (a LevelDB table's consecutive blocks) are one strided copy."""
    if not len(offsets):
        return
    flat = out.reshape(-1)
    joined = (slots[1:] == slots[:-1]) & (offsets[1:] == offsets[:-1] + size)
    first = np.flatnonzero(np.concatenate(([True], ~joined)))  # each run's first record
    length = np.diff(np.append(first, len(offsets)))  # its records
    run_offsets, run_slots = offsets[first], slots[first]
    stride = np.diff(run_offsets)
    # run k joins run k + 1: same source and length, and (past a group's first pair) the same spacing
    same = (run_slots[1:] == run_slots[:-1]) & (length[1:] == length[:-1])
    same[1:] &= stride[1:] == stride[:-1]
    groups = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.append(groups[1:], len(first))
    for group, end, at, records, offset, slot, step in zip(
        groups.tolist(),
        ends.tolist(),
        first[groups].tolist(),
        length[groups].tolist(),
        run_offsets[groups].tolist(),
        run_slots[groups].tolist(),
        np.append(stride, 0)[groups].tolist(),
        strict=True,
    ):
        source, nbytes = sources[slot], records * size
        if end - group == 1:
            flat[at * size : at * size + nbytes] = source[offset : offset + nbytes]
        else:  # the rows lie inside source (each run does), whatever the sign of step
            runs = np.lib.stride_tricks.as_strided(source[offset:], (end - group, nbytes), (step, 1))
            flat[at * size : (at + (end - group) * records) * size].reshape(-1, nbytes)[:] = runs
