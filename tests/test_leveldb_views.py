"""A LevelDB reader's private view beside a live writer, and where views are made.

A reader never opens the writer's database (LevelDB admits one process): it opens a view, made of
copies of the database's small files and hard links to its table files. Opening a view makes LevelDB
write files of its own there; these tests check that nothing it writes reaches the writer's files,
that views stay in the store, and that a temporary copy (read-only media) does not outlive its process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import imgstore

_ROOT = Path(__file__).resolve().parents[1]
_ROUNDS, _BATCH = 25, 1400  # 1400 random 32x32x3 images: 4.3 MB a commit, which flushes a table

_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import imgstore
    path, rounds, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(batch)
    with imgstore.open_store(path, "leveldb", "a") as store:
        for round in range(rounds):
            store.put_many(images, labels + round * batch)
            print("committed", len(store), flush=True)
    """
)

_READER = textwrap.dedent(
    """
    import os, sys
    import imgstore
    path, stop = sys.argv[1], sys.argv[2]
    opened, errors = 0, []
    while not os.path.exists(stop):
        try:
            with imgstore.open_store(path) as store:
                if len(store):
                    store.get(len(store) - 1)
            opened += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print("opened", opened)
    for error in errors:
        print("error", error)
    """
)


def _python(script: str, *args: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def test_readers_opening_views_beside_a_flushing_writer_never_touch_its_files(tmp_path: Path) -> None:
    path, stop = tmp_path / "store", tmp_path / "stop"
    first = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    with imgstore.open_store(path, "leveldb", "w") as store:
        store.put_many(first, np.arange(10))
    readers = [_python(_READER, path, stop) for _ in range(2)]
    try:
        time.sleep(1.0)  # the readers are opening views when the writer starts
        writer = _python(_WRITER, path, _ROUNDS, _BATCH)
        try:
            written, _ = writer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            writer.kill()
            written, _ = writer.communicate()
            pytest.fail(f"the writer hangs:\n{written}")
    finally:
        stop.touch()
        reports = [reader.communicate(timeout=60)[0] for reader in readers]
    assert writer.returncode == 0, f"the writer failed ({writer.returncode}):\n{written[-3000:]}"
    assert written.count("committed") == _ROUNDS
    for report in reports:
        assert "error" not in report, report[-3000:]
        assert int(report.split()[1]) > 0  # the reader opened views during the writes
    images = np.random.default_rng(0).integers(0, 256, (_BATCH, 32, 32, 3), dtype=np.uint8)
    with imgstore.open_store(path) as store:
        assert len(store) == 10 + _ROUNDS * _BATCH
        store.verify()
        got, labels = store.get_many(range(len(store)))
        np.testing.assert_array_equal(got[:10], first)
        np.testing.assert_array_equal(labels, np.concatenate([np.arange(10), np.arange(_ROUNDS * _BATCH)]))
        for round in range(_ROUNDS):
            np.testing.assert_array_equal(got[10 + round * _BATCH : 10 + (round + 1) * _BATCH], images)
