"""Where a sharded dataset lives: a local directory, or any fsspec URL (``s3://bucket/prefix``, ``gs://``...).

A local path (or ``file://`` URL) is used in place: shards are read where they are and the manifest
is committed by a rename. Anything else goes through fsspec (the ``[remote]`` extra): shards are
uploaded file by file, then the manifest is written as one object (object stores replace an object
whole, so a reader gets the old manifest or the new one); on S3 the write is conditional on the
manifest's ETag when it was read (``If-Match``, or ``If-None-Match: *`` for the first), so two
writers never drop each other's shards. Errors of the transport (a refused
connection, a reset, a timeout: fsspec and its backends retry those themselves first) become
:class:`StoreIOError`; a missing object is :class:`StoreNotFoundError`.
"""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from imgstore.errors import (
    CorruptStoreError,
    ImgStoreError,
    InvalidOptionError,
    MissingDependencyError,
    StoreBusyError,
    StoreIOError,
    StoreNotFoundError,
)
from imgstore.fileio import fsync_dir, open_regular
from imgstore.sharded.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARDS_DIR

# A shard's folder under shards/ (shard-<hex>), or a local writer's staging folder (.shard-<hex>.tmp).
SHARD_FOLDER = re.compile(r"shard-[0-9a-f]{6,40}|\.shard-[0-9a-f]{6,40}\.tmp")

INSTALL_HINT = "pip install 'imgstore-ml[remote]'"


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise MissingDependencyError(f"a dataset at a URL needs fsspec (and s3fs for s3://): {INSTALL_HINT}") from exc
    return fsspec


def _modified(info: Mapping[str, Any]) -> float:
    """An object's last write time from its fsspec details (s3fs: LastModified; gcsfs: updated); +inf when it
    does not say, so an object of unknown age is never taken for an old one."""
    value = info.get("LastModified", info.get("mtime", info.get("updated")))
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return math.inf


def _folder_age_size(name: str, shards_fd: int) -> tuple[float, int]:
    """The newest write time of anything in folder ``name`` of ``shards/`` and its bytes, following no link."""
    newest, size = os.stat(name, dir_fd=shards_fd, follow_symlinks=False).st_mtime, 0
    for _path, dirnames, filenames, fd in os.fwalk(name, dir_fd=shards_fd):  # never enters a link
        for entry in dirnames + filenames:
            try:
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:  # a writer's file that came and went
                continue
            newest, size = max(newest, st.st_mtime), size + (st.st_size if entry in filenames else 0)
    return newest, size


