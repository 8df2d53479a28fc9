"""HDF5 backend, encoded stores: records of variable-length bytes (``blobs``, ``ends``, ``labels`` datasets).

Through the public API: every read path of PNG, JPEG (``keep``) and varied raw stores, appends
across reopening, a crashed write's leftovers, a reader in another process beside a live writer,
damaged offsets and bytes (always :class:`CorruptStoreError`, never a crash or another error).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import random
from multiprocessing.connection import Connection
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.backends.hdf5_files import skeleton
from imgstore.manifest import read_manifest
from imgstore.testing import check_store_content

FORK = multiprocessing.get_context("fork")


@functools.cache
def jpegs() -> tuple[list[bytes], np.ndarray]:
    """30 ImageNet-like JPEG files (about 110 KB each: 3 MB, so records cross 1 MiB chunks)."""
    from imgstore.datasets.imagenet_like import imagenet_like

    data = imagenet_like(30)
    return data.blobs, (np.arange(30, dtype=np.int64) * 7919 % 1000)


def varied_arrays(count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Noise images of varied sizes and channel counts (2-D too), a few large enough to span chunks."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(count):
        side = 400 if k % 7 == 3 else 40  # noise does not compress: a 400x400x3 PNG is ~480 KB
        height, width = (int(v) for v in rng.integers(1, side, 2))
        channels = [None, 1, 3, 4][k % 4]
        shape = (height, width) if channels is None else (height, width, channels)
        images.append(rng.integers(0, 256, shape, dtype=np.uint8))
    return images, rng.integers(-5, 1000, count).astype(np.int64)


def pillow(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image)


def h5_file(path: Path) -> Path:
    (name,) = [name for name in read_manifest(path).files if name.endswith(".h5")]
    return path / name


def check_reads(store: imgstore.Store, images: list[np.ndarray], labels: np.ndarray, blobs: list[bytes]) -> None:
    """Every read path gives ``images``/``labels``, and the stored bytes are ``blobs``."""
    check_store_content(store, images, labels)
    rng = np.random.default_rng(len(images))
    idx = rng.integers(0, len(images), 3 * len(images))  # shuffled, with repeats
    got, got_labels = store.get_many(idx)
    assert len(got) == len(idx)
    for k, i in enumerate(idx.tolist()):
        np.testing.assert_array_equal(got[k], images[i])
    np.testing.assert_array_equal(got_labels, labels[idx])
    encoded, encoded_labels = store.get_encoded_many(idx)
    assert encoded == [blobs[i] for i in idx.tolist()]
    assert all(type(blob) is bytes for blob in encoded)
    np.testing.assert_array_equal(encoded_labels, labels[idx])
    for lo, hi in [(0, len(images)), (1, len(images) - 1), (len(images) // 2, len(images) // 2 + 3)]:
        assert store.get_encoded_many(range(lo, hi))[0] == blobs[lo:hi]
        part, part_labels = store.get_many(range(lo, hi))
        for k in range(hi - lo):
            np.testing.assert_array_equal(part[k], images[lo + k])
        np.testing.assert_array_equal(part_labels, labels[lo:hi])
    assert store.get_encoded(len(images) - 1) == (blobs[-1], int(labels[-1]))
    nothing, no_labels = store.get_encoded_many([])
    assert nothing == [] and no_labels.shape == (0,)
    store.verify()


# ---------------------------------------------------------------------- round trips


def test_png_store_of_varied_shapes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    images, labels = varied_arrays(24, seed=1)
    with imgstore.open_store(path, "hdf5", "w", codec="png") as store:
        assert store.varied and store.codec == "png"
        store.put_many(images[:10], labels[:10])
        store.put_many(images[10:11], labels[10:11])
        store.put_many(images[11:], labels[11:])
        blobs = store.get_encoded_many(range(len(store)))[0]
        for blob, image in zip(blobs, images, strict=True):
            np.testing.assert_array_equal(pillow(blob), image.reshape(pillow(blob).shape))
        images = [image if image.ndim == 3 else image[..., np.newaxis] for image in images]  # PNG decodes [H, W, 1]
        check_reads(store, images, labels, blobs)  # the writer's own handle
    with imgstore.open_store(path) as store:
        check_reads(store, images, labels, blobs)
        shapes = store.image_shapes()
        assert [tuple(s[:2]) for s in shapes.tolist()] == [image.shape[:2] for image in images]


def test_keep_store_of_jpeg_files_appended_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store"
    blobs, labels = jpegs()
    names = [f"train/{k:03d}.jpg" for k in range(len(blobs))]
    with imgstore.open_store(path, "hdf5", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:7], labels[:7], paths=names[:7])
    for lo, hi in [(7, 8), (8, 20), (20, 30)]:
        with imgstore.open_store(path, "hdf5", "a") as store:
            assert len(store) == lo
            assert store.put_encoded_many(blobs[lo:hi], labels[lo:hi], paths=names[lo:hi]) == range(lo, hi)
    images = [pillow(blob) for blob in blobs]
    with imgstore.open_store(path) as store:
        check_reads(store, images, labels, blobs)
        assert store.source_path(12) == names[12]
    # Every record's bytes lie once, in order, with nothing after the last: the layout the docstring names.
    with h5py.File(h5_file(path), "r", locking=False) as f:
        assert f["blobs"].chunks == (1 << 20,)
        np.testing.assert_array_equal(f["ends"][:], np.cumsum([len(b) for b in blobs]))
        assert f["blobs"].shape == (sum(len(b) for b in blobs),)
        np.testing.assert_array_equal(f["labels"][:], labels)


def test_raw_store_of_varied_shapes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    images, labels = varied_arrays(20, seed=2)
    with imgstore.open_store(path, "hdf5", "w", shape=None) as store:
        assert store.varied and store.codec == "raw"
        store.put_many(images[:5], labels[:5])
        store.put_many(images[5:], labels[5:])
    with imgstore.open_store(path, "hdf5", "a") as store:
        more, more_labels = varied_arrays(3, seed=3)
        store.put_many(more, more_labels)
    images, labels = images + more, np.concatenate([labels, more_labels])
    with imgstore.open_store(path) as store:
        check_store_content(store, images, labels)
        got, _ = store.get_many([22, 0, 0, 7])
        for image, i in zip(got, [22, 0, 0, 7], strict=True):
            np.testing.assert_array_equal(image, images[i])
        store.verify()


def test_encoded_store_of_one_shape_reads_batches(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(30, dtype=np.int64)
    with imgstore.open_store(path, "hdf5", "w", codec="png", shape=(8, 8, 3)) as store:
        store.put_many(images, labels)
    with imgstore.open_store(path) as store:
        batch, got_labels = store.get_many([3, 29, 3, 0])
        np.testing.assert_array_equal(batch, images[[3, 29, 3, 0]])
        np.testing.assert_array_equal(got_labels, [3, 29, 3, 0])


def test_records_across_chunks_that_are_not_contiguous_in_the_file(tmp_path: Path) -> None:
    """A record spanning chunks HDF5 placed apart is read in pieces (here every chunk is placed apart)."""
    path = tmp_path / "store"
    blobs, labels = jpegs()
    with imgstore.open_store(path, "hdf5", "w", codec="keep") as store:
        store.put_encoded_many(blobs, labels)
    file = h5_file(path)
    with h5py.File(file, "r", locking=False) as f:
        data, ends, stored_labels = f["blobs"][:], f["ends"][:], f["labels"][:]
    chunk = 1 << 20
    with h5py.File(file, "w", libver="latest", locking=False) as f:  # the same datasets, chunks written last first
        blob_set = f.create_dataset("blobs", shape=(len(data),), maxshape=(None,), chunks=(chunk,), dtype=np.uint8)
        for lo in reversed(range(0, len(data), chunk)):
            blob_set[lo : lo + chunk] = data[lo : lo + chunk]
        for name, values in (("ends", ends), ("labels", stored_labels)):
            f.create_dataset(name, data=values, maxshape=(None,), chunks=(1 << 14,), dtype=np.int64)
    with imgstore.open_store(path) as store:
        index = store._read_blob_index()  # type: ignore[attr-defined]
        assert index.run_ends is not None and index.run_ends[0] == 0, "the chunks are still contiguous"
        check_reads(store, [pillow(blob) for blob in blobs], labels, blobs)
    with imgstore.open_store(path, "hdf5", "a") as store:  # and the file takes appends
        store.put_encoded_many(blobs[:3], labels[:3])
    with imgstore.open_store(path) as store:
        assert store.get_encoded_many(range(len(store)))[0] == blobs + blobs[:3]
        store.verify()


def test_first_write_to_an_empty_file_without_datasets(tmp_path: Path) -> None:
    """An empty encoded store whose file has no datasets (as made before HDF5 held encoded stores)."""
    path = tmp_path / "store"
    blobs, labels = jpegs()
    imgstore.open_store(path, "hdf5", "w", codec="keep").close()
    h5_file(path).write_bytes(skeleton(None))
    with imgstore.open_store(path) as store:
        assert len(store) == 0
    with imgstore.open_store(path, "hdf5", "a") as store:
        store.put_encoded_many(blobs[:4], labels[:4])
        store.put_encoded_many(blobs[4:9], labels[4:9])
    with imgstore.open_store(path) as store:
        assert store.get_encoded_many(range(9))[0] == blobs[:9]
        store.verify()


# ---------------------------------------------------------------------- crashes


def test_a_crashed_writes_leftovers_are_replaced(tmp_path: Path) -> None:
    """Records written but not committed (``_write_blobs`` alone), longer and shorter than the next write."""
    path = tmp_path / "store"
    blobs, labels = jpegs()
    junk = [bytes([k]) * 150_000 for k in range(1, 9)]  # 1.2 MB of leftovers: past a chunk boundary
    with imgstore.open_store(path, "hdf5", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:5], labels[:5])
        store._write_blobs(5, junk, np.full(len(junk), 99, dtype=np.int64))
    with imgstore.open_store(path, "hdf5", "a") as store:
        assert len(store) == 5
        store.put_encoded_many(blobs[5:7], labels[5:7])  # shorter than the leftovers: the rest is cut off
        store._write_blobs(7, junk[:1], np.array([99], dtype=np.int64))
    with imgstore.open_store(path, "hdf5", "a") as store:
        store.put_encoded_many(blobs[7:20], labels[7:20])  # longer than the leftovers
    with imgstore.open_store(path) as store:
        check_reads(store, [pillow(blob) for blob in blobs[:20]], labels[:20], blobs[:20])
    with h5py.File(h5_file(path), "r", locking=False) as f:
        assert f["blobs"].shape == (sum(len(b) for b in blobs[:20]),)
        assert f["ends"].shape == f["labels"].shape == (20,)


def _die_after_writing(path: str, leftovers: list[bytes]) -> None:
    store = imgstore.open_store(path, "hdf5", "a")  # bound: a dropped handle would close itself
    store._write_blobs(len(store), leftovers, np.zeros(len(leftovers), dtype=np.int64))
    os._exit(0)  # killed with the file open: it keeps the SWMR writer's mark


def test_writer_that_died_with_uncommitted_records(tmp_path: Path) -> None:
    path = tmp_path / "store"
    blobs, labels = jpegs()
    with imgstore.open_store(path, "hdf5", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:12], labels[:12])
    child = FORK.Process(target=_die_after_writing, args=(str(path), [b"x" * 300_000] * 4))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    with open(h5_file(path), "rb") as f:
        assert f.read(12)[11] != 0, "the test did not leave a writer's mark"
    with imgstore.open_store(path) as store:  # a reader needs no repair
        assert store.get_encoded_many(range(12))[0] == blobs[:12]
        store.verify()
    with imgstore.open_store(path, "hdf5", "a") as store:  # the writer copies the committed records out
        store.put_encoded_many(blobs[12:], labels[12:])
    with imgstore.open_store(path) as store:
        check_reads(store, [pillow(blob) for blob in blobs], labels, blobs)


# ---------------------------------------------------------------------- other processes


def _follow_the_writer(writer: imgstore.Store, path: str, target: int, conn: Connection) -> None:
    """In a forked child: the parent's writer handle reads and refuses writes; a reader follows appends."""
    try:
        blobs, _ = jpegs()
        count = len(writer)
        assert writer.get_encoded_many(range(count))[0] == blobs[:count]
        try:
            writer.put_encoded_many(blobs[:1], [0])
            conn.send("the writer's handle wrote in a forked child")
            return
        except imgstore.StoreBusyError:
            pass
        writer.close()
        seen = set()
        with imgstore.open_store(path) as reader:
            while count < target:
                count = reader.refresh()
                seen.add(count)
                idx = np.random.default_rng(count).integers(0, count, 40)
                got, _ = reader.get_encoded_many(idx)  # checked against the checksums too
                assert got == [blobs[i] for i in idx.tolist()], f"wrong bytes at {count} records"
                assert reader.get_encoded_many(range(count))[0] == blobs[:count]
            reader.verify()
        conn.send(f"ok {len(seen)}")
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


