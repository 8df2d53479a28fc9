"""The LIMIT of a training epoch: one memory-mapped file, a batch sampler, one sorted gather per batch.

Raw pixels: ``images.npy`` (``[N, H, W, C]`` uint8) opened with ``np.load(mmap_mode="r")`` in each
process, labels in ``labels.npy`` (8 bytes an image, loaded whole). A shuffling ``BatchSampler``
hands the ``DataLoader`` lists of 256 indices; each is sorted and gathered with one fancy index
(``memmap[sorted]``: one pass over the file in ascending order), so no format, no per-image call and
no collate stand between the file and the batch tensor. Encoded files (imagenet-like): the files
back to back in ``files.raw`` with their ends in ``ends.npy``; a batch slices them out of the map
and decodes them to ``source.size`` with the fastest installed decoder (``decode_many``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from benchmarks.loaders import EpochLoader, EpochSource


class _Gather(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``dataset[indices] -> (images, labels)`` of a whole batch; the map is opened in each process."""

    def __init__(self, root: Path, size: tuple[int, int] | None) -> None:
        self.root, self.size = root, size
        self._pid = 0
        self._maps: tuple[Any, ...] = ()

    def _open(self) -> tuple[Any, ...]:
        if self._pid != os.getpid():  # a worker maps the file itself
            labels = np.load(self.root / "labels.npy")
            if self.size is None:
                self._maps = (np.load(self.root / "images.npy", mmap_mode="r"), labels)
            else:
                ends = np.load(self.root / "ends.npy")
                self._maps = (np.memmap(self.root / "files.raw", np.uint8, "r"), labels, ends)
            self._pid = os.getpid()
        return self._maps

    def close(self) -> None:
        self._maps, self._pid = (), 0

    def __len__(self) -> int:
        return len(self._open()[1])

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(np.asarray(indices, dtype=np.int64))
        maps = self._open()
        if self.size is None:
            images = maps[0][order]  # one ascending pass over the file
        else:
            from imgstore.codecs import decode_many, resolve_decoder

            data, ends = maps[0], maps[2]
            starts = np.concatenate([[0], ends[:-1]])
            blobs = [memoryview(data[starts[i] : ends[i]]) for i in order]
            images = decode_many(blobs, mode="RGB", size=self.size, decoder=resolve_decoder("auto"))
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(maps[1][order])


class LimitLoader(EpochLoader):
    name = "limit"
    kind = "limit"

    def build(self, source: EpochSource, root: Path) -> None:
        self.root, self.size = root, source.size
        self._loaders: dict[tuple[int, int], DataLoader[Any]] = {}
        root.mkdir(parents=True, exist_ok=True)
        np.save(root / "labels.npy", np.asarray(source.labels, dtype=np.int64))
        if isinstance(source.images, list):
            with open(root / "files.raw", "wb") as out:
                for blob in source.images:
                    out.write(blob)
            np.save(root / "ends.npy", np.cumsum([len(blob) for blob in source.images], dtype=np.int64))
        else:
            np.save(root / "images.npy", np.ascontiguousarray(source.images, dtype=np.uint8))

    def files(self) -> list[Path]:
        return sorted(path for path in self.root.iterdir() if path.is_file())

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        key = (batch_size, num_workers)
        if key not in self._loaders:  # one DataLoader a setting, iterated once an epoch, as a training loop does
            dataset = _Gather(self.root, self.size)
            count = len(np.load(self.root / "labels.npy"))
            order = RandomSampler(range(count), generator=torch.Generator().manual_seed(seed))
            # batch_size=None: each list of indices is one fetch, no collate
            self._loaders[key] = DataLoader(
                dataset,
                batch_size=None,
                sampler=BatchSampler(order, batch_size, drop_last=False),
                num_workers=num_workers,
            )
        return self._loaders[key]

    def close(self) -> None:
        for loader in self._loaders.values():
            loader.dataset.close()  # type: ignore[attr-defined]
        self._loaders.clear()
