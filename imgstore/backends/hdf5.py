"""HDF5 backend: an ``images`` dataset [N, *shape] and a ``labels`` dataset [N] in one file.

Both are chunked along N and resizable, so a store can be appended to. h5py writes; reads of the
uncompressed image chunks go straight to the file with ``preadv`` at the offsets HDF5 reports for
each chunk (``chunk_iter``), the technique kerchunk uses: a single-image read through h5py's
selection machinery costs tens of microseconds, a ``preadv`` into the caller's array about two.
Filtered (compressed) chunks, which a subclass may configure, are read through h5py instead.

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
import errno
import functools
import itertools
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import h5py
import numpy as np
from h5py import h5f, h5i, h5p

from imgstore.arguments import io_error
from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError
from imgstore.fileio import fsync_dir, release_reserve, reserve
from imgstore.options import Option
from imgstore.store import Store

_FILE = "images.h5"
_BUILDING = ".rebuild"  # suffix of a file being made; the manifest owns "<own file>.<anything>"
_LABEL_CHUNK = 1 << 14
_COPY_BYTES = 16 << 20  # records copied per step when a file is rebuilt
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


class _Layout(NamedTuple):
    shape: tuple[int, ...]  # of one image
    image_rows: int  # images per chunk
    label_rows: int  # labels per chunk


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
        self._index: _ReadIndex | None = None
        self._file_shape: tuple[int, ...] | None = None  # image shape of the file's datasets (None: none yet)
        if create:
            layout = self._layout(self.shape) if self.shape is not None else None
            self._install(self._build(layout, None, durable=self.sync), durable=self.sync)
            self._attach(*_open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))
        elif self.writable:
            self._attach(*self._open_for_writing(path))
        else:
            self._attach(*_open_for_reading(path))

    def _layout(self, shape: tuple[int, ...]) -> _Layout:
        nbytes = int(np.prod(shape, dtype=np.int64))
        return _Layout(tuple(shape), max(1, self.options["chunk_bytes"] // nbytes), _LABEL_CHUNK)

    def _attach(self, file: h5py.File, fd: int) -> None:
        """Use an open file: check its datasets against the manifest."""
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
        _opened.add(file.id)

    def _ensure_open(self) -> None:
        if self._file is None:  # let go after an error, or by _install
            path = self.file(_FILE)
            self._attach(*(self._open_for_writing(path) if self.writable else _open_for_reading(path)))

    def _open_for_writing(self, path: Path) -> tuple[h5py.File, int]:
        _discard(path.with_name(path.name + _BUILDING))  # a file a killed writer was making
        try:
            return _open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE)
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
            raise io_error(_with_errno(exc), f"recovering {path} after its writer died") from exc
        return _open_h5(path, h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE)

    def _rebuild(self, path: Path) -> Path:
        """A new file holding the committed records of the file at ``path``; returns its temporary name."""
        count = len(self)
        if count == 0:  # nothing committed: a fresh file (with datasets if the store has a shape)
            return self._build(self._layout(self.shape) if self.shape is not None else None, None, durable=True)
        old, fd = _open_for_reading(path)
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
            layout = _Layout(self.image_shape, source_images.chunks[0], source_labels.chunks[0])
            image_nbytes = int(np.prod(self.image_shape, dtype=np.int64))

            def copy_records(images: h5py.Dataset, labels: h5py.Dataset, tmp: Path) -> None:
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

    def _build(
        self,
        layout: _Layout | None,
        fill: Callable[[h5py.Dataset, h5py.Dataset, Path], None] | None,
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
                _write_all(fd, _skeleton(layout))  # by Python: a full disk is a clean ENOSPC
            finally:
                os.close(fd)
            if fill is not None:
                file, fd = _open_h5(tmp, h5f.ACC_RDWR)
                os.close(fd)
                with file:
                    fill(file["images"], file["labels"], tmp)  # writes into blocks it reserved first
                release_reserve(tmp)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            _discard(tmp)
            _raise_with_errno(exc)
        except BaseException:
            _discard(tmp)
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
            _discard(tmp)
            raise
        try:
            if durable:
                fsync_dir(self.path)
        finally:
            self._release()  # reopened on first use

    def _release(self) -> None:
        file, fd = self._file, self._fd
        self._file = self._images = self._labels = self._index = None
        self._fd = -1
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
            self._index = None
            return
        self._release()
        self._attach(*_open_for_reading(self.file(_FILE)))

    def _reopen_after_fork(self) -> None:
        # The HDF5 files of the parent were let go when this process was forked (see
        # _drop_inherited_files); this process does not hold the writer lock, so it opens for reading.
        fd = self._fd
        self._file = self._images = self._labels = self._index = None
        self._fd = -1
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
            _raise_with_errno(exc)

    def _write_new_file(self, images: np.ndarray, labels: np.ndarray) -> None:
        def put(image_set: h5py.Dataset, label_set: h5py.Dataset, tmp: Path) -> None:
            reserve(tmp, images.nbytes + labels.nbytes + (images.nbytes >> 4) + (1 << 20))
            image_set.resize(len(images), axis=0)
            label_set.resize(len(images), axis=0)
            image_set.write_direct(images)
            label_set.write_direct(labels)

        self._install(self._build(self._layout(tuple(images.shape[1:])), put, durable=self.sync), durable=self.sync)
        self._attach(*_open_h5(self.file(_FILE), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE))

    # -------------------------------------------------------------- reading

    def _read_index(self) -> _ReadIndex:
        """Chunk offsets and labels of the committed records, built once per handle and per write."""
        if self._index is None:
            self._ensure_open()
            self._check_extent(len(self))
            self._index = _ReadIndex.build(self._images, self._labels, len(self))
        return self._index

    def _pread_into(self, buffer: np.ndarray, offset: int) -> None:
        if os.preadv(self._fd, [buffer], offset) != buffer.nbytes:  # type: ignore[list-item]
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


# ---------------------------------------------------------------------- opening files


def _fapl() -> h5p.PropFAID:
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, False)  # as h5py.File(..., locking=False): the store's lock admits one writer
    return fapl


def _open_h5(path: Path, flags: int) -> tuple[h5py.File, int]:
    """The file opened with HDF5's ``flags``, and a descriptor of the same file for ``preadv``."""
    fid = h5f.open(os.fsencode(path), flags, _fapl())
    try:
        fd = os.dup(fid.get_vfd_handle())  # the very file HDF5 opened, even if ``path`` is replaced meanwhile
    except BaseException:
        fid.close()
        raise
    return h5py.File(fid), fd


