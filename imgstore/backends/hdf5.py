"""HDF5 backend: an ``images`` dataset [N, *shape] and a ``labels`` dataset [N] in one file.

Both are chunked along N and resizable, so a store can be appended to. h5py writes; reads of the
uncompressed image chunks go straight to the file with ``preadv`` at the offsets HDF5 reports for
each chunk (``chunk_iter``), the technique kerchunk uses: a single-image read through h5py's
selection machinery costs tens of microseconds, a ``preadv`` into the caller's array about two.
Filtered (compressed) chunks, which a subclass may configure, are read through h5py instead.

Concurrency and crashes: the writer works in SWMR mode, readers open with ``swmr=True``, and HDF5's
own file locks are off because they would keep a writer out while any reader is open; the store's
writer lock already admits one writer only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from imgstore.errors import CorruptStoreError
from imgstore.fileio import fsync_dir, release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

_FILE = "images.h5"
_LABEL_CHUNK = 1 << 14


class Hdf5Store(Store):
    name = "hdf5"
    damage_errors = (OSError, RuntimeError, KeyError)  # how h5py reports a damaged file
    option_specs = {"chunk_bytes": Option(1 << 18, 1, 1 << 31, fixed=True)}
    files = (_FILE,)

    def _open(self, create: bool) -> None:
        path = self.file(_FILE)
        if create:
            self._file = h5py.File(path, "w", libver="latest", locking=False)
        elif self.writable:
            self._file = self._open_for_append(path)
        else:
            self._file = _open_for_reading(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._images: h5py.Dataset | None = self._file.get("images")
        self._labels: h5py.Dataset | None = self._file.get("labels")
        if len(self) and (self._images is None or self._labels is None):
            raise CorruptStoreError(f"{path} has no images/labels datasets")
        if self.writable and self._images is not None:
            self._file.swmr_mode = True
        self._index: _ReadIndex | None = None

    def _open_for_append(self, path: Path) -> h5py.File:
        try:
            return h5py.File(path, "a", libver="latest", locking=False)
        except OSError as exc:
            if "already open for write" not in str(exc):
                raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
        # The file is marked open by a writer, and this handle holds the store's writer lock, so
        # that writer died. HDF5 offers no API to clear the mark (only the h5clear tool), so the
        # committed records are copied into a new file that replaces the old one atomically.
        self._rebuild(path)
        return h5py.File(path, "a", libver="latest", locking=False)

    def _rebuild(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".rebuild")
        count = len(self)
        with (
            h5py.File(path, "r", libver="latest", swmr=True, locking=False) as old,
            h5py.File(tmp, "w", libver="latest", locking=False) as new,
        ):
            if count:
                for name in ("images", "labels"):
                    source = old[name]
                    target = new.create_dataset(
                        name,
                        shape=(count, *source.shape[1:]),
                        maxshape=source.maxshape,
                        chunks=source.chunks,
                        dtype=source.dtype,
                    )
                    for lo in range(0, count, 1 << 14):
                        target[lo : min(count, lo + (1 << 14))] = source[lo : min(count, lo + (1 << 14))]
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.path)

    def _close(self) -> None:
        self._file.close()
        os.close(self._fd)

    def _refresh(self, old_count: int) -> None:
        # Reopen rather than Dataset.refresh(): that needs SWMR mode, which a reader opened while no
        # writer was there does not use; a reopen also sees datasets a writer created meanwhile.
        self._file.close()
        self._file = _open_for_reading(self.file(_FILE))
        self._images, self._labels = self._file.get("images"), self._file.get("labels")
        self._index = None

    def _reopen_after_fork(self) -> None:
        # HDF5's library state is not fork-safe: leave the inherited file id alone, open anew.
        self._open(create=False)

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        if self._images is None:
            shape = images.shape[1:]
            per_chunk = max(1, self.options["chunk_bytes"] // images[0].nbytes)
            self._images = self._file.create_dataset(
                "images", shape=(0, *shape), maxshape=(None, *shape), chunks=(per_chunk, *shape), dtype=np.uint8
            )
            self._labels = self._file.create_dataset(
                "labels", shape=(0,), maxshape=(None,), chunks=(_LABEL_CHUNK,), dtype=np.int64
            )
            # From here on the file is written in SWMR mode: its metadata is flushed in an order that
            # keeps it readable whatever moment the writer is killed at (no new objects may be added).
            self._file.swmr_mode = True
        stop = start + len(images)
        reserve(self.file(_FILE), images.nbytes + labels.nbytes + (images.nbytes >> 4) + (1 << 20))
        # Anything past the committed count is a crashed write's leftover: resizing drops it.
        self._images.resize(stop, axis=0)
        self._labels.resize(stop, axis=0)
        self._images.write_direct(images, dest_sel=np.s_[start:stop])
        self._labels.write_direct(labels, dest_sel=np.s_[start:stop])
        self._file.flush()
        release_reserve(self.file(_FILE))
        if self.sync:
            os.fsync(self._fd)  # H5Fflush hands the data to the OS; fsync makes it durable
        self._index = None

    # -------------------------------------------------------------- reading

    def _read_index(self) -> _ReadIndex:
        """Chunk offsets and labels of the committed records, built once per handle and per write."""
        if self._index is None:
            self._check_extent(len(self))
            self._index = _ReadIndex.build(self._images, self._labels, len(self))
        return self._index

    def _pread_into(self, buffer: np.ndarray, offset: int) -> None:
        if os.preadv(self._fd, [buffer], offset) != buffer.nbytes:
            raise CorruptStoreError(f"{self.file(_FILE)} ends before the data its chunk index points to")

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        ix = self._read_index()
        if ix.offsets is None:
            return self._images[index], int(ix.labels[index])
        image = np.empty(self.shape, dtype=np.uint8)
        chunk, row = divmod(index, ix.rows)
        self._pread_into(image, int(ix.offsets[chunk]) + row * ix.image_nbytes)
        return image, int(ix.labels[index])

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        ix = self._read_index()
        labels[:] = ix.labels[start:stop]
        if ix.offsets is None:
            self._images.read_direct(images, source_sel=np.s_[start:stop])
            return
        for chunk in range(start // ix.rows, (stop - 1) // ix.rows + 1):
            lo, hi = max(start, chunk * ix.rows), min(stop, (chunk + 1) * ix.rows)
            self._pread_into(
                images[lo - start : hi - start], int(ix.offsets[chunk]) + (lo - chunk * ix.rows) * ix.image_nbytes
            )

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        ix = self._read_index()
        labels[:] = ix.labels[indices]
        if ix.offsets is None:
            for k in np.argsort(indices, kind="stable"):  # h5py wants increasing selections: file order
                self._images.read_direct(images, source_sel=np.s_[indices[k]], dest_sel=np.s_[k])
            return
        chunks, rows = np.divmod(indices, ix.rows)
        positions = (ix.offsets[chunks] + rows * ix.image_nbytes).tolist()
        for k, position in enumerate(positions):
            self._pread_into(images[k], position)

    def _check_extent(self, stop: int) -> None:
        if self._images is None or self._images.shape[0] < stop or self._labels.shape[0] < stop:
            raise CorruptStoreError(f"{self.file(_FILE)} holds fewer images than its manifest commits")


def _open_for_reading(path: Path) -> h5py.File:
    """Plain read when no writer has the file; SWMR read when one has (or one died with it open).

    SWMR reading is what lets a reader follow a live writer, but it retries every metadata read
    whose checksum fails (torn reads are expected under a live writer), so a damaged file can take
    minutes to fail; a plain read fails at once.
    """
    try:
        return h5py.File(path, "r", libver="latest", locking=False)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
    try:
        return h5py.File(path, "r", libver="latest", swmr=True, locking=False)
    except OSError as exc:
        raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc


@dataclass(frozen=True)
class _ReadIndex:
    rows: int  # images per chunk
    image_nbytes: int
    offsets: np.ndarray | None  # file offset of each image chunk; None when chunks are filtered
    labels: np.ndarray

    @classmethod
    def build(cls, images: h5py.Dataset, labels: h5py.Dataset, count: int) -> _ReadIndex:
        rows = images.chunks[0]
        image_nbytes = int(np.prod(images.shape[1:]))
        if images.id.get_create_plist().get_nfilters():
            return cls(rows, image_nbytes, None, labels[:count])
        needed = -(-count // rows)
        offsets = np.full(needed, -1, dtype=np.int64)

        def note(info: h5py.h5d.StoreInfo) -> None:
            chunk = info.chunk_offset[0] // rows
            if chunk < needed and info.size == rows * image_nbytes:
                offsets[chunk] = info.byte_offset

        images.id.chunk_iter(note)
        if needed and offsets.min() < 0:
            raise CorruptStoreError(f"{images.file.filename}: image chunks are missing or of the wrong size")
        return cls(rows, image_nbytes, offsets, labels[:count])
