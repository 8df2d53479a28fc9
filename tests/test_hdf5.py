"""HDF5 backend: no moment a writer can be killed at leaves a store that cannot be opened, handles in
forked children and beside readers of the same process, and creating stores on a full disk.

HDF5 marks a file "open for write" in its superblock while a writer has it, and refuses to open a
file with that mark in most ways; the kill loops below SIGKILL a writer at random moments while it
opens a store for appending and while it makes its first write, and then require the store to open
for reading and for appending, pass ``verify()`` and hold every acknowledged record.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import imgstore
from imgstore.manifest import Manifest, read_manifest
from imgstore.testing import check_store_content, small_tmpfs

SHAPE = (16, 16, 3)
COMMITTED = 1000  # records of the store that the "open for appending" kill loop reopens
FIRST_SIZES = [700, 1, 3, 300, 50, 400, 1, 2000, 50, 3]  # put_many sizes of the first-write kill loop

FORK = multiprocessing.get_context("fork")


def records(count: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8), (np.arange(count) * 7919 % 1000).astype(np.int64)


def h5_file(path: Path) -> Path:
    (name,) = [name for name in read_manifest(path).files if name.endswith(".h5")]
    return path / name


def status_flags(path: Path) -> int:
    """The "file consistency flags" byte of a version 2/3 superblock: 1 open for write, 4 for SWMR write."""
    with open(h5_file(path), "rb") as f:
        return f.read(12)[11]


def file_digest(path: Path) -> str:
    return hashlib.sha256(h5_file(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------- kill loops


def _leave_open(path: str) -> None:
    """A writer that dies with the store open (its HDF5 file keeps the writer's mark)."""
    store = imgstore.open_store(path, "hdf5", "a")  # bound: a dropped handle would close itself
    os._exit(0 if store.writable else 1)


def _open_for_appending_again_and_again(path: str, conn: Connection) -> None:
    conn.send(("started", time.monotonic()))
    while True:
        imgstore.open_store(path, "hdf5", "a").close()
        conn.send(("opened", time.monotonic()))


def _first_writes(path: str, conn: Connection) -> None:
    images, labels = records(sum(FIRST_SIZES))
    conn.send(("started", time.monotonic()))
    with imgstore.open_store(path, "hdf5", "a") as store:
        start = len(store)
        for size in FIRST_SIZES:
            store.put_many(images[start : start + size], labels[start : start + size])
            start += size
            conn.send(("ack", start))
    conn.send(("done", start))


def run_child(target: Callable[..., None], path: Path, delay: float | None) -> tuple[int, float]:
    """Run ``target(path, conn)``; kill it ``delay`` s after it started (None: let it finish).

    Returns the last count it acknowledged and how long after starting it sent its first report.
    """
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=target, args=(str(path), send))
    child.start()
    send.close()
    kind, started = receive.recv()
    assert kind == "started"
    acknowledged, first = 0, 0.0
    deadline = None if delay is None else started + delay
    while True:
        timeout = 30.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not receive.poll(timeout):
            break
        kind, value = receive.recv()
        if kind == "ack":
            acknowledged = value
        if not first:
            first = (value if kind == "opened" else time.monotonic()) - started
        if kind == "done" or (kind == "opened" and deadline is None):
            break
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    while receive.poll():  # acknowledgements sent before the kill landed
        try:
            kind, value = receive.recv()
        except EOFError:
            break
        if kind == "ack":
            acknowledged = value
    receive.close()
    return acknowledged, first


def leave_open(path: Path) -> None:
    child = FORK.Process(target=_leave_open, args=(str(path),))
    child.start()
    child.join(30)
    assert child.exitcode == 0


def check_after_kill(path: Path, acknowledged: int, allowed: set[int]) -> None:
    images, labels = records(max(allowed))
    with imgstore.open_store(path) as store:  # mode "r" first: it must not need a writer's repair
        store.verify()
        count = len(store)
        assert count >= acknowledged, f"lost acknowledged records: {count} < {acknowledged}"
        assert count in allowed, f"a partial commit is visible: {count} images"
        check_store_content(store, images[:count], labels[:count])
    with imgstore.open_store(path, "hdf5", "a") as store:
        store.verify()
        assert len(store) == count
    with imgstore.open_store(path) as store:
        store.verify()
        assert len(store) == count


