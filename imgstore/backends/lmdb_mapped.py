"""Shuffled batches of an LMDB store gathered out of a read-only map of ``data.mdb``, by file offset.

A block of records is one LMDB value on overflow pages: its bytes lie at one file offset. A
shuffled batch read as one ``txn.get`` per image spends most of its time in those gets (59% of an
epoch of 50 000 CIFAR images). Here each block's offset is learned once per snapshot from
liblmdb's own answer (the address ``txn.get`` returns, less the overflow page's header, whose page
number gives the file offset) and kept per record with its label; then a batch is one NumPy gather,
as HDF5's, and an index into the labels. The page numbers are checked against each other: every
value of a snapshot must imply the same address for page 0 of liblmdb's map, so a damaged header
is never trusted (the caller then reads with ``txn.get``).
Offsets are used only inside a read transaction of the snapshot they were learned in, whose
pages LMDB never reuses while it is open.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import weakref

import lmdb
import numpy as np

from imgstore.backends.lmdb_layout import HEADER, P_OVERFLOW
from imgstore.backends.mapped_rows import MappedRows

_PAGE_HEADER = struct.Struct("<Q2xHI")  # an overflow page's mp_pgno, (pad), mp_flags, mp_pages
_instances: weakref.WeakSet[MappedBlocks] = weakref.WeakSet()


def _new_locks() -> None:
    for mapped in list(_instances):  # a fork while another thread held a lock: the child's is free
        mapped._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks)


class MappedBlocks:
    """Where each block's value lies in ``data.mdb`` (one snapshot), and gathers out of a map of it."""

    def __init__(self, data_file: str, psize: int) -> None:
        self._fd = os.open(data_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._rows = MappedRows(self._fd)
        self._psize = psize
        self._key: tuple[int, int, int] | None = None  # (process, environment, snapshot) of the tables
        # Per record (index): its pixels' file offset (-1: its block not learned yet, or no such
        # record) and its label. 16 bytes a record, so a batch is three NumPy indexings and a gather.
        self._offsets = np.empty(0, dtype=np.int64)
        self._labels = np.empty(0, dtype=np.int64)
        self._base = 0  # the address of page 0 in liblmdb's map that every value implies
        self._lock = threading.Lock()
        _instances.add(self)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def gather(
        self,
        txn: lmdb.Transaction,
        env: lmdb.Environment,
        indices: np.ndarray,
        layout: tuple[int, int],
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Records ``indices`` (of a store of ``layout``: image bytes, records per block) as ``(images
        [n, image bytes], labels int64)`` read inside ``txn``, into ``out`` if given, else new arrays;
        None, with nothing promised about ``out``, where the caller must read them itself."""
        with self._lock:  # threads share a handle: one of them may be learning another snapshot
            offsets = self._locate(txn, env, indices, layout)
            labels = None if offsets is None else self._labels[indices]
        if offsets is None or labels is None:
            return None
        images = self._rows.gather(offsets, layout[0], None if out is None else out[0])
        if images is None:
            return None
        if out is None:
            return images, labels
        out[1][:] = labels
        return out

    def _locate(
        self, txn: lmdb.Transaction, env: lmdb.Environment, indices: np.ndarray, layout: tuple[int, int]
    ) -> np.ndarray | None:
        """The file offsets of records ``indices`` in ``txn``'s snapshot, or None."""
        if self._fd < 0:
            return None
        key = (os.getpid(), id(env), txn.id())
        if key != self._key:
            self._key, self._base = key, 0
            self._offsets = np.empty(0, dtype=np.int64)
            self._labels = np.empty(0, dtype=np.int64)
        top = int(indices.max()) + 1
        if top > len(self._offsets):
            grow = max(top, 2 * len(self._offsets)) - len(self._offsets)
            self._offsets = np.concatenate([self._offsets, np.full(grow, -1, np.int64)])
            self._labels = np.concatenate([self._labels, np.zeros(grow, np.int64)])
        offsets = self._offsets[indices]
        if offsets.min() < 0:
            blocks = np.unique(indices[offsets < 0] // layout[1])
            if not self._learn(txn, blocks, *layout):
                return None
            offsets = self._offsets[indices]
            if offsets.min() < 0:
                return None  # a record past its block's end: missing (the caller's txn.get says so)
        return offsets  # type: ignore[no-any-return]

    def _learn(self, txn: lmdb.Transaction, blocks: np.ndarray, size: int, per_block: int) -> bool:
        get, psize, record = txn.get, self._psize, size + 8
        for block in blocks.tolist():
            value = get(block.to_bytes(8, "big"))
            if value is None:
                return False
            count = len(value) // record
            if len(value) != count * record or not 1 <= count <= per_block:
                return False
            array = np.frombuffer(value, dtype=np.uint8)
            address = array.ctypes.data
            pgno, flags, pages = _PAGE_HEADER.unpack(ctypes.string_at(address - HEADER, _PAGE_HEADER.size))
            base = address - HEADER - pgno * psize
            if (
                not flags & P_OVERFLOW
                or pages != -(-(len(value) + HEADER) // psize)
                or base % mmap.PAGESIZE  # liblmdb's map starts on a page
                or (self._base and base != self._base)
                # liblmdb never reads an overflow page's own page number: a damaged one could name
                # another value's pages, so the file must hold this value's bytes where it says
                # (its first pixels, on the page whose header was just read)
                or not self._rows.holds(pgno * psize + HEADER, array)
            ):
                return False  # a value in a leaf page, or a header that disagrees: no offsets
            self._base = base
            # learned once a snapshot: a batch's labels are then an index into memory, not a second
            # gather out of the map (a cache miss a record, on another page than its pixels)
            first, stop = block * per_block, min(block * per_block + count, len(self._offsets))
            self._offsets[first:stop] = pgno * psize + HEADER + size * np.arange(stop - first)
            self._labels[first:stop] = array[count * size : count * size + 8 * (stop - first)].view("<i8")
        return True
