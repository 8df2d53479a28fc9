"""Sharded datasets on a local disk (and memory:// for the cache's logic): manifest, commit, global index, cache."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.sharded import ShardCache, ShardedWriter, commit_shards, open_sharded, read_committed, write_shard
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import MANIFEST_NAME, _body_hash, parse_manifest
from imgstore.testing import check_threads_read, random_images

IMAGES, LABELS = random_images(100, (8, 8, 3), seed=5)


def _write(path: Path | str, backend: str = "lmdb", shard_size: int = 40, **options: object) -> None:
    with ShardedWriter(path, backend=backend, shard_size=shard_size, mode="w", **options) as writer:
        writer.add(IMAGES[:30], LABELS[:30])  # batches that straddle shard boundaries
        writer.add(IMAGES[30:], LABELS[30:])


@pytest.mark.parametrize("backend", ["lmdb", "hdf5", "png", "sqlite"])
def test_round_trip_and_global_index(tmp_path: Path, backend: str) -> None:
    _write(tmp_path / "ds", backend)
    with open_sharded(tmp_path / "ds") as data:
        assert len(data) == 100 and [s.count for s in data.shards] == [40, 40, 20]
        assert {s.backend for s in data.shards} == {backend}
        order = np.random.default_rng(0).permutation(100)
        images, labels = data.get_many(order)
        assert np.array_equal(images, IMAGES[order]) and np.array_equal(labels, LABELS[order])
        image, label = data.get(79)  # the last record of shard 1
        assert np.array_equal(image, IMAGES[79]) and label == LABELS[79]
        image, label = data[-1]
        assert np.array_equal(image, IMAGES[99]) and label == LABELS[99]
        assert data.locate(40) == (1, 0) and data.locate(99) == (2, 19)
        assert data.get_many([])[0].shape == (0, 8, 8, 3)
        with pytest.raises(imgstore.StoreIndexError):
            data.get(100)
        with pytest.raises(imgstore.StoreIndexError):
            data.get_many([0, 100])
        assert np.array_equal(np.stack([image for image, _label in data]), IMAGES)
        data.verify()


def test_shards_are_sealed_and_listed(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    manifest = read_committed(Location(tmp_path / "ds"))
    for info in manifest.shards:
        root = tmp_path / "ds" / "shards" / info.name
        on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        unlisted = on_disk - {f.path for f in info.files}  # what readers make or change: not content
        assert {p.split("/")[-1] for p in unlisted} == {"writer.lock", "lock.mdb"}
        assert {f.path for f in info.files} <= on_disk
        assert sum(f.bytes for f in info.files) == info.bytes > 0
        for f in info.files:
            assert not os.stat(root / f.path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert not [p for p in (tmp_path / "ds" / "shards").iterdir() if p.name.startswith(".")]  # no staging left


def test_write_shard_then_commit_mixed_backends_and_codecs(tmp_path: Path) -> None:
    """The Dask path: each task writes one shard; one commit publishes them all, in the order given."""
    dest = tmp_path / "ds"
    a = write_shard(dest, IMAGES[:50], LABELS[:50], backend="hdf5")
    b = write_shard(dest, IMAGES[50:], LABELS[50:], backend="png", codec="png")
    with pytest.raises(imgstore.StoreNotFoundError):
        open_sharded(dest)  # written, not committed: no dataset yet
    commit_shards(dest, [a, b])
    with open_sharded(dest) as data:
        assert [s.codec for s in data.shards] == ["raw", "png"]
        images, labels = data.get_many(range(100))
        assert np.array_equal(np.stack(images), IMAGES) and np.array_equal(labels, LABELS)
    with pytest.raises(imgstore.CorruptStoreError):
        commit_shards(dest, [a])  # a shard is committed once


def test_a_reader_keeps_its_manifest_across_an_append(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    old = open_sharded(tmp_path / "ds")
    more, more_labels = random_images(30, (8, 8, 3), seed=6)
    with ShardedWriter(tmp_path / "ds", backend="hdf5", shard_size=25) as writer:
        writer.add(more, more_labels)
    assert len(old) == 100 and len(old.shards) == 3
    assert np.array_equal(old.get_many(range(100))[0], IMAGES)
    with pytest.raises(imgstore.StoreIndexError):
        old.get(100)
    with open_sharded(tmp_path / "ds") as new:
        assert len(new) == 130 and [s.count for s in new.shards] == [40, 40, 20, 25, 5]
        assert np.array_equal(new.get_many(range(100, 130))[0], more)
    assert old.refresh() == 130 and np.array_equal(old.get(129)[0], more[-1])
    old.close()


def test_nothing_is_visible_until_commit(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    before = (tmp_path / "ds" / MANIFEST_NAME).read_bytes()
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path / "ds", backend="lmdb", shard_size=10) as writer:
        writer.add(IMAGES[:25], LABELS[:25])  # two shards written and sealed...
        raise RuntimeError("the job died")  # ...never committed
    assert (tmp_path / "ds" / MANIFEST_NAME).read_bytes() == before
    with open_sharded(tmp_path / "ds") as data:
        assert len(data) == 100


def test_concurrent_writers_do_not_drop_each_others_shards(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    first = ShardedWriter(tmp_path / "ds", backend="lmdb", shard_size=10)
    second = ShardedWriter(tmp_path / "ds", backend="lmdb", shard_size=10)
    first.add(IMAGES[:10], LABELS[:10])
    second.add(IMAGES[10:20], LABELS[10:20])
    first.commit()
    with pytest.raises(imgstore.StoreBusyError):
        second.commit()
    assert len(open_sharded(tmp_path / "ds")) == 110
    with pytest.raises(imgstore.StoreExistsError):
        ShardedWriter(tmp_path / "ds", backend="lmdb", mode="w")


def _rewrite(path: Path, edit: object) -> None:
    data = json.loads(path.read_bytes())
    edit(data)  # type: ignore[operator]
    data.pop("xxh3_64")
    path.write_bytes(_signed(data))


def _signed(body: dict[str, object]) -> bytes:
    body["xxh3_64"] = _body_hash(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["shards"][0].update(name="../../etc"),
        lambda d: d["shards"][0]["files"][0].__setitem__(0, "../outside"),
        lambda d: d["shards"][0]["files"][0].__setitem__(0, "/etc/passwd"),
        lambda d: d["shards"][0].update(count=-1),
        lambda d: d["shards"][0].update(bytes=1),
        lambda d: d["shards"][0]["files"][0].__setitem__(1, 7),  # a size that no longer matches the checksum
        lambda d: d.update(count=99),
        lambda d: d["shards"].append(d["shards"][0]),
        lambda d: d.update(shards={"a": 1}),
    ],
)
def test_forged_manifest_values_are_refused(tmp_path: Path, edit: object) -> None:
    _write(tmp_path / "ds")
    _rewrite(tmp_path / "ds" / MANIFEST_NAME, edit)
    with pytest.raises(imgstore.CorruptStoreError):
        open_sharded(tmp_path / "ds")


def test_damaged_manifest_and_versions(tmp_path: Path) -> None:
    _write(tmp_path / "ds")
    path = tmp_path / "ds" / MANIFEST_NAME
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"count": 40', b'"count": 41', 1))
    with pytest.raises(imgstore.CorruptStoreError, match="checksum"):
        open_sharded(tmp_path / "ds")
    path.write_bytes(good[:-10])
    with pytest.raises(imgstore.CorruptStoreError):
        open_sharded(tmp_path / "ds")
    path.write_bytes(_signed({**json.loads(good), "version": 99}))
    with pytest.raises(imgstore.FormatVersionError):
        open_sharded(tmp_path / "ds")
    with pytest.raises(imgstore.CorruptStoreError):
        parse_manifest(b"\x80\x04pickle", "x")  # JSON only: a pickle is just not a manifest


def test_a_damaged_local_shard_is_found(tmp_path: Path) -> None:
    _write(tmp_path / "ds", "hdf5")
    manifest = read_committed(Location(tmp_path / "ds"))
    info = manifest.shards[1]
    victim = tmp_path / "ds" / "shards" / info.name / max(info.files, key=lambda f: f.bytes).path
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:  # same size, one byte flipped inside the pixels
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_sharded(tmp_path / "ds") as data, pytest.raises(imgstore.CorruptStoreError):
        data.verify()
    with open(victim, "ab") as f:
        f.write(b"x")
    with open_sharded(tmp_path / "ds") as data:
        assert np.array_equal(data.get(0)[0], IMAGES[0])  # other shards still read
        with pytest.raises(imgstore.CorruptStoreError, match="bytes"):
            data.get(40)


def test_a_local_shard_replaced_by_a_link_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "ds", "lmdb")
    info = read_committed(Location(tmp_path / "ds")).shards[1]
    shard = tmp_path / "ds" / "shards" / info.name
    copy = tmp_path / "elsewhere"
    os.rename(shard, copy)  # the same files and sizes, but outside the dataset
    shard.symlink_to(copy, target_is_directory=True)
    with open_sharded(tmp_path / "ds") as data:
        assert np.array_equal(data.get(0)[0], IMAGES[0])  # other shards still read
        with pytest.raises(imgstore.CorruptStoreError, match="symbolic link"):
            data.get(40)


# ---------------------------------------------------------------------- the cache's logic (memory://)


@pytest.fixture
def memory_dataset() -> str:
    pytest.importorskip("fsspec")
    url = f"memory://imgstore-test-{os.getpid()}-{np.random.default_rng().integers(1 << 30)}"
    _write(url, "lmdb", shard_size=25)
    return url


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != "IMGSTORE-CACHE")


def test_cache_fetches_checks_and_evicts_least_recently_used(memory_dataset: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=1 << 30) as data:
        shard_bytes = max(s.bytes for s in data.shards)
    bound = int(2.5 * shard_bytes)
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=bound, open_shards=1) as data:
        names = [f"{s.checksum}-{s.bytes}" for s in data.shards]
        for k in (0, 1, 2):
            assert np.array_equal(data.get(25 * k)[0], IMAGES[25 * k])
        assert _entries(cache) == sorted(names[1:3])  # shard 0 went first
        data.get(25)  # shard 1 used again: shard 2 is now the oldest
        data.get(75)
        assert _entries(cache) == sorted([names[1], names[3]])
        assert data.cache is not None and data.cache.used_bytes() <= bound


def test_a_pinned_shard_is_not_evicted(memory_dataset: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=1 << 30) as data:
        shard_bytes = max(s.bytes for s in data.shards)
    holder = open_sharded(memory_dataset, cache_dir=cache, cache_bytes=shard_bytes, open_shards=4)
    store = holder.shard(0)  # pinned while open
    other = open_sharded(memory_dataset, cache_dir=cache, cache_bytes=shard_bytes, open_shards=1)
    for k in (1, 2, 3):
        assert np.array_equal(other.get(25 * k)[0], IMAGES[25 * k])
    assert np.array_equal(store.get_many(range(25))[0], IMAGES[:25])  # still readable
    assert f"{holder.shards[0].checksum}-{holder.shards[0].bytes}" in _entries(cache)
    holder.close()
    other.get(0)  # unpinned now: shard 0 replaces shard 3 in a cache of one shard
    assert len(_entries(cache)) == 1
    other.close()


def test_cache_refuses_a_foreign_directory_and_deletes_nothing_else(memory_dataset: str, tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(imgstore.StoreExistsError):
        open_sharded(memory_dataset, cache_dir=foreign)
    cache = tmp_path / "cache"
    ShardCache(cache, 1)
    (cache / "notes.txt").write_text("not an entry")
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=1 << 30, open_shards=1) as data:
        bound = max(s.bytes for s in data.shards)
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=bound, open_shards=1) as data:
        data.get_many(range(100))
    assert (cache / "notes.txt").read_text() == "not an entry" and (foreign / "thesis.tex").exists()
    with (
        pytest.raises(imgstore.InvalidOptionError, match="cache_bytes"),
        open_sharded(memory_dataset, cache_dir=cache, cache_bytes=100) as data,
    ):
        data.get(0)


def test_a_url_without_its_filesystem_package_names_the_extra() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(imgstore.MissingDependencyError, match=r"imgstore-ml\[remote\]"):
        open_sharded("gs://bucket/x")  # gcsfs is not installed here (nor in the extras)


def _read_in_child(data: object) -> bytes:
    images, labels = data.get_many(range(len(data)))  # type: ignore[attr-defined]
    return bytes(images.tobytes() + labels.tobytes())


def test_a_dataset_pickles_as_its_view_for_worker_processes(memory_dataset: str, tmp_path: Path) -> None:
    """A worker process reopens it (same cache, same manifest snapshot), as a DataLoader worker would."""
    import multiprocessing
    import pickle

    local = tmp_path / "ds"
    _write(local)
    data = open_sharded(local)
    more, more_labels = random_images(5, (8, 8, 3), seed=9)
    with ShardedWriter(local, backend="lmdb") as writer:
        writer.add(more, more_labels)  # appended after the parent opened: the pickle keeps 100
    copy = pickle.loads(pickle.dumps(data))
    assert len(copy) == 100 and copy.shards == data.shards
    with multiprocessing.get_context("fork").Pool(1) as pool:  # arguments go to the worker pickled
        assert pool.apply(_read_in_child, (data,)) == IMAGES.tobytes() + LABELS.astype(np.int64).tobytes()
    data.close()
    remote = open_sharded(memory_dataset, cache_dir=tmp_path / "cache", cache_bytes=1 << 20)
    copy = pickle.loads(pickle.dumps(remote))
    assert copy.cache is not None and copy.cache.dir == tmp_path / "cache" and copy.cache.max_bytes == 1 << 20
    assert np.array_equal(copy.get_many(range(100))[0], IMAGES)


def test_prefetch_fills_the_cache_in_the_background(memory_dataset: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=1 << 30) as data:
        data.prefetch([2, 3])
        assert np.array_equal(data.get(50)[0], IMAGES[50])  # shard 2: waits for its prefetch, then opens it
        deadline = time.monotonic() + 30  # close() cancels a prefetch not yet started: let shard 3's start
        while not [p for p in cache.iterdir() if p.name.startswith(".tmp-")] and len(_entries(cache)) < 2:
            assert time.monotonic() < deadline, "shard 3's prefetch never started"
            time.sleep(0.001)
        data.close()  # waits for shard 3's download
        assert len(_entries(cache)) == 2 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    with pytest.raises(imgstore.StoreClosedError):
        data.prefetch([0])
    local = tmp_path / "ds"
    _write(local)
    with open_sharded(local) as data:
        data.prefetch([0, 1])  # nothing to fetch on a local disk
        with pytest.raises(imgstore.StoreIndexError):
            data.prefetch([3])


def test_a_file_url_is_the_local_path(tmp_path: Path) -> None:
    _write(f"file://{tmp_path / 'ds'}")
    assert (tmp_path / "ds" / MANIFEST_NAME).is_file()
    with open_sharded(tmp_path / "ds") as data:
        assert data.cache is None and np.array_equal(data.get_many(range(100))[0], IMAGES)


def test_the_cache_sweeps_by_lock_not_by_pid(memory_dataset: str, tmp_path: Path) -> None:
    """A download in progress elsewhere (another PID namespace: its PID means nothing here) is kept while
    its maker holds its lock; one nobody holds is swept, whatever PID its name gives."""
    import fcntl

    cache = tmp_path / "cache"
    with open_sharded(memory_dataset, cache_dir=cache) as data:
        data.get(0)
    live = cache / f".tmp-{'a' * 32}-999999999-0badf00d"  # a PID that is no process here
    dead = cache / f".tmp-{'b' * 32}-{os.getpid()}-0badf00d"  # a PID alive here, its maker gone
    for path in (live, dead):
        path.mkdir()
        (path / "part").write_bytes(b"x" * 10)
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open_sharded(memory_dataset, cache_dir=cache) as data:
            data.get(30)  # a fetch, which makes room, which sweeps
        assert live.is_dir() and not dead.exists()
    finally:
        os.close(fd)
    with open_sharded(memory_dataset, cache_dir=cache) as data:
        data.get(60)
    assert not live.exists()


def test_threads_share_a_dataset_handle_with_few_open_shards(tmp_path: Path) -> None:
    """get_many from many threads at once, with fewer open handles than shards: no handle is closed or
    opened twice under another thread's read."""
    _write(tmp_path / "ds", shard_size=10)
    with open_sharded(tmp_path / "ds", open_shards=2) as data:
        check_threads_read(data, IMAGES, LABELS, threads=6)
        assert len(data._open) <= 2


