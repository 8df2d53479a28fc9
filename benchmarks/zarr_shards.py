"""The zarr backend's shard size, measured: ``python -m benchmarks.zarr_shards [SHARD_IMAGES ...]``.

At 10 000 synthetic CIFAR images, for each shard size (interleaved, 5 rounds, medians): ``store_many``
into a new store (durable), ``read_many`` (``get_many`` of all) and a shuffled epoch of single ``get``s.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import imgstore
from imgstore.datasets import load_dataset


def main(sizes: list[int], count: int = 10_000, rounds: int = 5) -> None:
    images, labels = load_dataset("synthetic", count)
    order = np.random.default_rng(0).permutation(count).tolist()
    ops = ("store_many", "read_many", "read_random")
    times: dict[int, dict[str, list[float]]] = {s: {op: [] for op in ops} for s in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for size in sizes:
                path = Path(tmp) / f"s{size}"
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter()
                with imgstore.open_store(path, "zarr", "w", shard_images=size) as store:
                    store.put_many(images, labels)
                times[size]["store_many"].append(time.perf_counter() - start)
                with imgstore.open_store(path) as store:
                    store.get(0)  # opened files and labels read: what every later read has
                    start = time.perf_counter()
                    store.get_many(range(count))
                    times[size]["read_many"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for index in order:
                        store.get(index)
                    times[size]["read_random"].append(time.perf_counter() - start)
    for size in sizes:
        cells = "  ".join(f"{op} {statistics.median(t) * 1e3:7.1f} ms" for op, t in times[size].items())
        print(f"shard_images={size:6d}  {cells}")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [256, 1024, 4096, 16384])
