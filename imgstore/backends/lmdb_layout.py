"""The on-disk layout of an LMDB data file, for the checks of lmdb_pages: pages read, headers and nodes parsed.

Pages are read from the file with ``pread``, never through a mapping: a damaged page number must be
an error here, not a fault. Parsing checks what it needs to stay inside the pages it reads (page
numbers, flags, free-space bounds, node offsets, the meta pages' identity); what the trees must hold,
and which pages are checked when, is lmdb_pages'.

Layouts are liblmdb 0.9's (mdb.c: MDB_meta, MDB_db, MDB_page, MDB_node) on a 64-bit little-endian
host; elsewhere nothing is checked (``SUPPORTED``). Keys are 8 bytes in both trees: a record or block
number (big-endian) in the records' tree, a transaction id (native order) in the free-page tree.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import NamedTuple

import numpy as np

from imgstore.errors import CorruptStoreError

P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
F_BIGDATA = 0x01  # a leaf node whose value is on overflow pages: the node holds its first page number
MAGIC, DATA_VERSION = 0xBEEFC0DE, 1
HEADER = 16  # PAGEHDRSZ: mp_pgno (8 bytes), mp_pad, mp_flags, mp_lower, mp_upper (or mp_pages: 4)
NODE = 8  # NODESIZE: mn_lo, mn_hi, mn_flags, mn_ksize; then the key, then the value
KEY = 8
NO_ROOT = (1 << 64) - 1  # P_INVALID: an empty tree
MAX_DEPTH = 32  # CURSOR_STACK
INTEGERKEY, FIXEDMAP, NOSUBDIR = 0x08, 0x01, 0x4000  # the free tree's flags hold the environment's
SUPPORTED = sys.byteorder == "little" and struct.calcsize("P") == 8

# MDB_page's header and MDB_meta after it: magic, version, address, map size, the free and the
# records' MDB_db (pad, flags, depth, branch, leaf and overflow pages, entries, root), last page, txnid.
_META = struct.Struct("<Q2xH4xIIQQ" + "IHHQQQQQ" * 2 + "QQ")
_OVERFLOW_HEADER = struct.Struct("<Q2xHI")  # mp_pgno, mp_flags, mp_pages


class Db(NamedTuple):
    pad: int
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int


class Meta(NamedTuple):
    pgno: int
    flags: int
    magic: int
    version: int
    free: Db
    main: Db
    last_pgno: int
    txnid: int


class Nodes(NamedTuple):
    """The nodes of some pages (rows of ``flat``), in page then slot order."""

    page: np.ndarray  # int64: which page (row)
    slot: np.ndarray  # int64: its index in the page
    at: np.ndarray  # int64: its offset in ``flat``
    end: np.ndarray  # int64: the offset where its page ends in ``flat``
    lo: np.ndarray  # int64: mn_lo | mn_hi << 16 (a leaf value's size), and mn_flags << 32 for a child page number
    flags: np.ndarray  # int64: mn_flags
    ksize: np.ndarray  # int64


def _bytes8(flat: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The 8 bytes at each offset ``at`` of ``flat``, as rows: a gather of rows of a sliding window, which
    is several times faster than indexing with offsets + arange(8)."""
    rows: np.ndarray = np.lib.stride_tricks.sliding_window_view(flat, 8)[at]
    return rows


def u64(flat: np.ndarray, at: np.ndarray, order: str = "<") -> np.ndarray:
    values: np.ndarray = _bytes8(flat, at).view(order + "u8")[:, 0]
    return values


def _preadv(fd: int, into: np.ndarray, offset: int) -> int:
    """Read into ``into`` (C-contiguous) from ``offset``; the bytes read (fewer at the end of the file)."""
    view = into.data.cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - macOS before Python 3.?: pread and a copy
            data = os.pread(fd, len(view) - done, offset + done)
            view[done : done + len(data)] = data
            got = len(data)
        if not got:
            break
        done += got
    return done


def overflow_pages(size: np.ndarray, psize: int) -> np.ndarray:
    return (HEADER - 1 + size) // psize + 1  # OVPAGES


