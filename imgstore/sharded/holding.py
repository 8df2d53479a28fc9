"""Things a ``ShardedDataset`` opens (shard stores, partial copies) that reads in other threads hold.

A dataset keeps few open; one thread dropping one (to open another, or on ``close()``) while other
threads read through it must not close it under them: LMDB, SQLite and LevelDB crash the process on
a read of a closed handle. So each read counts itself on what it uses (``enter`` under the lock that
found it, ``leave`` after), and a thing dropped while counted is closed by its last reader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Holds:
    """Reads in progress per object, and how to close each object dropped while read."""

    def __init__(self) -> None:
        self._readers: dict[int, int] = {}  # id(object) -> reads in progress
        self._retired: dict[int, Callable[[], None]] = {}  # how to close each, when its last read ends

    def enter(self, used: object) -> None:
        """A read starts using ``used`` (call under the lock that found it)."""
        self._readers[id(used)] = self._readers.get(id(used), 0) + 1

    def leave(self, used: object, lock: threading.RLock) -> None:
        """That read ended: close ``used`` if it was dropped meanwhile and this was its last reader."""
        with lock:
            left = self._readers.pop(id(used)) - 1
            if left:
                self._readers[id(used)] = left
                return
            close = self._retired.pop(id(used), None)
        if close is not None:
            close()

    def retire(self, used: object, close: Callable[[], None]) -> None:
        """``used`` is dropped (call under the lock): closed now, or by its last reader."""
        if self._readers.get(id(used)):
            self._retired[id(used)] = close
        else:
            close()
