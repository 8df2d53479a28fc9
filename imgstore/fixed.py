"""Raw stores of one image shape: records of fixed size, read straight into the caller's arrays.

The fast path of the library (CIFAR-10 and the like). The backend writes and reads pixels with
``Store._write`` / ``_read_into`` / ``_read_range_into`` / ``_read_one``; the functions here (each
given the store handle) check what goes in, fix the shape on the first write, keep the record and
group checksums (:mod:`imgstore.checksums`) and check every read against them. Encoded stores are
:mod:`imgstore.encoded`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from imgstore.arguments import as_image_array, io_error
from imgstore.checksums import group_size
from imgstore.errors import CorruptStoreError, ImgStoreError, InvalidImageError
from imgstore.manifest import MAX_DIMS, MAX_IMAGE_BYTES, write_manifest

if TYPE_CHECKING:
    from imgstore.store import Store


# ------------------------------------------------------------------ writing


def put(store: Store, images: np.ndarray | Sequence[np.ndarray], labels: np.ndarray) -> range:
    start = len(store)
    if len(images) == 0:
        return range(start, start)
    assert isinstance(images, np.ndarray)  # checked_images made it one
    old = manifest = store._manifest
    if old.shape is None:  # the first images fix the shape, and with it the checksum groups
        group = group_size(images[0].nbytes) if old.checksum == "xxh3_64" else 1
        manifest = store._manifest = replace(old, shape=images.shape[1:], group=group)
        store._checksums = store._make_checksums(manifest)
    try:
        records = store._checksums.of_records(images, labels)
        groups = _full_groups(store, start, images, labels)
        store._write(start, images, labels)
        store._checksums.write(start, records, groups, sync=store.sync)
        manifest = manifest.with_count(start + len(images))
        write_manifest(store.path, manifest, sync=store.sync)
    except BaseException as exc:
        if old.shape is None:  # nothing was committed: the store is still without a shape
            store._manifest, store._checksums = old, store._make_checksums(old)
        if isinstance(exc, ImgStoreError) or not isinstance(exc, OSError):
            raise
        raise io_error(exc, f"writing {len(images)} images to {store.path}") from exc
    store._manifest = manifest
    store._checksums.extend(start, records, groups)
    return range(start, start + len(images))


def checked_images(store: Store, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    array = as_image_array(images)
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"images must be uint8 arrays, got dtype {array.dtype}; convert explicitly "
            "(e.g. (x * 255).round().astype(np.uint8)) so no value is silently wrapped or clipped"
        )
    shape = store.shape
    if shape is None:
        if array.ndim < 3:
            raise InvalidImageError(
                f"put_many takes a batch [N, H, W] or [N, H, W, C]; got an array of shape {array.shape}"
            )
        if (
            array.ndim - 1 > MAX_DIMS
            or min(array.shape[1:]) < 1
            or int(np.prod(array.shape[1:], dtype=np.int64)) > MAX_IMAGE_BYTES
        ):
            raise InvalidImageError(f"images must have positive dimensions and at most 2 GiB; got {array.shape}")
        store.check_shape(tuple(array.shape[1:]))
    elif array.shape[1:] != shape or array.ndim != len(shape) + 1:
        raise InvalidImageError(
            f"this store holds images of shape {shape}; got a batch of shape {array.shape} "
            f"(expected [N, {', '.join(map(str, shape))}])"
        )
    # Fortran-ordered or strided input is fine; backends get one C-contiguous block.
    return np.ascontiguousarray(array)


def _full_groups(store: Store, start: int, images: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Checksums of the groups this write fills (the committed part of the first one is read back)."""

    def read_back(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        old = store._batch(hi - lo, None)
        read_range(store, lo, hi, *old, verify=True)
        return old

    return store._checksums.full_groups(start, images, labels, read_back)


# ------------------------------------------------------------------ reading


def get(store: Store, index: int) -> tuple[np.ndarray, int]:
    try:
        image, label = store._read_one(index)
    except store.damage_errors as exc:
        raise store._damaged(exc) from exc
    if store.verify_reads:
        store._checksums.check_one(index, image, label, store.path)
    return image, label


def get_many(
    store: Store, where: np.ndarray | tuple[int, int], out: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Records ``where`` (indices, or a ``(start, stop)`` range) into new arrays or ``out``."""
    if isinstance(where, tuple):
        start, stop = where
        images, labels = store._batch(stop - start, out)
        read_range(store, start, stop, images, labels)
        return images, labels
    idx = where
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        images, labels = store._batch(len(idx), out)
        read_range(store, int(idx[0]), int(idx[-1]) + 1, images, labels)
        return images, labels
    fresh = out is None and len(idx) > 0  # the backend may gather into arrays of its own making
    if not fresh:
        images, labels = store._batch(len(idx), out)
    try:
        if fresh:
            images, labels = store._read_new(idx)
        elif len(idx):
            store._read_into(idx, images, labels)
    except store.damage_errors as exc:
        raise store._damaged(exc) from exc
    if store.verify_reads and len(idx):
        store._checksums.check_records(idx, images, labels, store.path)
    return images, labels


def read_range(
    store: Store, start: int, stop: int, images: np.ndarray, labels: np.ndarray, *, verify: bool | None = None
) -> None:
    """Records ``start .. stop - 1``; verified in pieces that are checked while still in the CPU cache."""
    if stop <= start:
        return
    verify = store.verify_reads if verify is None else verify
    step = stop - start
    if verify and store.scan_piece_bytes is not None:
        group = store._checksums.group
        step = max(group, store.scan_piece_bytes // max(1, images[0].nbytes) // group * group)
    try:
        lo = start
        while lo < stop:  # pieces aligned to whole groups
            hi = min(stop, (lo // step + 1) * step)
            piece = images[lo - start : hi - start], labels[lo - start : hi - start]
            store._read_range_into(lo, hi, *piece)
            if verify:
                store._checksums.check_range(lo, *piece, store.path)
            lo = hi
    except store.damage_errors as exc:
        raise store._damaged(exc) from exc


def verify(store: Store, batch_size: int) -> None:
    count = len(store)
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        images, labels = store._batch(stop - start, None)
        try:
            read_range(store, start, stop, images, labels, verify=False)  # every record is checked below
        except CorruptStoreError:
            for index in range(start, stop):  # find which one, for the message
                try:
                    store.get(index)
                except CorruptStoreError as exc:
                    raise CorruptStoreError(f"{store.path}: damaged image at index {index}: {exc}") from exc
            raise
        store._checksums.check_records(np.arange(start, stop), images, labels, store.path)
        store._checksums.check_range(start, images, labels, store.path)


def iter_batches(store: Store, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    count = len(store)  # a snapshot: appends during iteration are not read
    # Read whole spans of batches when the backend is faster per image on bigger reads (PNG
    # decodes big reads on every core); each batch is then a copy, so it stays the caller's own.
    span = batch_size * -(-max(store._read_ahead(), batch_size) // batch_size)
    for low in range(0, count, span):
        images, labels = store.get_many(range(low, min(low + span, count)))
        if span == batch_size:
            yield images, labels
            continue
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size].copy(), labels[start : start + batch_size].copy()
