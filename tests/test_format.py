"""Stores written by earlier versions keep working: pinned stores under ``tests/data`` are read back bit-exact.

``format<N>/`` holds one small store per backend written in store format version N, and
``expected.npz`` its records: ``format1/`` by commit c5d7c9c (CRC-32 record checksums, files
without generation names), ``format2/`` by the commit that introduced it (XXH3 record and group
checksums, generation-named files; 48x48x3 images, so a group checksum is exercised), ``format3/``
likewise (codecs: the same raw records, and under ``encoded/`` per backend a ``keep`` store of JPEG,
PNG and WebP files with classes and source paths, a ``png`` store of arrays of varied shapes and
channels, and a raw store of varied shapes). Every later version must read them bit-exact, verify
them, and append to them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.manifest import MANIFEST_NAME
from imgstore.testing import check_store_content, random_images

DATA = Path(__file__).parent / "data"
BACKENDS = ("png", "lmdb", "hdf5")


VERSIONS = (1, 2, 3)


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def expected(version: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / f"format{version}" / "expected.npz") as saved:
        return saved["images"], saved["labels"]


@pytest.fixture(params=BACKENDS)
def pinned_store(request: pytest.FixtureRequest, tmp_path: Path, version: int) -> Path:
    path = tmp_path / request.param
    shutil.copytree(DATA / f"format{version}" / request.param, path)
    return path


@pytest.fixture(params=BACKENDS)
def format1_store(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / request.param
    shutil.copytree(DATA / "format1" / request.param, path)
    return path


def test_the_current_format_is_pinned() -> None:
    from imgstore.manifest import FORMAT_VERSION

    assert FORMAT_VERSION in VERSIONS, "a new format version needs its pinned stores under tests/data"


def test_pinned_stores_read_back_bit_exact(
    pinned_store: Path, version: int, expected: tuple[np.ndarray, np.ndarray]
) -> None:
    with imgstore.open_store(pinned_store) as store:
        assert json.loads((pinned_store / MANIFEST_NAME).read_text())["format_version"] == version
        check_store_content(store, *expected)
        store.verify()
        order = np.random.default_rng(3).permutation(len(store))
        np.testing.assert_array_equal(store.get_many(order)[0], expected[0][order])


def test_format1_reads_are_verified(format1_store: Path) -> None:
    checksums = format1_store / "checksums.crc32"
    data = bytearray(checksums.read_bytes())
    data[4 * 7] ^= 1  # record 7's CRC-32
    checksums.write_bytes(bytes(data))
    with imgstore.open_store(format1_store) as store:
        store.get(6)
        with pytest.raises(imgstore.CorruptStoreError, match="index 7"):
            store.get(7)
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_many(range(len(store)))
    with imgstore.open_store(format1_store, verify_reads=False) as store:
        store.get(7)  # unchecked: the pixels themselves are intact


def test_pinned_stores_take_appends_and_keep_their_format(
    pinned_store: Path, version: int, expected: tuple[np.ndarray, np.ndarray]
) -> None:
    more, more_labels = random_images(30, expected[0].shape[1:], seed=8)
    with imgstore.open_store(pinned_store, mode="a") as store:
        store.put_many(more, more_labels)
        store.put(more[0], 5)
    assert json.loads((pinned_store / MANIFEST_NAME).read_text())["format_version"] == version
    with imgstore.open_store(pinned_store) as store:
        check_store_content(
            store,
            np.concatenate([expected[0], more, more[:1]]),
            np.concatenate([expected[1], more_labels, [5]]),
        )
        store.verify()


def test_replacing_a_format1_store_deletes_its_files_and_nothing_else(format1_store: Path) -> None:
    (format1_store / "notes.txt").write_text("mine")
    backend = json.loads((format1_store / MANIFEST_NAME).read_text())["backend"]
    legacy = {"png": {"png", "labels.i64"}, "lmdb": {"lmdb"}, "hdf5": {"images.h5"}}[backend] | {"checksums.crc32"}
    with imgstore.open_store(format1_store, backend, "w") as store:
        store.put_many(*random_images(3, (8, 8, 3)))
    names = {entry.name for entry in format1_store.iterdir()}
    assert not names & legacy
    assert (format1_store / "notes.txt").read_text() == "mine"
    with imgstore.open_store(format1_store) as store:
        assert len(store) == 3 and store.backend == backend


# ---------------------------------------------------------------------- format 3: encoded stores

ENCODED = DATA / "format3" / "encoded"


def _unpack(flat: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    return [flat[lo:hi] for lo, hi in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)]


@pytest.fixture(scope="module")
def encoded_expected() -> dict[str, np.ndarray]:
    with np.load(ENCODED / "expected.npz") as saved:
        return {name: saved[name] for name in saved.files}


def _copy(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copytree(ENCODED / name, path)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_pinned_keep_stores_give_back_their_files_and_decode_them(
    tmp_path: Path, backend: str, encoded_expected: dict[str, np.ndarray]
) -> None:
    from PIL import Image

    blobs = [bytes(b) for b in _unpack(encoded_expected["keep_bytes"], encoded_expected["keep_ends"])]
    labels = encoded_expected["keep_labels"]
    path = _copy(tmp_path, f"{backend}-keep")
    with imgstore.open_store(path) as store:
        assert (store.codec, store.image_mode, store.classes, store.varied) == ("keep", "RGB", ["a", "b", "c"], True)
        got, got_labels = store.get_encoded_many(range(len(store)))
        assert got == blobs and got_labels.tolist() == labels.tolist()
        images, _ = store.get_many(np.arange(len(store))[::-1])
        for image, blob in zip(images, blobs[::-1], strict=True):
            np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
        assert store.source_path(4) == "c1/img_4.x"
        store.verify()
    with imgstore.open_store(path, mode="a") as store:
        store.put_encoded_many(blobs[:2], [2, 0])
    with imgstore.open_store(path) as store:
        assert store.get_encoded_many([len(store) - 2, len(store) - 1])[0] == blobs[:2]
        assert json.loads((path / MANIFEST_NAME).read_text())["format_version"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["png", "raw"])
def test_pinned_varied_stores_read_back_bit_exact(
    tmp_path: Path, backend: str, kind: str, encoded_expected: dict[str, np.ndarray]
) -> None:
    flat = _unpack(encoded_expected[f"{kind}_pixels"], encoded_expected[f"{kind}_ends"])
    shapes = [tuple(s for s in shape if s) for shape in encoded_expected[f"{kind}_shapes"].tolist()]
    arrays = [pixels.reshape(shape) for pixels, shape in zip(flat, shapes, strict=True)]
    path = _copy(tmp_path, f"{backend}-{kind}")
    with imgstore.open_store(path) as store:
        assert store.codec == kind and store.varied
        images, labels = store.get_many(range(len(store)))
        assert labels.tolist() == encoded_expected[f"{kind}_labels"].tolist()
        for image, want in zip(images, arrays, strict=True):
            np.testing.assert_array_equal(image.reshape(want.shape), want)
        store.verify()


# ---------------------------------------------------------------------- format 3: TileDB's S<nbytes> cells

PINNED_TILEDB = DATA / "format3" / "tiledb"  # format 3's records, as imgstore wrote raw TileDB stores before 2026-11


def test_pinned_tiledb_s_cells_read_back_and_take_appends_of_random_images(
    tmp_path: Path, expected_v3: tuple[np.ndarray, np.ndarray]
) -> None:
    """Its ``image`` is ``S6912``: TileDB keeps each tile's min/max cell in the fragment metadata and
    refused a write of 83 tiles of random pixels (GZip bound, TileDB #5775); now split in fragments."""
    tiledb = pytest.importorskip("tiledb")
    path = tmp_path / "tiledb"
    shutil.copytree(PINNED_TILEDB, path)
    with imgstore.open_store(path) as store:
        check_store_content(store, *expected_v3)
        store.verify()
    more, more_labels = random_images(743 + 8 * 20, (48, 48, 3), seed=9)
    with imgstore.open_store(path, mode="a", sync=False) as store:
        store.put_many(more[:743], more_labels[:743])  # records 40 .. 782: tiles 4 .. 86
        for start in range(743, len(more), 20):  # merges
            store.put_many(more[start : start + 20], more_labels[start : start + 20])
    images, labels = np.concatenate([expected_v3[0], more]), np.concatenate([expected_v3[1], more_labels])
    with imgstore.open_store(path) as store:
        check_store_content(store, images, labels)
        store.verify()
    (array_path,) = path.glob("tiledb-*")
    with tiledb.open(str(array_path)) as array:
        assert array.schema.attr("image").dtype == np.dtype("S6912")  # the layout stays
        got = array[0 : len(images)]
        np.testing.assert_array_equal(np.ascontiguousarray(got["image"]).view(np.uint8).reshape(images.shape), images)
        np.testing.assert_array_equal(got["label"], labels)


@pytest.fixture
def expected_v3() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "format3" / "expected.npz") as saved:
        return saved["images"], saved["labels"]
