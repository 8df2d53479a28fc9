"""TileDB writes of incompressible data: TileDB 2.30 compresses a fragment's metadata into a buffer a
few bytes too small for random-looking bytes (TileDB #5775; imgstore.backends.tiledb's docstring).

Raw images used to be ``S<nbytes>`` cells, whose tiles' smallest and largest cells go into that
metadata: random pixels failed a write (the third of 1000 CIFAR images). Labels (int64) still have
min/max metadata: a write TileDB refuses is split in two fragments.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import check_store_content, random_images

tiledb = pytest.importorskip("tiledb")
DATA = Path(__file__).parent / "data"


def _array(path: Path) -> str:
    (folder,) = [p for p in path.iterdir() if p.name.startswith("tiledb-")]
    return str(folder)


def _pixels(cells: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(cells).view(np.uint8).reshape(len(cells), *shape)


def test_many_appends_of_random_images_read_back(tmp_path: Path) -> None:
    images, labels = random_images(5000, (32, 32, 3), seed=1)
    path = tmp_path / "random"
    with imgstore.open_store(path, "tiledb", "w", sync=False, consolidate_every=3) as store:
        for start in range(0, 5000, 1000):  # the third failed (48 tiles); merged as they come
            store.put_many(images[start : start + 1000], labels[start : start + 1000])
    with imgstore.open_store(path) as store:
        assert store._direct_index() is not None  # the direct reader, not TileDB's queries
        np.testing.assert_array_equal(store.get_many(np.arange(5000))[0], images)
        order = np.random.default_rng(2).permutation(5000)[:500]
        np.testing.assert_array_equal(store.get_many(order)[0], images[order])
        store.verify()
    with tiledb.open(_array(path)) as array:
        image = array.schema.attr("image")
        assert (image.dtype.itemsize, image.ncells) == (3072, 3072)  # uint8 values, not S3072 (min/max metadata)
        assert len(tiledb.FragmentInfoList(_array(path))) < 3  # merged
        got = array[0:5000]
        np.testing.assert_array_equal(_pixels(got["image"], (32, 32, 3)), images)
        np.testing.assert_array_equal(got["label"], labels)


def test_many_appends_of_random_varied_images_read_back(tmp_path: Path) -> None:
    """The variable-length layout (encoded files, raw images of many shapes): random bytes, many appends."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (int(rng.integers(8, 40)), 37, 3), dtype=np.uint8) for _ in range(3000)]
    labels = rng.integers(0, 10, 3000)
    path = tmp_path / "varied"
    with imgstore.open_store(path, "tiledb", "w", shape=None, sync=False) as store:
        for start in range(0, 3000, 150):
            store.put_many(images[start : start + 150], labels[start : start + 150])
    with imgstore.open_store(path) as store:
        got, got_labels = store.get_many(range(3000))
        assert got_labels.tolist() == labels.tolist()
        for image, want in zip(got, images, strict=True):
            np.testing.assert_array_equal(image, want)
        store.verify()


def test_random_labels_of_any_size_are_written_and_merged(tmp_path: Path) -> None:
    """One image a tile: a fragment's label min/max/sum are 8 random bytes a record (2 060 failed before)."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3000, 2, 2, 1), dtype=np.uint8)
    labels = rng.integers(0, 2**63 - 1, 3000, dtype=np.int64)
    path = tmp_path / "labels"
    with imgstore.open_store(path, "tiledb", "w", sync=False, tile_bytes=4, consolidate_every=3) as store:
        store.put_many(images[:2060], labels[:2060])
        for start in range(2060, 3000, 188):  # merges, some of them refused by TileDB (then skipped)
            store.put_many(images[start : start + 188], labels[start : start + 188])
    with imgstore.open_store(path) as store:
        got, got_labels = store.get_many(np.arange(3000))
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(got_labels, labels)
        store.verify()
    with tiledb.open(_array(path)) as array:
        np.testing.assert_array_equal(array[0:3000]["label"], labels)


@pytest.mark.parametrize("layout", ["values", "pinned S cells"])
def test_tiledb_queries_read_both_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Fragments the direct reader does not know are read with TileDB's queries: uint8 values or S<nbytes> cells."""
    from imgstore.backends import tiledb_direct

    with np.load(DATA / "format3" / "expected.npz") as saved:
        images, labels = saved["images"], saved["labels"]
    path = tmp_path / "store"
    if layout == "values":
        with imgstore.open_store(path, "tiledb", "w") as store:
            store.put_many(images, labels)
    else:
        shutil.copytree(DATA / "format3" / "tiledb", path)
    monkeypatch.setattr(tiledb_direct, "FORMAT_VERSIONS", ())
    with imgstore.open_store(path) as store:
        assert store._direct_index() is None
        check_store_content(store, images, labels)
        order = np.random.default_rng(5).permutation(len(images))
        np.testing.assert_array_equal(store.get_many(order)[0], images[order])
        np.testing.assert_array_equal(store.get(7)[0], images[7])
