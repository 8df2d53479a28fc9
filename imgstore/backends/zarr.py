"""zarr backend: a zarr v3 group of sharded arrays, ``images`` [N, *shape] uint8 and ``labels`` [N] int64.

Each image is one zarr chunk, ``shard_images`` consecutive images one shard file (zarr's sharding
codec), so 100 000 images are about a hundred files, and any zarr v3 reader opens the store:
``zarr.open_group(store.path / "zarr-<gen>")["images"][i]``. Encoded stores (a codec other than
raw, or raw images of varied shapes) hold ``blobs``, variable-length bytes (zarr-python's
``variable_length_bytes`` type), one record per chunk, sharded the same way, and ``labels``.
The files are described in ``zarr_layout.py``.

imgstore writes and reads the zarr files itself, by the format's specification, rather than
through zarr-python: zarr-python encodes every chunk through its asynchronous codec pipeline,
about 150 µs a chunk (1.6 s to write 10 000 CIFAR images one chunk each, 0.8 s to read them
back), and rewrites a whole shard to add one chunk to it. Here a write appends its chunks to the
shard past the committed ones and rewrites the shard's index (at the start of the file) in place;
a raw record is copied out of a read-only map of its shard (mapped up to the committed records once
the shard index and the file's size are checked: never past the file's end; a scan is one copy per
shard, against a ``preadv`` per shard before: 1.5-1.6x the limit's ``np.fromfile`` with the checks,
~1.25x now), an encoded one read with one ``pread``. Every read of a map first asks the shard's size
(an ``lseek``, ~0.2 µs): a shard cut short by another program under an open reader is damage, not a
SIGBUS (only a cut during the copy itself could still be one; imgstore never cuts committed records).
So zarr-python is not needed to use the store, only to read it from zarr's side.

Crashes. Nothing committed is ever rewritten with other bytes: a write adds chunks past the
committed ones (cutting off a crashed write's leftovers), labels past the committed ones, index
pairs of its own chunks (a committed chunk's pair is rewritten with the same bytes), and then the
arrays' ``zarr.json`` with the new shape (replaced atomically). The manifest commits after that,
so after a kill ``zarr.json`` may show records the manifest does not commit, until the next writer
opens the store and sets it back. Readers never read ``zarr.json``: the manifest holds the layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgstore.backends.mapped_rows import copy_records
from imgstore.backends.zarr_layout import (
    VLEN_HEADER,
    array_meta,
    chunk_path,
    encode_index,
    group_meta,
    index_nbytes,
    open_shard,
    preadv_exact,
    pwrite_all,
    read_index,
    write_json,
)
from imgstore.errors import CorruptStoreError
from imgstore.fileio import holds, map_read_only, sync_filesystem
from imgstore.manifest import MAX_IMAGE_BYTES
from imgstore.options import Option
from imgstore.store import Store

_IOV_MAX = 1024  # buffers per pwritev call (Linux's IOV_MAX)


class ZarrStore(Store):
    name = "zarr"
    damage_errors = (OSError, ValueError)
    option_specs = {
        "shard_images": Option(
            1024, 1, 1 << 20, fixed=True, doc="images (chunks) per shard file; see the README for the measurement"
        )
    }
    files = ("zarr",)
    readers = ("zarr-python: zarr.open_group(path)['images'], ['labels']",)
    caveats = ("zarr-python sees a killed write's records until the next writer opens the store",)

    def _open(self, create: bool) -> None:
        self._root = self.file("zarr")
        self._shard = int(self.options["shard_images"])
        self._header = index_nbytes(self._shard)  # bytes of a shard's index, before its first chunk
        self._fds: dict[tuple[str, int], int] = {}  # open shard and label-chunk files (read-write in a writer)
        # raw: shard -> its first checked records mapped read-only (uint8), and its descriptor (one of _fds)
        self._maps: dict[int, tuple[np.ndarray, int]] = {}
        self._blob_index: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # encoded: shard -> checked offsets, lengths
        self._labels = np.empty(0, dtype=np.int64)  # the committed labels read so far
        if create:
            self._root.mkdir()
            write_json(self._root / "zarr.json", group_meta())
            self._write_meta(0)
        elif self.writable and len(self):
            self._heal()
        elif not self._root.is_dir():
            raise CorruptStoreError(f"{self._root} is missing")

    def _close(self) -> None:
        fds, self._fds, self._maps = self._fds, {}, {}
        for fd in fds.values():
            os.close(fd)

    def _reopen_after_fork(self) -> None:
        self._close()  # this process's copies of the parent's descriptors
        self._open(create=False)

    def _refresh(self, old_count: int) -> None:
        # Pairs a writer added are checked when first read (a shard being filled was mapped through fewer).
        self._blob_index.clear()

    # -------------------------------------------------------------- files

    @property
    def _data_array(self) -> str:
        return "blobs" if self._manifest.encoded else "images"

    def _data_path(self, shard: int) -> Path:
        shape = () if self._manifest.encoded else self.image_shape
        return chunk_path(self._root / self._data_array, shard, 1 + len(shape))

    def _path(self, array: str, shard: int) -> Path:
        return self._data_path(shard) if array != "labels" else chunk_path(self._root / "labels", shard, 1)

    def _fd(self, array: str, shard: int, made: list[Path] | None = None) -> int:
        """The open file of ``array``'s chunk (or shard) ``shard``; ``made``: create it, noting new folders there."""
        fd = self._fds.get((array, shard))  # by number: building a Path per read costs more than the read
        if fd is None:
            mine, folders = open_shard(self._path(array, shard), self.writable, create=made is not None)
            fd = self._fds.setdefault((array, shard), mine)  # threads reading it first at once: one kept
            if fd != mine:
                os.close(mine)  # another thread's is kept (one overwritten would never be closed)
            if made is not None:
                made.extend(folders)
        return fd

    def _write_meta(self, count: int) -> None:
        """The arrays' zarr.json for ``count`` records (a raw store without a shape yet: empty, 1-D images)."""
        shard = self._shard
        if self._manifest.encoded:
            data = array_meta((count,), "variable_length_bytes", (shard,), (1,))
        elif self.shape is not None:
            shape = self.shape
            data = array_meta((count, *shape), "uint8", (shard, *shape), (1, *shape))
        else:  # zarr readers see an empty array; the first write gives it its shape
            data = array_meta((0,), "uint8", (shard,), None)
        for name, meta in ((self._data_array, data), ("labels", array_meta((count,), "int64", (shard,), None))):
            (self._root / name).mkdir(exist_ok=True)
            write_json(self._root / name / "zarr.json", meta)

    def _heal(self) -> None:
        """A writer opens: undo what a killed write left visible to zarr readers (shapes, a shard's index).

        Only cosmetic for imgstore (the manifest governs what it reads); on a full disk it is left
        to the next write, which does the same.
        """
        count = len(self)
        shard, rows = divmod(count - 1, self._shard)
        try:
            fd = self._fd(self._data_array, shard, [])
            offsets, lengths = self._index_of(fd, shard, rows + 1)
            end = int(offsets[-1] + lengths[-1])
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)
                pwrite_all(fd, encode_index(offsets, lengths, self._shard), 0)
            self._write_meta(count)
        except OSError:
            pass

    def _index_of(self, fd: int, shard: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked offsets and lengths of a shard's first ``count`` chunks."""
        if self._manifest.encoded:
            offsets, lengths = read_index(fd, self._shard, count, self._data_path(shard))
            if count and (int(lengths.min()) <= VLEN_HEADER or int(lengths.max()) > MAX_IMAGE_BYTES + VLEN_HEADER):
                raise CorruptStoreError(f"{self._data_path(shard)}: a record's length in the shard index is impossible")
            return offsets, lengths
        nbytes = int(np.prod(self.image_shape))
        offsets, lengths = read_index(fd, self._shard, count, self._data_path(shard))
        if count and (int(lengths.min()) != nbytes or int(lengths.max()) != nbytes):
            raise CorruptStoreError(f"{self._data_path(shard)}: the shard index does not match the image size")
        return offsets, lengths

    def _sync(self, fds: set[int], made: list[Path]) -> None:
        if not self.sync:
            return
        if made:  # new shard files and their folders: one syncfs instead of an fsync of each file and folder
            sync_filesystem(self.path)
            return
        for fd in fds:  # appends to existing shards (a put): their files only
            os.fsync(fd)

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        nbytes, header = images[0].nbytes, index_nbytes(self._shard)
        stop, made, touched = start + len(images), list[Path](), set[int]()
        pixels = images.reshape(len(images), -1)
        for shard in range(start // self._shard, (stop - 1) // self._shard + 1):
            first = shard * self._shard
            lo, hi = max(start, first), min(stop, first + self._shard)
            path = self._data_path(shard)
            new = not path.exists()
            fd = self._fd("images", shard, made)
            pwrite_all(fd, pixels[lo - start : hi - start], header + (lo - first) * nbytes)
            os.ftruncate(fd, header + (hi - first) * nbytes)  # a crashed write's chunks past these go
            offsets = header + np.arange(hi - first, dtype=np.int64) * nbytes
            pwrite_all(fd, encode_index(offsets, np.full(hi - first, nbytes), self._shard), 0)
            touched.add(fd)
            if new:
                made.append(path)
            touched.add(self._write_labels(shard, lo - first, labels[lo - start : hi - start], made))
        self._sync(touched, made)
        self._write_meta(stop)

    def _write_labels(self, shard: int, row: int, labels: np.ndarray, made: list[Path]) -> int:
        path = chunk_path(self._root / "labels", shard, 1)
        new = not path.exists()
        fd = self._fd("labels", shard, made)
        if os.fstat(fd).st_size != 8 * self._shard:
            os.ftruncate(fd, 8 * self._shard)  # zarr stores an edge chunk whole: zeros past the last label
        pwrite_all(fd, np.ascontiguousarray(labels, dtype="<i8"), 8 * row)
        if new:
            made.append(path)
        return fd

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        stop, made, touched = start + len(blobs), list[Path](), set[int]()
        lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) + VLEN_HEADER
        for shard in range(start // self._shard, (stop - 1) // self._shard + 1):
            first = shard * self._shard
            lo, hi = max(start, first), min(stop, first + self._shard)
            path = self._data_path(shard)
            new = not path.exists()
            fd = self._fd("blobs", shard, made)
            old_offsets, old_lengths = self._index_of(fd, shard, lo - first) if lo > first else (None, None)
            at = index_nbytes(self._shard) + (int(old_lengths.sum()) if old_lengths is not None else 0)
            new_lengths = lengths[lo - start : hi - start]
            offsets = at + np.concatenate(([0], np.cumsum(new_lengths)[:-1]))
            self._pwrite_records(fd, blobs[lo - start : hi - start], at)
            os.ftruncate(fd, at + int(new_lengths.sum()))  # a crashed write's chunks past these go
            if old_offsets is not None and old_lengths is not None:
                offsets = np.concatenate((old_offsets, offsets))
                new_lengths = np.concatenate((old_lengths, new_lengths))
            pwrite_all(fd, encode_index(offsets, new_lengths, self._shard), 0)
            touched.add(fd)
            if new:
                made.append(path)
            touched.add(self._write_labels(shard, lo - first, labels[lo - start : hi - start], made))
            self._blob_index.pop(shard, None)
        self._sync(touched, made)
        self._write_meta(stop)

    @staticmethod
    def _pwrite_records(fd: int, blobs: Sequence[bytes], at: int) -> None:
        """Each record as a vlen-bytes chunk of one (count 1, length, bytes), written with pwritev."""
        step = _IOV_MAX // 2
        for k in range(0, len(blobs), step):
            buffers: list[bytes] = []
            for blob in blobs[k : k + step]:
                buffers += ((1).to_bytes(4, "little") + len(blob).to_bytes(4, "little"), blob)
            total = sum(map(len, buffers))
            written = os.pwritev(fd, buffers, at)
            if written != total:  # a short write (rare): the rest one piece at a time
                pwrite_all(fd, memoryview(b"".join(buffers))[written:], at + written)
            at += total

    # -------------------------------------------------------------- reading

    def _label_values(self) -> np.ndarray:
        """The committed labels, read from the label chunks once (and the new ones after writes)."""
        count, have = len(self), len(self._labels)
        if have < count:
            parts = [self._labels]
            for shard in range(have // self._shard, (count - 1) // self._shard + 1):
                first = shard * self._shard
                lo, hi = max(have, first), min(count, first + self._shard)
                part = np.empty(hi - lo, dtype="<i8")
                path = chunk_path(self._root / "labels", shard, 1)
                preadv_exact(self._fd("labels", shard), part, 8 * (lo - first), path)
                parts.append(part.astype(np.int64, copy=False))
            self._labels = np.concatenate(parts)
        return self._labels

    def _image_map(self, shard: int, end: int) -> np.ndarray:
        """A raw shard mapped read-only through at least byte ``end``: its records there checked first, in
        its index and against the file's size (read_index), so no page of the map lies past the file's end."""
        entry = self._maps.get(shard)
        if entry is not None and len(entry[0]) >= end:
            if not holds(entry[1], end):  # cut short since it was mapped
                raise CorruptStoreError(f"{self._data_path(shard)} was cut short under this reader")
            return entry[0]
        nbytes = math.prod(self.image_shape)
        committed = min(self._shard, len(self) - shard * self._shard)
        if end > self._header + committed * nbytes:
            raise CorruptStoreError(f"{self._data_path(shard)}: a read past its committed records")
        fd = self._fd("images", shard)
        self._index_of(fd, shard, committed)
        view = memoryview(map_read_only(fd, self._header + committed * nbytes)).cast("B").toreadonly()
        mapped = np.frombuffer(view, np.uint8)
        if os.fstat(fd).st_size < len(mapped):  # cut short since it was checked
            raise CorruptStoreError(f"{self._data_path(shard)} is shorter than its records")
        self._maps[shard] = mapped, fd
        return mapped

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        shape = self.image_shape
        shard, row = divmod(index, self._shard)
        nbytes = math.prod(shape)
        at = self._header + row * nbytes
        image = self._image_map(shard, at + nbytes)[at : at + nbytes].copy().reshape(shape)
        labels = self._labels if index < len(self._labels) else self._label_values()
        return image, int(labels[index])

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        labels[:] = self._label_values()[indices]
        nbytes = images[0].nbytes
        shards, rows = np.divmod(indices, self._shard)
        offsets = self._header + rows * nbytes
        # Each shard mapped through the batch's furthest row or its last record: it holds the rows asked.
        top, count = int(rows.max()) + 1, len(self)
        ends = {shard: self._header + min(top, count - shard * self._shard) * nbytes for shard in set(shards.tolist())}
        maps = {shard: self._image_map(shard, end) for shard, end in ends.items()}
        copy_records(maps, shards, offsets, nbytes, images)

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        labels[:] = self._label_values()[start:stop]
        nbytes = images[0].nbytes
        for shard in range(start // self._shard, (stop - 1) // self._shard + 1):
            first = shard * self._shard
            lo, hi = max(start, first), min(stop, first + self._shard)
            at = self._header + (lo - first) * nbytes
            end = at + (hi - lo) * nbytes
            images[lo - start : hi - start].reshape(-1)[:] = self._image_map(shard, end)[at:end]

    def _blob_spans(self, shard: int, rows: int) -> tuple[int, np.ndarray, np.ndarray]:
        fd = self._fd("blobs", shard)
        spans = self._blob_index.get(shard)
        if spans is None or len(spans[0]) < rows:
            spans = self._index_of(fd, shard, min(self._shard, len(self) - shard * self._shard))
            self._blob_index[shard] = spans
        return fd, spans[0], spans[1]

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        labels = self._label_values()[indices]
        blobs: list[bytes] = []
        shards, rows = np.divmod(indices, self._shard)
        for shard, row in zip(shards.tolist(), rows.tolist(), strict=True):
            fd, offsets, lengths = self._blob_spans(shard, row + 1)
            size = int(lengths[row]) - VLEN_HEADER
            blob = os.pread(fd, size, int(offsets[row]) + VLEN_HEADER)
            if len(blob) != size:
                raise CorruptStoreError(f"{self._data_path(shard)} is shorter than its records")
            blobs.append(blob)
        return blobs, labels

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        # One read per shard; each record's vlen header is checked on the way (a zarr reader needs it).
        labels = self._label_values()[start:stop]
        blobs: list[bytes] = []
        for shard in range(start // self._shard, (stop - 1) // self._shard + 1):
            first = shard * self._shard
            lo, hi = max(start, first), min(stop, first + self._shard)
            fd, offsets, lengths = self._blob_spans(shard, hi - first)
            begin = int(offsets[lo - first])
            buffer = np.empty(int(offsets[hi - first - 1] + lengths[hi - first - 1]) - begin, dtype=np.uint8)
            preadv_exact(fd, buffer, begin, self._data_path(shard))
            data = buffer.data
            for offset, length in zip(
                (offsets[lo - first : hi - first] - begin).tolist(),
                lengths[lo - first : hi - first].tolist(),
                strict=True,
            ):
                count = int.from_bytes(data[offset : offset + 4], "little")
                size = int.from_bytes(data[offset + 4 : offset + 8], "little")
                if count != 1 or size != length - VLEN_HEADER:
                    raise CorruptStoreError(f"{self._data_path(shard)}: a record's chunk header is damaged")
                blobs.append(bytes(data[offset + VLEN_HEADER : offset + length]))
        return blobs, labels
