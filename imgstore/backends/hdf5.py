"""HDF5 backend: an ``images`` dataset [N, *shape] and a ``labels`` dataset [N] in one file.

Both are chunked along N and resizable, so a store can be appended to. h5py writes; reads of the
uncompressed image chunks go straight to the file with ``preadv`` at the offsets HDF5 reports for
each chunk (``chunk_iter``), the technique kerchunk uses: a single-image read through h5py's
selection machinery costs tens of microseconds, a ``preadv`` into the caller's array about two.
Filtered (compressed) chunks, which a subclass may configure, are read through h5py instead.

Encoded stores (a codec other than raw, or raw images of varied shapes) keep variable-length
records in the same kind of file, in three 1-D datasets made when the store is created:

- ``blobs``: uint8, every record's bytes concatenated, in chunks of 1 MiB (``chunk_bytes`` sizes
  the chunks of raw stores only). Measured on 1 000 ImageNet-like JPEGs (~110 KB): a shuffled
  batch of 256 read with ``preadv`` takes about the same time with 256 KiB to 4 MiB chunks (7-11
  ms warm) and 30-60% more with 64 KiB; h5py slices take 3-5x as long at any size. 1 MiB keeps
  the chunk index small (one entry per MiB) and nine in ten such records inside one chunk.
- ``ends``: int64, record ``i`` is ``blobs[ends[i - 1]:ends[i]]`` (``ends[-1]`` taken as 0).
- ``labels``: int64, as in raw stores.

A write appends at the end of the last committed record (``ends[start - 1]``) and resizes every
dataset to the new records' end, so the leftovers of a write that crashed before its commit are
overwritten or cut off. Reads take the committed ``ends`` once per handle (and per write), after
checking them (increasing, within ``blobs``, no record over 2 GiB: a damaged file never makes a
read allocate what it claims), and read each record with one ``pread`` at the file offset of its
chunk, in file order, then hand them back in the caller's order (a record across two chunks that
are not contiguous in the file is read in two pieces). Reading spans that cover several nearby
records with one read and splitting them gained nothing measurable: 2 KB records cost about 2 µs
each either way, and for 110 KB records the split's extra copy costs more than the calls it saves.

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
from imgstore.backends.hdf5_files import (
    LABEL_CHUNK,
    BlobIndex,
    EncodedLayout,
    Layout,
    ReadIndex,
    checked_ends,
    discard,
    open_for_reading,
    open_h5,
    opened,
    raise_with_errno,
    skeleton,
    with_errno,
    write_all,
)
from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError
from imgstore.fileio import fsync_dir, release_reserve, reserve
from imgstore.manifest import MAX_IMAGE_BYTES
from imgstore.options import Option
from imgstore.store import Store

_FILE = "images.h5"
_BUILDING = ".rebuild"  # suffix of a file being made; the manifest owns "<own file>.rebuild" (TEMPORARY_SUFFIXES)
_COPY_BYTES = 16 << 20  # records copied per step when a file is rebuilt (and bytes per step of an encoded write)
_BLOB_CHUNK = 1 << 20  # bytes per chunk of an encoded store's records (see the module docstring)


class Hdf5Store(Store):
    name = "hdf5"
    damage_errors = (OSError, RuntimeError, KeyError)  # how h5py reports a damaged file
    option_specs = {"chunk_bytes": Option(1 << 18, 1, 1 << 31, fixed=True)}
    files = (_FILE,)

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
        self._file_shape: tuple[int, ...] | None = None  # image shape of the file's datasets (None: none yet)
        if create:
            layout: Layout | EncodedLayout | None = None
            if self._manifest.encoded:  # all datasets now: SWMR mode cannot add them later
                layout = _ENCODED_LAYOUT
            elif self.shape is not None:
                layout = self._layout(self.shape)
            self._install(self._build(layout, None, durable=self.sync), durable=self.sync)
            self._attach(*open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))
        elif self.writable:
            self._attach(*self._open_for_writing(path))
        else:
            self._attach(*open_for_reading(path))

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
        self._file, self._fd, self._index = file, fd, None
        if images is not None and labels is not None and images.dtype == np.uint8 and labels.dtype == np.int64:
            self._images, self._labels, self._file_shape = images, labels, shape
        else:
            self._images = self._labels = self._file_shape = None
        opened.add(file.id)

    def _attach_encoded(self, file: h5py.File, fd: int) -> None:
        try:
            found = _encoded_datasets(file)
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
            reason = str(exc)
        if "already open for read-only" in reason or "access flag not the same" in reason:
            raise StoreBusyError(
                f"{path} is open for reading by a handle in this process, and HDF5 opens a file only one way "
                "per process: close this process's read handles of the store before opening it for writing "
                "(other processes may go on reading)"
            )
        if "already open for write" not in reason:
            raise CorruptStoreError(f"{path} cannot be opened as HDF5: {reason}")
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
        if self._manifest.encoded:
            return self._rebuild_encoded(path)
        if count == 0:  # nothing committed: a fresh file (with datasets if the store has a shape)
            return self._build(self._layout(self.shape) if self.shape is not None else None, None, durable=True)
        old, fd = open_for_reading(path)
        os.close(fd)
        with old:
            source_images, source_labels = old.get("images"), old.get("labels")
            if (
                source_images is None
                or source_labels is None
                or source_images.chunks is None
                or source_labels.chunks is None
                or source_images.shape[1:] != self.shape
                or source_images.shape[0] < count
                or source_labels.shape[0] < count
            ):
                raise CorruptStoreError(f"{path} holds fewer images than its manifest commits")
            layout = Layout(self.image_shape, source_images.chunks[0], source_labels.chunks[0])
            image_nbytes = int(np.prod(self.image_shape, dtype=np.int64))

            def copy_records(file: h5py.File, tmp: Path) -> None:
                images, labels = file["images"], file["labels"]
                reserve(tmp, count * (image_nbytes + 8) + (count * image_nbytes >> 4) + (1 << 20))
                images.resize(count, axis=0)
                labels.resize(count, axis=0)
                step = max(1, _COPY_BYTES // image_nbytes // layout.image_rows) * layout.image_rows
                for lo in range(0, count, step):
                    hi = min(count, lo + step)
                    try:
                        block_images, block_labels = source_images[lo:hi], source_labels[lo:hi]
                    except (OSError, RuntimeError, KeyError, ValueError) as exc:
                        raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
                    images.write_direct(np.ascontiguousarray(block_images), dest_sel=np.s_[lo:hi])
                    labels.write_direct(np.ascontiguousarray(block_labels, dtype=np.int64), dest_sel=np.s_[lo:hi])

            return self._build(layout, copy_records, durable=True)

    def _rebuild_encoded(self, path: Path) -> Path:
        """:meth:`_rebuild` for an encoded store: the committed records' bytes, ends and labels."""
        count = len(self)
        if count == 0:
            return self._build(_ENCODED_LAYOUT, None, durable=True)
        old, fd = open_for_reading(path)
        os.close(fd)
        with old:
            try:
                found = _encoded_datasets(old)
                if found is None or found[1].shape[0] < count or found[2].shape[0] < count:
                    raise CorruptStoreError(f"{path} holds fewer images than its manifest commits")
                blobs, ends, labels = found
                layout = EncodedLayout(blobs.chunks[0], ends.chunks[0], labels.chunks[0])
                kept_ends = checked_ends(ends[:count], blobs.shape[0], path)
                kept_labels = np.asarray(labels[:count], dtype=np.int64)
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                if isinstance(exc, ImgStoreError):
                    raise
                raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
            nbytes = int(kept_ends[-1])

            def copy_records(file: h5py.File, tmp: Path) -> None:
                reserve(tmp, nbytes + 16 * count + (nbytes >> 4) + (1 << 20))
                for name, values in (("ends", kept_ends), ("labels", kept_labels)):
                    file[name].resize(count, axis=0)
                    file[name].write_direct(values)
                file["blobs"].resize(nbytes, axis=0)
                for lo in range(0, nbytes, _COPY_BYTES):
                    hi = min(nbytes, lo + _COPY_BYTES)
                    try:
                        block = blobs[lo:hi]
                    except (OSError, RuntimeError, KeyError, ValueError) as exc:
                        raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
                    file["blobs"].write_direct(np.ascontiguousarray(block), dest_sel=np.s_[lo:hi])

            return self._build(layout, copy_records, durable=True)

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
        self._index = self._blob_index = None
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
                    _put_blobs(file["blobs"], file["ends"], file["labels"], 0, 0, blobs, labels, tmp)

                self._install(self._build(_ENCODED_LAYOUT, put, durable=self.sync), durable=self.sync)
                self._attach(*open_h5(self.file(_FILE), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))
                return
            path = self.file(_FILE)
            _put_blobs(self._blobs, self._ends, self._labels, start, self._end_of(start), blobs, labels, path)
            self._file.flush()
            release_reserve(path)
            if self.sync:
                os.fsync(self._fd)  # H5Fflush hands the data to the OS; fsync makes it durable
            self._blob_index = None
        except OSError as exc:
            raise_with_errno(exc)

    def _end_of(self, start: int) -> int:
        """Where record ``start`` begins in ``blobs``: the end of the committed record before it."""
        if start == 0:
            return 0
        if self._blob_index is not None:
            return int(self._blob_index.ends[start - 1])
        # Not the whole index (a read's job): the last record's bounds, so that a damaged offset
        # cannot make this write land gigabytes past the records.
        try:
            if self._ends.shape[0] < start:
                raise CorruptStoreError(f"{self.file(_FILE)} holds fewer images than its manifest commits")
            last = self._ends[max(0, start - 2) : start]
            size = int(self._blobs.shape[0])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise CorruptStoreError(f"{self.file(_FILE)} cannot be read: {exc}") from exc
        before, end = (0, int(last[0])) if start == 1 else (int(last[0]), int(last[1]))
        if not 0 <= before < end <= size or end - before > MAX_IMAGE_BYTES:
            raise CorruptStoreError(
                f"{self.file(_FILE)}: record {start - 1} lies outside the records ({before} .. {end})"
            )
        return end

    # -------------------------------------------------------------- reading

    def _read_index(self) -> ReadIndex:
        """Chunk offsets and labels of the committed records, built once per handle and per write."""
        if self._index is None:
            self._ensure_open()
            self._check_extent(len(self))
            self._index = ReadIndex.build(self._images, self._labels, len(self))
        return self._index

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

    def _read_blob_index(self) -> BlobIndex:
        """Ends, labels and chunk offsets of the committed records, built once per handle and per write."""
        if self._blob_index is None:
            self._ensure_open()
            count = len(self)
            if self._blobs is None or self._ends.shape[0] < count or self._labels.shape[0] < count:
                raise CorruptStoreError(f"{self.file(_FILE)} holds fewer images than its manifest commits")
            self._blob_index = BlobIndex.build(self._blobs, self._ends, self._labels, count)
        return self._blob_index

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        ix = self._read_blob_index()
        labels = ix.labels[indices]
        starts, stops = ix.spans(indices)
        order = np.argsort(indices, kind="stable")  # file order: records lie in index order
        blobs: list[bytes] = [b""] * len(indices)
        if ix.offsets is None or ix.run_ends is None:
            for k in order.tolist():
                blobs[k] = self._blobs[starts[k] : stops[k]].tobytes()
            return blobs, labels
        first = starts // ix.chunk
        positions = ix.offsets[first] + starts - first * ix.chunk
        # One read when the record's chunks lie one after another in the file (nearly always).
        whole = (stops - 1) // ix.chunk <= ix.run_ends[first]
        # Python ints for the loop: indexing numpy arrays per record costs more than a small record's read.
        for k, position, start, stop, one_read in zip(
            order.tolist(),
            positions[order].tolist(),
            starts[order].tolist(),
            stops[order].tolist(),
            whole[order].tolist(),
            strict=True,
        ):
            blobs[k] = self._pread(position, stop - start) if one_read else self._pread_pieces(ix, start, stop)
        return blobs, labels

    def _pread(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._fd, nbytes, offset)  # straight into a new bytes object: one copy
        if len(data) == nbytes:
            return data
        buffer = bytearray(nbytes)  # Linux reads at most 2 GiB - 4 KiB per call; or the file is short
        buffer[: len(data)] = data
        self._pread_into(np.frombuffer(buffer, np.uint8)[len(data) :], offset + len(data))
        return bytes(buffer)

    def _pread_pieces(self, ix: BlobIndex, start: int, stop: int) -> bytes:
        """A record across chunks that are not contiguous in the file: one read per contiguous run."""
        assert ix.offsets is not None and ix.run_ends is not None
        buffer = np.empty(stop - start, dtype=np.uint8)
        at = start
        while at < stop:
            chunk = at // ix.chunk
            end = min(stop, (int(ix.run_ends[chunk]) + 1) * ix.chunk)
            self._pread_into(buffer[at - start : end - start], int(ix.offsets[chunk]) + at - chunk * ix.chunk)
            at = end
        return buffer.tobytes()


