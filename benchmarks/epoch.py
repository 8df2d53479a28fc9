"""The ``epoch`` operation's machinery: its rows, its source data, one timed round, and the exact-epoch check.

An epoch row is a training loader (``benchmarks/loaders``: the LIMIT, one imgstore row per installed
backend that holds the dataset, every registered peer) at a number of ``DataLoader`` workers, warm
or cold. Its store is built once a session (untimed) and every round is one shuffled epoch of
batches of :data:`~benchmarks.operations.BATCH_SIZE`, timed from ``iter(loader)`` (workers start
there) to the last batch. Beside the time, each round records the time to the first batch and the
CPU seconds the main process spent (``time.process_time``: what a training loop loses to loading).

The check, untimed, after every round: the batches are ``uint8 [B, H, W, C]`` and ``int64 [B]``, and
the epoch delivered every record exactly once. Raw pixels: the multiset of (label, XXH3 of 64
bytes sampled across the image) equals the source's. Decoded files (imagenet-like): each record carries its index as
its label (an int64 like a class label), so the labels must be exactly ``0 .. N-1``, and a sample of
images must look like the decode of the file their label names (8x8 block means within
:data:`MAX_THUMB_ERROR` levels: every decoder and resize filter passes, another image does not).
The timed loop keeps only copies of what the check needs (:func:`keep`: the labels, 64 bytes spread
over each image, a batch's first image): never the batches, whose memory a loader may reuse.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash

from benchmarks.loaders import PEERS, EpochLoader, EpochSource, load_peer
from benchmarks.loaders.imgstore_rows import imgstore_loader
from benchmarks.loaders.limit import LimitLoader

WORKERS = (0, 2)  # DataLoader num_workers of the epoch rows
CACHES = ("warm", "cold")
# imagenet-like files are decoded to this size in every row (a square resize, as a training
# pipeline's Resize((h, w)) does; 160 px is the low-resolution phase of fast ResNet-50 recipes, and
# lets a JPEG decode at half scale)
DECODE_SIZE = (160, 160)
MAX_THUMB_ERROR = 16.0  # mean absolute difference of 8x8 block means, in levels of 255
THUMB_SAMPLE = 8  # images compared with their file's decode, per round
SEED = 0
SMOKE_BELOW = 1_000  # fewer images: a smoke run (see loader_classes)
SMOKE_BACKENDS = ("lmdb", "hdf5")


def epoch_rounds(n: int, encoded: bool) -> int:
    """Timed rounds of an epoch row at ``n`` images (after one untimed warmup epoch): a round with workers
    costs their start (~0.3 s here) even at 10 images, so few; 2 where an epoch takes seconds, or is a
    smoke test (below SMOKE_BELOW images: one batch or a few)."""
    if n < SMOKE_BELOW:
        return 2
    if encoded:
        return 3 if n <= 1_000 else 2
    return 3 if n <= 50_000 else 2


def loader_classes(backends: list[str], encoded: bool, n: int) -> list[type[EpochLoader]]:
    """The rows of a dataset at ``n`` images: the LIMIT, imgstore per backend that holds it, then every peer.

    Below SMOKE_BELOW images (a smoke run) the imgstore rows are those of SMOKE_BACKENDS asked for: an epoch
    of a few batches measures nothing, and every backend's DataLoader path is tested in tests/test_torch.py.
    """
    from benchmarks.encoded import supports_encoded

    if n < SMOKE_BELOW:
        backends = [b for b in backends if b in SMOKE_BACKENDS] or backends[:1]
    stores = [imgstore_loader(b) for b in backends if not encoded or supports_encoded(b)]
    if encoded:  # and each as the store a training run at the decode size would make (imgstore_rows doc)
        stores += [imgstore_loader(b, downscaled=True) for b in backends if supports_encoded(b)]
    return [LimitLoader, *stores, *(load_peer(name) for name in PEERS)]


def epoch_source(name: str, images: Any, labels: np.ndarray) -> EpochSource:
    """What every row of a dataset is built from; decoded files carry their index as label (module doc)."""
    if isinstance(images, list):
        return EpochSource(name, images, np.arange(len(images), dtype=np.int64), DECODE_SIZE)
    return EpochSource(name, images, np.asarray(labels, dtype=np.int64))


class Kept(NamedTuple):
    """What the timed loop keeps of a batch for the check: copies of a few bytes, never the batch itself
    (a loader may reuse a batch's memory once it is dropped, as a training loop drops it)."""

    images_type: str
    dtype: Any
    shape: tuple[int, ...]
    labels: Any  # a copy
    sample: np.ndarray | Any  # [B, ~SAMPLED_BYTES]: every step-th byte of each image, a copy
    first: Any  # the batch's first image, a copy (imagenet-like: compared with its file's decode)


def keep(images: Any, labels: Any) -> Kept:
    """The cheap copies :class:`EpochCheck` needs (a few microseconds a batch)."""
    flat = images.reshape(len(images), -1)
    return Kept(
        type(images).__name__,
        images.dtype,
        tuple(images.shape),
        _copy(labels),
        _copy(flat[:, :: _step(flat.shape[1])]),
        _copy(images[0]),
    )


SAMPLED_BYTES = 64  # bytes of each image the check compares, spread over the whole image


def _step(image_bytes: int) -> int:
    return max(1, image_bytes // SAMPLED_BYTES)


def _copy(value: Any) -> Any:
    return value.clone() if hasattr(value, "clone") else np.array(value, copy=True)


def _keys(sample: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One uint64 per record: XXH3 of its sampled bytes, seeded with its label (sorted: a multiset)."""
    rows = np.ascontiguousarray(sample, dtype=np.uint8)
    keys = [
        xxhash.xxh3_64_intdigest(row.tobytes(), seed=int(label))
        for row, label in zip(rows, labels.tolist(), strict=True)
    ]
    return np.sort(np.asarray(keys, dtype=np.uint64))


class EpochCheck:
    """Whether the batches kept of one round (:func:`keep`) are one exact epoch of ``source`` (module doc)."""

    def __init__(self, source: EpochSource) -> None:
        self.source = source
        self._expected: np.ndarray | None = None
        self._thumbs: dict[int, np.ndarray] = {}

    def _shape(self) -> tuple[int, ...]:
        if isinstance(self.source.images, list):
            assert self.source.size is not None
            return (*self.source.size, 3)
        return tuple(self.source.images.shape[1:])

    def problems(self, batches: list[Kept]) -> str | None:
        """None if the batches are one exact epoch, else what is wrong (one line)."""
        import torch

        n, shape = len(self.source), self._shape()
        for batch in batches:
            if batch.images_type != "Tensor" or batch.dtype != torch.uint8:
                return f"images are {batch.images_type} {batch.dtype}, not uint8 tensors"
            if batch.shape[1:] != shape:
                return f"a batch of images is shaped {batch.shape}, not [B, {', '.join(map(str, shape))}]"
            labels = batch.labels
            if not (
                isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == batch.shape[:1]
            ):
                what = f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}"
                return f"labels are {what}, not int64 [B]"
        count = sum(len(batch.labels) for batch in batches)
        all_labels = np.concatenate([b.labels.numpy() for b in batches]) if batches else np.zeros(0, np.int64)
        if isinstance(self.source.images, list):
            got = np.sort(all_labels)
            if count != n or not np.array_equal(got, np.arange(n)):
                return _difference(got, np.arange(n), count, n)
            return self._thumb_problem(batches)
        if self._expected is None:
            flat = self.source.images.reshape(n, -1)
            self._expected = _keys(flat[:, :: _step(flat.shape[1])], self.source.labels)
        samples = [np.asarray(b.sample) for b in batches]
        got = _keys(np.concatenate(samples) if samples else np.zeros((0, 1), np.uint8), all_labels)
        if count != n or not np.array_equal(got, self._expected):
            return _difference(got, self._expected, count, n)
        return None

    def _thumb_problem(self, batches: list[Kept]) -> str | None:
        from imgstore.codecs import decode

        step = max(1, len(batches) // THUMB_SAMPLE)
        for batch in batches[::step]:
            index = int(batch.labels[0])
            if index not in self._thumbs:
                files = self.source.images
                assert isinstance(files, list)
                self._thumbs[index] = _thumb(decode(files[index], mode="RGB", size=self.source.size, decoder="pillow"))
            error = float(np.abs(_thumb(np.asarray(batch.first)) - self._thumbs[index]).mean())
            if error > MAX_THUMB_ERROR:
                return f"the image labelled {index} is not the decode of file {index} (8x8 means differ by {error:.1f})"
        return None


def _thumb(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
    blocks = image[:h, :w].reshape(8, h // 8, 8, w // 8, -1).astype(np.float64)
    return np.asarray(blocks.mean(axis=(1, 3)))


def _difference(got: np.ndarray, expected: np.ndarray, count: int, n: int) -> str:
    """How a delivered multiset of keys differs from the expected one: duplicates and missing records."""
    values, counts = np.unique(got, return_counts=True)
    repeated = int((counts - 1).sum())
    missing = len(np.setdiff1d(expected, values))
    return f"not an exact epoch: {count} records delivered of {n}, {repeated} repeated, {missing} missing"


@dataclass
class EpochRow:
    """One built loader of the session (shared by its workers and cache rows) and its round figures."""

    loader: EpochLoader
    root: Path
    check: EpochCheck
    first_batch: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_epoch(loader: Any, out: list[Kept], first_batch: list[float], cpu: list[float]) -> None:
    """The timed body: iterate one epoch, keeping a few bytes of each batch (checked later) and the figures."""
    cpu_start, start = time.process_time(), time.perf_counter()
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        out.append(keep(*batch))
        del batch  # dropped, as a training step drops it (a loader may reuse its memory)
    cpu.append(time.process_time() - cpu_start)
    first_batch.append(first if first is not None else time.perf_counter() - start)


def release() -> None:
    """Drop what the last round left (its loader's handles and maps) so its files can leave the page cache."""
    gc.collect()
