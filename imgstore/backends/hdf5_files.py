"""HDF5 files for the hdf5 backend: opening them safely, empty files written by Python, fork safety, the read indexes.

Kept apart from ``hdf5.py`` (the Store) so that each stays readable; see that module's docstring
for why files are opened and made this way.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

import h5py
import numpy as np
from h5py import h5f, h5i, h5p

from imgstore.errors import CorruptStoreError, ImgStoreError
from imgstore.manifest import MAX_IMAGE_BYTES

LABEL_CHUNK = 1 << 14
ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


class Layout(NamedTuple):
    shape: tuple[int, ...]  # of one image
    image_rows: int  # images per chunk
    label_rows: int  # labels per chunk


class EncodedLayout(NamedTuple):
    """An encoded store's datasets: ``blobs`` (every record's bytes, concatenated), ``ends`` and ``labels``."""

    blob_chunk: int  # bytes per chunk of ``blobs``
    end_rows: int  # end offsets per chunk
    label_rows: int  # labels per chunk


def fapl() -> h5p.PropFAID:
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, False)  # as h5py.File(..., locking=False): the store's lock admits one writer
    return fapl


def open_h5(path: Path, flags: int) -> tuple[h5py.File, int]:
    """The file opened with HDF5's ``flags``, and a descriptor of the same file for ``preadv``."""
    fid = h5f.open(os.fsencode(path), flags, fapl())
    try:
        fd = os.dup(fid.get_vfd_handle())  # the very file HDF5 opened, even if ``path`` is replaced meanwhile
    except BaseException:
        fid.close()
        raise
    return h5py.File(fid), fd


def open_for_reading(path: Path) -> tuple[h5py.File, int]:
    """Plain read when no writer has the file; SWMR read when one has (or one died with it open).

    SWMR reading is what lets a reader follow a live writer, but it retries every metadata read
    whose checksum fails (torn reads are expected under a live writer), so a damaged file can take
    minutes to fail; a plain read fails at once.
    """
    try:
        return open_h5(path, h5f.ACC_RDONLY)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise CorruptStoreError(f"{path} cannot be opened as HDF5: {exc}") from exc
    try:
        return open_h5(path, h5f.ACC_RDONLY | h5f.ACC_SWMR_READ)
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


@functools.lru_cache(maxsize=16, typed=True)
def skeleton(layout: Layout | EncodedLayout | None) -> bytes:
    """The bytes of an HDF5 file with empty, resizable datasets of ``layout`` (none for None), made in memory."""
    name = f"imgstore-skeleton-{os.getpid()}-{next(_skeleton_names)}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False, libver="latest") as f:
        if isinstance(layout, EncodedLayout):
            f.create_dataset("blobs", shape=(0,), maxshape=(None,), chunks=(layout.blob_chunk,), dtype=np.uint8)
            f.create_dataset("ends", shape=(0,), maxshape=(None,), chunks=(layout.end_rows,), dtype=np.int64)
            f.create_dataset("labels", shape=(0,), maxshape=(None,), chunks=(layout.label_rows,), dtype=np.int64)
        elif layout is not None:
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


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def raise_with_errno(exc: OSError) -> NoReturn:
    fixed = with_errno(exc)
    if fixed is exc:
        raise exc
    raise fixed from exc


def with_errno(exc: OSError) -> OSError:
    """h5py's OSError for a failed write may lack the errno its message names: restore it (ENOSPC: StoreFullError)."""
    if exc.errno is not None or isinstance(exc, ImgStoreError):
        return exc
    message = str(exc)
    found = ERRNO_IN_MESSAGE.search(message)
    if found:
        return OSError(int(found.group(1)), message)
    if "No space left on device" in message:
        return OSError(errno.ENOSPC, message)
    if "File too large" in message:
        return OSError(errno.EFBIG, message)
    return exc


# ---------------------------------------------------------------------- fork

opened: weakref.WeakSet[h5f.FileID] = weakref.WeakSet()  # files imgstore has open in this process


