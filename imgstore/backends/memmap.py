"""memmap backend: the images in one ``.npy`` file, the labels in another, read through a memory map.

The limit made usable: ``images-<gen>.npy`` is a plain NumPy array file, ``[N, *shape]`` uint8, and
``labels-<gen>.npy`` ``[N]`` int64, so ``np.load(path, mmap_mode="r")`` (or ``np.memmap`` at the
header's length, :func:`header_bytes`) reads them without imgstore. Fixed-shape raw images only.

Layout. Each file is a version 1.0 ``.npy`` header padded with spaces to a multiple of 64 bytes,
its count right-aligned in a field of 21 characters, so the count is rewritten in place as the
store grows (only digits change: imgstore's readers accept a header read mid-rewrite; ``np.load``
racing that rewrite may, for that instant, read a mix of two counts); then the records back to
back. The header's length follows from the image shape alone, so a reader knows where the data
start and checks every byte of the header but the count's (a damaged one is a ``CorruptStoreError``).

Commit order. A write puts the new rows past the committed ones (blocks reserved first, so a full
disk is a clean ``ENOSPC``), fsyncs, and the manifest commits them. Only then are the headers'
counts rewritten (:meth:`MemmapStore._publish`), so ``np.load`` never sees a record imgstore did
not commit: after a kill between the two, a header counts fewer rows (a committed prefix) until
the next writer opens the store, which sets both headers to the manifest's count. imgstore itself
reads the count from its manifest, never from a header.

Reads copy out of a read-only ``mmap`` of the committed bytes: a gather or a single image from a
mapping costs half an ``os.pread`` (measured in the README). A mapping of a file cut short under it
would kill the process with SIGBUS on the next touch, so the file's size is checked against the
committed count before every mapping is made, and imgstore never shrinks a file below a committed
record (it cuts only a killed write's leftovers). A mapping covers the records committed when it
was made; a handle maps again when it sees more (after its own write, ``refresh()``, a fork).
"""

from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgstore.errors import CorruptStoreError
from imgstore.fileio import release_reserve, reserve
from imgstore.store import Store

_IMAGES, _LABELS = "images.npy", "labels.npy"
_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: a 2-byte header length
_ALIGN = 64  # numpy's own alignment of the data after a header
_COUNT_DIGITS = 21  # room for any count in place (numpy pads its growable headers the same)
_FIELD_PREFIX = "{{'descr': '{descr}', 'fortran_order': False, 'shape': ("  # then the count's field
_COUNT = re.compile(rb" *\d+")
_LABEL_DESCR = "<i8"


def _dict(count: int, shape: tuple[int, ...], descr: str) -> str:
    # The count right-aligned in a field of fixed width (Python's syntax allows the spaces): a rewrite
    # changes only digits in place, so a reader that reads the header as it is rewritten sees a valid one.
    dims = "".join(f", {size}" for size in shape) if shape else ","
    return f"{_FIELD_PREFIX.format(descr=descr)}{count:>{_COUNT_DIGITS}}{dims}), }}"


