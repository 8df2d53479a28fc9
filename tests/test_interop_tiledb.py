"""TileDB's own reader (``tiledb.open``) reads what imgstore wrote: images, labels and encoded files' bytes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tiledb

import imgstore
from imgstore.datasets import synthetic_cifar10
from imgstore.manifest import read_manifest


def _array(path: Path) -> str:
    (folder,) = [p for p in path.iterdir() if p.name.startswith("tiledb-")]
    return str(folder)


def _images(cells: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The ``image`` attribute of a raw store: one fixed-size cell of pixels per image."""
    return np.ascontiguousarray(cells).view(np.uint8).reshape(len(cells), *shape)


def test_tiledb_reads_a_raw_store_appended_to(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(300, seed=3)
    path = tmp_path / "cifar"
    with imgstore.open_store(path, "tiledb", "w") as store:
        store.put_many(images[:120], labels[:120])
    with imgstore.open_store(path, mode="a") as store:  # more commits, single puts among them
        store.put_many(images[120:250], labels[120:250])
        for k in range(250, 300):
            store.put(images[k], int(labels[k]))
    with tiledb.open(_array(path)) as array:
        assert tuple(array.meta["image_shape"]) == (32, 32, 3)
        assert array.nonempty_domain() == ((0, 299),)
        first = array[0:10]
        assert np.array_equal(_images(first["image"], (32, 32, 3)), images[:10])
        assert np.array_equal(first["label"], labels[:10])
        every = array[0:300]
        assert np.array_equal(_images(every["image"], (32, 32, 3)), images)
        assert np.array_equal(every["label"], labels)
    with imgstore.open_store(path) as store:  # imgstore reads it back too (after TileDB read it)
        store.verify()


def _write_forever(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    with imgstore.open_store(path, mode="a") as store:
        while True:
            store.put_many(images, labels)


def test_tiledb_reads_the_committed_records_after_a_killed_write(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(2000, seed=4)
    path = tmp_path / "killed"
    with imgstore.open_store(path, "tiledb", "w") as store:
        store.put_many(images[:100], labels[:100])
    writer = multiprocessing.get_context("fork").Process(target=_write_forever, args=(str(path), images, labels))
    writer.start()
    time.sleep(1.5)
    os.kill(writer.pid or 0, signal.SIGKILL)
    writer.join()
    count = read_manifest(path).count
    assert count >= 100 and (count - 100) % 2000 == 0
    with tiledb.open(_array(path)) as array:  # the committed records are exactly what was written
        got = array[0:count]
        assert np.array_equal(_images(got["image"], (32, 32, 3))[:100], images[:100])
        assert np.array_equal(got["label"][100:], np.tile(labels, (count - 100) // 2000))
    with imgstore.open_store(path, mode="a") as store:  # the next write goes over any leftovers
        store.put_many(images[:50], labels[:50])
    with tiledb.open(_array(path)) as array:
        got = array[count : count + 50]
        assert np.array_equal(_images(got["image"], (32, 32, 3)), images[:50])
        assert np.array_equal(got["label"], labels[:50])


def test_tiledb_reads_the_files_of_a_keep_store(tmp_path: Path) -> None:
    pytest.importorskip("skimage")  # imagenet_like's source photographs
    from imgstore.datasets import imagenet_like

    photos = imagenet_like(24, seed=2)
    path = tmp_path / "photos"
    with imgstore.open_store(path, "tiledb", "w", codec="keep", image_mode="RGB") as store:
        store.put_encoded_many(photos.blobs[:10], photos.labels[:10])
    with imgstore.open_store(path, mode="a") as store:
        store.put_encoded_many(photos.blobs[10:], photos.labels[10:])
    with tiledb.open(_array(path)) as array:
        got = array[0:24]
        assert [bytes(cell) for cell in got["image"]] == list(photos.blobs)  # the JPEG files' own bytes
        assert np.array_equal(got["label"], photos.labels)
