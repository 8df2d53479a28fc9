"""A local cache of remote shards, bounded in bytes, shared safely by processes, evicting the least recently used.

Layout: ``<cache_dir>/IMGSTORE-CACHE`` (marks the directory as a cache: a non-empty directory
without it is refused, so a wrong ``cache_dir`` never has anything deleted), and one directory per
shard named ``<shard checksum>-<bytes>`` (content-addressed: the same shard of any dataset is one
entry, and a name says its size without a walk).

- A download goes to ``.tmp-<checksum>-<pid>-<random>/``, every file is checked against the
  manifest's size and XXH3-128, and only then renamed into place: a process never sees half an
  entry. A damaged download is deleted and fetched once more, then :class:`CorruptStoreError`.
  Two processes fetching the same shard both download; the first rename wins, the other copy is
  deleted.
- An entry in use is *pinned*: its reader holds a shared ``flock`` on the entry's directory. An
  evictor takes the exclusive lock without waiting (so it skips pinned entries), renames the entry
  away while holding it, then deletes it. A pinner that got its lock checks the name still leads
  to the directory it locked. So eviction never breaks an open handle, in any process.
- Use time is the entry directory's mtime, touched at every pin. Room is made before a download:
  unpinned entries are evicted oldest first until the new shard fits in ``max_bytes``. Only pinned
  entries can keep the cache above the bound (a reader pins the few shards it holds open).
- Only names of those forms are ever deleted, and only inside the cache directory: a ``.tmp-``
  download, an ``.evict-`` eviction or a ``.ranges-`` partial copy when no process holds its lock
  (its maker holds an exclusive ``flock`` on it while it works in it, which, unlike a PID, means
  the same in every PID namespace sharing the directory).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imgstore.errors import CorruptStoreError, InvalidOptionError, StoreExistsError, StoreIOError, StoreNotFoundError
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import ShardFile, ShardInfo, hash_file

MARKER = "IMGSTORE-CACHE"
_ENTRY = re.compile(r"([0-9a-f]{32})-([0-9]{1,16})")
# ``.ranges-``: a reader's partial copies of shards read by byte ranges (imgstore.sharded.ranges)
_TMP = re.compile(r"\.(?:tmp-[0-9a-f]{32}|evict|ranges)-([0-9]{1,10})-[0-9a-f]{8}")
_DOWNLOAD_ATTEMPTS = 2


def fetch_files(location: Location, name: str, files: Iterable[ShardFile], dest: Path) -> str:
    """Download these files of shard ``name`` into ``dest``, each checked against its size and XXH3-128 in the
    manifest and made read-only; what is wrong with the copy, or ''."""
    for f in files:
        path = dest / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        location.download(name, f.path, path)
        size, digest = hash_file(path)
        if size != f.bytes:
            return f"{f.path} is {size} bytes, the manifest says {f.bytes} (truncated or replaced)"
        if digest != f.xxh3_128:
            return f"{f.path} does not match its checksum in the manifest (damaged)"
        os.chmod(path, 0o444)  # sealed, like the shard it copies
    return ""


def sweep_leftovers(cache_dir: Path) -> None:
    """Delete what processes gone left in ``cache_dir`` (see :func:`sweep_leftover`)."""
    for name in os.listdir(cache_dir):
        sweep_leftover(cache_dir, name)


def sweep_leftover(cache_dir: Path, name: str) -> None:
    """Delete ``cache_dir/name`` if it is a leftover: a download, an eviction or a partial copy that no
    process holds locked (its maker holds an exclusive ``flock`` on it for as long as it works in it,
    which, unlike a PID, means the same in every PID namespace sharing the directory). Anything else
    is left alone."""
    if _TMP.fullmatch(name) is None:
        return
    path = cache_dir / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        trash = cache_dir / f".evict-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(path, trash)  # away while locked: its owner, if it was just making it, sees the name gone
        shutil.rmtree(trash, ignore_errors=True)
    except OSError:
        return  # locked (its maker is alive, in whatever PID namespace), or swept by another process first
    finally:
        os.close(fd)


# Descriptors of this process's locked_dir locks. A forked child closes its copies: a copy would keep the lock
# for the child's life (flock belongs to the open file, shared across fork), so a download's lock, which is the
# cache entry's once renamed into place, would block every pin of that entry, the child's own included.
_LOCKS: set[int] = set()


def _close_inherited() -> None:
    for fd in list(_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited)


def unlock_dir(fd: int) -> None:
    """Let go of a :func:`locked_dir` lock."""
    _LOCKS.discard(fd)
    os.close(fd)


def locked_dir(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new directory ``parent/<prefix><random>`` and the descriptor of the exclusive ``flock`` on it that
    keeps :func:`sweep_leftover` from deleting it while this process (or a child that inherits the
    descriptor) lives."""
    for _ in range(3):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        path.mkdir()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # swept between mkdir and open: another name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            here, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
                _LOCKS.add(fd)
                return path, fd
        except (BlockingIOError, FileNotFoundError):
            pass  # a sweeper holds it, or moved it away: another name
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StoreIOError(f"{parent}: a new {prefix}* directory is swept as fast as it is made")


