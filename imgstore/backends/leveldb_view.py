"""LevelDB databases opened by imgstore: the writer's own, and each reader's private view.

LevelDB lets one process open a database at a time (an fcntl lock on its ``LOCK`` file), and has
no read-only mode. imgstore promises readers in many processes beside a writer, so a reader never
opens the writer's database: it opens a *view*, made when the handle opens and again when
``refresh()`` sees new commits. Opening a database makes LevelDB write files of its own (a table of
the log's records, a new log, a new manifest), numbered from its manifest's next file number and
created with ``O_TRUNC`` over any file of that name. So a view shares no file LevelDB may write:
``CURRENT``, the manifest and the logs are copies, and only the table files its copy of the manifest
names are hard links, all numbered below that manifest's next file number (see ``_fill``). LevelDB
never changes a table it has written. A torn last record of a copied log or manifest (an append in
progress) reads as the end of the file.

A view is consistent if every table its manifest names was linked: LevelDB checks that when it
opens ("missing files"), and the caller checks the newest committed key. A writer that compacted
or flushed while the view was made shows as a changed file list: the view is made again.

Views live in the store (``leveldb-views-<gen>/<pid>-<token>``); a view whose process is gone (and
whose ``LOCK`` nobody holds) is deleted by the next reader. Where a view cannot be made in the store
(read-only media, a full disk), the reader copies the files to a private temporary directory
instead, deleted when it closes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import plyvel

from imgstore.errors import CorruptStoreError, StoreIOError
from imgstore.fileio import pid_alive

_DB_FILE = re.compile(r"^(CURRENT|MANIFEST-\d+|\d+\.(ldb|sst|log))$")
_MANIFEST = re.compile(r"^MANIFEST-\d+$")
_TABLE = re.compile(r"^\d+\.(ldb|sst)$")
_LOG = re.compile(r"^(\d+)\.log$")
_LOG_BLOCK = 32768  # LevelDB's log format (manifests are logs of VersionEdit records)
_VIEW_NAME = re.compile(r"^(\d+)-[0-9a-f]+$")
_TEMP_PREFIX = "imgstore-leveldb-view-"  # a temporary copy: <prefix><pid>-<mkdtemp's letters>
_TEMP_NAME = re.compile(rf"^{_TEMP_PREFIX}(\d+)-[A-Za-z0-9_]+$")
_TRIES = 8  # views made before a file list that keeps changing is taken as damage
# Handles a forked child inherited: LevelDB's locks and threads are the parent's, so the child never
# uses, closes or frees them (a destructor could wait forever for a background thread that is not there).
_inherited: list[object] = []
# Where a view could not be made in the store: copy instead (read-only media, a full disk, no links).
_NO_VIEW_HERE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EXDEV, errno.EMLINK)


# The process whose LevelDB may have started its background thread (for a flush or a compaction). A
# process forked from it inherits a LevelDB that believes the thread runs, but it does not: work
# scheduled there never happens, and a flush or a close waiting for it waits forever.
_background_pid: int | None = None


def background_works() -> bool:
    """Whether LevelDB's background thread can run here (this process is not a fork of one that started it)."""
    return _background_pid is None or _background_pid == os.getpid()


def may_start_background() -> None:
    global _background_pid
    if _background_pid is None:
        _background_pid = os.getpid()


def open_db(path: Path, *, create: bool = False, paranoid: bool = True) -> plyvel.DB:
    """A LevelDB database without compression (pixels and JPEGs do not compress: see the README).

    Without a background thread (a forked child) its memory table never switches to a new log: that
    would wait forever for a flush."""
    may_start_background()  # opening schedules a compaction where one is due
    return plyvel.DB(
        str(path),
        create_if_missing=create,
        error_if_exists=create,
        paranoid_checks=paranoid,
        compression=None,
        # Larger than the writer's flushes (leveldb.FLUSH_BYTES): LevelDB never switches logs on its own.
        write_buffer_size=64 << 20 if background_works() else 1 << 40,
    )


def set_aside(db: plyvel.DB | None) -> None:
    """Keep an inherited handle alive and untouched for the rest of this (forked) process."""
    if db is not None:
        _inherited.append(db)


