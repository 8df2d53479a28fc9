"""A sharded dataset read from a local S3 server, cold and warm cache, measured:
``python -m benchmarks.sharded_s3 [IMAGES] [SHARD_SIZE] [BACKEND] [ROUNDS]`` (default 50 000 5 000 lmdb 3).

Synthetic CIFAR images, written once to moto's S3 server on 127.0.0.1 (its own process; s3fs over
HTTP) and once to a local directory. Each round, interleaved: *fetch* (every shard into an empty
cache: download, XXH3-128 check, rename in: MB/s), *cold* (open with an empty cache, read every
shard with one ``get_many``, in a shuffled shard order: images/s, downloads included),
*cold+prefetch* (the same, fetching the next shard in the background while one is read), *warm*
(the cache full), *local* (the local copy, no cache). Medians of the rounds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgstore.datasets import load_dataset
from imgstore.sharded import ShardedDataset, ShardedWriter, open_sharded
from imgstore.testing.s3server import MotoServer


def _read_all(data: ShardedDataset, seed: int, prefetch: bool = False) -> int:
    count = 0
    order = np.random.default_rng(seed).permutation(len(data.shards)).tolist()
    for position, k in enumerate(order):
        if prefetch:
            data.prefetch(order[position + 1 : position + 2])  # the next shard downloads while this one is read
        start = int(data.offsets[k])
        images, _labels = data.get_many(range(start, start + data.shards[k].count))
        count += len(images)
    return count


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 50_000
    shard_size = int(argv[1]) if len(argv) > 1 else 5_000
    backend = argv[2] if len(argv) > 2 else "lmdb"
    rounds = int(argv[3]) if len(argv) > 3 else 3
    images, labels = load_dataset("synthetic", n)
    times: dict[str, list[float]] = {"fetch": [], "cold": [], "cold+prefetch": [], "warm": [], "local": []}
    with MotoServer() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.make_bucket("bench") + "/cifar"
        options = server.storage_options()
        start = time.perf_counter()
        with ShardedWriter(url, backend=backend, shard_size=shard_size, storage_options=options) as writer:
            writer.add(images, labels)
        written = time.perf_counter() - start
        with ShardedWriter(Path(tmp) / "local", backend=backend, shard_size=shard_size) as writer:
            writer.add(images, labels)
        total_bytes = 0
        for r in range(rounds):
            cache = Path(tmp) / f"fetch-{r}"
            with open_sharded(url, cache_dir=cache, storage_options=options) as data:
                assert data.cache is not None
                total_bytes = sum(s.bytes for s in data.shards)
                start = time.perf_counter()
                for info in data.shards:
                    data.cache.acquire(data.location, info).release()
                times["fetch"].append(time.perf_counter() - start)
            local = str(Path(tmp) / "local")
            for kind, where, cache in (
                ("cold+prefetch", url, Path(tmp) / f"prefetch-{r}"),
                ("cold", url, Path(tmp) / f"cold-{r}"),
                ("warm", url, Path(tmp) / f"cold-{r}"),
                ("local", local, None),
            ):
                with open_sharded(where, cache_dir=cache, storage_options=options, open_shards=2) as data:
                    start = time.perf_counter()
                    assert _read_all(data, r, prefetch=kind == "cold+prefetch") == n
                    times[kind].append(time.perf_counter() - start)
    print(
        f"{n} images, {n // shard_size} {backend} shards of {shard_size}, {total_bytes / 1e6:.1f} MB; "
        f"written and uploaded in {written:.1f} s; medians of {rounds} rounds"
    )
    print(
        f"fetch: {total_bytes / 1e6 / statistics.median(times['fetch']):.0f} MB/s "
        f"(runs: {', '.join(f'{total_bytes / 1e6 / t:.0f}' for t in times['fetch'])})"
    )
    for kind in ("cold", "cold+prefetch", "warm", "local"):
        rates = [n / t for t in times[kind]]
        print(f"{kind}: {statistics.median(rates):,.0f} images/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main(sys.argv[1:])
