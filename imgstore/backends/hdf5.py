"""HDF5 backend: an ``images`` dataset [N, *shape] and a ``labels`` dataset [N] in one file.

Both are chunked along N and resizable, so a store can be appended to. h5py writes; reads of the
uncompressed image chunks go straight to the file with ``preadv`` at the offsets HDF5 reports for
each chunk (``chunk_iter``), the technique kerchunk uses: a single-image read through h5py's
selection machinery costs tens of microseconds, a ``preadv`` into the caller's array about two.
Filtered (compressed) chunks, which a subclass may configure, are read through h5py instead.

Encoded stores (a codec other than raw, or raw images of varied shapes) keep variable-length
records in the same kind of file, in three 1-D datasets made when the store is created: ``blobs``
(uint8, every record's bytes concatenated), ``ends`` (int64, where each record ends in ``blobs``)
and ``labels``. ``hdf5_blobs.py`` describes them, with how records are written and read.

Concurrency and crashes. HDF5 marks a file "open for write" in its superblock while a writer has
it, and refuses that mark in most ways: a plain reader or a new writer is refused any such file, a
SWMR reader one whose writer was not in SWMR mode. So the store's file is only ever opened for
writing in SWMR mode, in one step (``H5F_ACC_SWMR_WRITE``: both marks are written together), and
never gets a mark SWMR readers refuse:

- Datasets cannot be made in SWMR mode. A file with new datasets (a new store with ``shape=``, the
  first write of a store without) is made whole under a temporary name the manifest owns
  (``<file>.rebuild``), its skeleton written by Python (a full disk is a clean ``ENOSPC``) and its
  records by HDF5 into reserved blocks, made durable, then moved into place with ``os.replace``.
- A writer that died leaves its SWMR mark, which a new writer may not open. The committed records
  are copied into a new file the same way and moved into place. Readers open such a file in SWMR
  mode (and one without a mark plainly: SWMR reading retries damaged metadata for minutes).
- A plain "open for write" mark (imgstore before this design opened files without SWMR for a
  moment) is readable through h5py's Python file-object driver, which does not check marks; a
  writer copies the records out of it.

HDF5's own file locks are off: they would keep a writer out while any reader is open; the store's
writer lock already admits one writer only. Within one process HDF5 shares one open file among all
its handles, so a writer cannot open a file a reader of the same process has open
(``StoreBusyError``). A forked child inherits the parent's open files, whose use or closing in the
child would write to the parent's file: the child replaces their descriptors with ``/dev/null``,
drops them at once, and its handles open the file anew, for reading.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5f

from imgstore.arguments import io_error
from imgstore.backends.hdf5_blobs import (
    ENCODED_LAYOUT,
    BlobIndex,
    copy_blobs,
    encoded_datasets,
    end_of,
    put_blobs,
    read_blobs,
)
from imgstore.backends.hdf5_files import (
    LABEL_CHUNK,
    EncodedLayout,
    Layout,
    ReadIndex,
    copy_images,
    discard,
    open_error,
    open_for_reading,
    open_h5,
    opened,
    raise_with_errno,
    skeleton,
    with_errno,
    write_all,
)
from imgstore.backends.mapped_rows import MappedRows
from imgstore.errors import CorruptStoreError, ImgStoreError
from imgstore.fileio import fsync_dir, release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

_FILE = "images.h5"
_BUILDING = ".rebuild"  # suffix of a file being made; the manifest owns "<own file>.rebuild" (TEMPORARY_SUFFIXES)


class Hdf5Store(Store):
    name = "hdf5"
    damage_errors = (OSError, RuntimeError, KeyError)  # how h5py reports a damaged file
    option_specs = {"chunk_bytes": Option(1 << 18, 1, 1 << 31, fixed=True)}
    files = (_FILE,)
    readers = ("h5py, h5dump, HDFView: datasets images and labels",)
    caveats = ("one handle per file in a process: a writer beside a reader of the same process is StoreBusyError",)

    def _open(self, create: bool) -> None:
        path = self.file(_FILE)
        # h5py objects (untyped: Any); None while closed or before the datasets exist.
        self._file: Any = None
        self._fd = -1  # the raw descriptor reads go through; -1 while closed
        self._images: Any = None
        self._labels: Any = None
        self._blobs: Any = None  # encoded stores: records' bytes, and their end offsets
        self._ends: Any = None
        self._index: ReadIndex | None = None
        self._blob_index: BlobIndex | None = None
        self._mapped: MappedRows | None = None  # shuffled reads of raw records, out of a map of the file
        self._file_shape: tuple[int, ...] | None = None  # image shape of the file's datasets (None: none yet)
        if create:
            self._install(self._build(self._empty_layout(), None, durable=self.sync), durable=self.sync)
            self._attach(*open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))
        elif self.writable:
            self._attach(*self._open_for_writing(path))
        else:
            self._attach(*open_for_reading(path))

    def _empty_layout(self) -> Layout | EncodedLayout | None:
        """The datasets of a file without records: those of the store's shape, if it has one yet."""
        if self._manifest.encoded:  # all datasets now: SWMR mode cannot add them later
            return ENCODED_LAYOUT
        return self._layout(self.shape) if self.shape is not None else None

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        nbytes = int(np.prod(shape, dtype=np.int64))
        return Layout(tuple(shape), max(1, self.options["chunk_bytes"] // nbytes), LABEL_CHUNK)

    def _attach(self, file: h5py.File, fd: int) -> None:
        """Use an open file: check its datasets against the manifest."""
        if self._manifest.encoded:
            self._attach_encoded(file, fd)
            return
        try:
            images, labels = file.get("images"), file.get("labels")
            shape = images.shape[1:] if images is not None else None
            if len(self) and (
                images is None
                or labels is None
                or shape != self.shape
                or images.dtype != np.uint8
                or labels.dtype != np.int64
                or labels.ndim != 1
                or images.chunks is None
            ):
                raise CorruptStoreError(f"{self.file(_FILE)} has no images/labels datasets of this store's shape")
        except BaseException:
            file.close()
            os.close(fd)
            raise
        self._file, self._fd, self._index, self._mapped = file, fd, None, None
        if images is not None and labels is not None and images.dtype == np.uint8 and labels.dtype == np.int64:
            self._images, self._labels, self._file_shape = images, labels, shape
        else:
            self._images = self._labels = self._file_shape = None
        opened.add(file.id)

    def _attach_encoded(self, file: h5py.File, fd: int) -> None:
        try:
            found = encoded_datasets(file)
            if len(self) and found is None:
                raise CorruptStoreError(f"{self.file(_FILE)} has no blobs/ends/labels datasets of an encoded store")
        except BaseException:
            file.close()
            os.close(fd)
            raise
        self._file, self._fd, self._blob_index = file, fd, None
        # None (no datasets): an empty store made without them; its first write makes a new file.
        self._blobs, self._ends, self._labels = found if found is not None else (None, None, None)
        opened.add(file.id)

    def _ensure_open(self) -> None:
        if self._file is None:  # let go after an error, or by _install
            path = self.file(_FILE)
            self._attach(*(self._open_for_writing(path) if self.writable else open_for_reading(path)))

    def _open_for_writing(self, path: Path) -> tuple[h5py.File, int]:
        discard(path.with_name(path.name + _BUILDING))  # a file a killed writer was making
        try:
            return open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE)
        except OSError as exc:
            if "already open for write" not in str(exc):
                raise open_error(path, exc) from exc
        # The file carries a writer's mark, and this handle holds the store's writer lock: that writer
        # died. HDF5 has no API to clear the mark (only its h5clear tool), so the committed records are
        # copied into a new file that replaces this one.
        try:
            self._install(self._rebuild(path), durable=True)
        except OSError as exc:
            if isinstance(exc, ImgStoreError):
                raise
            raise io_error(with_errno(exc), f"recovering {path} after its writer died") from exc
        return open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE)

    def _rebuild(self, path: Path) -> Path:
        """A new file holding the committed records of the file at ``path``; returns its temporary name."""
        count = len(self)
        if count == 0:  # nothing committed: a fresh file
            return self._build(self._empty_layout(), None, durable=True)
        old, fd = open_for_reading(path)
        os.close(fd)
        with old:  # open until the new file is made: the copy reads from it
            if self._manifest.encoded:
                return self._build(*copy_blobs(old, count, path), durable=True)
            return self._build(*copy_images(old, count, self.shape, path), durable=True)

    def _build(
        self,
        layout: Layout | EncodedLayout | None,
        fill: Callable[[h5py.File, Path], None] | None,
        *,
        durable: bool,
    ) -> Path:
        """Make a whole new file (datasets of ``layout``, then ``fill``) under the temporary name; return that name.

        No reader can see the file until :meth:`_install` moves it into place, so it is written without SWMR.
        """
        path = self.file(_FILE)
        tmp = path.with_name(path.name + _BUILDING)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                write_all(fd, skeleton(layout))  # by Python: a full disk is a clean ENOSPC
            finally:
                os.close(fd)
            if fill is not None:
                file, fd = open_h5(tmp, h5f.ACC_RDWR)
                os.close(fd)
                with file:
                    fill(file, tmp)  # writes into blocks it reserved first
                release_reserve(tmp)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            discard(tmp)
            raise_with_errno(exc)
        except BaseException:
            discard(tmp)
            raise
        return tmp

    def _install(self, tmp: Path, *, durable: bool) -> None:
        """Move a file :meth:`_build` made into place; the handle's old file (if open) is let go.

        A writer opens the new one at once (in SWMR mode), as it holds its file all along: a reader
        of the same process opened meanwhile shares the writer's open file instead of keeping it out.
        """
        try:
            os.replace(tmp, self.file(_FILE))
        except BaseException:
            discard(tmp)
            raise
        try:
            if durable:
                fsync_dir(self.path)
        finally:
            self._release()  # reopened on first use

    def _forget_handles(self) -> None:
        """Drop the h5py objects and read indexes (not closing anything)."""
        self._file = self._images = self._labels = self._blobs = self._ends = None
        self._index = self._blob_index = self._mapped = None
        self._fd = -1

    def _release(self) -> None:
        file, fd = self._file, self._fd
        self._forget_handles()
        try:
            if file is not None:
                file.close()
        finally:
            if fd >= 0:
                os.close(fd)

    def _close(self) -> None:
        self._release()

    def _damaged(self, exc: BaseException) -> ImgStoreError:
        if isinstance(exc, ImgStoreError):  # this backend's own verdict (busy, full, damaged): not a library error
            return copy.copy(exc)
        return super()._damaged(exc)

    def _refresh(self, old_count: int) -> None:
        # Reopen rather than Dataset.refresh(): that needs SWMR mode, which a reader opened while no
        # writer was there does not use; a reopen also sees datasets a writer made meanwhile, and a
        # file a writer replaced (first write, repair after a crash).
        if self.writable:  # a writer's handle is always current
            self._index = self._blob_index = None
            return
        self._release()
        self._attach(*open_for_reading(self.file(_FILE)))

    def _reopen_after_fork(self) -> None:
        # The HDF5 files of the parent were let go when this process was forked (see
        # drop_inherited_files); this process does not hold the writer lock, so it opens for reading.
        fd = self._fd
        self._forget_handles()
        if fd >= 0:
            os.close(fd)  # this process's copy of the parent's descriptor
        self._open(create=False)

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        try:
            self._ensure_open()
            if self._file_shape != images.shape[1:]:
                # The file has no datasets yet (or ones of a shape no committed record has): make a new
                # file holding these records; SWMR mode, which readers need, cannot add datasets.
                self._write_new_file(images, labels)
                return
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
        except OSError as exc:
            raise_with_errno(exc)

    def _write_new_file(self, images: np.ndarray, labels: np.ndarray) -> None:
        def put(file: h5py.File, tmp: Path) -> None:
            image_set, label_set = file["images"], file["labels"]
            reserve(tmp, images.nbytes + labels.nbytes + (images.nbytes >> 4) + (1 << 20))
            image_set.resize(len(images), axis=0)
            label_set.resize(len(images), axis=0)
            image_set.write_direct(images)
            label_set.write_direct(labels)

        self._install(self._build(self._layout(tuple(images.shape[1:])), put, durable=self.sync), durable=self.sync)
        self._attach(*open_h5(self.file(_FILE), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        try:
            self._ensure_open()
            if self._blobs is None:
                if start:  # _attach lets a file without datasets through only for an empty store
                    raise CorruptStoreError(f"{self.file(_FILE)} has no datasets of an encoded store")

                # An empty store whose file has no datasets (made before this backend held encoded
                # stores): a new file with them and these records, as SWMR mode cannot add datasets.
                def put(file: h5py.File, tmp: Path) -> None:
                    put_blobs(file["blobs"], file["ends"], file["labels"], 0, 0, blobs, labels, tmp)

                self._install(self._build(ENCODED_LAYOUT, put, durable=self.sync), durable=self.sync)
                self._attach(*open_h5(self.file(_FILE), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))
                return
            path = self.file(_FILE)
            offset = end_of(self._blob_index, self._blobs, self._ends, start, path)
            put_blobs(self._blobs, self._ends, self._labels, start, offset, blobs, labels, path)
            self._file.flush()
            release_reserve(path)
            if self.sync:
                os.fsync(self._fd)  # H5Fflush hands the data to the OS; fsync makes it durable
            self._blob_index = None
        except OSError as exc:
            raise_with_errno(exc)

    # -------------------------------------------------------------- reading

    def _read_index(self) -> ReadIndex:
        """Chunk offsets and labels of the committed records, built once per handle and per write."""
        index = self._index
        if index is None:
            refreshes = self._refreshes.count
            self._ensure_open()
            self._check_extent(len(self))
            index = ReadIndex.build(self._images, self._labels, len(self))
            if self._refreshes.unchanged_since(refreshes):  # else it serves this read only
                self._index = index
        return index

    def _mapped_rows(self) -> MappedRows:
        if self._mapped is None:
            self._mapped = MappedRows(self._fd)
        return self._mapped

    @staticmethod
    def _positions(ix: ReadIndex, indices: np.ndarray) -> np.ndarray:
        """The file offsets of records ``indices`` in a chunked dataset."""
        assert ix.offsets is not None
        chunks, rows = np.divmod(indices, ix.rows)
        return ix.offsets[chunks] + rows * ix.image_nbytes  # type: ignore[no-any-return]

    def _pread_into(self, buffer: np.ndarray, offset: int) -> None:
        done = os.preadv(self._fd, [buffer], offset)  # type: ignore[list-item]
        while 0 < done < buffer.nbytes:  # Linux reads at most 2 GiB - 4 KiB per call
            buffer = buffer[done:]
            offset += done
            done = os.preadv(self._fd, [buffer], offset)  # type: ignore[list-item]
        if done != buffer.nbytes:
            raise CorruptStoreError(f"{self.file(_FILE)} ends before the data its chunk index points to")

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        ix = self._read_index()
        if ix.offsets is None:
            return self._images[index], int(ix.labels[index])
        image = np.empty(self.image_shape, dtype=np.uint8)
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

    def _read_new(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ix = self._read_index()
        if ix.offsets is not None:
            images = self._mapped_rows().gather(self._positions(ix, indices), ix.image_nbytes)
            if images is not None:
                return images.reshape(len(indices), *self.image_shape), ix.labels[indices]
        return super()._read_new(indices)

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        ix = self._read_index()
        labels[:] = ix.labels[indices]
        if ix.offsets is None:
            for k in np.argsort(indices, kind="stable"):  # h5py wants increasing selections: file order
                self._images.read_direct(images, source_sel=np.s_[indices[k]], dest_sel=np.s_[k])
            return
        positions = self._positions(ix, indices)
        if self._mapped_rows().gather(positions, ix.image_nbytes, images.reshape(len(indices), -1)) is not None:
            return
        for k, position in enumerate(positions.tolist()):  # the file is short: pread says where
            self._pread_into(images[k], position)

    def _check_extent(self, stop: int) -> None:
        if self._images is None or not self._holds(stop, self._images, self._labels):
            raise CorruptStoreError(f"{self.file(_FILE)} holds fewer images than its manifest commits")

    def _holds(self, stop: int, *datasets: Any) -> bool:
        """Whether every dataset has at least ``stop`` rows. A reopen while another thread still held
        the old file's objects gets HDF5's shared, older view of the file (one per process): one opened
        for SWMR reading is brought up to date before deciding."""
        if all(dataset.shape[0] >= stop for dataset in datasets):
            return True
        if self.writable:
            return False
        try:  # refused unless the file HDF5 shares was opened for SWMR reading
            for dataset in datasets:
                dataset.refresh()
        except (OSError, RuntimeError, ValueError):
            return False
        return all(dataset.shape[0] >= stop for dataset in datasets)

    def _read_blob_index(self) -> BlobIndex:
        """Ends, labels and chunk offsets of the committed records, built once per handle and per write."""
        index = self._blob_index
        if index is None:
            refreshes = self._refreshes.count
            self._ensure_open()
            count = len(self)
            if self._blobs is None or not self._holds(count, self._ends, self._labels):
                raise CorruptStoreError(f"{self.file(_FILE)} holds fewer images than its manifest commits")
            index = BlobIndex.build(self._blobs, self._ends, self._labels, count)
            if self._refreshes.unchanged_since(refreshes):  # else it serves this read only
                self._blob_index = index
        return index

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        return read_blobs(self._read_blob_index(), self._blobs, indices, self._pread, self._pread_into)

    def _pread(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._fd, nbytes, offset)  # straight into a new bytes object: one copy
        if len(data) == nbytes:
            return data
        buffer = bytearray(nbytes)  # Linux reads at most 2 GiB - 4 KiB per call; or the file is short
        buffer[: len(data)] = data
        self._pread_into(np.frombuffer(buffer, np.uint8)[len(data) :], offset + len(data))
        return bytes(buffer)