def drop_inherited_files() -> None:
    """In a forked child: let go of the HDF5 files imgstore had open in the parent, writing nothing.

    HDF5 shares one open file among all opens of it in a process, so a child opening the store's
    file would get the parent's (with a writer's write access and the parent's state at the fork),
    and closing that, or merely letting its last reference go, writes the superblock (and may
    truncate the file) in the parent's file. The descriptors of those files are pointed at
    ``/dev/null`` first, so whatever HDF5 tries to write fails, then every object of them is closed.
    """
    files = [fid for fid in list(opened) if fid.valid]
    opened.clear()
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


os.register_at_fork(after_in_child=drop_inherited_files)


# ---------------------------------------------------------------------- the read index


@dataclass(frozen=True)
class ReadIndex:
    rows: int  # images per chunk
    image_nbytes: int
    offsets: np.ndarray | None  # file offset of each image chunk; None when chunks are filtered
    labels: np.ndarray

    @classmethod
    def build(cls, images: h5py.Dataset, labels: h5py.Dataset, count: int) -> ReadIndex:
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


def checked_ends(ends: np.ndarray, data_size: int, where: object) -> np.ndarray:
    """``ends`` (int64) read from a file, after checking it: record ``i`` is ``blobs[ends[i - 1]:ends[i]]``.

    A file is input like any other: every record must have 1 byte to 2 GiB and end within the
    ``blobs`` dataset, so no read allocates more than a record can be because the file says so.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if len(ends) == 0:
        return ends
    # Bounds first: with every end in 1 .. data_size the differences below cannot overflow.
    if int(ends.min()) < 1 or int(ends.max()) > data_size:
        raise CorruptStoreError(f"{where}: record offsets lie outside the {data_size} bytes of records")
    lengths = np.diff(ends, prepend=0)
    if int(lengths.min()) < 1 or int(lengths.max()) > MAX_IMAGE_BYTES:
        raise CorruptStoreError(f"{where}: record offsets are not increasing, or a record exceeds 2 GiB")
    return ends


@dataclass(frozen=True)
class BlobIndex:
    """Where the committed records of an encoded store lie: their bytes' ends, and the file offsets of the chunks."""

    chunk: int  # bytes per chunk of ``blobs``
    ends: np.ndarray  # record i is blobs[ends[i - 1]:ends[i]] (ends[-1] taken as 0); checked
    offsets: np.ndarray | None  # file offset of each chunk; None when chunks are filtered
    run_ends: np.ndarray | None  # per chunk: the last chunk of the run that lies contiguously in the file from it
    labels: np.ndarray

    @classmethod
    def build(cls, blobs: h5py.Dataset, ends: h5py.Dataset, labels: h5py.Dataset, count: int) -> BlobIndex:
        chunk = int(blobs.chunks[0])
        checked = checked_ends(ends[:count], int(blobs.shape[0]), blobs.file.filename)
        label_values = np.asarray(labels[:count], dtype=np.int64)
        if blobs.id.get_create_plist().get_nfilters():
            return cls(chunk, checked, None, None, label_values)
        needed = -(-int(checked[-1]) // chunk) if count else 0
        offsets = np.full(needed, -1, dtype=np.int64)

        def note(info: h5py.h5d.StoreInfo) -> None:
            index = info.chunk_offset[0] // chunk
            if index < needed and info.size == chunk:
                offsets[index] = info.byte_offset

        blobs.id.chunk_iter(note)
        if needed and offsets.min() < 0:
            raise CorruptStoreError(f"{blobs.file.filename}: record chunks are missing or of the wrong size")
        # HDF5 allocates chunks at the end of the file as they are written, so most runs of chunks are
        # contiguous in the file and a record across chunks is still one read.
        breaks = np.flatnonzero(offsets[1:] != offsets[:-1] + chunk)  # chunk c + 1 does not follow chunk c
        run_ends = np.append(breaks, needed - 1)[np.searchsorted(breaks, np.arange(needed))]
        return cls(chunk, checked, offsets, run_ends, label_values)

    def spans(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges ``[starts, stops)`` in ``blobs`` of records ``indices``."""
        stops = self.ends[indices]
        starts = np.where(indices > 0, self.ends[np.maximum(indices - 1, 0)], 0)
        return starts, stops
