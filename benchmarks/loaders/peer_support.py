"""What the peer loaders share: the Pillow decode their users write, the batch they hand back, file lists.

Not a loader itself (not in :data:`benchmarks.loaders.PEERS`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def decode_to_size(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """An encoded image decoded as torchvision's ``ImageFolder`` + ``Resize`` users do: RGB, bilinear."""
    with Image.open(io.BytesIO(data)) as image:
        return pillow_array(image, size)


def pillow_array(image: Image.Image, size: tuple[int, int] | None, mode: str = "RGB") -> np.ndarray:
    """``image`` as a uint8 ``[H, W, C]`` array, converted to ``mode`` and resized to ``size`` ``(h, w)``."""
    converted = image.convert(mode)
    if size is not None and converted.size != (size[1], size[0]):
        converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(converted)
    return array[:, :, None] if array.ndim == 2 else array


def pillow_mode(images: np.ndarray) -> str:
    """The Pillow mode of raw ``[N, H, W, C]`` pixels: RGB, or L for one channel."""
    channels = images.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"raw images need 1 or 3 channels for Pillow, got {channels}")
    return "RGB" if channels == 3 else "L"


def collate_pairs(samples: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, label)`` samples stacked into one uint8 ``[B, H, W, C]`` batch and int64 ``[B]`` labels."""
    images = np.stack([np.asarray(image) for image, _ in samples])
    labels = np.fromiter((int(label) for _, label in samples), dtype=np.int64, count=len(samples))
    return torch.from_numpy(images), torch.from_numpy(labels)


def collate_records(records: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dict records with ``image`` and ``label`` (HF datasets, LitData, Streaming) stacked as :func:`collate_pairs`."""
    return collate_pairs([(record["image"], record["label"]) for record in records])


def seeded_generator(seed: int) -> torch.Generator:
    """The generator a ``DataLoader(shuffle=True)`` draws its permutation from."""
    return torch.Generator().manual_seed(seed)


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root``, sorted (what an epoch reads from a folder-shaped format)."""
    found = [Path(folder, name) for folder, _, names in os.walk(root) for name in names]
    return sorted(path for path in found if path.is_file())
