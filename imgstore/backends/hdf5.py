"""HDF5 backend: an ``images`` dataset [N, *shape] and a ``labels`` dataset [N] in one file.

Both are chunked along N and resizable, so a store can be appended to. Chunks hold about
``chunk_bytes`` of images: big enough that a whole-array read is a few large copies, small enough
that reading one image touches little; gathers are sorted and served chunk by chunk.
"""

from __future__ import annotations

import h5py
import numpy as np

from imgstore.errors import CorruptStoreError
from imgstore.store import Store

_FILE = "images.h5"
_LABEL_CHUNK = 1 << 14


class Hdf5Store(Store):
    name = "hdf5"
    option_defaults = {"chunk_bytes": 1 << 18}

    def _open(self, create: bool) -> None:
        mode = "w" if create else ("a" if self.writable else "r")
        try:
            # A chunk cache of 64 MiB keeps the chunks a shuffled epoch revisits.
            self._file = h5py.File(self.path / _FILE, mode, libver="latest", rdcc_nbytes=1 << 26, rdcc_nslots=10007)
        except OSError as exc:
            if create:
                raise
            raise CorruptStoreError(f"{self.path / _FILE} cannot be opened as HDF5: {exc}") from exc
        self._images = self._file.get("images")
        self._labels = self._file.get("labels")
        if len(self) and (self._images is None or self._labels is None):
            raise CorruptStoreError(f"{self.path / _FILE} has no images/labels datasets")

    def _close(self) -> None:
        self._file.close()

    def _reopen_after_fork(self) -> None:
        # HDF5's library state is not fork-safe: leave the inherited file id alone, open anew.
        self._open(create=False)

    @property
    def chunk_images(self) -> int:
        return self._images.chunks[0] if self._images is not None else 0

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        if self._images is None:
            shape = images.shape[1:]
            per_chunk = max(1, self.options["chunk_bytes"] // images[0].nbytes)
            self._images = self._file.create_dataset(
                "images", shape=(0, *shape), maxshape=(None, *shape), chunks=(per_chunk, *shape), dtype=np.uint8
            )
            self._labels = self._file.create_dataset(
                "labels", shape=(0,), maxshape=(None,), chunks=(_LABEL_CHUNK,), dtype=np.int64
            )
        stop = start + len(images)
        # Anything past the committed count is a crashed write's leftover: resizing drops it.
        self._images.resize(stop, axis=0)
        self._labels.resize(stop, axis=0)
        self._images.write_direct(images, dest_sel=np.s_[start:stop])
        self._labels.write_direct(labels, dest_sel=np.s_[start:stop])
        self._file.flush()

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        self._check_extent(stop)
        self._images.read_direct(images, source_sel=np.s_[start:stop])
        self._labels.read_direct(labels, source_sel=np.s_[start:stop])

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        self._check_extent(index + 1)
        return self._images[index], int(self._labels[index])

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """Gather in file order, one chunk-aligned block at a time, then scatter to the caller's order."""
        self._check_extent(int(indices.max()) + 1)
        labels[:] = self._all_labels()[indices]
        order = np.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        per_chunk = self.chunk_images
        block = np.empty((per_chunk, *self.shape), dtype=np.uint8)
        chunk_ids = sorted_indices // per_chunk
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(sorted_indices)]):
            first = int(chunk_ids[lo]) * per_chunk
            last = min(first + per_chunk, len(self))
            if hi - lo == 1:  # a lone index: read just that image
                self._images.read_direct(images, source_sel=np.s_[sorted_indices[lo]], dest_sel=np.s_[order[lo]])
                continue
            self._images.read_direct(block, source_sel=np.s_[first:last], dest_sel=np.s_[: last - first])
            images[order[lo:hi]] = block[sorted_indices[lo:hi] - first]

    def _all_labels(self) -> np.ndarray:
        return self._labels[: len(self)]

    def _check_extent(self, stop: int) -> None:
        if self._images is None or self._images.shape[0] < stop or self._labels.shape[0] < stop:
            raise CorruptStoreError(f"{self.path / _FILE} holds fewer images than its manifest commits")
