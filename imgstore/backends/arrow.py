"""Arrow backend: Arrow IPC files (Feather v2), append-only fragments committed by the manifest.

Layout (``<gen>`` is the store's generation)::

    arrow-<gen>/part-<start:012d>.arrow   records start .. start + rows - 1; columns image, label (int64)

``image`` is, in a raw store of one shape, the pixels as nested fixed-size lists of uint8
(``[32][32][3]``: numpy and Hugging Face ``datasets`` see [N, 32, 32, 3]); in an encoded store
(any codec, or raw of varied shapes) the record's bytes (``large_binary``), e.g. the JPEG file
as it was put. Each file holds record batches of about ``batch_bytes`` of images.

An IPC file ends in a footer, so a committed file is never appended to: each write adds one file,
and a write whose records would follow small fragments merges them into its file (a binary
counter on the records' bytes: the last fragments are absorbed while each is in the write's
power-of-two size class or below, and all fit in ``merge_bytes``), so a store written one image
at a time holds about log2(N) files, and each record is rewritten about log2(N) / 2 times.
The manifest is the commit: see :mod:`imgstore.backends.arrow_files` for what a killed write
leaves and why readers never see it.

Reads memory-map every file once per handle (``pa.memory_map``; pages shared with every other
reader) and copy records straight out of the batches' buffers: a scan is a ``memcpy`` per batch,
a shuffled ``get_many`` a numpy gather per batch, a ``get`` one row copy.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from imgstore.backends.arrow_files import (
    Fragment,
    batch_rows,
    committed,
    open_fragment,
    schema,
    strays,
    write_fragment,
)
from imgstore.errors import CorruptStoreError
from imgstore.fileio import fsync_dir
from imgstore.options import Option
from imgstore.store import Store

_DIR = "arrow"


@dataclass
class _Index:
    """Where each committed record is: the batches' global starts, and views of their buffers."""

    starts: list[int]  # global index of each batch's first record
    starts_np: np.ndarray
    views: list[np.ndarray]  # raw: [rows, image bytes] uint8; encoded: each batch's data buffer (uint8)
    labels: np.ndarray  # every committed label (a copy)
    begins: np.ndarray  # encoded: where record i's bytes begin and end in its batch's data buffer
    ends: np.ndarray


