"""MosaicML Streaming: MDS shards written by ``MDSWriter``, read by a local ``StreamingDataset``.

As its documentation shows for local data: ``MDSWriter(out=..., columns=...)`` then
``StreamingDataset(local=..., shuffle=True, shuffle_seed=..., batch_size=...)`` through a
``DataLoader`` (Streaming partitions the samples between the workers itself). Encoded records are
the JPEG bytes, decoded with Pillow in the workers.

Not runnable beside this project today (checked with 0.13.0, the newest): ``import streaming`` imports
``streaming.vision``, which imports torchvision at its top level (PyPI's torchvision needs another
torch than the CPU one here), and ``streaming.base`` imports transformers<5 (so huggingface-hub<1.0,
which datasets>=4 cannot share); it also requires numpy<2.2. The row is then skipped with that note.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.loaders.peer_support import collate_records, decode_to_size, files_under


class StreamingPeer(EpochLoader):
    name = "mosaicml-streaming"
    kind = "peer"
    requires = ("streaming",)
    install = (
        "pip install mosaicml-streaming (it imports torchvision and needs numpy<2.2 and transformers<5: "
        "not installable beside this project's CPU torch, numpy and datasets)"
    )

    def build(self, source: EpochSource, root: Path) -> None:
        from streaming import MDSWriter

        self.root = root
        self.size = source.size
        if isinstance(source.images, np.ndarray):
            shape = ",".join(str(side) for side in source.images.shape[1:])
            columns = {"image": f"ndarray:uint8:{shape}", "label": "int64"}
        else:
            columns = {"image": "bytes", "label": "int64"}
        with MDSWriter(out=str(root), columns=columns, compression=None) as writer:
            for index in range(len(source)):
                writer.write({"image": source.images[index], "label": np.int64(source.labels[index])})

    def files(self) -> list[Path]:
        return files_under(self.root)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        dataset = _dataset_class()(
            local=str(self.root), shuffle=True, shuffle_seed=seed, batch_size=batch_size, size=self.size
        )
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_records)


def _dataset_class() -> type[Any]:
    from streaming import StreamingDataset

    class DecodingDataset(StreamingDataset):  # type: ignore[misc]
        """Streaming's documented way to transform records: override ``get_item``."""

        def __init__(self, *, size: tuple[int, int] | None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.size = size

        def get_item(self, index: int) -> dict[str, Any]:
            record = super().get_item(index)
            if self.size is not None:
                record["image"] = decode_to_size(record["image"], self.size)
            return dict(record)

    return DecodingDataset
