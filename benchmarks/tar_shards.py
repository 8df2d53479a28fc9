"""The tar backend's shard size, measured: ``python -m benchmarks.tar_shards [SHARD_MIB ...]``.

At 10 000 synthetic CIFAR images (51 MB of shards), for each shard size (interleaved, 5 rounds,
medians): ``store_many`` into a new store (durable), ``read_many`` (``get_many`` of all) and a
shuffled epoch of single ``get``s.
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


def main(argv: list[str]) -> None:
    mib = [int(a) for a in argv] or [1, 4, 16, 64, 256]
    images, labels = load_dataset("synthetic", 10_000)
    order = np.random.default_rng(0).permutation(len(images)).tolist()
    times: dict[int, dict[str, list[float]]] = {m: {"store_many": [], "read_many": [], "get": []} for m in mib}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(5):
            for m in mib:
                path = Path(tmp) / f"shards-{m}"
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter()
                with imgstore.open_store(path, "tar", "w", shard_bytes=m << 20) as store:
                    store.put_many(images, labels)
                times[m]["store_many"].append(time.perf_counter() - start)
                with imgstore.open_store(path) as store:
                    store.get_many(range(len(store)))  # warm
                    start = time.perf_counter()
                    store.get_many(range(len(store)))
                    times[m]["read_many"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for i in order:
                        store.get(i)
                    times[m]["get"].append(time.perf_counter() - start)
    print("| `shard_bytes` | `store_many` | `read_many` | shuffled `get` x 10 000 |")
    print("|---:|---:|---:|---:|")
    for m, ops in times.items():
        cells = " | ".join(f"{1000 * statistics.median(ops[op]):.0f} ms" for op in ("store_many", "read_many", "get"))
        print(f"| {m} MiB | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:])
