"""The zarr v3 files of a zarr store: array metadata, shard files and their index, and how they are written.

Every file here is plain zarr format 3, so ``zarr.open_group(path)`` reads the store with zarr-python
(``tests/test_interop_zarr.py``); imgstore writes and reads the bytes itself (see ``zarr.py`` for why).

- ``zarr.json``: the group; ``<array>/zarr.json``: an array's metadata, exactly as zarr-python
  3.1 writes it for the same ``create_array`` call, with the shape the records reach.
- A *sharded* array (``images``, ``blobs``): chunks of one record, ``shard`` records per file
  ``<array>/c/<k>/0/...`` (zarr's default chunk keys). A shard file is its index first
  (``index_location: start``: ``shard`` pairs of little-endian uint64 offset and length, 2**64 - 1
  for an absent chunk, then the CRC-32C of the pairs), then its chunks in record order. Putting
  the index first lets a write append chunks past the committed ones and then rewrite the index in
  place, leaving every committed byte as it was (an index at the end would be overwritten by the
  next chunk).
- ``labels``: int64, unsharded chunks of ``shard`` labels (``labels/c/<k>``, always the full chunk's
  bytes, zeros past the last label, as zarr stores an edge chunk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from imgstore.errors import CorruptStoreError

EMPTY = (1 << 64) - 1  # the index entry of an absent chunk
VLEN_HEADER = 8  # a vlen-bytes chunk of one record: uint32 count (1), uint32 length, then the bytes


def group_meta() -> dict[str, Any]:
    return {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def array_meta(
    shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], inner: tuple[int, ...] | None
) -> dict[str, Any]:
    """What zarr-python writes for ``create_array(shape, dtype, chunks=inner, shards=chunks, compressors=None)``.

    ``inner`` None: an unsharded array of ``chunks``. ``dtype`` ``"variable_length_bytes"``: records of bytes.
    """
    vlen = dtype == "variable_length_bytes"
    data_codec: dict[str, Any] = (
        {"name": "vlen-bytes", "configuration": {}}
        if vlen
        else {"name": "bytes"}
        if dtype == "uint8"
        else {"name": "bytes", "configuration": {"endian": "little"}}
    )
    codecs: list[dict[str, Any]] = [data_codec]
    if inner is not None:
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(inner),
                    "codecs": codecs,
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "start",
                },
            }
        ]
    return {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": "" if vlen else 0,
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader sees the old or the new file). Not fsynced: imgstore never
    reads its metadata (the manifest holds the layout); a writer rewrites it whenever it opens."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(value, indent=2).encode()
    tmp.unlink(missing_ok=True)  # a stale temporary, or a link planted there (unlink never follows one)
    # O_EXCL | O_NOFOLLOW: a file of its own, never written through a link to a file elsewhere.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def chunk_path(array: Path, shard: int, ndim: int) -> Path:
    """The file of chunk (shard) ``shard`` along the first axis of an ``ndim``-D array."""
    return array.joinpath("c", str(shard), *("0" * (ndim - 1)))


def index_nbytes(shard: int) -> int:
    return 16 * shard + 4


def encode_index(offsets: np.ndarray, lengths: np.ndarray, shard: int) -> bytes:
    """The index of a shard of ``shard`` chunks whose first ``len(offsets)`` are present."""
    pairs = np.full((shard, 2), EMPTY, dtype="<u8")
    pairs[: len(offsets), 0] = offsets
    pairs[: len(offsets), 1] = lengths
    body = pairs.tobytes()
    crc: int = google_crc32c.value(body)
    return body + crc.to_bytes(4, "little")


def read_index(fd: int, shard: int, count: int, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths (int64) of the first ``count`` chunks of an open shard file, checked.

    Checked to lie one after another from the end of the index (as imgstore writes them) and
    within the file, so a damaged index is an error here, never a read of the wrong bytes. Its
    CRC is not checked: a writer killed while rewriting the index in place may leave it stale
    while every pair of a committed chunk is intact (its bytes never change once written).
    """
    nbytes = index_nbytes(shard)
    data = os.pread(fd, 16 * count, 0)
    if len(data) != 16 * count:
        raise CorruptStoreError(f"{where}: the shard index is truncated")
    pairs = np.frombuffer(data, dtype="<u8").reshape(count, 2)
    if count and int(pairs.max()) >= 1 << 62:  # absent chunks (2**64 - 1) and absurd values
        raise CorruptStoreError(f"{where}: a committed chunk is missing from the shard index")
    offsets, lengths = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    expected = nbytes + np.concatenate(([0], np.cumsum(lengths)[:-1])) if count else offsets
    end = nbytes + int(lengths.sum())
    if not np.array_equal(offsets, expected) or end > os.fstat(fd).st_size:
        raise CorruptStoreError(f"{where}: the shard index does not match the chunks in the file")
    return offsets, lengths


def open_shard(path: Path, writable: bool, *, create: bool) -> tuple[int, list[Path]]:
    """An open descriptor of a shard or chunk file (read-write in a writer), and the folders made for it (to sync)."""
    made: list[Path] = []
    if create:
        missing = [parent for parent in path.parents if not parent.exists()]
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            made.append(folder)
    flags = (os.O_RDWR | (os.O_CREAT if create else 0)) if writable else os.O_RDONLY
    return os.open(path, flags | os.O_NOFOLLOW, 0o644), made


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def preadv_exact(fd: int, buffer: np.ndarray, offset: int, where: Path) -> None:
    """Fill ``buffer`` from ``offset`` of ``fd``; a short file is damage."""
    view = memoryview(buffer).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise CorruptStoreError(f"{where} is shorter than its records")
        view, offset = view[got:], offset + got
