"""LevelDB and SQLite readers: records read straight out of the files against the library's own reads.

``python -m benchmarks.direct_reads [BACKEND ...] [--n N]`` (default: leveldb sqlite, 100 000 synthetic
CIFAR images, a store made in a temporary folder, warm page cache). CPU time of this process
(``time.process_time``), median of 5 interleaved rounds, ratios to the limit in the same process (one
``os.pread`` per image; one ``readinto`` of the raw file into a reused array). "library" is the same
handle with the direct path turned off (``LeveldbStore._direct`` / ``SqliteStore._snapshot_rows``
answering None): plyvel's ``DB.get`` and iterator, the ``sqlite3`` module's queries, as before.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import imgstore
from imgstore.datasets import load_dataset

ROUNDS = 5
_HOOK = {"leveldb": "_direct", "sqlite": "_snapshot_rows"}  # the method that hands out the direct path


def _cpu(way: Callable[[], object]) -> float:
    start = time.process_time()
    way()
    return time.process_time() - start


def main(backends: list[str], n: int) -> None:
    images, labels = load_dataset("synthetic", n)
    order = np.random.default_rng(0).permutation(n).tolist()
    size = images[0].nbytes
    out = (np.empty_like(images), np.empty(n, np.int64))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp, "images.raw")
        images.tofile(raw)
        fd = os.open(raw, os.O_RDONLY)
        ways: dict[str, Callable[[], object]] = {
            "limit get": lambda: [np.frombuffer(os.pread(fd, size, i * size), np.uint8) for i in order],
            "limit scan out=": lambda: os.preadv(fd, [out[0]], 0),
        }
        for backend in backends:
            with imgstore.open_store(Path(tmp, backend), backend, mode="w", sync=False) as store:
                store.put_many(images, labels)
            direct = imgstore.open_store(Path(tmp, backend))
            unverified = imgstore.open_store(Path(tmp, backend), verify_reads=False)
            library = imgstore.open_store(Path(tmp, backend))
            setattr(library, _HOOK[backend], lambda: None)
            for name, store in (("direct", direct), ("direct unverified", unverified), ("library", library)):
                ways[f"{backend} get, {name}"] = lambda s=store: [s.get(i) for i in order]
                ways[f"{backend} scan out=, {name}"] = lambda s=store: s.get_many(range(n), out=out)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(ROUNDS):  # interleaved: a busy moment hits every way alike
            for name, way in ways.items():
                times[name].append(_cpu(way))
        os.close(fd)
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, seconds in median.items():
        per_get = " get" in name
        reference = median["limit get" if per_get else "limit scan out="]
        figure = f"{seconds / n * 1e6:7.2f} µs a get" if per_get else f"{seconds * 1e3:7.0f} ms"
        print(f"{name:36s} {figure}   {seconds / reference:5.2f}x the limit")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", metavar="BACKEND", help="leveldb, sqlite (default: both)")
    parser.add_argument("--n", type=int, default=100_000)
    arguments = parser.parse_args()
    unknown = set(arguments.backends) - set(_HOOK)
    if unknown:
        parser.error(f"no direct path to compare for {', '.join(sorted(unknown))}: choose from {', '.join(_HOOK)}")
    main(arguments.backends or list(_HOOK), arguments.n)
