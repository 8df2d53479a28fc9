"""Backend cases an adversarial pass broke: links planted in a store, forged labels, schemas and file names.

Each case as it was found: a symlink planted in a tar or zarr store must never make a write go
outside the store; a damaged tar label is a ``CorruptStoreError`` (never an ``OverflowError``, never
a label outside int64); a forged SQLite schema cannot hang ``open_store``; a stray TileDB commit
name cannot break every write.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imgstore
import imgstore.manifest

INT64_MAX = (1 << 63) - 1


def _only(path: Path, pattern: str) -> Path:
    found = sorted(path.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def _tar_store(path: Path, labels: list[int] | None = None) -> None:
    labels = [1, 2] if labels is None else labels
    images = np.arange(len(labels) * 48, dtype=np.uint8).reshape(len(labels), 4, 4, 3)
    with imgstore.open_store(path, "tar", "w") as store:
        store.put_many(images, labels)


def _link_out(target: Path, outside: Path) -> bytes:
    """Move ``target`` to ``outside`` and leave a symlink to it in its place; the outside file's bytes."""
    os.replace(target, outside)
    target.symlink_to(outside)
    return outside.read_bytes()


# ---------------------------------------------------------------------- tar: planted links


@pytest.mark.parametrize("which", ["tarindex-*.bin", "tar-*/shard-*-000000.tar"])
def test_tar_a_linked_file_is_never_written_through(tmp_path: Path, which: str) -> None:
    path = tmp_path / "s"
    _tar_store(path)
    outside = tmp_path / "outside.bin"
    before = _link_out(_only(path, which), outside)
    with imgstore.open_store(path, mode="a") as store:
        with pytest.raises((imgstore.StoreIOError, imgstore.CorruptStoreError)):
            store.put(np.zeros((4, 4, 3), np.uint8), 5)
        assert len(store) == 2
    assert outside.read_bytes() == before
    with pytest.raises(imgstore.CorruptStoreError):  # a link is damage for a reader too, never followed
        with imgstore.open_store(path) as store:
            store.get_many(range(2))
            store.verify()


def test_tar_a_linked_temporary_shard_is_not_written_through(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with imgstore.open_store(path, "tar", "w", shard_bytes=4096) as store:
        store.put_many(np.zeros((2, 4, 4, 3), np.uint8), [1, 2])
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the store's")
    shard = _only(path, "tar-*/shard-*-000000.tar")
    tmp = shard.with_name(shard.name.replace("000000", "000001") + ".tmp")
    tmp.symlink_to(outside)
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(np.ones((4, 4, 4, 3), np.uint8), [3, 4, 5, 6])  # a new shard: the stale link goes first
        assert len(store) == 6
    assert outside.read_bytes() == b"not the store's"
    assert not any(p.is_symlink() for p in shard.parent.iterdir())


# ---------------------------------------------------------------------- tar: labels past int64


def _flip_label(path: Path, old: bytes, new: bytes) -> None:
    shard = _only(path, "tar-*/shard-*-000000.tar")
    data = shard.read_bytes()
    assert data.count(old) == 1
    shard.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("verify_reads", [True, False])
def test_tar_a_label_past_int64_is_damage(tmp_path: Path, verify_reads: bool) -> None:
    path = tmp_path / "s"
    _tar_store(path, [INT64_MAX, 3])
    _flip_label(path, b"9223372036854775807", b"9323372036854775807")
    with imgstore.open_store(path, verify_reads=verify_reads) as store:
        with pytest.raises(imgstore.CorruptStoreError):
            store.get(0)
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_many([1, 0])  # a gather
        with pytest.raises(imgstore.CorruptStoreError):
            store.get_many(range(2))  # a scan
        with pytest.raises(imgstore.CorruptStoreError):
            store.verify()
        assert store.get(1)[1] == 3


def test_tar_the_largest_label_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _tar_store(path, [INT64_MAX, 0])
    with imgstore.open_store(path, verify_reads=False) as store:
        assert store.get(0)[1] == INT64_MAX
        assert store.get_many(range(2))[1].tolist() == [INT64_MAX, 0]
        assert store.get_many([1, 0])[1].tolist() == [0, INT64_MAX]


@pytest.mark.parametrize("read", ["get", "gather", "scan"])
def test_tar_a_shard_cut_short_after_the_index_was_read_is_damage(tmp_path: Path, read: str) -> None:
    """Reads copy out of maps of the shards: a shard cut below its committed records after the handle
    read (and checked) the index is damage when it is mapped, never a copy past its end."""
    path = tmp_path / "s"
    images = np.arange(4 * 48, dtype=np.uint8).reshape(4, 4, 4, 3)
    with imgstore.open_store(path, "tar", "w", shard_bytes=4096) as store:  # 2 records (2 048 bytes each) a shard
        store.put_many(images, [0, 1, 2, 3])
    with imgstore.open_store(path) as store:
        assert store.get(0)[1] == 0  # the index is read and checked, shard 0 mapped
        os.truncate(_only(path, "tar-*/shard-*-000001.tar"), 1000)  # records 2 and 3 cut off
        with pytest.raises(imgstore.CorruptStoreError):
            {
                "get": lambda: store.get(2),
                "gather": lambda: store.get_many([3, 0]),
                "scan": lambda: store.get_many(range(4)),
            }[read]()
        image, label = store.get(1)  # the other shard still reads
        assert label == 1 and np.array_equal(image, images[1])


# ---------------------------------------------------------------------- zarr: planted links


@pytest.mark.parametrize("array", ["images", "labels"])
def test_zarr_a_linked_metadata_temporary_is_not_written_through(tmp_path: Path, array: str) -> None:
    path = tmp_path / "s"
    images = np.arange(2 * 48, dtype=np.uint8).reshape(2, 4, 4, 3)
    with imgstore.open_store(path, "zarr", "w") as store:
        store.put_many(images, [1, 2])
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    (_only(path, "zarr-*") / array / "zarr.json.tmp").symlink_to(outside)
    with imgstore.open_store(path, mode="a") as store:  # a writer rewrites the metadata as it opens
        store.put(images[0], 3)
        assert len(store) == 3
    assert outside.read_text() == "not the store's"
    meta = _only(path, "zarr-*") / array / "zarr.json"
    assert not meta.is_symlink() and not meta.with_name("zarr.json.tmp").exists()
    with imgstore.open_store(path) as store:
        assert store.get_many(range(3))[1].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------- sqlite: forged schemas

_ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c)"
_FORGERIES = {
    "view": [
        "ALTER TABLE images RENAME TO t",
        f"CREATE VIEW images AS {_ENDLESS} SELECT x AS id, 0 AS label, x'00' AS image FROM c",
    ],
    "trigger": [
        "CREATE TABLE side(x)",
        f"CREATE TRIGGER grow AFTER INSERT ON images BEGIN INSERT INTO side {_ENDLESS} SELECT x FROM c; END",
    ],
    "columns": ["ALTER TABLE images ADD COLUMN extra"],
    "virtual": [
        "ALTER TABLE images RENAME TO t",
        "CREATE VIRTUAL TABLE images USING fts5(id, label, image)",
    ],
}


