"""NumPy reads a memmap store imgstore wrote: ``np.load(mmap_mode="r")`` and ``np.memmap`` at the documented offset."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore import fixed
from imgstore.backends.memmap import MemmapStore, check_header, header_bytes, make_header
from imgstore.datasets import synthetic_cifar10
from imgstore.manifest import read_manifest

SHAPE = (32, 32, 3)


def _files(path: Path) -> tuple[Path, Path]:
    generation = read_manifest(path).generation
    return path / f"images-{generation}.npy", path / f"labels-{generation}.npy"


def _numpy_sees(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _files(path)
    images = np.load(images_file, mmap_mode="r", allow_pickle=False)
    labels = np.load(labels_file, allow_pickle=False)
    assert images.dtype == np.uint8 and images.shape[1:] == SHAPE and labels.dtype == np.int64
    return np.array(images), labels


def test_np_load_and_np_memmap_read_a_store_of_several_commits(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(250, seed=3)
    path = tmp_path / "store"
    with imgstore.open_store(path, "memmap", "w") as store:
        store.put_many(images[:120], labels[:120])
    with imgstore.open_store(path, mode="a") as store:  # appended: by a batch, then one image at a time
        store.put_many(images[120:240], labels[120:240])
        for i in range(240, 250):
            store.put(images[i], int(labels[i]))
    got_images, got_labels = _numpy_sees(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    images_file, labels_file = _files(path)
    mapped = np.memmap(images_file, np.uint8, "r", offset=header_bytes(SHAPE), shape=(250, *SHAPE))
    np.testing.assert_array_equal(mapped, images)
    mapped_labels = np.memmap(labels_file, "<i8", "r", offset=header_bytes((), "<i8"), shape=(250,))
    np.testing.assert_array_equal(mapped_labels, labels)
    assert header_bytes(SHAPE) % 64 == 0


def test_an_empty_store_of_a_given_shape_is_an_empty_array(tmp_path: Path) -> None:
    imgstore.open_store(tmp_path / "store", "memmap", "w", shape=SHAPE).close()
    images, labels = _numpy_sees(tmp_path / "store")
    assert images.shape == (0, *SHAPE) and labels.shape == (0,)


def _die_at(path: str, images: np.ndarray, labels: np.ndarray, where: str) -> None:
    def die(*args: object, **kwargs: object) -> None:
        os._exit(9)

    with imgstore.open_store(path, mode="a") as store:
        if where == "commit":  # the rows are written and fsynced; the manifest never names them
            fixed.write_manifest = die  # type: ignore[assignment]
        else:  # committed; the headers still say the old count
            MemmapStore._publish = die  # type: ignore[method-assign]
        store.put_many(images, labels)
    os._exit(0)


@pytest.mark.parametrize("where", ["commit", "headers"])
def test_numpy_never_sees_a_record_a_killed_writer_did_not_commit(tmp_path: Path, where: str) -> None:
    images, labels = synthetic_cifar10(200, seed=4)
    path = tmp_path / "store"
    with imgstore.open_store(path, "memmap", "w") as store:
        store.put_many(images[:100], labels[:100])
    child = multiprocessing.get_context("fork").Process(
        target=_die_at, args=(str(path), images[100:], labels[100:], where)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 9
    committed = 100 if where == "commit" else 200
    assert _files(path)[0].stat().st_size >= header_bytes(SHAPE) + 200 * 3072  # the rows are there
    got_images, got_labels = _numpy_sees(path)  # the headers count the old commit only: never a leftover
    assert len(got_images) == len(got_labels) == 100
    np.testing.assert_array_equal(got_images, images[:100])
    with imgstore.open_store(path) as store:
        assert len(store) == committed
    with imgstore.open_store(path, mode="a") as store:  # a writer sets the headers to the manifest's count
        pass
    got_images, got_labels = _numpy_sees(path)
    np.testing.assert_array_equal(got_images, images[:committed])
    np.testing.assert_array_equal(got_labels, labels[:committed])
    if where == "commit":  # a shorter write over the leftovers: numpy sees exactly the new records
        with imgstore.open_store(path, mode="a") as store:
            store.put_many(images[150:160], labels[150:160])
        got_images, got_labels = _numpy_sees(path)
        np.testing.assert_array_equal(got_images, np.concatenate([images[:100], images[150:160]]))
        np.testing.assert_array_equal(got_labels, np.concatenate([labels[:100], labels[150:160]]))
        assert _files(path)[0].stat().st_size == header_bytes(SHAPE) + 110 * 3072


def test_encoded_records_are_refused_at_creation_and_nothing_is_made(tmp_path: Path) -> None:
    for kwargs, error in (
        ({"codec": "keep"}, imgstore.InvalidOptionError),
        ({"shape": None}, imgstore.InvalidImageError),
    ):
        with pytest.raises(error, match="memmap"):
            imgstore.open_store(tmp_path / "store", "memmap", "w", **kwargs)
        assert not (tmp_path / "store").exists()


def test_a_header_read_while_it_is_rewritten_is_still_ours(tmp_path: Path) -> None:
    """A reader may read a header half old, half new: only the count's digits change, so imgstore takes any mix."""
    old, new = make_header(99, SHAPE), make_header(1_000_005, SHAPE)
    assert len(old) == len(new) == header_bytes(SHAPE)
    for cut in range(len(old) + 1):
        check_header(tmp_path, old[:cut] + new[cut:], SHAPE, "|u1")
    damaged = bytearray(old)
    damaged[old.index(b"32")] = ord("4")
    with pytest.raises(imgstore.CorruptStoreError):
        check_header(tmp_path, bytes(damaged), SHAPE, "|u1")


def test_an_empty_store_without_a_shape_is_empty_arrays_numpy_reads(tmp_path: Path) -> None:
    """No shape yet: images.npy is an empty 1-D uint8 array until the first write gives it its shape."""
    path = tmp_path / "store"
    imgstore.open_store(path, "memmap", "w").close()
    images_file, labels_file = _files(path)
    images, labels = (np.load(file, mmap_mode="r", allow_pickle=False) for file in (images_file, labels_file))
    assert images.shape == (0,) and images.dtype == np.uint8
    assert labels.shape == (0,) and labels.dtype == np.int64
    with imgstore.open_store(path, mode="a") as store:
        assert len(store) == 0 and store.shape is None
        store.put_many(np.full((2, *SHAPE), 7, np.uint8), [3, 4])
    images, labels = _numpy_sees(path)
    assert images.shape == (2, *SHAPE) and (images == 7).all() and labels.tolist() == [3, 4]
