"""Building a sharded dataset from a folder or a dataset: one task per shard, on threads here or on Dask distributed.

The source (an ImageFolder tree, or a dataset such as ``cifar10:PATH`` or ``imagenet-like:N``) is
shuffled (``shuffle=True``, the default: an ImageFolder is sorted by class, and a shard of
consecutive files would hold one or two classes, so would every batch read from it) with
``seed``, then cut into ``shards`` parts of equal size (within one). A task's input is its part
as a :class:`~imgstore.sources.Source` that pickles (a folder's file paths, absolute, and labels,
which the task reads where it runs; or a dataset's images): it converts them as ``imgstore
convert`` does (same codec, image mode, shape and checks) into a new store with
:func:`write_shard`, which seals it under a fresh random name, and returns the shard's
:class:`ShardInfo`. Only when every task has returned is the manifest committed, with the shards
in order (``append=True``: after the dataset's own shards). A task that dies midway (its worker
killed) leaves an unsealed ``shards/.shard-*.tmp`` (or nothing remote), never named by any
manifest; Dask runs the task again on another worker (``retries``; a lost worker's tasks are
rescheduled by the scheduler), which writes a new shard under another name. A bad file fails its
task (on Dask returned as a value, not retried: :mod:`imgstore.sharded.on_dask`), and so the
build, before any commit; the shards it sealed are deleted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgstore.convert import OnError, Skipped, check_backend_holds, fill_store, store_layout
from imgstore.errors import InvalidOptionError, StoreExistsError
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import MANIFEST_NAME, SHARDS_DIR, DatasetManifest, ShardInfo
from imgstore.sharded.writing import LOCK_NAME, check_classes, commit_shards, read_committed, write_shard
from imgstore.sources import Source, Target, make_target, open_source
from imgstore.store import Store

Engine = Literal["local", "dask"]
ENGINES = ("local", "dask")


@dataclass(frozen=True)
class ShardJob:
    """What every task of a build does with its part (it pickles, for Dask)."""

    backend: str
    target: Target
    storage_options: dict[str, Any]
    on_error: OnError = "fail"
    name_prefix: str = ""  # hex: the build's shards' names start with it (so that it can find them)


@dataclass(frozen=True)
class Built:
    """A task's outcome: its sealed shard, and the bad files it skipped (``on_error="skip"``)."""

    info: ShardInfo
    skipped: list[Skipped]


def build_shard(dest: str, part: Source, job: ShardJob) -> Built:
    """Write and seal one shard of ``dest`` from ``part`` of the source: the call a task runs."""
    skipped: list[Skipped] = []

    def fill(store: Store) -> None:
        skipped.extend(fill_store(part, store, job.target, on_error=job.on_error).skipped)

    info = write_shard(
        dest,
        backend=job.backend,
        fill=fill,
        storage_options=job.storage_options,
        name_prefix=job.name_prefix,
        **store_layout(job.target),
    )
    return Built(info, skipped)


def convert_sharded(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    shards: int,
    backend: str = "lmdb",
    codec: str | None = None,
    quality: int | None = None,
    image_mode: str | None = "auto",
    shape: tuple[int, ...] | None = None,
    full_check: bool = False,
    downscale: int | None = None,
    split: str = "train",
    shuffle: bool = True,
    seed: int = 0,
    append: bool = False,
    on_error: OnError = "fail",
    skipped: list[Skipped] | None = None,
    engine: Engine = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 3,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetManifest:
    """Convert ``source`` (a folder or a dataset: :func:`imgstore.sources.open_source`) into a new sharded
    dataset at ``dest`` of ``shards`` shards, each converted as :func:`imgstore.convert.convert` would
    with these ``codec``, ``quality``, ``image_mode``, ``shape``, ``full_check`` and ``downscale``. ``shuffle``: mix
    the items (with ``seed``) before cutting them into shards, else keep the source's order.
    ``append``: add the shards to the dataset at ``dest`` (else a dataset there is refused).
    ``on_error``: ``"fail"`` stops the build at the first bad file (nothing committed); ``"skip"``
    leaves bad files out, each appended to ``skipped`` (a list the caller gives) as it would be
    listed by :func:`imgstore.convert.convert`.

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
    src = open_source(source, split=split)
    try:
        target = make_target(src, codec, quality, image_mode, full_check, shape, downscale)
        check_backend_holds(backend, target)
        if shards > src.total:
            raise InvalidOptionError(f"{shards} shards for {src.total} images: at most one shard per image")
        order = np.random.default_rng(seed).permutation(src.total) if shuffle else np.arange(src.total)
        parts = [src.part(items) for items in np.array_split(order, shards)]
    finally:
        src.close()
    location = Location(dest, storage_options)
    if location.local is not None:
        src.check_outside(location.local)
        _check_dest(location.local)
    else:
        _check_remote_dest(location)
    url = str(location.local) if location.local is not None else location.url  # absolute: a remote worker's too
    committed = read_committed(location)
    revision = committed.revision
    if revision and not append:
        raise StoreExistsError(f"{location.url} already holds a sharded dataset (append=True, --append: add shards)")
    check_classes(committed, target.classes)
    options = dict(storage_options or {})
    if on_error not in ("fail", "skip"):
        raise InvalidOptionError(f"on_error takes 'fail' or 'skip', not {on_error!r}")
    job = ShardJob(backend, target, options, on_error)
    if engine == "local":
        built = _on_threads(location, parts, job, workers)
    else:
        from imgstore.sharded.on_dask import build_on_dask

        built = build_on_dask(location, parts, job, scheduler, workers, retries)
    if skipped is not None:
        skipped.extend(s for b in built for s in b.skipped)
    return commit_shards(url, [b.info for b in built], expect_revision=revision, storage_options=storage_options)


def _check_dest(root: Path) -> None:
    """A local DEST is new, or a folder holding only what a sharded build makes (a failed build's included)."""
    if os.path.lexists(root) and not root.is_dir():
        raise StoreExistsError(f"{root} is a file; a sharded dataset is a folder")
    ours = {SHARDS_DIR, MANIFEST_NAME, LOCK_NAME}
    foreign = sorted(set(os.listdir(root)) - ours) if root.is_dir() else []
    if foreign:
        raise StoreExistsError(
            f"{root} is a non-empty folder that is not a sharded dataset (it holds {', '.join(foreign[:3])}); "
            "not writing into it"
        )


def _check_remote_dest(location: Location) -> None:
    """A remote DEST (a prefix) is empty, or holds only what a sharded build makes."""
    try:
        names = {path.rstrip("/").rsplit("/", 1)[-1] for path in location.fs.ls(location.url, detail=False)}
    except FileNotFoundError:
        return
    foreign = sorted(names - {SHARDS_DIR, MANIFEST_NAME})
    if foreign:
        raise StoreExistsError(
            f"{location.url} holds other objects than a sharded dataset's ({', '.join(foreign[:3])}); not writing there"
        )


def _on_threads(location: Location, parts: list[Source], job: ShardJob, workers: int | None) -> list[Built]:
    """Every part's shard built on threads; at the first failure the parts not started are not, and the shards
    this build sealed are deleted (no manifest names them: the build is not resumed, it is run again)."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(build_shard, location.url, part, job) for part in parts]
        try:
            done, _pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)
            for future in futures:
                if not future.cancelled() and future.exception() is None:
                    location.remove_shard_folder(future.result().info.name)
            raise
