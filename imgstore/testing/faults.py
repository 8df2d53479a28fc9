"""``FaultTolerance``: an injected failure at every write-level step, a real full file system, a file size limit.

After every failure the store must reopen valid (``verify()`` passes) holding exactly the old or the
new state, and the error must be one of imgstore's own (``StoreFullError`` for a full disk). The
full-disk tests mount a small tmpfs, so they need root; without it they skip. Every test writes
the class's layout: in an encoded one the failures also hit the side files (shapes, source paths).
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
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import imgstore
from imgstore.manifest import read_manifest
from imgstore.testing.checks import BackendTest, check_images_equal, check_records, child_env, small_tmpfs
from imgstore.testing.layouts import Records

OLD, NEW = 20, 30
NEW_SCALED = 5  # encoded layouts: each record is a write step of its own in some backends (a PNG file)


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


def check_old_or_new(path: Path, records: Records) -> int:
    """The store at ``path`` holds ``records`` (OLD of them) or all of them; returns how many."""
    with imgstore.open_store(path) as store:
        store.verify()
        count = len(store)
        assert count in (OLD, len(records)), f"neither the old nor the new state: {count} images"
        check_records(store, records[:count])
        return count


def _write_under_file_size_limit(path: str, limit: int, records: Records) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    with imgstore.open_store(path, mode="a") as store:
        try:
            for _ in range(100):
                records.put(store)
        except imgstore.StoreFullError:
            os._exit(0)
    os._exit(3)  # the limit was never hit


def _fill_disk(mount_point: Path, leave: int) -> Path:
    filler = mount_point / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


class FaultTolerance(BackendTest):
    """Write failures: injected (every step in turn), a full tmpfs, RLIMIT_FSIZE."""

    def test_every_injected_write_failure_leaves_old_or_new_state(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        new = NEW_SCALED if self.scaled else NEW
        records = self.records(OLD + new)
        base = tmp_path / "base"
        with self.create(base) as store:
            records[:OLD].put(store)
        injector = FaultInjector(monkeypatch)
        failures = 0
        for fail_at in range(1, 500):
            path, failed = tmp_path / f"try{fail_at}", tmp_path / f"failed{fail_at}"
            shutil.copytree(base, path)
            store = imgstore.open_store(path, mode="a")
            injector.arm(fail_at)
            try:
                records[OLD:].put(store)
                succeeded = True
            except imgstore.ImgStoreError as exc:
                assert isinstance(exc, imgstore.StoreFullError), repr(exc)
                succeeded = False
                failures += 1
            finally:
                injector.disarm()
            if not succeeded:
                assert len(store) == OLD
                shutil.copytree(path, failed)  # the store as the failure left it
                records[OLD:].put(store)  # the same handle goes on, over what the failure left
            store.close()
            assert check_old_or_new(path, records) == OLD + new
            if succeeded:
                break
            count = check_old_or_new(failed, records)  # new: the failure came after the commit point
            with imgstore.open_store(failed, mode="a") as store:  # and a new handle writes too
                records[count : count + 5].put(store)
            with imgstore.open_store(failed) as store:
                store.verify()
                check_records(store, records[: count + 5])
            shutil.rmtree(path)
            shutil.rmtree(failed)
        else:
            pytest.fail("put_many never succeeded")
        print(f"{self.backend}: put_many failed at {failures} injected points, each leaving a valid store")
        assert failures >= 3, f"only {failures} write-level steps were exercised"

    def test_a_short_write_is_never_taken_as_written(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
    ) -> None:
        """``os.pwrite`` may write less than it is given (a file size limit, a full disk): never commit the rest."""
        records = self.records(OLD + NEW_SCALED)
        base = tmp_path / "base"
        with self.create(base) as store:
            records[:OLD].put(store)
        pwrite = os.pwrite
        calls, short_at = 0, 0

        def short_pwrite(fd: int, data: Any, offset: int) -> int:
            nonlocal calls
            calls += 1
            if calls == short_at:  # half of it, and its count: what the kernel does at a file size limit
                return pwrite(fd, bytes(data)[: len(data) // 2], offset)
            return pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", short_pwrite)
        for short_at in range(1, 100):
            path = tmp_path / f"try{short_at}"
            shutil.copytree(base, path)
            calls = 0
            with imgstore.open_store(path, mode="a") as store:
                try:
                    records[OLD:].put(store)
                except imgstore.ImgStoreError as exc:
                    assert isinstance(exc, (imgstore.StoreFullError, imgstore.StoreIOError)), repr(exc)
            try:
                check_old_or_new(path, records)
            except Exception as exc:
                raise AssertionError(f"pwrite call {short_at} of the put wrote half: {exc}") from exc
            if calls < short_at:  # every pwrite of the put has been cut short once
                break
        assert short_at > 1, "the put made no os.pwrite call: nothing was tested"

    @pytest.fixture
    def small_filesystem(self, tmp_path: Path) -> Iterator[Path]:
        """A real 4 MiB tmpfs, so the backend's own C-level writes meet a full disk."""
        with small_tmpfs(tmp_path / "small", "4m") as mount_point:
            yield mount_point

    def test_full_disk_is_a_clean_store_full_error(self, small_filesystem: Path) -> None:
        records = self.records(100)
        path = small_filesystem / self.backend
        committed = 0
        with self.create(path) as store:
            with pytest.raises(imgstore.StoreFullError):
                for _ in range(1000):
                    records.put(store)
                    committed += 100
            assert len(store) == committed
            with pytest.raises(imgstore.StoreFullError):
                for _ in range(1000):  # single puts until it is really full
                    records.put_one(store, 0)
                    committed += 1
        assert committed > 0
        with imgstore.open_store(path) as store:
            store.verify()
            assert len(store) == committed
            check_images_equal(store.get_many(range(min(100, committed)))[0], records[: min(100, committed)].expected)

    def test_file_size_limit_in_a_subprocess(self, tmp_path: Path) -> None:
        first, more = self.records(50), self.records(400, seed=1)
        path = tmp_path / self.backend
        with self.create(path) as store:
            first.put(store)
        largest = max(p.stat().st_size for p in path.rglob("*") if p.is_file())
        writer = multiprocessing.get_context("fork").Process(
            target=_write_under_file_size_limit,
            args=(str(path), largest + (16 << 10 if self.scaled else 64 << 10), more),
        )
        writer.start()
        writer.join(120)
        assert writer.exitcode == 0, f"the writer did not end with a StoreFullError (exit code {writer.exitcode})"
        with imgstore.open_store(path) as store:
            store.verify()
            assert len(store) >= 50 and (len(store) - 50) % 400 == 0
            expected = first
            for _ in range((len(store) - 50) // 400):
                expected = expected + more
            check_records(store, expected)

    @pytest.mark.parametrize("leave", [0, 4096, 12288])
    def test_creating_a_store_on_a_full_disk(self, small_filesystem: Path, leave: int) -> None:
        filler = _fill_disk(small_filesystem, leave)
        path = small_filesystem / "store"
        shape = self.layout.image_shape((8, 8, 3))
        kwargs = {**self.layout.store_kwargs(), "shape": shape, **self.options}
        script = f"""
            import importlib, imgstore, numpy as np
            if {self.backend_module!r}:
                importlib.import_module({self.backend_module!r})
            try:
                with imgstore.open_store({str(path)!r}, {self.backend!r}, "w", **{kwargs!r}) as store:
                    images = np.zeros((400, *{shape or (8, 8, 3)!r}), np.uint8)
                    store.put_many(images if store.shape is not None else list(images), [1] * 400)
            except imgstore.StoreFullError:
                raise SystemExit(7)
            """
        code = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=child_env(), timeout=120).returncode
        assert code in (0, 7), f"the process ended with {code} (a signal is negative), not StoreFullError"
        filler.unlink()
        records = self.records(50, (8, 8, 3))
        with self.create(path) as store:  # works again once there is space
            records.put(store)
        with imgstore.open_store(path) as store:
            check_records(store, records)
            store.verify()
        manifest = read_manifest(path)
        assert all(manifest.owns(entry.name) for entry in path.iterdir())