@dataclass
class Pin:
    """A shard's files in the cache, held (shared lock) until :meth:`release`."""

    path: Path
    fd: int | None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.release()


class ShardCache:
    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int) -> None:
        if type(max_bytes) is not int or max_bytes < 1:
            raise InvalidOptionError(f"cache_bytes must be a positive integer, got {max_bytes!r}")
        self.dir = Path(cache_dir).absolute()
        self.max_bytes = max_bytes
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / MARKER).is_file():
                if any(self.dir.iterdir()):
                    raise StoreExistsError(f"{self.dir} holds files and is not an imgstore shard cache; give another")
                (self.dir / MARKER).write_text("imgstore shard cache: entries here are deleted to keep it bounded\n")
        except OSError as exc:
            if isinstance(exc, StoreExistsError):
                raise
            raise StoreIOError(f"shard cache {self.dir}: {exc}") from exc

    def entry_path(self, info: ShardInfo) -> Path:
        return self.dir / f"{info.checksum}-{info.bytes}"

    def acquire(self, location: Location, info: ShardInfo) -> Pin:
        """The shard's files in the cache, pinned; downloaded (and checked) first if missing."""
        if info.bytes > self.max_bytes:
            raise InvalidOptionError(
                f"shard {info.name} takes {info.bytes} bytes, more than the cache's {self.max_bytes} (cache_bytes)"
            )
        final = self.entry_path(info)
        for _ in range(3):  # an entry evicted between download and pin is fetched again
            pin = self._pin(final)
            if pin is not None:
                self.make_room(0)  # back under the bound if pins held it above (this entry is pinned now)
                return pin
            self._download(location, info, final)
        raise StoreIOError(f"shard {info.name}: the cache at {self.dir} evicts it as fast as it is fetched")

    def _pin(self, final: Path) -> Pin | None:
        try:
            fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            here = os.stat(final, follow_symlinks=False)
            mine = os.fstat(fd)
            if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)
                return None
            os.utime(final, follow_symlinks=False)  # last use, for LRU
        except FileNotFoundError:  # evicted while we waited for the lock
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Pin(final, fd)

    # ------------------------------------------------------------------ downloading

    def _download(self, location: Location, info: ShardInfo, final: Path) -> None:
        self.make_room(info.bytes)
        problem = ""
        for _attempt in range(_DOWNLOAD_ATTEMPTS):
            lock = None
            try:
                tmp, lock = locked_dir(self.dir, f".tmp-{info.checksum}-{os.getpid()}-")  # no sweeper takes it
                problem = self._fetch_into(location, info, tmp)
                if not problem:
                    try:
                        os.rename(tmp, final)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                    else:
                        return
            except StoreNotFoundError as exc:
                raise CorruptStoreError(f"shard {info.name} of {location.url} lacks a file: {exc}") from exc
            except OSError as exc:
                if isinstance(exc, StoreIOError):
                    raise
                raise StoreIOError(f"shard cache {self.dir}: {exc}") from exc
            finally:
                if lock is not None:
                    shutil.rmtree(tmp, ignore_errors=True)  # our own copy: damaged, or another process won
                    unlock_dir(lock)
            if not problem:
                return
        raise CorruptStoreError(
            f"shard {info.name} of {location.url}: {problem} (fetched {_DOWNLOAD_ATTEMPTS} times; nothing kept)"
        )

    def _fetch_into(self, location: Location, info: ShardInfo, tmp: Path) -> str:
        """Download every file of the shard into ``tmp``; what is wrong with the copy, or ''."""
        return fetch_files(location, info.name, info.files, tmp)

    # ------------------------------------------------------------------ eviction

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, name) of each complete entry, oldest first."""
        found = []
        for name in os.listdir(self.dir):
            match = _ENTRY.fullmatch(name)
            if match:
                try:
                    used = os.stat(self.dir / name, follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                found.append((used, int(match.group(2)), name))
            else:
                sweep_leftover(self.dir, name)
        return sorted(found)

    def used_bytes(self) -> int:
        return sum(size for _used, size, _name in self.entries())

    def make_room(self, need: int) -> None:
        """Evict unpinned entries, least recently used first, until ``need`` more bytes fit."""
        entries = self.entries()
        total = sum(size for _used, size, _name in entries)
        for _used, size, name in entries:
            if total + need <= self.max_bytes:
                return
            if self._evict(name):
                total -= size

    def _evict(self, name: str) -> bool:
        path = self.dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # pinned by a reader (of this process or another)
            trash = self.dir / f".evict-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return False  # another process evicted it first
            shutil.rmtree(trash, ignore_errors=True)
            return True
        finally:
            os.close(fd)
