"""imgstore.torch with a real DataLoader and real worker processes, on every backend."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from collections import Counter
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import random_images

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from imgstore.torch import StoreDataset  # noqa: E402

N = 203  # not a multiple of the batch size: the last batch is short


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(params=imgstore.available_backends())
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Counter]:
    images, labels = random_images(N, (8, 8, 3), seed=3)
    path = tmp_path / request.param
    with imgstore.open_store(path, request.param, "w") as store:
        store.put_many(images, labels)
    expected = Counter((_digest(image), int(label)) for image, label in zip(images, labels, strict=False))
    return path, expected


def _epoch(loader: DataLoader) -> Counter:
    seen: Counter = Counter()
    for images, labels in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (8, 8, 3)
        seen.update((_digest(image.numpy()), int(label)) for image, label in zip(images, labels, strict=False))
    return seen


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_read_exactly_the_store(store_path: tuple[Path, Counter], start_method: str) -> None:
    path, expected = store_path
    dataset = StoreDataset(path)
    dataset[0]  # the parent has an open handle before the workers start
    loader = DataLoader(
        dataset,
        batch_size=16,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=start_method,
        persistent_workers=True,
    )
    assert _epoch(loader) == expected
    assert _epoch(loader) == expected  # the persistent workers serve a second epoch too


def test_single_sample_fetch_and_transforms(store_path: tuple[Path, Counter]) -> None:
    path, expected = store_path
    dataset = StoreDataset(
        path, transform=lambda x: x.permute(2, 0, 1).float() / 255, target_transform=lambda y: y + 100
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    count = 0
    for image, label in loader:
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and 0 <= float(image.max()) <= 1
        assert 100 <= label < 110
        count += 1
    assert count == N
    array_dataset = StoreDataset(path, output="numpy")
    image, label = array_dataset[-1]
    assert isinstance(image, np.ndarray) and (_digest(image), label) in expected
    with pytest.raises(IndexError):
        array_dataset[N]


def _hold_open(path: Path, ready: Event, release: Event) -> None:
    with imgstore.open_store(path) as store:
        store.get(0)
        ready.set()
        release.wait(120)


def _read_then_die(dataset: StoreDataset) -> None:
    dataset[0]
    txn = dataset.store._env.begin()  # noqa: F841 - a reader slot held at the moment of death
    os.kill(os.getpid(), signal.SIGKILL)


def test_many_short_lived_workers_do_not_exhaust_lmdb_reader_slots(tmp_path: Path) -> None:
    """Workers that come and go, even killed while reading, must not use up LMDB's reader table.

    LMDB resets the table when the first process opens the environment, so another process keeps it
    open throughout, as a training job's main process does.
    """
    images, labels = random_images(8, (4, 4, 3))
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w") as store:
        store.put_many(images, labels)
    spawn, fork = multiprocessing.get_context("spawn"), multiprocessing.get_context("fork")
    ready, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold_open, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        dataset = StoreDataset(path)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
        for _ in range(30):
            assert sum(len(batch[1]) for batch in loader) == 8
            child = fork.Process(target=_read_then_die, args=(dataset,))
            child.start()
            child.join(30)
            assert child.exitcode == -signal.SIGKILL
        with imgstore.open_store(path) as store:
            store.get(0)
            table = store._env.readers().strip().splitlines()
        assert len(table) <= 4, table  # header, the holder, this process: no dead worker's slot
    finally:
        release.set()
        holder.join(60)


def test_missing_store_fails_in_the_parent(tmp_path: Path) -> None:
    with pytest.raises(imgstore.StoreNotFoundError):
        StoreDataset(tmp_path / "missing")
