"""The naive way to keep images in SQLite, in the tutorial's style: the reference row ``tutorial-sqlite``.

What a user who reads the tutorial and reaches for Python's ``sqlite3`` writes: one row per image
holding a pickled ``(image, label)`` tuple, a connection opened and closed in every call (as the
tutorial's LMDB functions open their environment), SQLite's defaults (rollback journal,
``synchronous=FULL``), a commit per ``store_single`` call and one per ``store_many`` batch.
Pickle here only ever loads what this benchmark itself wrote (trusted data); imgstore's own SQLite
backend stores raw bytes and never pickles.
"""

from __future__ import annotations

import pickle  # only for the naive rows' own values: our trusted benchmark data, never outside input
import sqlite3
from pathlib import Path

import numpy as np

from benchmarks.operations import BATCH_SIZE

_DB = "images.db"
_TABLE = "CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, data BLOB)"


def store_single_sqlite(sqlite_dir: Path, image: np.ndarray, image_id: int, label: int) -> None:
    con = sqlite3.connect(sqlite_dir / _DB)
    con.execute(_TABLE)
    con.execute("INSERT INTO images VALUES (?, ?)", (image_id, pickle.dumps((image, int(label)))))
    con.commit()
    con.close()


def store_many_sqlite(sqlite_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    con = sqlite3.connect(sqlite_dir / _DB)
    con.execute(_TABLE)
    con.executemany(
        "INSERT INTO images VALUES (?, ?)",
        ((i, pickle.dumps((images[i], int(labels[i])))) for i in range(len(images))),
    )
    con.commit()
    con.close()


def read_single_sqlite(sqlite_dir: Path, image_id: int) -> tuple[np.ndarray, int]:
    con = sqlite3.connect(sqlite_dir / _DB)
    (data,) = con.execute("SELECT data FROM images WHERE id = ?", (image_id,)).fetchone()
    con.close()
    image, label = pickle.loads(data)  # trusted: written by this benchmark
    return image, label


def _read_range_sqlite(sqlite_dir: Path, start: int, stop: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    con = sqlite3.connect(sqlite_dir / _DB)
    for (data,) in con.execute("SELECT data FROM images WHERE id >= ? AND id < ? ORDER BY id", (start, stop)):
        image, label = pickle.loads(data)  # trusted: written by this benchmark
        images.append(image)
        labels.append(label)
    con.close()
    return images, labels


def read_many_sqlite(sqlite_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    return _read_range_sqlite(sqlite_dir, 0, num_images)


def iterate_sqlite(sqlite_dir: Path, num_images: int) -> tuple[list[np.ndarray], list[int]]:
    for start in range(0, num_images, BATCH_SIZE):
        batch = _read_range_sqlite(sqlite_dir, start, min(start + BATCH_SIZE, num_images))
    return batch


FUNCTIONS = {
    "store_single": store_single_sqlite,
    "store_many": store_many_sqlite,
    "read_single": read_single_sqlite,
    "read_many": read_many_sqlite,
    "iterate": iterate_sqlite,
}
