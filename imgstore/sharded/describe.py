"""What ``imgstore info`` and ``imgstore verify`` say of a sharded dataset (a path or fsspec URL).

``info`` reads the manifest only: nothing is downloaded, so it is cheap on object storage.
``verify`` reads every shard (fetching remote ones into the cache) and checks every record.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from imgstore.errors import StoreNotFoundError
from imgstore.sharded.dataset import open_sharded
from imgstore.sharded.location import Location
from imgstore.sharded.manifest import common_classes
from imgstore.sharded.writing import read_committed

__all__ = ["format_sharded_info", "sharded_info", "verify_sharded"]


def sharded_info(url: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset's manifest summarised, as JSON-ready values."""
    location = Location(url)
    manifest = read_committed(location)
    if manifest.revision == 0:
        raise StoreNotFoundError(f"no sharded dataset at {location.url} (no manifest)")
    counts = np.array([s.count for s in manifest.shards], np.int64)
    stored = sum(s.bytes for s in manifest.shards)
    shapes = {s.shape for s in manifest.shards}
    return {
        "url": location.url,
        "revision": manifest.revision,
        "count": manifest.count,
        "shards": len(manifest.shards),
        "images_per_shard": (
            {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
            if len(counts)
            else None
        ),
        "backends": sorted({s.backend for s in manifest.shards}),
        "codecs": sorted({s.codec for s in manifest.shards}),
        "shape": list(next(iter(shapes))) if len(shapes) == 1 and None not in shapes else None,  # type: ignore[arg-type]
        "stored_bytes": stored,
        "bytes_per_image": stored / manifest.count if manifest.count else None,
        "classes": common_classes(manifest.shards),
    }


def format_sharded_info(info: dict[str, Any]) -> str:
    per = info["images_per_shard"] or {"min": 0, "median": 0, "max": 0}
    per_image = f" ({info['bytes_per_image'] / 1e3:.1f} kB per image)" if info["bytes_per_image"] else ""
    shape = "x".join(map(str, info["shape"])) if info["shape"] is not None else "varied"
    return "\n".join(
        [
            f"dataset     {info['url']} (sharded, revision {info['revision']})",
            f"images      {info['count']}",
            f"shards      {info['shards']}: {per['min']} / {per['median']:g} / {per['max']} images a shard "
            "(min / median / max)",
            f"backend     {', '.join(info['backends'])}",
            f"codec       {', '.join(info['codecs'])}",
            f"shape       {shape}",
            f"stored      {info['stored_bytes'] / 1e6:.1f} MB{per_image}",
            f"classes     {len(info['classes']) if info['classes'] is not None else 'unnamed, or unlike in shards'}",
            *(f"  {k:<4} {name}" for k, name in enumerate((info["classes"] or [])[:20])),
            *(["  ..."] if len(info["classes"] or []) > 20 else []),
            "(from the manifest alone: nothing downloaded; images per class need every label read)",
        ]
    )


def verify_sharded(url: str | os.PathLike[str], *, decode: bool = False, cache_dir: str | None = None) -> str:
    """Check every shard's files and records (``decode``: decode every image too); the line to print.
    A remote dataset's shards are fetched whole into ``cache_dir`` (default: :func:`open_sharded`'s)."""
    with open_sharded(url, cache_dir=cache_dir, remote_reads="whole") as data:
        data.verify()
        if decode:
            for k in range(len(data.shards)):
                store = data.shard(k)
                if store.varied or store.codec != "raw":
                    for start in range(0, len(store), 256):
                        store.get_many(range(start, min(start + 256, len(store))))
        shards, count = len(data.shards), len(data)
    return f"ok: {count} images in {shards} shards{' (checksums and decoding)' if decode else ''}"
