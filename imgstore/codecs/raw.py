"""The ``raw`` codec: an array's pixels as they are, behind a small header that gives its shape.

Blob format (version 1)::

    b"\\x89IMGRAW\\n"    8 bytes of magic (0x89 first, like PNG's, so that no text file starts with it)
    version            1 byte (1)
    ndim               1 byte (1 .. 8)
    dims               ndim x uint32, little-endian, each >= 1
    pixels             prod(dims) bytes, uint8, C order (at most 2 GiB)

A raw blob decodes to an array of its own shape: a [H, W] image stays [H, W] (encoded formats
decode to [H, W, C]). ``mode=`` and ``size=`` treat a [H, W] or [H, W, C] array with C in 1 .. 4
as an L, LA, RGB or RGBA image.
"""

from __future__ import annotations

import math
import struct
from typing import ClassVar

import numpy as np
from PIL import Image

from imgstore.codecs.base import Codec, ImageInfo, Param
from imgstore.codecs.pillow import finish, to_array
from imgstore.errors import InvalidImageError

MAGIC = b"\x89IMGRAW\n"
VERSION = 1
MAX_DIMS = 8
MAX_BYTES = 2**31  # 2 GiB: one record's limit everywhere in imgstore
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _image_channels(shape: tuple[int, ...]) -> int | None:
    """C if ``shape`` is an image ([H, W] is 1, [H, W, C] with C in 1..4), else None."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3 and shape[2] in _MODES:
        return shape[2]
    return None


def pack(image: np.ndarray) -> bytes:
    """The raw blob of a uint8 array of 1 to 8 dimensions, each >= 1."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"codec 'raw' encodes numpy arrays, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"codec 'raw' encodes uint8 arrays, got dtype {image.dtype}")
    if not 1 <= image.ndim <= MAX_DIMS or min(image.shape) < 1 or image.nbytes > MAX_BYTES:
        raise InvalidImageError(
            f"codec 'raw' encodes arrays of 1 to {MAX_DIMS} dimensions, each >= 1, of at most 2 GiB; got {image.shape}"
        )
    header = MAGIC + bytes((VERSION, image.ndim)) + struct.pack(f"<{image.ndim}I", *image.shape)
    return header + np.ascontiguousarray(image).tobytes()


def is_raw(blob: bytes | memoryview) -> bool:
    return bytes(blob[: len(MAGIC)]) == MAGIC


def parse(blob: bytes | memoryview) -> tuple[tuple[int, ...], int]:
    """The shape of a raw blob and where its pixels start, checked against the blob's length."""
    fixed = len(MAGIC) + 2
    if len(blob) < fixed or not is_raw(blob):
        raise InvalidImageError("not a raw imgstore image (no RAW header)")
    version, ndim = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if version != VERSION:
        raise InvalidImageError(f"a raw image of format version {version}; this imgstore reads version {VERSION}")
    if not 1 <= ndim <= MAX_DIMS:
        raise InvalidImageError(f"a raw image header gives {ndim} dimensions; raw images have 1 to {MAX_DIMS}")
    start = fixed + 4 * ndim
    if len(blob) < start:
        raise InvalidImageError(f"a raw image of {len(blob)} bytes is shorter than its header ({start} bytes)")
    shape = struct.unpack_from(f"<{ndim}I", blob, fixed)
    if min(shape) < 1:
        raise InvalidImageError(f"a raw image header gives the shape {shape}: every dimension is >= 1")
    size = math.prod(shape)
    if size > MAX_BYTES:
        raise InvalidImageError(f"a raw image header gives the shape {shape}: {size} bytes, over the 2 GiB limit")
    if len(blob) - start != size:
        raise InvalidImageError(
            f"a raw image of shape {shape} has {size} bytes of pixels, but the blob holds {len(blob) - start}"
        )
    return shape, start


def probe(blob: bytes | memoryview) -> ImageInfo:
    shape, _ = parse(blob)
    height = shape[0]
    width = shape[1] if len(shape) > 1 else 1
    channels = math.prod(shape[2:])
    image_channels = _image_channels(shape)
    mode = _MODES[image_channels] if image_channels else f"RAW{len(shape)}"
    return ImageInfo("RAW", height, width, channels, mode)


def unpack(blob: bytes | memoryview, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    """The array of a raw blob (its own shape); with ``mode`` or ``size`` an image [h, w, C], converted by Pillow.

    The array may be a read-only view of ``blob``: the caller copies it to where it goes.
    """
    shape, start = parse(blob)
    pixels: np.ndarray = np.frombuffer(blob, np.uint8, offset=start).reshape(shape)
    if mode is None and size is None:
        return pixels
    channels = _image_channels(shape)
    if channels is None or (size is not None and channels == 2 and mode is None):
        wanted, argument = ("1, 3 or 4", "size=") if size is not None else ("1 to 4", "mode=")
        raise InvalidImageError(
            f"a raw array of shape {shape} is not an image of {wanted} channels: it cannot be decoded with {argument}"
        )
    pixels = pixels.reshape(shape[0], shape[1], channels)
    native = _MODES[channels]
    if mode in (None, native) and (size is None or size == shape[:2]):
        return pixels
    image = Image.frombuffer(native, (shape[1], shape[0]), pixels, "raw", native, 0, 1)
    return to_array(finish(image, mode or native, size))


class RawCodec(Codec):
    """Pixels as they are: any uint8 array of 1 to 8 dimensions, behind a header that gives its shape."""

    name: ClassVar[str] = "raw"
    accepts: ClassVar[frozenset[str] | None] = frozenset()
    param_specs: ClassVar[dict[str, Param]] = {}

    def encode(self, image: np.ndarray) -> bytes:
        return pack(image)

    def extension(self, info: ImageInfo) -> str:
        return ".raw"
