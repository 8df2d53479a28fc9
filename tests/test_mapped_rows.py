"""Shuffled batches out of a read-only map of a store file (imgstore/backends/mapped_rows.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.errors import CorruptStoreError

# In a child process: a read through pages of a map past the file's end is SIGBUS, which kills it.
_READ_AFTER_TRUNCATION = """
import os, sys
import numpy as np
import imgstore
from imgstore.errors import CorruptStoreError

path, data_file = sys.argv[1:]
with imgstore.open_store(path) as reader:
    batch = np.random.default_rng(0).permutation(len(reader))[:256]
    reader.get_many(batch)  # the file is mapped now
    os.truncate(data_file, os.path.getsize(data_file) // 2)  # another program copies over it
    try:
        reader.get_many(batch)
    except CorruptStoreError as exc:
        print("CorruptStoreError", exc)
"""


def test_a_file_cut_short_after_it_was_mapped_is_damage_not_sigbus(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3000, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "s"
    with imgstore.open_store(path, "hdf5", "w") as store:
        store.put_many(images, np.arange(3000))
    (data_file,) = path.glob("*.h5")
    done = subprocess.run(
        [sys.executable, "-c", _READ_AFTER_TRUNCATION, str(path), str(data_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CorruptStoreError"), done.stdout


def test_gather_copies_records_at_any_offsets_in_pieces_of_any_size(tmp_path: Path) -> None:
    """Records at unaligned offsets, in any order, repeated, of sizes below, at and above a gather
    piece (so a batch is one piece, several, or one record a piece), land in the rows asked for:
    of the array given, or of a new one."""
    from imgstore.backends.mapped_rows import _PIECE_BYTES, MappedRows

    data = np.random.default_rng(3).integers(0, 256, 3 * _PIECE_BYTES, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        rows = MappedRows(fd)
        rng = np.random.default_rng(4)
        for nbytes in (1, 3, 3072, _PIECE_BYTES // 2 + 1, _PIECE_BYTES + 5):
            for n in (1, 7, 300):
                offsets = rng.integers(0, len(data) - nbytes + 1, n)
                offsets[n // 2 :] = offsets[: n - n // 2]  # repeated records
                out = np.zeros((n, nbytes), np.uint8)
                assert rows.gather(offsets, nbytes, out) is out
                expected = data[offsets[:, None] + np.arange(nbytes)]
                np.testing.assert_array_equal(out, expected)
                new = rows.gather(offsets, nbytes)
                assert new is not None and new.dtype == np.uint8
                np.testing.assert_array_equal(new, expected)
        assert rows.gather(np.array([len(data) - 2]), 3, np.zeros((1, 3), np.uint8)) is None  # past the end
        assert rows.gather(np.array([len(data) - 2]), 3) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_shuffled_batches_into_new_arrays_and_into_out_agree(tmp_path: Path, backend: str) -> None:
    """A shuffled batch with repeats, read into arrays the gather makes (no out=) and into the
    caller's (out=), is the source's records in the order asked, and checked: a record whose pixels
    changed on disk is CorruptStoreError on both paths."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (500, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "s"
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, np.arange(500) * 7 + 3)
    batch = np.concatenate([rng.permutation(500)[:200], [17, 17, 499, 0]])
    with imgstore.open_store(path) as reader:
        new_images, new_labels = reader.get_many(batch)
        out = (np.empty((len(batch), 8, 8, 3), np.uint8), np.empty(len(batch), np.int64))
        into = reader.get_many(batch, out=out)
        assert into[0] is out[0] and into[1] is out[1]
        for got, labels in ((new_images, new_labels), out):
            np.testing.assert_array_equal(got, images[batch])
            assert labels.tolist() == (batch * 7 + 3).tolist()
    data = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    at = raw.find(images[123].tobytes())
    assert at >= 0
    raw[at + 5] ^= 0xFF
    data.write_bytes(bytes(raw))
    with imgstore.open_store(path) as reader:
        with pytest.raises(CorruptStoreError, match="index 123"):
            reader.get_many(np.array([400, 123, 5]))
        with pytest.raises(CorruptStoreError, match="index 123"):
            reader.get_many(np.array([400, 123, 5]), out=(np.empty((3, 8, 8, 3), np.uint8), np.empty(3, np.int64)))
