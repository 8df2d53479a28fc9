"""Write failures: an injected failure at every write-level step, a real full file system, a file size limit.

After every failure the store must reopen valid (``verify()`` passes) holding exactly the old or the
new state, and the error must be one of imgstore's own (``StoreFullError`` for a full disk).
"""

from __future__ import annotations

import builtins
import errno
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.testing import check_store_content, random_images

BACKENDS = imgstore.available_backends()
OLD, NEW = 20, 30


class FaultInjector:
    """Fails the N-th write-level call imgstore makes through Python (the SQLite way of testing I/O errors)."""

    WRITE_MODES = ("w", "a", "+", "x")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls = 0
        self.fail_at = 0
        for name in ("fsync", "replace", "pwrite", "ftruncate", "posix_fallocate", "write"):
            self._wrap(os, name)
        original_open = builtins.open

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(flag in mode for flag in self.WRITE_MODES):
                self._tick(f"open({file!r}, {mode!r})")
            return original_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)

    def _wrap(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._tick(name)
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, name, wrapper)

    def _tick(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, f"injected failure of {what}")

    def arm(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def disarm(self) -> None:
        self.fail_at = 0


def check_old_or_new(path: Path, images: np.ndarray, labels: np.ndarray) -> int:
    with imgstore.open_store(path) as store:
        store.verify()
        count = len(store)
        assert count in (OLD, OLD + NEW), f"neither the old nor the new state: {count} images"
        check_store_content(store, images[:count], labels[:count])
        return count


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_injected_write_failure_leaves_old_or_new_state(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = random_images(OLD + NEW + 5)
    base = tmp_path / "base"
    with imgstore.open_store(base, backend, "w") as store:
        store.put_many(images[:OLD], labels[:OLD])
    injector = FaultInjector(monkeypatch)
    failures = 0
    for fail_at in range(1, 500):
        path = tmp_path / f"try{fail_at}"
        shutil.copytree(base, path)
        store = imgstore.open_store(path, mode="a")
        injector.arm(fail_at)
        try:
            store.put_many(images[OLD : OLD + NEW], labels[OLD : OLD + NEW])
            succeeded = True
        except imgstore.ImgStoreError as exc:
            assert isinstance(exc, imgstore.StoreFullError), repr(exc)
            succeeded = False
            failures += 1
        finally:
            injector.disarm()
        if not succeeded:  # the same handle can go on: the failed write left nothing visible
            assert len(store) == OLD
        store.close()
        count = check_old_or_new(path, images, labels)
        if succeeded:
            assert count == OLD + NEW
            break
        with imgstore.open_store(path, mode="a") as store:  # and the store takes new writes
            store.put_many(images[count : count + 5], labels[count : count + 5])
        with imgstore.open_store(path) as store:
            store.verify()
            check_store_content(store, images[: count + 5], labels[: count + 5])
        shutil.rmtree(path)
    else:
        pytest.fail("put_many never succeeded")
    print(f"{backend}: put_many failed at {failures} injected points, each leaving a valid store")
    assert failures >= 3, f"only {failures} write-level steps were exercised"


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, so LMDB's and HDF5's own C-level writes meet a full disk."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE test covers C-level writes")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_is_a_clean_store_full_error(small_filesystem: Path, backend: str) -> None:
    images, labels = random_images(200)
    path = small_filesystem / backend
    committed = 0
    with imgstore.open_store(path, backend, "w") as store:
        with pytest.raises(imgstore.StoreFullError):
            for _ in range(1000):
                store.put_many(images[:100], labels[:100])
                committed += 100
        assert len(store) == committed
        with pytest.raises(imgstore.StoreFullError):
            for _ in range(1000):  # single puts until it is really full
                store.put(images[0], labels[0])
                committed += 1
    assert committed > 0
    with imgstore.open_store(path) as store:
        store.verify()
        assert len(store) == committed


def _write_under_file_size_limit(path: str, backend: str, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    images, labels = random_images(400)
    with imgstore.open_store(path, mode="a") as store:
        try:
            for _ in range(100):
                store.put_many(images, labels)
        except imgstore.StoreFullError:
            os._exit(0)
    os._exit(3)  # the limit was never hit


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_limit_in_a_subprocess(tmp_path: Path, backend: str) -> None:
    images, labels = random_images(50)
    path = tmp_path / backend
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, labels)
    largest = max(p.stat().st_size for p in path.rglob("*") if p.is_file())
    writer = multiprocessing.get_context("fork").Process(
        target=_write_under_file_size_limit, args=(str(path), backend, largest + (64 << 10))
    )
    writer.start()
    writer.join(120)
    assert writer.exitcode == 0, f"the writer did not end with a StoreFullError (exit code {writer.exitcode})"
    with imgstore.open_store(path) as store:
        store.verify()
        assert len(store) >= 50 and (len(store) - 50) % 400 == 0
        check_store_content(store, *_expected(len(store), images, labels))


def _expected(count: int, first: np.ndarray, first_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    more, more_labels = random_images(400)
    reps = (count - 50) // 400
    return (
        np.concatenate([first] + [more] * reps),
        np.concatenate([first_labels] + [more_labels] * reps),
    )