def test_a_reader_in_another_process_follows_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "store"
    blobs, labels = jpegs()
    writer = imgstore.open_store(path, "hdf5", "w", codec="keep")
    writer.put_encoded_many(blobs[:4], labels[:4])
    mine, theirs = FORK.Pipe()
    child = FORK.Process(target=_follow_the_writer, args=(writer, str(path), len(blobs), theirs))
    child.start()
    for lo in range(4, len(blobs), 2):
        writer.put_encoded_many(blobs[lo : lo + 2], labels[lo : lo + 2])
        with imgstore.open_store(path) as reader:  # a reader in the writer's own process too
            assert reader.get_encoded_many(range(lo + 2))[0] == blobs[: lo + 2]
    assert mine.poll(60), "the child did not finish"
    report = mine.recv()
    child.join(30)
    assert report.startswith("ok"), report
    writer.close()
    with imgstore.open_store(path) as store:
        store.verify()
        assert len(store) == len(blobs)


# ---------------------------------------------------------------------- damage


def _keep_store(path: Path, count: int = 12) -> tuple[list[bytes], np.ndarray]:
    blobs, labels = jpegs()
    with imgstore.open_store(path, "hdf5", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:count], labels[:count])
    return blobs[:count], labels[:count]


def _every_read_is_corrupt(path: Path, count: int) -> None:
    with imgstore.open_store(path) as store:
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_encoded_many(range(count))
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_encoded_many([count - 1, 0])
        with pytest.raises(imgstore.CorruptStoreError):
            store.get(count - 1)
        with pytest.raises(imgstore.CorruptStoreError):
            store.verify()


