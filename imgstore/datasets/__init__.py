"""Data for imgstore: real CIFAR-10 and Fashion-MNIST files, and realistic CIFAR-shaped data made offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgstore.datasets.cifar10 import load_cifar10
from imgstore.datasets.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from imgstore.datasets.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
from imgstore.datasets.synthetic import synthetic_cifar10
from imgstore.errors import DatasetError, DatasetNotFoundError

DATASETS = ("synthetic", "cifar10", "fashion-mnist")

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASETS",
    "download_cifar10",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "synthetic_cifar10",
]


def load_dataset(
    name: str, n: int | None = None, *, root: str | Path | None = None, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images and labels of a dataset (all of it when ``n`` is None).

    Past the end of a real dataset its images repeat, as the tutorial made its 100 000 CIFAR images
    by doubling the 50 000. ``"synthetic"`` makes exactly ``n`` (default 50 000) distinct images from
    ``seed``, and the first k of any larger request are the same k images.
    """
    if name == "synthetic":
        return synthetic_cifar10(50_000 if n is None else n, seed)
    if name == "cifar10":
        if root is None:
            raise DatasetNotFoundError("cifar10 needs root= (a folder from imgstore.datasets.download_cifar10)")
        images, labels = load_cifar10(root, split)
    elif name == "fashion-mnist":
        images, labels = load_fashion_mnist(DEBIAN_ROOT if root is None else root, split)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if n is None or n <= len(images):
        return images[:n].copy(), labels[:n].copy()
    reps = -(-n // len(images))
    return np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]
