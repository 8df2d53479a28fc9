"""Threads whose first reads on a new store handle run at once (a ShardedDataset shared by threads reopens its
shards all the time): every backend opens its files once, and closing the handle closes them all."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.registry import installed_backends

THREADS = 6


@pytest.mark.parametrize("backend", installed_backends())
def test_threads_reading_a_new_handle_at_once_leak_no_descriptor(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
    with imgstore.open_store(tmp_path / "s", backend, "w") as store:
        store.put_many(images, np.arange(200))

    def first_reads_at_once() -> None:
        with imgstore.open_store(tmp_path / "s") as store:
            start = threading.Barrier(THREADS)

            def read() -> None:
                start.wait()
                order = np.random.default_rng().permutation(200)[:50]
                np.testing.assert_array_equal(store.get_many(order)[0], images[order])
                assert np.array_equal(store.get(int(order[0]))[0], images[order[0]])

            threads = [threading.Thread(target=read) for _ in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    first_reads_at_once()  # one-time descriptors (pools) before counting
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(15):
        first_reads_at_once()
    assert len(os.listdir("/proc/self/fd")) == before
