"""The manifest: a small JSON file in every store that says what the store is and how much of it is committed.

Writing the manifest is the commit point of every write: a backend first writes records at
indices ``count .. count + n - 1`` (invisible to readers, who never look past ``count``), then the
manifest is replaced atomically (write a temporary file, fsync, rename) with the new count. A crash
before the rename leaves the old state; after it, the new one. No backend needs its own commit record.

The manifest also names every file the store owns (``files``), so that replacing a store deletes
those and nothing else, and the *generation* those files are named after: a store created again
with mode ``"w"`` gets new file names, so a reader of the old store never reads the new one's files.
A manifest with ``creating`` set is a store whose creation has not finished (no record is lost by
finishing or redoing it).

Format versions: 1 (no generation, files or record checksums other than CRC-32) and 2 (no codec:
fixed-shape raw pixels only) are still read and appended to; new stores are version 3, which adds
the codec (``raw``, ``png``, ``jpeg``, ``webp``, ``keep``) with its parameters, the decoded image
mode, whether images vary in shape, and the class names.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.errors import CorruptStoreError, FormatVersionError, StoreNotFoundError
from imgstore.fileio import fsync_dir, open_regular

MANIFEST_NAME = "imgstore.json"
WRITER_LOCK_NAME = "writer.lock"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# What a backend may add to one of its own names for a file it is still making (HDF5: ".rebuild").
TEMPORARY_SUFFIXES = (".rebuild", ".tmp")
_V2_FIELDS = ("generation", "files", "checksum", "group", "creating")
_V3_FIELDS = ("codec", "codec_params", "image_mode", "varied", "classes")
IMAGE_MODES = (None, "RGB", "L")
MAX_CLASSES = 1 << 16
_MAX_MANIFEST_BYTES = 1 << 20
MAX_IMAGE_BYTES = 1 << 31  # 2 GiB: a tampered shape may not make a read allocate terabytes
_MAX_COUNT = 1 << 48
MAX_DIMS = 8
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class Manifest:
    backend: str
    shape: tuple[int, ...] | None  # None until the first image fixes it
    count: int = 0
    dtype: str = "uint8"
    options: dict[str, Any] = field(default_factory=dict)  # creation options the backend keeps
    format_version: int = FORMAT_VERSION
    generation: str = ""  # names this creation's files ("" in version 1 stores)
    files: tuple[str, ...] = ()  # entries of the store directory the store owns, besides manifest and lock
    checksum: str = "xxh3_64"  # per-record checksum algorithm ("crc32" in version 1 stores)
    group: int = 0  # records per group checksum; 0 until the shape is known, 1 for none
    creating: bool = False
    codec: str = "raw"  # how records are stored (imgstore.codecs); "raw": pixels
    codec_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"quality": 90}
    image_mode: str | None = None  # what reads decode to: None as stored, "RGB", "L" (PIL's convert)
    varied: bool = False  # images of any shape (shape stays None)
    classes: tuple[str, ...] | None = None  # class names, label i is classes[i]
    # convert --downscale N: larger images were made this small (shorter side N). Not in the JSON when
    # None, so that other manifests stay as they were; a resume must not mix two sizes silently.
    downscale: int | None = None

    @property
    def encoded(self) -> bool:
        """Records are variable-length bytes (an encoded image, or raw pixels with their shape), not fixed pixels."""
        return self.codec != "raw" or self.varied

    def with_count(self, count: int) -> Manifest:
        return replace(self, count=count)

    def to_json(self) -> str:
        data = asdict(self)
        data["shape"] = list(self.shape) if self.shape is not None else None
        data["files"] = list(self.files)
        data["classes"] = list(self.classes) if self.classes is not None else None
        if self.downscale is None:
            del data["downscale"]
        if self.format_version <= 2:
            for name in _V3_FIELDS:
                del data[name]
        if self.format_version == 1:
            for name in _V2_FIELDS:
                del data[name]
        data["crc32"] = _checksum(data)
        return json.dumps(data, indent=1, sort_keys=True)

    def owns(self, name: str) -> bool:
        """Whether ``name`` (an entry of the store directory) belongs to this store."""
        return (
            name in (MANIFEST_NAME, WRITER_LOCK_NAME)
            or (name.startswith(f".{MANIFEST_NAME}.") and name.endswith(".tmp"))
            or any(name == own or name in (f"{own}{suffix}" for suffix in TEMPORARY_SUFFIXES) for own in self.files)
        )

    @property
    def image_nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape is not None else 0


def _checksum(data: dict[str, Any]) -> int:
    """CRC-32 of the manifest's fields: a damaged count or shape must not pass for a real one."""
    fields = {key: value for key, value in data.items() if key != "crc32"}
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode())


def generation_name(name: str, generation: str) -> str:
    """``images.h5`` of generation ``ab12`` is ``images-ab12.h5`` (version 1 stores: just ``images.h5``)."""
    if not generation:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{generation}{dot}{suffix}"


def manifest_path(store_path: Path) -> Path:
    return store_path / MANIFEST_NAME


