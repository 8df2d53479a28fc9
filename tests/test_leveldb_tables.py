"""A LevelDB reader reads records straight out of its view's table files (leveldb_tables).

Each test checks the records against what was written, and against plyvel's own reading of the same
view, and checks which way each record was read: out of a table (an offset learned) or through plyvel
(a table this reader does not read). Stores are made so that keys repeat across tables (a block
rewritten by the next commit), a killed write leaves keys that the next writer deletes, and tables
are compressed.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import plyvel
import pytest
from PIL import Image

import imgstore
from imgstore.backends.leveldb import LeveldbStore
from imgstore.backends.leveldb_tables import LIBRARY, table_values
from imgstore.errors import CorruptStoreError
from imgstore.testing.checks import check_threads_read

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _db_dir(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.name.startswith("leveldb-") and "views" not in p.name)


def _through_plyvel(store: imgstore.Store, monkeypatch: pytest.MonkeyPatch, indices: np.ndarray) -> tuple:
    with monkeypatch.context() as patched:
        patched.setattr(LeveldbStore, "_direct", lambda self: None)
        return store.get_many(indices)


def _check_reader(path: Path, images: np.ndarray, labels: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """Read every record every way; return the reader's learned offsets (after reading them all)."""
    order = np.random.default_rng(1).permutation(len(images))
    with imgstore.open_store(path) as store:
        for index in order[: min(50, len(order))].tolist():
            image, label = store.get(index)
            assert np.array_equal(image, images[index]) and label == labels[index]
        got, got_labels = store.get_many(order)
        assert np.array_equal(got, images[order]) and np.array_equal(got_labels, labels[order])
        got, got_labels = store.get_many(range(len(images)))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
        rng = np.random.default_rng(2)
        for _ in range(20):  # ranges that start and end inside blocks and runs of blocks
            lo, hi = sorted(rng.integers(0, len(images) + 1, 2).tolist())
            got, got_labels = store.get_many(range(lo, hi))
            assert np.array_equal(got, images[lo:hi]) and np.array_equal(got_labels, labels[lo:hi]), (lo, hi)
        plain, plain_labels = _through_plyvel(store, monkeypatch, order)
        assert np.array_equal(plain, images[order]) and np.array_equal(plain_labels, labels[order])
        direct = store._direct()  # type: ignore[attr-defined]
        assert direct is not None
        return direct.offsets.copy()  # type: ignore[no-any-return]


def test_one_write_is_read_out_of_its_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _images(30_000)  # 5.8 MB: the writer flushes a table past 4 MiB, and one at close
    with imgstore.open_store(tmp_path / "s", "leveldb", "w") as store:
        store.put_many(images, labels)
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert offsets.min() >= 0  # every record out of a table


@pytest.mark.parametrize("block_bytes", [1, 1000, 1 << 14])
def test_blocks_rewritten_by_later_commits_read_their_newest_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """Each commit closes the writer (a flush): the block a commit left part-filled is rewritten by the
    next one in a newer table, so the tables' key ranges overlap and keys repeat."""
    images, labels = _images(400, seed=2)
    sizes = [7, 3, 1, 1, 13, 60, 5, 2, 100, 9, 199]
    at = 0
    for size in sizes:
        with imgstore.open_store(tmp_path / "s", "leveldb", "a", block_bytes=block_bytes) as store:
            store.put_many(images[at : at + size], labels[at : at + size])
        at += size
    assert at == len(images)
    tables = [p for p in _db_dir(tmp_path / "s").iterdir() if p.suffix == ".ldb"]
    assert len(tables) > 1
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert offsets.min() >= 0