def _forge_sqlite(path: Path, statements: list[str]) -> None:
    con = sqlite3.connect(_only(path, "sqlite-*/images.sqlite"))
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def _open_in_child(path: Path, mode: str, timeout: float = 60) -> str:
    """Open the store (and put one image) in a child process: a hang is a failure here, not a stuck suite."""
    code = f"""
import numpy as np, imgstore
try:
    with imgstore.open_store({str(path)!r}, mode={mode!r}) as store:
        if store.writable:
            store.put(np.zeros((4, 4, 3), np.uint8), 1)
        store.get_many(range(len(store)))
    print("opened")
except imgstore.CorruptStoreError as exc:
    print("CorruptStoreError", exc)
"""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hung"
    return done.stdout.strip() or done.stderr.strip()[-500:]


@pytest.mark.parametrize("forgery", sorted(_FORGERIES))
@pytest.mark.parametrize("mode", ["r", "a"])
def test_sqlite_a_forged_schema_is_damage_at_open(tmp_path: Path, forgery: str, mode: str) -> None:
    path = tmp_path / "s"
    with imgstore.open_store(path, "sqlite", "w") as store:
        store.put_many(np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2])
    try:
        _forge_sqlite(path, _FORGERIES[forgery])
    except sqlite3.OperationalError as exc:  # an SQLite built without FTS5
        pytest.skip(str(exc))
    assert _open_in_child(path, mode).startswith("CorruptStoreError")


def test_sqlite_an_index_a_user_added_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with imgstore.open_store(path, "sqlite", "w") as store:
        store.put_many(np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2])
    _forge_sqlite(path, ["CREATE INDEX by_label ON images(label)", "ANALYZE"])
    with imgstore.open_store(path, mode="a") as store:
        store.put(np.ones((4, 4, 3), np.uint8), 7)
        assert store.get_many(range(4))[1].tolist() == [0, 1, 2, 7]


