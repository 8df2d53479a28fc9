"""``make_loader(..., handoff="shared")``: workers write batches into a ring of shared buffers.

torch hands each batch from a worker to the training process as a new shared-memory segment: the
worker pickles its tensor, the training process receives a file descriptor over a socket, maps it
and rebuilds a tensor (~1-2 ms of the training process's CPU per batch on a busy 2-core machine;
several µs per CIFAR image). Here the buffers are made once, in the training process, before the
workers start: ``slots`` batches of images and labels in shared memory. Batch ``k`` of the loader's
life is written into slot ``k % slots`` and the worker sends back only ``(slot, count)``; the
training process returns views of that slot. ``slots`` is ``prefetch_factor * num_workers + 2``:
a DataLoader has at most ``prefetch_factor * num_workers`` batches requested beyond the one it
last returned, so a batch's slot is written again only once two more batches have been taken
after it.

The lifetime contract: a batch is valid until the next batch is taken from the loader (``next``);
``.clone()`` what you keep longer. One iteration of the loader at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

Batch = tuple[torch.Tensor, torch.Tensor]


class Ring:
    """``slots`` batches of ``batch_size`` images of ``shape`` (uint8) and their labels, in shared memory."""

    def __init__(self, slots: int, batch_size: int, shape: tuple[int, ...]) -> None:
        self.images = torch.empty((slots, batch_size, *shape), dtype=torch.uint8).share_memory_()  # type: ignore[no-untyped-call]
        self.labels = torch.empty((slots, batch_size), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]
        self._whole = [(self.images[k], self.labels[k]) for k in range(slots)]  # full batches: no slicing per batch

    def __getstate__(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "labels": self.labels}  # a worker needs the buffers only

    def __setstate__(self, state: dict[str, torch.Tensor]) -> None:
        self.images, self.labels = state["images"], state["labels"]
        self._whole = [(self.images[k], self.labels[k]) for k in range(len(self.images))]

    @property
    def slots(self) -> int:
        return len(self.images)

    def arrays(self, slot: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The slot's first ``count`` images and labels, as arrays to read into."""
        return self.images[slot, :count].numpy(), self.labels[slot, :count].numpy()

    def batch(self, slot: int, count: int) -> Batch:
        images, labels = self._whole[slot]
        return (images, labels) if count == len(images) else (images[:count], labels[:count])


class SlotSampler(Sampler[tuple[int, np.ndarray]]):
    """Yields ``(slot, indices)``: the batches of ``sampler``, each with the ring slot it goes to.

    Slots follow one counter over the loader's whole life (epochs and broken-off passes included),
    so consecutive batches never share a slot. ``set_epoch`` and the other attributes are ``sampler``'s.
    """

    def __init__(self, sampler: Sampler[np.ndarray], slots: int) -> None:
        self.sampler = sampler
        self.slots = slots
        self._next = 0

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for indices in self.sampler:
            slot, self._next = self._next % self.slots, self._next + 1
            yield slot, indices

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


class RingLoader(DataLoader[Batch]):
    """A ``DataLoader`` whose workers return ``(slot, count)``; iterating it gives the slot's batch."""

    ring: Ring

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        return _RingIterator(super().__iter__(), self.ring, getattr(self.dataset, "arrange_batch", None))


class _RingIterator:
    def __init__(self, inner: Iterator[Any], ring: Ring, arrange: Any) -> None:
        self._inner, self._ring, self._arrange = inner, ring, arrange

    def __iter__(self) -> _RingIterator:
        return self

    def __next__(self) -> Batch:
        slot, count = next(self._inner)
        images, labels = self._ring.batch(slot, count)
        return (self._arrange(images) if self._arrange is not None else images), labels

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]
