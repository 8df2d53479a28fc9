"""Byte ranges against a whole fetch, for a few records of a remote tar shard, cold cache, measured:
``python -m benchmarks.sharded_ranges [DATASET] [SHARD_SIZES] [REQUESTS] [ROUNDS]``
(default ``synthetic 1000,5000 1,16,64,256,1024,all 3``; DATASET ``imagenet-like`` stores its JPEG files).

One tar shard of each size is written to moto's S3 server on 127.0.0.1 (its own process; s3fs over
HTTP). Each round, for each request size k (``all``: the whole shard), the two policies interleaved
(their order alternating by round), each from a new, empty cache: open the dataset (untimed), then
time one ``get_many`` of k random records: with ``remote_reads="ranges"`` the shard's index and
checksums are fetched, then the records' spans (concurrent ranged GETs); with ``"whole"`` the shard
is downloaded, checked (XXH3-128) and renamed into the cache, then read. Medians of the rounds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.datasets import load_dataset
from imgstore.sharded import commit_shards, open_sharded, write_shard
from imgstore.testing.s3server import MotoServer


def _upload(server: MotoServer, name: str, images: Any, labels: np.ndarray) -> str:
    url = server.make_bucket(name) + "/ds"
    options = server.storage_options()
    if isinstance(images, list):  # encoded files, stored as they are
        info = write_shard(
            url, backend="tar", codec="keep", storage_options=options, fill=lambda s: s.put_encoded_many(images, labels)
        )
    else:
        info = write_shard(url, images, labels, backend="tar", storage_options=options)
    commit_shards(url, [info], storage_options=options)
    return url


def _time(url: str, options: dict[str, Any], policy: str, picked: np.ndarray, cache: Path) -> tuple[float, int]:
    with open_sharded(url, cache_dir=cache, storage_options=options, remote_reads=policy) as data:
        start = time.perf_counter()
        images, _labels = data.get_many(picked)
        elapsed = time.perf_counter() - start
        assert len(images) == len(picked)
        return elapsed, data.ranged_bytes if policy == "ranges" else data.shards[0].bytes


def main(argv: list[str]) -> None:
    dataset = argv[0] if argv else "synthetic"
    sizes = [int(s) for s in (argv[1] if len(argv) > 1 else "1000,5000").split(",")]
    requests = (argv[2] if len(argv) > 2 else "1,16,64,256,1024,all").split(",")
    rounds = int(argv[3]) if len(argv) > 3 else 3
    images, labels = load_dataset(dataset, max(sizes))
    with MotoServer() as server, tempfile.TemporaryDirectory() as tmp:
        options = server.storage_options()
        print(f"{dataset}, one tar shard a dataset, cold cache, medians of {rounds} interleaved rounds")
        print("| shard | records | ranges ms | whole ms | whole / ranges | bytes, ranges | bytes, whole |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for size in sizes:
            url = _upload(server, f"ranges-{size}", images[:size], labels[:size])
            for request in requests:
                k = size if request == "all" else int(request)
                if k > size:
                    continue
                times: dict[str, list[float]] = {"ranges": [], "whole": []}
                fetched: dict[str, int] = {}
                for r in range(rounds):
                    picked = np.random.default_rng(r).choice(size, k, replace=False)
                    for policy in ("ranges", "whole") if r % 2 == 0 else ("whole", "ranges"):
                        elapsed, fetched[policy] = _time(
                            url, options, policy, picked, Path(tmp) / f"{size}-{k}-{r}-{policy}"
                        )
                        times[policy].append(elapsed)
                ranged, whole = statistics.median(times["ranges"]), statistics.median(times["whole"])
                print(
                    f"| {size} | {request} | {ranged * 1e3:.1f} | {whole * 1e3:.1f} | {whole / ranged:.2f} "
                    f"| {fetched['ranges'] / 1e6:.2f} MB | {fetched['whole'] / 1e6:.2f} MB |",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
