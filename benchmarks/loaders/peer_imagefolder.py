"""The status quo: one image file per record in class folders, read one file at a time with Pillow.

torchvision's ``ImageFolder`` does not import beside this machine's CPU torch, so this is its loop
written out: folders scanned as ``ImageFolder.make_dataset`` does (sorted classes, sorted files),
``PIL.Image.open(path).convert("RGB")`` per sample (resized for encoded data, as a ``Resize``
transform would), ``DataLoader(shuffle=True)`` with default collation. Raw pixels are written as
PNG files, as the tutorial and torchvision users do; encoded images are the JPEG files themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.loaders.peer_support import collate_pairs, files_under, pillow_array, pillow_mode, seeded_generator


class FolderDataset(Dataset[tuple[np.ndarray, int]]):
    """``ImageFolder``'s per-file Pillow loop: open, convert, resize, one sample at a time."""

    def __init__(self, root: Path, *, mode: str, size: tuple[int, int] | None) -> None:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.samples = [
            (os.path.join(root, name, file), int(name))
            for name in classes
            for file in sorted(os.listdir(os.path.join(root, name)))
        ]
        self.mode = mode
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return pillow_array(image, self.size, self.mode), label


class ImageFolderPeer(EpochLoader):
    name = "imagefolder"
    kind = "peer"
    requires = ("PIL",)
    install = "pip install Pillow"

    def build(self, source: EpochSource, root: Path) -> None:
        self.root = root
        self.size = source.size
        self.mode = "RGB"
        if isinstance(source.images, np.ndarray):
            self.mode = pillow_mode(source.images)
        for index, label in enumerate(source.labels.tolist()):
            # Zero-padded class folders: sorted by name is sorted by label (ImageFolder sorts names).
            folder = root / f"{label:06d}"
            folder.mkdir(exist_ok=True)
            if isinstance(source.images, np.ndarray):
                pixels = source.images[index]
                Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[:, :, 0]).save(folder / f"{index:08d}.png")
            else:
                (folder / f"{index:08d}.jpg").write_bytes(source.images[index])

    def files(self) -> list[Path]:
        return files_under(self.root)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        dataset = FolderDataset(self.root, mode=self.mode, size=self.size)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=seeded_generator(seed),
            collate_fn=collate_pairs,
        )
