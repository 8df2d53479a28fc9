"""Split CPU-bound per-image work (PNG encode/decode) of a big batch over forked processes.

Processes, not threads: encoding or decoding a 32x32 PNG is mostly Python-level work in Pillow
that holds the GIL. Fork, not a spawn/forkserver pool: those re-import the caller's ``__main__``
in every worker (a script without an ``if __name__ == "__main__"`` guard would run again), while a
forked child already has the batch and the code. Children write results into an anonymous shared
mapping made before the fork; the parent works on the first slice itself.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def can_fork() -> bool:
    # A daemonic process (e.g. a PyTorch DataLoader worker) may not have children: work in-process.
    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous, non-empty ``(lo, hi)`` ranges covering ``range(n)``."""
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=False) if hi > lo]


def shared_like(array: np.ndarray) -> np.ndarray:
    """A zeroed array of ``array``'s shape in memory that forked children write into and the parent sees."""
    buffer = mmap.mmap(-1, max(1, array.nbytes))
    shared: np.ndarray = np.ndarray(array.shape, dtype=array.dtype, buffer=buffer)
    return shared


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (find_library runs ldconfig)


def _die_with(parent: int) -> None:
    """End this worker when its parent ends, however it ends (SIGKILL too).

    A worker that outlived a killed writer would go on writing files of a write that never
    committed, under the next writer of the store (which takes the lock the moment the parent dies).
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _child(task: Callable[[int, int], None], lo: int, hi: int, conn: Connection, parent: int) -> None:
    _die_with(parent)
    try:
        task(lo, hi)
        conn.send(None)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        try:
            conn.send(exc)
        except Exception:  # an exception that does not pickle: send its text
            conn.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_split(task: Callable[[int, int], None], n: int, workers: int) -> None:
    """Run ``task(lo, hi)`` over ``range(n)`` split in ``workers`` parts; the first failure is raised here."""
    ranges = split(n, workers)
    context = multiprocessing.get_context("fork")
    children = []
    for lo, hi in ranges[1:]:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(task, lo, hi, send, os.getpid()), daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    error: BaseException | None = None
    try:
        task(*ranges[0])
    except BaseException as exc:
        error = exc
    for child, receive in children:
        try:
            result = receive.recv()
        except EOFError:
            child.join()
            result = RuntimeError(f"a worker process died (exit code {child.exitcode})")
        child.join()
        if error is None and result is not None:
            error = result
    if error is not None:
        raise error
