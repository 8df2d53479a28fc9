"""The PNG backend's parallel path: big batches encoded and decoded by forked worker processes.

The conformance stores are too small to reach it at the default ``parallel_min``; here it is set low
so that real worker processes do the work on every call.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import check_owned_array, random_images

PARALLEL = {"parallel_min": 8, "workers": 2}


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = random_images(300, seed=11)
    with imgstore.open_store(tmp_path / "s", "png", "w", **PARALLEL) as store:
        store.put_many(images[:150], labels[:150])  # encoded by 2 processes
        store.put_many(images[150:], labels[150:])
    return tmp_path / "s", images, labels


def test_parallel_writes_and_reads_are_exact(filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, images, labels = filled
    with imgstore.open_store(path) as store:
        got_images, got_labels = store.get_many(range(300))
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        order = np.random.default_rng(0).permutation(300)
        shuffled, shuffled_labels = store.get_many(order)
        np.testing.assert_array_equal(shuffled, images[order])
        np.testing.assert_array_equal(shuffled_labels, labels[order])
        for array in (got_images, shuffled):
            check_owned_array(array)


def test_iteration_reads_ahead_and_yields_owned_batches_in_order(
    filled: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    path, images, labels = filled
    with imgstore.open_store(path) as store:
        batches = list(store.iter_batches(5))  # read 10 at a time (parallel_min 8, two batches)
    assert [len(b) for b, _ in batches] == [5] * 60
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), images)
    np.testing.assert_array_equal(np.concatenate([lb for _, lb in batches]), labels)
    for batch, batch_labels in batches:
        check_owned_array(batch)
        check_owned_array(batch_labels)
    batches[0][0][:] = 0  # batches are independent copies, not views of one read
    assert batches[1][0].any()


def test_damage_found_by_a_worker_is_raised_in_the_caller(filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, _, _ = filled
    with imgstore.open_store(path) as store:
        victim = store.image_path(290)  # in the worker's half of the batch
    victim.write_bytes(b"not a png")
    with imgstore.open_store(path) as store:
        with pytest.raises(imgstore.CorruptStoreError, match="000000290"):
            store.get_many(range(300))
        store.get_many(range(280))  # the rest still reads


def _read_in_daemon(path: str, queue: multiprocessing.Queue) -> None:
    with imgstore.open_store(path) as store:
        images, _ = store.get_many(range(300))
    queue.put(images.tobytes())


def test_a_daemonic_process_reads_big_batches_in_process(filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
    # DataLoader workers are daemonic and may not fork children of their own.
    path, images, _ = filled
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_read_in_daemon, args=(str(path), queue), daemon=True)
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    assert worker.exitcode == 0
    assert got == images.tobytes()
