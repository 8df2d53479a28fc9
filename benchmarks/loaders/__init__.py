"""Training loaders the ``epoch`` rows measure: imgstore's, the peers people use instead, the limit.

An epoch loader is one file in this package and one entry in :data:`PEERS` (or, for imgstore, one
row per registered backend). Each is used the way its own documentation recommends, with its own
shuffling, and yields one shuffled epoch of ``(images, labels)`` batches: ``images`` a
``torch.uint8`` tensor ``[B, H, W, C]``, ``labels`` an ``int64`` tensor ``[B]``. The ``epoch``
operation builds it untimed (:meth:`EpochLoader.build`), evicts :meth:`EpochLoader.files` from the
page cache for a cold round, times the epoch and checks, untimed, that every record came exactly
once. A loader whose library is missing, or does not import here, is skipped with its install hint.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EpochSource:
    """What a loader is built from: raw pixels ``[N, H, W, C]`` or encoded files, and their labels.

    For encoded files ``size`` is the ``(height, width)`` every image is decoded to (so batches stack).
    """

    name: str
    images: np.ndarray | list[bytes]
    labels: np.ndarray
    size: tuple[int, int] | None = None

    @property
    def encoded(self) -> bool:
        return isinstance(self.images, list)

    def __len__(self) -> int:
        return len(self.labels)


class EpochLoader(ABC):
    name: ClassVar[str]  # the row's name: "limit", "imgstore-lmdb", "webdataset", ...
    kind: ClassVar[str]  # "limit", "imgstore" or "peer"
    exact_epoch: ClassVar[bool] = True  # False: a streaming loader that may repeat or drop records
    requires: ClassVar[tuple[str, ...]] = ()  # modules that must import, else the row is skipped
    install: ClassVar[str] = ""  # the hint printed when one does not

    @abstractmethod
    def build(self, source: EpochSource, root: Path) -> None:
        """Write ``source`` in this system's format under the empty folder ``root`` (untimed)."""

    @abstractmethod
    def files(self) -> list[Path]:
        """Every file an epoch reads: evicted from the page cache before a cold round."""

    @abstractmethod
    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh iterable over one shuffled epoch (its own shuffling, seeded)."""

    def close(self) -> None:
        """Release what ``build`` or ``loader`` opened (worker pools, handles, maps).

        Also called before every cold round (a page mapped by a process cannot leave the page
        cache), so ``loader`` must work again after it. ``loader`` may return the same iterable
        each call: a new ``iter()`` is a new epoch, as in a training loop."""


def missing_requirement(cls: type[EpochLoader]) -> str | None:
    """Why ``cls`` cannot run here (a module that does not import, and the hint), or None."""
    for module in cls.requires:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure (e.g. a wrong torch) skips the row
            return f"{cls.name}: {module} does not import ({type(exc).__name__}: {exc}); {cls.install}"
    return None


# The peers: name -> "module:Class", imported only when their row runs.
PEERS: dict[str, str] = {
    "imagefolder": "benchmarks.loaders.peer_imagefolder:ImageFolderPeer",
    "webdataset": "benchmarks.loaders.peer_webdataset:WebDatasetPeer",
    "mosaicml-streaming": "benchmarks.loaders.peer_streaming:StreamingPeer",
    "litdata": "benchmarks.loaders.peer_litdata:LitDataPeer",
    "hf-datasets": "benchmarks.loaders.peer_hf:HFDatasetsPeer",
}


def load_peer(name: str) -> type[EpochLoader]:
    module, _, attribute = PEERS[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if not (isinstance(cls, type) and issubclass(cls, EpochLoader)):
        raise TypeError(f"{PEERS[name]} is not an EpochLoader")
    return cls
