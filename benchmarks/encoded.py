"""The rows of an encoded dataset (imagenet-like JPEG files): imgstore stores of every backend, and the LIMIT.

Every imgstore backend that holds encoded stores gets, per codec (``--imagenet-codecs``):

- ``imgstore-<backend>-<codec>`` on ``store_many``: the files into a fresh store created with
  ``codec=<codec>, image_mode="RGB"`` in one call, then close. ``keep`` stores the files as they
  are (``put_encoded_many``); ``jpeg90`` and ``png`` transcode: the timed call decodes the files
  (fastest decoder) and ``put_many`` re-encodes the pixels;
- ``imgstore-<backend>-<codec>-<decoder>`` on the reads, one row per installed decoder (pillow,
  simplejpeg, turbojpeg): the store opened with ``decoder=<decoder>``. The fastest decoder (what
  ``"auto"`` picks) is measured on every read; the others on the shuffled batches (the training
  read, and the targets' operation), where decoding on every core is nearly the whole cost.

The LIMIT (``limit``, kind ``limit``) is what no store can beat: reads decode the same files
from memory, a Python list of bytes already in RAM, with the fastest installed decoder on every
core (``imgstore.codecs.decode_many(..., decoder=resolve_decoder("auto"))``; one ``decode`` per
image for ``read_random``); ``store_many`` writes the files back to back into one raw file (and
their labels and ends into a second) with ``os.writev``, then fsyncs both and their directory.

Reads deliver decoded RGB arrays; the last result of every row is checked against the decode of
its source files as torchvision's loader makes it (``Image.open(f).convert("RGB")``), bit for bit
(a ``jpeg90`` store: same shape and a PSNR of 30 dB or more, the re-encode being lossy).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from PIL import Image

import imgstore
from benchmarks.operations import BATCH_SIZE, OPERATIONS, Operation, Subject
from benchmarks.subjects import _RawWriter
from imgstore.codecs import available_decoders, decode, decode_many, resolve_decoder

OPERATIONS_ENCODED = ("store_many", "read_many", "read_random", "read_random_many")
# Where decoders other than the fastest get rows: the training read, all decoding on every core
# (on read_many too they would add ~10% to the default run and show the same ratios).
OTHER_DECODERS_ON = ("read_random_many",)
CODECS: dict[str, tuple[str, dict[str, Any]]] = {  # --imagenet-codecs name -> (row label, open_store options)
    "keep": ("keep", {"codec": "keep"}),
    "jpeg": ("jpeg90", {"codec": "jpeg", "quality": 90}),
    "png": ("png", {"codec": "png"}),
}
MIN_PSNR = 30.0  # dB, a lossy re-encode against its source; q90 of these files measures ~40
IOV_MAX = 1024  # buffers per os.writev (Linux's limit)


def encoded_rounds(n: int, dear: bool = False) -> int:
    """Timed rounds of an encoded row: few, as a read of 1 000 images decodes ~0.5 GB of pixels.

    No untimed warmup round either (``EncodedSubject.warmups``): the store was just built (its
    files are in the page cache) and every round allocates its ~0.5 GB of results afresh, so a
    first round is no colder than the next; of 3 rounds the median drops one that is. ``dear``
    rows (the status quo's reads, ~2.8 s a round, 3x the others; writes of 117 MB and an fsync)
    get 2 from 1 000 images on: no target is judged on a write, and the status quo's Pillow
    decode is the steadiest row. The 26 rows at 1 000 images take ~1 min of a default run on 2
    idle cores.
    """
    if n > 1_000 or (dear and n == 1_000):
        return 2
    return 10 if n <= 10 else 5 if n <= 100 else 3


def digest(image: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(image))  # type: ignore[no-any-return]


def decoded_rgb(blob: bytes) -> np.ndarray:
    """A file decoded as torchvision's ImageFolder loader does: the reference of every check."""
    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def check_decoded(op: Operation, last: tuple[Any, Any], argument: Any, data: Any, exact: bool, name: str = "") -> None:
    """What a read of encoded files returned last is the decode of the files there (``data``: BenchData)."""
    assert op.last_at is not None
    where = op.last_at(argument)
    got_images, got_labels = last
    if isinstance(where, int):
        indices, got = [where], [got_images]
    else:
        indices = list(range(len(data.images)))[where] if isinstance(where, slice) else list(where)
        got = list(got_images)
    label = f"{name} {op.name}".strip()
    if len(got) != len(indices):
        raise AssertionError(f"{label} read {len(got)} images where {len(indices)} were asked")
    expected = data.expected(indices)
    lossy_checked = 0
    for i, image, (shape, want) in zip(indices, got, expected, strict=True):
        image = np.asarray(image)
        if image.shape != shape:
            raise AssertionError(f"{label} read image {i} as {image.shape}; its file decodes to {shape}")
        if exact and digest(image) != want:
            raise AssertionError(f"{label} read wrong pixels for image {i}")
        if not exact and lossy_checked < 16:  # a sample: each costs a Pillow decode of the source
            lossy_checked += 1
            quality = psnr(image, decoded_rgb(data.images[i]))
            if quality < MIN_PSNR:
                raise AssertionError(f"{label} read image {i} at {quality:.1f} dB PSNR, under {MIN_PSNR}")
    if not np.array_equal(np.asarray(got_labels), data.labels[where]):
        raise AssertionError(f"{label} read wrong labels")


class EncodedSubject(Subject):
    """What the rows of an encoded dataset share: their operations, rounds, warmup and check."""

    ops: tuple[str, ...] = OPERATIONS_ENCODED
    exact = True  # the reads give the source files' pixels bit for bit
    warmups = 0  # see encoded_rounds

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(op.name for op in OPERATIONS if op.name in self.ops and op.name in self.supports)

    def timed_rounds(self, op: Operation, n: int, warmup_seconds: float | None = None) -> int:
        return encoded_rounds(n, dear=op.kind == "write" or self.kind == "tutorial")

    def check_last(self, op: Operation, last: tuple[Any, Any], argument: Any, data: Any) -> None:
        check_decoded(op, last, argument, data, self.exact, self.name)

    def build(self, path: Path, images: Any, labels: np.ndarray) -> None:
        self.body("store_many")(self.open_writer(path, ()), images, labels)  # files of varied sizes: no shape


class EncodedStoreSubject(EncodedSubject):
    """An imgstore store holding the files with one codec; read rows decode with one named decoder."""

    kind = "imgstore"
    supports = OPERATIONS_ENCODED

    def __init__(self, backend: str, codec: str, decoder: str | None = None, fastest: bool = True) -> None:
        """``decoder`` None: the store_many row. ``fastest``: the decoder "auto" picks (measured on every read)."""
        label, self.options = CODECS[codec]
        self.backend, self.codec, self.decoder, self.fastest = backend, codec, decoder, fastest
        self.variant = f"{label}-{decoder}" if decoder else label
        self.name = f"imgstore-{backend}-{self.variant}"
        self._store_key = f"imgstore-{backend}-{label}"  # every decoder's rows read one store
        self.ops = ("store_many",) if decoder is None else OPERATIONS_ENCODED[1:] if fastest else OTHER_DECODERS_ON
        self.exact = codec != "jpeg"

    @property
    def store_key(self) -> str:
        return self._store_key

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> imgstore.Store:
        return imgstore.open_store(path, self.backend, "w", image_mode="RGB", **self.options)

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> imgstore.Store:
        return imgstore.open_store(path, mode="r", decoder=self.decoder or "auto")

    def close_reader(self, reader: imgstore.Store) -> None:
        reader.close()

    def store_many(self, target: imgstore.Store, blobs: list[bytes], labels: np.ndarray) -> None:
        if self.codec == "keep":
            target.put_encoded_many(blobs, labels)
        else:  # a transcode, as converting a folder of JPEGs to this codec would do
            target.put_many(decode_many(blobs, mode="RGB"), labels)
        target.close()

    def read_many(self, reader: imgstore.Store, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        return reader.get_many(range(n))  # type: ignore[no-any-return]

    def read_random(self, reader: imgstore.Store, order: list[int]) -> tuple[np.ndarray, int]:
        for i in order:
            image, label = reader.get(i)
        return image, label

    def read_random_many(self, reader: imgstore.Store, order: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        for start in range(0, len(order), BATCH_SIZE):
            batch = reader.get_many(order[start : start + BATCH_SIZE])
        return batch  # type: ignore[no-any-return]


class _Memory:
    """The LIMIT's reader: the files as a Python list of bytes in RAM, and their labels."""

    def __init__(self, path: Path) -> None:
        data = (path / "images.raw").read_bytes()
        meta = np.fromfile(path / "labels.raw", dtype="<i8")
        count = len(meta) // 2
        self.labels, ends = meta[:count], meta[count:].tolist()
        self.blobs = [data[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


class EncodedLimitSubject(EncodedSubject):
    """The LIMIT of an encoded dataset (module docstring): decoding from memory, writing one raw file."""

    kind = "limit"
    backend = "raw"  # the reference of every row's xlimit, like the fixed-shape limit
    name = "limit"
    supports = OPERATIONS_ENCODED

    def __init__(self) -> None:
        self.decoder = resolve_decoder("auto")

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> _RawWriter:
        return _RawWriter(path)

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> _Memory:
        return _Memory(path)

    def store_many(self, target: _RawWriter, blobs: list[bytes], labels: np.ndarray) -> None:
        for start in range(0, len(blobs), IOV_MAX):
            _writev_all(target.images, blobs[start : start + IOV_MAX])
        ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        os.write(target.labels, np.concatenate([np.asarray(labels, "<i8"), ends.astype("<i8")]).tobytes())
        for fd in (target.images, target.labels, target.dir):
            os.fsync(fd)
            os.close(fd)

    def read_many(self, reader: _Memory, n: int) -> tuple[Any, np.ndarray]:
        return decode_many(reader.blobs[:n], mode="RGB", decoder=self.decoder), reader.labels[:n].copy()

    def read_random(self, reader: _Memory, order: list[int]) -> tuple[np.ndarray, int]:
        for i in order:
            image, label = decode(reader.blobs[i], mode="RGB", decoder=self.decoder), int(reader.labels[i])
        return image, label

    def read_random_many(self, reader: _Memory, order: list[int]) -> tuple[Any, np.ndarray]:
        for start in range(0, len(order), BATCH_SIZE):
            indices = order[start : start + BATCH_SIZE]
            images = decode_many([reader.blobs[i] for i in indices], mode="RGB", decoder=self.decoder)
            batch = images, reader.labels[indices]
        return batch


def _writev_all(fd: int, blobs: list[bytes]) -> None:
    written = os.writev(fd, blobs)
    total = sum(len(blob) for blob in blobs)
    if written < total:  # a short write (rare on a regular file): the rest one buffer at a time
        rest = memoryview(b"".join(blobs))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def supports_encoded(backend: str) -> bool:
    """Whether the backend holds encoded stores (it implements the variable-length record primitives)."""
    cls = imgstore.get_backend(backend)
    return cls._write_blobs is not imgstore.Store._write_blobs


def make_encoded_subjects(backends: list[str], codecs: list[str]) -> list[Subject]:
    """The LIMIT, the ImageFolder status quo, and per backend and codec a store row and a row per decoder."""
    from benchmarks.folder import ImageFolderSubject

    fastest = resolve_decoder("auto")
    decoders = [fastest] + [d for d in available_decoders() if d != fastest]
    stores: list[Subject] = []
    for backend in backends:
        if not supports_encoded(backend):
            continue  # e.g. the README's minimal backend: arrays of one shape only
        for codec in codecs:
            stores.append(EncodedStoreSubject(backend, codec))
            stores += [EncodedStoreSubject(backend, codec, d, fastest=d == fastest) for d in decoders]
    return [EncodedLimitSubject(), *stores, ImageFolderSubject()]
