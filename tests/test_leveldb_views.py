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


def _small_store(path: Path) -> None:
    with imgstore.open_store(path, "leveldb", "w") as store:
        store.put_many(np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3) % 251, np.arange(4))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _outside(tmp_path: Path) -> Path:
    """A folder outside the store holding a user's file, in a folder named as a dead reader's view."""
    outside = tmp_path / "outside"
    folder = outside / f"{_dead_pid()}-beef"
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("user data")
    (outside / "precious.txt").write_text("user data")
    return outside


def _contents(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_views_folder_replaced_by_a_symbolic_link_is_refused_and_nothing_outside_is_touched(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    outside = _outside(tmp_path)
    before = _contents(outside)
    (views,) = path.glob("leveldb-views-*")
    views.rmdir()
    views.symlink_to(outside)
    with pytest.raises(imgstore.errors.CorruptStoreError, match="symbolic link"):
        imgstore.open_store(path)
    assert _contents(outside) == before  # no view made there, no "dead view" deleted there
    assert (outside / "precious.txt").read_text() == "user data"


def test_dead_views_are_removed_without_following_symbolic_links(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    outside = _outside(tmp_path)
    before = _contents(outside)
    (views,) = path.glob("leveldb-views-*")
    dead = views / f"{_dead_pid()}-0123ab"  # a killed reader's view, holding a link to a user's folder
    dead.mkdir()
    (dead / "000005.ldb").symlink_to(outside)
    (dead / "sub").symlink_to(outside)
    linked = views / f"{_dead_pid()}-4567cd"  # named as a dead view, but a link to a user's folder
    linked.symlink_to(outside / next(iter(outside.glob("*-beef"))).name)
    with imgstore.open_store(path) as store:
        assert store.get(3)[1] == 3
    assert not dead.exists()
    assert _contents(outside) == before
    assert sorted(p.name for p in views.iterdir()) == [linked.name]  # the link stays: not imgstore's


_READ_ONLY_READER = textwrap.dedent(
    """
    import errno, os, sys, time
    import imgstore
    from imgstore.backends import leveldb_view

    def read_only(source, views):  # read-only media: no view can be made in the store
        raise OSError(errno.EROFS, "Read-only file system")

    leveldb_view._linked = read_only
    store = imgstore.open_store(sys.argv[1])
    assert store.get(3)[1] == 3 and store._view.temporary
    print(os.getpid(), store._view.path, flush=True)
    if sys.argv[2] == "close":
        store.close()
    elif sys.argv[2] == "hang":
        time.sleep(60)
    # "exit": the interpreter exits with the store open
    """
)


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_temporary_copy_is_deleted_at_close_and_at_exit(tmp_path: Path, how: str) -> None:
    path, temp = tmp_path / "store", tmp_path / "tmp"
    _small_store(path)
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(_ROOT))
    run = subprocess.run(
        [sys.executable, "-c", _READ_ONLY_READER, str(path), how], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    copy = Path(run.stdout.split()[1])
    assert copy.parent == temp and copy.name.startswith(f"imgstore-leveldb-view-{run.stdout.split()[0]}-")
    assert list(temp.iterdir()) == []


def test_a_killed_readers_temporary_copy_is_deleted_by_the_next_reader(tmp_path: Path) -> None:
    path, temp = tmp_path / "store", tmp_path / "tmp"
    _small_store(path)
    temp.mkdir()
    outside = _outside(tmp_path)
    before = _contents(outside)
    decoy = temp / f"imgstore-leveldb-view-{_dead_pid()}-abc_12"  # a dead pid's name, but a link elsewhere
    decoy.symlink_to(outside)
    other = temp / f"imgstore-leveldb-view-{os.getpid()}-xyz"  # a live process's copy
    other.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(_ROOT))
    killed = subprocess.Popen(
        [sys.executable, "-c", _READ_ONLY_READER, str(path), "hang"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert killed.stdout is not None
    copy = Path(killed.stdout.readline().split()[1])
    killed.kill()
    killed.wait()
    assert copy.is_dir() and (copy / "CURRENT").exists()  # a kill runs no clean-up
    reader = [sys.executable, "-c", _READ_ONLY_READER, str(path), "close"]
    run = subprocess.run(reader, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert not copy.exists()
    assert sorted(p.name for p in temp.iterdir()) == sorted([decoy.name, other.name])
    assert _contents(outside) == before
