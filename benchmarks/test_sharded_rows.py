"""Sharded rows (``--sharded``; off by default): a sharded dataset read from a local S3 server with the
cache cold and warm, by shard size; a few records of a tar shard by byte ranges against a whole
fetch; and ``convert --shards`` on 1 and 2 Dask worker processes.

Timed: reading every record (one ``get_many`` a shard, shuffled shard order) from a handle opened
before the round; a cold round's cache directory is new and empty (the setup), a warm one was
filled by an untimed read. Conversion: ``convert_sharded`` into a new destination (the setup names
it) on a ``LocalCluster`` started once. The server, the cluster and the source files are made once
a module. ``benchmarks/sharded_s3.py`` and ``benchmarks/sharded_build.py`` are the longer scripts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.sharded_build import _folder
from benchmarks.sharded_s3 import _read_all
from imgstore.datasets import load_dataset
from imgstore.sharded import ShardedDataset, ShardedWriter, open_sharded
from imgstore.sharded.building import convert_sharded

IMAGES = 10_000
SHARD_SIZES = (1_000, 5_000)
BUILD_IMAGES, BUILD_SHARDS = 4_000, 4
_names = itertools.count()


@pytest.fixture(autouse=True)
def _only_with_sharded(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("sharded"):
        pytest.skip("sharded rows: run with --sharded")


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Any]:
    if not request.config.getoption("sharded"):
        pytest.skip("sharded rows: run with --sharded")
    pytest.importorskip("s3fs")
    from imgstore.testing.s3server import MotoServer

    with MotoServer() as running:
        yield running


@pytest.fixture(scope="module")
def uploaded(server: Any) -> dict[int, str]:
    images, labels = load_dataset("synthetic", IMAGES)
    urls = {}
    for size in SHARD_SIZES:
        urls[size] = server.make_bucket(f"rows-{size}") + "/ds"
        with ShardedWriter(urls[size], backend="lmdb", shard_size=size, storage_options=server.storage_options()) as w:
            w.add(images, labels)
    return urls


def _timed_read(data: ShardedDataset) -> None:
    assert _read_all(data, seed=0) == IMAGES


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("shard_size", SHARD_SIZES)
def test_sharded_s3_read(
    benchmark: Any, server: Any, uploaded: dict[int, str], tmp_path: Path, shard_size: int, cache: str
) -> None:
    benchmark.group = f"sharded s3 read n={IMAGES} {cache}"
    opened: list[ShardedDataset] = []

    def setup() -> tuple[tuple[ShardedDataset], dict[str, Any]]:
        while opened:
            opened.pop().close()
        directory = tmp_path / f"cache-{next(_names)}"
        data = open_sharded(uploaded[shard_size], cache_dir=directory, storage_options=server.storage_options())
        if cache == "warm":
            _timed_read(data)  # untimed: fills the cache
        opened.append(data)
        return (data,), {}

    benchmark.pedantic(_timed_read, setup=setup, rounds=3)
    for data in opened:
        data.close()
    benchmark.extra_info.update(shard_size=shard_size, cache=cache, images=IMAGES)
    benchmark.extra_info["images_per_second"] = IMAGES / benchmark.stats.stats.median


RANGED_SHARD, RANGED_PICK = 5_000, 4


@pytest.fixture(scope="module")
def tar_shard(server: Any) -> str:
    images, labels = load_dataset("synthetic", RANGED_SHARD)
    url = server.make_bucket("rows-ranges") + "/ds"
    with ShardedWriter(url, backend="tar", shard_size=RANGED_SHARD, storage_options=server.storage_options()) as w:
        w.add(images, labels)
    return str(url)


@pytest.mark.parametrize("policy", ["ranges", "whole"])
def test_sharded_s3_few_records(benchmark: Any, server: Any, tar_shard: str, tmp_path: Path, policy: str) -> None:
    """A few random records of a tar shard not cached: byte ranges against the whole fetch (remote_reads)."""
    benchmark.group = f"sharded s3 {RANGED_PICK} random records of a {RANGED_SHARD}-image tar shard, cold"
    picked = np.random.default_rng(0).choice(RANGED_SHARD, RANGED_PICK, replace=False)
    handles: list[ShardedDataset] = []

    def fresh() -> tuple[tuple[ShardedDataset], dict[str, Any]]:  # a new handle on a new, empty cache
        for old in handles:
            old.close()
        cache = tmp_path / f"cache-{next(_names)}"
        handles[:] = [
            open_sharded(tar_shard, cache_dir=cache, storage_options=server.storage_options(), remote_reads=policy)
        ]
        return (handles[0],), {}

    benchmark.pedantic(lambda data: data.get_many(picked), setup=fresh, rounds=5)
    handles[0].close()
    benchmark.extra_info.update(policy=policy, shard_images=RANGED_SHARD, records=RANGED_PICK)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded-source")
    _folder(root, BUILD_IMAGES)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_dask_convert(benchmark: Any, source: Path, tmp_path: Path, workers: int) -> None:
    distributed = pytest.importorskip("distributed")
    benchmark.group = f"sharded dask convert n={BUILD_IMAGES}"
    with distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:

        def setup() -> tuple[tuple[Path], dict[str, Any]]:
            return (tmp_path / f"ds-{next(_names)}",), {}

        def build(dest: Path) -> None:
            manifest = convert_sharded(
                source, dest, shards=BUILD_SHARDS, engine="dask", scheduler=cluster.scheduler_address
            )
            assert sum(s.count for s in manifest.shards) == BUILD_IMAGES

        benchmark.pedantic(build, setup=setup, rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(workers=workers, images=BUILD_IMAGES, shards=BUILD_SHARDS)
    benchmark.extra_info["seconds_per_shard_per_worker"] = float(np.round(median * workers / BUILD_SHARDS, 4))
