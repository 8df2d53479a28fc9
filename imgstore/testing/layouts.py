"""Layouts: which kind of store a suite class tests (codec, fixed or varied shapes), and test records for it.

A test class picks its layout with class attributes of :class:`~imgstore.testing.BackendTest`
(``codec``, ``codec_params``, ``image_mode``, ``varied``, ``fixed_shape``); the suites then ask
the :class:`Layout` for records (:meth:`Layout.records`) and compare what a store gives back with
:attr:`Records.expected`, which is exact for every codec:

- ``raw``, ``png`` and lossless ``webp`` without ``image_mode``: the arrays that were put (a 2-D
  image comes back [H, W, 1] from an image codec, [H, W] from ``raw``);
- lossy ``jpeg``/``webp``, or an ``image_mode``: what Pillow decodes from the codec's own encoding
  of each array (encoding is deterministic), converted to the mode;
- ``keep``: the records are JPEG, PNG and WebP files made here with Pillow (put with
  ``put_encoded_many``); expected is what Pillow decodes from each file, converted to the mode.

Records other than fixed-shape raw are made one by one from ``(seed, index)``, so that record
``i`` is the same whatever batch it is made in (a killed writer's prefix can be checked).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from imgstore import Store

#: A batch of images: one array [N, ...] (fixed shape) or a list of arrays (varied shapes).
Images = np.ndarray | list[np.ndarray]
Which = slice | Sequence[int] | np.ndarray
T = TypeVar("T")

# Channel counts each codec encodes (0: a 2-D array), from which varied records pick.
_CHANNELS = {"raw": (0, 1, 2, 3, 4), "png": (0, 1, 2, 3, 4), "jpeg": (0, 1, 3), "webp": (3, 4)}
# keep: files of these formats and channel counts (WebP has no grayscale).
_FILES = (("JPEG", 1), ("JPEG", 3), ("PNG", 1), ("PNG", 2), ("PNG", 3), ("PNG", 4), ("WEBP", 3), ("WEBP", 4))
_FILE_OPTIONS: dict[str, dict[str, Any]] = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 80}}
_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def hwc(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """An image shape as (height, width, channels): a 2-D image has 1 channel."""
    return (shape[0], shape[1], shape[2] if len(shape) > 2 else 1)


def pillow_decode(blob: bytes, mode: str | None) -> np.ndarray:
    """What Pillow reads from ``blob`` (converted to ``mode``) as [H, W, C]: the suites' oracle for decoding."""
    with Image.open(io.BytesIO(blob)) as image:
        array = np.asarray(image.convert(mode) if mode is not None else image)
    return np.ascontiguousarray(array.reshape(*array.shape[:2], -1))


def image_file(array: np.ndarray, format: str) -> bytes:
    """``array`` ([H, W] or [H, W, C]) saved by Pillow as a ``format`` file."""
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(
        buffer, format, **_FILE_OPTIONS[format]
    )
    return buffer.getvalue()


def take(images: Images, which: Which) -> Images:
    """``images[which]`` for an array or a list (negative indices count from the end)."""
    if isinstance(images, np.ndarray):
        return images[which]
    return take_list(images, which)


def take_list(items: list[T], which: Which) -> list[T]:
    """``items[which]`` with numpy's indexing: a slice, or any sequence of indices."""
    if isinstance(which, slice):
        return items[which]
    return [items[int(i)] for i in which]


@dataclass
class Records:
    """Test records of one layout: what a test puts, and what reading them back must give."""

    labels: np.ndarray
    #: what get/get_many must return, exactly (pixels, shape, channels)
    expected: Images
    #: the arrays given to put_many; None where the records are files
    arrays: Images | None = None
    #: the encoded files given to put_encoded_many (``keep``); None where the records are arrays
    blobs: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, which: Which) -> Records:
        return Records(
            self.labels[which],
            take(self.expected, which),
            None if self.arrays is None else take(self.arrays, which),
            None if self.blobs is None else take_list(self.blobs, which),
        )

    def __add__(self, other: Records) -> Records:
        def join(a: Any, b: Any) -> Any:
            if a is None or b is None:
                return None
            return np.concatenate([a, b]) if isinstance(a, np.ndarray) else list(a) + list(b)

        return Records(
            np.concatenate([self.labels, other.labels]),
            join(self.expected, other.expected),
            join(self.arrays, other.arrays),
            join(self.blobs, other.blobs),
        )

    def with_labels(self, labels: np.ndarray) -> Records:
        return Records(np.asarray(labels, dtype=np.int64), self.expected, self.arrays, self.blobs)

    @property
    def items(self) -> Images | list[bytes]:
        """What a put call takes: the files, or the arrays."""
        if self.blobs is not None:
            return self.blobs
        assert self.arrays is not None
        return self.arrays

    def put(self, store: Store, labels: Any = None) -> range:
        """Append every record in one commit (put_encoded_many for files, else put_many), ``labels`` if given."""
        labels = self.labels if labels is None else labels
        if self.blobs is not None:
            return store.put_encoded_many(self.blobs, labels)
        assert self.arrays is not None
        return store.put_many(self.arrays, labels)

    def put_one(self, store: Store, k: int, label: Any = None) -> int:
        """Append record ``k`` alone (``put`` for an array), with ``label`` if given; returns its index."""
        label = int(self.labels[k]) if label is None else label
        if self.blobs is not None:
            return store.put_encoded_many([self.blobs[k]], [label])[0]
        assert self.arrays is not None
        return store.put(self.arrays[k], label)


