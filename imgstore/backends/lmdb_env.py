"""The LMDB environments of the LMDB backend (lmdb.py): one per directory in a process, shared by
every store handle on it, set aside in a forked child, each with the snapshots it has checked.

A store handle takes its directory's :class:`SharedEnv` with :func:`acquire` and gives it back
with :func:`release`; why environments are shared, and what a forked child does with the ones it
inherited: :class:`SharedEnv`, :func:`_after_fork_in_child`.

liblmdb writes the lock file and the first pages of the data file through shared mappings, which
kill the process (SIGBUS) on a full disk: their disk blocks are claimed first here
(:func:`_back_lock_file`, :func:`start_data_file`), so a full disk is a ``StoreFullError``.
The pages of each snapshot a transaction reads are checked first by lmdb_pages.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import threading
from pathlib import Path

import lmdb

from imgstore.arguments import io_error
from imgstore.backends.lmdb_pages import Snapshot, SnapshotMoved
from imgstore.errors import StoreBusyError
from imgstore.fileio import back_with_blocks

try:  # py-lmdb >= 3 identifies an open environment by its files (see _registry_keys)
    from lmdb._envid import env_keys as _lmdb_env_keys
except ImportError:  # pragma: no cover - older py-lmdb
    _lmdb_env_keys = None  # type: ignore[assignment]

_MAX_READERS = 512  # concurrent reading threads across all processes
# LMDB's lock file is a header, then 64 bytes per reader slot (32 896 bytes for 512 readers on
# x86-64); it is mapped and written through the mapping. This covers it, header room to spare.
_LOCK_FILE_BYTES = 36 << 10
_NO_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
_SNAPSHOTS_KEPT = 4  # checked snapshots an environment remembers (threads may read different ones)


class SharedEnv:
    """The one LMDB environment of a directory in this process, shared by every store handle on it.

    LMDB forbids opening an environment twice in one process (its fcntl locks are per process), and
    forbids using one across ``fork()``. So handles share an environment, opened on first use; a
    forked child sets the one it inherited aside, never to use, close or free it (see
    :func:`_after_fork_in_child`), and opens its own on first use. Nothing is closed for a fork:
    the parent's threads go on reading.
    """

    def __init__(self, path: str, readonly: bool, sync: bool, map_size: int) -> None:
        self.path, self.readonly, self.sync, self.map_size = path, readonly, sync, map_size
        # A directory this process cannot write (read-only media, a shared dataset) has no usable
        # lock file; without one LMDB must not track readers, and no writer can be there anyway.
        self.lock = os.access(os.path.join(path, "lock.mdb"), os.W_OK) or (
            not os.path.exists(os.path.join(path, "lock.mdb")) and os.access(path, os.W_OK)
        )
        self.users = 0
        self._env: lmdb.Environment | None = None
        self.keys: tuple[object, ...] = ()  # the environment's entries in py-lmdb's set of open ones
        self.opening = threading.Lock()
        # liblmdb aborts the process on a damaged page, so every snapshot a transaction reads is
        # checked first (lmdb_pages): by transaction id. Kept through a fork: the file is the same.
        self.snapshots: dict[int, Snapshot] = {}
        self.checking = threading.Lock()
        self.psize = 0

    @property
    def env(self) -> lmdb.Environment:
        env = self._env
        return env if env is not None else self._open_env()

    def _open_env(self) -> lmdb.Environment:
        with self.opening:  # one open per process, even when two threads read first at once
            if self._env is None:
                if self.lock:
                    _back_lock_file(self.path)
                # Taken before opening: a fork from here on must take them out in the child.
                self.keys = _registry_keys(self.path)
                try:
                    env = lmdb.open(
                        self.path,
                        map_size=self.map_size,
                        readonly=self.readonly,
                        create=False,
                        max_dbs=0,
                        sync=self.sync,
                        metasync=self.sync,
                        meminit=True,  # zero the unused tail of pages: no old heap data (a caller's secrets) on disk
                        max_readers=_MAX_READERS,
                        lock=self.lock,
                    )
                except BaseException as exc:
                    self.keys = ()
                    if isinstance(exc, lmdb.Error) and "already open in this process" in str(exc):
                        raise _open_elsewhere(self.path) from exc
                    raise
                if not self.readonly and self.lock:
                    try:  # free reader slots that exited processes (e.g. short-lived DataLoader workers) left
                        env.reader_check()
                    except BaseException:
                        env.close()
                        self.keys = ()
                        raise
                self.psize = env.stat()["psize"]
                self._env = env
            return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self.keys = ()

    def snapshot(self, txnid: int) -> Snapshot | None:
        """Snapshot ``txnid``, checked (a transaction of it must be open); None if its meta page was rewritten."""
        pages = self.snapshots.get(txnid)
        if pages is None:
            with self.checking:  # one check of a snapshot, whichever thread reads it first
                pages = self.snapshots.get(txnid)
                if pages is None:
                    try:
                        path, psize = os.path.join(self.path, "data.mdb"), self.psize or self.env.stat()["psize"]
                        pages = Snapshot(path, psize, txnid, self.snapshots.get(txnid - 1))
                    except SnapshotMoved:
                        return None
                    while len(self.snapshots) >= _SNAPSHOTS_KEPT:
                        del self.snapshots[min(self.snapshots)]
                    self.snapshots[txnid] = pages
        return pages


def _open_elsewhere(path: str) -> StoreBusyError:
    # py-lmdb refuses a second environment on one directory in a process: not damage, a busy store.
    return StoreBusyError(
        f"{path} is already open in this process by another library (py-lmdb's lmdb.open), and LMDB opens "
        "an environment only once per process; nothing is damaged. Close the other environment first, "
        "or read the store with py-lmdb in another process (one open per process)"
    )


_shared: dict[str, SharedEnv] = {}
_shared_lock = threading.Lock()  # a module global, not imported elsewhere: a forked child replaces it


def acquire(path: str, writable: bool, sync: bool, map_size: int) -> SharedEnv:
    """The environment of the directory ``path`` (resolved), for one more handle: opened on first use
    (with ``map_size`` if this handle is the one that makes it)."""
    with _shared_lock:
        shared = _shared.get(path)
        if shared is None:
            readonly = not writable and not os.access(path, os.W_OK)
            shared = _shared[path] = SharedEnv(path, readonly, sync, map_size)
        shared.users += 1
    return shared


def release(shared: SharedEnv) -> None:
    """One handle fewer on ``shared``: the last one closes it."""
    with _shared_lock:
        shared.users -= 1
        if shared.users == 0:
            shared.close()
            del _shared[shared.path]


# In a forked child, the environments it inherited from its parent. Closing one there (or freeing
# it, which closes it) aborts the transactions still linked to it, the reads the parent's threads
# have in progress: that marks their reader slots in the lock file, shared with the parent, ended
# and free, so a writer may reuse the pages they are reading; and it waits for LMDB calls that
# were in flight in those threads, which never end in the child. So they are kept, pinned by a
# reference never given back so that not even the interpreter's exit frees them.
_inherited: list[lmdb.Environment] = []
# py-lmdb's set of the environments open in this process, which refuses to open one twice; found
# before the first fork (gc.get_objects, once), so a child can take the inherited ones out of it.
_registry: set[object] | None = None
_registry_searched = False


def _registry_keys(path: str) -> tuple[object, ...]:
    """What py-lmdb puts in its set of open environments for the environment at ``path``."""
    if _lmdb_env_keys is not None:  # py-lmdb >= 3: the (st_dev, st_ino) of data.mdb and lock.mdb
        return tuple(_lmdb_env_keys(path, True))  # type: ignore[no-untyped-call]
    if int(lmdb.__version__.split(".")[0]) >= 2:  # pragma: no cover - py-lmdb 2: the resolved path
        return (os.path.realpath(path),)
    return ()  # pragma: no cover - py-lmdb 1 has no such set


def _find_registry_before_fork() -> None:
    """Find py-lmdb's set of open environments (once): the one set that holds an open environment's
    keys and only keys of their kind. It is not reachable otherwise; a child inherits the reference."""
    global _registry, _registry_searched
    if _registry_searched:
        return
    keys = next((shared.keys for shared in list(_shared.values()) if shared.keys), ())
    if not keys:
        return  # nothing open: nothing for a child to take out
    _registry_searched = True
    kind = type(keys[0])
    try:
        found = [
            obj
            for obj in gc.get_objects()
            if type(obj) is set and obj.issuperset(keys) and all(type(key) is kind for key in obj)
        ]
    except Exception:  # pragma: no cover - a hook must not break fork()
        found = []
    _registry = found[0] if len(found) == 1 else None


def _after_fork_in_child() -> None:
    """Set the inherited environments aside (see ``_inherited``); each opens anew on first use."""
    global _shared_lock
    _shared_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    for shared in list(_shared.values()):
        shared.opening = threading.Lock()
        shared.checking = threading.Lock()
        for pages in list(shared.snapshots.values()):
            pages.after_fork()
        env, shared._env = shared._env, None
        if env is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(env))
            _inherited.append(env)
        if _registry is not None:
            _registry.difference_update(shared.keys)  # this process may open the files again
        shared.keys = ()


os.register_at_fork(before=_find_registry_before_fork, after_in_child=_after_fork_in_child)


def _back_lock_file(directory: str) -> None:
    """Give LMDB's lock file disk blocks before LMDB maps it and writes through the mapping.

    LMDB sizes a new lock file with ``ftruncate`` (a hole) and writes its header and reader slots
    through a shared mapping: on a full disk the first store to a page without a block kills the
    process with SIGBUS (when a store is created, or when a reader takes a slot on a page no reader
    took before). With the blocks claimed first, a full disk is a :class:`StoreFullError` here.
    """
    lock = os.path.join(directory, "lock.mdb")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in _NO_ACCESS_ERRNOS:
            return  # LMDB opens it read-only, or not at all (lock=False)
        raise io_error(exc, f"opening {lock}") from exc
    try:
        back_with_blocks(fd, max(os.fstat(fd).st_size, _LOCK_FILE_BYTES), lock)
    except OSError as exc:
        raise io_error(exc, f"claiming disk space for {lock}") from exc
    finally:
        os.close(fd)


def start_data_file(path: Path) -> None:
    """An empty ``data.mdb`` with disk blocks for the two meta pages LMDB writes when it creates the environment."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            back_with_blocks(fd, 2 * mmap.PAGESIZE, path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise io_error(exc, f"creating {path}") from exc