class ArrowStore(Store):
    name = "arrow"
    damage_errors = (pa.ArrowException, OSError)  # how pyarrow reports a damaged file
    files = (_DIR,)
    readers = ("pyarrow (feather, ipc, dataset)", 'Hugging Face datasets: load_dataset("arrow", data_files=...)')
    caveats = ("pyarrow and datasets see a killed write's file until a writer opens the store",)
    option_specs = {
        # Images per record batch, in bytes (at least one image). Applies to new writes; files say theirs.
        # A shuffled get_many gathers once per batch it touches: fewer, bigger batches are faster
        # (README: measured); scans and writes do not notice. 64 MiB keeps a batch a modest slice.
        "batch_bytes": Option(1 << 26, 1 << 10, 1 << 30),
        # Fragments smaller than this are merged into a later write (bounds the number of files).
        "merge_bytes": Option(1 << 26, 0, 1 << 40),
    }

    def _open(self, create: bool) -> None:
        self._dir = str(self.file(_DIR))
        self._index: _Index | None = None
        self._fragments: list[Fragment] | None = None  # None: walk the directory when next needed
        self._swept = False  # True: the folder holds no leftover of a killed or failed write (see _append)
        if create:
            os.makedirs(self._dir, exist_ok=True)
        self._fragments = self._walk(len(self))
        if self.writable:
            self._tidy()

    def _tidy(self) -> None:
        """Remove what a killed write left, so that other tools reading the folder see the committed records only.

        (imgstore's readers never look past the count, with or without this.)
        """
        fragments = self._fragments or []
        try:
            if fragments and fragments[-1].end > len(self):  # a killed merge's file: rewrite it to the count
                self._append(len(self), schema(self._file_shape()).empty_table())
            else:
                for path in strays(self._dir, fragments):
                    os.unlink(path)
                self._swept = True
        except OSError:
            pass  # e.g. a full disk: the next write tries again (it must)

    def _walk(self, count: int) -> list[Fragment]:
        if count == 0:
            return []
        return committed(self._dir, count, self._file_shape())

    def _file_shape(self) -> tuple[int, ...] | None:
        """The image shape the files' ``image`` column has (None: bytes of any length)."""
        return None if self._manifest.encoded else self.shape

    def _close(self) -> None:
        self._fragments, self._index = None, None

    def _refresh(self, old_count: int) -> None:
        self._fragments, self._index, self._swept = self._walk(len(self)), None, False

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        values: pa.Array = pa.array(images.reshape(-1))  # zero-copy: the batch is C-contiguous uint8
        for size in reversed(images.shape[1:]):
            values = pa.FixedSizeListArray.from_arrays(values, size)
        self._append(start, pa.table([values, pa.array(labels, pa.int64())], schema=schema(self.shape)))

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        blob_array = pa.array(blobs, pa.large_binary())
        self._append(start, pa.table([blob_array, pa.array(labels, pa.int64())], schema=schema(None)))

    def _append(self, start: int, table: pa.Table) -> None:
        """Write records ``start ..`` as one new fragment, merged with the small fragments before it.

        A binary counter on the records' bytes in memory (``Table.nbytes``, the same for a mapped
        fragment and for the table given): the write absorbs the last fragment while that fragment's
        size class (power of two) is at most the write's so far, and the two stay within ``merge_bytes``.
        So the fragments' size classes strictly decrease from the first to the last (past those that
        ``merge_bytes`` stopped), and a store written an image at a time holds about log2(N) files.
        Classes rather than sizes: encoded records vary, and a slightly smaller write must still merge.
        """
        try:
            fragments = self._fragments if self._fragments is not None else self._walk(start)
            keep = [fragment for fragment in fragments if fragment.start < start]
            if not self._swept:  # a killed or failed write's leftovers: free their space first
                for path in strays(self._dir, keep):
                    os.unlink(path)
                self._swept = True
            absorbed: list[Fragment] = []
            if keep and keep[-1].end > start:  # a killed merge's file runs past the count: rewrite it
                absorbed.append(keep.pop())
            parts = [_table(absorbed[0]).slice(0, start - absorbed[0].start)] if absorbed else []
            size = table.nbytes + sum(part.nbytes for part in parts)
            limit = self.options["merge_bytes"]
            while keep and _absorbs(size, keep[-1].data_bytes, limit):
                absorbed.insert(0, keep.pop())
                parts.insert(0, _table(absorbed[0]))
                size += absorbed[0].data_bytes
            first = absorbed[0].start if absorbed else start
            merged = pa.concat_tables([*parts, table]).combine_chunks() if parts else table
            path = write_fragment(
                self._dir, first, merged, batch_rows(merged, self.options["batch_bytes"]), sync=self.sync
            )
            for fragment in absorbed:
                if fragment.path != path:
                    os.unlink(fragment.path)  # superseded by the merged file (readers skip it until then)
            if self.sync:
                fsync_dir(self.file(_DIR))
            self._fragments = [*keep, open_fragment(path, first, self._file_shape())]
        except BaseException:
            self._fragments, self._swept = None, False  # the files may have changed under the list: walk them again
            raise
        finally:
            self._index = None

    # -------------------------------------------------------------- reading

    def _read_index(self) -> _Index:
        index = self._index
        if index is None:
            refreshes = self._refreshes.count
            fragments = self._fragments if self._fragments is not None else self._walk(len(self))
            index = _build_index(fragments, len(self), self._manifest.encoded)
            if self._refreshes.unchanged_since(refreshes):  # else it serves this read only
                self._fragments, self._index = fragments, index
        return index

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        index = self._read_index()
        labels[:] = index.labels[indices]
        flat = images.reshape(len(indices), -1)
        if len(index.views) == 1:
            np.take(index.views[0], indices, axis=0, out=flat)
            return
        which = np.searchsorted(index.starts_np, indices, side="right") - 1
        order = np.argsort(which, kind="stable")
        bounds = np.flatnonzero(np.diff(which[order])) + 1
        for group in np.split(order, bounds):  # one numpy gather per batch the indices touch
            k = int(which[group[0]])
            flat[group] = index.views[k][indices[group] - index.starts[k]]

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        index = self._read_index()
        labels[:] = index.labels[start:stop]
        flat = images.reshape(stop - start, -1)
        k = bisect.bisect_right(index.starts, start) - 1
        pos = start
        while pos < stop:
            first, view = index.starts[k], index.views[k]
            hi = min(stop, first + len(view))
            flat[pos - start : hi - start] = view[pos - first : hi - first]
            pos, k = hi, k + 1

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        where = self._read_index()
        k = bisect.bisect_right(where.starts, index) - 1
        image = where.views[k][index - where.starts[k]].reshape(self.image_shape)  # a copy below
        return image.copy(), int(where.labels[index])

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        index = self._read_index()
        which = (np.searchsorted(index.starts_np, indices, side="right") - 1).tolist()
        views = [view.data for view in index.views]  # memoryviews: the fastest slices to bytes
        begins, ends = index.begins[indices].tolist(), index.ends[indices].tolist()
        blobs = [views[k][b:e].tobytes() for k, b, e in zip(which, begins, ends, strict=True)]
        return blobs, index.labels[indices]

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        return self._read_blobs(np.arange(start, stop, dtype=np.int64))


