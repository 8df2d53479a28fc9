"""The reference: the approach of the tutorial "Three Ways of Storing and Accessing Lots of Images in Python".

Its functions are rewritten here to do what the tutorial's do, call for call: PNG files written with
``Image.fromarray(image).save(...)`` and labels in CSV files; an LMDB of pickled ``CIFAR_Image``
objects with the environment opened and closed in every call; an HDF5 file with one unchunked
``images`` dataset and a ``meta`` dataset, both ``STD_U8BE``, written whole. Only the directory is
a parameter (the tutorial used globals), and ``CIFAR_Image`` also accepts grayscale ``[H, W]``
images (the tutorial's reads ``image.shape[2]``), so the Fashion-MNIST dataset works too.

Operations the tutorial has no function for, applied in its per-call style:

- ``read_random``: its single-image read function (``read_single_*``), called once per image in
  the shuffled order. For HDF5 that opens the one file of all images and indexes it per call.
- ``read_random_many``: the same single-image calls in the shuffled order, stacked into one array
  per batch of 256 (the tutorial has no read of chosen indices).
- ``iterate``: one call per batch of 256 in the style of its ``read_many_*``: LMDB opens the
  environment, reads the batch in one transaction and closes it; HDF5 opens the file, reads the
  batch's slice with ``np.array(...).astype("uint8")`` and closes it; PNG decodes the batch's files
  with ``np.array(Image.open(...))``, its labels coming from the one labels CSV, read once per pass
  (as ``read_many_disk`` reads it once per call).
- ``store_single`` for HDF5 is the tutorial's ``store_single_hdf5``: one ``.h5`` file per image.
- ``store_single`` for LMDB uses ``map_size = N * image.nbytes * 10`` (N images go into one
  environment; the tutorial's single-image ``image.nbytes * 10`` would not hold them).

The tutorial writes nothing durably except LMDB (which syncs its commits by default); that is its
approach, and imgstore's stores (durable by default) are compared with it as it is.

The read stores keep, like the tutorial's ``disk_dir``, both label layouts for PNG: one CSV per image
(read by ``read_single_disk``) and one CSV of all labels (read by ``read_many_disk``).
"""

from __future__ import annotations

import csv
import pickle  # only for the tutorial's own LMDB values: our trusted benchmark data, never outside input
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py  # type: ignore[import-untyped]
import lmdb
import numpy as np
from PIL import Image

from benchmarks import tutorial_sqlite
from benchmarks.operations import BATCH_SIZE, Subject


class CIFAR_Image:  # noqa: N801 - the tutorial's name
    def __init__(self, image: np.ndarray, label: int) -> None:
        self.channels = image.shape[2] if image.ndim == 3 else None  # None: grayscale [H, W] (our addition)
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.label = label

    def get_image(self) -> np.ndarray:
        image = np.frombuffer(self.image, dtype=np.uint8)
        return image.reshape(*self.size, self.channels) if self.channels is not None else image.reshape(self.size)


def _csv_writer(csvfile):  # the tutorial's CSV dialect, used for every labels file
    return csv.writer(csvfile, delimiter=" ", quotechar="|", quoting=csv.QUOTE_MINIMAL)


def _csv_reader(csvfile):
    return csv.reader(csvfile, delimiter=" ", quotechar="|", quoting=csv.QUOTE_MINIMAL)


# ---------------------------------------------------------------------- PNG files ("disk")


def store_single_disk(disk_dir: Path, image: np.ndarray, image_id: int, label: int) -> None:
    Image.fromarray(image).save(disk_dir / f"{image_id}.png")
    with open(disk_dir / f"{image_id}.csv", "w") as csvfile:
        _csv_writer(csvfile).writerow([label])


