"""Small file-system helpers the commit protocol and the backends share."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import stat
import sys
import weakref
from pathlib import Path
from typing import BinaryIO

if not sys.platform.startswith("linux"):  # pragma: no cover - the package metadata says Linux only
    raise ImportError(
        f"imgstore needs Linux: its commit protocol uses fcntl locks, syncfs and fallocate (this is {sys.platform})"
    )

_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (find_library runs ldconfig)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def open_regular(path: Path | str) -> BinaryIO:
    """``open(path, "rb")`` of a regular file only: a FIFO or device put in a store's place would block
    a reader forever or never end (opened non-blocking, so the check itself cannot hang)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def find_linked_folder(root: Path, depth: int | None = None) -> Path | None:
    """The first symbolic link to a folder at or under ``root``, looking ``depth`` levels down (None: all).

    imgstore and the libraries of its backends make no links in a store: one to a folder was planted,
    and a library that opens files by path would follow it, reading or writing outside the store.
    (Links to files are the backends' own to refuse or replace: they open their files O_NOFOLLOW.)
    """
    if root.is_symlink():
        return root if root.is_dir() else None
    if depth == 0 or not root.is_dir():
        return None
    folders = [(str(root), 1)]
    while folders:
        folder, level = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink() and entry.is_dir():
                        return Path(entry.path)
                    if (depth is None or level < depth) and entry.is_dir(follow_symlinks=False):
                        folders.append((entry.path, level + 1))
        except FileNotFoundError:  # a temporary folder a writer just removed
            continue
    return None


def holds(fd: int, end: int) -> bool:
    """Whether the open file ``fd`` still reaches byte ``end``: asked (an ``lseek``, ~0.2 µs) before each read
    out of a map of it, since a page past a file's end is SIGBUS, and another program may cut it short."""
    return os.lseek(fd, 0, os.SEEK_END) >= end


def map_read_only(fd: int, size: int) -> ctypes.Array[ctypes.c_char]:
    """The first ``size`` bytes of the open file ``fd``, mapped read-only and shared, holding no descriptor.

    Python's ``mmap`` keeps a duplicate of ``fd`` as long as the map lives (``trackfd=False`` is 3.13's):
    a reader mapping each of a big LevelDB store's thousands of tables would run out of descriptors
    (RLIMIT_NOFILE, often 1024), failing every later open in the process. Unmapped once the returned
    buffer and every view of it are gone; views must never write (PROT_READ: a write is SIGSEGV)."""
    address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buffer = (ctypes.c_char * size).from_address(address)
    weakref.finalize(buffer, _libc.munmap, address, size)
    return buffer


def _files_once(path: Path) -> list[os.stat_result]:
    """The ``lstat`` of every file under ``path``, each file once: a LevelDB reader's view holds hard links
    to the tables (``du`` counts a file once too; counted per link, a store with a reader open doubled)."""
    seen: set[tuple[int, int]] = set()
    found = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                found.append(info)
    return found


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (blocks, as ``du`` counts them; links not followed, each file once)."""
    return sum(info.st_blocks * 512 for info in _files_once(path))


def file_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (their sizes, not the blocks they take; each file once)."""
    return sum(info.st_size for info in _files_once(path))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve(path: Path, extra_bytes: int) -> None:
    """Claim disk blocks for ``extra_bytes`` past the end of ``path`` before a C library writes there.

    LMDB and HDF5 report a full disk in the middle of a write (LMDB as an I/O error, HDF5 with a
    handle left unusable, sometimes crashing the process at close). Claiming the blocks first turns
    a full disk or a file size limit into a clean ``OSError`` (ENOSPC, EFBIG) before anything is
    written. The file's size does not change (FALLOC_FL_KEEP_SIZE); :func:`release_reserve` gives
    back what the write did not use. Where the file system cannot reserve, nothing is reserved.
    """
    if extra_bytes <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        reserve_at(fd, extra_bytes, path)
    finally:
        os.close(fd)


def reserve_at(fd: int, extra_bytes: int, path: Path | str) -> None:
    """:func:`reserve` on a file already open as ``fd`` (for files whose descriptors must not be closed)."""
    if extra_bytes <= 0:
        return
    # Blocks reserved past the end do not count against a file size limit, so check it here.
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and os.fstat(fd).st_size + extra_bytes > limit:
        raise OSError(errno.EFBIG, f"{path} would exceed the file size limit of {limit} bytes")
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, os.fstat(fd).st_size, extra_bytes) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(path))


def back_with_blocks(fd: int, nbytes: int, path: Path | str) -> None:
    """Claim disk blocks for the first ``nbytes`` of the open file ``fd``, holes included; its size does not change.

    For a file a C library maps and writes through the mapping (LMDB's lock file): a store to a
    mapped page that has no disk block behind it kills the process with SIGBUS when the disk is
    full. Claiming the blocks first turns that into a clean ``OSError`` (ENOSPC) here; blocks the
    file already has cost nothing. Where the file system cannot reserve, nothing is reserved.
    """
    while _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(path))
        return


def sync_filesystem(path: Path) -> None:
    """``syncfs`` the file system holding ``path``: every new file and folder entry durable in one call.

    Far cheaper than an fsync of each of thousands of new files and their folders (it writes back
    all metadata too).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def release_reserve(path: Path) -> None:
    """Give back reserved blocks past the end of ``path`` (truncating to its own size frees them)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts): a leftover named after a dead pid may go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