def read_manifest(store_path: Path) -> Manifest:
    """The store's manifest; :class:`CorruptStoreError` for anything that is not a valid one."""
    path = manifest_path(store_path)
    try:
        with open_regular(path) as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        sharded = os.path.isfile(os.path.join(store_path, "imgstore-sharded.json"))  # imgstore.sharded's manifest
        hint = (
            ": it is a sharded dataset (imgstore.sharded.open_sharded, imgstore.sharded.torch.ShardedIterable)"
            if sharded
            else ""
        )
        raise StoreNotFoundError(f"no imgstore store at {store_path} (no {MANIFEST_NAME}){hint}") from None
    except NotADirectoryError:
        raise StoreNotFoundError(f"{store_path} is a file, not an imgstore store directory") from None
    except IsADirectoryError:
        raise CorruptStoreError(f"{path} is a directory, not an imgstore manifest") from None
    except OSError as exc:
        raise CorruptStoreError(f"{path} cannot be read: {exc}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest (over {_MAX_MANIFEST_BYTES} bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest: {type(exc).__name__}") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest (no format_version)")
    version = data["format_version"]
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{store_path} has store format version {version!r}; this imgstore reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if data.get("crc32") != _checksum(data):
        raise CorruptStoreError(f"{path} is damaged: its checksum does not match its content")
    try:
        manifest = _parse(data, version)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest: {exc!r}"[:500]) from None
    _check_values(path, manifest)
    return manifest


def _parse(data: dict[str, Any], version: int) -> Manifest:
    shape = data["shape"]
    options = data.get("options", {})
    if not isinstance(options, dict) or not isinstance(data["backend"], str):
        raise TypeError("backend must be a string and options an object")
    extra: dict[str, Any] = {"checksum": "crc32", "group": 1}  # what a version 1 store means
    if version >= 2:
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files must be a list of names")
        extra = {
            "generation": _str(data["generation"]),
            "files": tuple(files),
            "checksum": _str(data["checksum"]),
            "group": _int(data["group"]),
            "creating": _bool(data["creating"]),
        }
    if version >= 3:
        classes, params = data["classes"], data["codec_params"]
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise TypeError("classes must be null or a list of names")
        if not isinstance(params, dict):
            raise TypeError("codec_params must be an object")
        mode = data["image_mode"]
        extra |= {
            "codec": _str(data["codec"]),
            "codec_params": params,
            "image_mode": mode if mode is None else _str(mode),
            "varied": _bool(data["varied"]),
            "classes": tuple(classes) if classes is not None else None,
            "downscale": None if data.get("downscale") is None else _int(data["downscale"]),
        }
    return Manifest(
        backend=data["backend"],
        shape=tuple(_int(s) for s in shape) if shape is not None else None,
        count=_int(data["count"]),
        dtype=_str(data["dtype"]),
        options=options,
        format_version=version,
        **extra,
    )


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}"[:100])
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}"[:100])
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}"[:100])
    return value


def _check_values(path: Path, manifest: Manifest) -> None:
    shape = manifest.shape
    problems = []
    if not 0 <= manifest.count <= _MAX_COUNT:
        problems.append(f"count {manifest.count}")
    if manifest.dtype != "uint8":
        problems.append(f"dtype {manifest.dtype!r}")
    if shape is not None and (not 1 <= len(shape) <= MAX_DIMS or min(shape) < 1 or max(shape) > MAX_IMAGE_BYTES):
        problems.append(f"shape {shape}")
    elif shape is not None and manifest.image_nbytes > MAX_IMAGE_BYTES:
        problems.append(f"shape {shape} ({manifest.image_nbytes} bytes an image; at most {MAX_IMAGE_BYTES})")
    if manifest.count and shape is None and not manifest.varied:
        problems.append("records but no shape")
    if manifest.varied and shape is not None:
        problems.append("a shape in a store of varied shapes")
    if not re.fullmatch(r"[a-z0-9_]{1,32}", manifest.codec):
        problems.append(f"codec {manifest.codec!r}"[:100])
    if manifest.image_mode not in IMAGE_MODES:
        problems.append(f"image_mode {manifest.image_mode!r}"[:100])
    if manifest.classes is not None and (
        len(manifest.classes) > MAX_CLASSES or any(not 0 < len(c) <= 1000 for c in manifest.classes)
    ):
        problems.append("class names (at most 65 536, each 1 to 1 000 characters)")
    if manifest.downscale is not None and manifest.downscale < 1:
        problems.append(f"downscale {manifest.downscale}")
    if manifest.checksum not in ("crc32", "xxh3_64"):
        problems.append(f"checksum {manifest.checksum!r}")
    if not 0 <= manifest.group <= 1 << 20 or (shape is not None and manifest.group < 1):
        problems.append(f"group {manifest.group}")
    if manifest.format_version >= 2 and not re.fullmatch(r"[0-9a-f]{8,32}", manifest.generation):
        problems.append(f"generation {manifest.generation!r}"[:100])
    bad_files = [f for f in manifest.files if not _FILE_NAME.fullmatch(f) or f in (MANIFEST_NAME, WRITER_LOCK_NAME)]
    if bad_files:
        problems.append(f"file names {bad_files[:3]!r}"[:200])
    if problems:
        raise CorruptStoreError(f"{path} holds impossible values: {'; '.join(problems)}")


def write_manifest(store_path: Path, manifest: Manifest, *, sync: bool) -> None:
    """Replace the manifest atomically; with ``sync`` it is durable when this returns."""
    path = manifest_path(store_path)
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    try:
        # O_NOFOLLOW: a link planted under the temporary name must not make a commit write elsewhere.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
        fsync_dir(store_path)
