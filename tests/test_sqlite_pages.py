"""An SQLite reader reads rows straight out of the database file while its snapshot is the file (sqlite_pages).

Each test checks the rows against what was written and against SQL's own reading, and which way they
were read: out of the file (an offset learned) or with SQL. The safety claim is tested with a real
writer in another process that commits and checkpoints while a reader that holds its snapshot
reads again and again: SQLite must not write the file under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.backends.sqlite import SqliteStore
from imgstore.backends.sqlite_pages import LIBRARY, SnapshotRows
from imgstore.errors import CorruptStoreError

_ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, seed: int = 0, shape: tuple[int, ...] = (8, 8, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 9, 127, 128, 255, 40_000, 2**23, 2**31, 2**40, 2**47, 2**63 - 1], n)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), labels


def _sqlite_file(path: Path) -> Path:
    return next(path.glob("sqlite-*/images.sqlite"))


def _check_reader(
    store: imgstore.Store, images: np.ndarray, labels: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> SnapshotRows | None:
    """Read every row every way; return the snapshot's rows (None: read with SQL)."""
    order = np.random.default_rng(1).permutation(len(images))
    for index in order[:40].tolist():
        image, label = store.get(index)
        assert np.array_equal(image, images[index]) and label == labels[index]
    got, got_labels = store.get_many(order)
    assert np.array_equal(got, images[order]) and np.array_equal(got_labels, labels[order])
    rng = np.random.default_rng(2)
    for lo, hi in [(0, len(images)), *(sorted(rng.integers(0, len(images) + 1, 2).tolist()) for _ in range(10))]:
        got, got_labels = store.get_many(range(lo, hi))
        assert np.array_equal(got, images[lo:hi]) and np.array_equal(got_labels, labels[lo:hi]), (lo, hi)
    with monkeypatch.context() as patched:
        patched.setattr(SqliteStore, "_snapshot_rows", lambda self: None)
        plain, plain_labels = store.get_many(order)
    assert np.array_equal(plain, images[order]) and np.array_equal(plain_labels, labels[order])
    return store._rows  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("page_size", [512, 4096, 1 << 16])
def test_a_closed_stores_rows_are_read_out_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page_size: int
) -> None:
    """Labels of every serial type SQLite stores (0 and 1 in the header, 1 to 8 bytes), commits of
    many sizes, and trees of one to three levels (512-byte pages: 2 rows a leaf)."""
    images, labels = _images(3000, seed=page_size)
    at = 0
    for size in (1, 7, 300, 2, 1690, 1000):
        with imgstore.open_store(tmp_path / "s", "sqlite", "a", page_size=page_size) as store:
            store.put_many(images[at : at + size], labels[at : at + size])
        at += size
    with imgstore.open_store(tmp_path / "s") as store:
        rows = _check_reader(store, images, labels, monkeypatch)
        assert rows is not None and rows.offsets.min() >= 0  # every row out of the file


def test_rows_that_spill_to_overflow_pages_are_read_with_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _images(200, seed=3, shape=(32, 32, 3))  # 3 KB rows on 512-byte pages
    with imgstore.open_store(tmp_path / "s", "sqlite", "w", page_size=512) as store:
        store.put_many(images, labels)
    with imgstore.open_store(tmp_path / "s") as store:
        rows = _check_reader(store, images, labels, monkeypatch)
        assert rows is not None and (rows.offsets < 0).all()  # none learned: every row read with SQL
        assert (rows.offsets == LIBRARY).any()