# ---------------------------------------------------------------------- encoded stores' datasets

_ENCODED_LAYOUT = EncodedLayout(_BLOB_CHUNK, LABEL_CHUNK, LABEL_CHUNK)


def _encoded_datasets(file: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset] | None:
    """The ``blobs``, ``ends`` and ``labels`` datasets of an encoded store's file; None unless all are as made."""
    blobs, ends, labels = (file.get(name) for name in ("blobs", "ends", "labels"))
    for dataset, dtype in ((blobs, np.uint8), (ends, np.int64), (labels, np.int64)):
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1 or dataset.chunks is None:
            return None
        if dataset.dtype != dtype:
            return None
    return blobs, ends, labels


def _put_blobs(
    blob_set: h5py.Dataset,
    end_set: h5py.Dataset,
    label_set: h5py.Dataset,
    start: int,
    offset: int,
    blobs: Sequence[bytes],
    labels: np.ndarray,
    file: Path,
) -> None:
    """Write records ``start ..``, their bytes from ``offset`` of ``blob_set``, after reserving disk space."""
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    ends = offset + np.cumsum(lengths)
    stop, total = start + len(blobs), int(lengths.sum())
    reserve(file, total + 16 * len(blobs) + (total >> 4) + (1 << 20))
    # To the new end exactly: a crashed write's leftovers past it are cut off, those before overwritten.
    blob_set.resize(offset + total, axis=0)
    end_set.resize(stop, axis=0)
    label_set.resize(stop, axis=0)
    k, at = 0, offset
    while k < len(blobs):  # pieces of about _COPY_BYTES: a join per piece, not a copy of the whole batch
        j, size = k + 1, len(blobs[k])
        while j < len(blobs) and size + len(blobs[j]) <= _COPY_BYTES:
            size += len(blobs[j])
            j += 1
        piece = np.frombuffer(b"".join(blobs[k:j]), dtype=np.uint8)
        blob_set.write_direct(piece, dest_sel=np.s_[at : at + size])
        k, at = j, at + size
    end_set.write_direct(ends, dest_sel=np.s_[start:stop])
    label_set.write_direct(np.ascontiguousarray(labels, dtype=np.int64), dest_sel=np.s_[start:stop])
