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