def test_a_reader_beside_an_open_writer_reads_with_sql_until_the_frames_are_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = _images(600, seed=4)
    with imgstore.open_store(tmp_path / "s", "sqlite", "w") as writer:
        writer.put_many(images[:300], labels[:300])  # in the WAL, not yet in the file
        with imgstore.open_store(tmp_path / "s") as reader:
            assert _check_reader(reader, images[:300], labels[:300], monkeypatch) is None
            writer.put_many(images[300:450], labels[300:450])
            reader.refresh()  # ends its snapshot, which held any checkpoint back to its own frames
            writer._con.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[attr-defined]
            rows = _check_reader(reader, images[:450], labels[:450], monkeypatch)  # every frame is in the file
            assert rows is not None and rows.offsets.min() >= 0
            writer.put_many(images[450:], labels[450:])
            reader.refresh()
            assert _check_reader(reader, images, labels, monkeypatch) is None  # new frames: in the WAL only


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import imgstore
    path, rounds = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(9)
    with imgstore.open_store(path, "sqlite", "a") as store:
        for round in range(rounds):
            store.put_many(rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8), np.full(300, round))
            store._con.execute("PRAGMA wal_checkpoint(PASSIVE)")  # as far as SQLite lets it
        # another program overwrites committed rows in place, then checkpoints: a reader that
        # learned where those rows lie must still read its snapshot's bytes
        store._con.execute("UPDATE images SET image = zeroblob(192) WHERE id < 2000")
        print(store._con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall(), flush=True)
    print("done", flush=True)
    """
)


def test_a_writer_committing_and_checkpointing_never_changes_a_readers_snapshot(tmp_path: Path) -> None:
    """The reader keeps one snapshot (no refresh) while another process appends 60 commits and
    checkpoints after each: the file must stay what the reader learned, or its reads go wrong."""
    images, labels = _images(2000, seed=5)
    with imgstore.open_store(tmp_path / "s", "sqlite", "w") as store:
        store.put_many(images, labels)
    with imgstore.open_store(tmp_path / "s") as reader:
        assert np.array_equal(reader.get_many(range(2000))[0], images)
        assert reader._rows is not None  # type: ignore[attr-defined]
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / "s"), "60"], env=env, stdout=subprocess.PIPE, text=True
        )
        reads = 0
        while writer.poll() is None or reads < 3:
            got, got_labels = reader.get_many(np.random.default_rng(reads).permutation(2000))
            order = np.random.default_rng(reads).permutation(2000)
            assert np.array_equal(got, images[order]) and np.array_equal(got_labels, labels[order])
            reads += 1
        assert writer.wait(timeout=120) == 0 and "done" in writer.stdout.read()  # type: ignore[union-attr]
        got, got_labels = reader.get_many(range(2000))  # the snapshot, after the overwrite
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
        reader.refresh()
        assert len(reader) == 2000 + 60 * 300
        assert reader.get(len(reader) - 1)[1] == 59
    with imgstore.open_store(tmp_path / "s") as reader, pytest.raises(CorruptStoreError):
        reader.get(0)  # a new snapshot sees the overwrite (as damage): the old one was held apart from it


def test_damage_in_the_file_is_never_read_as_a_row(tmp_path: Path) -> None:
    images, labels = _images(3000, seed=6)
    with imgstore.open_store(tmp_path / "s", "sqlite", "w", page_size=4096) as store:
        store.put_many(images, labels)
    path = _sqlite_file(tmp_path / "s")
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(7)
    for at in rng.integers(4096, len(data), 40).tolist():  # pages past the schema's
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))
    with imgstore.open_store(tmp_path / "s") as store:
        wrong = []
        for index in range(3000):
            try:
                image, label = store.get(index)
            except CorruptStoreError:
                continue
            if not np.array_equal(image, images[index]) or label != labels[index]:
                wrong.append(index)
        assert not wrong


def test_a_killed_writes_rows_past_the_count_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _images(500, seed=8)
    with imgstore.open_store(tmp_path / "s", "sqlite", "w") as store:
        store.put_many(images[:400], labels[:400])
    import sqlite3

    con = sqlite3.connect(_sqlite_file(tmp_path / "s"))  # rows a killed write left past the count
    con.executemany("INSERT INTO images VALUES (?, ?, ?)", [(i, 5, bytes(192)) for i in range(400, 450)])
    con.commit()
    con.close()
    with imgstore.open_store(tmp_path / "s") as store:
        assert len(store) == 400
        rows = _check_reader(store, images[:400], labels[:400], monkeypatch)
        assert rows is not None and rows.offsets.min() >= 0
    with imgstore.open_store(tmp_path / "s", "sqlite", "a") as store:
        store.put_many(images[400:], labels[400:])
    with imgstore.open_store(tmp_path / "s") as store:
        rows = _check_reader(store, images, labels, monkeypatch)
        assert rows is not None and rows.offsets.min() >= 0


_PEEK = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
    "print(c.execute('SELECT count(*) FROM images').fetchone()[0]); c.close()"
)


def test_another_process_closing_its_connection_leaves_an_open_writers_wal(tmp_path: Path) -> None:
    """imgstore opens the database file itself (to reserve disk space before a write, to map it): had it
    closed that descriptor, the process would have lost SQLite's locks, and another process's last close
    would take the WAL (and the commits in it) from under the open writer."""
    images, labels = _images(400, seed=9)
    with imgstore.open_store(tmp_path / "s", "sqlite", "w", sync=False) as writer:
        writer.put_many(images[:200], labels[:200])
        path = _sqlite_file(tmp_path / "s")
        with imgstore.open_store(tmp_path / "s") as reader:
            reader.get_many(range(200))  # maps the file
        peek = subprocess.run([sys.executable, "-c", _PEEK, str(path)], capture_output=True, text=True, check=True)
        assert peek.stdout.strip() == "200"
        assert Path(f"{path}-wal").exists()  # the writer's connection still counts: no last close
        writer.put_many(images[200:], labels[200:])
    with imgstore.open_store(tmp_path / "s") as store:
        got, got_labels = store.get_many(range(400))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