def _table(fragment: Fragment) -> pa.Table:
    return pa.Table.from_batches(fragment.batches, fragment.batches[0].schema)


def _absorbs(size: int, before: int, limit: int) -> bool:
    """Whether a write of ``size`` bytes so far absorbs the fragment of ``before`` bytes before it.

    When that fragment's size class is at most the write's (sizes in ``[2**(k-1), 2**k)`` share class
    ``k``: it is less than twice the write), and the two fit in ``limit`` (``merge_bytes``).
    """
    return before.bit_length() <= size.bit_length() and before + size <= limit


def _build_index(fragments: list[Fragment], count: int, encoded: bool) -> _Index:
    starts: list[int] = []
    views: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    begins: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for fragment in fragments:
        first = fragment.start
        for batch in fragment.batches:
            rows = min(batch.num_rows, count - first)
            if rows <= 0:
                break
            image, label = batch.column(0), batch.column(1)
            labels.append(label.to_numpy(zero_copy_only=True)[:rows])
            if encoded:
                offsets = np.frombuffer(image.buffers()[1], np.int64)[image.offset : image.offset + rows + 1]
                data = image.buffers()[2]
                begins.append(offsets[:-1])
                ends.append(offsets[1:])
                views.append(np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8))
            else:
                views.append(_pixels(image, rows))
            starts.append(first)
            first += batch.num_rows
    if sum(len(part) for part in labels) != count:
        raise CorruptStoreError(f"the store's files hold {sum(len(part) for part in labels)} of {count} records")

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    return _Index(starts, np.array(starts, np.int64), views, joined(labels), joined(begins), joined(ends))


def _pixels(image: pa.Array, rows: int) -> np.ndarray:
    """A raw batch's pixels as a [rows, image bytes] view of its buffer (nested fixed-size lists)."""
    start, length, values = 0, rows, image
    while isinstance(values, pa.FixedSizeListArray):  # .values ignores the array's own offset: add it
        size = values.type.list_size
        start, length = (values.offset + start) * size, length * size
        values = values.values
    flat = values.to_numpy(zero_copy_only=True)[start : start + length]
    if len(flat) != length:
        raise CorruptStoreError(f"a record batch holds {len(flat)} pixel bytes, not {length}")
    pixels: np.ndarray = flat.reshape(rows, -1)
    return pixels
