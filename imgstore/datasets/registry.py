"""Datasets by name: one :class:`DatasetSpec` each, the built-ins registered at the end of this file.

:func:`load_dataset` is the one way the library, its examples and the benchmark suite
(``--dataset NAME --dataset-root DIR``) get a dataset by name. A dataset is a loader (usually one
file beside this one) and one :func:`register_dataset` call; another package registers its own the
same way, at import.

A loader is called as ``loader(n, root=..., seed=..., split=...)`` and returns ``(images, labels)``:
images ``uint8 [N, H, W(, C)]`` and labels ``int64 [N]`` of that split. It may return the whole split
whatever ``n`` is (a real dataset) or exactly ``n`` images (a generated one; ``n`` None: its default
size); :func:`load_dataset` takes the first ``n`` or repeats the split in order to reach ``n``.
``root`` is a :class:`~pathlib.Path`, or None when the caller gave none (never for a dataset that
``needs_root``); ``seed`` is for generated datasets, the others ignore it.

An *encoded* dataset (``"imagenet-like"``: JPEG files of varied sizes) returns a list of encoded
files (``bytes``, one whole file each) in place of the images array; :func:`load_dataset` takes and
repeats that list the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from imgstore.datasets.cifar10 import load_cifar10
from imgstore.datasets.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
from imgstore.datasets.imagenet_like import INSTALL_HINT, load_imagenet_like
from imgstore.datasets.synthetic import synthetic_cifar10
from imgstore.errors import DatasetError, DatasetNotFoundError

__all__ = ["DatasetSpec", "Loader", "available_datasets", "get_dataset", "load_dataset", "register_dataset"]


class Loader(Protocol):
    def __call__(
        self, n: int | None, *, root: Path | None, seed: int, split: str
    ) -> tuple[np.ndarray | list[bytes], np.ndarray]: ...


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # what load_dataset and --dataset take
    loader: Loader
    needs_root: bool  # True: no default location; load_dataset refuses root=None with install_hint
    install_hint: str  # how to get the files (shown when they are missing), "" when nothing is needed
    description: str  # one line for help texts


_registry: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    loader: Loader,
    *,
    needs_root: bool = False,
    install_hint: str = "",
    description: str = "",
    clobber: bool = False,
) -> DatasetSpec:
    """Make ``load_dataset(name, ...)`` call ``loader``; a name that is taken raises DatasetError unless ``clobber``."""
    if not isinstance(name, str) or not name or not callable(loader):
        raise DatasetError(f"register_dataset needs a name and a callable loader, got {name!r}, {loader!r}")
    if name in _registry and not clobber:
        raise DatasetError(f"a dataset named {name!r} is registered already; pass clobber=True to replace it")
    spec = DatasetSpec(name, loader, needs_root, install_hint, description)
    _registry[name] = spec
    return spec


def available_datasets() -> list[str]:
    """Names of every registered dataset, built-ins first (their files may still be missing)."""
    return list(_registry)


def get_dataset(name: str) -> DatasetSpec:
    spec = _registry.get(name) if isinstance(name, str) else None
    if spec is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(_registry)}")
    return spec


def load_dataset(
    name: str, n: int | None = None, root: str | Path | None = None, *, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray | list[bytes], np.ndarray]:
    """The first ``n`` images and labels of dataset ``name`` (:func:`available_datasets`; all of it when ``n`` is None).

    Past the end of a real dataset its images repeat in order, as the tutorial made its 100 000
    CIFAR-10 images by doubling the 50 000. ``"synthetic"`` makes exactly ``n`` distinct images
    (default 50 000 for train, 10 000 for test) from ``seed``; its generation is batch-deterministic:
    the first k images of any larger request are the same k images. ``"cifar10"`` needs ``root``
    (see :func:`~imgstore.datasets.download_cifar10`); ``"fashion-mnist"`` defaults to Debian's files.
    ``seed`` only applies to generated datasets, ``root`` only to the real ones.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise DatasetError(f"n must be None or an integer >= 0, got {n!r}")
    spec = get_dataset(name)
    if root is None and spec.needs_root:
        raise DatasetNotFoundError(f"{name} needs root= (where its files are): {spec.install_hint}")
    images, labels = spec.loader(n, root=None if root is None else Path(root), seed=seed, split=split)
    if n is None or n == len(images):
        return images, labels
    if n < len(images):
        return images[:n].copy(), labels[:n].copy()  # copies, so the full dataset can be freed
    if len(images) == 0:
        raise DatasetError(f"{name} has no images to repeat")
    if isinstance(images, list):  # an encoded dataset's files
        return [images[i % len(images)] for i in range(n)], np.resize(labels, n)
    # np.resize repeats the whole array cyclically: image i of the result is image i % len.
    return np.resize(images, (n, *images.shape[1:])), np.resize(labels, n)


# ---------------------------------------------------------------------- the built-ins


def _synthetic(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_cifar10((50_000 if split == "train" else 10_000) if n is None else n, seed, split=split)


def _cifar10(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    assert root is not None  # needs_root
    return load_cifar10(root, split)


def _fashion_mnist(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist(DEBIAN_ROOT if root is None else root, split)


register_dataset(
    "synthetic",
    _synthetic,
    description="CIFAR-10-shaped images made offline from a seed (32x32x3, 10 balanced classes)",
)
register_dataset(
    "cifar10",
    _cifar10,
    needs_root=True,
    install_hint=(
        "a folder holding cifar-10-batches-py/ or cifar-10-batches-bin/; "
        "imgstore.datasets.download_cifar10(dest) fetches it"
    ),
    description="the real CIFAR-10 (python or binary version), 50 000 train / 10 000 test images",
)
register_dataset(
    "fashion-mnist",
    _fashion_mnist,
    install_hint=f"apt-get install dataset-fashion-mnist (files in {DEBIAN_ROOT}), or root= a folder of the IDX files",
    description="Fashion-MNIST from its IDX files (28x28 grayscale), 60 000 train / 10 000 test images",
)

register_dataset(
    "imagenet-like",
    load_imagenet_like,
    install_hint=INSTALL_HINT,
    description="ImageNet-1k-like JPEG files (sizes, bytes) made offline from packaged photos; encoded: "
    "a list of files; root= an optional cache folder",
)
