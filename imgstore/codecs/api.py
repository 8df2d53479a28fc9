"""probe, decode, decode_many and encode_many: the format is read from each blob's first bytes."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgstore.codecs import pillow, raw
from imgstore.codecs.base import Codec, ImageInfo
from imgstore.codecs.fast_jpeg import FastJpeg, decoder_object, fast_decode, resolve_decoder
from imgstore.codecs.pool import default_threads, run
from imgstore.errors import InvalidImageError, InvalidOptionError

MODES = (None, "L", "LA", "RGB", "RGBA")
_JPEG_START = b"\xff\xd8\xff"
# Threads pay off when each image is real work. Decoding a 32x32 PNG or JPEG is mostly Pillow's
# Python-level work, which holds the GIL: two threads were no faster than one (measured: 0.6x to
# 1.0x), while from 128x128 on (JPEG 7 KiB, PNG 33 KiB) they were 1.3x to 2x faster. The average
# size tells them apart: encoded bytes when decoding, pixel bytes when encoding.
PARALLEL_MIN_IMAGES = 4
PARALLEL_MIN_AVERAGE_BYTES = 4096


def _workers(threads: object, count: int, total_bytes: int) -> int:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidOptionError(f"threads takes None (every core) or an integer >= 1; got {threads!r}")
    if count < PARALLEL_MIN_IMAGES or total_bytes < PARALLEL_MIN_AVERAGE_BYTES * count:
        return 1
    return default_threads() if threads is None else threads


def _blob(blob: object, k: int | None = None) -> bytes | memoryview:
    where = "" if k is None else f"image {k}: "
    data: bytes | memoryview
    if isinstance(blob, memoryview):
        if not blob.c_contiguous:
            raise InvalidImageError(f"{where}an encoded image's memoryview must be contiguous")
        data = blob.cast("B") if blob.format != "B" or blob.ndim != 1 else blob
    elif isinstance(blob, bytearray):
        data = memoryview(blob)
    elif isinstance(blob, bytes):
        data = blob
    else:
        raise InvalidImageError(f"{where}an encoded image is bytes or a memoryview, got {type(blob).__name__}")
    if len(data) == 0:
        raise InvalidImageError(f"{where}an empty blob is not an image")
    return data


def _blobs(blobs: Any) -> list[bytes | memoryview]:
    if isinstance(blobs, (bytes, bytearray, memoryview, str)):
        raise InvalidImageError("decode_many takes a sequence of encoded images, not one")
    return [_blob(blob, k) for k, blob in enumerate(blobs)]


def _mode(mode: Any) -> str | None:
    if mode not in MODES:
        raise InvalidOptionError(f"mode takes None (as stored), 'L', 'LA', 'RGB' or 'RGBA'; got {mode!r}")
    return mode  # type: ignore[no-any-return]


def _size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (operator.index(side) for side in size)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"size takes (height, width), two integers >= 1; got {size!r}") from None
    if height < 1 or width < 1 or isinstance(size, (str, bytes)):
        raise InvalidOptionError(f"size takes (height, width), two integers >= 1; got {size!r}")
    return height, width


def _owned(array: np.ndarray) -> np.ndarray:
    if array.flags.owndata and array.flags.writeable and array.flags.c_contiguous:
        return array
    copy: np.ndarray = array.copy()
    return copy


def _decode_one(
    data: bytes | memoryview, mode: str | None, size: tuple[int, int] | None, fast: FastJpeg | None
) -> np.ndarray:
    """One image, possibly a read-only view (the caller copies it to where it goes)."""
    if raw.is_raw(data):
        return raw.unpack(data, mode, size)
    if fast is not None and mode in (None, "RGB", "L") and bytes(data[:3]) == _JPEG_START:
        array = fast_decode(fast, data, mode, size)
        if array is not None:
            return array
    return pillow.decode(data, mode, size)


_JPEG_CHANNELS = {"Gray": 1, "YCbCr": 3, "RGB": 3}  # libjpeg-turbo's colour spaces as Pillow opens them


def probe(blob: bytes | memoryview) -> ImageInfo:
    """What an encoded image's header says (format, size, channels with mode=None, Pillow mode), undecoded.

    Raises :class:`InvalidImageError` for an empty blob, anything Pillow (or the raw format) cannot
    read, a zero size, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb).
    """
    data = _blob(blob)
    if raw.is_raw(data):
        return raw.probe(data)
    fast = decoder_object(resolve_decoder("auto"))
    if fast is not None and bytes(data[:3]) == b"\xff\xd8\xff":
        # libjpeg-turbo reads a JPEG header in ~2 µs where Pillow's Python parser takes ~100-300 µs:
        # the cost of checking every file of a conversion. Other colour spaces go to Pillow.
        try:
            height, width, colorspace = fast.header(data)
        except Exception:  # let Pillow decide, and word the error
            return ImageInfo(*pillow.probe_info(data))
        channels = _JPEG_CHANNELS.get(colorspace)
        if channels is not None:
            pillow.check_size("JPEG", (width, height))
            return ImageInfo("JPEG", height, width, channels, "L" if channels == 1 else "RGB")
    return ImageInfo(*pillow.probe_info(data))


def is_whole(blob: bytes | memoryview) -> bool:
    """Whether a JPEG, PNG or WebP file ends where its format says it ends: then its header is trusted.

    A truncated file (the common damage: an interrupted copy or download) lacks its end. Pillow
    fails on it only when it decodes the pixels, so such a file, and every file of another
    format, must be decoded in full to know it is whole. imgstore's raw blobs are checked whole by
    :func:`probe` (their length is exact).
    """
    head = bytes(blob[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return bytes(blob[-2:]) == b"\xff\xd9"  # EOI: appears nowhere else in a JPEG's scans (0xFF is escaped)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return bytes(blob[-12:]) == b"\0\0\0\0IEND\xaeB`\x82"  # the IEND chunk
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return len(blob) >= 8 + int.from_bytes(head[4:8], "little")  # the RIFF size
    return raw.is_raw(bytes(blob[:16]))


def decode(
    blob: bytes | memoryview, *, mode: str | None = None, size: tuple[int, int] | None = None, decoder: str = "auto"
) -> np.ndarray:
    """One encoded image as a uint8 [H, W, C] array (a raw blob: its own shape); see the package docstring."""
    data, mode, size = _blob(blob), _mode(mode), _size(size)
    fast = decoder_object(resolve_decoder(decoder))
    return _owned(_decode_one(data, mode, size, fast))


def decode_many(
    blobs: Sequence[bytes | memoryview],
    *,
    mode: str | None = None,
    size: tuple[int, int] | None = None,
    decoder: str = "auto",
    threads: int | None = None,
) -> list[np.ndarray] | np.ndarray:
    """Encoded images decoded on ``threads`` threads (default: every core; 1: in this thread).

    Without ``size`` a list of arrays; with ``size=(h, w)`` one [N, h, w, C] array, which needs
    every image to decode to the same C (``mode="RGB"`` or ``"L"`` guarantees it). An empty batch
    with ``size`` is [0, h, w, C] with C from ``mode``, 0 for mode=None.
    """
    datas, mode, size = _blobs(blobs), _mode(mode), _size(size)
    workers = _workers(threads, len(datas), sum(len(data) for data in datas))
    fast = decoder_object(resolve_decoder(decoder))
    if size is None:
        images: list[np.ndarray] = [np.empty(0, np.uint8)] * len(datas)

        def decode_into_list(k: int) -> None:
            images[k] = _owned(_decode_one(datas[k], mode, size, fast))

        run(decode_into_list, len(datas), workers)
        return images
    if not datas:
        return np.empty((0, *size, pillow.CHANNELS.get(mode or "", 0)), np.uint8)
    # The first image tells the channel count (mode=None: images may differ, and that is an error here).
    first = _decode_one(datas[0], mode, size, fast)  # [h, w, C] for every format, raw too
    batch = np.empty((len(datas), *size, first.shape[-1]), np.uint8)

    def decode_into_batch(k: int) -> None:
        image = first if k == 0 else _decode_one(datas[k], mode, size, fast)
        if image.shape != batch.shape[1:]:
            raise InvalidImageError(
                f"image {k} decodes to {image.shape[-1]} channels and image 0 to {batch.shape[-1]}: size= gives "
                "one array, so every image must have the same channel count (decode with mode 'RGB' or 'L': "
                "a store's image_mode)"
            )
        batch[k] = image

    run(decode_into_batch, len(datas), workers)
    return batch


def encode_many(codec: Codec, images: Sequence[np.ndarray], *, threads: int | None = None) -> list[bytes]:
    """``codec.encode`` of each image, on ``threads`` threads (default: every core; 1: in this thread)."""
    if not isinstance(codec, Codec):
        raise InvalidOptionError(f"encode_many takes a Codec (get_codec(name)), got {type(codec).__name__}")
    if isinstance(images, np.ndarray) and images.ndim < 2:
        raise InvalidImageError(f"encode_many takes a sequence of images, got one array of shape {images.shape}")
    workers = _workers(threads, len(images), sum(getattr(image, "nbytes", 0) for image in images))
    blobs: list[bytes] = [b""] * len(images)

    def encode_one(k: int) -> None:
        blobs[k] = codec.encode(images[k])

    run(encode_one, len(images), workers)
    return blobs
