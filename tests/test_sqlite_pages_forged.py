"""An SQLite reader's page walk against forged and damaged B-trees, and the descriptors it keeps
against the user's own connection to the same file (sqlite_pages, sqlite_files).

Every read is checked against what was written: a row the page reader cannot vouch for must still
be read right through SQL (or be an imgstore error), and nothing may hang.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.backends.sqlite import SqliteStore
from imgstore.backends.sqlite_pages import varint
from imgstore.errors import CorruptStoreError


def _store(path: Path, n: int, page_size: int = 4096) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    images, labels = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) * 3
    with imgstore.open_store(path, "sqlite", "w", page_size=page_size) as store:
        store.put_many(images, labels)
    return next(path.glob("sqlite-*/images.sqlite")), images, labels


def _pages(file: Path, kind: str) -> list[int]:
    """The images table's pages of a kind ('internal', 'leaf'), by SQLite's own dbstat table."""
    with closing(sqlite3.connect(file)) as con:
        query = "SELECT pageno FROM dbstat WHERE name = 'images' AND pagetype = ? ORDER BY path"
        return [row[0] for row in con.execute(query, (kind,))]


class _Hung(Exception):
    """Not an OSError (TimeoutError is one): nothing on the way may take it for an I/O error."""


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expire(*_: object) -> None:
        raise _Hung(f"not done in {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _read_all(path: Path, images: np.ndarray, labels: np.ndarray) -> int:
    """Read each row alone and all at once: right, or CorruptStoreError; the number read right."""
    right = 0
    with imgstore.open_store(path) as store:
        for index in range(len(images)):
            try:
                image, label = store.get(index)
            except CorruptStoreError:
                continue
            assert np.array_equal(image, images[index]) and label == labels[index], index
            right += 1
        try:
            got, got_labels = store.get_many(range(len(images)))
            assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
        except CorruptStoreError:
            pass
    return right


def test_a_tree_whose_pointers_lead_back_to_a_page_is_not_walked_forever(tmp_path: Path) -> None:
    """The root's children all point at the root itself (a cycle); its right child still leads to
    the last leaf. Each page is walked once: the reader falls back to SQL, which says what it finds."""
    file, images, labels = _store(tmp_path / "s", 3000)
    page = 4096
    (root,) = _pages(file, "internal")
    data = bytearray(file.read_bytes())
    at = (root - 1) * page
    for k in range(int.from_bytes(data[at + 3 : at + 5], "big")):
        cell = (root - 1) * page + int.from_bytes(data[at + 12 + 2 * k : at + 14 + 2 * k], "big")
        data[cell : cell + 4] = root.to_bytes(4, "big")
    file.write_bytes(bytes(data))
    with _deadline(5):
        assert _read_all(tmp_path / "s", images, labels) > 0  # the last leaf's rows, through SQL


def test_a_stale_copy_of_a_row_in_another_leaf_is_not_read(tmp_path: Path) -> None:
    """A leaf's first cell is given the rowid of a row in an earlier leaf (as a damaged page or an old
    copy could): SQLite finds that row only where the interior keys lead, so must this reader."""
    file, images, labels = _store(tmp_path / "s", 3000)
    page = 4096
    leaves = _pages(file, "leaf")
    data = bytearray(file.read_bytes())

    def first_cell(number: int) -> tuple[int, int, int]:
        at = (number - 1) * page
        cell = at + int.from_bytes(data[at + 8 : at + 10], "big")
        _, rowid_at = varint(data, cell)
        rowid, end = varint(data, rowid_at)
        return rowid_at, end, rowid

    _, _, victim = first_cell(leaves[10])
    rowid_at, end, own = first_cell(leaves[40])
    assert end - rowid_at == 2 and victim >= 128  # the same varint length: only the rowid changes
    data[rowid_at:end] = bytes([0x80 | (victim >> 7), victim & 0x7F])
    file.write_bytes(bytes(data))
    with imgstore.open_store(tmp_path / "s") as store:
        store.get(victim + 1)  # the victim's own leaf is learned first,
        with pytest.raises(CorruptStoreError):
            store.get(own)  # then the forged one (its own row is gone),
        image, label = store.get(victim)  # which must not take the victim's place
        assert np.array_equal(image, images[victim]) and label == labels[victim]
    assert _read_all(tmp_path / "s", images, labels) == 2999


_NOTES = "import sqlite3, sys; con = sqlite3.connect(sys.argv[1]); {}"


def test_the_users_own_connection_keeps_its_locks_when_imgstore_closes(tmp_path: Path) -> None:
    """The user's ``sqlite3.connect()`` to the store's file in the same process holds SQLite's locks:
    imgstore's descriptors of the file, closed when its last connection closed, dropped them, and
    another process's close then deleted the WAL holding the user's later commits (lost at a kill)."""
    file, images, labels = _store(tmp_path / "s", 100)
    user = sqlite3.connect(file, isolation_level=None)
    try:
        user.execute("CREATE TABLE notes(x)")
        user.execute("PRAGMA wal_checkpoint")  # every frame in the file: imgstore's reader maps it
        with imgstore.open_store(tmp_path / "s") as store:
            got, _ = store.get_many(range(100))
            assert np.array_equal(got, images) and store._rows is not None  # type: ignore[attr-defined]
        other = _NOTES.format("con.execute('SELECT 1 FROM images').fetchall(); con.close()")
        subprocess.run([sys.executable, "-c", other, str(file)], check=True)
        assert Path(f"{file}-wal").exists()  # not the last connection: the user's still counts
        user.execute("INSERT INTO notes VALUES ('kept')")
        seen = _NOTES.format("print(con.execute('SELECT x FROM notes').fetchall())")
        peek = subprocess.run([sys.executable, "-c", seen, str(file)], capture_output=True, text=True, check=True)
        assert peek.stdout.strip() == "[('kept',)]"
    finally:
        user.close()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_descriptors_kept_for_the_users_connection_are_used_again_and_closed_after_it(tmp_path: Path) -> None:
    file, images, _ = _store(tmp_path / "s", 100)
    before = _descriptors()
    user = sqlite3.connect(file, isolation_level=None)
    user.execute("SELECT 1 FROM images").fetchall()
    with_user = _descriptors()
    for _ in range(30):  # stores opened and closed while the user's connection stays open
        with imgstore.open_store(tmp_path / "s") as store:
            assert np.array_equal(store.get(7)[0], images[7])
    assert _descriptors() <= with_user + 3  # the kept ones, at most: not three more a store
    user.close()
    with imgstore.open_store(tmp_path / "s") as store:
        store.get(7)
    assert _descriptors() == before  # no other descriptor of the file left: every kept one closed


def test_a_file_moved_to_the_path_under_an_open_reader_is_not_read(tmp_path: Path) -> None:
    """Another program swaps a new file in at the path (``os.replace``): the reader's connection still
    reads the file it opened, so must its page reader (it maps the path's file: another's rows)."""
    file, images, labels = _store(tmp_path / "s", 500)
    with imgstore.open_store(tmp_path / "s", verify_reads=False) as reader:
        other = file.with_name("other.sqlite")
        other.write_bytes(file.read_bytes())
        con = sqlite3.connect(other)
        con.execute("UPDATE images SET image = zeroblob(192), label = 1")
        con.commit()
        con.close()  # checkpointed into the file: its WAL goes
        os.replace(other, file)
        got, got_labels = reader.get_many(range(500))
        assert np.array_equal(got, images) and np.array_equal(got_labels, labels)


def _reads(path: Path, pages: bool, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each row, unverified (what the file says): (pixels, label) or the error's name; out of the file's
    pages, or with SQL alone (``_snapshot_rows`` None)."""
    with monkeypatch.context() as patched:
        if not pages:
            patched.setattr(SqliteStore, "_snapshot_rows", lambda self: None)
        found: list[object] = []
        with imgstore.open_store(path, verify_reads=False) as store:
            for index in range(len(store)):
                try:
                    image, label = store.get(index)
                    found.append((image.tobytes(), label))
                except CorruptStoreError:
                    found.append("damaged")
            assert (store._rows is not None) == pages  # type: ignore[attr-defined]
        return found


