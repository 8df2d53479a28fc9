"""The manifest of a sharded dataset: which sealed shards it holds, in order, with their counts and checksums.

It is one JSON file, ``imgstore-sharded.json``, at the dataset's root, and the dataset's one commit
point: shards are written (and uploaded) first, then the manifest naming them replaces the old one
atomically (a rename locally; one PUT on object storage). A shard the manifest does not name is
invisible. Shards are never changed or deleted, so a reader that read an older manifest keeps a
consistent view of the dataset as it was.

Each shard is an imgstore store (any backend and codec). Its entry lists every file of the store
with its size and XXH3-128, and the shard's own checksum is XXH3-128 over that listing, so a
downloaded copy is checked file by file before it is used. The manifest carries an XXH3-64 of its
own content: a damaged manifest is :class:`CorruptStoreError`, never a wrong dataset. It is
parsed with ``json`` only (no pickle), and every value is checked on reading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from imgstore.errors import CorruptStoreError, FormatVersionError

MANIFEST_NAME = "imgstore-sharded.json"
SHARDS_DIR = "shards"
FORMAT = "imgstore-sharded"
VERSION = 1
MAX_MANIFEST_BYTES = 1 << 28  # 256 MiB: ~10^5 shards; a forged size must not make a reader allocate more
_MAX_COUNT = 1 << 48
_SHARD_NAME = re.compile(r"shard-[0-9a-f]{6,40}")
# A file of a shard: relative, '/'-separated, no '..', no hidden or absolute parts.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_HASH = re.compile(r"[0-9a-f]{32}")
# Files a reader makes or changes (LMDB's reader table, SQLite's WAL index, the writer lock): not
# content, so not listed, hashed or uploaded; each backend makes them again where it needs them.
VOLATILE = re.compile(r"lock\.mdb|writer\.lock|.*-(?:wal|shm|journal)")


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard's store: its path inside the shard, its size and its XXH3-128 (hex)."""

    path: str
    bytes: int
    xxh3_128: str


