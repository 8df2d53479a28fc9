"""imgstore's epoch rows: one per installed backend that can hold the dataset, read through a DataLoader.

Each row writes the source with ``put_many`` (raw pixels) or ``put_encoded_many`` (files as they
are, ``codec="keep"``) and reads one epoch through :func:`make_torch_loader`, the one place that
says how imgstore is used for training (the loader the library recommends).

Encoded files also get a row ``imgstore-<backend>-downscaled``: the store ``imgstore convert
--codec jpeg --quality 90 --downscale N`` makes (the shorter side N, as torchvision's ``Resize(N)``;
FFCV's ``max_resolution`` and quality 90 do the same), with N the epoch's decode size: a training
run that decodes to 160 px need not decode a 500 px file every epoch. Its pixels are not the
files' own (a resize and a JPEG re-encode; the epoch's check still compares them with each file's
decode); the same-files rows stay beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

import imgstore
from benchmarks.loaders import EpochLoader, EpochSource
from benchmarks.pagecache import files_under
from imgstore.convert import convert
from imgstore.sources import memory_source

DOWNSCALED = "downscaled"  # the name of the downscaled rows' variant: imgstore-<backend>-downscaled
DOWNSCALED_QUALITY = 90  # FFCV's default JPEG quality for its ImageNet files


def make_torch_loader(
    path: Path, *, batch_size: int, num_workers: int, seed: int, size: tuple[int, int] | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """imgstore's recommended training loader over the store at ``path`` (the fastest decoder for files)."""
    from imgstore.torch import make_loader

    return make_loader(path, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed, size=size)


class ImgstoreLoader(EpochLoader):
    kind = "imgstore"
    backend = ""
    downscaled: ClassVar[bool] = False  # encoded files: converted to JPEG at the decode size first (module doc)

    def build(self, source: EpochSource, root: Path) -> None:
        self.path, self.size = root / "store", source.size
        self._loaders: dict[tuple[int, int], Any] = {}
        root.mkdir(parents=True, exist_ok=True)
        if isinstance(source.images, list) and self.downscaled:
            assert source.size is not None
            convert(
                memory_source(f"epoch files ({len(source)} images)", source.images, source.labels),
                self.path,
                backend=self.backend,
                codec="jpeg",
                quality=DOWNSCALED_QUALITY,
                image_mode="RGB",
                downscale=min(source.size),
                progress=False,
            )
        elif isinstance(source.images, list):
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


def imgstore_loader(backend: str, downscaled: bool = False) -> type[ImgstoreLoader]:
    """The row class of ``backend``: ``imgstore-<backend>``, or ``imgstore-<backend>-downscaled``."""
    name = f"imgstore-{backend}" + (f"-{DOWNSCALED}" if downscaled else "")
    attributes = {"name": name, "backend": backend, "downscaled": downscaled}
    return type(f"Imgstore_{backend}" + ("_downscaled" if downscaled else ""), (ImgstoreLoader,), attributes)


def loader_for_name(name: str) -> type[ImgstoreLoader]:
    """The class of the row called ``name`` (``imgstore-<backend>`` or ``imgstore-<backend>-downscaled``)."""
    backend, _, variant = name.removeprefix("imgstore-").partition("-")
    if variant not in ("", DOWNSCALED):
        raise ValueError(f"no imgstore epoch row {name!r}")
    return imgstore_loader(backend, downscaled=variant == DOWNSCALED)
