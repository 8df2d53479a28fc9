"""Writing a sharded dataset: one call writes and seals one shard; one commit makes shards part of the dataset.

:func:`write_shard` is self-contained (a Dask task can run it anywhere the dataset's URL is
reachable) and returns a :class:`ShardInfo`; :func:`commit_shards` appends shard infos to the
manifest. :class:`ShardedWriter` does both for a stream of images.

A shard is written with the normal Store API into a fresh directory (locally: ``shards/.<name>.tmp``
then renamed to ``shards/<name>``; remotely: a local staging directory, uploaded file by file),
then sealed: its files are made read-only, listed and hashed. Only then may a manifest name it.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.errors import CorruptStoreError, InvalidOptionError, StoreBusyError, StoreExistsError, StoreIOError
from imgstore.fileio import fsync_dir
from imgstore.opening import open_store
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import (
    MANIFEST_NAME,
    SHARDS_DIR,
    DatasetManifest,
    ShardFile,
    ShardInfo,
    common_classes,
    list_files,
    parse_manifest,
    shard_checksum,
)
from imgstore.store import Store

Fill = Callable[[Store], None]
_PREFIX = re.compile(r"[0-9a-f]{0,16}")
LOCK_NAME = ".imgstore-sharded.lock"  # a local dataset's commit lock


def write_shard(
    dest: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray] | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    *,
    backend: str,
    fill: Fill | None = None,
    storage_options: Mapping[str, Any] | None = None,
    name_prefix: str = "",
    **store_options: Any,
) -> ShardInfo:
    """Write one shard of the dataset at ``dest`` and seal it; the dataset does not show it until committed.

    Give ``images`` and ``labels`` (``put_many``), or ``fill``: a function that writes into the new
    store (e.g. ``lambda s: s.put_encoded_many(blobs, labels)``). ``store_options`` go to
    :func:`imgstore.open_store` (``codec=``, ``shape=``, the backend's options). ``name_prefix``: hex
    digits the shard's random name starts with (a build's, so that it can find its own shards).
    """
    if (fill is None) == (images is None):
        raise InvalidOptionError("give images and labels, or fill=, to write a shard")
    if images is not None and labels is None:
        raise InvalidOptionError("labels are needed with images")
    location = Location(dest, storage_options)
    if not _PREFIX.fullmatch(name_prefix):
        raise InvalidOptionError(f"name_prefix must be up to 16 hex digits, got {name_prefix!r}")
    name = f"shard-{name_prefix}{secrets.token_hex(8)}"
    if location.local is not None:
        shards = location.local / SHARDS_DIR
        shards.mkdir(parents=True, exist_ok=True)
        if shards.is_symlink():  # the shard would be written (and committed) outside the dataset
            raise CorruptStoreError(
                f"{shards} is a symbolic link: imgstore never makes one there; nothing is written through it"
            )
        staging = shards / f".{name}.tmp"
        staging.mkdir()  # ours from now on: if it goes, a clean took it (below)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"imgstore-{name}-")) / "store"
    try:
        with open_store(staging, backend, "w", **store_options) as store:
            if fill is not None:
                fill(store)
            else:
                store.put_many(images, labels)  # type: ignore[arg-type]
            count, codec, shape = len(store), store.codec, store.shape
            classes = tuple(store.classes) if store.classes is not None else None
        files = seal(staging)
        info = ShardInfo(name, count, backend, codec, shape, files, shard_checksum(files), classes)
        if location.local is not None:
            os.rename(staging, location.shard_path(name))
            fsync_dir(staging.parent)  # the shard is in place on disk before any manifest names it
        else:
            location.upload_shard(name, staging, [f.path for f in files])
    except BaseException as exc:
        taken = location.local is not None and not os.path.lexists(staging)  # before our own clean-up below
        shutil.rmtree(staging.parent if location.local is None else staging, ignore_errors=True)
        if taken and isinstance(exc, Exception):
            raise StoreIOError(
                f"{staging}: this writer's unsealed shard was removed while it was written (by sharded-clean with "
                "a grace shorter than a shard takes to write?); nothing committed is lost, this shard is not written"
            ) from exc
        raise
    if location.local is None:
        shutil.rmtree(staging.parent, ignore_errors=True)  # our own staging directory
    return info


def seal(store_dir: Path) -> tuple[ShardFile, ...]:
    """Make a written store's files read-only and return their listing (path, size, XXH3-128)."""
    for dirpath, _dirs, filenames in os.walk(store_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return list_files(store_dir)


def read_committed(location: Location) -> DatasetManifest:
    raw = location.read_manifest()
    if raw is None:
        return DatasetManifest()
    return parse_manifest(raw, f"{location.url}/{MANIFEST_NAME}")


def commit_shards(
    dest: str | os.PathLike[str] | Location,
    shards: Sequence[ShardInfo],
    *,
    expect_revision: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetManifest:
    """Append sealed shards to the dataset's manifest (the commit point) and return the new manifest.

    ``expect_revision``: refuse (:class:`StoreBusyError`) if another writer committed since that
    revision was read, rather than drop its shards. Locally, commits are serialised by a lock file;
    on S3 the manifest's PUT is conditional on its ETag as read (:class:`StoreBusyError` if another
    writer committed in between); on other object stores one writer must commit at a time.
    """
    location = dest if isinstance(dest, Location) else Location(dest, storage_options)
    if location.local is not None:
        location.local.mkdir(parents=True, exist_ok=True)
        with commit_lock(location.local):
            return _commit(location, shards, expect_revision)
    return _commit(location, shards, expect_revision)


@contextmanager
def commit_lock(root: Path) -> Iterator[None]:
    """Hold a local dataset's commit lock (commits, and ``clean_shards``, are serialised by it)."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit(location: Location, shards: Sequence[ShardInfo], expect_revision: int | None) -> DatasetManifest:
    old = read_committed(location)
    if expect_revision is not None and old.revision != expect_revision:
        raise StoreBusyError(
            f"{location.url}: another writer committed (revision {old.revision}, expected {expect_revision}); these "
            f"{len(shards)} shards are written and sealed, not committed: commit_shards(url, shards) with "
            "expect_revision=None appends them (ShardedWriter: writer.written), or sharded-clean removes them later"
        )
    missing = [s.name for s in shards if not _uploaded(location, s)]
    if missing:
        raise StoreIOError(
            f"{location.url}: shard {missing[0]} was not written there, or not all of it (removed by sharded-clean "
            "with a grace shorter than this writer held it?); nothing committed"
        )
    for shard in shards:
        check_classes(old, shard.classes)
    new = old.appended(shards)
    location.write_manifest(new.to_json())
    return new


def check_classes(dataset: DatasetManifest, classes: Sequence[str] | None) -> None:
    """Shards with class names ``classes`` may join ``dataset``: its shards name none, or the same ones
    (else label ``i`` would mean one class in some shards and another in others)."""
    have = common_classes(dataset.shards)
    if have is not None and classes is not None and list(classes) != have:
        raise InvalidOptionError(
            f"the dataset's shards name the classes {have[:5]}{'...' if len(have) > 5 else ''}; these name "
            f"{list(classes)[:5]}{'...' if len(classes) > 5 else ''}: label i would mean another class in them. "
            "Append images of the same classes (same names, same order), or write another dataset"
        )


def _uploaded(location: Location, shard: ShardInfo) -> bool:
    """Whether the shard is in place: locally its folder (under the commit lock, which a clean holds too);
    remotely every file of it, of its size (one listing: a clean may have deleted it since the upload)."""
    if location.local is not None:
        return location.shard_path(shard.name).is_dir()
    stored = location.shard_sizes(shard.name)
    return all(stored.get(f.path) == f.bytes for f in shard.files)


def _joined(parts: list[np.ndarray | list[np.ndarray]]) -> np.ndarray | list[np.ndarray]:
    """Buffered batches as one: an array if every part is one array of the same image shape, else a list."""
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    if len(arrays) == len(parts) and len({a.shape[1:] for a in arrays if len(a)}) <= 1:
        return np.concatenate([a for a in arrays if len(a)] or arrays)
    return [image for part in parts for image in part]


class ShardedWriter:
    """Append images to a sharded dataset, ``shard_size`` records a shard; :meth:`commit` publishes them.

    ``mode="w"`` needs a place with no dataset yet (:class:`StoreExistsError` otherwise); ``"a"``
    appends to an existing one or creates it. Shards are written as they fill; nothing is visible
    to readers until :meth:`commit` (closing the writer as a context manager commits; an exception
    inside the ``with`` block commits nothing, and its written shards stay unreferenced).
    ``add`` takes a batch array, or a list of arrays (of varied shapes for a store that holds them,
    e.g. ``codec="png"``); for encoded files as they are, write shards with :func:`write_shard`'s
    ``fill=`` (e.g. ``put_encoded_many``) and commit them with :func:`commit_shards`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        backend: str,
        shard_size: int = 5000,
        mode: str = "a",
        storage_options: Mapping[str, Any] | None = None,
        **store_options: Any,
    ) -> None:
        if type(shard_size) is not int or shard_size < 1:
            raise InvalidOptionError(f"shard_size must be a positive integer, got {shard_size!r}")
        if mode not in ("w", "a"):
            raise InvalidOptionError(f"mode must be 'w' or 'a', got {mode!r}")
        self.location = Location(url, storage_options)
        self.storage_options = dict(storage_options or {})
        self.backend, self.shard_size, self.store_options = backend, shard_size, store_options
        base = read_committed(self.location)
        if mode == "w" and base.revision:
            raise StoreExistsError(f"{url} already holds a sharded dataset; open it with mode='a' to append")
        check_classes(base, store_options.get("classes"))
        self.base_revision = base.revision
        self.written: list[ShardInfo] = []
        self._images: list[np.ndarray | list[np.ndarray]] = []  # buffered, fewer than shard_size between calls
        self._labels: list[np.ndarray] = []

    def add(self, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> None:
        """Buffer images; every full ``shard_size`` is written and sealed as a shard."""
        batch: np.ndarray | list[np.ndarray]
        if isinstance(images, np.ndarray):
            batch = images
        else:
            batch = [np.asarray(image) for image in images]
            if len({image.shape for image in batch}) <= 1:  # one shape: one array, as a store of one shape takes it
                batch = np.stack(batch) if batch else np.empty((0,), np.uint8)
        label_array = np.asarray(labels, dtype=np.int64)
        if len(batch) != len(label_array):
            raise InvalidOptionError(f"{len(batch)} images but {len(label_array)} labels")
        self._images.append(batch)
        self._labels.append(label_array)
        if sum(len(b) for b in self._images) < self.shard_size:
            return
        # One concatenation per call, then slices: a big batch is not copied once per shard it fills.
        all_images, all_labels = _joined(self._images), np.concatenate(self._labels)
        full = len(all_images) - len(all_images) % self.shard_size
        for start in range(0, full, self.shard_size):
            self._write(all_images[start : start + self.shard_size], all_labels[start : start + self.shard_size])
        rest = len(all_images) - full
        kept = all_images[full:].copy() if isinstance(all_images, np.ndarray) else all_images[full:]
        self._images, self._labels = ([kept], [all_labels[full:].copy()]) if rest else ([], [])

    def _write(self, images: np.ndarray | list[np.ndarray], labels: np.ndarray) -> None:
        self.written.append(
            write_shard(
                self.location.url,
                images,
                labels,
                backend=self.backend,
                storage_options=self.storage_options,
                **self.store_options,
            )
        )

    def commit(self) -> DatasetManifest:
        """Write what is buffered as a last (shorter) shard, then commit every shard written."""
        if self._images:
            self._write(_joined(self._images), np.concatenate(self._labels))
            self._images, self._labels = [], []
        manifest = commit_shards(self.location, self.written, expect_revision=self.base_revision)
        self.base_revision, self.written = manifest.revision, []
        return manifest

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
