"""Sharded datasets on a real S3-compatible server on localhost (moto's server, its own process), through s3fs.

Nothing in this process is patched: s3fs talks HTTP to the server. Faults are real too: the server
process is killed mid-download, a relay resets a connection mid-transfer, an object is replaced by
a truncated or damaged copy on the server.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.sharded import ShardedWriter, open_sharded, read_committed, write_shard
from imgstore.sharded.location import Location
from imgstore.testing import random_images
from imgstore.testing.s3server import FlakyProxy, MotoServer, s3_available

pytestmark = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))

IMAGES, LABELS = random_images(100, (16, 16, 3), seed=11)


@pytest.fixture
def server(s3_server: MotoServer) -> MotoServer:
    return s3_server  # tests/conftest.py: one server for the session


@pytest.fixture
def url(s3_url: str) -> str:
    return s3_url


def _options(server: MotoServer, **kw: Any) -> dict[str, Any]:
    return server.storage_options(attempts=2, **kw)


def _write(url: str, options: dict[str, Any], backend: str = "lmdb", mode: str = "w") -> None:
    with ShardedWriter(url, backend=backend, shard_size=40, mode=mode, storage_options=options) as writer:
        writer.add(IMAGES, LABELS)


def _entries(cache: Path) -> dict[str, int]:
    """Complete cache entries and their inodes (a new download is a new directory)."""
    return {p.name: p.stat().st_ino for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_round_trip_through_the_cache_cold_then_warm(
    server: MotoServer, url: str, tmp_path: Path, backend: str
) -> None:
    options = _options(server)
    _write(url, options, backend)
    cache = tmp_path / "cache"
    order = np.random.default_rng(1).permutation(100)
    with open_sharded(url, cache_dir=cache, storage_options=options) as data:
        assert len(data) == 100 and [s.count for s in data.shards] == [40, 40, 20]
        images, labels = data.get_many(order)  # cold: every shard downloaded, checked, renamed in
        assert np.array_equal(images, IMAGES[order]) and np.array_equal(labels, LABELS[order])
    cold = _entries(cache)
    assert len(cold) == 3 and not _leftovers(cache)
    with open_sharded(url, cache_dir=cache, storage_options=options) as data:
        images, labels = data.get_many(order)  # warm: nothing fetched again
        assert np.array_equal(images, IMAGES[order]) and np.array_equal(labels, LABELS[order])
        data.verify()
    assert _entries(cache) == cold


def test_shards_are_uploaded_before_the_manifest(server: MotoServer, url: str, tmp_path: Path) -> None:
    options = _options(server)
    info = write_shard(url, IMAGES[:50], LABELS[:50], backend="lmdb", storage_options=options)
    fs = Location(url, options).fs
    listed = {p.rsplit("/shards/", 1)[1] for p in fs.find(url.removeprefix("s3://"))}
    assert listed == {f"{info.name}/{f.path}" for f in info.files}  # the shard is there, no manifest yet
    with pytest.raises(imgstore.StoreNotFoundError):
        open_sharded(url, cache_dir=tmp_path / "cache", storage_options=options)


def test_a_reader_opened_before_an_append_keeps_its_view(server: MotoServer, url: str, tmp_path: Path) -> None:
    options = _options(server)
    _write(url, options)
    old = open_sharded(url, cache_dir=tmp_path / "cache", storage_options=options)
    more, more_labels = random_images(30, (16, 16, 3), seed=12)
    with ShardedWriter(url, backend="hdf5", shard_size=30, storage_options=options) as writer:
        writer.add(more, more_labels)
    assert len(old) == 100 and np.array_equal(old.get_many(range(100))[0], IMAGES)
    with pytest.raises(imgstore.StoreIndexError):
        old.get(100)
    with open_sharded(url, cache_dir=tmp_path / "cache", storage_options=options) as new:
        assert len(new) == 130 and np.array_equal(new.get_many(range(100, 130))[0], more)
    assert old.refresh() == 130 and np.array_equal(old.get(100)[0], more[0])
    old.close()


def test_a_commit_racing_another_is_refused_not_lost(server: MotoServer, url: str) -> None:
    """The manifest's PUT is conditional on the ETag read (S3's If-Match), checked by the server."""
    options = _options(server)
    _write(url, options)
    slow = Location(url, options)
    seen = read_committed(slow)  # this writer read the manifest...
    fast = ShardedWriter(url, backend="lmdb", storage_options=options)
    fast.add(IMAGES[:10], LABELS[:10])
    fast.commit()  # ...then another committed
    mine = write_shard(url, IMAGES[10:20], LABELS[10:20], backend="lmdb", storage_options=options)
    with pytest.raises(imgstore.StoreBusyError):
        slow.write_manifest(seen.appended([mine]).to_json())
    assert [s.count for s in read_committed(Location(url, options)).shards] == [40, 40, 20, 10]


def test_the_cache_stays_within_its_bound_evicting_least_recently_used(
    server: MotoServer, url: str, tmp_path: Path
) -> None:
    options = _options(server)
    _write(url, options)
    cache = tmp_path / "cache"
    shards = read_committed(Location(url, options)).shards
    names = [f"{s.checksum}-{s.bytes}" for s in shards]
    bound = shards[0].bytes + shards[1].bytes + shards[2].bytes // 2
    with open_sharded(url, cache_dir=cache, cache_bytes=bound, storage_options=options, open_shards=1) as data:
        for index in (0, 40, 0, 80):  # shard 0 used again after 1: shard 1 is the least recently used
            assert np.array_equal(data.get(index)[0], IMAGES[index])
            assert data.cache is not None and data.cache.used_bytes() <= bound
        assert sorted(_entries(cache)) == sorted([names[0], names[2]])


def _replace_object(url: str, options: dict[str, Any], path: str, edit: Any) -> None:
    fs = Location(url, options).fs
    key = f"{url.removeprefix('s3://')}/{path}"
    fs.pipe_file(key, edit(fs.cat_file(key)))


@pytest.mark.parametrize("fault", ["truncated", "damaged"])
def test_a_bad_object_on_the_server_is_refused_and_not_cached(
    server: MotoServer, url: str, tmp_path: Path, fault: str
) -> None:
    options = _options(server)
    _write(url, options)
    info = read_committed(Location(url, options)).shards[1]
    biggest = max(info.files, key=lambda f: f.bytes).path

    def edit(data: bytes) -> bytes:
        if fault == "truncated":
            return data[: len(data) // 2]
        return data[:100] + bytes([data[100] ^ 1]) + data[101:]

    _replace_object(url, options, f"shards/{info.name}/{biggest}", edit)
    cache = tmp_path / "cache"
    with open_sharded(url, cache_dir=cache, storage_options=options) as data:
        assert np.array_equal(data.get(0)[0], IMAGES[0])
        with pytest.raises(imgstore.CorruptStoreError, match="truncated" if fault == "truncated" else "checksum"):
            data.get(40)
        assert np.array_equal(data.get(80)[0], IMAGES[80])  # the other shards still read
    assert len(_entries(cache)) == 2 and not _leftovers(cache)


def test_a_connection_reset_mid_transfer_is_retried(server: MotoServer, url: str, tmp_path: Path) -> None:
    """s3fs resumes a download whose body read fails (a ranged GET from the byte it reached)."""
    _write(url, _options(server))
    proxy = FlakyProxy(server.port, cut_after=20_000, cuts=1)  # the first shard's body is cut
    try:
        options = _options(server, endpoint=proxy.endpoint)
        with open_sharded(url, cache_dir=tmp_path / "cache", storage_options=options) as data:
            images, labels = data.get_many(range(100))
        assert proxy.cut == 1
        assert np.array_equal(images, IMAGES) and np.array_equal(labels, LABELS)
    finally:
        proxy.close()


def test_server_killed_mid_download(tmp_path: Path) -> None:
    """A clear StoreIOError once s3fs's and botocore's retries give up; no half shard left in the cache.

    s3fs retries a body read that fails (it reopens at the byte reached); that reopen finds no server,
    and botocore (here 1 attempt; its default is 5, ~10 s) gives up with EndpointConnectionError.
    """
    images, labels = random_images(100, (256, 256, 3), seed=13)  # one 20 MB shard
    with MotoServer() as own:
        url = own.make_bucket("killed") + "/data"
        options = own.storage_options(attempts=1)
        _write_one(url, options, images, labels)
        cache = tmp_path / "cache"
        data = open_sharded(url, cache_dir=cache, storage_options=options)
        outcome: list[BaseException] = []

        def read() -> None:
            try:
                data.get(0)
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30
        while _downloading(cache) < 1_000_000 and time.monotonic() < deadline:  # inside the big file
            time.sleep(0.001)
        partial = _downloading(cache)
        own.kill()
        reader.join(60)  # measured: StoreIOError (EndpointConnectionError) 0.5 s after the kill
        assert 0 < partial < 19_000_000, "the download was not caught mid-way"
        assert len(outcome) == 1 and isinstance(outcome[0], imgstore.StoreIOError), outcome
        assert not _entries(cache) and not _leftovers(cache)
        data.close()


def _write_one(url: str, options: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> None:
    with ShardedWriter(url, backend="lmdb", shard_size=len(images), mode="w", storage_options=options) as writer:
        writer.add(images, labels)


def _downloading(cache: Path) -> int:
    """Bytes so far in a download under way (0 if none)."""
    if not cache.is_dir():
        return 0
    return sum(f.stat().st_size for p in cache.glob(".tmp-*") for f in p.rglob("*") if f.is_file())


_READER = """
import hashlib, sys
import numpy as np
from imgstore.sharded import open_sharded
url, cache, bound, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
options = {options!r}
with open_sharded(url, cache_dir=cache, cache_bytes=bound, storage_options=options, open_shards=1) as data:
    digest = hashlib.sha256()
    for k in np.random.default_rng(seed).permutation(len(data.shards)).tolist():
        start = int(data.offsets[k])
        images, labels = data.get_many(range(start, start + data.shards[k].count))
    images, labels = data.get_many(range(len(data)))
    print(hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest())
