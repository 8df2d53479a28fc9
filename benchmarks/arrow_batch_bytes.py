"""Why the arrow backend's ``batch_bytes`` is 64 MiB: store_many, read_many, a shuffled get_many and get per size.

    PYTHONPATH=. python -m benchmarks.arrow_batch_bytes [N]      # N synthetic CIFAR-like images (10 000)

Sizes are interleaved (A/B/C/D, repeated) and medians printed: the machine's load drifts.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np

import imgstore
from imgstore.datasets import load_dataset

SIZES = {"64k": 1 << 16, "1m": 1 << 20, "16m": 1 << 24, "64m": 1 << 26, "256m": 1 << 28}


def main(n: int, repeats: int = 3) -> None:
    images, labels = load_dataset("synthetic", n)
    order = np.random.default_rng(0).permutation(n)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in SIZES}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            for name, size in SIZES.items():
                path = f"{root}/{name}"
                steps = times[name]
                start = time.perf_counter()
                with imgstore.open_store(path, "arrow", "w", batch_bytes=size) as store:
                    store.put_many(images, labels)
                steps.setdefault("store_many", []).append(time.perf_counter() - start)
                with imgstore.open_store(path) as store:
                    store.get_many(range(n))  # warm the page cache and the handle
                    start = time.perf_counter()
                    store.get_many(range(n))
                    steps.setdefault("read_many", []).append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for low in range(0, n, 256):
                        store.get_many(order[low : low + 256])
                    steps.setdefault("shuffled 256s", []).append(time.perf_counter() - start)
                    start = time.perf_counter()
                    for index in order[:10_000].tolist():
                        store.get(index)
                    steps.setdefault("10k gets", []).append(time.perf_counter() - start)
    for name, steps in times.items():
        print(f"{name:>5}", "  ".join(f"{step} {np.median(t) * 1e3:7.1f} ms" for step, t in steps.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
