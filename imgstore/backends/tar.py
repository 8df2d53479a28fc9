"""Tar backend: WebDataset-style shards (plain ustar tar files) and an index of where each record lies.

``tar-<gen>/shard-<gen>-000000.tar``, ``-000001.tar``, ...: each record is one WebDataset sample
(``KEY.npy`` or ``KEY.jpg``/``.png``/``.webp``..., then ``KEY.cls``; see :mod:`tar_format`), in
index order. A shard takes records until it holds ``shard_bytes``; then a new one starts.
``tarindex-<gen>.bin`` gives each record's shard, payload offset and length and label length, so
a ``get`` is one copy out of the shard's memory map; nothing is ever extracted, and member names
are never followed: reads go by the index's offsets only (checked against the shards' sizes). Nor
are symlinks: a shard or index that is a link is damage, and no write goes through one.

Raw stores of one shape read through a read-only ``mmap`` of each shard (a ``get`` is a copy out of
it, a scan a strided copy of the pixels and label texts: no ``preadv`` of the 5 120 bytes a 3 072-byte
record takes, measured in the README). A mapping of a file cut short under it would kill the process
with SIGBUS, so each mapping is made only after the shard's size is checked against the committed
records it holds, and every read out of one asks the shard's size again first (an ``lseek``, ~0.2 µs: a
shard cut short by another program since is damage; only a cut during the copy itself could still be a
SIGBUS). imgstore never cuts a shard below a committed record (only a killed write's tail).

Appending keeps every shard a valid tar archive for ``tar`` and ``webdataset`` at every moment,
holding whole records only:

- The last shard is appended to in place: its end-of-archive blocks (two zero blocks at ``P``)
  stay while the new records are written after them (from ``P + 1024``, then a new end), and
  the first 1 024 bytes of the new records go over them last, in one ``pwrite``. Until then a
  reader of the tar stops at ``P``; after it, it sees every new record, whole.
- A new shard is written under ``.tmp`` and renamed into place when whole.
- Before a write, whatever a killed write left past the committed records (a tail after ``P``,
  shards after the last committed one, ``.tmp`` files) is cut off or deleted, inside ``tar-<gen>/``
  only. Until then webdataset sees the records of a write killed after those steps but before its
  commit (whole samples, at the end); imgstore never does (the manifest's count governs).
"""

from __future__ import annotations

import copy
import math
import os
import re
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from imgstore.backends import tar_format as fmt
from imgstore.errors import CorruptStoreError, ImgStoreError
from imgstore.fileio import fsync_dir, holds, map_read_only
from imgstore.options import Option
from imgstore.store import Store

