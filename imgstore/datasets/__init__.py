"""Data for imgstore: real CIFAR-10 and Fashion-MNIST files, and realistic CIFAR-shaped data made offline.

Datasets by name (:func:`load_dataset`, the benchmarks' ``--dataset``) come from the registry in
:mod:`imgstore.datasets.registry`: :func:`register_dataset` adds one.
"""

from __future__ import annotations

from imgstore.datasets.cifar10 import load_cifar10
from imgstore.datasets.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from imgstore.datasets.fashion_mnist import load_fashion_mnist
from imgstore.datasets.imagenet_like import EncodedImages, imagenet_like, write_imagenet_like_folder
from imgstore.datasets.registry import (
    DatasetSpec,
    available_datasets,
    get_dataset,
    load_dataset,
    register_dataset,
)
from imgstore.datasets.synthetic import synthetic_cifar10

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASETS",
    "DatasetSpec",
    "EncodedImages",
    "available_datasets",
    "download_cifar10",
    "get_dataset",
    "imagenet_like",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "register_dataset",
    "synthetic_cifar10",
    "write_imagenet_like_folder",
]


def __getattr__(name: str) -> tuple[str, ...]:
    # DATASETS, the names load_dataset takes, was a constant: now read from the registry when asked.
    if name == "DATASETS":
        return tuple(available_datasets())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
