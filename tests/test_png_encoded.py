"""The png backend holding encoded stores: each record's bytes as one file, ``<index:09d><ext>``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.backends.png import PngStore
from imgstore.datasets.imagenet_like import imagenet_like
from imgstore.store import Store

PER_DIR = 4  # files_per_dir: a few records per folder, so every test crosses folders


@pytest.fixture(scope="module")
def jpegs() -> tuple[list[bytes], np.ndarray]:
    data = imagenet_like(24)
    return data.blobs, data.labels


def varied_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(5, 7, 3), (6, 4), (3, 3, 4), (4, 5, 1), (9, 2, 2), (1, 1, 3), (17, 11, 3)]
    return [rng.integers(0, 256, shapes[k % len(shapes)], dtype=np.uint8) for k in range(n)]


def same_pixels(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(got.size == want.size and np.array_equal(got.reshape(want.shape), want))  # [H, W] is [H, W, 1]


def record_files(store: Store) -> list[Path]:
    return sorted(p for p in store.file("png").rglob("*") if p.is_file() and p.name != "suffix.txt")


def test_png_codec_varied_shapes_round_trip(tmp_path: Path) -> None:
    images = varied_images(30)
    labels = np.arange(30) * 7 + 1000
    with imgstore.open_store(tmp_path / "s", "png", "w", codec="png", files_per_dir=PER_DIR) as store:
        assert store.put_many(images, labels) == range(30)
    with imgstore.open_store(tmp_path / "s") as store:
        assert store.varied and store.codec == "png"
        files = record_files(store)
        assert [f.relative_to(store.file("png")).as_posix() for f in files[:5]] == [
            "00000/000000000.png",
            "00000/000000001.png",
            "00000/000000002.png",
            "00000/000000003.png",
            "00001/000000004.png",
        ]
        assert isinstance(store, PngStore) and store.image_path(29) == files[29]
        assert len(files) == 30
        image, label = store.get(-1)
        assert same_pixels(image, images[29]) and label == labels[29]
        order = np.random.default_rng(1).integers(0, 30, 50)  # shuffled, with repeats: threaded file reads
        got, got_labels = store.get_many(order)
        assert all(same_pixels(g, images[i]) for g, i in zip(got, order, strict=True))
        np.testing.assert_array_equal(got_labels, labels[order])
        got, got_labels = store.get_many(range(3, 21))
        assert all(same_pixels(g, images[i]) for g, i in zip(got, range(3, 21), strict=True))
        np.testing.assert_array_equal(got_labels, labels[3:21])
        blobs, blob_labels = store.get_encoded_many(order)
        assert blobs == [files[i].read_bytes() for i in order]  # the files are the records, nothing added
        np.testing.assert_array_equal(blob_labels, labels[order])
        with Image.open(files[0]) as pil:
            assert pil.format == "PNG" and same_pixels(np.asarray(pil), images[0])
        store.verify()


@pytest.mark.parametrize("codec", ["keep", "jpeg"])
def test_jpeg_files_are_stored_byte_for_byte(tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray], codec: str) -> None:
    blobs, labels = jpegs
    with imgstore.open_store(tmp_path / "s", "png", "w", codec=codec, files_per_dir=PER_DIR) as store:
        store.put_encoded_many(blobs[:10], labels[:10])
    with imgstore.open_store(tmp_path / "s", mode="a") as store:  # appends across a reopen
        store.put_encoded_many(blobs[10:], labels[10:])
    with imgstore.open_store(tmp_path / "s") as store:
        files = record_files(store)
        assert [f.name for f in files] == [f"{i:09d}.jpg" for i in range(len(blobs))]
        assert [f.read_bytes() for f in files] == blobs
        for file, blob in zip(files[:3], blobs, strict=False):  # what someone browsing the folder sees
            with Image.open(file) as pil:
                assert pil.format == "JPEG"
                np.testing.assert_array_equal(np.asarray(pil), np.asarray(Image.open(io.BytesIO(blob))))
        order = np.random.default_rng(2).permutation(len(blobs))
        got, got_labels = store.get_encoded_many(order)
        assert got == [blobs[i] for i in order]
        np.testing.assert_array_equal(got_labels, labels[order])
        assert store.get_encoded(5) == (blobs[5], labels[5])
        image, _ = store.get(5)
        assert image.shape == np.asarray(Image.open(io.BytesIO(blobs[5]))).shape
        store.verify()


def test_keep_store_names_its_files_by_the_first_write(tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray]) -> None:
    blobs, _ = jpegs
    png = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(png, format="PNG")
    gif = io.BytesIO()
    Image.new("L", (3, 2), 7).save(gif, format="GIF")
    with imgstore.open_store(tmp_path / "mixed", "png", "w", codec="keep") as store:
        store.put_encoded_many([png.getvalue(), blobs[0], blobs[1]], [0, 1, 2])  # the most common format names
        store.put_encoded_many([png.getvalue(), gif.getvalue()], [3, 4])  # later files keep the store's suffix
        assert [f.suffix for f in record_files(store)] == [".jpg"] * 5
        assert store.get_encoded_many(range(5))[0] == [
            png.getvalue(),
            blobs[0],
            blobs[1],
            png.getvalue(),
            gif.getvalue(),
        ]
        assert store.get(4)[0].shape[:2] == (2, 3)  # a GIF named .jpg decodes as a GIF
    with imgstore.open_store(tmp_path / "gif", "png", "w", codec="keep") as store:
        store.put_encoded_many([gif.getvalue()], [0])
        assert [f.name for f in record_files(store)] == ["000000000.gif"]
    with imgstore.open_store(tmp_path / "arrays", "png", "w", codec="keep") as store:
        store.put_many(varied_images(2), [0, 1])  # arrays: stored as PNG
        store.put_encoded_many(blobs[:1], [2])
        assert [f.suffix for f in record_files(store)] == [".png", ".png", ".png"]
        assert store.get_encoded(2)[0] == blobs[0]


def test_raw_store_of_varied_shapes(tmp_path: Path) -> None:
    images = varied_images(20, seed=3)
    with imgstore.open_store(tmp_path / "s", "png", "w", shape=None, files_per_dir=PER_DIR) as store:
        store.put_many(images[:8], np.arange(8))
        store.put_many(images[8:], np.arange(8, 20))
    with imgstore.open_store(tmp_path / "s") as store:
        assert store.codec == "raw" and store.varied
        assert all(f.suffix == ".raw" for f in record_files(store))
        got, labels = store.get_many(np.arange(20)[::-1])
        assert all(
            g.shape == images[i].shape and np.array_equal(g, images[i])
            for g, i in zip(got, range(19, -1, -1), strict=True)
        )
        np.testing.assert_array_equal(labels, np.arange(20)[::-1])
        store.verify()


def test_fixed_raw_stores_are_unchanged(tmp_path: Path) -> None:
    images = np.random.default_rng(4).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    with imgstore.open_store(tmp_path / "s", "png", "w") as store:
        store.put_many(images, np.arange(6))
        assert not store.varied and store.codec == "raw"
        assert [f.name for f in record_files(store)] == [f"{i:09d}.png" for i in range(6)]
        np.testing.assert_array_equal(store.get_many([5, 0, 0])[0], images[[5, 0, 0]])
        assert not (store.file("png") / "suffix.txt").exists()


def test_a_crashed_write_is_replaced(tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray]) -> None:
    blobs, labels = jpegs
    with imgstore.open_store(tmp_path / "s", "png", "w", codec="keep", files_per_dir=PER_DIR) as store:
        # A first write that crashed before its commit: files, a suffix and labels, none of them committed.
        store._write_blobs(0, [b"not an image"] * 6, np.full(6, 99))
        assert (store.file("png") / "suffix.txt").read_text() == ".bin"
    with imgstore.open_store(tmp_path / "s") as store:
        assert len(store) == 0
    with imgstore.open_store(tmp_path / "s", mode="a") as store:
        store.put_encoded_many(blobs[:3], labels[:3])
        store._write_blobs(3, [b"leftover"] * 9, np.full(9, 99))  # and another, past the committed count
    with imgstore.open_store(tmp_path / "s", mode="a") as store:
        assert len(store) == 3
        store.put_encoded_many(blobs[3:8], labels[3:8])
    with imgstore.open_store(tmp_path / "s") as store:
        got, got_labels = store.get_encoded_many(range(8))
        assert got == blobs[:8]
        np.testing.assert_array_equal(got_labels, labels[:8])
        assert (store.file("png") / "00000" / "000000000.jpg").read_bytes() == blobs[0]
        store.verify()


@pytest.fixture
def jpeg_store(tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray]) -> tuple[Path, list[Path]]:
    blobs, labels = jpegs
    with imgstore.open_store(tmp_path / "s", "png", "w", codec="jpeg", files_per_dir=PER_DIR) as store:
        store.put_encoded_many(blobs, labels)
        return tmp_path / "s", record_files(store)


@pytest.mark.parametrize("verify_reads", [True, False])
@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "garbage", "huge", "directory", "fifo"])
def test_damaged_files_are_corrupt_store_errors(
    jpeg_store: tuple[Path, list[Path]], damage: str, verify_reads: bool
) -> None:
    path, files = jpeg_store
    file = files[6]
    data = file.read_bytes()
    if damage == "missing":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "garbage":
        file.write_bytes(data[:2] + bytes(range(256)) * 40)
    elif damage == "huge":
        with open(file, "r+b") as f:
            f.truncate((2 << 30) + 1)  # sparse: refused by its size, never read
    elif damage == "directory":
        file.unlink()
        file.mkdir()
    else:
        file.unlink()
        os.mkfifo(file)  # no writer: opening it for reading would wait forever
    with imgstore.open_store(path, verify_reads=verify_reads) as store:
        assert store.get(5)[0].ndim == 3  # the other records still read
        with pytest.raises(imgstore.CorruptStoreError):
            store.get(6)
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_many(np.arange(24)[::-1])  # threaded reads
        if verify_reads or damage in ("missing", "empty", "huge", "directory", "fifo"):
            with pytest.raises(imgstore.CorruptStoreError):
                store.get_encoded_many([6])
        with pytest.raises(imgstore.CorruptStoreError, match="index 6|000000006"):
            store.verify()
    if damage == "missing":
        with (
            imgstore.open_store(path) as store,
            pytest.raises(imgstore.CorruptStoreError, match="committed but missing"),
        ):
            store.get_encoded(6)


@pytest.mark.parametrize("content", [None, "../../x", ".jpg/", ""])
def test_a_damaged_suffix_file_is_corrupt_store_error(
    tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray], content: str | None
) -> None:
    blobs, labels = jpegs
    with imgstore.open_store(tmp_path / "s", "png", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:2], labels[:2])
        suffix = store.file("png") / "suffix.txt"
    assert suffix.read_text() == ".jpg"
    if content is None:
        suffix.unlink()
    else:
        suffix.write_text(content)
    with imgstore.open_store(tmp_path / "s") as store, pytest.raises(imgstore.CorruptStoreError):
        store.get_encoded(0)


def test_a_forked_child_reads_with_threads(
    jpeg_store: tuple[Path, list[Path]], jpegs: tuple[list[bytes], np.ndarray]
) -> None:
    path, _ = jpeg_store
    blobs, _ = jpegs
    with imgstore.open_store(path) as store:
        assert store.get_encoded_many(range(24))[0] == blobs  # the parent's read threads exist now
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = store.get_encoded_many(np.arange(24)[::-1])[0] == blobs[::-1]
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_store_replaced_under_a_reader_says_so(tmp_path: Path, jpegs: tuple[list[bytes], np.ndarray]) -> None:
    blobs, labels = jpegs
    with imgstore.open_store(tmp_path / "s", "png", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:4], labels[:4])
    with imgstore.open_store(tmp_path / "s") as reader:
        assert reader.get_encoded(0)[0] == blobs[0]
        with imgstore.open_store(tmp_path / "s", "png", "w", codec="keep") as store:
            store.put_encoded_many(blobs[4:8], labels[4:8])
        with pytest.raises(imgstore.CorruptStoreError, match="replaced"):
            reader.get_encoded_many([1, 2])
