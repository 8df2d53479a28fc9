"""Fashion-MNIST from its IDX files, plain or gzipped.

Debian's package ``dataset-fashion-mnist`` installs the four gzipped files in
``/usr/share/datasets/fashion-mnist/`` (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``), the default ``root`` here.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from imgstore.errors import DatasetError, DatasetNotFoundError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MAX_ITEMS, _MAX_SIDE = 10**7, 10**4  # far above Fashion-MNIST's 70 000 images of 28x28
_MAX_DEFLATE_RATIO = 1032  # deflate's best: 258 bytes from a 2-bit code
_CHUNK = 1 << 20  # read(n) allocates n bytes before it reads: chunks keep that small


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def load_fashion_mnist(root: str | Path = DEBIAN_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``"train"`` (60 000) or ``"test"`` (10 000)."""
    if split not in _FILES:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = _FILES[split]
    images = read_idx(_find(Path(root), image_name), ndim=3, inner=(28, 28))
    labels = read_idx(_find(Path(root), label_name), ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{root}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{root}: labels must be 0-9, found {labels.max()}")
    return images, labels.astype(np.int64)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"no {name}[.gz] under {root} (on Debian: apt-get install dataset-fashion-mnist, files in {DEBIAN_ROOT})"
    )


def read_idx(path: Path, ndim: int, inner: tuple[int, ...] | None = None) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, ndim big-endian uint32 sizes, then the data.

    The header is read first and the data only as far as it announces (plus one byte, to detect
    trailing data), in chunks: memory follows the bytes really in the file, never what the header
    claims, and a gzip cannot inflate past the announced size. ``inner`` is the shape every item
    must have (the sizes after the first), checked before any data is read.
    """
    gzipped = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim or header[:4] != bytes([0, 0, 8, ndim]):
                raise DatasetError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic {header[:4].hex()})")
            shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            expected = _expected_size(path, shape, inner, gzipped)
            data = _read_at_most(f, expected + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a truncated or damaged gzip stream
        raise DatasetError(f"{path} cannot be decompressed: {exc}") from None
    if len(data) != expected:
        holds = f"more than {expected}" if len(data) > expected else str(len(data))
        raise DatasetError(f"{path}: header says {shape} but the file holds {holds} data bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)  # over a bytearray: writeable, no copy


def _expected_size(path: Path, shape: tuple[int, ...], inner: tuple[int, ...] | None, gzipped: bool) -> int:
    """The data size the header announces, once it is shown to be sane for what the file can hold."""
    if shape[0] > _MAX_ITEMS or any(size > _MAX_SIDE for size in shape[1:]):
        raise DatasetError(
            f"{path}: header says {shape}, absurd sizes (at most {_MAX_ITEMS} items of at most {_MAX_SIDE} a side)"
        )
    if inner is not None and shape[1:] != inner:
        raise DatasetError(f"{path}: Fashion-MNIST images are {'x'.join(map(str, inner))}, the file holds {shape[1:]}")
    expected = math.prod(shape)  # Python ints: a forged header cannot overflow
    stored = path.stat().st_size
    # Deflate cannot shrink data more than 1032:1, so a smaller gzip is a lie (or a bomb); a plain
    # file holds its data as is.
    most = stored * _MAX_DEFLATE_RATIO if gzipped else stored - 4 - 4 * len(shape)
    if expected > most:
        raise DatasetError(
            f"{path}: header says {shape} ({expected} bytes) but {stored} bytes"
            f"{' of gzip' if gzipped else ''} can hold at most {max(most, 0)}"
        )
    return expected


def _read_at_most(f: _Readable, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``f``, read in chunks, so memory grows only with what the file really holds."""
    data = bytearray()
    while len(data) < limit:
        chunk = f.read(min(_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data
