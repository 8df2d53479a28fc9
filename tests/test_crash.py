"""Crash safety: a writer killed with SIGKILL at a random moment loses nothing it acknowledged.

A writer process appends deterministic batches of varying size (single puts among them) and
reports each acknowledged commit; the test kills it at a random point. Afterwards the store must
open, pass ``verify()``, hold exactly a prefix of whole commits (nothing partial), at least every
acknowledged one, with the right content, and take further appends.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import check_store_content

SHAPE = (16, 16, 3)


def batch_sizes(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([1, 1, 3, 50, 400, 2000]) for _ in range(400)]


def expected_records(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    return images, (np.arange(count) * 7919 % 1000).astype(np.int64)


def _writer(path: str, backend: str, seed: int, conn: Connection) -> None:
    sizes = batch_sizes(seed)
    images, labels = expected_records(seed, sum(sizes))
    with imgstore.open_store(path, backend, "a") as store:
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


def crash_once(path: Path, backend: str, seed: int, delay: float) -> tuple[int, set[int]]:
    """Run a writer, kill it after ``delay`` s of writing; return (last acknowledged count, commit boundaries)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    writer = context.Process(target=_writer, args=(str(path), backend, seed, send))
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


def run_crashes(tmp_path: Path, backend: str, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / backend
    imgstore.open_store(path, backend, "w").close()
    for kill in range(kills):
        acknowledged, boundaries = crash_once(path, backend, seed, rng.uniform(0.0, 0.25))
        try:
            check_after_crash(path, seed, acknowledged, boundaries)
        except Exception as exc:
            raise AssertionError(f"{backend}: after kill {kill + 1} of {kills}: {exc}") from exc


@pytest.mark.parametrize("backend", imgstore.available_backends())
def test_killed_writer_loses_nothing_acknowledged(tmp_path: Path, backend: str) -> None:
    run_crashes(tmp_path, backend, kills=6, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("backend", imgstore.available_backends())
def test_killed_writer_loses_nothing_acknowledged_60_times(tmp_path: Path, backend: str) -> None:
    run_crashes(tmp_path, backend, kills=60, seed=12)
