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
    """The first ``n`` images and labels of dataset ``name`` (one of :data:`DATASETS`; all of it when ``n`` is None).

    Past the end of a real dataset its images repeat in order, as the tutorial made its 100 000
    CIFAR-10 images by doubling the 50 000. ``"synthetic"`` makes exactly ``n`` distinct images
    (default 50 000 for train, 10 000 for test) from ``seed``; its generation is batch-deterministic:
    the first k images of any larger request are the same k images. ``"cifar10"`` needs ``root``
    (see :func:`download_cifar10`); ``"fashion-mnist"`` defaults to Debian's files. ``seed`` only
    applies to ``"synthetic"``, ``root`` only to the real datasets.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise DatasetError(f"n must be None or an integer >= 0, got {n!r}")
    if name == "synthetic":
        return synthetic_cifar10((50_000 if split == "train" else 10_000) if n is None else n, seed, split=split)
    if name == "cifar10":
        if root is None:
            raise DatasetNotFoundError(
                "cifar10 needs root= (a folder holding cifar-10-batches-py/ or cifar-10-batches-bin/); "
                "imgstore.datasets.download_cifar10(dest) fetches it"
            )
        images, labels = load_cifar10(root, split)
    elif name == "fashion-mnist":
        images, labels = load_fashion_mnist(DEBIAN_ROOT if root is None else root, split)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if n is None or n == len(images):
        return images, labels
    if n < len(images):
        return images[:n].copy(), labels[:n].copy()  # copies, so the full dataset can be freed
    if len(images) == 0:
        raise DatasetError(f"{name} has no images to repeat")
    # np.resize repeats the whole array cyclically: image i of the result is image i % len.
    return np.resize(images, (n, *images.shape[1:])), np.resize(labels, n)
