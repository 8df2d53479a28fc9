"""A zarr store read by zarr-python itself: ``zarr.open_group`` gives exactly the images, files and labels put.

Also what zarr sees of a store whose last write was killed before its commit: the records past
the committed count (zarr.json is written before the manifest commits), until a writer opens the
store again and sets the arrays back to the committed count.
"""

from __future__ import annotations

import io
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore

zarr = pytest.importorskip("zarr")  # the [zarr] extra; imgstore's backend itself needs only google-crc32c


def zarr_group(store_path: Path) -> object:
    (root,) = store_path.glob("zarr-*")  # the store's zarr group: zarr-<generation>
    return zarr.open_group(str(root), mode="r")


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_zarr_reads_an_appended_raw_store(tmp_path: Path) -> None:
    path = tmp_path / "cifar"
    pixels, labels = images(2600, 1), np.arange(2600, dtype=np.int64) * 7 % 10
    with imgstore.open_store(path, "zarr", "w", shard_images=1024) as store:
        store.put_many(pixels[:100], labels[:100])
    with imgstore.open_store(path, mode="a") as store:  # appends: into the partly filled shard, then new ones
        store.put(pixels[100], int(labels[100]))
        store.put_many(pixels[101:2600], labels[101:2600])
    group = zarr_group(path)
    assert group["images"].shape == (2600, 32, 32, 3) and group["images"].dtype == np.uint8
    assert np.array_equal(group["images"][:], pixels)
    assert np.array_equal(group["labels"][:], labels)
    assert np.array_equal(group["images"][1234], pixels[1234])  # one image: one chunk of its shard
    assert group["images"].metadata.codecs[0].chunk_shape == (1, 32, 32, 3)  # sharded, a chunk per image
    assert len(list((path / next(path.glob("zarr-*")).name / "images" / "c").iterdir())) == 3  # 3 shard files


def file_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (int(rng.integers(8, 60)), int(rng.integers(8, 60)), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def test_zarr_reads_the_files_of_a_keep_store(tmp_path: Path) -> None:
    path = tmp_path / "photos"
    files = [file_bytes(k, "JPEG" if k % 2 else "PNG") for k in range(150)]
    labels = np.arange(150, dtype=np.int64) % 3
    with imgstore.open_store(path, "zarr", "w", codec="keep", shard_images=64) as store:
        store.put_encoded_many(files[:70], labels[:70])
        store.put_encoded_many(files[70:], labels[70:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr-python: variable-length bytes have no zarr v3 specification yet
        group = zarr_group(path)
        blobs = group["blobs"]
        assert blobs.shape == (150,)
        assert [bytes(blob) for blob in blobs[:]] == files  # each record is the file, byte for byte
        # One record: a slice (zarr-python 3.1 gives a scalar read of this type as nested 0-d object arrays).
        assert blobs[77:78][0] == files[77]
    assert np.array_equal(group["labels"][:], labels)


def test_zarr_sees_a_killed_writes_records_until_a_writer_opens(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    pixels, labels = images(300, 2), np.arange(300, dtype=np.int64) % 10
    with imgstore.open_store(path, "zarr", "w", shard_images=128) as store:
        store.put_many(pixels[:200], labels[:200])
    pid = os.fork()
    if pid == 0:  # a writer killed after writing its records, before the manifest commit
        try:
            with imgstore.open_store(path, mode="a") as store:
                store._write(200, pixels[200:300], labels[200:300])  # the backend's half of put_many
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    group = zarr_group(path)
    assert group["images"].shape[0] == 300  # zarr shows the uncommitted records (they are whole here)
    with imgstore.open_store(path) as store:
        assert len(store) == 200  # the manifest governs
        assert np.array_equal(store.get_many(range(200))[0], pixels[:200])
    with imgstore.open_store(path, mode="a"):  # a writer opens: zarr sees the committed records only
        pass
    group = zarr_group(path)
    assert group["images"].shape == (200, 32, 32, 3)
    assert np.array_equal(group["images"][:], pixels[:200]) and np.array_equal(group["labels"][:], labels[:200])
    with imgstore.open_store(path, mode="a") as store:  # and the next write overwrites the leftovers
        store.put_many(pixels[250:260], labels[250:260])
    group = zarr_group(path)
    assert np.array_equal(group["images"][200:], pixels[250:260])


@pytest.mark.parametrize("shape", [None, (4, 4, 3)])
def test_zarr_reads_an_empty_store(tmp_path: Path, shape: tuple[int, ...] | None) -> None:
    """An empty store is an empty group of empty arrays; without a shape, images is 1-D until the first write."""
    path = tmp_path / "empty"
    imgstore.open_store(path, "zarr", "w", **({"shape": shape} if shape else {})).close()
    (root,) = path.glob("zarr-*")
    for group in (zarr_group(path), zarr.open(str(root), mode="r")):
        assert group["images"].shape == ((0, *shape) if shape else (0,)) and group["images"].dtype == np.uint8
        assert group["labels"].shape == (0,) and group["labels"].dtype == np.int64
        assert group["images"][:].size == 0 and group["labels"][:].size == 0
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images(3, 5)[:, :4, :4], [1, 2, 3])
    group = zarr_group(path)
    assert group["images"].shape == (3, 4, 4, 3) and group["labels"][:].tolist() == [1, 2, 3]
