"""One thread pool per process for decoding and encoding batches on every core.

Threads, not processes: Pillow's decoders, encoders, ``convert`` and ``resize``, simplejpeg and
libturbojpeg (through ctypes) release the GIL while they work on pixels, so two threads decode a
batch of photos nearly twice as fast as one; the results go straight into the caller's arrays,
with no pickling. The calling thread takes part, and takes work in small chunks from a shared
counter, so a batch never waits on a pool that is busy with another caller's batch (or on one
that does not exist: the caller can always finish alone).

A forked child (a DataLoader worker) inherits the pool object but none of its threads; it gets a
fresh pool on first use (``os.register_at_fork``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, default_threads() - 1), thread_name_prefix="imgstore-codecs")
        return _pool


def _forget_pool() -> None:
    global _pool, _lock
    _pool = None  # its threads exist only in the parent: work sent to it here would never run
    _lock = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_forget_pool)


def run(task: Callable[[int], None], count: int, threads: int) -> None:
    """``task(i)`` for every ``i`` in ``range(count)`` on ``threads`` threads, this one included.

    The first exception a task raises is raised here, after the other threads have stopped taking work.
    """
    threads = min(threads, count)
    if threads <= 1:
        for index in range(count):
            task(index)
        return
    chunk = max(1, count // (threads * 4))  # small enough to even out images of different sizes
    starts = iter(range(0, count, chunk))
    take = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        while not failures:
            with take:
                start = next(starts, None)
            if start is None:
                return
            try:
                for index in range(start, min(start + chunk, count)):
                    task(index)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                failures.append(exc)
                return

    pool = _executor()
    helpers = [pool.submit(work) for _ in range(threads - 1)]
    work()
    for helper in helpers:
        if not helper.cancel():  # a helper that has not started has nothing left to do
            helper.result()
    if failures:
        raise failures[0]
