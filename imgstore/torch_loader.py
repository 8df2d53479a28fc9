"""The batch path of :mod:`imgstore.torch`: one ``get_many`` per batch, straight into the batch tensor.

:func:`make_loader` builds a ``torch.utils.data.DataLoader`` over :class:`StoreBatches`, a dataset
indexed by a whole batch of indices, driven by a batch sampler (:mod:`imgstore.torch_samplers`)
with ``batch_size=None``: the DataLoader hands each worker a batch of indices, the worker reads
them with one ``get_many`` into one array and returns it as one tensor. There are no per-sample
tensors and no ``default_collate``. In a worker process the batch is read straight into shared
memory, images and labels in one segment, so handing it to the training process copies nothing
and costs that process one shared segment per batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from imgstore import torch_ring
from imgstore.errors import InvalidOptionError
from imgstore.opening import open_store
from imgstore.store import Store
from imgstore.torch_ring import Ring, RingLoader, SlotSampler
from imgstore.torch_samplers import BlockShuffleSampler, RandomBatchSampler, SequentialBatchSampler

Layout = Literal["hwc", "chw"]
Order = Literal["random", "block", "sequential"]
Handoff = Literal["auto", "torch", "shared"]
Batch = tuple[torch.Tensor, torch.Tensor]

#: make_loader's default block for order="block": about this many bytes of records.
BLOCK_BYTES = 4 << 20
_LABEL_ALIGN = 64


def checked_layout(layout: object, *, allow_none: bool = False) -> Layout | None:
    if layout is None and allow_none:
        return None
    if layout not in ("hwc", "chw"):
        allowed = "'hwc', 'chw' or None" if allow_none else "'hwc' or 'chw'"
        raise InvalidOptionError(f"layout must be {allowed}, got {layout!r}")
    return layout


def arrange(images: torch.Tensor, layout: Layout | None, *, batched: bool) -> torch.Tensor:
    """``images`` as stored ([B,] H, W[, C]) in ``layout``: ``hwc`` always has a channel axis
    (a gray image is [H, W, 1]); ``chw`` is a view, [C, H, W] (channels_last in memory, no copy)."""
    if layout is None:
        return images
    if images.dim() == 2 + batched:
        images = images.unsqueeze(-1)
    return images.movedim(-1, -3) if layout == "chw" else images


class ProcessStore:
    """A store handle per process: opened on first use, never pickled, reopened after ``fork()``."""

    path: Path
    verify_reads: bool
    decoder: str
    _store: Store | None = None
    _pid = 0

    @property
    def store(self) -> Store:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.path, verify_reads=self.verify_reads, decoder=self.decoder)
            self._pid = os.getpid()
        return self._store

    def close(self) -> None:
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"], state["_pid"] = None, 0  # a worker opens its own handle
        return state


class StoreBatches(ProcessStore, Dataset[Batch]):
    """``batches[indices] -> (images, labels)``: one batch of the store at ``path``, read with one ``get_many``.

    ``images`` is one ``uint8`` tensor [B, H, W, C] (``layout="chw"``: [B, C, H, W], a view in
    channels_last memory), ``labels`` ``int64`` [B]. Encoded stores decode in the process that
    reads (a DataLoader worker); images of varied shapes need ``size=(h, w)``. ``transform``, if
    given, takes and returns the images tensor of a whole batch, in the worker. The length is the
    store's when the dataset was made: records appended later are not read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layout: Layout = "hwc",
        verify_reads: bool = True,
        size: tuple[int, int] | None = None,
        decoder: str = "auto",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.path = Path(path)
        self.layout = checked_layout(layout)
        self.verify_reads = verify_reads
        self.size = size
        self.decoder = decoder
        self.transform = transform
        self.ring: Ring | None = None  # handoff="shared": batches go into its slots
        if transform is not None and not callable(transform):
            raise InvalidOptionError(f"transform must be callable, got {transform!r}")
        with open_store(self.path, verify_reads=verify_reads, decoder=decoder) as store:
            self._length = len(store)
            if size is not None and store.codec == "raw" and not store.varied:
                raise InvalidOptionError("size= resizes encoded images; this store holds raw pixels of one shape")
            if size is None and store.varied:
                raise InvalidOptionError(
                    f"{self.path} holds images of varied shapes: give size=(height, width) to decode every "
                    "image of a batch to one size"
                )
            # raw stores of one shape are read straight into shared memory in a worker
            self._shape = store.shape if store.codec == "raw" and not store.varied else None
            channels = {"RGB": 3, "L": 1}.get(store.image_mode or "")
            # the shape of every image a read gives, where it is known before reading
            self.image_shape = self._shape if size is None or channels is None else (*size, channels)
            self.record_bytes = self._record_bytes(store)

    @staticmethod
    def _record_bytes(store: Store) -> int:
        if store.shape is not None and store.codec == "raw":
            return max(1, int(np.prod(store.shape)))
        return max(1, store.disk_usage() // max(1, len(store)))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: Sequence[int] | np.ndarray | tuple[int | None, np.ndarray]) -> Any:
        """A batch ``(images, labels)``; given ``(slot, indices)`` by a ring's sampler, the batch goes
        into that slot and ``(slot, count)`` is returned (slot None: no slot was free)."""
        if isinstance(key, tuple):
            slot, idx = key[0], self._checked(key[1])
            if slot is not None:
                assert self.ring is not None
                self.store.get_many(idx, out=self.ring.arrays(slot, len(idx)), size=self.size)
                return slot, len(idx)
        else:
            idx = self._checked(key)
        store = self.store
        out = self._shared_out(len(idx)) if self._shape is not None and get_worker_info() is not None else None
        if out is not None:
            store.get_many(idx, out=(out[0].numpy(), out[1].numpy()))
            images, labels = out
        else:
            arrays, label_array = store.get_many(idx, size=self.size) if self.size else store.get_many(idx)
            images, labels = torch.from_numpy(arrays), torch.from_numpy(label_array)
        images = arrange(images, self.layout, batched=True)
        if self.transform is not None:
            images = self.transform(images)
            if not isinstance(images, torch.Tensor):  # caught here, not as a puzzle in the training loop
                raise InvalidOptionError(f"transform must return a tensor (the batch), got {type(images).__name__}")
        return images, labels

    def _checked(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise InvalidOptionError(f"StoreBatches takes a 1-D batch of indices, got shape {idx.shape}")
        if len(idx) and (int(idx.min()) < -self._length or int(idx.max()) >= self._length):
            raise IndexError(f"an index of the batch is out of range for a dataset of {self._length} images")
        return idx

    def arrange_batch(self, images: torch.Tensor) -> torch.Tensor:
        return arrange(images, self.layout, batched=True)

    def _shared_out(self, n: int) -> Batch:
        """Images and labels in one new shared-memory segment: a worker's batch goes to the training
        process as one segment, without the copy pickling a private tensor makes."""
        assert self._shape is not None
        shape = (n, *self._shape)
        image_bytes = int(np.prod(shape))
        label_at = -(-image_bytes // _LABEL_ALIGN) * _LABEL_ALIGN
        storage = torch.UntypedStorage._new_shared(label_at + 8 * n)  # type: ignore[no-untyped-call]
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        images = whole[:image_bytes].view(shape)
        labels = whole[label_at : label_at + 8 * n].view(torch.int64)
        return images, labels


def _ring_blocker(dataset: StoreBatches, transformed: bool) -> str | None:
    """Why handoff='shared' cannot apply, or None."""
    if transformed:
        return "a transform or pin_memory"
    if dataset.image_shape is None:
        return "images of a shape unknown before reading (give size= with an RGB or L image mode)"
    if not torch_ring.available():
        return "a torch without storage use counts"
    return None


def _as_is(batch: Any) -> Any:
    return batch  # a module-level function: DataLoader pickles its collate_fn for spawned workers


_RESERVED = ("batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn")


def make_loader(
    path: str | os.PathLike[str],
    batch_size: int = 256,
    shuffle: bool = True,
    num_workers: int = 2,
    *,
    seed: int | None = None,
    order: Order | None = None,
    block_size: int | None = None,
    window: int = 4,
    drop_last: bool = False,
    layout: Layout = "hwc",
    verify_reads: bool = True,
    size: tuple[int, int] | None = None,
    decoder: str = "auto",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    handoff: Handoff = "auto",
    **dataloader_kwargs: Any,
) -> DataLoader[Batch]:
    """A ``DataLoader`` over the store at ``path`` yielding ``(images, labels)`` batches.

    ``images``: one ``uint8`` tensor [B, H, W, C] (``layout="chw"``: [B, C, H, W]; gray images have
    C = 1), ``labels``: ``int64`` [B]. Each batch is one ``get_many`` (``verify_reads``: checked
    against the records' checksums) straight into the batch tensor, in a worker process when
    ``num_workers > 0``; encoded stores decode there (``size=(h, w)``: every image decoded to that
    size; needed for varied shapes; ``decoder`` picks the decoder). ``transform`` takes and
    returns a whole batch's images tensor, in the worker.

    ``order``: ``"random"`` (a uniform shuffle, the default with ``shuffle=True``), ``"block"``
    (:class:`~imgstore.torch_samplers.BlockShuffleSampler`: for stores bigger than the page cache;
    ``block_size`` records a block, default about 4 MiB of records, ``window`` blocks shuffled
    together) or ``"sequential"`` (the default with ``shuffle=False``). The order is a function of
    ``(seed, epoch)``; ``loader.sampler.set_epoch(e)`` picks the epoch, and without it each new
    iteration of the loader is the next epoch. Every record comes exactly once per epoch (with
    ``drop_last``, but for the last ``len % batch_size``); the records of a batch come in ascending
    index order. The length is the store's when the loader was made. Other keyword arguments
    (``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``multiprocessing_context``,
    ...) go to the ``DataLoader``.

    ``handoff``: how a worker's batch reaches the training process. ``"shared"``: workers write
    batches into a ring of shared buffers made once (:mod:`imgstore.torch_ring`) and send back a
    slot number, which saves the training process most of its CPU per batch; a slot is reused only
    once nothing refers to the batch in it (torch's reference count of its memory), so a batch
    stays valid as long as it is used, and a loop that keeps many batches gets torch's hand-off
    for the next ones. It needs images of a shape known before reading (raw stores of one shape;
    encoded ones with ``size`` and an RGB or L image mode), no ``transform`` and no
    ``pin_memory``. ``"torch"``: torch's own (a new shared segment per batch). ``"auto"``
    (default): ``"shared"`` where it applies, else ``"torch"``. Without workers there is no hand-off.
    """
    for name in _RESERVED:
        if name in dataloader_kwargs:
            raise InvalidOptionError(f"make_loader sets the DataLoader's {name} itself; {name}= is not accepted")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InvalidOptionError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if not isinstance(shuffle, bool):
        raise InvalidOptionError(f"shuffle must be True or False, got {shuffle!r}")
    if order is None:
        order = "random" if shuffle else "sequential"
    if order not in ("random", "block", "sequential"):
        raise InvalidOptionError(f"order must be 'random', 'block' or 'sequential', got {order!r}")
    if (order == "sequential") == shuffle:
        raise InvalidOptionError(f"order={order!r} contradicts shuffle={shuffle}")
    if handoff not in ("auto", "torch", "shared"):
        raise InvalidOptionError(f"handoff must be 'auto', 'torch' or 'shared', got {handoff!r}")
    if block_size is not None and order != "block":
        raise InvalidOptionError("block_size= applies to order='block' only")
    dataset = StoreBatches(
        path, layout=layout, verify_reads=verify_reads, size=size, decoder=decoder, transform=transform
    )
    n = len(dataset)
    sampler: Sampler[np.ndarray]
    if order == "random":
        sampler = RandomBatchSampler(n, batch_size, seed=seed, drop_last=drop_last)
    elif order == "block":
        if block_size is None:
            block_size = max(1, BLOCK_BYTES // dataset.record_bytes)
        sampler = BlockShuffleSampler(
            n, batch_size, block_size=block_size, window=window, seed=seed, drop_last=drop_last
        )
    else:
        sampler = SequentialBatchSampler(n, batch_size, seed=seed, drop_last=drop_last)
    ring_blocker = _ring_blocker(dataset, transform is not None or bool(dataloader_kwargs.get("pin_memory")))
    if handoff == "shared" and ring_blocker is not None:
        raise InvalidOptionError(f"handoff='shared' delivers batches in shared buffers; it cannot take {ring_blocker}")
    if handoff == "torch" or ring_blocker is not None or num_workers == 0:
        return DataLoader(
            dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_as_is, **dataloader_kwargs
        )
    assert dataset.image_shape is not None  # checked above
    prefetch = dataloader_kwargs.get("prefetch_factor") or 2
    # the batches a DataLoader has asked for ahead, the one the loop holds, and a few more it keeps
    ring = Ring(prefetch * num_workers + 4, batch_size, dataset.image_shape)
    dataset.ring = ring
    loader = RingLoader(
        dataset,
        batch_size=None,
        sampler=SlotSampler(sampler, ring),
        num_workers=num_workers,
        collate_fn=_as_is,
        **dataloader_kwargs,
    )
    loader.ring = ring
    return loader