def kill_while_opening_for_append(tmp_path: Path, kills: int, seed: int) -> None:
    """SIGKILL during ``open_store(p, "hdf5", "a")`` of a store of 1 000 records, half of the time
    right after a writer died with it open (so that the open repairs the file when it is killed)."""
    rng = random.Random(seed)
    path = tmp_path / "store"
    images, labels = records(COMMITTED)
    with imgstore.open_store(path, "hdf5", "w") as store:
        store.put_many(images, labels)
    leave_open(path)
    _, repair = run_child(_open_for_appending_again_and_again, path, None)
    _, plain = run_child(_open_for_appending_again_and_again, path, None)
    for kill in range(kills):
        died = kill % 2 == 0
        if died:
            leave_open(path)
        delay = rng.uniform(0.0, 1.5 * (repair if died else plain) + 0.002)
        run_child(_open_for_appending_again_and_again, path, delay)
        try:
            check_after_kill(path, COMMITTED, {COMMITTED})
        except Exception as exc:
            raise AssertionError(
                f"after kill {kill + 1} of {kills} ({delay * 1e3:.1f} ms, writer died before: {died}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def kill_during_first_writes(tmp_path: Path, kills: int, seed: int, shape: tuple[int, ...] | str) -> None:
    """SIGKILL during the first ``put_many`` calls on a new, empty store (created with or without ``shape=``)."""
    rng = random.Random(seed)
    path = tmp_path / "store"
    allowed = {0}
    for size in FIRST_SIZES:
        allowed.add(max(allowed) + size)
    imgstore.open_store(path, "hdf5", "w", shape=shape).close()
    acknowledged, first = run_child(_first_writes, path, None)
    assert acknowledged == max(allowed)
    for kill in range(kills):
        imgstore.open_store(path, "hdf5", "w", shape=shape).close()
        delay = rng.uniform(0.0, 1.5 * first + 0.002)
        acknowledged, _ = run_child(_first_writes, path, delay)
        try:
            check_after_kill(path, acknowledged, allowed)
        except Exception as exc:
            raise AssertionError(
                f"after kill {kill + 1} of {kills} ({delay * 1e3:.1f} ms, "
                f"{acknowledged} acknowledged): {type(exc).__name__}: {exc}"
            ) from exc


def test_killed_while_opening_for_append(tmp_path: Path) -> None:
    kill_while_opening_for_append(tmp_path, kills=20, seed=1)


def test_killed_during_the_first_writes_of_a_new_store(tmp_path: Path) -> None:
    kill_during_first_writes(tmp_path, kills=20, seed=2, shape="auto")


def test_killed_during_the_first_writes_of_a_store_created_with_a_shape(tmp_path: Path) -> None:
    kill_during_first_writes(tmp_path, kills=20, seed=3, shape=SHAPE)


@pytest.mark.slow
def test_killed_while_opening_for_append_200_times(tmp_path: Path) -> None:
    kill_while_opening_for_append(tmp_path, kills=200, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["auto", SHAPE])
def test_killed_during_the_first_writes_200_times(tmp_path: Path, shape: tuple[int, ...] | str) -> None:
    kill_during_first_writes(tmp_path, kills=200, seed=12, shape=shape)


# ---------------------------------------------------------------------- a writer mark without SWMR


def _open_without_swmr_and_die(file: str) -> None:
    handle = h5py.File(file, "a", libver="latest", locking=False)  # as imgstore did before SWMR mode
    os._exit(0 if handle else 1)  # killed with the file open


@pytest.mark.parametrize(("count", "shape"), [(300, "auto"), (0, "auto"), (0, SHAPE)])
def test_store_with_a_plain_writer_mark_opens_and_is_repaired(
    tmp_path: Path, count: int, shape: tuple[int, ...] | str
) -> None:
    """A writer killed while it had the file open without SWMR (as earlier versions did when opening
    and before the first write) leaves a mark that neither an HDF5 reader nor writer accepts."""
    path = tmp_path / "store"
    images, labels = records(count + 20)
    with imgstore.open_store(path, "hdf5", "w", shape=shape) as store:
        store.put_many(images[:count], labels[:count])
    child = FORK.Process(target=_open_without_swmr_and_die, args=(str(h5_file(path)),))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert status_flags(path) == 1, "the test did not make the plain 'open for write' mark"
    with imgstore.open_store(path) as store:
        store.verify()
        check_store_content(store, images[:count], labels[:count])
    with imgstore.open_store(path, mode="a") as store:
        store.verify()
        store.put_many(images[count:], labels[count:])
    with imgstore.open_store(path) as store:
        store.verify()
        check_store_content(store, images, labels)


# ---------------------------------------------------------------------- handles in one process, and forked children


def test_writer_beside_a_reader_of_the_same_process(tmp_path: Path) -> None:
    path = tmp_path / "store"
    images, labels = records(30)
    with imgstore.open_store(path, "hdf5", "w") as store:
        store.put_many(images[:10], labels[:10])
    with imgstore.open_store(path) as reader:
        reader.get(3)
        with pytest.raises(imgstore.StoreBusyError, match="read"):
            imgstore.open_store(path, mode="a")
        check_store_content(reader, images[:10], labels[:10])  # the reader is unharmed
    with imgstore.open_store(path, mode="a") as writer:  # once the reader is closed
        writer.put_many(images[10:20], labels[10:20])
        with imgstore.open_store(path) as reader:  # a reader beside a writer is fine
            check_store_content(reader, images[:20], labels[:20])
            writer.put_many(images[20:], labels[20:])
            assert reader.refresh() == 30
            check_store_content(reader, images, labels)
    with imgstore.open_store(path) as store:
        store.verify()


@pytest.mark.parametrize("mode", ["r", "a"])
def test_h5py_open_in_the_same_process_is_busy_not_damage(tmp_path: Path, mode: str) -> None:
    """h5py's default (locking) open of the store's file makes HDF5 refuse imgstore's (no locking):
    nothing is damaged, so the error says busy and how to get out of it."""
    path = tmp_path / "store"
    images, labels = records(10)
    with imgstore.open_store(path, "hdf5", "w") as store:
        store.put_many(images, labels)
    (file,) = path.glob("images-*.h5")
    with h5py.File(file, "r"):
        with pytest.raises(imgstore.StoreBusyError, match="this process.*locking=False") as caught:
            imgstore.open_store(path, mode=mode)
        assert not isinstance(caught.value, imgstore.CorruptStoreError)
    with h5py.File(file, "r", locking=False) as f:  # the way out the message gives
        with imgstore.open_store(path) as store:
            check_store_content(store, images, labels)
            assert f["images"].shape[0] == len(images)
    with imgstore.open_store(path, mode=mode) as store:  # once h5py let go
        store.verify()
        check_store_content(store, images, labels)


@pytest.mark.parametrize("shape", ["auto", SHAPE])
def test_reader_of_the_same_process_opened_after_the_writer_made_its_file(
    tmp_path: Path, shape: tuple[int, ...] | str
) -> None:
    """The writer's new files (at creation, at the first write) are its own from the start: a reader
    opened after them shares them and does not keep the writer out."""
    path = tmp_path / "store"
    images, labels = records(30)
    with imgstore.open_store(path, "hdf5", "w", shape=shape) as writer:
        with imgstore.open_store(path) as reader:
            writer.put_many(images[:10], labels[:10])  # the first write
            assert reader.refresh() == 10
            check_store_content(reader, images[:10], labels[:10])
        with imgstore.open_store(path) as reader:
            writer.put_many(images[10:], labels[10:])
            assert reader.refresh() == 30
            check_store_content(reader, images, labels)
    with imgstore.open_store(path) as store:
        store.verify()
        check_store_content(store, images, labels)


def _use_writer_in_child(store: imgstore.Store, conn: Connection) -> None:
    try:
        report: dict[str, Any] = {"len": len(store)}
        if len(store):
            report["first"] = store.get_many(range(len(store)))[0].tobytes()
        conn.send(report)
        conn.recv()  # the parent appended meanwhile
        count = store.refresh()
        images, labels = store.get_many(range(count))
        report = {"count": count, "images": images.tobytes(), "labels": labels.tolist()}
        try:
            store.put_many(images[:2], labels[:2])
            report["write"] = "written"
        except imgstore.ImgStoreError as exc:
            report["write"] = type(exc).__name__
        store.close()
        conn.send(report)
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


@pytest.mark.parametrize("before", [0, 25])
def test_writer_handle_in_a_forked_child_reads_and_refuses_writes(tmp_path: Path, before: int) -> None:
    """``before`` = 0: the parent's first write makes the HDF5 datasets after the child started."""
    path = tmp_path / "store"
    images, labels = records(before + 40)
    writer = imgstore.open_store(path, "hdf5", "w")
    if before:
        writer.put_many(images[:before], labels[:before])
        writer.get_many(range(before))
    mine, theirs = FORK.Pipe()
    child = FORK.Process(target=_use_writer_in_child, args=(writer, theirs))
    child.start()
    first = mine.recv()
    assert "error" not in first, first["error"]
    assert first["len"] == before
    writer.put_many(images[before : before + 20], labels[before : before + 20])
    mine.send("go")
    report = mine.recv()
    child.join(30)
    assert "error" not in report, report["error"]
    assert report["write"] == "StoreBusyError"
    assert report["count"] == before + 20
    assert report["images"] == images[: before + 20].tobytes()
    assert report["labels"] == labels[: before + 20].tolist()
    writer.put_many(images[before + 20 :], labels[before + 20 :])  # the parent's handle goes on
    writer.close()
    with imgstore.open_store(path) as store:
        store.verify()
        check_store_content(store, images, labels)


def _read_close_and_drop(store: imgstore.Store, conn: Connection) -> None:
    try:
        store.get_many(range(len(store)))
        store.refresh()
        store.close()
        del store
        gc.collect()
        conn.send("ok")
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("mode", ["a", "r"])
def test_forked_child_never_writes_to_the_parents_file(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "store"
    images, labels = records(50)
    with imgstore.open_store(path, "hdf5", "w") as store:
        store.put_many(images, labels)
    store = imgstore.open_store(path, mode=mode)
    store.get(7)
    before = file_digest(path)
    mine, theirs = FORK.Pipe()
    child = FORK.Process(target=_read_close_and_drop, args=(store, theirs))
    child.start()
    assert mine.recv() == "ok"
    child.join(30)
    assert file_digest(path) == before, "the child changed the HDF5 file the parent has open"
    if mode == "a":
        store.put(images[0], labels[0])
    store.close()
    with imgstore.open_store(path) as reopened:
        reopened.verify()
        assert len(reopened) == 50 + (mode == "a")


# ---------------------------------------------------------------------- full disk


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs."""
    with small_tmpfs(tmp_path / "small", "4m") as mount_point:
        yield mount_point


def fill(filesystem: Path, leave_bytes: int) -> Path:
    filler = filesystem / "filler"
    stat = os.statvfs(filesystem)
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def only_owned_entries(path: Path) -> None:
    try:
        manifest = read_manifest(path)
    except imgstore.StoreNotFoundError:
        manifest = Manifest("", None)
    stray = sorted(entry.name for entry in path.iterdir() if not manifest.owns(entry.name))
    assert not stray, f"entries the manifest does not name: {stray}"


@pytest.mark.parametrize("shape", ["auto", SHAPE])
def test_creating_on_a_full_disk_is_a_clean_store_full_error(small_filesystem: Path, shape: Any) -> None:
    images, labels = records(1200)
    path = small_filesystem / "store"
    outcomes = set()
    for pages in [*range(0, 10), 12, 16, 24, 32, 64, 128, 256, 300, 340, 400]:  # of 4 KiB left free
        for entry in small_filesystem.iterdir():
            subprocess.run(["rm", "-rf", str(entry)], check=True)
        filler = fill(small_filesystem, pages * 4096)
        try:
            with imgstore.open_store(path, "hdf5", "w", shape=shape) as store:
                outcomes.add("created")
                try:
                    store.put_many(images[:100], labels[:100])  # the first write: HDF5 datasets, the first chunks
                    outcomes.add("written")
                except imgstore.StoreFullError:
                    outcomes.add("first write full")
                    assert len(store) == 0
        except imgstore.StoreFullError:
            outcomes.add("creation full")
        if path.exists():
            only_owned_entries(path)
        filler.unlink()
        with imgstore.open_store(path, "hdf5", "w", shape=shape) as store:  # with space again, "w" works
            store.put_many(images, labels)
        with imgstore.open_store(path) as store:
            store.verify()
            check_store_content(store, images, labels)
    assert {"creation full", "written"} <= outcomes, outcomes