def store_many_disk(disk_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    num_images = len(images)
    for i, image in enumerate(images):
        Image.fromarray(image).save(disk_dir / f"{i}.png")
    with open(disk_dir / f"{num_images}.csv", "w") as csvfile:
        writer = _csv_writer(csvfile)
        for label in labels:
            writer.writerow([label])


def read_single_disk(disk_dir: Path, image_id: int) -> tuple[np.ndarray, int]:
    image = np.array(Image.open(disk_dir / f"{image_id}.png"))
    with open(disk_dir / f"{image_id}.csv") as csvfile:
        label = int(next(_csv_reader(csvfile))[0])
    return image, label


def read_many_disk(disk_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for image_id in range(num_images):
        images.append(np.array(Image.open(disk_dir / f"{image_id}.png")))
    with open(disk_dir / f"{num_images}.csv") as csvfile:
        for row in _csv_reader(csvfile):
            labels.append(int(row[0]))
    return images, labels


def iterate_disk(disk_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    with open(disk_dir / f"{num_images}.csv") as csvfile:
        all_labels = [int(row[0]) for row in _csv_reader(csvfile)]
    for start in range(0, num_images, BATCH_SIZE):
        stop = min(start + BATCH_SIZE, num_images)
        batch = [np.array(Image.open(disk_dir / f"{i}.png")) for i in range(start, stop)], all_labels[start:stop]
    return batch


# ---------------------------------------------------------------------- LMDB


def store_single_lmdb(lmdb_dir: Path, image: np.ndarray, image_id: int, label: int, map_size: int) -> None:
    env = lmdb.open(str(lmdb_dir), map_size=map_size)
    with env.begin(write=True) as txn:
        value = CIFAR_Image(image, label)
        key = f"{image_id:08}"
        txn.put(key.encode("ascii"), pickle.dumps(value))
    env.close()


def store_many_lmdb(lmdb_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    num_images = len(images)
    map_size = num_images * images[0].nbytes * 10
    env = lmdb.open(str(lmdb_dir), map_size=map_size)
    with env.begin(write=True) as txn:
        for i in range(num_images):
            value = CIFAR_Image(images[i], labels[i])
            key = f"{i:08}"
            txn.put(key.encode("ascii"), pickle.dumps(value))
    env.close()


def read_single_lmdb(lmdb_dir: Path, image_id: int) -> tuple[np.ndarray, int]:
    env = lmdb.open(str(lmdb_dir), readonly=True)
    with env.begin() as txn:
        data = txn.get(f"{image_id:08}".encode("ascii"))
        cifar_image = pickle.loads(data)  # type: ignore[arg-type]  # trusted: written by this benchmark
        image = cifar_image.get_image()
        label = cifar_image.label
    env.close()
    return image, label


def _read_range_lmdb(lmdb_dir: Path, start: int, stop: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    env = lmdb.open(str(lmdb_dir), readonly=True)
    with env.begin() as txn:
        for image_id in range(start, stop):
            data = txn.get(f"{image_id:08}".encode("ascii"))
            cifar_image = pickle.loads(data)  # type: ignore[arg-type]  # trusted: written by this benchmark
            images.append(cifar_image.get_image())
            labels.append(cifar_image.label)
    env.close()
    return images, labels


def read_many_lmdb(lmdb_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    return _read_range_lmdb(lmdb_dir, 0, num_images)


def iterate_lmdb(lmdb_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    for start in range(0, num_images, BATCH_SIZE):
        batch = _read_range_lmdb(lmdb_dir, start, min(start + BATCH_SIZE, num_images))
    return batch


# ---------------------------------------------------------------------- HDF5

_MANY_H5 = "many.h5"


def store_single_hdf5(hdf5_dir: Path, image: np.ndarray, image_id: int, label: int) -> None:
    file = h5py.File(hdf5_dir / f"{image_id}.h5", "w")
    file.create_dataset("image", np.shape(image), h5py.h5t.STD_U8BE, data=image)
    file.create_dataset("meta", np.shape(label), h5py.h5t.STD_U8BE, data=label)
    file.close()


def store_many_hdf5(hdf5_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    file = h5py.File(hdf5_dir / _MANY_H5, "w")
    file.create_dataset("images", np.shape(images), h5py.h5t.STD_U8BE, data=images)
    file.create_dataset("meta", np.shape(labels), h5py.h5t.STD_U8BE, data=labels)
    file.close()


def read_single_hdf5(hdf5_dir: Path, image_id: int) -> tuple[np.ndarray, int]:
    # The tutorial's read_single_hdf5 opens a file per call; here that file holds all the images.
    with h5py.File(hdf5_dir / _MANY_H5, "r+") as file:
        image = np.array(file["/images"][image_id]).astype("uint8")
        label = int(np.array(file["/meta"][image_id]).astype("uint8"))
    return image, label


def read_many_hdf5(hdf5_dir: Path, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    # The tutorial leaves this file open; closing it is what a correct program does, and costs little.
    with h5py.File(hdf5_dir / _MANY_H5, "r+") as file:
        images = np.array(file["/images"]).astype("uint8")
        labels = np.array(file["/meta"]).astype("uint8")
    return images, labels


def iterate_hdf5(hdf5_dir: Path, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    for start in range(0, num_images, BATCH_SIZE):
        stop = min(start + BATCH_SIZE, num_images)
        with h5py.File(hdf5_dir / _MANY_H5, "r+") as file:
            images = np.array(file["/images"][start:stop]).astype("uint8")
            batch = images, np.array(file["/meta"][start:stop]).astype("uint8")
    return batch


# ---------------------------------------------------------------------- the three as subjects


class TutorialSubject(Subject):
    """The tutorial's functions for one backend; a target or reader is just the directory."""

    kind = "tutorial"
    supports = ("store_single", "store_many", "read_single", "read_many", "read_random", "read_random_many", "iterate")

    def __init__(self, backend: str, functions: dict[str, Callable[..., Any]]) -> None:
        self.backend = backend
        self.name = f"tutorial-{backend}"
        self.f = functions

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> Path:
        path.mkdir(parents=True)  # the tutorial makes its directories up front
        return path

    def store_single(self, target: Path, images: np.ndarray, labels: np.ndarray) -> None:
        for i in range(len(images)):
            self.f["store_single"](target, images[i], i, labels[i])

    def store_many(self, target: Path, images: np.ndarray, labels: np.ndarray) -> None:
        self.f["store_many"](target, images, labels)

    def read_single(self, reader: Path, n: int) -> tuple[np.ndarray, int]:
        for i in range(n):
            image, label = self.f["read_single"](reader, i)
        return image, label

    def read_many(self, reader: Path, n: int) -> tuple[object, object]:
        return self.f["read_many"](reader, n)

    def read_random(self, reader: Path, order: list[int]) -> tuple[np.ndarray, int]:
        for i in order:
            image, label = self.f["read_single"](reader, i)
        return image, label

    def read_random_many(self, reader: Path, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
        for start in range(0, len(order), BATCH_SIZE):
            pairs = [self.f["read_single"](reader, i) for i in order[start : start + BATCH_SIZE]]
            batch = np.stack([image for image, _ in pairs]), np.array([label for _, label in pairs])
        return batch

    def iterate(self, reader: Path, n: int) -> tuple[object, object]:
        return self.f["iterate"](reader, n)


class _TutorialLmdb(TutorialSubject):
    # store_single_lmdb takes the map size, which depends on N: hence its own loop.
    def store_single(self, target: Path, images: np.ndarray, labels: np.ndarray) -> None:
        map_size = len(images) * images[0].nbytes * 10
        for i in range(len(images)):
            store_single_lmdb(target, images[i], i, labels[i], map_size)


class _TutorialPng(TutorialSubject):
    def build(self, path: Path, images: np.ndarray, labels: np.ndarray) -> None:
        super().build(path, images, labels)
        for i, label in enumerate(labels):  # the per-image label files read_single_disk reads
            with open(path / f"{i}.csv", "w") as csvfile:
                _csv_writer(csvfile).writerow([label])


TUTORIAL_SUBJECTS: tuple[TutorialSubject, ...] = (
    _TutorialPng(
        "png",
        {
            "store_single": store_single_disk,
            "store_many": store_many_disk,
            "read_single": read_single_disk,
            "read_many": read_many_disk,
            "iterate": iterate_disk,
        },
    ),
    _TutorialLmdb(
        "lmdb",
        {
            "store_many": store_many_lmdb,
            "read_single": read_single_lmdb,
            "read_many": read_many_lmdb,
            "iterate": iterate_lmdb,
        },
    ),
    TutorialSubject(
        "hdf5",
        {
            "store_single": store_single_hdf5,
            "store_many": store_many_hdf5,
            "read_single": read_single_hdf5,
            "read_many": read_many_hdf5,
            "iterate": iterate_hdf5,
        },
    ),
    # Not the tutorial's: the naive SQLite way in its style (pickled rows; see benchmarks/tutorial_sqlite.py).
    TutorialSubject("sqlite", tutorial_sqlite.FUNCTIONS),
)