@pytest.mark.parametrize(
    "damage",
    ["empty record", "decreasing", "past the data", "huge", "negative", "3 GiB record", "labels cut short"],
)
def test_damaged_offsets(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "store"
    blobs, _ = _keep_store(path)
    with h5py.File(h5_file(path), "r+", libver="latest", locking=False) as f:
        ends, size = f["ends"], f["blobs"].shape[0]
        if damage == "empty record":
            ends[5] = ends[4]
        elif damage == "decreasing":
            ends[5] = ends[4] - 7
        elif damage == "past the data":
            ends[11] = size + 1
        elif damage == "huge":
            ends[6] = 1 << 62
        elif damage == "negative":
            ends[0] = -(1 << 62)
        elif damage == "3 GiB record":
            f["blobs"].resize(size + (3 << 30), axis=0)  # an extent only: no chunk is written
            ends[11] = size + (3 << 30)
        else:
            f["labels"].resize(5, axis=0)
    _every_read_is_corrupt(path, len(blobs))
    if damage in ("past the data", "3 GiB record"):  # the last record: appending after it refuses too
        with imgstore.open_store(path, "hdf5", "a") as store:
            with pytest.raises(imgstore.CorruptStoreError):
                store.put_encoded_many(blobs[:1], [1])
            assert len(store) == len(blobs)


def test_damaged_bytes_are_caught_and_never_crash_the_decoder(tmp_path: Path) -> None:
    path = tmp_path / "store"
    blobs, labels = _keep_store(path)
    file = h5_file(path)
    original = file.read_bytes()
    target = 5
    at = original.find(blobs[target])
    assert at > 0 and original.find(blobs[target], at + 1) < 0
    for offset, value in [(0, 0x00), (1, 0x00), (2, 0x55), (len(blobs[target]) // 2, 0xFF), (-3, 0x12)]:
        damaged = bytearray(original)
        position = at + (offset % len(blobs[target]))
        damaged[position] = value if damaged[position] != value else value ^ 1
        file.write_bytes(bytes(damaged))
        with imgstore.open_store(path) as store:
            with pytest.raises(imgstore.CorruptStoreError, match="index 5"):
                store.get_encoded_many([0, target])
            with pytest.raises(imgstore.CorruptStoreError):
                store.get(target)
            with pytest.raises(imgstore.CorruptStoreError):
                store.verify()
        with imgstore.open_store(path, verify_reads=False) as store:
            stored = store.get_encoded(target)[0]
            assert stored != blobs[target] and len(stored) == len(blobs[target])
            try:
                image, _ = store.get(target)  # a decoder may or may not notice: no crash, no other error
                assert image.ndim == 3
            except imgstore.CorruptStoreError:
                pass
            if offset in (0, 1):  # no JPEG start marker: no decoder takes it
                with pytest.raises(imgstore.CorruptStoreError, match="cannot be decoded"):
                    store.get_many([0, target])
    file.write_bytes(original)
    with imgstore.open_store(path) as store:
        store.verify()
        assert store.get_encoded_many(range(len(blobs)))[0] == blobs
        np.testing.assert_array_equal(store.get_many(range(len(blobs)))[1], labels)


def test_damaged_png_bytes_without_verification(tmp_path: Path) -> None:
    path = tmp_path / "store"
    images, labels = varied_arrays(6, seed=5)
    with imgstore.open_store(path, "hdf5", "w", codec="png") as store:
        store.put_many(images, labels)
        blob = store.get_encoded(3)[0]
    file = h5_file(path)
    damaged = bytearray(file.read_bytes())
    damaged[damaged.find(blob) + len(blob) // 2] ^= 0xFF  # inside the image data: its CRC no longer matches
    file.write_bytes(bytes(damaged))
    with imgstore.open_store(path, verify_reads=False) as store:
        with pytest.raises(imgstore.CorruptStoreError, match="index 3"):
            store.get_many(range(6))
        np.testing.assert_array_equal(store.get(2)[0], images[2])


def _read_everything(path: str, conn: Connection) -> None:
    """In a child (HDF5 may crash on a damaged file): read every way; report the outcome."""
    try:
        blobs, labels = jpegs()
        with imgstore.open_store(path) as store:
            count = len(store)
            assert store.get_encoded_many(range(count))[0] == blobs[:count]
            got, got_labels = store.get_encoded_many([count - 1, 0, 3])
            assert got == [blobs[count - 1], blobs[0], blobs[3]]
            assert got_labels.tolist() == labels[[count - 1, 0, 3]].tolist()
            store.verify()
        conn.send("intact")
    except imgstore.CorruptStoreError:
        conn.send("CorruptStoreError")
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


def test_random_damage_anywhere_in_the_file(tmp_path: Path) -> None:
    """A bit flipped anywhere (metadata, chunk index, offsets, records): intact data or CorruptStoreError."""
    path = tmp_path / "store"
    blobs, _ = _keep_store(path, count=10)
    file = h5_file(path)
    original = file.read_bytes()
    data_at = original.find(blobs[0])
    rng = random.Random(9)
    # Most of the file is record bytes; draw most flips from the rest (HDF5's structures).
    positions = [rng.randrange(0, data_at) for _ in range(30)] + [rng.randrange(len(original)) for _ in range(10)]
    outcomes: dict[str, int] = {}
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(damaged))
        mine, theirs = FORK.Pipe()
        child = FORK.Process(target=_read_everything, args=(str(path), theirs))
        child.start()
        outcome = mine.recv() if mine.poll(60) else "hang"
        child.join(10)
        if child.exitcode is None:
            child.kill()
            child.join()
        if child.exitcode not in (0, None):
            outcome = f"exit code {child.exitcode}"
        assert outcome in ("intact", "CorruptStoreError"), f"byte {position} flipped: {outcome}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    file.write_bytes(original)
    assert outcomes.get("CorruptStoreError", 0) >= 5, outcomes
