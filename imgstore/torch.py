"""PyTorch integration: a ``DataLoader`` over a store, safe in worker processes.

:func:`make_loader` is the fast path: a ``DataLoader`` that reads each batch with one
``get_many`` straight into the batch tensor (:mod:`imgstore.torch_loader`), in the order of a
batch sampler (:mod:`imgstore.torch_samplers`: uniform, block-shuffled or sequential).
:class:`StoreDataset` is the map-style dataset of samples for a ``DataLoader`` of your own.

Needs the ``torch`` extra (``pip install 'imgstore-ml[torch]'``; see the README for the CPU
build). Each process opens its own store handle on first use: the datasets pickle without one
(spawn, forkserver), and a handle inherited through ``fork()`` is never used (the store reopens
itself), so it does not matter whether the parent read from the store before the workers started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgstore.errors import InvalidOptionError, MissingDependencyError
from imgstore.opening import open_store

try:
    import torch
    from torch.utils.data import Dataset
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError(f"imgstore.torch needs PyTorch: pip install 'imgstore-ml[torch]' ({exc})") from exc

from imgstore.torch_loader import Layout, ProcessStore, StoreBatches, arrange, checked_layout, make_loader
from imgstore.torch_samplers import BlockShuffleSampler, RandomBatchSampler, SequentialBatchSampler

__all__ = [
    "BlockShuffleSampler",
    "RandomBatchSampler",
    "SequentialBatchSampler",
    "StoreBatches",
    "StoreDataset",
    "make_loader",
]

Output = Literal["tensor", "numpy"]


class StoreDataset(ProcessStore, Dataset[tuple[Any, Any]]):
    """``dataset[i] -> (image, label)`` for every record of the store at ``path``.

    ``output="tensor"`` gives ``torch.uint8`` tensors shaped like the stored images (H, W[, C]);
    ``"numpy"`` gives arrays. ``layout="hwc"`` gives every image a channel axis ([H, W, C], gray
    [H, W, 1]); ``"chw"`` gives [C, H, W], torchvision models' layout (a view, no copy). An
    encoded store decodes each image (HWC, to the store's ``image_mode``) with ``decoder``;
    ``size=(h, w)`` decodes straight to that size (JPEG's reduced-size decode), so images of
    varied shapes batch with the default collate. ``transform`` and ``target_transform`` are
    applied per sample, after conversion. A batched fetch (``__getitems__``, used by
    ``DataLoader`` with a batch size) reads the whole batch with one ``get_many``. Every record
    read is checked against its checksum unless ``verify_reads=False`` (see
    :func:`imgstore.open_store`). :func:`make_loader` is faster: no per-sample tensors, no collate.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        output: Output = "tensor",
        verify_reads: bool = True,
        size: tuple[int, int] | None = None,
        decoder: str = "auto",
        layout: Layout | None = None,
    ) -> None:
        if output not in ("tensor", "numpy"):
            raise InvalidOptionError(f"output must be 'tensor' or 'numpy', got {output!r}")
        self.path = Path(path)
        self.transform = transform
        self.target_transform = target_transform
        self.output = output
        self.verify_reads = verify_reads
        self.size = size
        self.decoder = decoder
        self.layout = checked_layout(layout, allow_none=True)
        # Fail now, in the parent, if the store is missing or damaged, or size/decoder do not apply.
        with open_store(self.path, verify_reads=verify_reads, decoder=decoder) as store:
            self._length = len(store)
            if size is not None and store.codec == "raw" and not store.varied:
                raise InvalidOptionError("size= resizes encoded images; this store holds raw pixels of one shape")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} is out of range for a dataset of {self._length} images")
        if self.size is not None:
            images, labels = self.store.get_many([index], size=self.size)
            return self._sample(images[0], int(labels[0]))
        image, label = self.store.get(index)
        return self._sample(image, label)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any]]:
        idx = np.asarray(indices, dtype=np.int64)
        # size= only where given: a raw store of one shape refuses it
        images, labels = self.store.get_many(idx, size=self.size) if self.size else self.store.get_many(idx)
        return [self._sample(image, label) for image, label in zip(images, labels.tolist(), strict=False)]

    def _sample(self, image: np.ndarray, label: int) -> tuple[Any, Any]:
        sample: Any = torch.from_numpy(image) if self.output == "tensor" else image
        if self.layout is not None and self.output == "tensor":
            sample = arrange(sample, self.layout, batched=False)
        elif self.layout is not None:
            sample = _arrange_array(image, self.layout)
        if self.transform is not None:
            sample = self.transform(sample)
        target: Any = self.target_transform(label) if self.target_transform is not None else label
        return sample, target


def _arrange_array(image: np.ndarray, layout: Layout) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    return np.moveaxis(image, -1, 0) if layout == "chw" else image