def _remove_folder(name: str, shards_fd: int) -> None:
    """Delete folder ``name`` of ``shards/`` and what is in it, relative to descriptors, following no link:
    a link is deleted, never what it points to (shutil.rmtree takes a dir_fd only from Python 3.11)."""
    if not stat.S_ISDIR(os.stat(name, dir_fd=shards_fd, follow_symlinks=False).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder (a link?), not deleted")
    # Bottom up; fwalk enters no link (it checks each folder it opens is the one it listed).
    for _path, dirnames, filenames, fd in os.fwalk(name, topdown=False, dir_fd=shards_fd):
        for entry in dirnames + filenames:
            if stat.S_ISDIR(os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode):
                os.rmdir(entry, dir_fd=fd)
            else:
                os.unlink(entry, dir_fd=fd)
    os.rmdir(name, dir_fd=shards_fd)


def is_local(url: str | os.PathLike[str]) -> bool:
    text = os.fspath(url)
    return "://" not in text or text.startswith("file://")


class Location:
    """A dataset root: read the manifest, put a shard's files, commit a manifest, fetch a shard's files."""

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> None:
        text = os.fspath(url)
        self.url = text
        self.storage_options = dict(storage_options or {})
        self.local: Path | None = None
        self._fs: Any = None
        self.manifest_etag: str | None = None  # of the manifest last read (object stores)
        if is_local(text):
            self.local = Path(text.removeprefix("file://")).absolute()
            return
        self._connect()

    def _connect(self) -> None:
        try:
            self._fs, root = _fsspec().core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:  # fsspec is there, but not the protocol's package (s3fs, gcsfs...)
            raise MissingDependencyError(f"{self.url}: {exc} ({INSTALL_HINT})") from exc
        self.root = root.rstrip("/")
        self._pid = os.getpid()

    @property
    def fs(self) -> Any:
        """The fsspec file system (None for a local dataset); made again in a forked child, since fsspec's
        async file systems (s3fs, gcsfs) refuse to run in one ("not fork-safe"): a fork-started DataLoader
        worker reading a dataset its parent opened."""
        if self._fs is not None and self._pid != os.getpid():
            self._connect()
        return self._fs

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def shard_path(self, name: str) -> Path:
        """A shard's store directory (local datasets only)."""
        assert self.local is not None
        return self.local / "shards" / name

    # ------------------------------------------------------------------ the manifest

    def read_manifest(self) -> bytes | None:
        """The manifest's bytes, or None when there is none (no dataset yet)."""
        if self.local is not None:
            try:
                with open_regular(self.local / MANIFEST_NAME) as f:
                    return f.read(MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise StoreIOError(f"{self.local / MANIFEST_NAME}: {exc}") from exc
        path = self._remote(MANIFEST_NAME)
        with self._transport(MANIFEST_NAME):
            for _ in range(10):  # the ETag before and after the read agree: it is this content's
                try:
                    before = self._etag(path)
                    raw: bytes = self.fs.cat_file(path)
                    if self._etag(path) == before:
                        self.manifest_etag = before
                        return raw
                except FileNotFoundError:
                    self.manifest_etag = None
                    return None
        raise StoreBusyError(f"{self.url}: the manifest changed during every read of it")

    def _etag(self, path: str) -> str | None:
        tag = self.fs.info(path, refresh=True).get("ETag") if self._conditional else None
        return str(tag) if tag is not None else None

    @property
    def _conditional(self) -> bool:
        """S3 (and S3-compatible stores) replace an object only if its ETag is still the one read."""
        protocol = self.fs.protocol
        return "s3" in (protocol if isinstance(protocol, tuple | list) else (protocol,))

    def write_manifest(self, data: bytes) -> None:
        """Commit: replace the manifest whole (temp file, fsync, rename locally; one PUT remotely)."""
        if self.local is not None:
            local = self.local / MANIFEST_NAME
            tmp = local.with_name(f".{MANIFEST_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, local)
            except BaseException as exc:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if isinstance(exc, OSError):
                    raise StoreIOError(f"{local}: the manifest could not be committed: {exc}") from exc
                raise
            fsync_dir(self.local)
            return
        path = self._remote(MANIFEST_NAME)
        condition: dict[str, str] = {}
        if self._conditional:  # no other writer may have committed since our read (S3 conditional writes)
            tag = self.manifest_etag
            condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            with self._transport(MANIFEST_NAME):
                self.fs.pipe_file(path, data, **condition)
        except StoreIOError:
            if condition and self._current_etag(path) != self.manifest_etag:
                raise StoreBusyError(
                    f"{self.url}: another writer committed since this one read the manifest; this writer's shards "
                    "are uploaded and sealed, not committed: commit_shards(url, shards) appends them"
                ) from None
            raise

    def _current_etag(self, path: str) -> str | None:
        try:
            with self._transport(MANIFEST_NAME):
                return self._etag(path)
        except StoreNotFoundError:
            return None

    # ------------------------------------------------------------------ shards

    def upload_shard(self, name: str, local_dir: Path, files: list[str]) -> None:
        """Put a sealed shard's files under ``shards/<name>/`` (remote datasets only)."""
        for rel in files:
            with self._transport(f"shards/{name}/{rel}"):
                self.fs.put_file(str(local_dir / rel), self._remote(f"shards/{name}/{rel}"))

    def download(self, name: str, rel: str, dest: Path) -> None:
        """Fetch one file of a shard into ``dest`` (a new file; remote datasets only)."""
        with self._transport(f"shards/{name}/{rel}"):
            self.fs.get_file(self._remote(f"shards/{name}/{rel}"), str(dest))

    def shard_folders(self) -> dict[str, tuple[float, int]]:
        """Every folder under ``shards/`` (sealed shards, and what killed writers left): name -> (the newest
        write time of anything in it, its bytes). Links are left out (a shard is never one)."""
        found: dict[str, tuple[float, int]] = {}
        if self.local is not None:
            fd = self._open_shards()
            if fd is None:
                return found
            try:
                with os.scandir(fd) as entries:
                    names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
                for name in names:
                    try:
                        found[name] = _folder_age_size(name, fd)
                    except FileNotFoundError:  # a writer renamed its staging folder meanwhile
                        continue
            except OSError as exc:
                raise StoreIOError(f"{self.local / SHARDS_DIR}: {exc}") from exc
            finally:
                os.close(fd)
            return found
        base = self._remote(SHARDS_DIR)
        with self._transport(SHARDS_DIR):
            try:
                objects: dict[str, dict[str, Any]] = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return found
        for path, info in objects.items():
            name = path[len(base) + 1 :].split("/", 1)[0]
            newest, size = found.get(name, (0.0, 0))
            found[name] = (max(newest, _modified(info)), size + int(info.get("size") or 0))
        return found

    def shard_sizes(self, name: str) -> dict[str, int]:
        """The files stored under ``shards/<name>/`` and their sizes, as listed now (remote datasets only)."""
        base = self._remote(f"{SHARDS_DIR}/{name}")
        with self._transport(f"{SHARDS_DIR}/{name}"):
            try:
                objects: dict[str, dict[str, Any]] = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        return {path[len(base) + 1 :]: int(info.get("size") or 0) for path, info in objects.items()}

    def remove_shard_folder(self, name: str) -> None:
        """Delete ``shards/<name>/`` and everything in it: only a real folder in the real ``shards/`` (no link
        is followed, neither ``shards/`` nor the folder nor anything in it)."""
        if not SHARD_FOLDER.fullmatch(name):
            raise InvalidOptionError(f"{name!r} is not the name of a shard folder")
        if self.local is not None:
            fd = self._open_shards()
            path = self.local / SHARDS_DIR / name
            if fd is None:
                raise StoreNotFoundError(f"{path} is not there")
            try:
                _remove_folder(name, fd)
            except OSError as exc:
                raise StoreIOError(f"{path}: {exc}") from exc
            finally:
                os.close(fd)
            return
        with self._transport(f"{SHARDS_DIR}/{name}"):
            self.fs.rm(self._remote(f"{SHARDS_DIR}/{name}"), recursive=True)

    def _open_shards(self) -> int | None:
        """A descriptor of the local dataset's ``shards/`` folder, None if there is none; refuses a link there
        (a deletion through it would land outside the dataset)."""
        assert self.local is not None
        folder = self.local / SHARDS_DIR
        try:
            root = os.open(self.local, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return os.open(SHARDS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
            finally:
                os.close(root)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if os.path.islink(folder) or exc.errno == errno.ENOTDIR:
                raise CorruptStoreError(
                    f"{folder} is {'a symbolic link' if os.path.islink(folder) else 'not a folder'}: imgstore never "
                    "makes one there; nothing is listed or deleted through it"
                ) from None
            raise StoreIOError(f"{folder}: {exc}") from exc

    def read_ranges(self, name: str, rels: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes ``starts[k]:ends[k]`` of file ``rels[k]`` of shard ``name``, as concurrent ranged GETs
        (``fs.cat_ranges``; s3fs retries each range's transient faults itself); remote datasets only."""
        paths = [self._remote(f"shards/{name}/{rel}") for rel in rels]
        with self._transport(f"shards/{name}/{rels[0] if rels else ''}"):
            got: list[bytes] = self.fs.cat_ranges(paths, starts, ends, on_error="raise")
        return got

    def remote_size(self, name: str, rel: str) -> int | None:
        """Bytes of file ``rel`` of shard ``name`` on the server, or None if it is not there; remote datasets only."""
        try:
            with self._transport(f"shards/{name}/{rel}"):
                return int(self.fs.size(self._remote(f"shards/{name}/{rel}")))
        except StoreNotFoundError:
            return None

    @contextmanager
    def _transport(self, rel: str) -> Iterator[None]:
        """Errors of the remote file system, as imgstore's (after fsspec's and the backend's own retries)."""
        where = f"{self.url.rstrip('/')}/{rel}"
        try:
            yield
        except ImgStoreError:
            raise
        except FileNotFoundError as exc:
            raise StoreNotFoundError(f"{where} is not there: {exc}") from exc
        except TypeError as exc:  # not the network: storage_options the file system does not take
            raise InvalidOptionError(f"{where}: storage_options: {exc}") from exc
        except Exception as exc:  # s3fs/botocore/aiohttp raise their own types for a dead connection
            raise StoreIOError(f"{where}: {type(exc).__name__}: {exc}"[:500]) from exc