def test_a_killed_writes_keys_and_their_deletion_are_read_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = _images(60, seed=3)
    with imgstore.open_store(tmp_path / "s", "leveldb", "w", block_bytes=1000) as store:
        store.put_many(images[:20], labels[:20])
    per_block = 1000 // (8 * 8 * 3 + 8)
    db = plyvel.DB(str(_db_dir(tmp_path / "s")), compression=None)  # a killed write's values, flushed
    for block in range(20 // per_block, 20 // per_block + 6):
        db.put(block.to_bytes(8, "big"), b"\x07" * (per_block * (8 * 8 * 3 + 8)))
    db.compact_range()
    db.close()
    with imgstore.open_store(tmp_path / "s", "leveldb", "a") as store:  # deletes them, then rewrites
        store.put_many(images[20:33], labels[20:33])
    with imgstore.open_store(tmp_path / "s", "leveldb", "a") as store:
        store.put_many(images[33:], labels[33:])
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert offsets.min() >= 0


def test_compressed_tables_are_read_through_plyvel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables another program rewrote with Snappy: this reader reads no compressed block itself."""
    images = np.zeros((3000, 8, 8, 3), np.uint8)  # compressible, so LevelDB keeps its Snappy blocks
    images[:, 0, 0, 0] = np.arange(3000) % 251
    labels = np.arange(3000) % 10
    with imgstore.open_store(tmp_path / "s", "leveldb", "w") as store:
        store.put_many(images, labels)
    source = plyvel.DB(str(_db_dir(tmp_path / "s")))
    copy = plyvel.DB(str(tmp_path / "copy"), create_if_missing=True, compression="snappy")
    for key, value in source.iterator():
        copy.put(key, value)
    source.close()
    copy.compact_range()  # into Snappy tables (left in the log, a view would write them uncompressed)
    copy.close()
    for file in _db_dir(tmp_path / "s").iterdir():  # the database replaced by its compressed copy
        file.unlink()
    for file in (tmp_path / "copy").iterdir():
        shutil.copyfile(file, _db_dir(tmp_path / "s") / file.name)
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert (offsets == LIBRARY).all()


def test_an_encoded_store_is_read_out_of_its_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    blobs = []
    for k in range(40):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (5 + k % 7, 9, 3), dtype=np.uint8)).save(out, "PNG")
        blobs.append(out.getvalue())
    labels = np.arange(40) % 3
    for part in (slice(0, 17), slice(17, 18), slice(18, 40)):
        with imgstore.open_store(tmp_path / "s", "leveldb", "a", codec="keep") as store:
            store.put_encoded_many(blobs[part], labels[part])
    with imgstore.open_store(tmp_path / "s") as store:
        order = np.random.default_rng(5).permutation(40)
        got = store.get_encoded_many(order)
        assert got[0] == [blobs[i] for i in order] and np.array_equal(got[1], labels[order])
        got = store.get_encoded_many(range(40))
        assert got[0] == blobs and np.array_equal(got[1], labels)
        for index in (0, 17, 39):
            image, label = store.get(index)
            assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(blobs[index])))) and label == labels[index]
        assert store._direct().offsets.min() >= 0  # type: ignore[attr-defined]


def test_threads_learning_at_once_read_the_right_records(tmp_path: Path) -> None:
    images, labels = _images(20_000, seed=6)
    with imgstore.open_store(tmp_path / "s", "leveldb", "w", block_bytes=1000) as store:
        store.put_many(images[:12_000], labels[:12_000])
    with imgstore.open_store(tmp_path / "s", "leveldb", "a", block_bytes=1000) as store:
        store.put_many(images[12_000:], labels[12_000:])
    for _ in range(3):  # a new reader each time: the threads learn its segments while they read
        with imgstore.open_store(tmp_path / "s") as store:
            check_threads_read(store, images, labels, threads=6, steps=40)


def test_a_reader_sees_new_commits_after_refresh(tmp_path: Path) -> None:
    images, labels = _images(3000, seed=7)
    with imgstore.open_store(tmp_path / "s", "leveldb", "w") as writer, imgstore.open_store(tmp_path / "s") as reader:
        writer.put_many(images[:1000], labels[:1000])
        reader.refresh()
        assert np.array_equal(reader.get_many(range(1000))[0], images[:1000])
        writer.put_many(images[1000:], labels[1000:])
        reader.refresh()
        got, got_labels = reader.get_many(range(3000))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)


def test_a_damaged_table_is_never_read_as_records(tmp_path: Path) -> None:
    """Bytes of a table overwritten after it was written: a verified read raises, never returns them."""
    images, labels = _images(2000, seed=8)
    with imgstore.open_store(tmp_path / "s", "leveldb", "w") as store:
        store.put_many(images, labels)
    table = max((p for p in _db_dir(tmp_path / "s").iterdir() if p.suffix == ".ldb"), key=lambda p: p.stat().st_size)
    data = bytearray(table.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(range(64))  # inside some record's pixels
    table.write_bytes(bytes(data))
    with imgstore.open_store(tmp_path / "s") as store:
        with pytest.raises(CorruptStoreError):
            store.get_many(range(2000))


def test_table_values_gives_each_entrys_value_where_plyvel_reads_it(tmp_path: Path) -> None:
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True, compression=None)
    values = {k.to_bytes(8, "big"): bytes([k % 256]) * (1 + 977 * k % 9000) for k in range(300)}
    for key, value in values.items():
        db.put(key, value)
    db.delete((5).to_bytes(8, "big"))
    db.put(b"short", b"not imgstore's")
    db.compact_range()
    db.close()
    seen: dict[int, tuple[int, int]] = {}
    for table in (tmp_path / "db").glob("*.ldb"):
        data = table.read_bytes()
        for key, seq, kind, offset, length in zip(*(c.tolist() for c in table_values(data)), strict=True):
            if key not in seen or seq > seen[key][0]:
                seen[key] = (seq, kind)
                if kind == 1:
                    assert data[offset : offset + length] == values[key.to_bytes(8, "big")]
    assert sorted(seen) == list(range(300)) or sorted(k for k, (_, kind) in seen.items() if kind == 1) == [
        k for k in range(300) if k != 5
    ]


def test_keys_past_2_63_in_a_table_are_left_to_plyvel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program's 8-byte key with its top bit set, in the table of a rewritten block: no int64
    overflow escapes (it did, as OverflowError, on every read of that segment)."""
    images, labels = _images(100, seed=9)
    with imgstore.open_store(tmp_path / "s", "leveldb", "w") as store:
        store.put_many(images, labels)
    db = plyvel.DB(str(_db_dir(tmp_path / "s")), compression=None)
    db.put(bytes(8), db.get(bytes(8)))  # block 0 again, in the same new table as the foreign key
    db.put(b"\x80" + bytes(7), b"not imgstore's")
    db.compact_range()
    db.close()
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert offsets.min() >= 0


def test_a_table_bounded_by_a_key_of_another_length_still_holds_the_newest_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's table whose largest key is not 8 bytes long (another program's, deleted by the commit)
    holds the newest value of a block a killed write also left in an older table: that table must be
    in the block's segment, or the killed write's records are read (before: CorruptStoreError)."""
    images, labels = _images(30, seed=10)
    record = 8 * 8 * 3 + 8
    with imgstore.open_store(tmp_path / "s", "leveldb", "w", block_bytes=5 * record) as store:
        store.put_many(images[:22], labels[:22])  # block 4 holds records 20 and 21
    db = plyvel.DB(str(_db_dir(tmp_path / "s")), compression=None)  # a killed write's block 4, flushed
    forged = np.concatenate([images[20:22], np.full((3, 8, 8, 3), 7, np.uint8)])
    db.put((4).to_bytes(8, "big"), forged.tobytes() + np.array([*labels[20:22], 0, 0, 0], "<i8").tobytes())
    db.compact_range()
    db.close()
    with imgstore.open_store(tmp_path / "s", "leveldb", "a") as store:
        store._db.put(b"meta", b"another program's")  # type: ignore[attr-defined]
        store.put_many(images[22:], labels[22:])  # deletes b"meta" in the same table as block 4
    offsets = _check_reader(tmp_path / "s", images, labels, monkeypatch)
    assert offsets.min() >= 0


def test_a_reader_holds_no_descriptor_per_table(tmp_path: Path) -> None:
    """Each table's map held a duplicate descriptor: a reader of a store of thousands of tables ran out
    of them (RLIMIT_NOFILE, often 1024), and every later open in its process failed."""
    images, labels = _images(120, seed=11)
    for start in range(0, 120, 3):  # each commit's close flushes its own table
        with imgstore.open_store(tmp_path / "s", "leveldb", "a", block_bytes=200) as store:
            store.put_many(images[start : start + 3], labels[start : start + 3])
    assert len([p for p in _db_dir(tmp_path / "s").iterdir() if p.suffix == ".ldb"]) >= 30
    with imgstore.open_store(tmp_path / "s") as store:
        store.get(0)
        before = len(os.listdir("/proc/self/fd"))
        got, got_labels = store.get_many(range(120))  # maps every table
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
        assert store._direct().offsets.min() >= 0  # type: ignore[attr-defined]
        assert len(os.listdir("/proc/self/fd")) < before + 5


def test_the_direct_reads_script_compares_both_paths_of_both_backends() -> None:
    """``python -m benchmarks.direct_reads`` (the README's A/B) prints every row; an unknown backend is refused."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.direct_reads", "--n", "300"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("  ")[0] for line in done.stdout.splitlines()]
    for backend in ("leveldb", "sqlite"):
        for way in ("direct", "direct unverified", "library"):
            assert f"{backend} get, {way}" in rows and f"{backend} scan out=, {way}" in rows
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.direct_reads", "lmdb"], cwd=root, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no direct path to compare for lmdb" in bad.stderr