_CHUNK_BYTES = 8 << 20  # records are made and written this many bytes at a time
_MAX_OPEN_SHARDS = 256  # a reader keeps this many shards open or mapped (each is one descriptor)
_MAX_CACHED_LABELS = 1 << 16  # label texts a handle keeps parsed (a dict lookup is 4x cheaper than a parse)
_EOA = bytes(fmt.END_OF_ARCHIVE)
_PAGE = 4096  # the kernel copies a write into the page cache page by page; a kill lands between pages
# Every file of the store is opened without following a link (ELOOP: damage to a reader, StoreIOError to a
# writer): a link planted as a shard or the index must never make a write cut or overwrite a file elsewhere.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class TarStore(Store):
    name = "tar"
    # 16 MiB: 1 MiB costs writes (a rename and fsync per shard), 4 to 256 MiB measured the same (README);
    # several shards even for CIFAR-10 let webdataset's DataLoader workers split them.
    option_specs = {"shard_bytes": Option(16 << 20, 1 << 12, 1 << 40, fixed=True)}
    damage_errors = (OSError, ValueError)
    files = ("tar", "tarindex.bin")
    readers = ("webdataset.WebDataset", "tar -t / any tar reader")
    caveats = ("tar and webdataset see a killed write's samples until the next write",)

    def _open(self, create: bool) -> None:
        self._dir, self._index_path = self.file("tar"), self.file("tarindex.bin")
        self._entries: np.ndarray | None = None  # the committed index entries, checked
        self._lists: tuple[list[int], list[int], list[int], list[int]] | None = None  # for _read_one
        self._one_shape: tuple[int, ...] = ()  # the image shape, for _read_one
        self._fds: dict[int, int] = {}
        # read-only mappings of shards (raw stores of one shape), each with a descriptor open as long as it is mapped
        self._maps: dict[int, tuple[memoryview, int]] = {}
        self._parsed: dict[bytes, int] = {}  # label text -> label, for get
        self._layout: tuple[np.ndarray, list[int], list[int]] | None = None  # for scans: _scan_layout
        self._prefix: int | None = None  # bytes of a raw record's .npy header
        self._npy = self._manifest.codec == "raw"  # raw records of varied shape are .npy files
        if create:
            self._dir.mkdir()
            os.close(os.open(self._index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
        elif not self._dir.is_dir() or not self._index_path.is_file():
            raise CorruptStoreError(f"{self.path}: the tar shards' directory or index is missing")

    def _close(self) -> None:
        self._maps = {}  # unmapped once no scan holds a view of them
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _refresh(self, old_count: int) -> None:
        self._entries = self._lists = None

    def _reopen_after_fork(self) -> None:
        self._close()  # this process's copies of the parent's descriptors and maps; they would do, but a new
        self._entries = self._lists = None  # handle must not share anything with the parent

    def _shard(self, number: int) -> str:
        return os.path.join(self._dir, f"shard-{self._manifest.generation}-{number:06d}.tar")

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))  # the one opened first
            fd = self._fds[shard] = os.open(self._shard(shard), os.O_RDONLY | _NOFOLLOW)
        return fd

    def _map(self, shard: int, end: int) -> memoryview:
        """A read-only map of ``shard`` holding at least its first ``end`` bytes (checked: never a SIGBUS)."""
        entry = self._maps.get(shard)
        if entry is not None and len(entry[0]) >= end:
            return _checked(entry, end, shard)
        # A descriptor of its own (one of _fds could be closed by another thread's eviction between the fstat and
        # the map), closed once the map and every view of it are gone: a read holding a view can still ask its size.
        fd = os.open(self._shard(shard), os.O_RDONLY | _NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size < end:
                raise CorruptStoreError(f"{self.path}: shard {shard} is cut short of its committed records")
            buffer = map_read_only(fd, size)
        except BaseException:
            os.close(fd)
            raise
        weakref.finalize(buffer, os.close, fd)
        mapped = memoryview(buffer).cast("B").toreadonly()
        if entry is None and len(self._maps) >= _MAX_OPEN_SHARDS:
            for oldest in list(self._maps)[:1]:  # a copy of the keys: another thread may map meanwhile
                self._maps.pop(oldest, None)
        self._maps[shard] = mapped, fd
        return mapped

    # -------------------------------------------------------------- the index

    def _index(self) -> np.ndarray:
        """The committed records' index entries, checked against the shards (once per handle and commit)."""
        count = len(self)
        if self._entries is None or len(self._entries) < count:
            with open(os.open(self._index_path, os.O_RDONLY | _NOFOLLOW), "rb") as f:
                data = f.read(count * fmt.ENTRY.itemsize)
            if len(data) < count * fmt.ENTRY.itemsize:
                raise CorruptStoreError(f"{self._index_path} holds fewer records than the manifest commits")
            entries = np.frombuffer(data, dtype=fmt.ENTRY, count=count)
            shards = int(entries["shard"].max()) + 1 if count else 0
            sizes = [os.lstat(self._shard(k)).st_size for k in range(min(shards, count))]  # a link: its own size
            nbytes = self._manifest.image_nbytes if not self._manifest.encoded else None
            fmt.checked_index(entries, sizes, count, nbytes, self._index_path)
            self._entries, self._lists = entries, None
        return self._entries

    def _spans(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shard, payload offset, payload length and label end of records ``indices``."""
        e = self._index()[indices]
        offset, length = e["offset"].astype(np.int64), e["length"].astype(np.int64)
        return e["shard"].astype(np.int64), offset, length, fmt.label_ends(offset, length, e["label_len"])

    def byte_spans(self, indices: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Where records ``indices`` lie: each one's tar file (relative to the store) and its first and end byte.

        A span holds both of the record's members, headers included: everything a read of it touches. A
        copy of the store holding only these bytes of the tar files reads these records as the whole
        store does (:mod:`imgstore.sharded.ranges` fetches just them from object storage).
        """
        shard, offset, _, end = self._spans(np.asarray(indices, dtype=np.int64))
        starts = offset // fmt.BLOCK * fmt.BLOCK - fmt.BLOCK  # the image member's header
        names = {s: os.path.relpath(self._shard(s), self.path) for s in np.unique(shard).tolist()}
        return [names[s] for s in shard.tolist()], starts, fmt.padded_all(end)

    # -------------------------------------------------------------- reading

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        # The path of every shuffled get: lists, not arrays, and nothing looked up twice (each saves ~0.1 us).
        lists = self._lists
        if lists is None or index >= len(lists[0]):  # entries once committed never change: stale lists still hold
            if self._manifest.encoded:
                return super()._read_one(index)
            numbers, starts, _, stops = self._spans(np.arange(len(self)))
            known = self._lists[3] if self._lists is not None else []
            unknown = [-1] * (len(numbers) - len(known))
            lists = self._lists = (numbers.tolist(), starts.tolist(), stops.tolist(), known + unknown)
            self._one_shape = self.image_shape
        shards, offsets, ends, labels = lists
        shard, at, end = shards[index], offsets[index], ends[index]
        entry = self._maps.get(shard)
        view = self._map(shard, end) if entry is None or len(entry[0]) < end else _checked(entry, end, shard)
        image = np.empty(self._one_shape, dtype=np.uint8)
        image.data.cast("B")[:] = view[at : at + image.nbytes]
        label = labels[index]
        return image, label if label >= 0 else self._shard_labels(index, labels)

    def _shard_labels(self, index: int, labels: list[int]) -> int:
        """Record ``index``'s label; its shard's label texts are parsed at once into ``labels`` (the gets' list:
        a parse per get, or a dict of texts, was ~0.4 µs of a 3 µs get)."""
        offsets, shard_ends = self._scan_layout(self._stride())
        shard = bisect_right(shard_ends, index)
        lo, hi = (shard_ends[shard - 1] if shard else 0), min(shard_ends[shard], len(labels))
        try:
            parsed = self._rows(shard, offsets[lo], hi - lo, np.empty((hi - lo, 0), np.uint8))
        except CorruptStoreError:  # a damaged label in the shard: only its own record fails to read
            end = int(self._spans(np.array([index]))[3][0])
            return self._label(self._map(shard, end)[end - int(self._index()["label_len"][index]) : end].tobytes())
        labels[lo:hi] = parsed.tolist()
        return labels[index]

    def _label(self, text: bytes) -> int:
        label = self._parsed.get(text)
        if label is None:
            label = fmt.parse_label(text, self.path)
            if len(self._parsed) < _MAX_CACHED_LABELS:
                self._parsed[text] = label
        return label

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        shard, offset, _, end = self._spans(indices)
        nbytes = images[0].nbytes
        pixels = images.data.cast("B")
        label_len = self._index()["label_len"][indices].tolist()
        shards, ends = shard.tolist(), end.tolist()
        need: dict[int, int] = {}  # each shard's furthest byte in the batch: mapped and its size checked once
        for s, e in zip(shards, ends, strict=True):
            if need.get(s, 0) < e:
                need[s] = e
        views = {s: self._map(s, e) for s, e in need.items()}
        for k, (s, o, e) in enumerate(zip(shards, offset.tolist(), ends, strict=True)):
            view = views[s]
            pixels[k * nbytes : (k + 1) * nbytes] = view[o : o + nbytes]
            labels[k] = self._label(view[e - label_len[k] : e].tobytes())

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        # Records of one shard lie one after another, each ``stride`` bytes: the pixels and the label texts
        # are strided copies out of the shard's map (a preadv of the whole records into a buffer, then the
        # same copies out of it, measured 1.4x the time: it copies 5 120 bytes a record, not 3 072).
        offsets, shard_ends = self._scan_layout(self._stride())
        lo = start
        while lo < stop:
            shard = bisect_right(shard_ends, lo)
            hi = min(stop, shard_ends[shard])
            pixels = images[lo - start : hi - start].reshape(hi - lo, -1)
            labels[lo - start : hi - start] = self._rows(shard, offsets[lo], hi - lo, pixels)
            lo = hi

    def _stride(self) -> int:
        """Bytes from one raw record to the next in a shard: its ``.npy`` member and its ``.cls`` member."""
        return fmt.padded(self._prefix_len() + math.prod(self.image_shape)) + 3 * fmt.BLOCK

    def _rows(self, shard: int, payload_offset: int, n: int, pixels: np.ndarray) -> np.ndarray:
        """The labels of ``n`` consecutive records of ``shard`` from the one at ``payload_offset``, their pixels
        copied into ``pixels`` (``[n, nbytes]``; ``[n, 0]`` copies none)."""
        stride, prefix = self._stride(), self._prefix_len()
        payload, label_at = fmt.BLOCK + prefix, stride - fmt.BLOCK  # where the pixels and the label text start
        first = payload_offset - payload
        view = self._map(shard, first + n * stride)  # a valid shard holds the last label's whole block
        rows = np.frombuffer(view, dtype=np.uint8, count=n * stride, offset=first).reshape(n, stride)
        pixels[...] = rows[:, payload : payload + pixels.shape[1]]
        labels = fmt.parse_labels(rows[:, label_at : label_at + fmt.MAX_LABEL_DIGITS], self.path)  # no copy
        del rows  # no view of the map outlives the call: close() can unmap it
        return labels

    def _scan_layout(self, stride: int) -> tuple[list[int], list[int]]:
        """Each committed record's payload offset, and where each shard's records end (once per index)."""
        entries = self._index()
        if self._layout is None or self._layout[0] is not entries:
            shard, offset = entries["shard"].astype(np.int64), entries["offset"].astype(np.int64)
            if len(offset) > 1 and np.any(np.diff(offset)[shard[1:] == shard[:-1]] != stride):
                raise CorruptStoreError(f"{self._index_path}: the records of a shard are not contiguous")
            self._layout = (entries, offset.tolist(), _runs(shard))
        return self._layout[1], self._layout[2]

    def _prefix_len(self) -> int:
        if self._prefix is None:
            self._prefix = len(fmt.npy_header(self.image_shape))
        return self._prefix

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        shard, offset, length, end = self._spans(indices)
        label_len = self._index()["label_len"][indices].tolist()
        labels = np.empty(len(indices), dtype=np.int64)
        blobs: list[bytes] = [b""] * len(indices)
        order = np.argsort(indices, kind="stable")  # file order
        for k in order.tolist():
            o, n, e = int(offset[k]), int(length[k]), int(end[k])
            data = os.pread(self._fd(int(shard[k])), e - o, o)
            if len(data) != e - o:
                raise CorruptStoreError(f"{self.path}: image {int(indices[k])} is committed but its shard is cut short")
            labels[k] = fmt.parse_label(data[e - o - label_len[k] :], self.path)
            blob = data[:n]
            blobs[k] = fmt.npy_to_raw(blob, self.path) if self._npy else blob
        return blobs, labels

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        n, nbytes = len(images), images[0].nbytes
        prefix = fmt.npy_header(images.shape[1:])
        stride = fmt.padded(len(prefix) + nbytes) + 3 * fmt.BLOCK
        width = fmt.key_width(start + n)
        _, label_lens = fmt.label_digits(labels)
        per_chunk = max(1, _CHUNK_BYTES // stride)

        def make(lo: int, hi: int) -> Iterator[memoryview]:
            for a in range(lo, hi, per_chunk):
                b = min(hi, a + per_chunk)
                yield fmt.fixed_records(start + a, width, images[a:b], labels[a:b], prefix, self._mtime).data

        sizes = np.full(n, stride, dtype=np.int64)
        self._append(start, sizes, np.full(n, fmt.BLOCK + len(prefix)), np.full(n, nbytes), label_lens, make)

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        stored = [fmt.raw_to_npy(b) for b in blobs] if self._npy else list(blobs)
        n = len(stored)
        width = fmt.key_width(start + n)
        lengths = np.fromiter(map(len, stored), dtype=np.int64, count=n)
        sizes = fmt.padded_all(lengths) + 3 * fmt.BLOCK
        _, label_lens = fmt.label_digits(labels)

        def make(lo: int, hi: int) -> Iterator[bytes]:
            a = lo
            while a < hi:  # pieces of about _CHUNK_BYTES
                b, total = a + 1, int(sizes[a])
                while b < hi and total + int(sizes[b]) <= _CHUNK_BYTES:
                    total, b = total + int(sizes[b]), b + 1
                yield b"".join(fmt.blob_records(start + a, width, stored[a:b], labels[a:b], self._mtime))
                a = b

        self._append(start, np.asarray(sizes), np.full(n, fmt.BLOCK), lengths, label_lens, make)

    @property
    def _mtime(self) -> int:
        return 0  # deterministic shards: the same records make the same bytes

    def _append(
        self,
        start: int,
        sizes: np.ndarray,
        payload_at: np.ndarray,
        lengths: np.ndarray,
        label_lens: np.ndarray,
        make: Callable[[int, int], Iterator[memoryview | bytes]],
    ) -> None:
        """Write records ``start ..`` (``sizes`` bytes each, made by ``make(lo, hi)``) to the shards, then the index."""
        fd = os.open(self._index_path, os.O_WRONLY | _NOFOLLOW)  # first: a link there stops the write before a byte
        try:
            shard, at = self._clean(start)
            limit = self.options["shard_bytes"]
            if shard < 0 or at >= limit:
                shard, at = shard + 1, 0
            n = len(sizes)
            entries = np.zeros(n, dtype=fmt.ENTRY)
            new_shards = False
            lo = 0
            while lo < n:
                starts = at + np.cumsum(sizes[lo:]) - sizes[lo:]
                hi = lo + max(1, int(np.searchsorted(starts, limit, side="left")))
                entries["shard"][lo:hi] = shard
                entries["offset"][lo:hi] = starts[: hi - lo] + payload_at[lo:hi]
                if at:
                    self._append_in_place(shard, at, make(lo, hi))
                else:
                    self._write_new_shard(shard, make(lo, hi))
                    new_shards = True
                lo, shard, at = hi, shard + 1, 0
            entries["length"], entries["label_len"] = lengths, label_lens
            if new_shards and self.sync:
                fsync_dir(self._dir)
            _pwrite_all(fd, entries.tobytes(), start * fmt.ENTRY.itemsize)
            os.ftruncate(fd, (start + n) * fmt.ENTRY.itemsize)  # a killed write's entries past these go
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        old = self._index()[:start] if start else np.zeros(0, dtype=fmt.ENTRY)
        self._entries, self._lists = np.concatenate([old, entries]), None

    def _clean(self, count: int) -> tuple[int, int]:
        """Remove what a killed write left past the ``count`` committed records; returns the last shard and its end.

        (-1, 0) when nothing is committed.
        """
        last, end = -1, 0
        if count:
            shard, _, _, ends = self._spans(np.array([count - 1]))
            last, end = int(shard[0]), fmt.padded(int(ends[0]))
        pattern = re.compile(rf"shard-{re.escape(self._manifest.generation)}-(\d{{6,}})\.tar(\.tmp)?")
        for name in os.listdir(self._dir):
            match = pattern.fullmatch(name)
            if match and (int(match.group(1)) > last or match.group(2)):
                os.unlink(os.path.join(self._dir, name))
        if last >= 0:
            fd = os.open(self._shard(last), os.O_RDWR | _NOFOLLOW)
            try:
                if os.fstat(fd).st_size != end + len(_EOA) or os.pread(fd, len(_EOA), end) != _EOA:
                    # A zero header block first (one 512-byte write cannot be torn): tar stops there at once.
                    _pwrite_all(fd, _EOA[: fmt.BLOCK], end)
                    os.ftruncate(fd, end + fmt.BLOCK)
                    os.ftruncate(fd, end + len(_EOA))
            finally:
                os.close(fd)
        return last, end

    def _append_in_place(self, shard: int, at: int, chunks: Iterator[memoryview | bytes]) -> None:
        """Records after the shard's last one (at ``at``, its end-of-archive blocks), which are overwritten last."""
        fd = os.open(self._shard(shard), os.O_RDWR | _NOFOLLOW)
        try:
            head = b""
            position = at
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                if not head:  # the first 1 024 bytes go last: until then the old end of the archive stays
                    head = bytes(data[: len(_EOA)])
                    _pwrite_all(fd, data[len(_EOA) :], position + len(_EOA))
                else:
                    _pwrite_all(fd, data, position)
                position += len(data)
            _pwrite_all(fd, _EOA, position)
            if self.sync:
                os.fsync(fd)  # the records are on disk before the head makes tar read them
            if at // _PAGE != (at + len(head) - 1) // _PAGE:
                # The head would cross a page, and a killed write can stop between pages: the data block first
                # (meanwhile tar stops at the zero header block before it; GNU tar warns of "a lone zero block").
                _pwrite_all(fd, head[fmt.BLOCK :], at + fmt.BLOCK)
                head = head[: fmt.BLOCK]
            _pwrite_all(fd, head, at)  # within one page: written whole or not at all by a killed process
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_new_shard(self, shard: int, chunks: Iterator[memoryview | bytes]) -> None:
        path = self._shard(shard)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
        try:
            position = 0
            for chunk in chunks:
                data = memoryview(chunk).cast("B")
                _pwrite_all(fd, data, position)
                position += len(data)
            _pwrite_all(fd, _EOA, position)
            if self.sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # whole, or not there: a tar reader never sees half a shard

    def _damaged(self, exc: BaseException) -> ImgStoreError:
        if isinstance(exc, ImgStoreError):  # this backend's own verdict, raised again
            return copy.copy(exc)
        return super()._damaged(exc)


def _checked(entry: tuple[memoryview, int], end: int, shard: int) -> memoryview:
    """A shard's map if its file still holds ``end`` bytes: a page past a file's end is SIGBUS."""
    if not holds(entry[1], end):
        raise CorruptStoreError(f"shard {shard} was cut short under this reader")
    return entry[0]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _runs(shard: np.ndarray) -> list[int]:
    """Where each run of records in one shard ends (exclusive)."""
    return [*(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
