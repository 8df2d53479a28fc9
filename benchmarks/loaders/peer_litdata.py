"""LitData: ``litdata.optimize`` writes chunks; ``StreamingDataset`` + ``StreamingDataLoader`` read them.

Used as its documentation shows for a local folder: ``optimize(fn, inputs, output_dir, chunk_bytes)``
then ``StreamingDataset(output_dir, shuffle=True, seed=...)`` (shuffles the chunk order and the
records within chunks) through ``StreamingDataLoader``, which splits the chunks between the workers.
Encoded records are the JPEG bytes, decoded with Pillow by the dataset's ``transform`` in the workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.loaders.peer_support import collate_records, decode_to_size, files_under

# LitData checks PyPI for a newer version on import and at every StreamingDataset (a 30 s time-out offline).
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

CHUNK_BYTES = "64MB"  # LitData's documented default chunk size


class LitDataPeer(EpochLoader):
    name = "litdata"
    kind = "peer"
    requires = ("litdata",)
    # Not in the extra: litdata requires torchvision, which pulls another (CUDA) torch from PyPI.
    install = "pip install 'imgstore-ml[peers]' && pip install --no-deps 'litdata>=0.2.76'"

    def build(self, source: EpochSource, root: Path) -> None:
        import litdata

        self.root = root
        self.size = source.size
        # optimize() sets the process-wide start method (spawn by default, force=True): the DataLoader's
        # workers would then spawn and re-import torch. Fork as a DataLoader does here, and put it back after.
        previous = multiprocessing.get_start_method(allow_none=True)
        try:
            litdata.optimize(
                fn=partial(_record, source),
                inputs=list(range(len(source))),
                output_dir=str(root),
                chunk_bytes=CHUNK_BYTES,
                num_workers=1,
                start_method="fork",
                verbose=False,
            )
        finally:
            multiprocessing.set_start_method(previous, force=True)

    def files(self) -> list[Path]:
        return files_under(self.root)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        import litdata

        transform = None if self.size is None else partial(_decode_record, size=self.size)
        # LitData 0.2.76's default batch_decode="auto" decodes windows of records together: 1.2x faster at
        # 0 workers here, but 5x slower with 2 (50 000 CIFAR, batch 256: 2 000 images/s against 10 000 per
        # record), so with workers the row uses its documented per-record decoding (batch_decode=0).
        batch_decode: int | str = "auto" if num_workers == 0 else 0
        dataset = litdata.StreamingDataset(
            str(self.root), shuffle=True, seed=seed, transform=transform, batch_decode=batch_decode
        )
        return litdata.StreamingDataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_records
        )


def _record(source: EpochSource, index: int) -> dict[str, Any]:
    return {"image": source.images[index], "label": int(source.labels[index])}


def _decode_record(record: dict[str, Any], *, size: tuple[int, int]) -> dict[str, Any]:
    return {"image": decode_to_size(record["image"], size), "label": record["label"]}
