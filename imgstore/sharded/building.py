"""Building a sharded dataset from an ImageFolder tree: one task per shard, on threads here or on Dask distributed.

A task's input is its shard's source file paths and labels (not pixels): it reads the files,
writes them as they are (``codec="keep"``) into a new store with :func:`write_shard`, which seals
it under a fresh random name, and returns the shard's :class:`ShardInfo`. Only when every task has
returned is the manifest committed, with the shards in source order. A task that dies midway (its
worker killed) leaves an unsealed ``shards/.shard-*.tmp`` (or nothing remote), never named by any
manifest; Dask runs the task again on another worker (``retries``; a lost worker's tasks are
rescheduled by the scheduler), which writes a new shard under another name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from imgstore.errors import InvalidOptionError, MissingDependencyError, StoreExistsError
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import DatasetManifest, ShardInfo
from imgstore.sharded.writing import commit_shards, read_committed, write_shard
from imgstore.sources import find_classes, image_files
from imgstore.store import Store

Engine = Literal["local", "dask"]
ENGINES = ("local", "dask")


def build_shard(
    dest: str,
    root: str,
    paths: Sequence[str],
    labels: Sequence[int],
    backend: str,
    classes: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
) -> ShardInfo:
    """Write and seal one shard of ``dest`` from these files (relative to ``root``): the call a task runs."""

    def fill(store: Store) -> None:
        blobs = []
        for path in paths:
            with open(os.path.join(root, path), "rb") as f:
                blobs.append(f.read())
        store.put_encoded_many(blobs, np.asarray(labels, np.int64), paths=list(paths))

    return write_shard(
        dest,
        backend=backend,
        fill=fill,
        storage_options=storage_options,
        codec="keep",
        image_mode="RGB",
        classes=list(classes),
    )


def convert_sharded(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    shards: int,
    backend: str = "lmdb",
    engine: Engine = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 3,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetManifest:
    """Convert the ImageFolder tree ``source`` into a new sharded dataset at ``dest`` of ``shards`` shards.

    ``engine="local"``: ``workers`` threads here (default: one per core). ``engine="dask"``: one
    task per shard on Dask distributed: the cluster at ``scheduler`` (an address), else a
    ``LocalCluster`` of ``workers`` processes (default 2) made for this call.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InvalidOptionError(f"shards must be a positive integer, got {shards!r}")
    if engine not in ENGINES:
        raise InvalidOptionError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if scheduler is not None and engine != "dask":
        raise InvalidOptionError("a scheduler address needs engine='dask'")
    root = os.fspath(source)
    classes = find_classes(root)
    paths, labels = image_files(root, classes)
    if shards > len(paths):
        raise InvalidOptionError(f"{shards} shards for {len(paths)} images: at most one shard per image")
    url = Location(dest, storage_options).url
    if read_committed(Location(dest, storage_options)).revision:
        raise StoreExistsError(f"{url} already holds a sharded dataset")
    cuts = np.array_split(np.arange(len(paths)), shards)
    tasks = [([paths[i] for i in part], labels[part].tolist()) for part in cuts]
    args: tuple[str, list[str], dict[str, Any]] = (backend, classes, dict(storage_options or {}))
    if engine == "local":
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            infos = list(pool.map(lambda task: build_shard(url, root, task[0], task[1], *args), tasks))
    else:
        infos = _on_dask(url, root, tasks, args, scheduler, workers, retries)
    return commit_shards(url, infos, expect_revision=0, storage_options=storage_options)


def _on_dask(
    url: str,
    root: str,
    tasks: list[tuple[list[str], list[int]]],
    args: tuple[str, list[str], dict[str, Any]],
    scheduler: str | None,
    workers: int | None,
    retries: int,
) -> list[ShardInfo]:
    try:
        from distributed import Client, LocalCluster
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"engine='dask' needs Dask distributed: pip install 'imgstore-ml[dask]' ({exc})"
        ) from exc
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None)  # type: ignore[no-untyped-call]
    try:
        with Client(scheduler or cluster) as client:  # type: ignore[no-untyped-call]
            futures = [
                client.submit(build_shard, url, root, shard_paths, shard_labels, *args, retries=retries, pure=False)
                for shard_paths, shard_labels in tasks
            ]
            infos: list[ShardInfo] = client.gather(futures)
            return infos
    finally:
        if cluster is not None:
            cluster.close()
