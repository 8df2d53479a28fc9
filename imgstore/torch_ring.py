"""``make_loader``'s shared hand-off: workers write batches into a ring of shared buffers.

torch hands each batch from a worker to the training process as a new shared-memory segment: the
worker pickles its tensor, the training process receives a file descriptor over a socket, maps it
and rebuilds a tensor (~1-2 ms of the training process's CPU per batch on a busy 2-core machine:
several µs per CIFAR image). Here the buffers are made once, in the training process, before the
workers start: ``slots`` batches of images and labels, one shared segment per slot. When the
DataLoader asks for a batch, the training process picks a free slot and the worker reads the batch
straight into it and sends back only ``(slot, count)``; the training process returns new views of
the slot.

A slot is free when nothing but the ring refers to its memory: torch counts the references to a
storage (every tensor, view, or NumPy array made from the batch holds one), and a batch on its way
holds one too. So a batch stays valid for as long as anything refers to it, whatever the loop
does; when no slot is free (a loop that keeps many batches) the batch takes torch's own hand-off.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

Batch = tuple[torch.Tensor, torch.Tensor]
_ALIGN = 64
# References to a storage (torch's C++ use count): private, so the ring is used only where it exists.
_use_count: Any = getattr(torch._C, "_storage_Use_Count", None)


def available() -> bool:
    return _use_count is not None


class _Flight:
    """The slots one pass of the sampler has handed to workers and the loop has not taken yet; each
    holds a reference to its slot, so a slot being written is never free. Dropped with the pass."""

    def __init__(self) -> None:
        self.tokens: dict[int, torch.Tensor] = {}


class Ring:
    """``slots`` batches of ``batch_size`` images of ``shape`` (uint8) and their labels, in shared memory."""

    def __init__(self, slots: int, batch_size: int, shape: tuple[int, ...]) -> None:
        image_bytes = batch_size * int(np.prod(shape))
        label_at = -(-image_bytes // _ALIGN) * _ALIGN
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._cdata: list[int] = []
        # torch keeps one Python object per storage and hands it out again (tensor.untyped_storage(),
        # .storage()), and it holds no use count: the ring keeps it, and counts references to it too.
        self._storages: list[torch.UntypedStorage] = []
        for _ in range(slots):
            storage = torch.UntypedStorage._new_shared(label_at + 8 * batch_size)  # type: ignore[no-untyped-call]
            whole = torch.empty(0, dtype=torch.uint8).set_(storage)
            self.images.append(whole[:image_bytes].view(batch_size, *shape))
            self.labels.append(whole[label_at : label_at + 8 * batch_size].view(torch.int64))
            self._cdata.append(storage._cdata)
            self._storages.append(storage)
        del storage, whole  # the ring's own references are its views and storages only
        self._own = [self._references(slot) for slot in range(slots)] if available() else []
        self._flights: weakref.WeakSet[_Flight] = weakref.WeakSet()
        self._next = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels}  # a worker needs the buffers only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.images, self.labels = state["images"], state["labels"]

    @property
    def slots(self) -> int:
        return len(self.images)

    def take(self, flight: _Flight) -> int | None:
        """A slot nothing refers to, now held by ``flight`` until :meth:`batch` hands it out; or None."""
        for k in range(self._next, self._next + self.slots):
            slot = k % self.slots
            if self._references(slot) == self._own[slot]:
                flight.tokens[slot] = self.labels[slot][:0]
                self._next = slot + 1
                return slot
        return None

    def _references(self, slot: int) -> tuple[int, int]:
        return _use_count(self._cdata[slot]), sys.getrefcount(self._storages[slot])

    def flight(self) -> _Flight:
        flight = _Flight()
        self._flights.add(flight)
        return flight

    def arrays(self, slot: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The slot's first ``count`` images and labels, as arrays to read into (in a worker)."""
        return self.images[slot][:count].numpy(), self.labels[slot][:count].numpy()

    def batch(self, slot: int, count: int) -> Batch:
        """New views of the slot's batch (they keep it from reuse), and the slot's token let go."""
        batch = self.images[slot][:count], self.labels[slot][:count]
        for flight in list(self._flights):
            flight.tokens.pop(slot, None)
        return batch


class SlotSampler(Sampler[tuple[int | None, np.ndarray]]):
    """Yields ``(slot, indices)``: the batches of ``sampler``, each with a free ring slot (or None:
    torch's hand-off). ``set_epoch`` and the other attributes are ``sampler``'s."""

    def __init__(self, sampler: Sampler[np.ndarray], ring: Ring) -> None:
        self.sampler = sampler
        self.ring = ring

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int | None, np.ndarray]]:
        # The DataLoader's iterator owns this generator; a new pass drops it, and with it the
        # tokens of batches never taken, only after the old workers are done (persistent workers
        # are drained first; others are shut down with their iterator).
        flight = self.ring.flight()
        for indices in self.sampler:
            yield self.ring.take(flight), indices

    def __getattr__(self, name: str) -> Any:
        if name in ("sampler", "ring"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


class RingLoader(DataLoader[Batch]):
    """A ``DataLoader`` whose workers return ``(slot, count)`` (or a batch); iterating it gives batches."""

    ring: Ring

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        return _RingIterator(super().__iter__(), self.ring, getattr(self.dataset, "arrange_batch", None))


# torch's DataLoader iterator wraps each batch in a profiler range (record_function), ~20% of the
# training process's CPU a batch here; while no profiler runs its inner step is called instead. Private
# names of torch: used only where they all exist, and never while a profiler (which wants the range) runs.
_STEP_NAMES = ("_next_data", "_sampler_iter", "_num_yielded")
_profiler_enabled: Any = getattr(torch._C._autograd, "_profiler_enabled", None)


class _RingIterator:
    def __init__(self, inner: Iterator[Any], ring: Ring, arrange: Any) -> None:
        self._inner, self._ring, self._arrange = inner, ring, arrange
        self._step: Any = None
        if _profiler_enabled is not None and all(hasattr(inner, name) for name in _STEP_NAMES):
            self._step = inner._next_data  # type: ignore[attr-defined]

    def __iter__(self) -> _RingIterator:
        return self

    def __next__(self) -> Batch:
        inner: Any = self._inner
        if self._step is not None and inner._sampler_iter is not None and not _profiler_enabled():
            first, second = self._step()
            inner._num_yielded += 1
        else:
            first, second = next(inner)
        if isinstance(first, torch.Tensor):
            return first, second  # no slot was free: torch's hand-off, arranged in the worker
        images, labels = self._ring.batch(first, second)
        return (self._arrange(images) if self._arrange is not None else images), labels

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]
