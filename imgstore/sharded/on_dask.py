"""``convert_sharded(engine="dask")``: one task per shard on Dask distributed, a failed build cleaned up.

A task's deterministic failure (a bad file, a source that cannot be converted: an
:class:`~imgstore.errors.ImgStoreError` other than :class:`~imgstore.errors.StoreIOError`) comes
back as a value, so Dask neither retries it nor logs its traceback on every worker; the first one
cancels the build. Transient ones (I/O, a worker lost) are Dask's to retry (``retries``; a lost
worker's tasks are rescheduled). Either way the tasks not started are cancelled, the running ones
are let finish (a running task cannot be stopped: it would write its shard unseen), and then the
shards the build wrote, found by the random prefix of their names, are deleted before the error
is raised: no manifest names them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from imgstore.errors import ImgStoreError, MissingDependencyError, StoreIOError, StoreNotFoundError
from imgstore.sharded.location import Location
from imgstore.sources import Source

if TYPE_CHECKING:
    from imgstore.sharded.building import Built, ShardJob


@dataclass(frozen=True)
class Failed:
    """A task's deterministic failure, returned instead of raised."""

    error: ImgStoreError


def shard_task(dest: str, part: Source, job: ShardJob) -> Built | Failed:
    from imgstore.sharded.building import build_shard

    try:
        return build_shard(dest, part, job)
    except StoreIOError:
        raise  # perhaps transient: Dask retries it
    except ImgStoreError as exc:
        return Failed(exc)


def build_on_dask(
    location: Location,
    parts: list[Source],
    job: ShardJob,
    scheduler: str | None,
    workers: int | None,
    retries: int,
) -> list[Built]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"engine='dask' needs Dask distributed: pip install 'imgstore-ml[dask]' ({exc})"
        ) from exc
    url = str(location.local) if location.local is not None else location.url
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=None)  # type: ignore[no-untyped-call]
    try:
        try:
            client = Client(scheduler or cluster)  # type: ignore[no-untyped-call]
        except OSError as exc:  # an address nobody answers at: distributed's "Timed out trying to connect"
            raise StoreIOError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        with client:
            prefix = secrets.token_hex(4)  # this build's shards' names start with it
            job = replace(job, name_prefix=prefix)
            futures = [client.submit(shard_task, url, part, job, retries=retries, pure=False) for part in parts]
            done: dict[Any, Built] = {}  # by task key
            try:
                for future in as_completed(futures):  # type: ignore[no-untyped-call]
                    result = future.result()
                    if isinstance(result, Failed):
                        raise result.error
                    done[future.key] = result
            except BaseException:
                _stop_and_remove(client, location, futures, prefix)
                raise
            return [done[future.key] for future in futures]
    finally:
        if cluster is not None:
            cluster.close()


def _stop_and_remove(client: Any, location: Location, futures: list[Any], prefix: str, patience: float = 120.0) -> None:
    """Cancel the build's tasks not started, let the running ones end (at most ``patience`` seconds: a
    cancelled running task would still write its shard, unseen), then delete every shard folder (sealed
    or half written) whose name starts with ``prefix``: this build's."""
    from distributed import wait

    running = {key for keys in client.processing().values() for key in keys}
    client.cancel([f for f in futures if f.key not in running and not f.done()])
    try:
        wait([f for f in futures if f.key in running], timeout=patience)  # type: ignore[no-untyped-call]
    except TimeoutError:
        pass  # stuck tasks: what they write later is left to sharded-clean
    for _ in range(3):  # a half-written folder may be renamed to its sealed name between listing and removal
        ours = [n for n in location.shard_folders() if n.startswith((f"shard-{prefix}", f".shard-{prefix}"))]
        if not ours:
            return
        for name in ours:
            try:
                location.remove_shard_folder(name)
            except (StoreIOError, StoreNotFoundError):
                continue
