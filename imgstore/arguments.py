"""Checks of what callers hand a store (images, labels, indices), and imgstore's error for an OS error."""

from __future__ import annotations

import errno
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgstore.errors import (
    InvalidImageError,
    InvalidLabelError,
    InvalidOptionError,
    ReadOnlyError,
    StoreFullError,
    StoreIndexError,
    StoreIOError,
)

IndexLike = int | Sequence[int] | np.ndarray | range | slice

_INT64_MAX = np.iinfo(np.int64).max
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def io_error(exc: OSError, doing: str) -> StoreIOError | ReadOnlyError:
    """imgstore's error for an OS error met while ``doing`` something to a store."""
    if exc.errno in _DISK_FULL_ERRNOS:
        return StoreFullError(f"{doing}: no space left (or a file size limit): {exc}")
    if exc.errno in _READ_ONLY_ERRNOS:
        return ReadOnlyError(f"{doing}: {exc}; open the store with mode='r' to read it")
    return StoreIOError(f"{doing} failed: {exc}")


def as_image_array(images: Any) -> np.ndarray:
    try:
        return np.asarray(images)
    except (ValueError, TypeError):  # e.g. a ragged list of images
        raise InvalidImageError(
            "images must form one array [N, H, W(, C)] of one shape in a store of raw pixels of one shape; images "
            "of varied shapes go in a store made with a codec (e.g. codec='png') or with shape=None"
        ) from None


def as_label(label: Any) -> int:
    if isinstance(label, (bool, np.bool_)):
        raise InvalidLabelError("a label must be an integer, not a bool")
    try:
        return operator.index(label)
    except TypeError:
        raise InvalidLabelError(f"a label must be an integer, got {type(label).__name__} {label!r}") from None