class View:
    """A private database a reader opens: hard links in the store, or a temporary copy.

    Its folder is deleted at ``close()``, at the exit of the interpreter (a reader that never
    closes), or, after a kill, by the next reader (``remove_dead_views``)."""

    def __init__(self, source: Path, views: Path, must_hold: bytes | None) -> None:
        self.pid = os.getpid()
        self.temporary = False
        place, self.db = self._make(source, views, must_hold)
        self.path = place.path
        self._place = place
        self._finalizer = weakref.finalize(self, _close_view, self.db, place, self.pid)

    def close(self) -> None:
        self._finalizer()

    def retire(self) -> None:
        """Delete the folder now and leave the database to close when nothing refers to it: when the
        last read that still uses it returns. Closing it under a read in another thread (a refresh
        while threads read) would free LevelDB's state under that read and crash the process."""
        if self._finalizer.detach() is not None and os.getpid() == self.pid:
            self._place.remove()
        self.db = None

    def _make(self, source: Path, views: Path, must_hold: bytes | None) -> tuple[_Place, plyvel.DB]:
        in_store = True
        remove_dead_views(views)
        for _ in range(_TRIES):
            before = _listing(source)
            try:
                place = _linked(source, views) if in_store else _copied(source)
            except FileNotFoundError as exc:
                if not source.is_dir():
                    raise CorruptStoreError(f"{source} is missing") from exc
                continue  # a file went while it was linked (a writer's compaction): again
            except CorruptStoreError:
                if _listing(source) != before:
                    continue  # the writer replaced its manifest meanwhile
                raise
            except OSError as exc:
                if not in_store or exc.errno not in _NO_VIEW_HERE:
                    raise StoreIOError(f"cannot read {source}: {exc}") from exc
                in_store = False
                continue
            try:
                db = open_db(place.path)
            except plyvel.Error as exc:
                place.remove()
                if _listing(source) != before:
                    continue  # the writer flushed or compacted meanwhile
                if in_store and isinstance(exc, plyvel.IOError) and _no_room(str(exc)):
                    in_store = False  # LevelDB could not write its files in the view: copy elsewhere
                    continue
                raise CorruptStoreError(f"{source} cannot be opened as LevelDB: {exc}") from exc
            try:
                held = must_hold is None or db.get(must_hold) is not None
            except plyvel.Error as exc:
                _discard(db, place)
                raise CorruptStoreError(f"{source} is damaged: {exc}") from exc
            if not held:
                _discard(db, place)
                if _listing(source) != before:
                    continue
                raise CorruptStoreError(f"{source} does not hold the newest committed record")
            self.temporary = not in_store
            return place, db
        raise CorruptStoreError(f"{source}: its files kept changing while a view of them was made")


def _close_view(db: plyvel.DB, place: _Place, pid: int) -> None:
    """Close a view and delete its folder (once: at close, when it is collected, or at exit)."""
    if os.getpid() != pid:
        set_aside(db)  # a forked child's copy: the parent's view, not the child's to close
        return
    _discard(db, place)


def _discard(db: plyvel.DB, place: _Place) -> None:
    try:
        db.close()
    finally:
        place.remove()


class _Place:
    """A view's folder ``parent/name``; ``parent`` is the real directory (not a symbolic link) ``ident`` names."""

    def __init__(self, parent: Path, name: str, ident: tuple[int, int]) -> None:
        self.parent, self.name, self.ident = parent, name, ident
        self.path = parent / name

    def remove(self) -> None:
        try:
            fd = _open_dir(self.parent)
        except OSError:
            return
        try:
            if _ident(os.fstat(fd)) == self.ident:  # never a folder put in its parent's place
                _remove_at(fd, self.name)
        finally:
            os.close(fd)


