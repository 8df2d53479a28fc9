"""Why the memmap backend reads through a mapping: one image, a shuffled batch, a scan, mmap against pread.

``python -m benchmarks.memmap_reads [N]`` (default 10 000 CIFAR-sized images, warm page cache): the
fastest of 15 rounds, per image, of each way of copying images out of one raw file into owned arrays.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

SHAPE = (32, 32, 3)
BATCH = 256


def main(n: int) -> None:
    nbytes = int(np.prod(SHAPE))
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.raw")
        rng.integers(0, 256, n * nbytes, dtype=np.uint8).tofile(path)
        fd = os.open(path, os.O_RDONLY)
        mapping = mmap.mmap(fd, n * nbytes, prot=mmap.PROT_READ)
        best = _measure(fd, np.frombuffer(mapping, np.uint8).reshape(n, *SHAPE), order)
        mapping.close()
        os.close(fd)
    for name, seconds in best.items():
        print(f"{name:34s} {seconds / n * 1e6:6.2f} µs an image")


def _measure(fd: int, mapped: np.ndarray, order: np.ndarray) -> dict[str, float]:
    """The fastest round of each way of reading, in seconds."""
    n, nbytes = len(order), int(np.prod(SHAPE))
    positions = (order * nbytes).tolist()

    def one_pread() -> None:
        for position in positions:
            image = np.empty(SHAPE, np.uint8)
            os.preadv(fd, [image], position)  # type: ignore[list-item]

    def one_mmap() -> None:
        for i in order.tolist():
            mapped[i].copy()

    def batch_pread() -> None:
        for start in range(0, n, BATCH):
            out = np.empty((len(order[start : start + BATCH]), *SHAPE), np.uint8)
            for k, position in enumerate(positions[start : start + BATCH]):
                os.preadv(fd, [out[k]], position)  # type: ignore[list-item]

    def batch_mmap() -> None:
        for start in range(0, n, BATCH):
            indices = order[start : start + BATCH]
            np.take(mapped, indices, axis=0, out=np.empty((len(indices), *SHAPE), np.uint8))

    def scan_pread() -> None:
        os.preadv(fd, [np.empty((n, *SHAPE), np.uint8)], 0)  # type: ignore[list-item]

    def scan_mmap() -> None:
        np.empty((n, *SHAPE), np.uint8)[...] = mapped

    ways: dict[str, Callable[[], None]] = {
        "get, os.preadv": one_pread,
        "get, mmap copy": one_mmap,
        "batch of 256, os.preadv each": batch_pread,
        "batch of 256, np.take from mmap": batch_mmap,
        "scan, one os.preadv": scan_pread,
        "scan, copy from mmap": scan_mmap,
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(15):  # interleaved, so a busy moment hits every way alike
        for name, way in ways.items():
            start_time = time.perf_counter()
            way()
            best[name] = min(best[name], time.perf_counter() - start_time)
    return best


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
