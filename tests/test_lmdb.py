"""LMDB backend: forking while other threads read, and a full disk (SIGBUS) when opening.

Each scenario runs in a fresh interpreter, so that a SIGSEGV or a SIGBUS is a failed test with its
signal in the message rather than the end of the test run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import imgstore
from imgstore.testing import random_images, small_tmpfs

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``script`` in a new interpreter; its last line of output is its JSON result."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the scenario hung (no result in {timeout} s)\n{exc.stdout!r}\n{exc.stderr!r}")
    if result.returncode:
        died = f" (killed by {signal.Signals(-result.returncode).name})" if result.returncode < 0 else ""
        pytest.fail(
            f"the scenario exited with {result.returncode}{died}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- fork while threads read

_FORK_WHILE_READING = """
import json, multiprocessing, os, sys, threading, time, traceback
import numpy as np
import imgstore
from imgstore.testing import random_images

path, seconds = sys.argv[1], float(sys.argv[2])
N = 2000
images, labels = random_images(N, (8, 8, 3), seed=5)
with imgstore.open_store(path, "lmdb", "w", block_bytes=4096) as writer:  # 20 records a block: many keys
    writer.put_many(images, labels)


def check_everything(store):
    got, got_labels = store.get_many(range(N))
    image, label = store.get(N - 1)
    shuffled = np.random.default_rng(os.getpid()).permutation(N)[:300]
    some, some_labels = store.get_many(shuffled)
    return bool(
        np.array_equal(got, images) and np.array_equal(got_labels, labels)
        and np.array_equal(image, images[N - 1]) and label == labels[N - 1]
        and np.array_equal(some, images[shuffled]) and np.array_equal(some_labels, labels[shuffled])
    )


def child_reads(store):
    # Both the inherited handle (it reopens itself) and a new one, as a DataLoader worker may.
    try:
        with imgstore.open_store(path) as other:
            ok = check_everything(store) and check_everything(other)
        return 0 if ok else 1
    except BaseException:
        traceback.print_exc()
        return 2


def mp_child(store):
    sys.exit(child_reads(store))


def main():
    store = imgstore.open_store(path)
    store.get(0)
    # A transaction this process holds across every fork: no child may release its reader slot.
    held = store._env.begin()
    held_value = bytes(held.get((0).to_bytes(8, "big")))
    errors, reads, stop = [], [0], threading.Event()

    def reader():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            try:
                i = int(rng.integers(N))
                image, label = store.get(i)
                idx = rng.integers(0, N, 64)
                batch, batch_labels = store.get_many(idx)
                lo = int(rng.integers(0, N - 100))
                scan, scan_labels = store.get_many(range(lo, lo + 100))
                if not (np.array_equal(image, images[i]) and label == labels[i]
                        and np.array_equal(batch, images[idx]) and np.array_equal(batch_labels, labels[idx])
                        and np.array_equal(scan, images[lo:lo + 100])):
                    errors.append(f"wrong data read at {i}")
                reads[0] += 1
            except Exception as exc:
                if len(errors) < 5:
                    errors.append(traceback.format_exc())
                else:
                    errors.append(repr(exc))
                if len(errors) > 1000:
                    return

    thread = threading.Thread(target=reader)
    thread.start()
    fork = multiprocessing.get_context("fork")
    forks, failed, start = 0, [], time.monotonic()
    # At least 20 forks however loaded the machine is (a busy one forks slowly), within a minute.
    while (time.monotonic() - start < seconds or forks < 20) and forks < 5000 and time.monotonic() - start < 60:
        # The first half with a tiny switch interval: threads switch in the middle of every read.
        sys.setswitchinterval(1e-6 if time.monotonic() - start < seconds / 2 else 0.005)
        kind = forks % 3
        if kind == 2:
            process = fork.Process(target=mp_child, args=(store,))
            process.start()
            process.join(60)
            code = process.exitcode
        else:
            pid = os.fork()
            if pid == 0:
                code = child_reads(store)
                if kind == 0:
                    os._exit(code)
                return "child", code  # the child ends through the interpreter's normal exit
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        forks += 1
        if code != 0:
            failed.append((kind, code))
    sys.setswitchinterval(0.005)
    stop.set()
    thread.join(60)
    try:
        slot_kept = any(
            line.split()[0] == str(os.getpid()) and line.split()[-1] == str(held.id())
            for line in store._env.readers().splitlines()[1:]
        )
    except Exception:
        slot_kept = False
    try:
        held_reads = bytes(held.get((0).to_bytes(8, "big"))) == held_value
        held.abort()
    except Exception:
        held_reads = False
    return "parent", dict(forks=forks, failed=failed, reads=reads[0], errors=errors[:5], error_count=len(errors),
                          slot_kept=slot_kept, held_reads=held_reads)


role, result = main()
if role == "child":
    sys.exit(result)
