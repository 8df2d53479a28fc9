"""``CrashSafety``: a writer killed with SIGKILL at a random moment loses nothing it acknowledged.

A writer process appends deterministic batches of varying size (single puts among them) and
reports each acknowledged commit; the test kills it at a random point. In an encoded layout the
records are the layout's (files put with ``put_encoded_many``, or arrays the store encodes). Afterwards the store must
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
from imgstore.testing.checks import BackendTest, check_records
from imgstore.testing.layouts import Layout, Records

SHAPE = (16, 16, 3)
#: records an encoded layout's writers may append: they are made once per test (encoding is dear)
ENCODED_RECORDS = 800


def batch_sizes(seed: int, encoded: bool = False) -> list[int]:
    rng = random.Random(seed)
    # Encoded records cost ~1 ms each to make and write: smaller commits keep many in a kill's window.
    sizes = [1, 1, 3, 20, 100, 400] if encoded else [1, 1, 3, 50, 400, 2000]
    return [rng.choice(sizes) for _ in range(400)]


def expected_records(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    return images, (np.arange(count) * 7919 % 1000).astype(np.int64)


def crash_records(layout: Layout, seed: int) -> Records:
    """Every record the writers of one test may append (a killed writer's store holds a prefix of them)."""
    if layout.encoded:
        return layout.records(ENCODED_RECORDS, SHAPE, seed)
    images, labels = expected_records(seed, sum(batch_sizes(seed)))
    return Records(labels, images, images)


def _writer(path: str, options: dict[str, Any], records: Records, sizes: list[int], conn: Connection) -> None:
    with imgstore.open_store(path, mode="a", **options) as store:
        start = len(store)
        conn.send(("ready", start))
        for size in sizes:
            if start + size > len(records):
                break
            if size == 1:
                records.put_one(store, start)
            else:
                records[start : start + size].put(store)
            start += size
            conn.send(("ack", start))
    conn.send(("done", start))


def crash_once(
    path: Path, options: dict[str, Any], records: Records, sizes: list[int], delay: float
) -> tuple[int, set[int]]:
    """Run a writer (forked: it has ``records``), kill it after ``delay`` s of writing.

    Returns the last acknowledged count and the commit boundaries.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    writer = context.Process(target=_writer, args=(str(path), options, records, sizes, send))
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
    for size in sizes:
        boundaries.add(max(boundaries) + size)
    return acknowledged, boundaries


def check_after_crash(path: Path, records: Records, acknowledged: int, boundaries: set[int]) -> None:
    with imgstore.open_store(path) as store:
        store.verify()
        count = len(store)
        assert count >= acknowledged, f"lost acknowledged records: {count} < {acknowledged}"
        assert count in boundaries, f"a partial commit is visible: {count} images"
        check_records(store, records[:count])


def _recreate_forever(path: str, kwargs: dict[str, Any], records: Records, conn: Connection) -> None:
    conn.send("ready")
    while True:
        with imgstore.open_store(path, mode="w", **kwargs) as store:
            records.put(store)


class CrashSafety(BackendTest):
    """SIGKILL at random moments: while appending, and while re-creating the store (forked writers)."""

    def run_crashes(self, tmp_path: Path, kills: int, seed: int) -> None:
        rng = random.Random(seed)
        path = tmp_path / self.backend
        self.create(path).close()
        records = crash_records(self.layout, seed)
        sizes = batch_sizes(seed, self.layout.encoded)
        for kill in range(kills):
            acknowledged, boundaries = crash_once(path, self.options, records, sizes, rng.uniform(0.0, 0.25))
            try:
                check_after_crash(path, records, acknowledged, boundaries)
            except Exception as exc:
                raise AssertionError(f"{self.backend}: after kill {kill + 1} of {kills}: {exc}") from exc

    def test_killed_writer_loses_nothing_acknowledged(self, tmp_path: Path) -> None:
        self.run_crashes(tmp_path, kills=3 if self.scaled else 6, seed=11)

    @pytest.mark.slow
    def test_killed_writer_loses_nothing_acknowledged_60_times(self, tmp_path: Path) -> None:
        self.run_crashes(tmp_path, kills=60, seed=12)

    def kill_during_write_mode(self, tmp_path: Path, kills: int, seed: int) -> None:
        path = tmp_path / "s"
        (tmp_path / "mine.txt").write_text("beside the store")
        rng = random.Random(seed)
        context = multiprocessing.get_context("fork")
        kwargs = {"backend": self.backend, **self.layout.store_kwargs(), **self.options}
        records = self.records(300, (8, 8, 3))
        for _ in range(kills):
            receive, send = context.Pipe(duplex=False)
            writer = context.Process(target=_recreate_forever, args=(str(path), kwargs, records, send))
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
        records = self.records(20, (8, 8, 3), seed=1)
        with self.create(path) as store:
            records.put(store)
        with imgstore.open_store(path, mode="a") as store:
            check_records(store, records)
        assert all(read_manifest(path).owns(entry.name) for entry in path.iterdir())
        assert (tmp_path / "mine.txt").read_text() == "beside the store"

    def test_a_kill_during_write_mode_never_locks_the_directory_out(self, tmp_path: Path) -> None:
        self.kill_during_write_mode(tmp_path, kills=4 if self.scaled else 12, seed=5)

    @pytest.mark.slow
    def test_a_kill_during_write_mode_never_locks_the_directory_out_120_times(self, tmp_path: Path) -> None:
        self.kill_during_write_mode(tmp_path, kills=120, seed=6)
