"""Remote tar shards read by byte ranges (``remote_reads``), against moto's S3 server in its own process.

Real HTTP through s3fs, nothing patched: the ranged GETs, a damaged object on the server, the
server SIGKILLed while ranges are in flight (seen through a counting relay).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.sharded import ShardedWriter, open_sharded, read_committed
from imgstore.sharded.location import Location
from imgstore.sharded.ranges import use_ranges
from imgstore.testing import check_threads_read, random_images
from imgstore.testing.s3server import FlakyProxy, MotoServer, s3_available

pytestmark = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))

IMAGES, LABELS = random_images(200, (16, 16, 3), seed=21)
BIG, BIG_LABELS = random_images(100, (256, 256, 3), seed=22)  # one 20 MB shard of 197 KB records


def _write(url: str, options: dict[str, Any] | None, images: Any = IMAGES, labels: Any = LABELS, **kw: Any) -> None:
    with ShardedWriter(url, backend=kw.pop("backend", "tar"), shard_size=100, storage_options=options, **kw) as w:
        w.add(images, labels)


def _entries(cache: Path) -> list[str]:
    """Complete cache entries (whole shards)."""
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _partials(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".ranges-")]


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_ranged_reads_return_what_a_local_read_does(
    s3_server: MotoServer, s3_url: str, tmp_path: Path, codec: str
) -> None:
    options = s3_server.storage_options(attempts=2)
    # several tar files per shard (shard_bytes): spans of one request lie in different files
    _write(s3_url, options, codec=codec, shard_bytes=1 << 14)
    _write(str(tmp_path / "local"), None, codec=codec, shard_bytes=1 << 14)
    cache = tmp_path / "cache"
    order = np.random.default_rng(2).permutation(200)[:37]
    with (
        open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data,
        open_sharded(tmp_path / "local") as local,
    ):
        images, labels = data.get_many(order)
        expected, expected_labels = local.get_many(order)
        assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)
        assert np.array_equal(images, IMAGES[order]) and np.array_equal(labels, LABELS[order])
        image, label = data.get(int(order[0]))  # already fetched: read again from the partial copy
        assert np.array_equal(image, IMAGES[order[0]]) and label == LABELS[order[0]]
        fetched = data.ranged_bytes
        data.get(int(order[0]))
        assert data.ranged_bytes == fetched  # a record is fetched once
        assert 0 < fetched < sum(s.bytes for s in data.shards)
        assert not _entries(cache) and len(_partials(cache)) == 2  # nothing in the cache: one partial copy a shard
    assert not _partials(cache)  # deleted at close


def test_auto_reads_ranges_for_a_few_records_and_fetches_a_big_request_whole(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options, BIG, BIG_LABELS)
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options) as data:  # remote_reads="auto"
        info = data.shards[0]
        assert use_ranges("auto", info, 1) and not use_ranges("auto", info, 30)  # the model's verdicts
        assert np.array_equal(data.get(50)[0], BIG[50])
        assert not _entries(cache) and len(_partials(cache)) == 1 and 0 < data.ranged_bytes < info.bytes / 10
        ranged = data.ranged_bytes
        images, labels = data.get_many(range(10, 40))  # 30% of the shard: fetched whole into the cache
        assert np.array_equal(images, BIG[10:40]) and np.array_equal(labels, BIG_LABELS[10:40])
        assert _entries(cache) == [f"{info.checksum}-{info.bytes}"]
        assert not _partials(cache) and data.ranged_bytes == ranged  # the partial copy dropped, no more ranges
        assert np.array_equal(data.get(51)[0], BIG[51]) and data.ranged_bytes == ranged  # from the cache
    with open_sharded(s3_url, cache_dir=tmp_path / "other", storage_options=options, remote_reads="whole") as data:
        data.get(5)
        assert len(_entries(tmp_path / "other")) == 1 and data.ranged_bytes == 0


def test_auto_turns_to_the_whole_fetch_when_small_requests_add_up(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    """A scan in small requests (one record each here) is not read entirely by ranges: once the records asked
    would cost more than the shard, the shard is fetched whole."""
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options, BIG, BIG_LABELS)
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options) as data:
        info = data.shards[0]
        ranged_gets = 0
        for index in range(20):
            assert np.array_equal(data.get(index)[0], BIG[index])
            if _entries(cache):
                break
            ranged_gets += 1
        budget = next(n for n in range(1, 100) if not use_ranges("auto", info, n)) - 1
        assert 1 <= ranged_gets == budget < 10
        assert _entries(cache) == [f"{info.checksum}-{info.bytes}"] and not _partials(cache)
        assert data.ranged_bytes < info.bytes / 2


def test_a_backend_without_ranges_is_fetched_whole(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options, backend="lmdb")
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data:
        assert np.array_equal(data.get(5)[0], IMAGES[5])
        assert len(_entries(cache)) == 1 and data.ranged_bytes == 0


def test_the_policy_is_checked_and_survives_pickling(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    with pytest.raises(imgstore.InvalidOptionError, match="remote_reads"):
        open_sharded(s3_url, cache_dir=tmp_path / "cache", storage_options=options, remote_reads="some")
    with open_sharded(s3_url, cache_dir=tmp_path / "cache", storage_options=options, remote_reads="whole") as data:
        again = pickle.loads(pickle.dumps(data))
        assert again.remote_reads == "whole"
        again.close()


def _damage(url: str, options: dict[str, Any], path: str, at: int | bytes) -> None:
    """Flip a bit of the object at ``path``: at byte ``at``, or 100 bytes into where the bytes ``at`` are."""
    fs = Location(url, options).fs
    key = f"{url.removeprefix('s3://')}/{path}"
    data = bytearray(fs.cat_file(key))
    where = at if isinstance(at, int) else data.index(at) + 100
    data[where] ^= 1
    fs.pipe_file(key, bytes(data))


def test_a_damaged_record_on_the_server_is_refused_and_nothing_kept(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    info = read_committed(Location(s3_url, options)).shards[1]
    tar = next(f.path for f in info.files if f.path.endswith(".tar"))
    _damage(s3_url, options, f"shards/{info.name}/{tar}", IMAGES[107].tobytes())  # inside record 107's pixels
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data:
        assert np.array_equal(data.get(106)[0], IMAGES[106])  # its neighbour is fine
        with pytest.raises(imgstore.CorruptStoreError, match="byte ranges.*nothing kept"):
            data.get(107)
        assert not _entries(cache) and not _partials(cache)
        assert np.array_equal(data.get(5)[0], IMAGES[5])  # the other shard still reads
        with pytest.raises(imgstore.CorruptStoreError):
            data.get_many([100, 107])  # refused again, fetched again: nothing was kept
        assert not _entries(cache) and len(_partials(cache)) == 1


def test_a_damaged_index_is_refused_before_any_record(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    info = read_committed(Location(s3_url, options)).shards[0]
    index = next(f.path for f in info.files if f.path.startswith("tarindex"))
    _damage(s3_url, options, f"shards/{info.name}/{index}", 10)
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data:
        with pytest.raises(imgstore.CorruptStoreError, match="checksum in the manifest"):
            data.get(3)
        assert not _entries(cache) and not _partials(cache)


def test_server_killed_mid_read_by_ranges(tmp_path: Path) -> None:
    """StoreIOError once s3fs's and botocore's retries give up (1 attempt here); nothing cached."""
    with MotoServer() as own:
        url = own.make_bucket("killed") + "/data"
        _write(url, own.storage_options(attempts=1), BIG, BIG_LABELS)
        proxy = FlakyProxy(own.port, cuts=0)  # relays and counts, never cuts
        cache = tmp_path / "cache"
        data = open_sharded(
            url,
            cache_dir=cache,
            storage_options=own.storage_options(attempts=1, endpoint=proxy.endpoint),
            remote_reads="ranges",
        )
        data.get(0)  # the partial copy: its index and checksums fetched; record 0
        start = proxy.relayed
        outcome: list[BaseException] = []

        def read() -> None:
            try:
                data.get_many(range(1, 100, 7))  # 15 ranges of 197 KB, 1.2 MB apart: not merged
            except BaseException as exc:
                outcome.append(exc)

        try:
            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 30
            while proxy.relayed - start < 200_000 and time.monotonic() < deadline:
                time.sleep(0.001)
            partial = proxy.relayed - start
            own.kill()
            proxy.close()  # the relay goes with it: new connections are refused, as by a dead server
            reader.join(60)  # measured: StoreIOError ~1 s after the kill
            assert 0 < partial < 2_900_000, "the ranged reads were not caught mid-way"
            assert len(outcome) == 1 and isinstance(outcome[0], imgstore.StoreIOError), outcome
            assert not _entries(cache)
            data.close()
            assert not _partials(cache)
        finally:
            proxy.close()


def _child_reads(data: Any, index: int, expected: np.ndarray) -> None:
    image, _label = data.get(index)  # a partial copy of its own (the inherited one is the parent's)
    data.close()
    os._exit(0 if np.array_equal(image, expected) else 3)


def test_a_forked_child_leaves_its_parents_partial_copy(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    """A DataLoader worker started by fork inherits the handle: it must not delete the parent's copy."""
    import multiprocessing

    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data:
        assert np.array_equal(data.get(3)[0], IMAGES[3])
        mine = _partials(cache)
        child = multiprocessing.get_context("fork").Process(target=_child_reads, args=(data, 7, IMAGES[7]))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert _partials(cache) == mine  # the child's own copy is gone, the parent's is there
        assert np.array_equal(data.get(9)[0], IMAGES[9]) and np.array_equal(data.get(3)[0], IMAGES[3])
    assert not _partials(cache)