def header_bytes(shape: tuple[int, ...], descr: str = "|u1") -> int:
    """Length of the header of a file of records of ``shape``: where the data start (for ``np.memmap``)."""
    longest = len(_MAGIC) + 2 + len(_dict(10**_COUNT_DIGITS - 1, shape, descr)) + 1
    return -(-longest // _ALIGN) * _ALIGN


def make_header(count: int, shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    size = header_bytes(shape, descr)
    text = _dict(count, shape, descr).ljust(size - len(_MAGIC) - 3) + "\n"
    return _MAGIC + (size - len(_MAGIC) - 2).to_bytes(2, "little") + text.encode("latin-1")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``: a short write (a file size limit, a full disk) goes on until it errs."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        if done <= 0:
            raise OSError(28, "no space left: a write made no progress")
        data, offset = data[done:], offset + done


class _Mapped:
    """The committed part of one file, mapped read-only, as an array (or empty: nothing committed)."""

    def __init__(self, path: Path, shape: tuple[int, ...], descr: str, count: int) -> None:
        self.map: mmap.mmap | None = None
        dtype = np.dtype(descr)
        if count == 0:
            self.array = np.empty((0, *shape), dtype)
            return
        offset = header_bytes(shape, descr)
        end = offset + count * math.prod(shape) * dtype.itemsize
        with open(path, "rb") as f:
            head = f.read(offset)
            size = os.fstat(f.fileno()).st_size
            check_header(path, head, shape, descr)
            if size < end:  # checked before mapping: touching a page past the end is SIGBUS
                raise CorruptStoreError(f"{path} holds {size} bytes; its {count} committed records need {end}")
            self.map = mmap.mmap(f.fileno(), end, prot=mmap.PROT_READ)
        self.array = np.frombuffer(self.map, dtype, count * math.prod(shape), offset).reshape(count, *shape)

    def close(self) -> None:
        self.array = self.array[:0].copy()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still alive somewhere: the mapping goes with it
                pass
            self.map = None


def check_header(path: Path, head: bytes, shape: tuple[int, ...], descr: str) -> int:
    """The count in the ``.npy`` header ``head``; :class:`CorruptStoreError` unless it is ours.

    Every byte but the count's field must be as written; the field, digits right-aligned, may be
    any count: a header read while a writer rewrites it mixes two counts' digits.
    """
    template = make_header(0, shape, descr)
    start = len(_MAGIC) + 2 + len(_FIELD_PREFIX.format(descr=descr))
    field = head[start : start + _COUNT_DIGITS]
    rest_ok = head[:start] == template[:start] and head[start + _COUNT_DIGITS :] == template[start + _COUNT_DIGITS :]
    if not rest_ok or _COUNT.fullmatch(field) is None:
        raise CorruptStoreError(f"{path} does not start with the .npy header of {descr} records of shape {shape}")
    return int(field)


class MemmapStore(Store):
    name = "memmap"
    files = (_IMAGES, _LABELS)
    readers = ("numpy: np.load(path, mmap_mode='r'), np.memmap",)
    caveats = (
        "np.load may see one commit less after a kill, until the next writer opens the store",
        "fixed-shape raw images only",
    )
    damage_errors = (OSError, ValueError)  # a file gone or unreadable; mmap's refusals

    def _open(self, create: bool) -> None:
        # Images and labels, mapped on first read, again when the count moves.
        self._maps: tuple[_Mapped, _Mapped] | None = None
        if create:
            for name, shape, descr in self._layouts():
                fd = os.open(self.file(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                try:  # an empty array np.load reads (1-D until the first write gives the images a shape)
                    _pwrite_all(fd, memoryview(make_header(0, shape, descr)), 0)
                    if self.sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            return
        self._mapped()  # a damaged or short file fails here, at open_store
        if self.writable and len(self):
            self._publish(len(self))  # a writer killed before its headers were rewritten left them behind

    def _layouts(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [(_IMAGES, self.shape or (), "|u1"), (_LABELS, (), _LABEL_DESCR)]

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the committed records, mapped now if the handle has not yet seen them all."""
        count = len(self)
        maps = self._maps
        if maps is None or len(maps[0].array) != count:
            # Replaced as one, and the old maps not closed: a read in another thread may be using them
            # (they are unmapped when the last array made from them goes).
            maps = (
                _Mapped(self.file(_IMAGES), self.shape or (), "|u1", count),
                _Mapped(self.file(_LABELS), (), _LABEL_DESCR, count),
            )
            self._maps = maps
        return maps[0].array, maps[1].array

    def _unmap(self) -> None:
        maps, self._maps = self._maps, None
        for mapped in maps or ():
            mapped.close()

    def _close(self) -> None:
        self._unmap()

    def _reopen_after_fork(self) -> None:
        # The parent's mappings are this process's copies: valid, but the child maps anew (and never writes).
        self._maps = None

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        shape = tuple(images.shape[1:])
        labels = np.ascontiguousarray(labels, dtype=_LABEL_DESCR)
        for name, data, descr in ((_IMAGES, images, "|u1"), (_LABELS, labels, _LABEL_DESCR)):
            path = self.file(name)
            record_shape = shape if name == _IMAGES else ()
            offset = header_bytes(record_shape, descr)
            stop = offset + (start + len(data)) * data[:1].nbytes
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                size = os.fstat(fd).st_size
                reserve(path, stop - size)  # a full disk is ENOSPC here, before a byte is written
                try:
                    if start == 0:  # the first records (perhaps over a killed first write of another shape)
                        _pwrite_all(fd, memoryview(make_header(0, record_shape, descr)), 0)
                    _pwrite_all(fd, memoryview(data.reshape(-1).view(np.uint8).data), offset + start * data[:1].nbytes)
                except BaseException:
                    release_reserve(path)
                    raise
                if size > stop:
                    os.ftruncate(fd, stop)  # a killed write's longer leftovers; never a committed record
                if self.sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def put_many(self, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> range:
        written = super().put_many(images, labels)  # put() comes here too
        if len(written):
            self._publish(written.stop)
        return written

    def _publish(self, count: int) -> None:
        """Publish the manifest's count in both headers, so ``np.load`` sees what imgstore committed.

        Not fsynced and never an error: imgstore reads its count from the manifest, and a header left
        behind (a kill, a failed write here) counts a committed prefix until the next writer opens.
        """
        shape = self.shape
        if shape is None:
            return
        for name, record_shape, descr in ((_IMAGES, shape, "|u1"), (_LABELS, (), _LABEL_DESCR)):
            try:
                fd = os.open(self.file(name), os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    _pwrite_all(fd, memoryview(make_header(count, record_shape, descr)), 0)
                finally:
                    os.close(fd)
            except OSError:
                return

    # -------------------------------------------------------------- reading

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self._mapped()
        return images[index].copy(), labels.item(index)  # item: a Python int without a NumPy scalar

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        mapped_images, mapped_labels = self._mapped()
        images[...] = mapped_images[start:stop]
        labels[...] = mapped_labels[start:stop]

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        mapped_images, mapped_labels = self._mapped()
        np.take(mapped_images, indices, axis=0, out=images)
        np.take(mapped_labels, indices, out=labels)
