"""WebDataset: tar shards, read as its documentation shows, through its ``WebLoader``.

``WebDataset(urls, shardshuffle=..., seed=...)`` splits the shards between the workers, shuffles the
shard order, streams samples through a ``.shuffle(1000)`` buffer, decodes (``.npy`` raw pixels;
JPEG with Pillow in the workers), and batches inside the workers (``.batched``), so ``WebLoader``
runs with ``batch_size=None``. No resampling: each shard goes to exactly one worker, so an epoch
delivers every record exactly once (batches at a worker's end may be partial).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch

from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.loaders.peer_support import collate_pairs, decode_to_size

SHARDS = 10  # as in the reference figures: 50 000 records in shards of 5 000
SHUFFLE_BUFFER = 1000  # the sample shuffle buffer WebDataset's examples use


class WebDatasetPeer(EpochLoader):
    name = "webdataset"
    kind = "peer"
    requires = ("webdataset",)
    install = "pip install 'imgstore-ml[peers]'"

    def build(self, source: EpochSource, root: Path) -> None:
        import webdataset as wds

        self.encoded = source.encoded
        self.size = source.size
        count = len(source)
        shards = max(1, min(SHARDS, count))
        self.shards = [root / f"shard-{shard:06d}.tar" for shard in range(shards)]
        per_shard = -(-count // shards)
        for shard, path in enumerate(self.shards):
            with wds.TarWriter(str(path)) as sink:
                for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                    image = source.images[index]
                    key = "jpg" if self.encoded else "npy"  # .npy: the array itself, np.save'd by TarWriter
                    sink.write({"__key__": f"{index:08d}", key: image, "cls": int(source.labels[index])})

    def files(self) -> list[Path]:
        return list(self.shards)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        urls = [str(path) for path in self.shards]
        dataset = wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(
            SHUFFLE_BUFFER, seed=seed
        )
        if self.encoded:
            assert self.size is not None
            dataset = dataset.decode(wds.handle_extension("jpg", partial(decode_to_size, size=self.size)))
            dataset = dataset.to_tuple("jpg", "cls")
        else:
            dataset = dataset.decode().to_tuple("npy", "cls")
        dataset = dataset.batched(batch_size, collation_fn=collate_pairs, partial=True)
        return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)
