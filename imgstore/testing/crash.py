"""``CrashSafety``: a writer killed with SIGKILL at a random moment loses nothing it acknowledged.

A writer process appends deterministic batches of varying size (single puts among them) and
reports each acknowledged commit; the test kills it at a random point. Afterwards the store must
open, pass ``verify()``, hold exactly a prefix of whole commits (nothing partial), at least every
acknowledged one, with the right content, and take further appends. And a process killed while
it re-creates a store (mode ``"w"``) never leaves the directory locked out or foreign files deleted.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.manifest import read_manifest
from imgstore.testing.checks import BackendTest, check_store_content, random_images

SHAPE = (16, 16, 3)


def batch_sizes(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([1, 1, 3, 50, 400, 2000]) for _ in range(400)]


def expected_records(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    return images, (np.arange(count) * 7919 % 1000).astype(np.int64)


def _writer(path: str, backend: str, options: dict[str, Any], seed: int, conn: Connection) -> None:
    sizes = batch_sizes(seed)
    images, labels = expected_records(seed, sum(sizes))
    with imgstore.open_store(path, backend, "a", **options) as store:
        start = len(store)
        conn.send(("ready", start))
        for size in sizes:
            if start + size > len(images):
                break
            if size == 1:
                store.put(images[start], labels[start])
            else:
                store.put_many(images[start : start + size], labels[start : start + size])
            start += size
            conn.send(("ack", start))
    conn.send(("done", start))


def crash_once(path: Path, backend: str, options: dict[str, Any], seed: int, delay: float) -> tuple[int, set[int]]:
    """Run a writer, kill it after ``delay`` s of writing; return (last acknowledged count, commit boundaries)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    writer = context.Process(target=_writer, args=(str(path), backend, options, seed, send))
    writer.start()
    send.close()
    kind, start = receive.recv()
    assert kind == "ready"
    deadline = time.monotonic() + delay
    acknowledged = start
    while time.monotonic() < deadline and receive.poll(max(0.0, deadline - time.monotonic())):
        kind, acknowledged = receive.recv()
        if kind == "done":
            break
    assert writer.pid is not None
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(30)
    while receive.poll():  # acknowledgements sent before the kill landed
        try:
            kind, acknowledged = receive.recv()
        except EOFError:
            break
    boundaries = {start}
    for size in batch_sizes(seed):
        boundaries.add(max(boundaries) + size)
    return acknowledged, boundaries


def check_after_crash(path: Path, seed: int, acknowledged: int, boundaries: set[int]) -> None:
    with imgstore.open_store(path) as store:
        store.verify()
        count = len(store)
        assert count >= acknowledged, f"lost acknowledged records: {count} < {acknowledged}"
        assert count in boundaries, f"a partial commit is visible: {count} images"
        check_store_content(store, *expected_records(seed, count))


def _recreate_forever(path: str, backend: str, options: dict[str, Any], conn: Connection) -> None:
    images, labels = random_images(300, (8, 8, 3))
    conn.send("ready")
    while True:
        with imgstore.open_store(path, backend, "w", **options) as store:
            store.put_many(images, labels)


class CrashSafety(BackendTest):
    """SIGKILL at random moments: while appending, and while re-creating the store (forked writers)."""

    def run_crashes(self, tmp_path: Path, kills: int, seed: int) -> None:
        rng = random.Random(seed)
        path = tmp_path / self.backend
        self.create(path).close()
        for kill in range(kills):
            acknowledged, boundaries = crash_once(path, self.backend, self.options, seed, rng.uniform(0.0, 0.25))
            try:
                check_after_crash(path, seed, acknowledged, boundaries)
            except Exception as exc:
                raise AssertionError(f"{self.backend}: after kill {kill + 1} of {kills}: {exc}") from exc

    def test_killed_writer_loses_nothing_acknowledged(self, tmp_path: Path) -> None:
        self.run_crashes(tmp_path, kills=6, seed=11)

    @pytest.mark.slow
    def test_killed_writer_loses_nothing_acknowledged_60_times(self, tmp_path: Path) -> None:
        self.run_crashes(tmp_path, kills=60, seed=12)

    def kill_during_write_mode(self, tmp_path: Path, kills: int, seed: int) -> None:
        path = tmp_path / "s"
        (tmp_path / "mine.txt").write_text("beside the store")
        rng = random.Random(seed)
        context = multiprocessing.get_context("fork")
        for _ in range(kills):
            receive, send = context.Pipe(duplex=False)
            writer = context.Process(target=_recreate_forever, args=(str(path), self.backend, self.options, send))
            writer.start()
            receive.recv()
            time.sleep(rng.uniform(0.0, 0.08))
            assert writer.pid is not None
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
            try:
                with imgstore.open_store(path) as store:  # the old store, the new one, or an unfinished one
                    assert len(store) in (0, 300)
                    store.verify()
            except imgstore.CorruptStoreError as exc:
                assert "being created" in str(exc)
            except imgstore.StoreNotFoundError:
                pass
        images, labels = random_images(20, (8, 8, 3), seed=1)
        with self.create(path) as store:
            store.put_many(images, labels)
        with imgstore.open_store(path, mode="a") as store:
            check_store_content(store, images, labels)
        assert all(read_manifest(path).owns(entry.name) for entry in path.iterdir())
        assert (tmp_path / "mine.txt").read_text() == "beside the store"

    def test_a_kill_during_write_mode_never_locks_the_directory_out(self, tmp_path: Path) -> None:
        self.kill_during_write_mode(tmp_path, kills=12, seed=5)

    @pytest.mark.slow
    def test_a_kill_during_write_mode_never_locks_the_directory_out_120_times(self, tmp_path: Path) -> None:
        self.kill_during_write_mode(tmp_path, kills=120, seed=6)
