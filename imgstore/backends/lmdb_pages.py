"""Checks of an LMDB data file's pages, read with ``pread`` before liblmdb walks them.

LMDB keeps no checksums, and liblmdb trusts every page it reads: on a damaged one it fails an
assertion (SIGABRT: ``Assertion 'IS_LEAF(mp)' failed in mdb_cursor_next()``) or reads past its
memory map (SIGBUS, SIGSEGV), which kills the process. So a :class:`Snapshot` reads the pages of a
snapshot from the file (never through a mapping: a damaged page number must be an error here, not
a fault) and checks what liblmdb relies on, before a transaction of that snapshot walks them. This
module is the policy (which pages, checked for what, when); reading and parsing pages, and the
layouts, are lmdb_layout's.

When a snapshot is first read:

* both meta pages (page number, flags, magic, version, page size, transaction ids), and in the
  one the snapshot reads its trees' roots, depths, flags and page counts, the file long enough;
* every page of the free-page tree, and the page lists it holds (a writer takes pages from them);
* every branch page of the records' tree: type, free-space bounds, node offsets, child page
  numbers, 8-byte keys in order and within the range their parent gives them;
* no page twice among those pages, the records' leaf pages and the pages listed free.

Before a read walks them (in groups, see GROUP; all of them when a store opens if they are few):
the records' leaf pages the same way, each value inside its page or its overflow pages inside the
file and on no page above (nor on another value's checked with it); and when all are checked, the
counts of the meta page. Before a write deletes values: the headers of their overflow pages
(liblmdb frees as many pages as a header says). A store of values smaller than half a page is
nearly all leaf pages: a read of a few records must not cost a read of them all.

Layouts are liblmdb 0.9's on a 64-bit little-endian host; elsewhere nothing is checked (see lmdb_layout).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from imgstore.backends.lmdb_layout import (
    F_BIGDATA,
    FIXEDMAP,
    HEADER,
    INTEGERKEY,
    KEY,
    MAX_DEPTH,
    NO_ROOT,
    NODE,
    NOSUBDIR,
    P_BRANCH,
    P_LEAF,
    P_OVERFLOW,
    SUPPORTED,
    DataFile,
    Db,
    Nodes,
    overflow_pages,
    u64,
)
from imgstore.errors import CorruptStoreError

__all__ = ["F_BIGDATA", "GROUP", "Snapshot", "SnapshotMoved"]  # F_BIGDATA too: tests read it from here

# Leaf pages are checked in aligned groups: a numpy pass costs ~0.3 ms whatever its size, so a
# lookup of one record checks its page's group (1 MiB, read in one go where appends left the
# pages side by side); opening a store of at most one group checks it all (check_if_few).
GROUP = 256


class SnapshotMoved(Exception):
    """The meta page of the snapshot now holds a later one (two commits since the transaction began)."""


def _within(keys: np.ndarray, lo: np.ndarray, page: np.ndarray, strict: bool) -> np.ndarray:
    """Whether each key is in its page's range (``page`` indexes ``lo``, a whole level): from the page's
    least key (above it if ``strict``) to the next page's least key, or on from the last page's."""
    above = keys > lo[page] if strict else keys >= lo[page]
    within: np.ndarray = above & ((page == len(lo) - 1) | (keys < lo[np.minimum(page + 1, len(lo) - 1)]))
    return within


class Snapshot:
    """The pages of one LMDB snapshot (a committed transaction, ``txnid``) that liblmdb may walk, checked.

    Made while a transaction of the snapshot is open (its pages cannot be reused meanwhile); raises
    :class:`CorruptStoreError` on damage, :class:`SnapshotMoved` if the snapshot's meta page was
    rewritten (begin a transaction again). The leaf pages are checked by :meth:`check_keys`,
    :meth:`check_range` and :meth:`check_tail` before a transaction walks them.
    """

    def __init__(self, path: str, psize: int, txnid: int, previous: Snapshot | None = None) -> None:
        self.path, self.psize, self.txnid = path, psize, txnid
        self._file = DataFile(path, psize)
        self._lock = threading.Lock()
        # Branch pages checked, by tree then page number: (child page numbers, keys). A page of the
        # snapshot before (txnid - 1) that this one still uses is the same page, unchanged (a commit
        # writes only pages that were free or new), so it is not read again: a writer's commits,
        # and a reader that reads after each, walk only the pages a commit wrote.
        self._parsed: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._known = previous._parsed if previous is not None and previous.txnid == txnid - 1 else {}
        self.leaves = np.zeros(0, np.uint64)  # the records' leaf pages, in key order
        self._leaf_lo = np.zeros(0, np.uint64)  # the least key each may hold (up to the next one's)
        self._checked = np.zeros(0, bool)
        self.unchecked = 0  # leaf pages left to check: 0 is the fast path of every read
        self._used = np.zeros(0, np.uint64)  # sorted: the pages of the trees and of the free lists
        self._entries = self._overflow = 0  # of the leaf pages checked, for the meta's counts
        if not SUPPORTED:
            return
        fd = self._file.open()
        try:
            self._check(fd)
        finally:
            os.close(fd)
        self._known = {}  # the snapshot before's pages: no longer needed

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork

    # -------------------------------------------------------------- reads ask for their leaf pages

    def check_if_few(self) -> None:
        """All the leaf pages, if they are one group: damage anywhere in a small store is an error at once."""
        if self.unchecked and len(self.leaves) <= GROUP:
            self._check_leaves(np.arange(len(self.leaves)))

    def check_key(self, key: int) -> None:
        """Before a lookup of ``key``: the leaf page it leads to."""
        if self.unchecked:
            self._check_leaves(np.searchsorted(self._leaf_lo, np.array([key], np.uint64), "right") - 1)

    def check_keys(self, keys: np.ndarray) -> None:
        """Before lookups of ``keys`` (non-negative integers, any order)."""
        if self.unchecked:
            self._check_leaves(np.searchsorted(self._leaf_lo, keys.astype(np.uint64), "right") - 1)

    def check_range(self, first: int, last: int) -> None:
        """Before a cursor walks from ``first`` to ``last``: their leaf pages, those between, and the one
        after (a cursor that takes the record after ``last`` steps into it)."""
        if self.unchecked:
            lo, hi = np.searchsorted(self._leaf_lo, np.array([first, last], np.uint64), "right") - 1
            self._check_leaves(np.arange(max(lo, 0), min(hi + 2, len(self.leaves))))

    def check_tail(self, first: int) -> None:
        """Before a write deletes the records from ``first`` on and appends: the leaf pages it walks (the
        one before, which deleting may merge, to the last) and the overflow headers of the values it
        frees (liblmdb frees as many pages as a header says, and asserts on some of its flags)."""
        if not SUPPORTED or not len(self.leaves):
            return
        start = max(int(np.searchsorted(self._leaf_lo, np.uint64(first), "right")) - 2, 0)
        tail = np.arange(start, len(self.leaves))
        self._check_leaves(tail, groups=False)  # a write's snapshot is new each time: no more than it walks
        fd = self._file.open()
        try:
            rows = self._file.read(fd, self.leaves[tail], "leaf")
            nodes = self._file.nodes(rows, self.leaves[tail], P_LEAF, 1, "leaf")
            flat = rows.reshape(-1)
            big = (nodes.flags & F_BIGDATA).astype(bool) & (u64(flat, nodes.at + NODE, ">") >= first)
            sizes = nodes.lo[big]
            for pgno, size in zip(u64(flat, nodes.at[big] + NODE + KEY).tolist(), sizes.tolist(), strict=True):
                stored, flags, pages = self._file.overflow_header(fd, pgno)
                if (stored, flags, pages) != (pgno, P_OVERFLOW, int(overflow_pages(np.int64(size), self.psize))):
                    raise self._file.damaged(pgno, "overflow", f"header {stored}, flags {flags:#x}, {pages} pages")
        finally:
            os.close(fd)

    # -------------------------------------------------------------- the snapshot

    def _check(self, fd: int) -> None:
        psize, txnid = self.psize, self.txnid
        metas = [self._file.meta(fd, slot) for slot in (0, 1)]
        meta, other = metas[txnid & 1], metas[1 - (txnid & 1)]
        if meta.txnid != txnid:
            raise SnapshotMoved(txnid)
        # Commits alternate between the two pages: the other holds the one before (or a later one,
        # committed since the transaction began); both hold 0 in a new file.
        if not (other.txnid == txnid - 1 or other.txnid > txnid or other.txnid == txnid == 0):
            raise self._file.damaged(1 - (txnid & 1), "meta", f"transaction {other.txnid} beside {txnid}")
        if meta.free.flags & ~(FIXEDMAP | NOSUBDIR) != INTEGERKEY or meta.main.flags != 0:
            raise self._file.damaged(txnid & 1, "meta", f"tree flags {meta.free.flags:#x}, {meta.main.flags:#x}")
        self.last_pgno = meta.last_pgno
        if meta.last_pgno < 1 or os.fstat(fd).st_size < (meta.last_pgno + 1) * psize:
            raise CorruptStoreError(f"{self.path} is truncated: LMDB uses {meta.last_pgno + 1} pages of {psize} bytes")
        for db in (meta.free, meta.main):
            empty = db.root == NO_ROOT
            if (db.depth == 0) != empty or db.depth > MAX_DEPTH or not (empty or 2 <= db.root <= meta.last_pgno):
                raise self._file.damaged(txnid & 1, "meta", f"root {db.root}, depth {db.depth}")

        free_pages, listed = self._free_tree(fd, meta.free)
        branches, leaves, lo = self._branches(fd, meta.main, P_BRANCH, 2, ">", "records'")
        if len(branches) != meta.main.branch_pages or len(leaves) != meta.main.leaf_pages:
            raise self._file.damaged(txnid & 1, "meta", f"{len(branches)}, {len(leaves)} branch, leaf pages")
        used = np.sort(np.concatenate([free_pages, listed, branches, leaves]))
        twice = np.flatnonzero(used[1:] == used[:-1])
        if len(twice):
            raise self._file.damaged(int(used[twice[0]]), "", "in two places (trees, free lists)")
        self.leaves, self._leaf_lo, self._used = leaves, lo, used
        self._checked = np.zeros(len(leaves), bool)
        self.unchecked, self._main = len(leaves), meta.main

    def _free_tree(self, fd: int, db: Db) -> tuple[np.ndarray, np.ndarray]:
        """Check the free-page tree (all of it: a writer walks it) and its page lists; (its pages, the pages listed)."""
        branches, leaves, lo = self._branches(fd, db, P_BRANCH, 1, "<", "free-page")
        pages = [branches, leaves]
        entries = overflow = 0
        listed: list[np.ndarray] = []
        if len(leaves):
            rows = self._file.read(fd, leaves, "free-page leaf")
            nodes = self._leaf_nodes(rows, leaves, np.arange(len(leaves)), lo, "<", "free-page leaf")
            flat = rows.reshape(-1)
            keys = u64(flat, nodes.at + NODE)
            if keys[0] < 1 or keys[-1] > self.txnid:  # freed by a committed transaction
                raise self._file.damaged(
                    int(leaves[nodes.page[0]]), "free-page leaf", f"transactions {keys[0]}..{keys[-1]}"
                )
            entries = len(keys)
            for k in range(entries):
                size, at = int(nodes.lo[k]), int(nodes.at[k]) + NODE + KEY
                if nodes.flags[k] & F_BIGDATA:
                    pgno = int(u64(flat, np.array([at]))[0])
                    if not 2 <= pgno <= self.last_pgno:
                        raise self._file.damaged(
                            int(leaves[nodes.page[k]]), "free-page leaf", "a value out of the file"
                        )
                    stored, flags, count = self._file.overflow_header(fd, pgno)
                    # A list may keep more pages than it needs (mdb_freelist_save shrinks it in place).
                    need = int(overflow_pages(np.int64(size), self.psize))
                    if (stored, flags) != (pgno, P_OVERFLOW) or not need <= count <= self.last_pgno + 1 - pgno:
                        raise self._file.damaged(
                            pgno, "free-page overflow", f"header {stored}, {flags:#x}, {count} pages"
                        )
                    value = os.pread(fd, size, pgno * self.psize + HEADER)
                    pages.append(np.arange(pgno, pgno + count, dtype=np.uint64))
                    overflow += count
                else:
                    value = flat[at : at + size].tobytes()
                listed.append(self._page_list(value, int(leaves[nodes.page[k]])))
        if (len(pages[0]), len(leaves), overflow, entries) != (
            db.branch_pages,
            db.leaf_pages,
            db.overflow_pages,
            db.entries,
        ):
            raise self._file.damaged(self.txnid & 1, "meta", "the free-page tree's counts differ from its pages")
        return np.concatenate(pages), np.concatenate(listed) if listed else np.zeros(0, np.uint64)

    def _page_list(self, value: bytes, pgno: int) -> np.ndarray:
        """An MDB_IDL: its length, then page numbers in descending order (room for more may follow)."""
        if len(value) < 8 or len(value) % 8:
            raise self._file.damaged(pgno, "free-page leaf", f"a page list of {len(value)} bytes")
        ids = np.frombuffer(value, "<u8")
        count = int(ids[0])
        if count > len(ids) - 1:
            raise self._file.damaged(pgno, "free-page leaf", f"a page list of {count} pages in {len(value)} bytes")
        ids = ids[1 : 1 + count]
        if count and (ids[-1] < 2 or ids[0] > self.last_pgno or np.any(ids[1:] >= ids[:-1])):
            raise self._file.damaged(pgno, "free-page leaf", "a page list out of order or out of the file")
        return ids

    def _branches(
        self, fd: int, db: Db, kind: int, min_keys: int, order: str, tree: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check a tree's branch pages, level by level; (their page numbers, the leaf pages, the least key of each)."""
        parsed = self._parsed.setdefault(tree, {})
        known = self._known.get(tree, {})
        pgnos = np.array([db.root], np.uint64) if db.depth else np.zeros(0, np.uint64)
        lo = np.zeros(len(pgnos), np.uint64)  # keys of a page's subtree: from its lo up to the next page's
        branches = [np.zeros(0, np.uint64)]
        for _ in range(db.depth - 1):
            what = f"{tree} branch"
            pages = pgnos.tolist()
            new = np.array([k for k, pgno in enumerate(pages) if pgno not in known], np.int64)
            if len(new):
                self._parse_branches(fd, pgnos[new], kind, min_keys, order, what, parsed)
            per_page = [parsed.get(pgno) or known[pgno] for pgno in pages]
            parsed.update(zip(pages, per_page, strict=True))
            children = np.concatenate([nodes[0] for nodes in per_page])
            keys = np.concatenate([nodes[1] for nodes in per_page])
            count = np.array([len(nodes[0]) for nodes in per_page])
            page = np.repeat(np.arange(len(pages)), count)
            keyed = np.arange(len(page)) > np.repeat(np.cumsum(count) - count, count)  # node 1 on
            # Keys of node 1 on: above the page's least key (or node 0 would lead nowhere), under the next page's.
            self._file.fail(pgnos, page, keyed & ~_within(keys, lo, page, strict=True), what, "keys out of order")
            branches.append(pgnos)
            pgnos, lo = children, np.where(keyed, keys, lo[page])
        return np.concatenate(branches), pgnos, lo

    def _parse_branches(
        self,
        fd: int,
        pgnos: np.ndarray,
        kind: int,
        min_keys: int,
        order: str,
        what: str,
        parsed: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Check what branch pages hold on their own; their (children, keys: 0 for node 0) into ``parsed``."""
        rows = self._file.read(fd, pgnos, what)
        nodes = self._file.nodes(rows, pgnos, kind, min_keys, what)
        flat = rows.reshape(-1)
        # Node 0's key is never read (liblmdb searches from node 1): it may be empty.
        keyed = nodes.slot > 0
        bad = np.where(keyed, nodes.ksize != KEY, (nodes.ksize != 0) & (nodes.ksize != KEY))
        self._file.fail(pgnos, nodes.page, bad, what, "a key that is not 8 bytes")
        self._file.fail(pgnos, nodes.page, nodes.at + NODE + nodes.ksize > nodes.end, what, "a node past its page")
        keys = np.zeros(len(nodes.at), np.uint64)
        keys[keyed] = u64(flat, nodes.at[keyed] + NODE, order)
        bad = np.zeros(len(keys), bool)
        bad[1:] = keyed[1:] & keyed[:-1] & (keys[1:] <= keys[:-1])
        self._file.fail(pgnos, nodes.page, bad, what, "keys out of order")
        children = nodes.lo.astype(np.uint64)
        self._file.fail(
            pgnos, nodes.page, (children < 2) | (children > self.last_pgno), what, "a child out of the file"
        )
        cuts = np.cumsum(np.bincount(nodes.page, minlength=len(pgnos)))[:-1]
        parsed.update(
            zip(pgnos.tolist(), zip(np.split(children, cuts), np.split(keys, cuts), strict=True), strict=True)
        )

    # -------------------------------------------------------------- leaf pages

    def _check_leaves(self, indices: np.ndarray, fd: int | None = None, groups: bool = True) -> None:
        """Check leaf pages ``indices`` (and the rest of their groups) that are not checked yet."""
        if not len(indices) or self._checked[indices].all():
            return
        with self._lock:
            if groups:
                starts = np.unique(indices[~self._checked[indices]] // GROUP) * GROUP
                indices = (starts[:, None] + np.arange(GROUP)).reshape(-1)
            indices = np.unique(indices[indices < len(self.leaves)])
            indices = indices[~self._checked[indices]]
            if not len(indices):
                return
            own = fd is None
            fd = self._file.open() if fd is None else fd
            try:
                entries = overflow = 0
                for start in range(0, len(indices), GROUP):  # bounded memory, in the CPU cache
                    counts = self._check_leaf_pages(fd, indices[start : start + GROUP])
                    entries, overflow = entries + counts[0], overflow + counts[1]
            finally:
                if own:
                    os.close(fd)
            entries, overflow = self._entries + entries, self._overflow + overflow
            if len(indices) == self.unchecked and (entries, overflow) != (
                self._main.entries,
                self._main.overflow_pages,
            ):
                raise self._file.damaged(self.txnid & 1, "meta", "the records' tree's counts differ from its pages")
            self._entries, self._overflow = entries, overflow
            self._checked[indices] = True
            self.unchecked -= len(indices)

    def _check_leaf_pages(self, fd: int, indices: np.ndarray) -> tuple[int, int]:
        """Check leaf pages ``indices``; (their entries, their values' overflow pages)."""
        pgnos = self.leaves[indices]
        what = "records' leaf"
        rows = self._file.read(fd, pgnos, what)
        nodes = self._leaf_nodes(rows, pgnos, indices, self._leaf_lo, ">", what)
        flat = rows.reshape(-1)
        big = (nodes.flags & F_BIGDATA).astype(bool)
        first = u64(flat, nodes.at[big] + NODE + KEY)
        count = overflow_pages(nodes.lo[big], self.psize).astype(np.uint64)
        bad = np.zeros(len(nodes.at), bool)
        bad[big] = (first < 2) | (first > self.last_pgno) | (first + count > self.last_pgno + 1)
        self._file.fail(pgnos, nodes.page, bad, what, "a value out of the file")
        # Overflow pages are nobody else's: not a tree page, not listed free, not another value's of these pages.
        order = np.argsort(first)
        first, count = first[order], count[order]
        taken = np.searchsorted(self._used, first)
        clash = (taken < len(self._used)) & (self._used[np.minimum(taken, len(self._used) - 1)] < first + count)
        clash[1:] |= first[1:] < first[:-1] + count[:-1]
        if clash.any():
            raise self._file.damaged(
                int(first[np.argmax(clash)]), "overflow", "in two places (values, trees, free lists)"
            )
        return len(nodes.at), int(count.sum())

    def _leaf_nodes(
        self, rows: np.ndarray, pgnos: np.ndarray, indices: np.ndarray, lo: np.ndarray, order: str, what: str
    ) -> Nodes:
        """Check leaf pages ``indices`` of a level whose least keys are ``lo`` (values' overflow pages aside)."""
        nodes = self._file.nodes(rows, pgnos, P_LEAF, 1, what)
        flat = rows.reshape(-1)
        self._file.fail(pgnos, nodes.page, nodes.ksize != KEY, what, "a key that is not 8 bytes")
        self._file.fail(pgnos, nodes.page, (nodes.flags & ~F_BIGDATA) != 0, what, "node flags of another kind of tree")
        big = (nodes.flags & F_BIGDATA).astype(bool)
        size = np.where(big, 8, nodes.lo)  # a value on overflow pages leaves its first page number here
        self._file.fail(pgnos, nodes.page, nodes.at + NODE + KEY + size > nodes.end, what, "a value past its page")
        keys = u64(flat, nodes.at + NODE, order)
        bad = ~_within(keys, lo, indices[nodes.page], strict=False)
        bad[1:] |= (nodes.page[1:] == nodes.page[:-1]) & (keys[1:] <= keys[:-1])
        self._file.fail(pgnos, nodes.page, bad, what, "keys out of order")
        return nodes
