"""imgstore's epoch rows: one per installed backend that can hold the dataset, read through a DataLoader.

Each row writes the source with ``put_many`` (raw pixels) or ``put_encoded_many`` (files as they
are, ``codec="keep"``) and reads one epoch through :func:`make_torch_loader`, the one place that
says how imgstore is used for training (the loader the library recommends).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import imgstore
from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.pagecache import files_under


def make_torch_loader(
    path: Path, *, batch_size: int, num_workers: int, seed: int, size: tuple[int, int] | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """imgstore's recommended training loader over the store at ``path`` (the fastest decoder for files)."""
    from imgstore.torch import make_loader

    return make_loader(path, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed, size=size)


class ImgstoreLoader(EpochLoader):
    kind = "imgstore"
    backend = ""

    def build(self, source: EpochSource, root: Path) -> None:
        self.path, self.size = root / "store", source.size
        self._loaders: dict[tuple[int, int], Any] = {}
        root.mkdir(parents=True, exist_ok=True)
        if isinstance(source.images, list):
            with imgstore.open_store(self.path, self.backend, "w", codec="keep", image_mode="RGB") as store:
                store.put_encoded_many(source.images, source.labels)
        else:
            with imgstore.open_store(self.path, self.backend, "w") as store:
                store.put_many(source.images, source.labels)

    def files(self) -> list[Path]:
        return files_under(self.path)

    def loader(self, *, batch_size: int, num_workers: int, seed: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        key = (batch_size, num_workers)
        if key not in self._loaders:  # one DataLoader a setting, iterated once an epoch, as a training loop does
            self._loaders[key] = make_torch_loader(
                self.path, batch_size=batch_size, num_workers=num_workers, seed=seed, size=self.size
            )
        return self._loaders[key]  # type: ignore[no-any-return]

    def close(self) -> None:
        for loader in self._loaders.values():
            close = getattr(getattr(loader, "dataset", None), "close", None)
            if callable(close):
                close()  # the main process's store handle (num_workers=0): its map pins pages
        self._loaders.clear()


def imgstore_loader(backend: str) -> type[ImgstoreLoader]:
    """The row class of ``backend``: ``imgstore-<backend>``."""
    return type(f"Imgstore_{backend}", (ImgstoreLoader,), {"name": f"imgstore-{backend}", "backend": backend})
