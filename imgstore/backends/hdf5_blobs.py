"""An encoded HDF5 store's records: its datasets, the index of where records lie, and their writes and reads.

Encoded stores (a codec other than raw, or raw images of varied shapes) keep variable-length
records in three 1-D datasets made when the store is created:

- ``blobs``: uint8, every record's bytes concatenated, in chunks of 1 MiB (``chunk_bytes`` sizes
  the chunks of raw stores only). Measured on 1 000 ImageNet-like JPEGs (~110 KB): a shuffled
  batch of 256 read with ``preadv`` takes about the same time with 256 KiB to 4 MiB chunks (7-11
  ms warm) and 30-60% more with 64 KiB; h5py slices take 3-5x as long at any size. 1 MiB keeps
  the chunk index small (one entry per MiB) and nine in ten such records inside one chunk.
- ``ends``: int64, record ``i`` is ``blobs[ends[i - 1]:ends[i]]`` (``ends[-1]`` taken as 0).
- ``labels``: int64, as in raw stores.

A write appends at the end of the last committed record (``ends[start - 1]``) and resizes every
dataset to the new records' end, so the leftovers of a write that crashed before its commit are
overwritten or cut off. Reads take the committed ``ends`` once per handle (and per write), after
checking them (increasing, within ``blobs``, no record over 2 GiB: a damaged file never makes a
read allocate what it claims), and read each record with one ``pread`` at the file offset of its
chunk, in file order, then hand them back in the caller's order (a record across two chunks that
are not contiguous in the file is read in two pieces). Reading spans that cover several nearby
records with one read and splitting them gained nothing measurable: 2 KB records cost about 2 µs
each either way, and for 110 KB records the split's extra copy costs more than the calls it saves.

Kept apart from ``hdf5.py`` (the Store, which holds the open datasets and calls these) so that each
stays readable; how files are opened, made and replaced is described there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from imgstore.backends.hdf5_files import COPY_BYTES, LABEL_CHUNK, EncodedLayout
from imgstore.errors import CorruptStoreError, ImgStoreError
from imgstore.fileio import reserve
from imgstore.manifest import MAX_IMAGE_BYTES

BLOB_CHUNK = 1 << 20  # bytes per chunk of ``blobs`` (see the module docstring)
ENCODED_LAYOUT = EncodedLayout(BLOB_CHUNK, LABEL_CHUNK, LABEL_CHUNK)


def encoded_datasets(file: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset] | None:
    """The ``blobs``, ``ends`` and ``labels`` datasets of an encoded store's file; None unless all are as made."""
    blobs, ends, labels = (file.get(name) for name in ("blobs", "ends", "labels"))
    for dataset, dtype in ((blobs, np.uint8), (ends, np.int64), (labels, np.int64)):
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1 or dataset.chunks is None:
            return None
        if dataset.dtype != dtype:
            return None
    return blobs, ends, labels


# ---------------------------------------------------------------------- the read index


