"""LevelDB's own reader (plyvel.DB) reads what imgstore wrote, key by key, as the README documents it.

Raw stores of one shape: key = block number (8 bytes, big-endian), value = the block's pixels then its
int64 labels (little-endian), ``block_bytes // (image bytes + 8)`` records a block. Encoded stores:
key = image index, value = its int64 label then the file's bytes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import plyvel
from PIL import Image

import imgstore
from imgstore.datasets.synthetic import synthetic_cifar10


def _database(store: Path) -> tuple[Path, dict[str, Any]]:
    manifest = json.loads((store / "imgstore.json").read_text())
    (name,) = [entry for entry in manifest["files"] if entry.startswith("leveldb-") and "views" not in entry]
    return store / name, manifest


def _read_raw(store: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Every committed image and label, with plyvel alone, as the README says; and the keys LevelDB holds."""
    path, manifest = _database(store)
    shape, count = tuple(manifest["shape"]), int(manifest["count"])
    size = int(np.prod(shape))
    per_block = int(manifest["options"]["block_bytes"]) // (size + 8)
    images, labels = np.empty((count, *shape), np.uint8), np.empty(count, np.int64)
    db = plyvel.DB(str(path))
    try:
        for index in range(count):
            block, row = divmod(index, per_block)
            value = db.get(block.to_bytes(8, "big"))
            held = len(value) // (size + 8)
            images[index] = np.frombuffer(value, np.uint8, size, row * size).reshape(shape)
            labels[index] = int.from_bytes(value[held * size + 8 * row : held * size + 8 * row + 8], "little")
        keys = sum(1 for _ in db.iterator(include_value=False))
    finally:
        db.close()
    return images, labels, keys


def test_plyvel_reads_a_raw_store_appended_in_several_commits(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(3230)
    path = tmp_path / "cifar"
    with imgstore.open_store(path, "leveldb", "w") as store:
        store.put_many(images[:100], labels[:100])
    with imgstore.open_store(path, mode="a") as store:  # appends: partly filled blocks are rewritten
        store.put_many(images[100:203], labels[100:203])
        for k in range(203, 230):
            store.put(images[k], int(labels[k]))
        store.put_many(images[230:], labels[230:])  # 9 MB: flushed to tables within the write
    got_images, got_labels, keys = _read_raw(path)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert keys == -(-3230 // (16384 // (32 * 32 * 3 + 8)))
    with imgstore.open_store(path) as store:  # and imgstore still reads it after LevelDB opened it itself
        store.verify()
        assert np.array_equal(store.get_many(range(3230))[0], images)


def _jpeg_and_png_files(n: int) -> tuple[list[bytes], list[int]]:
    rng = np.random.default_rng(3)
    blobs = []
    for k in range(n):
        image = Image.fromarray(rng.integers(0, 256, (20 + k, 30 + 2 * k, 3), dtype=np.uint8))
        out = io.BytesIO()
        image.save(out, "JPEG" if k % 2 else "PNG")
        blobs.append(out.getvalue())
    return blobs, [k % 7 for k in range(n)]


def test_plyvel_reads_the_files_of_a_keep_store(tmp_path: Path) -> None:
    blobs, labels = _jpeg_and_png_files(12)
    path = tmp_path / "photos"
    with imgstore.open_store(path, "leveldb", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:5], labels[:5])
    with imgstore.open_store(path, mode="a") as store:
        store.put_encoded_many(blobs[5:], labels[5:])
    database, manifest = _database(path)
    assert manifest["count"] == 12
    db = plyvel.DB(str(database))
    try:
        for index, (blob, label) in enumerate(zip(blobs, labels, strict=True)):
            value = db.get(index.to_bytes(8, "big"))
            assert int.from_bytes(value[:8], "little") == label and value[8:] == blob
        assert [int.from_bytes(key, "big") for key in db.iterator(include_value=False)] == list(range(12))
    finally:
        db.close()


def _killed_before_commit(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    import imgstore.fixed

    def kill(*args: object, **kwargs: object) -> None:  # the records are in LevelDB's log, not committed
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(imgstore.fixed, "write_manifest", kill)  # noqa: B010 - a module attribute, patched in this child only
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images, labels)


def test_what_plyvel_sees_after_a_killed_write(tmp_path: Path) -> None:
    """Records a killed writer left past the committed count: the README says plyvel sees them until a writer opens."""
    images, labels = synthetic_cifar10(300)
    path = tmp_path / "cifar"
    with imgstore.open_store(path, "leveldb", "w") as store:
        store.put_many(images[:100], labels[:100])
    child = multiprocessing.get_context("fork").Process(
        target=_killed_before_commit, args=(str(path), images[100:300], 299 - labels[100:300])
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    per_block = 16384 // (32 * 32 * 3 + 8)
    got_images, got_labels, keys = _read_raw(path)  # the committed 100 as they were
    assert np.array_equal(got_images, images[:100]) and np.array_equal(got_labels, labels[:100])
    assert keys == -(-300 // per_block)  # and the killed write's blocks past them
    with imgstore.open_store(path) as store:
        assert len(store) == 100
        store.verify()
    with imgstore.open_store(path, mode="a"):  # a writer deletes the leftovers as it opens
        pass
    got_images, got_labels, keys = _read_raw(path)
    assert np.array_equal(got_images, images[:100]) and keys == -(-100 // per_block)
