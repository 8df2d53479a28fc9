"""Readers while a writer appends, one writer at a time, and stores on read-only media."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import check_store_content, random_images

BACKENDS = imgstore.available_backends()
TOTAL = 3000


def _append_slowly(path: str, done: Event) -> None:
    images, labels = random_images(TOTAL, (8, 8, 3), seed=21)
    with imgstore.open_store(path, mode="a") as store:
        start = len(store)
        sizes = [1, 7, 64, 300] * 100
        for size in sizes:
            stop = min(start + size, TOTAL)
            if stop == start:
                break
            store.put_many(images[start:stop], labels[start:stop])
            start = stop
    done.set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_readers_see_a_consistent_prefix_while_a_writer_appends(tmp_path: Path, backend: str) -> None:
    images, labels = random_images(TOTAL, (8, 8, 3), seed=21)
    path = tmp_path / backend
    with imgstore.open_store(path, backend, "w", sync=False) as store:
        store.put_many(images[:10], labels[:10])
    context = multiprocessing.get_context("spawn")
    done = context.Event()
    writer = context.Process(target=_append_slowly, args=(str(path), done))
    with imgstore.open_store(path) as reader:
        writer.start()
        seen = set()
        deadline = time.monotonic() + 120
        while True:
            assert writer.is_alive() or done.is_set(), f"the writer failed (exit code {writer.exitcode})"
            assert time.monotonic() < deadline, "the writer did not finish in time"
            finished = done.is_set()
            count = reader.refresh()
            seen.add(count)
            got_images, got_labels = reader.get_many(range(count))  # never garbage, never a short read
            np.testing.assert_array_equal(got_images, images[:count])
            np.testing.assert_array_equal(got_labels, labels[:count])
            if count:
                np.testing.assert_array_equal(reader.get(count - 1)[0], images[count - 1])
            if finished:
                break
        writer.join(60)
        assert writer.exitcode == 0
        assert reader.refresh() == TOTAL
        assert len(seen) > 2, "the reader never saw the writer's progress"
        reader.verify()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_writer_at_a_time(tmp_path: Path, backend: str) -> None:
    images, labels = random_images(4)
    path = tmp_path / backend
    with imgstore.open_store(path, backend, "w") as writer:
        writer.put_many(images, labels)
        with pytest.raises(imgstore.StoreBusyError):
            imgstore.open_store(path, mode="a")
        with pytest.raises(imgstore.StoreBusyError):
            imgstore.open_store(path, backend, "w")  # nor may anyone erase it meanwhile
        with imgstore.open_store(path) as reader:  # readers are welcome
            assert len(reader) == 4
    with imgstore.open_store(path, mode="a") as writer:  # the lock went with the first writer
        writer.put_many(images, labels)
        assert len(writer) == 8


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a writable directory, the same directory mounted read-only) — as root, a read-only bind mount."""
    source, mounted = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    mounted.mkdir()
    if os.geteuid() != 0:
        yield source, source  # the test makes the store read-only with chmod instead
        return
    try:
        subprocess.run(["mount", "--bind", str(source), str(mounted)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a read-only mount here: {exc}")
    try:
        yield source, mounted
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_on_read_only_media_opens_for_reading(read_only_dir: tuple[Path, Path], backend: str) -> None:
    source, mounted = read_only_dir
    images, labels = random_images(50)
    with imgstore.open_store(source / backend, backend, "w") as store:
        store.put_many(images, labels)
    if mounted == source:
        for root, dirs, files in os.walk(source):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
    assert not os.access(mounted / backend, os.W_OK)
    with imgstore.open_store(mounted / backend) as store:
        check_store_content(store, images, labels)
        store.verify()
    with pytest.raises((imgstore.ReadOnlyError, PermissionError, OSError)):
        imgstore.open_store(mounted / backend, mode="a")
