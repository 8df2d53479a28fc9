"""Reads in other threads that overlap a handle's ``refresh()``.

``refresh()`` changes a handle's state in steps (manifest, checksums, the backend's files and
indexes). Reads take no lock: a read that fails while a refresh runs, or after one ran since it
started, waits for the refresh to end and reads again. A successful read needs no such care:
records are never changed once committed, and every record read is checked against its checksum.
A backend that builds state lazily (an index, an open array) keeps it only if no refresh ran while
it was built (``unchanged_since``); otherwise it serves that one read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_T = TypeVar("_T")


class RefreshGuard:
    """A count of refreshes (odd while one runs) and the lock refreshes hold."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def unchanged_since(self, count: int) -> bool:
        return count == self.count and not count & 1

    def raced(self, count: int) -> bool:
        """Whether a read that started at ``count`` and just failed overlapped a refresh (once it ended)."""
        if self.unchanged_since(count):
            return False
        with self.lock:
            return True

    def retrying(self, read: Callable[..., _T], *args: Any) -> _T:
        count = self.count
        try:
            return read(*args)
        except Exception:
            if self.raced(count):
                return self.retrying(read, *args)
            raise

    @contextmanager
    def refreshing(self) -> Iterator[None]:
        with self.lock:
            self.count += 1
            try:
                yield
            finally:
                self.count += 1
