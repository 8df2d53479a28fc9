"""The leveldb backend's block size and compression, measured: ``python -m benchmarks.leveldb_block_bytes [DIR]``.

Per ``block_bytes``: opening a reader (its private view), ``get_many`` of every image, and one ``get``
per image in shuffled order, on 10 000 synthetic CIFAR images (medians of 3); then the bytes LevelDB's
tables take for the same 16 KiB blocks with Snappy compression.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import plyvel

import imgstore
from imgstore.datasets.synthetic import synthetic_cifar10


def main(root: Path) -> None:
    images, labels = synthetic_cifar10(10_000)
    order = np.random.default_rng(0).permutation(len(images)).tolist()
    times: dict[int, list[tuple[float, float, float]]] = {}
    for rep in range(3):
        for block_bytes in (3080, 16384, 65536):
            path = root / f"s{block_bytes}"
            if rep == 0:
                with imgstore.open_store(path, "leveldb", "w", block_bytes=block_bytes) as store:
                    store.put_many(images, labels)
            start = time.perf_counter()
            store = imgstore.open_store(path)
            opened = time.perf_counter()
            store.get_many(range(len(images)))
            scanned = time.perf_counter()
            for index in order:
                store.get(index)
            done = time.perf_counter()
            store.close()
            times.setdefault(block_bytes, []).append((opened - start, scanned - opened, done - scanned))
    for block_bytes, runs in times.items():
        medians = [1e3 * statistics.median(run[k] for run in runs) for k in range(3)]
        opened, scanned, gets = medians
        print(f"block_bytes {block_bytes}: open {opened:.1f} ms, get_many {scanned:.1f} ms, gets {gets:.1f} ms")
    db = plyvel.DB(str(root / "snappy"), create_if_missing=True, compression="snappy")
    with db.write_batch() as batch:
        for first in range(0, len(images), 5):
            value = images[first : first + 5].tobytes() + labels[first : first + 5].tobytes()
            batch.put(first.to_bytes(8, "big"), value)
    db.compact_range(start=b"\xff" * 9, stop=b"\xff" * 9)
    db.close()
    folder = root / "snappy"
    tables = sum(os.path.getsize(folder / name) for name in os.listdir(folder) if name.endswith(".ldb"))
    print(f"snappy: {tables} bytes of tables for {images.nbytes + labels.nbytes} bytes of pixels and labels")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