def _ident(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _remove_at(parent_fd: int, name: str) -> None:
    """Delete the folder ``name`` of the directory ``parent_fd`` and what it holds, following no symbolic link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return  # gone, or not a real directory
    try:
        for entry in os.listdir(fd):
            try:
                os.unlink(entry, dir_fd=fd)  # a symbolic link goes itself, never what it names
            except IsADirectoryError:
                _remove_at(fd, entry)
            except OSError:
                pass
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=parent_fd)


def _open_dir(path: Path) -> int:
    """A descriptor of the directory ``path``; OSError (ELOOP, ENOTDIR) if it is a symbolic link or no directory."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _no_room(message: str) -> bool:
    return any(word in message for word in ("No space", "Read-only", "Permission denied", "Disk quota"))


def _listing(source: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(source) if _DB_FILE.match(name))
    except FileNotFoundError:
        return []


def _linked(source: Path, views: Path) -> _Place:
    """A view in the store's views folder, which must be a real directory there (never a symbolic link)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(views)
    try:
        fd = _open_dir(views)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            message = f"{views} is not a directory (a symbolic link?): views are made in the store only"
            raise CorruptStoreError(message) from exc
        raise
    try:
        ident = _ident(os.fstat(fd))
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        os.mkdir(name, 0o700, dir_fd=fd)
        place = _Place(views, name, ident)
        if _ident(os.lstat(views)) != ident or not stat.S_ISDIR(os.lstat(place.path).st_mode):
            place.remove()
            raise CorruptStoreError(f"{views} was replaced while a view was made in it")
    finally:
        os.close(fd)
    try:
        _fill(source, place.path, os.link)
    except BaseException:
        place.remove()
        raise
    return place


def _copied(source: Path) -> _Place:
    """A view copied to a private temporary folder (read-only media, a full disk)."""
    temp = Path(tempfile.gettempdir())
    remove_dead_views(temp, _TEMP_NAME)
    path = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-"))
    place = _Place(path.parent, path.name, _ident(os.stat(path.parent)))
    try:
        _fill(source, path, shutil.copyfile)
    except BaseException:
        place.remove()
        raise
    return place


def _fill(source: Path, path: Path, put_table: Callable[[Path, Path], object]) -> None:
    """Make ``path`` a database of the committed state of ``source``, sharing no file LevelDB writes.

    LevelDB opens a database by writing new files (a table of the log's records, a log, a manifest)
    numbered from its manifest's next file number, and it creates them with ``O_TRUNC``, over any
    file of that name. The writer creates a table *before* the manifest edit that names it and moves
    the next file number past it, so a table file present in ``source`` may carry a number the view's
    LevelDB allocates: a hard link to it would let the view truncate the writer's file. So the view
    gets copies of ``CURRENT``, the manifest and the logs (files the writer appends to), and links to
    exactly the tables its copy of the manifest names, all numbered below that manifest's next file
    number: the view's own files are numbered from there on and never meet a link. ``LOCK`` and
    ``LOG`` are the view's own.
    """
    shutil.copyfile(source / "CURRENT", path / "CURRENT")
    manifest = (path / "CURRENT").read_text(errors="replace").strip()
    if not _MANIFEST.match(manifest):
        raise CorruptStoreError(f"{source}/CURRENT does not name a manifest")
    shutil.copyfile(source / manifest, path / manifest)
    state = read_manifest(path / manifest)
    tables = {number for number in state.tables if number < state.next_file}
    if len(tables) != len(state.tables):
        raise CorruptStoreError(f"{source}/{manifest} names a table past its next file number")
    names = {int(name.partition(".")[0]): name for name in _listing(source) if _TABLE.match(name)}
    for number in sorted(tables):
        name = names.get(number, f"{number:06d}.ldb")  # missing: linking raises FileNotFoundError (again)
        put_table(source / name, path / name)
    for name in _listing(source):
        match = _LOG.match(name)
        if match and (int(match.group(1)) >= state.log_number or int(match.group(1)) == state.prev_log):
            try:
                shutil.copyfile(source / name, path / name)
            except FileNotFoundError:
                pass  # the writer flushed it meanwhile: its records are in a table; the open tells


class _ManifestState:
    def __init__(self) -> None:
        self.next_file = 0
        self.log_number = 0
        self.prev_log = 0
        self.tables: set[int] = set()
        self.ranges: dict[int, tuple[bytes, bytes]] = {}  # live table -> its smallest and largest user keys


def varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _manifest_records(data: bytes) -> Iterator[bytes]:
    """The records of a LevelDB log file (32 KiB blocks of fragments); a torn tail ends it, as in LevelDB."""
    record = bytearray()
    at = 0
    while at < len(data):
        left = _LOG_BLOCK - at % _LOG_BLOCK
        if left < 7:  # a block's trailer
            at += left
            continue
        if at + 7 > len(data):
            return
        length, kind = int.from_bytes(data[at + 4 : at + 6], "little"), data[at + 6]
        fragment = data[at + 7 : at + 7 + length]
        if len(fragment) < length:
            return  # torn tail
        at += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        if kind == 1:  # FULL
            yield bytes(fragment)
            record.clear()
        elif kind == 2:  # FIRST
            record[:] = fragment
        elif kind == 3:  # MIDDLE
            record += fragment
        elif kind == 4:  # LAST
            record += fragment
            yield bytes(record)
            record.clear()
        else:
            raise ValueError(f"record type {kind}")


def read_manifest(manifest: Path) -> _ManifestState:
    """The next file number, log numbers and live tables of a LevelDB manifest (its VersionEdit records).

    A manifest LevelDB would refuse (damage) raises CorruptStoreError here or fails LevelDB's open,
    which checks the records' checksums, before it writes anything."""
    state = _ManifestState()
    try:
        for record in _manifest_records(manifest.read_bytes()):
            at = 0
            while at < len(record):
                tag, at = varint(record, at)
                if tag == 1:  # comparator name
                    length, at = varint(record, at)
                    at += length
                elif tag == 2:
                    state.log_number, at = varint(record, at)
                elif tag == 3:
                    state.next_file, at = varint(record, at)
                elif tag == 4:  # last sequence
                    _, at = varint(record, at)
                elif tag == 5:  # compact pointer: level, key
                    _, at = varint(record, at)
                    length, at = varint(record, at)
                    at += length
                elif tag == 6:  # deleted file: level, number
                    _, at = varint(record, at)
                    number, at = varint(record, at)
                    state.tables.discard(number)
                    state.ranges.pop(number, None)
                elif tag == 7:  # new file: level, number, size, smallest, largest
                    _, at = varint(record, at)
                    number, at = varint(record, at)
                    _, at = varint(record, at)
                    bounds = []
                    for _key in range(2):  # internal keys: the user key, then an 8-byte tag
                        length, at = varint(record, at)
                        bounds.append(record[at : at + length - 8])
                        at += length
                    state.tables.add(number)
                    state.ranges[number] = (bounds[0], bounds[1])
                elif tag == 9:
                    state.prev_log, at = varint(record, at)
                else:
                    raise ValueError(f"tag {tag}")
                if at > len(record):
                    raise ValueError("truncated edit")
    except ValueError as exc:
        raise CorruptStoreError(f"{manifest.name} is not a LevelDB manifest: {exc}") from exc
    if not state.next_file:
        raise CorruptStoreError(f"{manifest.name} holds no next file number")
    return state


def remove_dead_views(parent: Path, pattern: re.Pattern[str] | None = None) -> None:
    """Delete the views of processes that are gone (killed readers, e.g. DataLoader workers).

    ``parent`` is a store's views folder, or the temporary directory (``pattern``: imgstore's copies,
    those of this user only). Only real directories named by imgstore, of a dead process, whose LevelDB
    lock nobody holds, are deleted; nothing is followed through a symbolic link."""
    try:
        fd = _open_dir(parent)
    except OSError:
        return  # missing, or not a real directory: nothing of ours to delete there
    try:
        for name in os.listdir(fd):
            match = (pattern or _VIEW_NAME).match(name)
            if match is None or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
                continue
            try:
                info = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode) or (pattern is not None and info.st_uid != os.geteuid()):
                continue
            if _lock_free(fd, name):
                _remove_at(fd, name)
    finally:
        os.close(fd)


def _lock_free(parent_fd: int, name: str) -> bool:
    """Whether no process holds the view's LevelDB lock (a process of another PID namespace might)."""
    try:
        view = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        fd = os.open("LOCK", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=view)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    finally:
        os.close(view)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops the lock just taken
    return True
