"""The manifest: a small JSON file in every store that says what the store is and how much of it is committed.

Writing the manifest is the commit point of every write: a backend first writes records at
indices ``count .. count + n - 1`` (invisible to readers, who never look past ``count``), then the
manifest is replaced atomically (write a temporary file, fsync, rename) with the new count. A crash
before the rename leaves the old state; after it, the new one. No backend needs its own commit record.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from imgstore.errors import CorruptStoreError, FormatVersionError, StoreNotFoundError
from imgstore.fileio import fsync_dir

MANIFEST_NAME = "imgstore.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    backend: str
    shape: tuple[int, ...] | None  # None until the first image fixes it
    count: int = 0
    dtype: str = "uint8"
    options: dict[str, Any] = field(default_factory=dict)  # creation options the backend keeps
    format_version: int = FORMAT_VERSION

    def with_count(self, count: int) -> Manifest:
        return replace(self, count=count)

    def to_json(self) -> str:
        data = asdict(self)
        data["shape"] = list(self.shape) if self.shape is not None else None
        data["crc32"] = _checksum(data)
        return json.dumps(data, indent=1, sort_keys=True)


def _checksum(data: dict[str, Any]) -> int:
    """CRC-32 of the manifest's fields: a damaged count or shape must not pass for a real one."""
    fields = {key: value for key, value in data.items() if key != "crc32"}
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode())


def manifest_path(store_path: Path) -> Path:
    return store_path / MANIFEST_NAME


def read_manifest(store_path: Path) -> Manifest:
    path = manifest_path(store_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreNotFoundError(f"no imgstore store at {store_path} (no {MANIFEST_NAME})") from None
    except NotADirectoryError:
        raise StoreNotFoundError(f"{store_path} is a file, not an imgstore store directory") from None
    except UnicodeDecodeError:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest (not UTF-8 text)") from None
    try:
        data = json.loads(text)
        version = data["format_version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest: {exc}") from None
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{store_path} has store format version {version!r}; this imgstore reads version {FORMAT_VERSION} only"
        )
    if data.get("crc32") != _checksum(data):
        raise CorruptStoreError(f"{path} is damaged: its checksum does not match its content")
    try:
        shape = data["shape"]
        manifest = Manifest(
            backend=str(data["backend"]),
            shape=tuple(int(s) for s in shape) if shape is not None else None,
            count=int(data["count"]),
            dtype=str(data["dtype"]),
            options=dict(data.get("options", {})),
            format_version=version,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"{path} is not a valid imgstore manifest: {exc!r}") from None
    if (
        manifest.count < 0
        or manifest.dtype != "uint8"
        or (manifest.shape is not None and (not manifest.shape or min(manifest.shape) < 1))
    ):
        raise CorruptStoreError(f"{path} holds impossible values: {data}")
    return manifest


def write_manifest(store_path: Path, manifest: Manifest, *, sync: bool) -> None:
    """Replace the manifest atomically; with ``sync`` it is durable when this returns."""
    path = manifest_path(store_path)
    tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync_dir(store_path)
