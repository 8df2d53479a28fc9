"""Reads out of read-only maps (tiledb fixed-size fragments, zarr shards, tar shards): damage under an open
reader, growth seen through refresh(), descriptors, and tar's damaged-label fallback.

Scenarios that could kill the process (SIGBUS) run in a child interpreter, so a signal is a failed test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.backends import tar_format as fmt
from imgstore.errors import CorruptStoreError

MAPPED = ["tiledb", "zarr", "tar"]
SHAPE = (32, 32, 3)
# Options that put records on both sides of tile and shard edges.
EDGES: dict[str, dict[str, Any]] = {
    "tiledb": {"tile_bytes": 10_000},
    "zarr": {"shard_images": 64},
    "tar": {"shard_bytes": 1 << 18},
}


def _records(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8), np.arange(n) * 7 % 13


def _data_files(path: Path, backend: str) -> list[Path]:
    pattern = {"tiledb": "**/__fragments/*/a0.tdb", "zarr": "**/images/c/*/0/0/0", "tar": "**/shard-*.tar"}[backend]
    return sorted(path.glob(pattern), key=lambda p: p.stat().st_size, reverse=True)


_CUT_UNDER_READER = """
import os, sys
import numpy as np
import imgstore
from imgstore.errors import CorruptStoreError