def _open_for_reading(path: Path) -> tuple[h5py.File, int]:
    """Plain read when no writer has the file; SWMR read when one has (or one died with it open).

    SWMR reading is what lets a reader follow a live writer, but it retries every metadata read
    whose checksum fails (torn reads are expected under a live writer), so a damaged file can take
    minutes to fail; a plain read fails at once.
    """
    try:
        return _open_h5(path, h5f.ACC_RDONLY)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
    try:
        return _open_h5(path, h5f.ACC_RDONLY | h5f.ACC_SWMR_READ)
    except OSError as exc:
        if "not already open for SWMR writing" not in str(exc):
            raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
    # A plain "open for write" mark, which both kinds of HDF5 readers refuse: a writer that had the
    # file open without SWMR died (imgstore before this design). h5py's Python file-object driver
    # does not check marks, and no writer can be changing the file (it would be in SWMR mode).
    try:
        raw = open(path, "rb")  # noqa: SIM115 - h5py keeps it, and closes it with the file
    except OSError as exc:
        raise CorruptStoreError(f"{path} cannot be opened: {exc}") from exc
    try:
        fd = os.dup(raw.fileno())
        try:
            return h5py.File(raw, "r"), fd
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        raw.close()
        raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
    except BaseException:
        raw.close()
        raise


_skeleton_names = itertools.count()


@functools.lru_cache(maxsize=16)
def _skeleton(layout: _Layout | None) -> bytes:
    """The bytes of an HDF5 file with empty, resizable datasets of ``layout`` (none for None), made in memory."""
    name = f"imgstore-skeleton-{os.getpid()}-{next(_skeleton_names)}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False, libver="latest") as f:
        if layout is not None:
            f.create_dataset(
                "images",
                shape=(0, *layout.shape),
                maxshape=(None, *layout.shape),
                chunks=(layout.image_rows, *layout.shape),
                dtype=np.uint8,
            )
            f.create_dataset("labels", shape=(0,), maxshape=(None,), chunks=(layout.label_rows,), dtype=np.int64)
        f.flush()
        image: bytes = f.id.get_file_image()
        return image


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _raise_with_errno(exc: OSError) -> NoReturn:
    fixed = _with_errno(exc)
    if fixed is exc:
        raise exc
    raise fixed from exc


def _with_errno(exc: OSError) -> OSError:
    """h5py's OSError for a failed write may lack the errno its message names: restore it (ENOSPC: StoreFullError)."""
    if exc.errno is not None or isinstance(exc, ImgStoreError):
        return exc
    message = str(exc)
    found = _ERRNO_IN_MESSAGE.search(message)
    if found:
        return OSError(int(found.group(1)), message)
    if "No space left on device" in message:
        return OSError(errno.ENOSPC, message)
    if "File too large" in message:
        return OSError(errno.EFBIG, message)
    return exc


# ---------------------------------------------------------------------- fork

_opened: weakref.WeakSet[h5f.FileID] = weakref.WeakSet()  # files imgstore has open in this process


def _drop_inherited_files() -> None:
    """In a forked child: let go of the HDF5 files imgstore had open in the parent, writing nothing.

    HDF5 shares one open file among all opens of it in a process, so a child opening the store's
    file would get the parent's (with a writer's write access and the parent's state at the fork),
    and closing that, or merely letting its last reference go, writes the superblock (and may
    truncate the file) in the parent's file. The descriptors of those files are pointed at
    ``/dev/null`` first, so whatever HDF5 tries to write fails, then every object of them is closed.
    """
    files = [fid for fid in list(_opened) if fid.valid]
    _opened.clear()
    if not files:
        return
    for fid in files:
        try:
            fd = fid.get_vfd_handle()
        except Exception:  # noqa: BLE001 - a driver without a descriptor (Python file object): reads only
            continue
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    kinds = (h5f.OBJ_DATASET | h5f.OBJ_GROUP | h5f.OBJ_DATATYPE | h5f.OBJ_ATTR, h5f.OBJ_FILE)
    for fid in files:
        for kind in kinds:
            try:
                objects = h5f.get_obj_ids(fid, kind) if fid.valid else []
            except Exception:  # noqa: BLE001
                continue
            for obj in objects:
                for _ in range(1 << 16):  # each reference, until HDF5 lets go of the object
                    if not obj.valid:
                        break
                    try:
                        h5i.dec_ref(obj)
                    except Exception:  # noqa: BLE001 - the writes it tried failed, as intended
                        break
    h5py._objects.nonlocal_close()  # h5py objects of the closed identifiers must not close reused ones


os.register_at_fork(after_in_child=_drop_inherited_files)


# ---------------------------------------------------------------------- the read index


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