def _cell(data: bytearray, page: int, number: int, k: int) -> tuple[int, int, int]:
    """Leaf ``number``'s cell ``k``: where its rowid varint starts and ends, and the rowid."""
    at = (number - 1) * page
    cell = (number - 1) * page + int.from_bytes(data[at + 8 + 2 * k : at + 10 + 2 * k], "big")
    _, rowid_at = varint(data, cell)
    rowid, end = varint(data, rowid_at)
    return rowid_at, end, rowid


def test_a_leaf_with_two_cells_of_one_rowid_is_read_as_sql_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite finds a row in a leaf by binary search over cells in rowid order: which of two cells
    of one rowid it finds is its own to say (the page reader had the last; SQLite, the first)."""
    file, images, labels = _store(tmp_path / "s", 3000)
    page, leaf = 4096, _pages(file, "leaf")[20]
    data = bytearray(file.read_bytes())
    _, _, first = _cell(data, page, leaf, 3)
    start, end, _ = _cell(data, page, leaf, 10)  # a later cell, out of order now
    data[start:end] = bytes([0x80 | (first >> 7), first & 0x7F])
    file.write_bytes(bytes(data))
    assert _reads(tmp_path / "s", True, monkeypatch) == _reads(tmp_path / "s", False, monkeypatch)


def test_a_record_whose_values_do_not_fill_its_payload_is_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label's serial type narrowed from 8 bytes (6) to 4 (4): SQLite calls the record damaged
    (its values end before its payload); the page reader read a 4-byte label and shifted pixels."""
    path = tmp_path / "s"
    with imgstore.open_store(path, "sqlite", "w", page_size=4096) as store:
        store.put_many(np.zeros((300, 8, 8, 3), np.uint8), np.full(300, 2**62))
    file = next(path.glob("sqlite-*/images.sqlite"))
    page, leaf = 4096, _pages(file, "leaf")[3]
    data = bytearray(file.read_bytes())
    _, record, rowid = _cell(data, page, leaf, 5)
    assert data[record : record + 3] == bytes([5, 0, 6])  # header size, id (NULL), label (8 bytes)
    data[record + 2] = 4
    file.write_bytes(bytes(data))
    pages, sql = _reads(path, True, monkeypatch), _reads(path, False, monkeypatch)
    assert sql[rowid] == "damaged" and pages == sql
