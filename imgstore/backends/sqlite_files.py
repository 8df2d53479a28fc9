"""Descriptors of an SQLite database's files that a process keeps while any connection to it is open.

POSIX record locks belong to a process and a file: closing *any* descriptor of a file drops every
lock the process holds on it, SQLite's included (SQLite's "How To Corrupt" page, 2.2). A reader whose
locks went can see another process checkpoint into the database file, or delete its WAL, under its
snapshot; a writer's can let another process's last connection delete the WAL it writes. imgstore
opens the database file and its -wal and -shm files itself (to reserve disk space before a write,
to map the file and read the -shm header for sqlite_pages), so it opens each once per process and
mode, and closes them only when the last of its connections to that database in the process has
closed (:func:`release`, called after the connection's ``close()``), and then only once no other
descriptor of that file is open in the process (found in ``/proc/self/fd``): the user's own
``sqlite3.connect()`` to the store's file, or a connection SQLite still keeps, holds locks too (its
committed rows were lost when a close here let another process delete the WAL they were in). A kept
descriptor is closed at a later :func:`hold` or :func:`release` once no other is left.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

Key = tuple[int, int]
Kept = dict[tuple[str, bool], int]  # (suffix, writable) -> fd

_lock = threading.Lock()
_users: dict[Key, int] = {}  # database file (device, inode) -> imgstore connections to it
_descriptors: dict[Key, Kept] = {}  # -> the descriptors kept for them
_lingering: dict[Key, Kept] = {}  # -> descriptors kept with no imgstore connection, as another shares a file


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork: never released here


os.register_at_fork(after_in_child=_new_lock_in_child)


def hold(path: Path) -> Key:
    """Count one more connection to the database ``path`` (existing); the key to pass back."""
    info = os.stat(path)
    key = (info.st_dev, info.st_ino)
    with _lock:
        _users[key] = _users.get(key, 0) + 1
        _close_unshared()  # first: a file no other descriptor holds may have been deleted since
        if key in _lingering:  # still shared: the same files, used again rather than opened twice
            _descriptors[key] = {**_lingering.pop(key), **_descriptors.get(key, {})}
    return key


def release(key: Key) -> None:
    """One connection fewer (closed already); with none left, close the descriptors kept for it
    that share no file with another descriptor of the process (the others later)."""
    with _lock:
        left = _users.get(key, 0) - 1
        if left > 0:
            _users[key] = left
            return
        _users.pop(key, None)
        kept = _descriptors.pop(key, {})
        if kept:
            _lingering[key] = kept
        _close_unshared()


def _close_unshared() -> None:
    """Close each lingering descriptor whose file no other descriptor of the process is open on."""
    if not _lingering:
        return
    ours = {fd for kept in _lingering.values() for fd in kept.values()}
    files = {file_of(fd) for fd in ours}
    listed = _open_descriptors()
    if listed is None:
        return  # cannot tell: kept
    shared = {file for file in map(file_of, set(listed) - ours) if file in files}
    for key, kept in list(_lingering.items()):
        for name, fd in list(kept.items()):
            if file_of(fd) not in shared:
                del kept[name]
                os.close(fd)
        if not kept:
            del _lingering[key]


def file_of(fd: int) -> Key | None:
    """The (device, inode) of the file open as ``fd``; None if it is not open."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None  # closed since it was listed
    return (info.st_dev, info.st_ino)


def _open_descriptors() -> list[int] | None:
    """The process's open descriptors (Linux, and the BSDs and macOS), or None where it cannot tell."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(folder)]
        except (OSError, ValueError):
            continue
    return None


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
