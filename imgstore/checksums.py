"""Record checksums, kept for every backend in files beside the backend's own, and checked on every read.

LMDB and HDF5 keep no checksum of their values, and a PNG's CRCs do not cover its label, so the
store keeps its own. Version 2 stores use XXH3-64 (the ``xxhash`` package), at two levels:

- per record: ``xxh3_64(pixels, seed=label ^ S)``, uint64 little-endian in ``checksums-<gen>.xxh3``;
  a ``get`` or a shuffled ``get_many`` checks each record it returns against it;
- per group of ``group`` consecutive records (about 256 KiB of pixels):
  ``xxh3_64(pixels, seed=xxh3_64(labels as int64 LE) ^ S)`` in ``groups-<gen>.xxh3``; a scan checks one
  hash per group of the batch it just copied (still in the CPU cache) instead of one call per
  record, which is what keeps a verified ``read_many`` close to an unverified one.

Encoded records (variable-length bytes) have per-record checksums only:
``xxh3_64(bytes, seed=label ^ B)``, ``B`` = ``xxh3_64(b"imgstore blob") ^ xxh3_64(D)``, where ``D`` says
how the store decodes its records (codec and its parameters, image mode, shape): a manifest forged
to decode the same bytes otherwise does not pass for good records.

``S`` is ``xxh3_64`` of the image shape (int64 LE): the same bytes read with another shape (a
manifest forged with a recomputed CRC) do not pass for good records.

Version 1 stores keep ``crc32(pixels, then the label as 8 LE bytes)`` per record in
``checksums.crc32`` (uint32 LE) and no groups; they are still read, verified and appended to.
Like the backends' files these are written before the manifest commits; entries past the
committed count are ignored and overwritten.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xxhash

from imgstore.columns import read_column, write_at
from imgstore.errors import CorruptStoreError

GROUP_BYTES = 1 << 18
_xxh3 = xxhash.xxh3_64_intdigest
_BLOB_SEED = _xxh3(b"imgstore blob")


def group_size(image_nbytes: int) -> int:
    """Records per group checksum for images of this size (1: groups would add nothing)."""
    return max(1, GROUP_BYTES // max(1, image_nbytes))


class Checksums:
    """The per-record (and per-group) checksums of one store generation: compute, write, load, check."""

    def __init__(
        self,
        record_file: Path,
        group_file: Path | None,
        algorithm: str,
        group: int,
        shape: tuple[int, ...] | None = None,
        decoding: str = "",
    ) -> None:
        self.record_file, self.group_file = record_file, group_file
        self.seed = _xxh3(np.array(shape or (), dtype="<i8").tobytes())  # XXH3 only: S above
        self.blob_seed = _BLOB_SEED ^ _xxh3(decoding.encode())  # B above
        self.group = max(group, 1)
        self.width = 8 if algorithm == "xxh3_64" else 4
        self.dtype = np.dtype("<u8" if self.width == 8 else "<u4")
        self.records = np.empty(0, self.dtype)
        self.groups = np.empty(0, "<u8")

    @property
    def has_groups(self) -> bool:
        return self.group > 1 and self.group_file is not None

    # ------------------------------------------------------------------ computing

    def of_records(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """One checksum per record of the batch."""
        n = len(images)
        images = np.ascontiguousarray(images)
        if self.width == 8:
            # The loop of every verified shuffled read: each record's row is its own buffer, and
            # map() calls xxhash with no Python frame per record (half the cost of a comprehension).
            seeds = (np.asarray(labels, dtype=np.int64).view(np.uint64) ^ np.uint64(self.seed)).tolist()
            return np.fromiter(map(_xxh3, images.reshape(n, -1), seeds), self.dtype, n)  # type: ignore[arg-type]
        size = images[0].nbytes if n else 0
        pixels = images.data.cast("B")
        label_bytes = np.ascontiguousarray(labels, dtype="<i8").data.cast("B")
        crcs = (
            zlib.crc32(label_bytes[8 * k : 8 * k + 8], zlib.crc32(pixels[k * size : (k + 1) * size])) for k in range(n)
        )
        return np.fromiter(crcs, self.dtype, n)

    def of_blobs(self, blobs: Sequence[bytes | memoryview], labels: np.ndarray) -> np.ndarray:
        """One checksum per encoded record (its bytes, seeded with its label)."""
        return np.array(
            [_xxh3(blob, label ^ self.blob_seed) for blob, label in zip(blobs, labels.tolist(), strict=True)],
            dtype="<u8",
        )

    def check_blobs(
        self, indices: np.ndarray, blobs: Sequence[bytes | memoryview], labels: np.ndarray, where: object
    ) -> None:
        """Raise :class:`CorruptStoreError` unless every ``blobs[k], labels[k]`` is what record ``indices[k]`` was."""
        if len(blobs) == 0:
            return
        bad = np.flatnonzero(self.of_blobs(blobs, labels) != self.records[indices])
        if len(bad):
            raise CorruptStoreError(
                f"{where}: the image at index {int(indices[bad[0]])} is damaged (its bytes or label differ from "
                "what was written)"
            )

    def of_group(self, images: np.ndarray, labels: np.ndarray) -> int:
        labels = np.ascontiguousarray(labels, dtype="<i8")
        return _xxh3(np.ascontiguousarray(images).data.cast("B"), _xxh3(labels.data.cast("B")) ^ self.seed)

    def full_groups(
        self,
        start: int,
        images: np.ndarray,
        labels: np.ndarray,
        read_back: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    ) -> dict[int, int]:
        """``{group: checksum}`` of the groups a write of ``images`` at ``start`` fills.

        The committed records of the first group come from ``read_back(lo, hi)`` (checked reads).
        """
        if not self.has_groups:
            return {}
        g, stop = self.group, start + len(images)
        first = start // g
        if stop // g == first:
            return {}
        if start > first * g:
            old_images, old_labels = read_back(first * g, start)
            images, labels = np.concatenate([old_images, images]), np.concatenate([old_labels, labels])
        return {
            first + k: self.of_group(images[k * g : (k + 1) * g], labels[k * g : (k + 1) * g])
            for k in range(stop // g - first)
        }

    # ------------------------------------------------------------------ files

    def write(self, start: int, records: np.ndarray, groups: dict[int, int], *, sync: bool) -> None:
        """Write checksums of records ``start ..`` and of the groups that became full (``{group: checksum}``)."""
        write_at(self.record_file, start, self.width, records.astype(self.dtype).tobytes(), sync=sync)
        if self.has_groups and self.group_file is not None:
            first = start // self.group
            values = np.array([groups[g] for g in sorted(groups)], dtype="<u8")
            assert not groups or sorted(groups) == list(range(first, first + len(groups)))
            write_at(self.group_file, first, 8, values.tobytes(), sync=sync)

    def load(self, count: int) -> None:
        """Read the checksums of the first ``count`` records; a short file is damage."""
        self.records = read_column(self.record_file, self.dtype, count)
        if self.has_groups and self.group_file is not None:
            self.groups = read_column(self.group_file, np.dtype("<u8"), count // self.group)

    def extend(self, start: int, records: np.ndarray, groups: dict[int, int]) -> None:
        """What a writer just committed, without reading the files back."""
        self.records = np.concatenate([self.records[:start], records.astype(self.dtype)])
        if groups:
            first = start // self.group
            self.groups = np.concatenate([self.groups[:first], np.array([groups[g] for g in sorted(groups)], "<u8")])

    # ------------------------------------------------------------------ checking

    def check_records(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray, where: object) -> None:
        """Raise :class:`CorruptStoreError` unless every ``images[k], labels[k]`` matches record ``indices[k]``."""
        differ = self.of_records(images, labels) != self.records[indices]
        if differ.any():
            bad = np.flatnonzero(differ)
            raise CorruptStoreError(
                f"{where}: the image at index {int(indices[bad[0]])} is damaged (its pixels or label differ from "
                "what was written)"
            )

    def check_one(self, index: int, image: np.ndarray, label: int, where: object) -> None:
        """:meth:`check_records` for one record, at a fraction of its cost (the path of every ``get``)."""
        # The array itself is the buffer (its .data would make a memoryview each time), and .item()
        # compares as a Python int: each saves ~0.1 µs of a ~3 µs get.
        if self.width == 8:
            ok = _xxh3(image, label ^ self.seed) == self.records.item(index)  # type: ignore[arg-type]
        else:
            ok = zlib.crc32(label.to_bytes(8, "little", signed=True), zlib.crc32(image)) == self.records.item(index)  # type: ignore[arg-type]
        if not ok:
            self.check_records(np.array([index]), image[np.newaxis], np.array([label], dtype=np.int64), where)

    def check_range(self, start: int, images: np.ndarray, labels: np.ndarray, where: object) -> None:
        """Check records ``start .. start + len(images) - 1``: whole groups by one hash each, the rest per record."""
        stop = start + len(images)
        if not self.has_groups:
            self.check_records(np.arange(start, stop), images, labels, where)
            return
        g = self.group
        first, last = -(-start // g), stop // g  # the groups wholly inside the range
        if first >= last:
            self.check_records(np.arange(start, stop), images, labels, where)
            return
        lo, hi = first * g - start, last * g - start
        if lo:
            self.check_records(np.arange(start, start + lo), images[:lo], labels[:lo], where)
        if hi < len(images):
            self.check_records(np.arange(start + hi, stop), images[hi:], labels[hi:], where)
        if labels.dtype != np.dtype("<i8"):
            labels = labels.astype("<i8")
        # The loop of every verified scan: one hash of each group's pixels, seeded with the hash of
        # its labels, on the slices just copied (xxhash takes a contiguous array as it is).
        seed = self.seed
        for k, expected in enumerate(self.groups[first:last].tolist()):
            at = lo + k * g
            pixels, group_labels = images[at : at + g], labels[at : at + g]
            if _xxh3(pixels.data, _xxh3(group_labels.data) ^ seed) != expected:
                low = (first + k) * g
                self.check_records(np.arange(low, low + g), pixels, group_labels, where)  # which one?
                raise CorruptStoreError(f"{where}: the checksum of images {low} .. {low + g - 1} is damaged")
