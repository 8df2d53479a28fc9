"""HDF5 files for the hdf5 backend: opening them safely, empty files written by Python, fork safety.

Also what is particular to raw stores' ``images``/``labels`` datasets: their copy into a rebuilt
file and their read index (``hdf5_blobs.py`` has the same for encoded stores' records). Kept apart
from ``hdf5.py`` (the Store) so that each stays readable; see that module's docstring for why files
are opened and made this way.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

import h5py
import numpy as np
from h5py import h5f, h5i, h5p

from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError
from imgstore.fileio import reserve

LABEL_CHUNK = 1 << 14
COPY_BYTES = 16 << 20  # records copied per step when a file is rebuilt (and bytes per step of an encoded write)
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


# HDF5 opens a file once per process and refuses a second open whose flags differ from the first's:
# these say the file is open in this process already (h5py's default open locks; imgstore's does
# not), which is no damage.
_OPEN_IN_PROCESS = ("file locking flag values don't match", "already open for read-only", "access flag not the same")


def open_error(path: Path, exc: OSError) -> ImgStoreError:
    """What an HDF5 open's failure means: the file is busy in this process, or damaged."""
    reason = str(exc)
    if any(words in reason for words in _OPEN_IN_PROCESS):
        return StoreBusyError(
            f"{path} is already open in this process, by an imgstore handle or by another library (h5py), and "
            f"HDF5 opens a file only once per process, one way ({reason}); nothing is damaged. Close the other "
            "open first (this process's imgstore readers, before opening the store for writing), or open the "
            "file in h5py with h5py.File(path, 'r', locking=False) beside imgstore's readers, or use one handle "
            "per process"
        )
    return CorruptStoreError(f"{path} cannot be opened as HDF5: {reason}")


def open_for_reading(path: Path) -> tuple[h5py.File, int]:
    """Plain read when no writer has the file; SWMR read when one has (or one died with it open).

    SWMR reading is what lets a reader follow a live writer, but it retries every metadata read
    whose checksum fails (torn reads are expected under a live writer), so a damaged file can take
    minutes to fail; a plain read fails at once.
    """
    try:
        return open_h5(path, h5f.ACC_RDONLY)
    except OSError as exc:
        # "access flag not the same": this process still has the file open for SWMR reading (a handle
        # refreshed while another thread read through its old file objects): HDF5 shares that open.
        if "already open for write" not in str(exc) and "SWMR read access flag not the same" not in str(exc):
            raise open_error(path, exc) from exc
    try:
        return open_h5(path, h5f.ACC_RDONLY | h5f.ACC_SWMR_READ)
    except OSError as exc:
        if "not already open for SWMR writing" not in str(exc):
            raise open_error(path, exc) from exc
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


def copy_images(
    old: h5py.File, count: int, shape: tuple[int, ...] | None, path: Path
) -> tuple[Layout, Callable[[h5py.File, Path], None]]:
    """The layout of ``old``'s datasets, and a fill that copies its first ``count`` images and labels.

    ``old`` is the file at ``path`` (of a store of images of ``shape``), read to rebuild it; it must
    stay open until the fill has run.
    """
    source_images, source_labels = old.get("images"), old.get("labels")
    if (
        shape is None  # never so once records are committed; checked for the type checker
        or source_images is None
        or source_labels is None
        or source_images.chunks is None
        or source_labels.chunks is None
        or source_images.shape[1:] != shape
        or source_images.shape[0] < count
        or source_labels.shape[0] < count
    ):
        raise CorruptStoreError(f"{path} holds fewer images than its manifest commits")
    layout = Layout(shape, source_images.chunks[0], source_labels.chunks[0])
    image_nbytes = int(np.prod(shape, dtype=np.int64))

    def copy_records(file: h5py.File, tmp: Path) -> None:
        images, labels = file["images"], file["labels"]
        reserve(tmp, count * (image_nbytes + 8) + (count * image_nbytes >> 4) + (1 << 20))
        images.resize(count, axis=0)
        labels.resize(count, axis=0)
        step = max(1, COPY_BYTES // image_nbytes // layout.image_rows) * layout.image_rows
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            try:
                block_images, block_labels = source_images[lo:hi], source_labels[lo:hi]
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
            images.write_direct(np.ascontiguousarray(block_images), dest_sel=np.s_[lo:hi])
            labels.write_direct(np.ascontiguousarray(block_labels, dtype=np.int64), dest_sel=np.s_[lo:hi])

    return layout, copy_records


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
