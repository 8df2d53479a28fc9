"""Descriptors of an SQLite database's files that a process keeps while any imgstore connection to it is open.

POSIX record locks belong to a process and a file: closing *any* descriptor of a file drops every
lock the process holds on it, SQLite's included (SQLite's "How To Corrupt" page, 2.2). A reader whose
locks went can see another process checkpoint into the database file, or delete its WAL, under its
snapshot; a writer's can let another process's last connection delete the WAL it writes. imgstore
opens the database file and its -wal and -shm files itself (to reserve disk space before a write,
to map the file and read the -shm header for sqlite_pages), so it opens each once per process and
mode, and closes them only when the last of its connections to that database in the process has
closed (:func:`release`, called after the connection's ``close()``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()
_users: dict[tuple[int, int], int] = {}  # database file (device, inode) -> imgstore connections to it
_descriptors: dict[tuple[int, int], dict[tuple[str, bool], int]] = {}  # -> (suffix, writable) -> fd

Key = tuple[int, int]


def hold(path: Path) -> Key:
    """Count one more connection to the database ``path`` (existing); the key to pass back."""
    info = os.stat(path)
    key = (info.st_dev, info.st_ino)
    with _lock:
        _users[key] = _users.get(key, 0) + 1
    return key


def release(key: Key) -> None:
    """One connection fewer (closed already); with none left, close the descriptors kept for it."""
    with _lock:
        left = _users.get(key, 0) - 1
        if left > 0:
            _users[key] = left
            return
        _users.pop(key, None)
        descriptors = _descriptors.pop(key, {})
    for fd in descriptors.values():
        os.close(fd)


def descriptor(key: Key, path: Path, suffix: str = "", writable: bool = False) -> int:
    """A descriptor of ``path + suffix`` ("", "-wal", "-shm"), kept until :func:`release` of the last
    connection; never close it. OSError if the file cannot be opened."""
    with _lock:
        kept = _descriptors.setdefault(key, {})
        fd = kept.get((suffix, writable))
        if fd is None:
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = kept[(suffix, writable)] = os.open(f"{path}{suffix}", flags)
        return fd
