"""Values that hold a block of consecutive raw records: their pixels back to back, then their labels.

The layout the LMDB and LevelDB backends share for raw stores of one shape: a value of ``count``
records of ``size`` pixel bytes is ``count * size`` bytes of pixels, then ``count`` int64 labels
(little-endian). These helpers check such a value's length and copy records out of it; the
backends' hot loops (a shuffled gather) inline the same arithmetic, where a call per image costs.
"""

from __future__ import annotations

import numpy as np

from imgstore.errors import CorruptStoreError

Value = bytes | memoryview


def records_in(value: Value | None, block: int, size: int, per_block: int, where: str) -> int:
    """How many records block ``block``'s ``value`` holds; :class:`CorruptStoreError` (naming ``where``,
    e.g. "<path>: block 3 of the LMDB store") unless its length is that of 1 .. ``per_block`` records."""
    count = len(value) // (size + 8) if value is not None else 0
    if value is None or len(value) != count * (size + 8) or not 1 <= count <= per_block:
        found = "nothing" if value is None else f"{len(value)} bytes"
        raise CorruptStoreError(f"{where} holds {found}")
    return count


def copy_rows(
    value: Value, count: int, size: int, lo: int, hi: int, pixels: memoryview, labels: memoryview, at: int
) -> None:
    """Copy records ``lo .. hi - 1`` of a checked value of ``count`` records into the byte views
    ``pixels`` and ``labels`` (of a batch's images and int64 labels), from the batch's record ``at``."""
    stop = at + hi - lo
    pixels[at * size : stop * size] = value[lo * size : hi * size]
    labels[at * 8 : stop * 8] = value[count * size + lo * 8 : count * size + hi * 8]


def one_record(value: Value, count: int, size: int, row: int, image: np.ndarray) -> int:
    """Copy record ``row`` of a checked value of ``count`` records into ``image``; return its label."""
    image.data.cast("B")[:] = value[row * size : (row + 1) * size]
    at = count * size + 8 * row
    return int.from_bytes(value[at : at + 8], "little", signed=True)