@dataclass(frozen=True)
class Layout:
    """One kind of store: its codec and parameters, image mode, and whether shapes vary or are fixed."""

    codec: str = "raw"
    codec_params: Mapping[str, Any] = field(default_factory=dict)
    image_mode: str | None = None
    #: images of many shapes and channel counts (``shape=None``)
    varied: bool = False
    #: every image has this shape, given when the store is created (None for raw: the first write fixes it)
    fixed_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.varied and self.fixed_shape is not None:
            raise ValueError("a layout has varied shapes or a fixed_shape, not both")
        if self.codec != "raw" and not self.varied and self.fixed_shape is None:
            raise ValueError(f"an encoded layout of one shape names it: fixed_shape=(H, W, C) (codec {self.codec!r})")

    @property
    def encoded(self) -> bool:
        """Whether its stores keep variable-length records (the backend's ``_write_blobs``/``_read_blobs``)."""
        return self.codec != "raw" or self.varied

    @property
    def files(self) -> bool:
        """Whether its records are encoded files put as given (``put_encoded_many``), not arrays."""
        return self.codec == "keep"

    @property
    def takes_files(self) -> bool:
        """Whether its stores accept ``put_encoded_many`` at all (a raw store takes arrays only)."""
        return self.codec != "raw"

    @property
    def key(self) -> tuple[Any, ...]:
        """The layout as a hashable value (its codec parameters are a mapping)."""
        return (self.codec, tuple(sorted(self.codec_params.items())), self.image_mode, self.varied, self.fixed_shape)

    @property
    def lossless(self) -> bool:
        lossless_webp = self.codec == "webp" and bool(self.codec_params.get("lossless"))
        return self.image_mode is None and (self.codec in ("raw", "png") or lossless_webp)

    def store_kwargs(self) -> dict[str, Any]:
        """What ``open_store(..., "w")`` takes to make a store of this layout (nothing for fixed raw)."""
        kwargs: dict[str, Any] = {}
        if self.codec != "raw":
            kwargs["codec"] = self.codec
        if self.codec_params:
            kwargs["codec_params"] = dict(self.codec_params)
        if self.image_mode is not None:
            kwargs["image_mode"] = self.image_mode
        if self.varied:
            kwargs["shape"] = None
        elif self.fixed_shape is not None:
            kwargs["shape"] = self.fixed_shape
        return kwargs

    def image_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape of every record a test asking for ``shape`` gets; None where shapes vary."""
        return None if self.varied else self.fixed_shape or shape

    def records(self, n: int, shape: tuple[int, ...] = (32, 32, 3), seed: int = 0, first: int = 0) -> Records:
        """Records ``first .. first + n - 1`` for a test that asks for images of ``shape``.

        Fixed raw layouts get :func:`random_images` (every byte value; what the raw suites always
        used); varied layouts get heights and widths of 1 to twice ``shape``'s and the channel counts
        the codec takes; fixed encoded layouts get ``fixed_shape``. Labels are 0 .. 9.
        """
        if not self.encoded:
            from imgstore.testing.checks import random_images

            images, labels = random_images(first + n, self.image_shape(shape) or shape, seed)
            return Records(labels[first:], images[first:], images[first:])
        made = [_record(self, shape, seed, index) for index in range(first, first + n)]
        labels = np.array([label for label, _, _, _ in made], dtype=np.int64)
        decoded = [image for _, image, _, _ in made]
        arrays = [array for _, _, array, _ in made]
        blobs = [blob for _, _, _, blob in made] if self.files else None
        if self.varied:
            return Records(labels, decoded, None if self.files else arrays, blobs)
        # One shape: batches are arrays, as a fixed-shape store gives them.
        fixed = self.fixed_shape or shape
        expected = np.stack(decoded) if n else np.empty((0, *hwc(fixed)), np.uint8)
        stacked = np.stack(arrays) if n else np.empty((0, *fixed), np.uint8)
        return Records(labels, expected, None if self.files else stacked, blobs)

    def record(self, shape: tuple[int, ...], seed: int, index: int) -> tuple[int, np.ndarray, np.ndarray, bytes]:
        """(label, expected image, the array, the file for ``keep``) of record ``index`` (see :func:`_record`)."""
        rng = np.random.default_rng([seed, index])
        label = int(rng.integers(0, 10))
        if self.varied:
            height, width = (int(rng.integers(1, 2 * side + 1)) for side in shape[:2])
        else:
            fixed = self.fixed_shape or shape
            height, width = fixed[0], fixed[1]
        if self.files:
            format, channels = self._file_kind(rng, shape)
            array = self._pixels(rng, height, width, channels)
            blob = image_file(array, format)
            return label, pillow_decode(blob, self.image_mode), array, blob
        if self.varied:
            channels = int(rng.choice(_CHANNELS[self.codec]))
        else:
            fixed = self.fixed_shape or shape
            channels = fixed[2] if len(fixed) > 2 else 0
        array = self._pixels(rng, height, width, channels)
        if self.codec == "raw":
            return label, array, array, b""
        if self.lossless:
            return label, array.reshape(hwc(array.shape)), array, b""
        from imgstore.codecs import get_codec

        blob = get_codec(self.codec, **self.codec_params).encode(array)
        return label, pillow_decode(blob, self.image_mode), array, b""

    def _file_kind(self, rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[str, int]:
        kinds: tuple[tuple[str, int], ...] = _FILES
        if not self.varied:  # the files' channels must be the store's, unless image_mode converts them
            fixed = self.fixed_shape or shape
            want = _MODE_CHANNELS.get(self.image_mode or "", hwc(fixed)[2])
            kinds = tuple(kind for kind in _FILES if self.image_mode is not None or kind[1] == want)
        format, channels = kinds[int(rng.integers(len(kinds)))]
        return format, channels

    @staticmethod
    def _pixels(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
        """Noise (every byte value, so a misplaced pixel shows), [H, W] for 0 channels."""
        shape = (height, width) if channels == 0 else (height, width, channels)
        return rng.integers(0, 256, shape, dtype=np.uint8)


# Records are made again and again (every test, every process): one made is kept, read-only (the arrays are
# shared), as long as the process runs; encoding them is what the encoded layouts' tests would spend most on.
_MADE: dict[tuple[Any, ...], tuple[int, np.ndarray, np.ndarray, bytes]] = {}


def _record(layout: Layout, shape: tuple[int, ...], seed: int, index: int) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    key = (layout.key, shape, seed, index)
    made = _MADE.get(key)
    if made is None:
        made = _MADE[key] = layout.record(shape, seed, index)
        for array in made[1:3]:
            array.flags.writeable = False  # shared between tests: a test that writes to one fails loudly
    return made


# ---------------------------------------------------------------------- files put_encoded_many must refuse


def png_file(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grayscale PNG of the given size around ``idat`` (its compressed rows, as given)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A valid side x side PNG of zeros, well under 1 MB (side * (side + 1) bytes inflated): a decompression bomb.

    One full-flushed deflate segment repeated (after a full flush the same input gives the same
    bytes), so that even 900 MB of zeros take milliseconds to make.
    """
    block = side + 1  # one row: its filter byte, then the pixels
    rows = 100 if side % 100 == 0 else 1
    deflater = zlib.compressobj(9)
    first = deflater.compress(bytes(block * rows)) + deflater.flush(zlib.Z_FULL_FLUSH)
    again = deflater.compress(bytes(block * rows)) + deflater.flush(zlib.Z_FULL_FLUSH)
    adler = (((block * side) % 65521) << 16) | 1  # Adler-32 of that many zero bytes
    return png_file(side, side, first + again * (side // rows - 1) + b"\x03\x00" + struct.pack(">I", adler))


def bad_files(jpeg: bytes) -> dict[str, bytes]:
    """Inputs whose header does not decode to a sane image, each refused by ``put_encoded_many``.

    ``jpeg`` is a valid JPEG file; it is cut inside its frame header.
    """
    frame = jpeg.index(b"\xff\xc0")
    return {
        "empty": b"",
        "text": b"This is a text file, not an image.\n" * 20,
        "JPEG cut in its header": jpeg[: frame + 4],
        "JPEG start only": b"\xff\xd8\xff",
        "PNG of zero width": png_file(0, 10, zlib.compress(b"")),
        "decompression bomb PNG 10 000 px a side": png_bomb(10_000),
        "decompression bomb PNG 30 000 px a side": png_bomb(30_000),
    }