def test_iterating_and_verifying_while_other_threads_read(tmp_path: Path) -> None:
    """``for x in data`` and ``verify()`` hold their shard as a read does: other threads' reads, which drop
    shards to keep ``open_shards``, do not close it under them."""
    import threading

    images, labels = random_images(3000, (4, 4, 3), seed=9)
    with ShardedWriter(tmp_path / "ds", backend="lmdb", shard_size=1000) as writer:
        writer.add(images, labels)
    with open_sharded(tmp_path / "ds", open_shards=1) as data:
        stop = threading.Event()

        def read_other_shards() -> None:
            while not stop.is_set():
                data.get(2999)
                data.get(0)

        reader = threading.Thread(target=read_other_shards)
        reader.start()
        try:
            for _ in range(2):
                seen = [(image, label) for image, label in data]
                assert np.array_equal(np.stack([image for image, _ in seen]), images)
                assert [label for _, label in seen] == labels.tolist()
                data.verify()
        finally:
            stop.set()
            reader.join()


def test_close_brings_the_cache_back_under_its_bound(memory_dataset: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with open_sharded(memory_dataset, cache_dir=cache, cache_bytes=1 << 30) as data:
        shard_bytes = max(s.bytes for s in data.shards)
    bound = int(2.5 * shard_bytes)
    data = open_sharded(memory_dataset, cache_dir=cache, cache_bytes=bound, open_shards=4)
    data.get_many(range(100))  # four shards open, so pinned: above the bound while open
    assert data.cache is not None and data.cache.used_bytes() > bound
    data.close()
    assert data.cache.used_bytes() <= bound


@pytest.mark.parametrize("backend", ["lmdb", "sqlite"])
def test_close_while_threads_read_ends_their_reads_cleanly(tmp_path: Path, backend: str) -> None:
    """close() with reads running in other threads: each read ends (its data right) or meets StoreClosedError;
    no store is closed under a read (that crashed the process on lmdb and sqlite shards)."""
    import threading

    images, labels = random_images(2000, (8, 8, 3), seed=10)
    with ShardedWriter(tmp_path / "ds", backend=backend, shard_size=500) as writer:
        writer.add(images, labels)
    for _ in range(15):
        data = open_sharded(tmp_path / "ds")
        start, ends = threading.Barrier(4), []

        def read(data: Any = data, start: threading.Barrier = start, ends: list[str] = ends) -> None:
            start.wait()
            rng = np.random.default_rng()
            try:
                while True:
                    order = rng.permutation(2000)[:200]
                    assert np.array_equal(data.get_many(order)[0], images[order])
            except imgstore.StoreClosedError:
                ends.append("closed")
            except BaseException as exc:
                ends.append(repr(exc))

        threads = [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        start.wait()
        time.sleep(0.02)
        data.close()
        for thread in threads:
            thread.join()
        assert ends == ["closed"] * 3


def test_a_shards_folder_that_is_a_link_is_never_written_through(tmp_path: Path) -> None:
    from imgstore.sharded.building import convert_sharded

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(imgstore.CorruptStoreError, match="symbolic link"):
        convert_sharded("synthetic:20", tmp_path / "ds", shards=2, backend="lmdb")
    with pytest.raises(imgstore.CorruptStoreError, match="symbolic link"):
        _write(tmp_path / "ds", shard_size=10)
    assert not list((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "ds" / MANIFEST_NAME).exists()