"""


@pytest.mark.slow  # two Python processes importing numpy, imgstore and s3fs: 13 s on the loaded 2-core machine
def test_reader_processes_share_one_cache(server: MotoServer, url: str, tmp_path: Path) -> None:
    options = _options(server)
    _write(url, options)
    shards = read_committed(Location(url, options)).shards
    bound = max(s.bytes for s in shards) * 2  # two of three shards: both processes evict and fetch
    cache = tmp_path / "cache"
    script = tmp_path / "reader.py"
    script.write_text(_READER.format(options=options))
    readers = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(cache), str(bound), str(seed)], stdout=subprocess.PIPE, text=True
        )
        for seed in (1, 2)
    ]
    outputs = [reader.communicate(timeout=120)[0].strip() for reader in readers]
    expected = hashlib.sha256(IMAGES.tobytes() + LABELS.astype(np.int64).tobytes()).hexdigest()
    assert [reader.returncode for reader in readers] == [0, 0] and outputs == [expected, expected]
    assert not _leftovers(cache)
    assert sum(int(name.rsplit("-", 1)[1]) for name in _entries(cache)) <= bound + 2 * max(s.bytes for s in shards)


def test_the_readme_example_runs(server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("### Sharded datasets (local or object storage)")
    code = re.search(r"```python\n(.*?)```", readme[start:], re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:9000", server.endpoint)
    source = source.replace("/scratch/shards", str(tmp_path / "cache")).replace("s3://bucket/", "s3://readme/")
    server.make_bucket("readme")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    images, labels = random_images(12_000, (4, 4, 3), seed=14)
    names: dict[str, Any] = {"images": images, "labels": labels}
    exec(compile(source, "README.md", "exec"), names)
    assert np.array_equal(names["batch"], images[5000:10000]) and names["label"] == labels[123]
    assert names["store"].backend == "lmdb" and names["data"].shards[1].count == 5000
