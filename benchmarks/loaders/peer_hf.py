"""Hugging Face ``datasets``: an Arrow dataset saved to disk, memory-mapped back, through a ``DataLoader``.

Raw pixels are an ``Array3D`` uint8 column read with ``with_format("numpy", dtype=np.uint8)`` on
that column (without ``dtype`` the numpy and torch formats return uint8 images as int64); encoded
images are an ``Image`` feature (the JPEG bytes), decoded by ``datasets`` with Pillow and resized
by a ``with_transform`` in the workers. Shuffled as ``datasets``' PyTorch guide shows: the
``DataLoader``'s own sampler (``shuffle=True``), which fetches each batch with ``__getitems__``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.loaders.peer_support import collate_records, files_under, pillow_array, seeded_generator


class HFDatasetsPeer(EpochLoader):
    name = "hf-datasets"
    kind = "peer"
    requires = ("datasets",)
    install = "pip install 'imgstore-ml[peers]'"

    def build(self, source: EpochSource, root: Path) -> None:
        import datasets

        self.root = root
        self.size = source.size
        if isinstance(source.images, np.ndarray):
            image: Any = datasets.Array3D(shape=source.images.shape[1:], dtype="uint8")
            column: Any = source.images
        else:
            image = datasets.Image()
            column = [{"bytes": data, "path": None} for data in source.images]
        features = datasets.Features({"image": image, "label": datasets.Value("int64")})
        table = datasets.Dataset.from_dict({"image": column, "label": source.labels}, features=features)
        enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # save_to_disk's bar would fill the benchmark's output
        try:
            table.save_to_disk(str(root))
        finally:
            if enabled:
                datasets.enable_progress_bars()

    def files(self) -> list[Path]:
        return files_under(self.root)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        import datasets

        table = datasets.load_from_disk(str(self.root))
        if self.size is None:
            table = table.with_format("numpy", columns=["image"], dtype=np.uint8, output_all_columns=True)
        else:
            table = table.with_transform(partial(_resize_batch, size=self.size))
        return DataLoader(
            table,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=seeded_generator(seed),
            collate_fn=collate_records,
        )


def _resize_batch(batch: dict[str, list[Any]], *, size: tuple[int, int]) -> dict[str, list[Any]]:
    # The Image feature hands over decoded PIL images; the transform brings them to one size.
    return {"image": [pillow_array(image, size) for image in batch["image"]], "label": batch["label"]}