def checked_ends(ends: np.ndarray, data_size: int, where: object) -> np.ndarray:
    """``ends`` (int64) read from a file, after checking it: record ``i`` is ``blobs[ends[i - 1]:ends[i]]``.

    A file is input like any other: every record must have 1 byte to 2 GiB and end within the
    ``blobs`` dataset, so no read allocates more than a record can be because the file says so.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if len(ends) == 0:
        return ends
    # Bounds first: with every end in 1 .. data_size the differences below cannot overflow.
    if int(ends.min()) < 1 or int(ends.max()) > data_size:
        raise CorruptStoreError(f"{where}: record offsets lie outside the {data_size} bytes of records")
    lengths = np.diff(ends, prepend=0)
    if int(lengths.min()) < 1 or int(lengths.max()) > MAX_IMAGE_BYTES:
        raise CorruptStoreError(f"{where}: record offsets are not increasing, or a record exceeds 2 GiB")
    return ends


@dataclass(frozen=True)
class BlobIndex:
    """Where the committed records of an encoded store lie: their bytes' ends, and the file offsets of the chunks."""

    chunk: int  # bytes per chunk of ``blobs``
    ends: np.ndarray  # record i is blobs[ends[i - 1]:ends[i]] (ends[-1] taken as 0); checked
    offsets: np.ndarray | None  # file offset of each chunk; None when chunks are filtered
    run_ends: np.ndarray | None  # per chunk: the last chunk of the run that lies contiguously in the file from it
    labels: np.ndarray

    @classmethod
    def build(cls, blobs: h5py.Dataset, ends: h5py.Dataset, labels: h5py.Dataset, count: int) -> BlobIndex:
        chunk = int(blobs.chunks[0])
        checked = checked_ends(ends[:count], int(blobs.shape[0]), blobs.file.filename)
        label_values = np.asarray(labels[:count], dtype=np.int64)
        if blobs.id.get_create_plist().get_nfilters():
            return cls(chunk, checked, None, None, label_values)
        needed = -(-int(checked[-1]) // chunk) if count else 0
        offsets = np.full(needed, -1, dtype=np.int64)

        def note(info: h5py.h5d.StoreInfo) -> None:
            index = info.chunk_offset[0] // chunk
            if index < needed and info.size == chunk:
                offsets[index] = info.byte_offset

        blobs.id.chunk_iter(note)
        if needed and offsets.min() < 0:
            raise CorruptStoreError(f"{blobs.file.filename}: record chunks are missing or of the wrong size")
        # HDF5 allocates chunks at the end of the file as they are written, so most runs of chunks are
        # contiguous in the file and a record across chunks is still one read.
        breaks = np.flatnonzero(offsets[1:] != offsets[:-1] + chunk)  # chunk c + 1 does not follow chunk c
        run_ends = np.append(breaks, needed - 1)[np.searchsorted(breaks, np.arange(needed))]
        return cls(chunk, checked, offsets, run_ends, label_values)

    def spans(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte ranges ``[starts, stops)`` in ``blobs`` of records ``indices``."""
        stops = self.ends[indices]
        starts = np.where(indices > 0, self.ends[np.maximum(indices - 1, 0)], 0)
        return starts, stops


# ---------------------------------------------------------------------- writing


def end_of(index: BlobIndex | None, blob_set: h5py.Dataset, end_set: h5py.Dataset, start: int, file: Path) -> int:
    """Where record ``start`` begins in ``blobs``: the end of the committed record before it."""
    if start == 0:
        return 0
    if index is not None:
        return int(index.ends[start - 1])
    # Not the whole index (a read's job): the last record's bounds, so that a damaged offset
    # cannot make this write land gigabytes past the records.
    try:
        if end_set.shape[0] < start:
            raise CorruptStoreError(f"{file} holds fewer images than its manifest commits")
        last = end_set[max(0, start - 2) : start]
        size = int(blob_set.shape[0])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise CorruptStoreError(f"{file} cannot be read: {exc}") from exc
    before, end = (0, int(last[0])) if start == 1 else (int(last[0]), int(last[1]))
    if not 0 <= before < end <= size or end - before > MAX_IMAGE_BYTES:
        raise CorruptStoreError(f"{file}: record {start - 1} lies outside the records ({before} .. {end})")
    return end


def put_blobs(
    blob_set: h5py.Dataset,
    end_set: h5py.Dataset,
    label_set: h5py.Dataset,
    start: int,
    offset: int,
    blobs: Sequence[bytes],
    labels: np.ndarray,
    file: Path,
) -> None:
    """Write records ``start ..``, their bytes from ``offset`` of ``blob_set``, after reserving disk space."""
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    ends = offset + np.cumsum(lengths)
    stop, total = start + len(blobs), int(lengths.sum())
    reserve(file, total + 16 * len(blobs) + (total >> 4) + (1 << 20))
    # To the new end exactly: a crashed write's leftovers past it are cut off, those before overwritten.
    blob_set.resize(offset + total, axis=0)
    end_set.resize(stop, axis=0)
    label_set.resize(stop, axis=0)
    k, at = 0, offset
    while k < len(blobs):  # pieces of about COPY_BYTES: a join per piece, not a copy of the whole batch
        j, size = k + 1, len(blobs[k])
        while j < len(blobs) and size + len(blobs[j]) <= COPY_BYTES:
            size += len(blobs[j])
            j += 1
        piece = np.frombuffer(b"".join(blobs[k:j]), dtype=np.uint8)
        blob_set.write_direct(piece, dest_sel=np.s_[at : at + size])
        k, at = j, at + size
    end_set.write_direct(ends, dest_sel=np.s_[start:stop])
    label_set.write_direct(np.ascontiguousarray(labels, dtype=np.int64), dest_sel=np.s_[start:stop])


def copy_blobs(old: h5py.File, count: int, path: Path) -> tuple[EncodedLayout, Callable[[h5py.File, Path], None]]:
    """The layout of ``old``'s datasets, and a fill that copies its first ``count`` records (bytes, ends, labels).

    ``old`` is the file at ``path``, read to rebuild it; it must stay open until the fill has run.
    """
    try:
        found = encoded_datasets(old)
        if found is None or found[1].shape[0] < count or found[2].shape[0] < count:
            raise CorruptStoreError(f"{path} holds fewer images than its manifest commits")
        blobs, ends, labels = found
        layout = EncodedLayout(blobs.chunks[0], ends.chunks[0], labels.chunks[0])
        kept_ends = checked_ends(ends[:count], blobs.shape[0], path)
        kept_labels = np.asarray(labels[:count], dtype=np.int64)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, ImgStoreError):
            raise
        raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
    nbytes = int(kept_ends[-1])

    def copy_records(file: h5py.File, tmp: Path) -> None:
        reserve(tmp, nbytes + 16 * count + (nbytes >> 4) + (1 << 20))
        for name, values in (("ends", kept_ends), ("labels", kept_labels)):
            file[name].resize(count, axis=0)
            file[name].write_direct(values)
        file["blobs"].resize(nbytes, axis=0)
        for lo in range(0, nbytes, COPY_BYTES):
            hi = min(nbytes, lo + COPY_BYTES)
            try:
                block = blobs[lo:hi]
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                raise CorruptStoreError(f"{path} cannot be read: {exc}") from exc
            file["blobs"].write_direct(np.ascontiguousarray(block), dest_sel=np.s_[lo:hi])

    return layout, copy_records


# ---------------------------------------------------------------------- reading


def read_blobs(
    ix: BlobIndex,
    blob_set: h5py.Dataset,
    indices: np.ndarray,
    pread: Callable[[int, int], bytes],
    pread_into: Callable[[np.ndarray, int], None],
) -> tuple[list[bytes], np.ndarray]:
    """Records ``indices`` and their labels, read with the store's ``pread``/``pread_into`` of its file."""
    labels = ix.labels[indices]
    starts, stops = ix.spans(indices)
    order = np.argsort(indices, kind="stable")  # file order: records lie in index order
    blobs: list[bytes] = [b""] * len(indices)
    if ix.offsets is None or ix.run_ends is None:
        for k in order.tolist():
            blobs[k] = blob_set[starts[k] : stops[k]].tobytes()
        return blobs, labels
    first = starts // ix.chunk
    positions = ix.offsets[first] + starts - first * ix.chunk
    # One read when the record's chunks lie one after another in the file (nearly always).
    whole = (stops - 1) // ix.chunk <= ix.run_ends[first]
    # Python ints for the loop: indexing numpy arrays per record costs more than a small record's read.
    for k, position, start, stop, one_read in zip(
        order.tolist(),
        positions[order].tolist(),
        starts[order].tolist(),
        stops[order].tolist(),
        whole[order].tolist(),
        strict=True,
    ):
        blobs[k] = pread(position, stop - start) if one_read else pread_pieces(ix, start, stop, pread_into)
    return blobs, labels


def pread_pieces(ix: BlobIndex, start: int, stop: int, pread_into: Callable[[np.ndarray, int], None]) -> bytes:
    """A record across chunks that are not contiguous in the file: one read per contiguous run."""
    assert ix.offsets is not None and ix.run_ends is not None
    buffer = np.empty(stop - start, dtype=np.uint8)
    at = start
    while at < stop:
        chunk = at // ix.chunk
        end = min(stop, (int(ix.run_ends[chunk]) + 1) * ix.chunk)
        pread_into(buffer[at - start : end - start], int(ix.offsets[chunk]) + at - chunk * ix.chunk)
        at = end
    return buffer.tobytes()
