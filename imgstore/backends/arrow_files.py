"""The fragment files of the Arrow backend: naming, finding the committed ones, checking, writing.

A fragment is one Arrow IPC file (Feather v2) ``part-<start>.arrow`` holding records
``start .. start + rows - 1`` in record batches of two columns, ``image`` and ``label`` (int64).
A committed fragment is never changed in place: a write makes a new file under a hidden temporary
name (``.part-<start>.tmp``: ``pyarrow.dataset`` skips names starting with a dot), then renames it.
A merge (see ``ArrowStore._append``) writes the rows of the last few small fragments and the new ones
into one file named after the first of them, replacing it; the others it absorbed are then
deleted. So the directory can hold, besides the committed fragments:

- *superseded* fragments (their start lies inside a merged fragment's rows): skipped;
- fragments at or past the committed count, and a merged fragment longer than the count: what a
  write left that was killed before the manifest committed it. Readers never look past the count;
  the next write deletes the first kind and rewrites the second.

:func:`committed` finds the fragments holding records ``0 .. count - 1`` by walking the names in
order of their start. Every file it opens is checked (IPC metadata by pyarrow, then every batch's
types and buffers with ``validate(full=True)``): a damaged file is an error, never a crash.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from imgstore.errors import CorruptStoreError

_NAME = re.compile(r"part-(\d{12})\.arrow")
_WALK_TRIES = 5  # a writer may delete a superseded fragment while a reader walks: walk again


def fragment_name(start: int) -> str:
    return f"part-{start:012d}.arrow"


def temporary_name(start: int) -> str:
    return f".part-{start:012d}.tmp"


def image_type(shape: tuple[int, ...] | None) -> pa.DataType:
    """Raw pixels of one shape: nested fixed-size lists (``[32][32][3]`` uint8), which HF ``datasets``
    and numpy read as [N, *shape]; anything else (encoded files, raw varied): the record's bytes."""
    if shape is None:
        return pa.large_binary()
    kind: pa.DataType = pa.uint8()
    for size in reversed(shape):
        kind = pa.list_(kind, size)
    return kind


def schema(shape: tuple[int, ...] | None) -> pa.Schema:
    return pa.schema([("image", image_type(shape)), ("label", pa.int64())])


@dataclass
class Fragment:
    """One open (memory-mapped), checked fragment file."""

    start: int
    path: str
    data_bytes: int  # the batches' buffers: what a table of the same rows holds in memory (``Table.nbytes``)
    batches: list[pa.RecordBatch]

    @property
    def rows(self) -> int:
        return sum(batch.num_rows for batch in self.batches)

    @property
    def end(self) -> int:
        return self.start + self.rows


def open_fragment(path: str, start: int, shape: tuple[int, ...] | None) -> Fragment:
    """Map and check one fragment file; pyarrow's errors (ArrowException, OSError) mean damage."""
    source = pa.memory_map(path, "r")
    reader = ipc.open_file(source)
    if not reader.schema.equals(schema(shape), check_metadata=False):
        raise CorruptStoreError(f"{path} holds columns {reader.schema.types}, not this store's image and label")
    batches = []
    for k in range(reader.num_record_batches):
        batch = reader.get_batch(k)
        batch.validate(full=True)  # offsets and lengths against the buffers: no read can leave them
        batches.append(batch)
    fragment = Fragment(start, path, sum(batch.nbytes for batch in batches), batches)
    if fragment.rows == 0:
        raise CorruptStoreError(f"{path} holds no record")
    return fragment


def committed(directory: str, count: int, shape: tuple[int, ...] | None) -> list[Fragment]:
    """The fragments that hold records ``0 .. count - 1``, in order (the last may hold more)."""
    for attempt in range(_WALK_TRIES):
        try:
            return _walk(directory, count, shape)
        except FileNotFoundError:
            if attempt == _WALK_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _walk(directory: str, count: int, shape: tuple[int, ...] | None) -> list[Fragment]:
    if count == 0:
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.fullmatch(name)
        if match is not None:
            found.append((int(match.group(1)), name))
    fragments: list[Fragment] = []
    expected = 0
    for start, name in sorted(found):
        if start < expected:
            continue  # superseded: its records are in the merged fragment before it
        if start > expected:
            break
        fragment = open_fragment(os.path.join(directory, name), start, shape)
        fragments.append(fragment)
        expected = fragment.end
        if expected >= count:
            return fragments
    raise CorruptStoreError(f"{directory}: no fragment holds record {expected} of the {count} committed")


def strays(directory: str, keep: list[Fragment]) -> Iterator[str]:
    """Fragment and temporary files in ``directory`` that are not ``keep``'s (leftovers, superseded)."""
    kept = {os.path.basename(fragment.path) for fragment in keep}
    for name in os.listdir(directory):
        if (_NAME.fullmatch(name) or (name.startswith(".part-") and name.endswith(".tmp"))) and name not in kept:
            yield os.path.join(directory, name)


def write_fragment(directory: str, start: int, table: pa.Table, batch_rows: list[int], *, sync: bool) -> str:
    """Write ``table`` (records ``start ..``) as fragment ``start`` in batches of ``batch_rows`` rows; its path.

    Through a Python file object, so a full disk or a size limit is a plain ``OSError`` with its errno.
    """
    temporary = os.path.join(directory, temporary_name(start))
    try:
        with open(temporary, "wb") as f:
            writer = ipc.new_file(f, table.schema)
            row = 0
            for rows in batch_rows:
                for batch in table.slice(row, rows).to_batches():
                    writer.write_batch(batch)
                row += rows
            writer.close()
            if sync:
                f.flush()
                os.fsync(f.fileno())
        path = os.path.join(directory, fragment_name(start))
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)  # a full disk must not stay full of a write that failed
        except OSError:
            pass
        raise
    return path


def batch_rows(table: pa.Table, batch_bytes: int) -> list[int]:
    """Rows per record batch: as many as fit in ``batch_bytes`` of images (at least one)."""
    column = table.column("image").combine_chunks()
    n = len(column)
    if not pa.types.is_large_binary(column.type):
        per = max(1, batch_bytes // max(1, column.nbytes // max(1, n)))
        return [min(per, n - lo) for lo in range(0, n, per)]
    offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + n + 1]
    rows, lo = [], 0
    while lo < n:  # the first record past lo whose end exceeds lo's start + batch_bytes ends the batch
        hi = int(np.searchsorted(offsets, offsets[lo] + batch_bytes, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        rows.append(hi - lo)
        lo = hi
    return rows