path, data_file, verify = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with imgstore.open_store(path, verify_reads=verify) as reader:
    n = len(reader)
    reader.get_many(np.arange(n)), reader.get(n - 1), reader.get_many(np.arange(n)[::-1])  # every map made
    os.truncate(data_file, os.path.getsize(data_file) // 3)  # another program copies over it
    for read in (lambda: reader.get(n - 1), lambda: reader.get_many([n - 1, 0]), lambda: reader.get_many(range(n))):
        try:
            read()
            print("read")
        except CorruptStoreError:
            print("CorruptStoreError")
"""


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("backend", MAPPED)
def test_a_file_cut_short_under_a_reader_is_damage_not_sigbus(tmp_path: Path, backend: str, verify: bool) -> None:
    """Before, the maps were read without asking the file's size: SIGBUS (tiledb, zarr, tar alike)."""
    path = tmp_path / "s"
    images, labels = _records(300)
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, labels)
    data_file = _data_files(path, backend)[0]
    done = subprocess.run(
        [sys.executable, "-c", _CUT_UNDER_READER, str(path), str(data_file), "1" if verify else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["CorruptStoreError"] * 3, done.stdout


_APPEND = """
import sys
import numpy as np
import imgstore
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
images = np.random.default_rng(0).integers(0, 256, (start + n, 32, 32, 3), dtype=np.uint8)[start:]
with imgstore.open_store(path, mode="a") as store:
    for lo in range(0, n, 37):
        store.put_many(images[lo : lo + 37], np.arange(start + lo, start + min(n, lo + 37)) * 7 % 13)
"""


def _check(store: imgstore.Store, images: np.ndarray, labels: np.ndarray) -> None:
    n = len(images)
    assert len(store) == n
    for i in (0, n - 1, -1, -n, n // 2):
        image, label = store.get(i)
        np.testing.assert_array_equal(image, images[i])
        assert label == labels[i]
    order = np.concatenate([np.random.default_rng(n).permutation(n), [n - 1, n - 1, 0], np.arange(n)[::-1]])
    out = (np.empty((len(order), *SHAPE), np.uint8), np.empty(len(order), np.int64))
    got, got_labels = store.get_many(order, out=out)
    assert got is out[0]
    np.testing.assert_array_equal(got, images[order])
    np.testing.assert_array_equal(got_labels, labels[order])
    got, got_labels = store.get_many(range(n // 3, n))
    np.testing.assert_array_equal(got, images[n // 3 :])
    np.testing.assert_array_equal(got_labels, labels[n // 3 :])


@pytest.mark.parametrize("backend", MAPPED)
def test_records_past_the_old_maps_read_after_refresh_and_in_a_forked_child(tmp_path: Path, backend: str) -> None:
    """A reader maps a partial last shard (zarr), a few fragments (tiledb, merged as the writer goes on) or
    shards (tar); another process appends; after refresh() every record reads, old and new, in the parent
    and in a child forked after those reads."""
    path = tmp_path / "s"
    images, labels = _records(400)
    options: dict[str, Any] = dict(EDGES[backend], **({"consolidate_every": 2} if backend == "tiledb" else {}))
    with imgstore.open_store(path, backend, "w", **options) as store:
        store.put_many(images[:1], labels[:1])
    with imgstore.open_store(path) as reader:
        _check(reader, images[:1], labels[:1])
        for start, n in ((1, 100), (101, 299)):
            subprocess.run([sys.executable, "-c", _APPEND, str(path), str(start), str(n)], check=True, timeout=300)
            _check(reader, images[:start], labels[:start])  # the prefix it had
            reader.refresh()
            _check(reader, images[: start + n], labels[: start + n])
        pid = os.fork()
        if pid == 0:
            try:
                _check(reader, images, labels)
                os._exit(0)
            except BaseException:
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0
        _check(reader, images, labels)


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("backend", MAPPED)
def test_reads_overlapping_refreshes_keep_no_descriptors(tmp_path: Path, backend: str) -> None:
    """TileDB's index built by a read that overlapped a refresh (used for that read only) was never closed:
    ~4 descriptors a read, until every open failed with EMFILE (a CorruptStoreError "Too many open files")."""
    path = tmp_path / "s"
    images, labels = _records(120)
    with imgstore.open_store(path, backend, "w", **EDGES[backend]) as store:
        for lo in range(0, 120, 30):
            store.put_many(images[lo : lo + 30], labels[lo : lo + 30])
    with imgstore.open_store(path) as reader:
        reader.get_many(np.arange(120))
        before = _descriptors()
        stop, failures = threading.Event(), []

        def refresh() -> None:
            while not stop.is_set():
                with reader._refreshes.refreshing():  # what refresh() does when a writer committed
                    reader._refresh(len(reader))

        def read() -> None:
            while not stop.is_set():
                try:
                    got, _ = reader.get_many(np.arange(0, 120, 7))
                    np.testing.assert_array_equal(got, images[::7])
                except Exception as exc:  # noqa: BLE001 - any failure fails the test below
                    failures.append(repr(exc))

        threads = [threading.Thread(target=refresh), threading.Thread(target=read), threading.Thread(target=read)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
        reader.get(0)
        assert _descriptors() <= before + 8, (before, _descriptors())


@pytest.mark.parametrize("damage", [b"x", b"-", b"\0", b" "])
@pytest.mark.parametrize("verify", [True, False])
def test_one_damaged_label_fails_only_its_own_tar_get(tmp_path: Path, verify: bool, damage: bytes) -> None:
    """A get parses its shard's label texts at once; one that does not parse fails that record only."""
    path = tmp_path / "s"
    images, labels = _records(40)
    labels = labels + 10  # two digits each
    with imgstore.open_store(path, "tar", "w", shard_bytes=8 * 4096) as store:
        store.put_many(images, labels)
        entry = store._index()[5]  # type: ignore[attr-defined]
    shard = next(path.glob(f"tar-*/shard-*-{int(entry['shard']):06d}.tar"))
    end = int(fmt.label_ends(entry["offset"], entry["length"], entry["label_len"]))
    with open(shard, "r+b") as f:
        f.seek(end - int(entry["label_len"]))
        f.write(damage)
    for first in (5, 0):  # the damaged record read first, or another of its shard
        with imgstore.open_store(path, verify_reads=verify) as reader:
            order = [first, *range(40)]
            for i in order:
                if i == 5:
                    with pytest.raises(CorruptStoreError):
                        reader.get(i)
                    continue
                image, label = reader.get(i)
                np.testing.assert_array_equal(image, images[i])
                assert label == labels[i]
