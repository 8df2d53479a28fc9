"""The sqlite3 shell reads what imgstore's SQLite backend wrote: labels, pixels and file bytes, row by row."""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.manifest import read_manifest

SHELL = shutil.which("sqlite3") or "/usr/bin/sqlite3"
pytestmark = pytest.mark.skipif(
    not os.access(SHELL, os.X_OK), reason="the sqlite3 shell is not installed (Debian: apt-get install sqlite3)"
)


def database(store: Path) -> Path:
    """The store's database file, as a user finds it: the manifest names the folder."""
    (folder,) = [name for name in read_manifest(store).files if name.startswith("sqlite-")]
    return store / folder / "images.sqlite"


def shell(db: Path, query: str) -> list[list[str]]:
    out = subprocess.run([SHELL, "-readonly", str(db), query], capture_output=True, text=True, check=True, timeout=60)
    return [line.split("|") for line in out.stdout.splitlines()]


def test_the_shell_reads_a_raw_store_appended_in_several_commits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 150)
    path = tmp_path / "cifar"
    with imgstore.open_store(path, "sqlite", "w") as store:
        store.put_many(images[:100], labels[:100])
    with imgstore.open_store(path, mode="a") as store:  # two more commits
        store.put_many(images[100:140], labels[100:140])
        for k in range(140, 150):
            store.put(images[k], int(labels[k]))
    db = database(path)
    rows = shell(db, "SELECT id, label, length(image) FROM images WHERE id < 150 ORDER BY id")
    assert rows == [[str(k), str(labels[k]), "3072"] for k in range(150)]
    pixels = shell(db, "SELECT hex(image) FROM images ORDER BY id")
    got = np.stack([np.frombuffer(bytes.fromhex(row[0]), np.uint8) for row in pixels]).reshape(images.shape)
    np.testing.assert_array_equal(got, images)


def test_the_shell_reads_the_files_of_a_keep_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blobs = []
    for k in range(12):
        buffer = io.BytesIO()
        array = rng.integers(0, 256, (20 + k, 30 - k, 3), dtype=np.uint8)
        Image.fromarray(array).save(buffer, "JPEG" if k % 2 else "PNG")
        blobs.append(buffer.getvalue())
    labels = list(range(12))
    path = tmp_path / "photos"
    with imgstore.open_store(path, "sqlite", "w", codec="keep") as store:
        store.put_encoded_many(blobs[:7], labels[:7])
    with imgstore.open_store(path, mode="a") as store:
        store.put_encoded_many(blobs[7:], labels[7:])
    rows = shell(database(path), "SELECT id, label, hex(image) FROM images ORDER BY id")
    assert [(int(i), int(label)) for i, label, _ in rows] == [(k, k) for k in range(12)]
    assert [bytes.fromhex(blob) for _, _, blob in rows] == blobs  # the files exactly as given


def _killed_before_the_manifest(path: str, images: np.ndarray) -> None:
    """Commit rows to SQLite, then die where the manifest would commit them (a SIGKILL between the two)."""
    import imgstore.fixed

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    imgstore.fixed.write_manifest = die  # type: ignore[assignment]
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images, [7] * len(images))


def test_leftovers_of_a_killed_write_are_rows_past_the_manifest_count(tmp_path: Path) -> None:
    """What the shell sees after a writer died between SQLite's commit and the manifest's: the README's rule."""
    images = np.arange(30 * 8 * 8 * 3, dtype=np.uint64).astype(np.uint8).reshape(30, 8, 8, 3)
    path = tmp_path / "s"
    with imgstore.open_store(path, "sqlite", "w") as store:
        store.put_many(images[:20], [1] * 20)
    writer = multiprocessing.get_context("fork").Process(target=_killed_before_the_manifest, args=(str(path), images))
    writer.start()
    writer.join(60)
    assert writer.exitcode == -signal.SIGKILL
    db = database(path)
    count = read_manifest(path).count
    assert count == 20
    # SQLite recovered the WAL the killed writer left: its rows are there, past the committed count ...
    assert shell(db, "SELECT count(*) FROM images") == [["50"]]
    # ... and a query bounded by the manifest's count sees exactly the committed records.
    assert shell(db, f"SELECT count(*), sum(label) FROM images WHERE id < {count}") == [["20", "20"]]
    with imgstore.open_store(path) as store:
        assert len(store) == 20
        store.verify()
    with imgstore.open_store(path, mode="a") as store:  # the next write replaces the leftovers
        store.put_many(images[:5], [3] * 5)
    assert shell(db, "SELECT count(*), sum(label) FROM images") == [["25", str(20 + 15)]]