def test_sqlite_a_query_at_open_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the schema check (were it to miss a forgery), the queries at open are cut off, never endless."""
    from imgstore.backends.sqlite import SqliteStore

    path = tmp_path / "s"
    with imgstore.open_store(path, "sqlite", "w") as store:
        store.put_many(np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2])
    _forge_sqlite(path, _FORGERIES["view"])
    monkeypatch.setattr(SqliteStore, "_check_schema", lambda self: None)
    with pytest.raises(imgstore.CorruptStoreError, match="did not end"):
        imgstore.open_store(path)


# ---------------------------------------------------------------------- tiledb: stray file names

_UUID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "name",
    [
        f"__99999999999999999999999_99999999999999999999999_{_UUID}_22.wrt",  # past 2**64
        f"__{1 << 63}_{1 << 63}_{_UUID}_22.wrt",  # past int64
        f"__1_{(1 << 63) - 1}_{_UUID}_22.wrt",  # no timestamp after it
    ],
)
def test_tiledb_an_impossible_timestamp_in_a_file_name_is_damage(tmp_path: Path, name: str) -> None:
    pytest.importorskip("tiledb")
    path = tmp_path / "s"
    images = np.arange(2 * 48, dtype=np.uint8).reshape(2, 4, 4, 3)
    with imgstore.open_store(path, "tiledb", "w") as store:
        store.put_many(images, [0, 1])
    (_only(path, "tiledb-*") / "__commits" / name).touch()
    with imgstore.open_store(path, mode="a") as store:
        with pytest.raises(imgstore.CorruptStoreError, match=name):
            store.put_many(images, [2, 3])
        assert len(store) == 2
    with imgstore.open_store(path) as store:
        assert store.get_many(range(2))[1].tolist() == [0, 1]


# ---------------------------------------------------------------------- every backend: linked folders

_FOLDERS = {  # a backend's folders, as found in a store of 5 raw images: each replaced by a link in turn
    "tar": ["tar-*"],
    "zarr": ["zarr-*", "zarr-*/images", "zarr-*/images/c/0", "zarr-*/labels"],
    "png": ["png-*", "png-*/00000"],
    "lmdb": ["lmdb-*"],
    "leveldb": ["leveldb-[0-9a-f]*", "leveldb-views-*"],
    "tiledb": ["tiledb-*", "tiledb-*/__fragments", "tiledb-*/__fragments/*", "tiledb-*/__commits", "tiledb-*/__schema"],
    "arrow": ["arrow-*"],
    "sqlite": ["sqlite-*"],
}


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"" for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize(
    ("backend", "folder"),
    [pytest.param(b, f, id=f"{b}-{f}") for b, folders in _FOLDERS.items() for f in folders],
)
def test_a_linked_folder_is_damage_and_never_written_through(tmp_path: Path, backend: str, folder: str) -> None:
    if backend not in imgstore.available_backends():
        pytest.skip(f"{backend} is not installed")
    path = tmp_path / "s"
    images = np.arange(5 * 48, dtype=np.uint8).reshape(5, 4, 4, 3)
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, [0, 1, 2, 3, 4])
    target = _only(path, folder)
    outside = tmp_path / "outside"
    os.replace(target, outside)
    target.symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    for mode in ("r", "a"):  # a reader refuses it; a writer writes nothing through it
        with pytest.raises(imgstore.CorruptStoreError, match="link"):
            with imgstore.open_store(path, mode=mode) as store:
                store.put(images[0], 1) if store.writable else store.get_many(range(5))
        assert _tree(outside) == before, mode
    with imgstore.open_store(path, backend, "w") as store:  # replacing the store deletes the link, not its target
        store.put_many(images, [0, 1, 2, 3, 4])
    assert _tree(outside) == before
    assert not any(p.is_symlink() for p in path.rglob("*"))


def _date_in_the_future(path: Path, newest_only: bool) -> None:
    """Rename fragments (and their commit files) as if written 30 years from now (a forger, a clock set back)."""
    root = _only(path, "tiledb-*")
    future = str(int(time.time() * 1000) + 30 * 365 * 86_400_000)
    commits = sorted(os.listdir(root / "__commits"), key=lambda name: int(name.split("_")[3]))
    for commit in commits[-1:] if newest_only else commits:
        fragment = commit.rsplit(".", 1)[0]
        renamed = "_".join(["", "", future, future, *fragment.split("_")[4:]])
        os.rename(root / "__fragments" / fragment, root / "__fragments" / renamed)
        os.rename(root / "__commits" / commit, root / "__commits" / f"{renamed}.wrt")


@pytest.mark.parametrize("newest_only", [True, False])
def test_tiledb_a_fragment_dated_in_the_future_is_damage_and_hides_no_write(tmp_path: Path, newest_only: bool) -> None:
    """TileDB reads fragments up to the present: a later write would get a later date still, and stay
    invisible; so a fragment dated in the future is damage, found at open, before anything is written."""
    pytest.importorskip("tiledb")
    path = tmp_path / "s"
    images = np.arange(4 * 48, dtype=np.uint8).reshape(4, 4, 4, 3)
    with imgstore.open_store(path, "tiledb", "w", consolidate_every=100) as store:
        store.put_many(images[:2], [0, 1])
        store.put_many(images[2:], [2, 3])
    _date_in_the_future(path, newest_only)
    commits = sorted(os.listdir(_only(path, "tiledb-*") / "__commits"))
    with imgstore.open_store(path, mode="a") as store:
        with pytest.raises(imgstore.CorruptStoreError, match="future"):
            store.put_many(images[:1], [9])  # refused before writing: it would be dated later still
        assert len(store) == 4
    assert imgstore.manifest.read_manifest(path).count == 4
    assert sorted(os.listdir(_only(path, "tiledb-*") / "__commits")) == commits  # no fragment was written
    with imgstore.open_store(path) as store:  # what the dates hide is damage to a reader
        with pytest.raises(imgstore.CorruptStoreError, match="in no fragment"):
            store.get_many(range(4))
