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

import numpy as np

from imgstore.errors import DatasetError, DatasetNotFoundError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_fashion_mnist(root: str | Path = DEBIAN_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``"train"`` (60 000) or ``"test"`` (10 000)."""
    if split not in _FILES:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    image_name, label_name = _FILES[split]
    images = read_idx(_find(Path(root), image_name), ndim=3)
    labels = read_idx(_find(Path(root), label_name), ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{root}: Fashion-MNIST images are 28x28, the file holds {images.shape[1:]}")
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


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 ndim, ndim big-endian uint32 sizes, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a truncated or damaged gzip stream
        raise DatasetError(f"{path} cannot be decompressed: {exc}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DatasetError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):  # Python ints: a forged header cannot overflow
        raise DatasetError(f"{path}: header says {shape} but the file holds {len(raw) - header} data bytes")
    # A copy: frombuffer over bytes would be read-only.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
