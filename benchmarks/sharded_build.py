"""Building a sharded dataset from an ImageFolder on Dask, 1 and 2 worker processes, measured:
``python -m benchmarks.sharded_build [IMAGES] [SHARDS] [ROUNDS]`` (default 20 000 8 3).

Synthetic CIFAR images saved as PNG files in an ImageFolder (10 classes), converted with
``convert_sharded`` into LMDB shards (files kept as they are) on a local disk, or on moto's S3
server on 127.0.0.1 with ``--s3``. Each round, interleaved: the threads engine with 1 thread, and
Dask ``LocalCluster``s of 1 and 2 worker processes (started once, before the rounds: the timing is
the conversion, tasks and commit, not the cluster's start). Medians of the rounds; seconds per
shard per worker = time x workers / shards.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from imgstore.datasets import load_dataset
from imgstore.sharded.building import convert_sharded


def _folder(root: Path, n: int) -> None:
    images, labels = load_dataset("synthetic", n)
    for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        path = root / f"class{label}" / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def main(argv: list[str]) -> None:
    from distributed import LocalCluster

    s3 = "--s3" in argv
    args = [a for a in argv if a != "--s3"]
    n = int(args[0]) if args else 20_000
    shards = int(args[1]) if len(args) > 1 else 8
    rounds = int(args[2]) if len(args) > 2 else 3
    times: dict[str, list[float]] = {"local-1": [], "dask-1": [], "dask-2": []}
    with tempfile.TemporaryDirectory() as tmp:
        _folder(Path(tmp) / "src", n)
        server = None
        if s3:
            from imgstore.testing.s3server import MotoServer

            server = MotoServer().__enter__()
        clusters = {
            w: LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None) for w in (1, 2)
        }
        try:
            for r in range(rounds):
                for kind in times:
                    if server is not None:
                        dest, options = server.make_bucket(f"b{r}-{kind}") + "/ds", server.storage_options()
                    else:
                        dest, options = str(Path(tmp) / f"{kind}-{r}"), None
                    engine, workers = kind.split("-")
                    start = time.perf_counter()
                    convert_sharded(
                        Path(tmp) / "src",
                        dest,
                        shards=shards,
                        engine="dask" if engine == "dask" else "local",
                        scheduler=clusters[int(workers)].scheduler_address if engine == "dask" else None,
                        workers=int(workers),
                        storage_options=options,
                    )
                    times[kind].append(time.perf_counter() - start)
        finally:
            for cluster in clusters.values():
                cluster.close()
            if server is not None:
                server.__exit__(None, None, None)
    where = "moto S3 on 127.0.0.1" if s3 else "a local disk"
    print(f"{n} PNG files into {shards} lmdb shards on {where}; medians of {rounds} interleaved rounds")
    for kind, runs in times.items():
        t, workers = statistics.median(runs), int(kind.split("-")[1])
        print(
            f"{kind}: {t:.2f} s, {n / t:,.0f} images/s, {t * workers / shards:.2f} s per shard per worker "
            f"(runs: {', '.join(f'{x:.2f}' for x in runs)})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
