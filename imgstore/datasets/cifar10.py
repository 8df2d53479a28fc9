"""The real CIFAR-10 files, in both official versions, read without trusting pickle.

- "python version" (``cifar-10-batches-py``): dicts pickled by Python 2's cPickle (protocol 2).
  They are read with :class:`_CifarUnpickler`, which resolves only the few globals a pickled numpy
  array needs; anything else in the file (``os.system``, ``builtins.eval``, ...) raises
  :class:`DatasetError` before it can run.
- "binary version" (``cifar-10-batches-bin``): records of 1 label byte + 3 072 pixel bytes.

Both store each image as planar R, G, B planes of 32x32; we return HWC uint8 like every store.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.errors import DatasetError, DatasetNotFoundError

try:  # numpy >= 1.26 (and the name numpy 2 writes into pickles)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # older numpy
    from numpy.core.multiarray import _reconstruct

PY_DIR, BIN_DIR = "cifar-10-batches-py", "cifar-10-batches-bin"
SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_PIXELS = 3 * 32 * 32


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a dict holding a pickled numpy uint8 array needs; never a callable of the file's choosing."""

    # Resolved here rather than imported by name, so that old files naming numpy.core do not
    # trigger numpy 2's deprecation shim.
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 1.x (the real files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load {module}.{name} from a CIFAR-10 batch: not part of the format"
            ) from None


def load_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (HWC, RGB) and labels int64 [N] of ``"train"`` (50 000) or ``"test"`` (10 000).

    ``root`` is the folder holding ``cifar-10-batches-py`` or ``cifar-10-batches-bin``, or one of those.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    for folder, reader, suffix in ((PY_DIR, _read_python_batch, ""), (BIN_DIR, _read_binary_batch, ".bin")):
        directory = root if root.name == folder else root / folder
        if directory.is_dir():
            parts = [reader(_existing(directory / f"{name}{suffix}")) for name in SPLITS[split]]
            planar = np.concatenate([rows for rows, _ in parts])
            labels = np.concatenate([part_labels for _, part_labels in parts])
            images = np.ascontiguousarray(planar.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            return images, labels
    raise DatasetNotFoundError(
        f"no CIFAR-10 files under {root} (looked for {PY_DIR}/ and {BIN_DIR}/); "
        "imgstore.datasets.download_cifar10(dest) fetches them"
    )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(f"CIFAR-10 batch file {path} is missing")
    return path


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Planar rows uint8 [N, 3072] and labels int64 [N] of one pickled batch."""
    try:
        # encoding="bytes": the files are Python 2 pickles, whose str keys and data become bytes.
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as exc:  # a malformed pickle fails in many ways: truncated, bad opcodes, bad arguments
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DatasetError(f"{path}: b'data' must be a uint8 array [N, {_PIXELS}]")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise DatasetError(f"{path}: b'labels' must be a list of {len(data)} integers")
    return data, _checked_labels(np.asarray(labels), path)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Planar rows uint8 [N, 3072] and labels int64 [N] of one binary batch."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (_PIXELS + 1):
        raise DatasetError(f"{path} is {raw.size} bytes: not a whole number of CIFAR-10 records of 3 073 bytes")
    records = raw.reshape(-1, _PIXELS + 1)
    return records[:, 1:], _checked_labels(records[:, 0], path)


def _checked_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: labels must be integers 0-9")
    return labels.astype(np.int64)
