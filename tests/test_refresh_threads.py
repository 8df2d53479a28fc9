"""refresh() of a handle while other threads read through it, and a writer appends from another process.

A refresh changes a handle's state in steps; a read that overlaps one is read again once it ends
(imgstore.refreshing). Before that, reads failed with IndexError, AttributeError or a false
CorruptStoreError, kept a stale index that failed every later read (TileDB), or crashed the
process (LevelDB's database closed under a read).
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import imgstore

REPO = Path(__file__).resolve().parent.parent
BATCH = 40
APPENDS = 25


@pytest.mark.parametrize("backend", imgstore.installed_backends())
def test_reads_in_threads_survive_refreshes(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "store"
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 6, 5, 3), dtype=np.uint8)
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, np.arange(BATCH))
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, numpy as np, imgstore\n"
                f"images = np.random.default_rng(0).integers(0, 256, ({BATCH}, 6, 5, 3), dtype=np.uint8)\n"
                f"with imgstore.open_store(sys.argv[1], mode='a') as store:\n"
                f"    for _ in range({APPENDS}):\n"
                f"        store.put_many(images, np.arange({BATCH}))\n"
            ),
            str(path),
        ],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    reader = imgstore.open_store(path)
    errors: list[str] = []
    reads = [0]
    done = threading.Event()

    def read() -> None:
        rng = random.Random(threading.get_ident())
        while not done.is_set():
            try:
                i = rng.randrange(len(reader))
                image, label = reader.get(i)
                assert label == i % BATCH and np.array_equal(image, images[i % BATCH]), i
                picks = [rng.randrange(len(reader)) for _ in range(8)]
                batch, labels = reader.get_many(picks)
                assert np.array_equal(labels, np.array(picks) % BATCH) and np.array_equal(batch, images[labels])
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        while writer.poll() is None:
            reader.refresh()
        assert writer.returncode == 0
        reader.refresh()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert len(reader) == BATCH * (APPENDS + 1)
    assert errors == [], sorted(set(errors))[:5]
    assert reads[0] > 0
    batch, labels = reader.get_many(range(len(reader)))
    assert np.array_equal(labels, np.arange(len(reader)) % BATCH)
    reader.close()


@pytest.mark.parametrize("backend", imgstore.installed_backends())
def test_close_waits_for_reads_in_other_threads(tmp_path: Path, backend: str) -> None:
    """close() while other threads read: their reads end first, later ones are StoreClosedError (LMDB,
    SQLite and LevelDB crashed the process on a read of a closed handle; others said 'damaged')."""
    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
    with imgstore.open_store(tmp_path / "s", backend, "w") as store:
        store.put_many(images, np.arange(200))
    outcomes: list[str] = []
    for _ in range(10):
        reader = imgstore.open_store(tmp_path / "s")
        started = threading.Barrier(4)

        def read(reader: imgstore.Store = reader, started: threading.Barrier = started) -> None:
            rng = np.random.default_rng()
            started.wait()
            while True:
                try:
                    picked = rng.permutation(200)[:20]
                    batch, labels = reader.get_many(picked)
                    assert np.array_equal(batch, images[picked]) and np.array_equal(labels, picked)
                    reader.get(int(rng.integers(200)))
                except imgstore.StoreClosedError:
                    outcomes.append("closed")
                    return
                except Exception as exc:  # noqa: BLE001 - every other outcome is the finding
                    outcomes.append(repr(exc))
                    return

        threads = [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        started.wait()
        reader.close()
        for thread in threads:
            thread.join(30)
    assert outcomes == ["closed"] * 30, sorted(set(outcomes))[:3]