print(json.dumps(result))
"""


def test_threads_keep_reading_while_another_thread_forks(tmp_path: Path) -> None:
    """A fork must not close the environments other threads read through (SIGSEGV, false CorruptStoreError),
    and a child must neither use nor close what it inherited (the parent's reader slots are in the shared lock file)."""
    result = _run(_FORK_WHILE_READING, str(tmp_path / "s"), "5")
    assert result["error_count"] == 0, result["errors"]
    assert result["failed"] == [], f"children failed (kind, exit code): {result['failed']}"
    assert result["forks"] >= 20 and result["reads"] >= 20, result
    assert result["held_reads"], "a transaction the parent held across the forks stopped working"
    assert result["slot_kept"], "a child released the reader slot of a transaction the parent still holds"


_DATALOADER_WHILE_READING = """
import json, sys, threading, traceback
import numpy as np
import imgstore
from imgstore.testing import random_images
from imgstore.torch import StoreDataset
from torch.utils.data import DataLoader

path = sys.argv[1]
N = 500
images, labels = random_images(N, (8, 8, 3), seed=6)
with imgstore.open_store(path, "lmdb", "w", block_bytes=4096) as writer:
    writer.put_many(images, labels)
dataset = StoreDataset(path, output="numpy")
store = imgstore.open_store(path)
errors, stop = [], threading.Event()


def reader():  # e.g. an evaluation thread of the training loop
    rng = np.random.default_rng(2)
    while not stop.is_set():
        try:
            idx = rng.integers(0, N, 32)
            batch, batch_labels = store.get_many(idx)
            dataset[int(idx[0])]
            if not (np.array_equal(batch, images[idx]) and np.array_equal(batch_labels, labels[idx])):
                errors.append("wrong data")
        except Exception:
            errors.append(traceback.format_exc())
            return


sys.setswitchinterval(1e-5)
thread = threading.Thread(target=reader)
thread.start()
epochs = []
for epoch in range(4):  # new workers, forked while the thread reads, every epoch
    loader = DataLoader(dataset, batch_size=25, shuffle=True, num_workers=2, multiprocessing_context="fork")
    seen = {}
    for batch, batch_labels in loader:
        for image, label in zip(batch.numpy(), batch_labels.tolist()):
            seen[image.tobytes()] = label
    expected = zip(images, labels.tolist())
    epochs.append(len(seen) == N and all(seen[image.tobytes()] == label for image, label in expected))
sys.setswitchinterval(0.005)
stop.set()
thread.join(60)
print(json.dumps(dict(epochs=epochs, errors=errors[:3])))
"""


def test_dataloader_started_while_a_thread_reads(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    result = _run(_DATALOADER_WHILE_READING, str(tmp_path / "s"))
    assert result["errors"] == []
    assert result["epochs"] == [True] * 4


# ---------------------------------------------------------------------- a full disk


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs: LMDB's own writes, and its writes through mappings, meet a full disk."""
    with small_tmpfs(tmp_path / "small", "2m") as mount_point:
        yield mount_point


_FILL = """
import errno, os


def fill(directory, leave):
    # A plain file takes all but ``leave`` bytes of the file system (all of it for 0).
    stat = os.statvfs(directory)
    todo = stat.f_bavail * stat.f_frsize - leave
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while todo > 0 or leave == 0:
                todo -= f.write(b"x" * min(todo, 1 << 16) if todo > 0 else b"x" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and leave == 0, exc


def unfill(directory):
    os.remove(os.path.join(directory, "filler"))
"""

_CREATE_ON_FULL_DISK = (
    _FILL
    + """
import json, shutil, sys
import imgstore
from imgstore.testing import random_images

root = sys.argv[1]
images, labels = random_images(100, (8, 8, 3))
outcomes = {}
for leave in (0, 4096, 8192, 12288, 16384, 24576, 32768, 40960, 49152, 65536, 98304, 131072):
    fill(root, leave)
    path = os.path.join(root, "s")
    try:
        with imgstore.open_store(path, "lmdb", "w") as store:
            outcomes[leave] = "opened"
            for _ in range(100):
                store.put_many(images, labels)
    except imgstore.StoreFullError:
        outcomes[leave] = outcomes.get(leave, "") + "StoreFullError"
    unfill(root)
    # With room again, the same directory takes a new store, and the store takes writes.
    with imgstore.open_store(path, "lmdb", "w") as store:
        store.put_many(images, labels)
        store.put_many(images, labels)
    with imgstore.open_store(path) as store:
        store.verify()
        assert len(store) == 200
    shutil.rmtree(path)
print(json.dumps(outcomes))
"""
)


def test_creating_a_store_on_a_full_disk_is_a_store_full_error(small_filesystem: Path) -> None:
    outcomes = _run(_CREATE_ON_FULL_DISK, str(small_filesystem))
    # Every attempt ends in StoreFullError: at open_store, or (when it could open) at a write.
    assert set(outcomes.values()) <= {"StoreFullError", "openedStoreFullError"}, outcomes
    assert list(outcomes.values()).count("StoreFullError") >= 3, outcomes


_OPEN_ON_FULL_DISK = (
    _FILL
    + """
import json, sys
import numpy as np
import imgstore
from imgstore.testing import random_images

root = sys.argv[1]
path = os.path.join(root, "s")
images, labels = random_images(300, (8, 8, 3))
with imgstore.open_store(path, "lmdb", "w") as store:
    store.put_many(images, labels)
lmdb_dir = next(p for p in os.listdir(path) if p.startswith("lmdb"))
lock = os.path.join(path, lmdb_dir, "lock.mdb")
outcomes = {}


def many_readers(store):
    # Read transactions held at once take reader slots on every page of the lock file.
    store.get(0)
    txns = [store._env.begin() for _ in range(300)]
    assert all(bytes(t.get((0).to_bytes(8, "big")) or b"") for t in txns)
    for t in txns:
        t.abort()
    got, got_labels = store.get_many(range(300))
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)


def attempt(name, mode):
    try:
        with imgstore.open_store(path, mode=mode) as store:
            many_readers(store)
            if mode == "a":
                try:
                    store.put_many(images[:50], labels[:50])
                    outcomes[name] = "wrote"
                    return
                except imgstore.StoreFullError:
                    many_readers(store)  # the failed write left the store readable
            outcomes[name] = "read"
    except imgstore.StoreFullError:
        outcomes[name] = "StoreFullError"


fill(root, 0)
attempt("r", "r")
attempt("a", "a")
unfill(root)
# A lock file as LMDB makes it (ftruncate: a file of holes), and none at all.
os.remove(lock)
with open(lock, "wb") as f:
    f.truncate(32896)
fill(root, 0)
attempt("r sparse lock", "r")
attempt("a sparse lock", "a")
unfill(root)
os.remove(lock)
fill(root, 0)
attempt("r no lock", "r")
unfill(root)
attempt("r with room", "r")
attempt("a with room", "a")
print(json.dumps(outcomes))
"""
)


def test_opening_a_store_on_a_full_disk(small_filesystem: Path) -> None:
    """Reading and appending on a full disk work, or fail with StoreFullError; never SIGBUS."""
    outcomes = _run(_OPEN_ON_FULL_DISK, str(small_filesystem))
    assert outcomes == {
        "r": "read",
        "a": "read",  # the write raised StoreFullError
        "r sparse lock": "StoreFullError",
        "a sparse lock": "StoreFullError",
        "r no lock": "StoreFullError",
        "r with room": "read",
        "a with room": "wrote",
    }


def test_lock_file_has_its_blocks(tmp_path: Path) -> None:
    """The lock file a new store gets is backed by disk blocks, not a hole LMDB writes into through its map."""
    with imgstore.open_store(tmp_path / "s", "lmdb", "w") as store:
        lock = store.file("lmdb") / "lock.mdb"
        stat = lock.stat()
        assert stat.st_blocks * 512 >= stat.st_size


# ---------------------------------------------------------------------- threads while another process grows the store


def _append_many(path: str) -> None:
    images, labels = random_images(50, (128, 128, 3))
    with imgstore.open_store(path, mode="a", sync=False) as store:
        for _ in range(40):  # ~100 MB: past a map size that would have to grow
            store.put_many(images, labels)


def test_reading_threads_while_another_process_grows_the_store(tmp_path: Path) -> None:
    """Growing the map cancels every transaction of the environment: it must practically never be needed."""
    import multiprocessing
    import threading

    import numpy as np

    images, labels = random_images(50, (128, 128, 3))
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w", sync=False) as store:
        store.put_many(images, labels)
    errors: list[str] = []
    stop = threading.Event()
    with imgstore.open_store(path) as reader:

        def read() -> None:
            while not stop.is_set():
                try:
                    image, label = reader.get(7)
                    batch, batch_labels = reader.get_many(range(50))
                    assert np.array_equal(image, images[7]) and np.array_equal(batch, images)
                except Exception as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(repr(exc)[:200])

        threads = [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        writer = multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(path),))
        writer.start()
        writer.join(120)
        stop.set()
        for thread in threads:
            thread.join()
    assert writer.exitcode == 0
    assert not errors, f"{len(errors)} failed reads, e.g. {errors[:3]}"


# ---------------------------------------------------------------------- py-lmdb beside a handle in one process


@pytest.mark.parametrize("mode", ["r", "a"])
def test_py_lmdb_open_in_the_same_process_is_busy_not_damage(tmp_path: Path, mode: str) -> None:
    """py-lmdb opens an environment once per process: imgstore's open beside it is busy, not damage."""
    import lmdb

    path = tmp_path / "store"
    images, labels = random_images(10, (8, 8, 3))
    with imgstore.open_store(path, "lmdb", "w") as store:
        store.put_many(images, labels)
    (env_dir,) = path.glob("lmdb-*")
    env = lmdb.open(str(env_dir), readonly=True, lock=False)
    try:
        with pytest.raises(imgstore.StoreBusyError, match="(?i)this process.*close") as caught:
            imgstore.open_store(path, mode=mode)
        assert not isinstance(caught.value, imgstore.CorruptStoreError)
    finally:
        env.close()
    with imgstore.open_store(path, mode=mode) as store:  # once py-lmdb let go
        store.verify()
        assert store.get_many(range(10))[1].tolist() == labels.tolist()
