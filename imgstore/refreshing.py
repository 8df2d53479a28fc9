"""Reads in other threads that overlap a handle's ``refresh()``.

``refresh()`` changes a handle's state in steps (manifest, checksums, the backend's files and
indexes). Reads take no lock: a read that fails while a refresh runs, or after one ran since it
started, waits for the refresh to end and reads again. A successful read needs no such care:
records are never changed once committed, and every record read is checked against its checksum.
A backend that builds state lazily (an index, an open array) keeps it only if no refresh ran while
it was built (``unchanged_since``); otherwise it serves that one read.

The guard also counts the reads running (``active``: a deque, whose ``append`` and ``pop`` are
atomic), so that ``close()`` from one thread lets reads other threads started end before it frees
what they use (LMDB, SQLite, LevelDB crash the process on a read of a closed handle); a read
registers before it checks the handle is open, so one that starts later sees it closed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_T = TypeVar("_T")


class RefreshGuard:
    """A count of refreshes (odd while one runs) and the lock refreshes hold."""

    __slots__ = ("active", "count", "lock")

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.active: deque[None] = deque()  # one item per read running

    def unchanged_since(self, count: int) -> bool:
        return count == self.count and not count & 1

    def raced(self, count: int) -> bool:
        """Whether a read that started at ``count`` and just failed overlapped a refresh (once it ended)."""
        if self.unchanged_since(count):
            return False
        with self.lock:
            return True

    def retrying(self, read: Callable[..., _T], *args: Any) -> _T:
        self.active.append(None)
        try:
            count = self.count
            try:
                return read(*args)
            except Exception:
                if self.raced(count):
                    return self.retrying(read, *args)
                raise
        finally:
            self.active.pop()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """One read running (for reads that do not go through :meth:`retrying`)."""
        self.active.append(None)
        try:
            yield
        finally:
            self.active.pop()

    def wait_for_reads(self, patience: float = 60.0) -> None:
        """Until no read runs (after the handle was marked closed, so that none starts); at most ``patience`` s."""
        deadline = time.monotonic() + patience
        while self.active and time.monotonic() < deadline:
            time.sleep(0.0005)

    @contextmanager
    def refreshing(self) -> Iterator[None]:
        with self.lock:
            self.count += 1
            try:
                yield
            finally:
                self.count += 1
