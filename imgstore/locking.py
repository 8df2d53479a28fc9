"""The store's one-writer lock, owned by the process that took it."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import weakref
from pathlib import Path
from typing import ClassVar

from imgstore.errors import StoreBusyError, StoreExistsError
from imgstore.manifest import WRITER_LOCK_NAME


class WriterLock:
    """The store's writer lock (``flock`` on ``writer.lock``), owned by the process that took it.

    A forked child inherits the descriptor, and with it the lock: every child closes its copies at
    once, so the lock is released when the owner lets go, and the child's handle cannot write.
    """

    _held: ClassVar[weakref.WeakSet[WriterLock]] = weakref.WeakSet()
    _guard = threading.Lock()

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self.pid = os.getpid()
        with self._guard:
            self._held.add(self)

    @property
    def owned(self) -> bool:
        return self.fd is not None and self.pid == os.getpid()

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # A writer handle dropped without close() must not keep others out until the process exits.
        if self.owned:
            self.release()

    @classmethod
    def _drop_inherited(cls) -> None:
        for lock in list(cls._held):
            if lock.pid != os.getpid():
                lock.release()


os.register_at_fork(after_in_child=WriterLock._drop_inherited)


def lock_for_writing(path: Path) -> WriterLock:
    """One writer per store: the commit protocol appends at the count the writer read when it opened."""
    from imgstore.arguments import io_error

    try:
        fd = os.open(path / WRITER_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreExistsError(f"{path / WRITER_LOCK_NAME} is a symbolic link; not an imgstore lock") from None
        raise io_error(exc, f"opening {path} for writing") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusyError(f"{path} is open for writing by another handle or process") from None
    return WriterLock(fd)