@dataclass(frozen=True)
class ShardInfo:
    """A sealed shard: where it is (``shards/<name>/``), how many records, its files and checksum.

    Picklable and JSON-able (:meth:`to_dict`), so a Dask task can return it to the committer.
    """

    name: str
    count: int
    backend: str
    codec: str
    shape: tuple[int, ...] | None
    files: tuple[ShardFile, ...]
    checksum: str
    classes: tuple[str, ...] | None = None  # the store's class names (label i is classes[i]), if it has them

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "backend": self.backend,
            "codec": self.codec,
            "shape": list(self.shape) if self.shape is not None else None,
            "bytes": self.bytes,
            "checksum": self.checksum,
            "files": [[f.path, f.bytes, f.xxh3_128] for f in self.files],
            **({"classes": list(self.classes)} if self.classes is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ShardInfo:
        """Parse and check one manifest entry; :class:`CorruptStoreError` for anything impossible."""
        try:
            info = cls(
                name=_str(data["name"]),
                count=_int(data["count"]),
                backend=_str(data["backend"]),
                codec=_str(data["codec"]),
                shape=None if data["shape"] is None else tuple(_int(s) for s in _list(data["shape"])),
                files=tuple(ShardFile(_str(p), _int(n), _str(h)) for p, n, h in _list(data["files"])),
                checksum=_str(data["checksum"]),
                classes=None if data.get("classes") is None else tuple(_str(c) for c in _list(data["classes"])),
            )
            stated_bytes = _int(data["bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"a shard entry of the manifest is not valid: {exc!r}"[:300]) from None
        problems = []
        if not _SHARD_NAME.fullmatch(info.name):
            problems.append(f"name {info.name!r}"[:100])
        if not 0 <= info.count < _MAX_COUNT:
            problems.append(f"count {info.count}")
        if info.shape is not None and (len(info.shape) > 8 or any(not 0 < s < 1 << 31 for s in info.shape)):
            problems.append(f"shape {info.shape}")
        bad = [f.path for f in info.files if not safe_relative(f.path) or not _HASH.fullmatch(f.xxh3_128)]
        if bad or any(not 0 <= f.bytes < 1 << 50 for f in info.files) or not info.files:
            problems.append(f"files {bad[:3]!r}"[:200])
        if info.classes is not None and (len(info.classes) > 1 << 20 or any(len(c) > 1000 for c in info.classes)):
            problems.append("classes")
        if len({f.path for f in info.files}) != len(info.files):
            problems.append("a file listed twice")
        if stated_bytes != info.bytes or info.checksum != shard_checksum(info.files):
            problems.append("bytes or checksum do not match the files listed")
        if problems:
            raise CorruptStoreError(f"shard entry {info.name!r} holds impossible values: {'; '.join(problems)}"[:500])
        return info


def common_classes(shards: Iterable[ShardInfo]) -> list[str] | None:
    """The class names every shard has (label ``i`` is ``classes[i]``), else None."""
    named = {s.classes for s in shards}
    if len(named) != 1:
        return None
    (classes,) = named
    return list(classes) if classes is not None else None


@dataclass(frozen=True)
class DatasetManifest:
    """The committed state of a sharded dataset; ``revision`` counts commits (0: nothing committed yet)."""

    shards: tuple[ShardInfo, ...] = ()
    revision: int = 0

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "revision": self.revision,
            "count": self.count,
            "shards": [s.to_dict() for s in self.shards],
        }
        body["xxh3_64"] = _body_hash(body)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    def appended(self, shards: Iterable[ShardInfo]) -> DatasetManifest:
        new = tuple(shards)
        names = {s.name for s in self.shards}
        clash = [s.name for s in new if s.name in names]
        if clash or len({s.name for s in new}) != len(new):
            raise CorruptStoreError(f"shard {clash[:1] or 'name'} is already in the dataset: a shard is committed once")
        return DatasetManifest(self.shards + new, self.revision + 1)


def parse_manifest(raw: bytes, where: object) -> DatasetManifest:
    """The manifest in ``raw``; :class:`CorruptStoreError` (or :class:`FormatVersionError`) otherwise."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptStoreError(f"{where} is not a sharded dataset manifest (over {MAX_MANIFEST_BYTES} bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptStoreError(f"{where} is not a sharded dataset manifest: {type(exc).__name__}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptStoreError(f"{where} is not a sharded dataset manifest (no format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise FormatVersionError(f"{where} has sharded format version {data.get('version')!r}; this reads {VERSION}")
    if data.get("xxh3_64") != _body_hash({k: v for k, v in data.items() if k != "xxh3_64"}):
        raise CorruptStoreError(f"{where} is damaged: its checksum does not match its content")
    try:
        shards = tuple(ShardInfo.from_dict(entry) for entry in _list(data["shards"]))
        manifest = DatasetManifest(shards, _int(data["revision"]))
        count = _int(data["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"{where} is not a valid sharded dataset manifest: {exc!r}"[:300]) from None
    if count != manifest.count or len({s.name for s in shards}) != len(shards) or manifest.revision < 0:
        raise CorruptStoreError(f"{where} holds impossible values (count, revision or a shard named twice)")
    return manifest


def safe_relative(path: str) -> bool:
    """A path that stays inside the shard however it is joined: no absolute, empty, '.' or '..' parts."""
    parts = path.split("/")
    return len(parts) <= 8 and all(_PART.fullmatch(p) and p not in (".", "..") for p in parts)


def hash_file(path: Path | str) -> tuple[int, str]:
    """Size and XXH3-128 (hex) of a file, read in 4 MiB pieces."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def list_files(root: Path) -> tuple[ShardFile, ...]:
    """Every regular file under ``root`` but :data:`VOLATILE` ones (sorted, '/'-separated), with its size and
    hash; links are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if VOLATILE.fullmatch(name):
                continue
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if full.is_symlink() or not full.is_file() or not safe_relative(rel):
                raise CorruptStoreError(f"{full}: a shard holds regular files with plain names only")
            found.append(ShardFile(rel, *hash_file(full)))
    return tuple(found)


def shard_checksum(files: Sequence[ShardFile]) -> str:
    """XXH3-128 of the listing (path, size, hash of each file): the shard's identity in caches."""
    listing = "\n".join(f"{f.path}\t{f.bytes}\t{f.xxh3_128}" for f in sorted(files, key=lambda f: f.path))
    return str(xxhash.xxh3_128_hexdigest(listing.encode()))


def _body_hash(body: dict[str, Any]) -> int:
    return int(xxhash.xxh3_64_intdigest(json.dumps(body, sort_keys=True).encode()))


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 1000:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value
