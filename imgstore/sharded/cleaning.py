"""What killed writers leave under a dataset's ``shards/``: shard folders no manifest names, listed or deleted.

A writer killed before its commit (an interrupted :class:`ShardedWriter`, a Dask task lost with its
worker and rerun elsewhere) leaves a sealed shard no manifest names (``shards/shard-<hex>/``) or,
locally, a half-written one (``shards/.shard-<hex>.tmp/``). Readers never see them and writers
never delete them. :func:`clean_shards` lists them (a dry run, the default) and with ``delete=True``
deletes them, but only in a dataset (a folder with a valid manifest: anything else is refused, before
anything is written or deleted), never through a link (``shards/`` a link is refused), and only folders that

- are named like a shard's folder (nothing else under ``shards/`` is touched, nor anything outside),
- the committed manifest does not name (read at the time of the clean), and
- have had nothing written in them for ``grace`` seconds (default 24 h). A running writer's shard
  is being written (so it is young) or, sealed, waits for its commit: **the grace must be longer
  than the longest a writer holds sealed shards before committing them** (a whole
  ``convert --shards`` run: its manifest is committed after every task).

Locally the clean holds the commit lock from reading the manifest to the last delete, and a commit
checks under that lock that its shards are there, so a commit never names a shard deleted under
it. Object storage has no such lock: a commit lists its new shards' files before the manifest's PUT, but
a clean between that listing and the PUT is not caught: there the grace alone protects a writer.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgstore.errors import InvalidOptionError, StoreNotFoundError
from imgstore.sharded.location import SHARD_FOLDER, Location
from imgstore.sharded.manifest import MANIFEST_NAME, DatasetManifest, parse_manifest
from imgstore.sharded.writing import commit_lock

DEFAULT_GRACE = 24 * 3600.0


@dataclass(frozen=True)
class Leftover:
    """A folder under ``shards/`` that no manifest names: its name, bytes, and seconds since its last write."""

    name: str
    bytes: int
    age: float


def clean_shards(
    url: str | os.PathLike[str],
    *,
    delete: bool = False,
    grace: float = DEFAULT_GRACE,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Leftover]:
    """The unreferenced shard folders of the dataset at ``url`` older than ``grace`` seconds; deleted if ``delete``."""
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < math.inf:
        raise InvalidOptionError(f"grace must be a number of seconds >= 0, got {grace!r}")
    location = Location(url, storage_options)
    if location.local is None:
        return _clean(location, delete, grace)
    if not location.local.is_dir():
        raise StoreNotFoundError(f"no sharded dataset at {url}")
    _committed(location)  # a folder that is not a dataset is refused before the lock file is made in it
    with commit_lock(location.local):
        return _clean(location, delete, grace)


def _committed(location: Location) -> DatasetManifest:
    """The dataset's manifest; a folder without one is not a dataset (or lost it): nothing there is deleted."""
    raw = location.read_manifest()
    if raw is None:
        raise StoreNotFoundError(
            f"no sharded dataset at {location.url}: it has no {MANIFEST_NAME}, so nothing there is cleaned "
            "(a dataset whose first commit never happened holds nothing committed: delete it whole)"
        )
    return parse_manifest(raw, f"{location.url}/{MANIFEST_NAME}")


def _clean(location: Location, delete: bool, grace: float) -> list[Leftover]:
    manifest = _committed(location)
    folders = location.shard_folders()
    named = {s.name for s in manifest.shards}
    now = time.time()
    found = [
        Leftover(name, size, now - newest)
        for name, (newest, size) in sorted(folders.items())
        if SHARD_FOLDER.fullmatch(name) and name not in named and now - newest >= grace
    ]
    if delete:
        for leftover in found:
            location.remove_shard_folder(leftover.name)
    return found
