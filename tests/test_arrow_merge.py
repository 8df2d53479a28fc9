"""Arrow: small fragments merge like a binary counter, so a store written one image at a time keeps few files.

The README promises about log2(N) files for N single puts. Each check here reads every record back,
verifies the checksums, and keeps a reader that opened before the merges reading its snapshot.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.feather as feather
import pytest

import imgstore
from imgstore.testing.layouts import image_file

SHAPE = (32, 32, 3)


def parts(store: Path) -> list[str]:
    return sorted(glob.glob(f"{store}/arrow-*/part-*.arrow"))


def bound(n: int) -> int:
    return int(2 * math.log2(n) + 2)


@pytest.mark.parametrize("n", [200, 1000])
def test_single_puts_keep_about_log2_n_files(tmp_path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 1000, n)
    store = tmp_path / "s"
    half = n // 2
    most = 0
    with imgstore.open_store(store, "arrow", "w", sync=False) as writer:
        for k in range(half):
            writer.put(images[k], int(labels[k]))
            most = max(most, len(parts(store)))
        reader = imgstore.open_store(store)  # maps the files as they are now; the merges below replace them
        mapped = {path: os.stat(path).st_ino for path in parts(store)}
        for k in range(half, n):
            writer.put(images[k], int(labels[k]))
            most = max(most, len(parts(store)))
    assert most <= bound(n), f"{most} files for {n} single puts"
    assert len(parts(store)) <= bound(n)
    # the merges did replace or delete the reader's files (else the snapshot check proves nothing)
    assert any(not os.path.exists(p) or os.stat(p).st_ino != ino for p, ino in mapped.items())

    with reader:
        assert len(reader) == half
        got, got_labels = reader.get_many(range(half))  # its snapshot, from the files it mapped
        assert np.array_equal(got, images[:half]) and np.array_equal(got_labels, labels[:half])
        reader.verify()
        assert reader.refresh() == n
        got, got_labels = reader.get_many(range(n))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)

    with imgstore.open_store(store) as s:
        assert len(s) == n
        got, got_labels = s.get_many(range(n))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
        for k in (0, half - 1, half, n - 1):
            image, label = s.get(k)
            assert np.array_equal(image, images[k]) and label == labels[k]
        s.verify()
    # the files alone, in name order, are the records in order
    rows = sum(feather.read_table(path).num_rows for path in parts(store))
    assert rows == n


def test_encoded_records_of_decreasing_size_still_merge(tmp_path: Path) -> None:
    """Each file a little smaller than the one before: a write merges what is within a factor of two of it."""
    rng = np.random.default_rng(7)
    n = 200
    blobs = [image_file(rng.integers(0, 256, (8, 220 - k, 3), dtype=np.uint8), "PNG") for k in range(n)]
    labels = np.arange(n) % 10
    store = tmp_path / "keep"
    with imgstore.open_store(store, "arrow", "w", codec="keep", sync=False) as s:
        for blob, label in zip(blobs, labels, strict=True):
            s.put_encoded_many([blob], [int(label)])
    assert len(parts(store)) <= bound(n)
    with imgstore.open_store(store) as s:
        got, got_labels = s.get_encoded_many(range(n))
        assert got == blobs and np.array_equal(got_labels, labels)
        s.verify()
    table_blobs = [b for path in parts(store) for b in feather.read_table(path).column("image").to_pylist()]
    assert table_blobs == blobs


def test_merge_bytes_bounds_a_merged_file(tmp_path: Path) -> None:
    n, record = 100, int(np.prod(SHAPE)) + 8  # image bytes and the int64 label
    limit = 8 * record
    images = np.random.default_rng(3).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    store = tmp_path / "s"
    with imgstore.open_store(store, "arrow", "w", sync=False, merge_bytes=limit) as s:
        for k in range(n):
            s.put(images[k], k)
    sizes = [feather.read_table(path).num_rows for path in parts(store)]
    assert sum(sizes) == n and max(sizes) * record <= limit
    assert len(sizes) <= n * 2 // 8 + bound(8)  # files of at least limit / 2, then a counter of small ones
    with imgstore.open_store(store) as s:
        got, got_labels = s.get_many(range(n))
        assert np.array_equal(got, images) and np.array_equal(got_labels, np.arange(n))
        s.verify()
