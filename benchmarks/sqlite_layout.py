"""The SQLite backend's page_size and mmap_size, measured: ``python -m benchmarks.sqlite_layout [N]``.

Stores N (10 000) synthetic CIFAR images with each setting, in interleaved rounds, and prints the
medians: a shuffled ``get`` per image, ``get_many`` of all (read_many), ``put_many`` of all
(store_many, durable), 300 single ``put`` calls, and the bytes on disk.
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

SETTINGS = [(4096, 1 << 30), (16384, 1 << 30), (65536, 1 << 30), (65536, 0)]  # (page_size, mmap_size)


def main(n: int = 10_000, rounds: int = 4) -> None:
    images, labels = load_dataset("synthetic", n)
    order = np.random.default_rng(0).permutation(n).tolist()
    times: dict[tuple[int, int], dict[str, list[float]]] = {s: {} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for page, mmap in SETTINGS:
                got = times[(page, mmap)]
                path = Path(tmp) / "store"
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter()
                with imgstore.open_store(path, "sqlite", "w", page_size=page) as store:
                    store.put_many(images, labels)
                got.setdefault("store_many ms", []).append((time.perf_counter() - start) * 1e3)
                with imgstore.open_store(path, mmap_size=mmap) as store:
                    store.get(0)
                    start = time.perf_counter()
                    for i in order:
                        store.get(i)
                    got.setdefault("get us", []).append((time.perf_counter() - start) / n * 1e6)
                    start = time.perf_counter()
                    store.get_many(range(n))
                    got.setdefault("read_many ms", []).append((time.perf_counter() - start) * 1e3)
                    got["disk MB"] = [store.disk_usage() / 1e6]
                shutil.rmtree(path)
                with imgstore.open_store(path, "sqlite", "w", page_size=page) as store:
                    start = time.perf_counter()
                    for k in range(300):
                        store.put(images[k], int(labels[k]))
                    got.setdefault("put ms", []).append((time.perf_counter() - start) / 300 * 1e3)
    for (page, mmap), got in times.items():
        cells = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in got.items())
        print(f"page_size {page:6} mmap_size {mmap:11}: {cells}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