def checked_labels(labels: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    if not isinstance(labels, np.ndarray):
        try:
            labels = list(labels)
        except TypeError:
            raise InvalidLabelError(f"labels must be a 1-D sequence of integers, got {type(labels).__name__}") from None
        if any(isinstance(x, (bool, np.bool_)) for x in labels):  # numpy would take True for 1
            raise InvalidLabelError("labels must be integers, not bools")
    try:
        array = np.asarray(labels)
    except (ValueError, OverflowError, TypeError) as exc:
        raise InvalidLabelError(f"labels must be a 1-D sequence of integers: {exc}") from None
    if array.dtype == object:  # e.g. Python ints beyond int64 or mixed types
        array = np.asarray([as_label(x) for x in array.ravel()], dtype=object)
        if any(not 0 <= x <= _INT64_MAX for x in array):
            raise InvalidLabelError("labels must be integers in 0 .. 2**63 - 1")
        array = array.astype(np.int64)
    if array.ndim != 1:
        raise InvalidLabelError(f"labels must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise InvalidLabelError(f"labels must be integers, got dtype {array.dtype}")
    if len(array) != count:
        raise InvalidLabelError(f"got {count} images but {len(array)} labels")
    if array.size and (array.min() < 0 or (array.dtype == np.uint64 and array.max() > _INT64_MAX)):
        raise InvalidLabelError("labels must be integers in 0 .. 2**63 - 1 (negative labels are not stored)")
    return np.ascontiguousarray(array, dtype=np.int64)


def as_contiguous_range(indices: IndexLike, count: int) -> tuple[int, int] | None:
    """``(start, stop)`` when ``indices`` is a step-1 range or slice (the cheap path for scans)."""
    if isinstance(indices, slice):
        indices = _slice_range(indices, count)
    if not isinstance(indices, range) or (indices.step != 1 and len(indices) > 1):
        return None
    if len(indices) == 0:
        return (0, 0)
    start, stop = indices[0], indices[-1] + 1
    if start < 0 or stop > count:
        raise StoreIndexError(f"indices {indices} are out of range for a store of {count} images")
    return start, stop


def checked_indices(indices: IndexLike, count: int) -> np.ndarray:
    if (  # the path of every shuffled batch (a training loader's): int64 indices, all in range
        type(indices) is np.ndarray
        and indices.dtype == np.int64
        and indices.ndim == 1
        and indices.size
        and 0 <= indices.min()
        and indices.max() < count
    ):
        return indices
    if isinstance(indices, slice):
        indices = _slice_range(indices, count)
    if isinstance(indices, (bool, np.bool_)):
        raise InvalidOptionError("indices must be integers, not a bool")
    try:
        array = np.asarray(indices)
    except (ValueError, OverflowError) as exc:
        raise InvalidOptionError(f"indices must be a 1-D sequence of integers: {exc}") from None
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype == object and array.ndim == 1:  # e.g. Python ints beyond 64 bits
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in array):
            raise InvalidOptionError("indices must be integers")
        bad = [i for i in array if not -count <= i < count]
        if bad:
            raise StoreIndexError(f"index {bad[0]} is out of range for a store of {count} images")
        array = array.astype(np.int64)
    elif isinstance(indices, (list, tuple)) and any(isinstance(i, (bool, np.bool_)) for i in indices):
        raise InvalidOptionError("indices must be integers, not bools")
    if array.dtype.kind not in "iu":
        raise InvalidOptionError(f"indices must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InvalidOptionError(f"indices must be 1-D, got shape {array.shape}")
    # Compare before converting: uint64 indices at or above 2**63 would wrap to negative in int64.
    too_big = array >= count
    too_small = array < -count if array.dtype.kind == "i" else np.zeros(array.shape, bool)
    if too_big.any() or too_small.any():
        bad = array[too_big | too_small][0]
        raise StoreIndexError(f"index {bad} is out of range for a store of {count} images")
    array = array.astype(np.int64)
    return np.where(array < 0, array + count, array)


def _slice_range(indices: slice, count: int) -> range:
    try:
        return range(*indices.indices(count))
    except (ValueError, TypeError) as exc:  # a step of 0, non-integer bounds
        raise InvalidOptionError(f"bad slice {indices}: {exc}") from None


def checked_batch_size(value: Any) -> int:
    if not isinstance(value, bool):
        try:
            size = operator.index(value)
        except TypeError:
            pass
        else:
            if size >= 1:
                return size
    raise InvalidOptionError(f"batch_size must be an integer >= 1, got {value!r}")


def batch_arrays(shape: tuple[int, ...], out: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """New ``(images, labels)`` arrays for a batch of ``shape``, or the caller's ``out`` after checking it fits."""
    n = shape[0]
    if out is None:
        return np.empty(shape, dtype=np.uint8), np.empty(n, dtype=np.int64)
    if not isinstance(out, tuple) or len(out) != 2:
        raise InvalidOptionError("out must be a pair (images, labels) of arrays")
    images, labels = out
    if isinstance(images, np.ndarray) and isinstance(labels, np.ndarray) and np.may_share_memory(images, labels):
        raise InvalidOptionError("out's images and labels arrays overlap in memory")
    for array, want, dtype in ((images, shape, np.uint8), (labels, (n,), np.int64)):
        if (
            not isinstance(array, np.ndarray)
            or array.shape != want
            or array.dtype != dtype
            or not array.flags.c_contiguous
            or not array.flags.writeable
        ):
            raise InvalidOptionError(
                f"out must be writable C-contiguous arrays of shapes {shape} uint8 and ({n},) int64"
            )
    return images, labels


def checked_index(index: Any, count: int) -> int:
    """One index (negative counts from the end) of a store of ``count`` records."""
    if isinstance(index, (bool, np.bool_)):
        raise InvalidOptionError("an index must be an integer, not a bool")
    try:
        i = operator.index(index)
    except TypeError:
        raise InvalidOptionError(f"an index must be an integer, got {type(index).__name__}") from None
    if i < 0:
        i += count
    if not 0 <= i < count:
        raise StoreIndexError(f"index {index} is out of range for a store of {count} images")
    return i


def checked_size(size: Any) -> tuple[int, int] | None:
    """``size=(height, width)`` of an encoded read, or None."""
    if size is None:
        return None
    try:
        height, width = (operator.index(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"size must be (height, width) integers, got {size!r}") from None
    if not (1 <= height <= 1 << 16 and 1 <= width <= 1 << 16) or any(isinstance(v, bool) for v in size):
        raise InvalidOptionError(f"size must be (height, width) with each 1 .. 65536, got {size!r}")
    return height, width
