"""A process forked while a remote ShardedDataset is in use (a DataLoader's fork-started workers): the child
inherits neither the parent's download locks nor its prefetch thread. Real fork, real moto S3 server."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgstore.sharded import ShardedWriter, open_sharded
from imgstore.sharded.cache import locked_dir, sweep_leftover, unlock_dir
from imgstore.testing import random_images
from imgstore.testing.s3server import MotoServer


def _child(body: Any) -> int:
    """Fork a child running ``body()`` (SIGALRM ends it if it hangs); its PID."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(15)
        try:
            body()
        except BaseException:
            os._exit(3)
        os._exit(0)
    return pid


def _status(pid: int) -> str:
    _pid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "hung" if os.WTERMSIG(status) == signal.SIGALRM else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def test_a_forked_child_does_not_keep_the_parents_directory_lock(tmp_path: Path) -> None:
    path, fd = locked_dir(tmp_path, ".tmp-" + "0" * 32 + "-1-")
    ready, told = os.pipe()
    pid = _child(lambda: (os.write(told, b"."), time.sleep(10)))  # the child runs once its fork hooks have
    try:
        assert os.read(ready, 1) == b"."
        unlock_dir(fd)  # the parent is done with it: nothing holds it now, so it is a leftover
        sweep_leftover(tmp_path, path.name)
        assert not path.exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        _status(pid)
        os.close(ready)
        os.close(told)


def test_a_fork_during_a_prefetch_download_blocks_no_reader(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options()
    images, labels = random_images(160, (256, 256, 3), seed=3)  # two 16 MB shards: a download takes a while
    with ShardedWriter(s3_url, backend="lmdb", shard_size=80, storage_options=options) as writer:
        writer.add(images, labels)
    cache = tmp_path / "cache"
    with open_sharded(s3_url, cache_dir=cache, storage_options=options, remote_reads="whole") as data:
        data.prefetch([1])
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".tmp-") for p in cache.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.001)
        # the child reads the same shard through the inherited handle (its own prefetch, then a read)
        pid = _child(lambda: (data.prefetch([1]), data.get(100)))
        try:
            got: list[Any] = []
            reader = threading.Thread(target=lambda: got.append(data.get(100)), daemon=True)
            reader.start()
            reader.join(15)
            assert got and np.array_equal(got[0][0], images[100]), "the parent's read waited for the child"
            assert _status(pid) == "exit 0"
        finally:
            if not got:
                os.kill(pid, signal.SIGKILL)


def test_a_forked_child_prefetches_on_its_own_thread(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options()
    images, labels = random_images(30, (8, 8, 3), seed=4)
    with ShardedWriter(s3_url, backend="lmdb", shard_size=10, storage_options=options) as writer:
        writer.add(images, labels)
    with open_sharded(s3_url, cache_dir=tmp_path / "cache", storage_options=options) as data:
        data.prefetch([0])
        data.get(0)  # the parent's prefetch thread exists now

        def child() -> None:
            data.prefetch([2])
            image, _label = data.get(25)
            assert np.array_equal(image, images[25])
            data.close()

        assert _status(_child(child)) == "exit 0"
        assert np.array_equal(data.get(25)[0], images[25])


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
