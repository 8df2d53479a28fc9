"""The subjects: ways of storing images that the benchmarks measure, one row each in every group.

A subject is an imgstore backend (one subject per registered backend, so a new backend is
benchmarked with no new code), the tutorial's approach (``benchmarks/tutorial.py``) or the raw-file
limit (below). The operations, and the protocol a subject implements for them, are defined once in
``benchmarks/operations.py``; a subject class declares the ones it supports (``supports``) and has
one method per operation, named after it.

Besides the defaults, each imgstore backend is also measured on its writes with ``sync=False``
(``imgstore-<backend>-nosync``: what durability costs), on its reads with ``verify_reads=False``
(``imgstore-<backend>-noverify``: what checking every record read against its checksum costs),
and with each of its ``presets`` (named option sets the backend declares, e.g. PNG compression
levels); each such row is measured on the operations whose record lists its kind of variant
(``Operation.variants``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

import imgstore
from benchmarks.operations import BATCH_SIZE, VARIANT_KINDS, Subject
from benchmarks.tutorial import TUTORIAL_SUBJECTS

KINDS = ("limit", "imgstore", "tutorial")  # also the order of rows in the summary


class ImgstoreSubject(Subject):
    """An imgstore backend, used only through the public API: with its defaults (durable:
    sync=True), or a variant -- ``sync=False`` or one of the backend's ``presets`` -- that is
    measured on fewer operations and named after what it changes."""

    kind = "imgstore"
    supports = ("store_single", "store_many", "read_single", "read_many", "read_random", "read_random_many", "iterate")

    def __init__(
        self, backend: str, variant: str = "", options: dict[str, Any] | None = None, variant_kind: str = ""
    ) -> None:
        """``variant_kind``: "nosync", "noverify" or "preset" for a variant row (default: the variant's name)."""
        self.backend = backend
        self.name = f"imgstore-{backend}-{variant}" if variant else f"imgstore-{backend}"
        self.variant = variant
        self.variant_kind = variant_kind or variant
        if variant and self.variant_kind not in VARIANT_KINDS:
            raise ValueError(f"{self.name}: variant_kind must be one of {VARIANT_KINDS}, got {self.variant_kind!r}")
        self.options = options or {}

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> imgstore.Store:
        return imgstore.open_store(path, self.backend, "w", **self.options)

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> imgstore.Store:
        # The store's manifest keeps its options; the variant's own (e.g. verify_reads) apply to this handle.
        return imgstore.open_store(path, mode="r", **self.options)

    def close_reader(self, reader: imgstore.Store) -> None:
        reader.close()

    def store_single(self, target: imgstore.Store, images: np.ndarray, labels: np.ndarray) -> None:
        for i in range(len(images)):
            target.put(images[i], labels[i])
        target.close()

    def store_many(self, target: imgstore.Store, images: np.ndarray, labels: np.ndarray) -> None:
        target.put_many(images, labels)
        target.close()

    def read_single(self, reader: imgstore.Store, n: int) -> tuple[np.ndarray, int]:
        for i in range(n):
            image, label = reader.get(i)
        return image, label

    def read_many(self, reader: imgstore.Store, n: int) -> tuple[np.ndarray, np.ndarray]:
        return reader.get_many(range(n))

    def read_random(self, reader: imgstore.Store, order: list[int]) -> tuple[np.ndarray, int]:
        for i in order:
            image, label = reader.get(i)
        return image, label

    def read_random_many(self, reader: imgstore.Store, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
        for start in range(0, len(order), BATCH_SIZE):
            batch = reader.get_many(order[start : start + BATCH_SIZE])
        return batch

    def iterate(self, reader: imgstore.Store, n: int) -> tuple[np.ndarray, np.ndarray]:
        for batch in reader.iter_batches(BATCH_SIZE):  # noqa: B007 - the last batch is returned
            pass
        return batch


class _RawWriter:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True)
        self.dir = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.images = os.open(path / "images.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.labels = os.open(path / "labels.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


class _RawReader:
    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path = path
        self.shape = shape
        self.nbytes = int(np.prod(shape))
        self.file = open(path / "images.raw", "rb", buffering=0)  # noqa: SIM115 - closed by close_reader
        self.images = self.file.fileno()
        # Labels are 8 bytes an image: any sane reader keeps them in memory, so they load at open.
        self.labels = np.fromfile(path / "labels.raw", dtype="<i8")


class LimitSubject(Subject):
    """The limit: pixels in one raw file, labels (int64) in a second, plain OS calls, no format at all.

    Writes: ``store_many`` is one write of all the bytes, ``store_single`` one ``os.write`` per image
    (and per label) to the open files; both end durable like imgstore's stores, with fsync of the two
    files and of their directory (``fsync=False`` makes the no-fsync row, for the writes only).
    Reads, file already open: ``read_single``/``read_random`` one ``os.pread`` per image,
    ``read_many`` one ``np.fromfile``, ``iterate`` one ``os.pread`` per batch. Labels (8 bytes an
    image) are loaded when the reader opens, as any reader of such a file would keep them.
    """

    kind = "limit"
    supports = ("store_single", "store_many", "read_single", "read_many", "read_random", "read_random_many", "iterate")

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self.name = "limit" if fsync else "limit-nofsync"
        self.backend = "raw" if fsync else "raw-nofsync"
        # Measured where the imgstore nosync rows are (the writes): reading does not depend on fsync.
        self.variant_kind = "" if fsync else "nosync"

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> _RawWriter:
        return _RawWriter(path)

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> _RawReader:
        return _RawReader(path, shape)

    def close_reader(self, reader: _RawReader) -> None:
        reader.file.close()

    def _finish(self, target: _RawWriter) -> None:
        for fd in (target.images, target.labels, target.dir):
            if self.fsync:
                os.fsync(fd)
            os.close(fd)

    def store_single(self, target: _RawWriter, images: np.ndarray, labels: np.ndarray) -> None:
        labels = np.ascontiguousarray(labels, dtype="<i8")
        for i in range(len(images)):  # one os.write per image (and one per label), like one put each
            os.write(target.images, images[i])  # type: ignore[arg-type]  # numpy arrays are buffers
            os.write(target.labels, labels[i : i + 1])  # type: ignore[arg-type]
        self._finish(target)

    def store_many(self, target: _RawWriter, images: np.ndarray, labels: np.ndarray) -> None:
        _write_all(target.images, np.ascontiguousarray(images))
        _write_all(target.labels, np.ascontiguousarray(labels, dtype="<i8"))
        self._finish(target)

    def read_single(self, reader: _RawReader, n: int) -> tuple[np.ndarray, int]:
        return _pread_each(reader, range(n))

    def read_many(self, reader: _RawReader, n: int) -> tuple[np.ndarray, np.ndarray]:
        reader.file.seek(0)
        images = np.fromfile(reader.file, dtype=np.uint8, count=n * reader.nbytes)
        return images.reshape(n, *reader.shape), reader.labels[:n].copy()

    def read_random(self, reader: _RawReader, order: list[int]) -> tuple[np.ndarray, int]:
        return _pread_each(reader, order)

    def read_random_many(self, reader: _RawReader, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
        size = reader.nbytes
        for start in range(0, len(order), BATCH_SIZE):
            indices = order[start : start + BATCH_SIZE]
            images = np.empty((len(indices), size), np.uint8)
            for row, i in enumerate(indices):  # one preadv per image, straight into the batch
                os.preadv(reader.images, [images[row]], i * size)
            batch = images.reshape(len(indices), *reader.shape), reader.labels[indices]
        return batch

    def iterate(self, reader: _RawReader, n: int) -> tuple[np.ndarray, np.ndarray]:
        size = reader.nbytes
        for start in range(0, n, BATCH_SIZE):
            stop = min(start + BATCH_SIZE, n)
            images = np.frombuffer(os.pread(reader.images, (stop - start) * size, start * size), np.uint8)
            batch = images.reshape(stop - start, *reader.shape), reader.labels[start:stop].copy()
        return batch


def _pread_each(reader: _RawReader, indices: range | list[int]) -> tuple[np.ndarray, int]:
    """One os.pread per image, file already open; the label comes from the labels loaded at open."""
    size, shape = reader.nbytes, reader.shape
    for i in indices:
        image = np.frombuffer(os.pread(reader.images, size, i * size), np.uint8).reshape(shape)
        label = int(reader.labels[i])
    return image, label


def _write_all(fd: int, array: np.ndarray) -> None:
    view = memoryview(array).cast("B")  # type: ignore[arg-type]
    while view:
        view = view[os.write(fd, view) :]


def make_subjects(backends: list[str]) -> list[Subject]:
    """The limit rows, one row per imgstore backend asked for, and the tutorial's rows for those backends.

    If the tutorial has none of the backends asked for, all its rows are kept, so that every group
    still shows where the tutorial's approach stands.
    """
    tutorial = [s for s in TUTORIAL_SUBJECTS if s.backend in backends] or list(TUTORIAL_SUBJECTS)
    stores: list[Subject] = []
    for backend in backends:
        stores += [
            ImgstoreSubject(backend),
            ImgstoreSubject(backend, "nosync", {"sync": False}),
            ImgstoreSubject(backend, "noverify", {"verify_reads": False}),
        ]
        presets = imgstore.get_backend(backend).presets
        stores += [ImgstoreSubject(backend, name, dict(options), "preset") for name, options in presets.items()]
    return [LimitSubject(), LimitSubject(fsync=False), *stores, *tutorial]