class DataFile:
    """The pages of an LMDB data file, read and parsed; damage is a :class:`CorruptStoreError` naming its page."""

    def __init__(self, path: str, psize: int) -> None:
        self.path, self.psize = path, psize

    def meta(self, fd: int, slot: int) -> Meta:
        """Meta page ``slot`` (0 or 1), checked to be one of this file (its other fields are the caller's to check)."""
        data = os.pread(fd, _META.size, slot * self.psize)
        if len(data) < _META.size:
            raise CorruptStoreError(f"{self.path} is truncated: no meta page {slot}")
        fields = _META.unpack(data)
        pgno, flags, magic, version, last_pgno, txnid = (*fields[:4], *fields[22:])
        meta = Meta(pgno, flags, magic, version, Db(*fields[6:14]), Db(*fields[14:22]), last_pgno, txnid)
        if (meta.pgno, meta.flags, meta.magic, meta.version, meta.free.pad) != (
            slot,
            P_META,
            MAGIC,
            DATA_VERSION,
            self.psize,
        ):
            raise self.damaged(slot, "meta", "not an LMDB meta page of this file")
        return meta

    def overflow_header(self, fd: int, pgno: int) -> tuple[int, int, int]:
        """The header of overflow page ``pgno``: (its page number, flags, pages)."""
        stored, flags, pages = _OVERFLOW_HEADER.unpack(os.pread(fd, _OVERFLOW_HEADER.size, pgno * self.psize))
        return stored, flags, pages

    def nodes(self, rows: np.ndarray, pgnos: np.ndarray, kind: int, min_keys: int, what: str) -> Nodes:
        """Check the headers and node offsets of pages of one kind; their nodes."""
        psize = self.psize
        head = np.ascontiguousarray(rows[:, :HEADER])
        stored = head[:, :8].view("<u8")[:, 0]
        _, flags, lower, upper = head[:, 8:].view("<u2").astype(np.int64).T
        self.fail(pgnos, None, stored != pgnos, what, "another page's number")
        self.fail(pgnos, None, flags != kind, what, "the flags of another kind of page")
        bad = (lower < HEADER + 2 * min_keys) | (lower % 2 != 0) | (upper < lower) | (upper > psize)
        self.fail(pgnos, None, bad, what, "free space bounds out of the page")
        count = (lower - HEADER) // 2
        page = np.repeat(np.arange(len(rows)), count)
        slot = np.arange(len(page)) - np.repeat(np.cumsum(count) - count, count)
        flat = rows.reshape(-1)
        base = page * psize
        offset = rows.view("<u2")[page, HEADER // 2 + slot].astype(np.int64)  # mp_ptrs
        # Nodes lie between the free space and the page's end, 2-byte aligned (EVEN sizes from the end).
        bad = (offset < upper[page]) | (offset % 2 != 0) | (offset + NODE > psize)
        self.fail(pgnos, page, bad, what, "a node out of the page")
        at = base + offset
        fields = _bytes8(flat, at).view("<u2").astype(np.int64)
        lo = fields[:, 0] | fields[:, 1] << 16 | fields[:, 2] << 32
        if kind != P_BRANCH:
            lo &= 0xFFFFFFFF  # a leaf value's size: mn_flags are flags there
        return Nodes(page, slot, at, base + psize, lo, fields[:, 2], fields[:, 3])

    def read(self, fd: int, pgnos: np.ndarray, what: str) -> np.ndarray:
        """Pages ``pgnos`` (any order) as rows of an (n, page size) array: one read per run of consecutive pages."""
        psize = self.psize
        ascending = bool(np.all(pgnos[1:] > pgnos[:-1]))  # as appends leave leaf pages: no reordering
        order = np.arange(len(pgnos)) if ascending else np.argsort(pgnos, kind="stable")
        ordered = pgnos[order]
        rows = np.empty((len(pgnos), psize), np.uint8)
        cuts = [0, *(np.flatnonzero(np.diff(ordered) != 1) + 1).tolist(), len(ordered)]
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            if _preadv(fd, rows[start:stop], int(ordered[start]) * psize) != (stop - start) * psize:
                raise CorruptStoreError(f"{self.path} is truncated: {what} page {int(ordered[start])} is missing")
        if ascending:
            return rows
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise CorruptStoreError(f"{self.path} is missing") from exc

    def fail(self, pgnos: np.ndarray, page: np.ndarray | None, bad: np.ndarray, what: str, reason: str) -> None:
        if bad.any():
            row = int(np.argmax(bad))
            raise self.damaged(int(pgnos[row if page is None else page[row]]), what, reason)

    def damaged(self, pgno: int, what: str, reason: str) -> CorruptStoreError:
        kind = f" ({what} page)" if what else ""
        return CorruptStoreError(f"{self.path}: page {pgno}{kind} is damaged ({reason})")
