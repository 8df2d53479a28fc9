"""Where a format's shuffled ``get`` and bulk ``read_many`` go, against the limit and the library call under them.

``python -m benchmarks.formats_reads [N] [BACKENDS]`` (default 100 000 synthetic CIFAR images,
``leveldb,tar,sqlite``; stores made in a temporary folder, warm page cache). CPU time of this
process (``time.process_time``: a shared machine's load does not count, page faults and copies
do), median of 5 rounds, interleaved with the limit's: one ``os.pread`` per image; one
``np.fromfile`` of the raw file (and ``readinto`` a reused array, beside ``get_many(out=)``). Beside
each store's figures, what its library alone costs: plyvel's ``DB.get`` and iterator, the ``sqlite3``
module's ``execute().fetchone()`` and cursor over all rows.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import imgstore
from imgstore.datasets import load_dataset

ROUNDS = 5


def _cpu(way: Callable[[], object]) -> float:
    start = time.process_time()
    way()
    return time.process_time() - start


def _library(store: imgstore.Store, order: list[int], n: int) -> dict[str, Callable[[], object]]:
    """The library's own calls under a store's get and scan (what no store on that library can go below)."""
    if store.backend == "leveldb":
        db = store._reader  # type: ignore[attr-defined]
        per_block = store._per_block(int(np.prod(store.image_shape)))  # type: ignore[attr-defined]
        keys = [(i // per_block).to_bytes(8, "big") for i in order]
        return {
            "plyvel DB.get (get)": lambda: [db.get(k) for k in keys],
            "plyvel iterator (scan)": lambda: [v for v in db.iterator(fill_cache=False, include_key=False)],
        }
    if store.backend == "sqlite":
        cursor = store._cursor()  # type: ignore[attr-defined]
        one = "SELECT label, image FROM images WHERE id = ?"
        scan = "SELECT id, label, image FROM images WHERE id >= ? AND id < ? ORDER BY id"
        return {
            "sqlite3 execute+fetchone (get)": lambda: [cursor.execute(one, (i,)).fetchone() for i in order],
            "sqlite3 cursor over all rows (scan)": lambda: [None for _ in cursor.execute(scan, (0, n))],
        }
    return {}


def main(n: int, backends: list[str]) -> None:
    images, labels = load_dataset("synthetic", n)
    order = np.random.default_rng(0).permutation(n).tolist()
    size = images[0].nbytes
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp, "images.raw")
        images.tofile(raw)
        for backend in backends:
            with imgstore.open_store(Path(tmp, backend), backend, mode="w", sync=False) as store:
                store.put_many(images, labels)
        out = (np.empty_like(images), np.empty(n, np.int64))
        with open(raw, "rb", buffering=0) as f:
            fd = f.fileno()

            def pread_each() -> None:
                for i in order:
                    np.frombuffer(os.pread(fd, size, i * size), np.uint8).reshape(images.shape[1:])
                    int(labels[i])

            def fromfile() -> None:
                f.seek(0)
                np.fromfile(f, dtype=np.uint8, count=n * size)

            def readinto() -> None:
                f.seek(0)
                f.readinto(out[0])  # type: ignore[arg-type]

            limit = {"get": pread_each, "read_many": fromfile, "read_many out=": readinto}
            stores = {b: imgstore.open_store(Path(tmp, b)) for b in backends}
            unverified = {b: imgstore.open_store(Path(tmp, b), verify_reads=False) for b in backends}
            ways: dict[str, Callable[[], object]] = {f"limit {k}": v for k, v in limit.items()}
            for b in backends:
                s, u = stores[b], unverified[b]
                ways[f"{b} get"] = lambda s=s: [s.get(i) for i in order]
                ways[f"{b} get unverified"] = lambda u=u: [u.get(i) for i in order]
                ways[f"{b} read_many"] = lambda s=s: s.get_many(range(n))
                ways[f"{b} read_many out="] = lambda s=s: s.get_many(range(n), out=out)
                ways[f"{b} read_many out= unverified"] = lambda u=u: u.get_many(range(n), out=out)
                ways.update({f"{b} {k}": v for k, v in _library(s, order, n).items()})
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(ROUNDS):  # interleaved: a busy moment hits every way alike
                for name, way in ways.items():
                    times[name].append(_cpu(way))
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, seconds in median.items():
        per_get = "get" in name
        reference = (
            median["limit get"] if per_get else median["limit " + ("read_many out=" if "out=" in name else "read_many")]
        )
        if "(scan)" in name:
            reference = median["limit read_many out="]
        figure = f"{seconds / n * 1e6:7.2f} µs a get" if per_get else f"{seconds * 1e3:7.0f} ms"
        print(f"{name:44s} {figure}   {seconds / reference:5.2f}x the limit")


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 100_000,
        sys.argv[2].split(",") if len(sys.argv) > 2 else ["leveldb", "tar", "sqlite"],
    )
