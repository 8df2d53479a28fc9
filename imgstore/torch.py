"""PyTorch integration: a map-style ``Dataset`` over a store, safe in ``DataLoader`` worker processes.

Needs the ``torch`` extra (``pip install 'imgstore-ml[torch]'``). Each process opens its own
store handle on first use: the dataset pickles without one (spawn, forkserver), and a handle
inherited through ``fork()`` is never used (the store reopens itself), so it does not matter
whether the parent read from the store before the workers started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgstore.errors import InvalidOptionError, MissingDependencyError
from imgstore.opening import open_store
from imgstore.store import Store

try:
    import torch
    from torch.utils.data import Dataset
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependencyError(f"imgstore.torch needs PyTorch: pip install 'imgstore-ml[torch]' ({exc})") from exc

Output = Literal["tensor", "numpy"]


class StoreDataset(Dataset[tuple[Any, Any]]):
    """``dataset[i] -> (image, label)`` for every record of the store at ``path``.

    ``output="tensor"`` gives ``torch.uint8`` tensors shaped like the stored images (H, W[, C]);
    ``"numpy"`` gives arrays. An encoded store decodes each image (HWC, to the store's
    ``image_mode``) with ``decoder``; ``size=(h, w)`` decodes straight to that size (JPEG's
    reduced-size decode), so images of varied shapes batch with the default collate.
    ``transform`` and ``target_transform`` are applied per sample, after conversion. A batched
    fetch (``__getitems__``, used by ``DataLoader`` with a batch size) reads the whole batch with
    one ``get_many``. Every record read is checked against its checksum unless
    ``verify_reads=False`` (see :func:`imgstore.open_store`).
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
        # Fail now, in the parent, if the store is missing or damaged, or size/decoder do not apply.
        with open_store(self.path, verify_reads=verify_reads, decoder=decoder) as store:
            self._length = len(store)
            if size is not None and store.codec == "raw" and not store.varied:
                raise InvalidOptionError("size= resizes encoded images; this store holds raw pixels of one shape")
        self._store: Store | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self._length

    @property
    def store(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            # this process's own reader
            self._store = open_store(self.path, verify_reads=self.verify_reads, decoder=self.decoder)
            self._pid = os.getpid()
        return self._store

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
        if self.transform is not None:
            sample = self.transform(sample)
        target: Any = self.target_transform(label) if self.target_transform is not None else label
        return sample, target

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"], state["_pid"] = None, 0  # a worker opens its own handle
        return state