def test_a_partial_copy_is_swept_only_when_no_process_holds_its_lock(tmp_path: Path) -> None:
    """Liveness by the owner's flock, not its PID: a reader in another PID namespace sharing the cache (pods on
    one node) has a PID that means nothing here, or another live process's."""
    import fcntl

    from imgstore.sharded.cache import ShardCache

    cache = ShardCache(tmp_path / "cache", 1 << 20)
    dead = tmp_path / "cache" / f".ranges-{os.getpid()}-0badf00d"  # a live PID, but nobody holds it
    live = tmp_path / "cache" / ".ranges-999999999-0dead000"  # no such PID here, but held
    for path in (dead, live):
        path.mkdir()
        (path / "imgstore.json").write_text("{}")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cache.entries() == []
        assert not dead.exists() and live.is_dir()
    finally:
        os.close(fd)
    cache.entries()
    assert not live.exists()


def _ranged_dataset(server: MotoServer, url: str, cache: Path) -> Any:
    """IMAGES written at ``url``, opened to read by ranges with a cache at ``cache``."""
    options = server.storage_options(attempts=2)
    _write(url, options)
    return open_sharded(url, cache_dir=cache, storage_options=options, remote_reads="ranges")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_reader_in_another_pid_namespace_keeps_a_live_readers_partial_copy(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    options = s3_server.storage_options(attempts=2)
    other = (  # fetches shard 1 whole: sweeps the cache first, from a PID namespace where our PID is not
        "import sys; from imgstore.sharded import open_sharded\n"
        f"with open_sharded({s3_url!r}, cache_dir={str(cache)!r}, storage_options={options!r}, "
        "remote_reads='whole') as d: d.get(150)\n"
    )
    with _ranged_dataset(s3_server, s3_url, cache) as data:
        data.get(3)
        mine = _partials(cache)
        subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", other], check=True, timeout=60)
        assert len(_entries(cache)) == 1 and _partials(cache) == mine
        assert np.array_equal(data.get(50)[0], IMAGES[50])


def test_a_partial_copy_deleted_under_its_reader_is_made_again(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with _ranged_dataset(s3_server, s3_url, cache) as data:
        assert np.array_equal(data.get(3)[0], IMAGES[3])
        (gone,) = _partials(cache)
        shutil.rmtree(cache / gone)
        images, labels = data.get_many([50, 51, 3])
        assert np.array_equal(images, IMAGES[[50, 51, 3]]) and np.array_equal(labels, LABELS[[50, 51, 3]])
        assert len(_partials(cache)) == 1 and _partials(cache) != [gone]
        assert np.array_equal(data.get(52)[0], IMAGES[52])
    assert not _partials(cache)


def test_dataloader_workers_delete_their_partial_copies_at_exit(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    """Workers never close the dataset: their copies go at their exit (and a killed one's at the next copy made)."""
    from torch.utils.data import DataLoader

    cache = tmp_path / "cache"
    with _ranged_dataset(s3_server, s3_url, cache) as data:
        seen = [labels.numpy() for _images, labels in DataLoader(data, batch_size=25, num_workers=2, shuffle=True)]
        assert sorted(np.concatenate(seen).tolist()) == sorted(LABELS.tolist())
        assert not _partials(cache) and not _entries(cache)
        killed = cache / ".ranges-999999999-0badf00d"  # as a worker SIGKILLed leaves it: nobody holds its lock
        killed.mkdir()
        data.get(3)
        assert not killed.exists() and len(_partials(cache)) == 1


@pytest.mark.parametrize("policy", ["ranges", "whole", "local"])
def test_float_and_bool_indices_are_refused_as_a_store_refuses_them(
    s3_server: MotoServer, s3_url: str, tmp_path: Path, policy: str
) -> None:
    """Never a record numpy's cast picked (1.5 -> 1, True -> 1): the errors a plain Store gives, on every path."""
    options = s3_server.storage_options(attempts=2)
    url = str(tmp_path / "local") if policy == "local" else s3_url
    _write(url, None if policy == "local" else options)
    if policy == "local":
        data = open_sharded(url)
    else:
        data = open_sharded(url, cache_dir=tmp_path / "cache", storage_options=options, remote_reads=policy)
    with data:
        for bad in ([1.5], np.ones(200, bool), [True, False], np.array([2.0]), [[1, 2], [3, 4]]):
            with pytest.raises(imgstore.InvalidOptionError, match="indices must"):
                data.get_many(bad)
        for one in (2.7, 2.0, True, np.bool_(False), "3"):
            with pytest.raises(imgstore.InvalidOptionError, match="an index must be an integer"):
                data.get(one)  # type: ignore[arg-type]
        with pytest.raises(imgstore.StoreIndexError):
            data.get_many([0, 200])
        images, labels = data.get_many(np.array([150, -1, 3], np.int16))  # other integer dtypes still read
        assert np.array_equal(images, IMAGES[[150, 199, 3]]) and np.array_equal(labels, LABELS[[150, 199, 3]])
        assert np.array_equal(data.get(np.int64(-200))[0], IMAGES[0])
        assert np.array_equal(data.get_many(slice(198, None))[1], LABELS[198:])


def test_a_truncated_or_deleted_object_read_by_ranges_is_corrupt(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    """A range past a truncated object's end is HTTP 416: the manifest says the file is longer, so the store is
    damaged (CorruptStoreError), not the network."""
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    fs = Location(s3_url, options).fs
    shards = read_committed(Location(s3_url, options)).shards
    tars = [next(f.path for f in info.files if f.path.endswith(".tar")) for info in shards]
    keys = [f"{s3_url.removeprefix('s3://')}/shards/{info.name}/{tar}" for info, tar in zip(shards, tars, strict=True)]
    fs.pipe_file(keys[0], fs.cat_file(keys[0])[: shards[0].bytes // 2])
    fs.rm(keys[1])
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges") as data:
        assert np.array_equal(data.get(3)[0], IMAGES[3])  # in the half still there
        with pytest.raises(imgstore.CorruptStoreError, match="truncated"):
            data.get(90)
        with pytest.raises(imgstore.CorruptStoreError, match="missing"):
            data.get(150)
        assert not _entries(cache) and not _partials(cache)


def test_threads_reading_one_shard_make_one_partial_copy(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with _ranged_dataset(s3_server, s3_url, cache) as data:
        start = threading.Barrier(4)
        got: dict[int, Any] = {}

        def read(index: int) -> None:
            start.wait()
            got[index] = data.get(index)

        threads = [threading.Thread(target=read, args=(100 + 7 * i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(np.array_equal(got[i][0], IMAGES[i]) and got[i][1] == LABELS[i] for i in got) and len(got) == 4
        assert len(_partials(cache)) == 1  # none orphaned
    assert not _partials(cache)


def test_auto_keeps_to_ranges_for_a_shard_bigger_than_the_cache(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    """The whole fetch would refuse a shard over cache_bytes (InvalidOptionError): auto reads it by ranges, however
    much is asked; "whole" still refuses it."""
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    cache = tmp_path / "cache"
    small = min(s.bytes for s in read_committed(Location(s3_url, options)).shards) // 2
    with open_sharded(s3_url, cache_dir=cache, cache_bytes=small, storage_options=options) as data:
        for start in range(0, 200, 40):  # adds up to every record: past auto's budget for a whole fetch
            images, labels = data.get_many(range(start, start + 40))
            assert np.array_equal(images, IMAGES[start : start + 40]) and np.array_equal(
                labels, LABELS[start : start + 40]
            )
        assert not _entries(cache) and len(_partials(cache)) == 2
    with open_sharded(
        s3_url, cache_dir=cache, cache_bytes=small, storage_options=options, remote_reads="whole"
    ) as data:
        with pytest.raises(imgstore.InvalidOptionError, match="cache_bytes"):
            data.get(3)


def test_threads_reading_by_ranges_while_another_opens_shards_whole(
    s3_server: MotoServer, s3_url: str, tmp_path: Path
) -> None:
    """Opening a shard whole drops its partial copy, and open_shards=1 closes the other shard's store:
    neither is closed under a thread still reading it."""
    cache = tmp_path / "cache"
    options = s3_server.storage_options(attempts=2)
    _write(s3_url, options)
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="ranges", open_shards=1) as data:
        check_threads_read(data, IMAGES, LABELS, steps=30, disturb=lambda step: data.shard(step % 2))
    assert not _partials(cache)
