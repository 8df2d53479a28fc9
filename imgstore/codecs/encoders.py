"""The codecs that encode with Pillow: ``png``, ``jpeg``, ``webp`` and ``keep`` (files stored as given)."""

from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from imgstore.codecs.base import Codec, ImageInfo, Param, image_array
from imgstore.errors import InvalidImageError

_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}

# Suffixes for the formats people meet most; any other takes the first one Pillow registers for it.
_SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


def pil_image(array: np.ndarray, channels: int) -> Image.Image:
    """A Pillow image over a C-contiguous uint8 [H, W, C] array (L, LA, RGB or RGBA), without a copy."""
    mode = _MODES[channels]
    height, width = array.shape[:2]
    return Image.frombuffer(mode, (width, height), array, "raw", mode, 0, 1)


def save(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format, **options)
    except (OSError, ValueError) as exc:  # e.g. an image over WebP's 16383-pixel side
        width, height = image.size
        raise InvalidImageError(f"Pillow cannot encode this {width}x{height} image as {format}: {exc}") from None
    return buffer.getvalue()


class PngCodec(Codec):
    """Lossless PNG: 1 to 4 channels (L, LA, RGB, RGBA). ``compress_level`` trades write speed for size."""

    name: ClassVar[str] = "png"
    accepts: ClassVar[frozenset[str] | None] = frozenset({"PNG"})
    param_specs: ClassVar[dict[str, Param]] = {"compress_level": Param(1, 0, 9)}

    def encode(self, image: np.ndarray) -> bytes:
        array, channels = image_array(image, self.name, (1, 2, 3, 4))
        return save(pil_image(array, channels), "PNG", compress_level=self.params["compress_level"])

    def extension(self, info: ImageInfo) -> str:
        return ".png"


class JpegCodec(Codec):
    """Lossy JPEG of 1 (grayscale) or 3 (RGB) channels, with Pillow's default 4:2:0 chroma subsampling."""

    name: ClassVar[str] = "jpeg"
    accepts: ClassVar[frozenset[str] | None] = frozenset({"JPEG"})  # a camera's MPO file probes as JPEG too
    param_specs: ClassVar[dict[str, Param]] = {"quality": Param(90, 1, 100)}

    def encode(self, image: np.ndarray) -> bytes:
        array, channels = image_array(image, self.name, (1, 3))
        return save(pil_image(array, channels), "JPEG", quality=self.params["quality"])

    def extension(self, info: ImageInfo) -> str:
        return ".jpg"


class WebpCodec(Codec):
    """WebP of 3 (RGB) or 4 (RGBA) channels, lossy (``quality``) or ``lossless``.

    WebP has no grayscale: a 1-channel image is refused rather than stored as RGB, which would
    decode to 3 channels where 1 was put. An RGBA image whose alpha is all 255 still decodes to 4
    channels (libwebp drops such an alpha; the file is marked as having one, see ``_mark_alpha``).
    Lossless files keep the colour under fully transparent pixels (Pillow's ``exact``).
    """

    name: ClassVar[str] = "webp"
    accepts: ClassVar[frozenset[str] | None] = frozenset({"WEBP"})
    param_specs: ClassVar[dict[str, Param]] = {"quality": Param(90, 1, 100), "lossless": Param(False)}

    def encode(self, image: np.ndarray) -> bytes:
        if isinstance(image, np.ndarray) and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)):
            raise InvalidImageError(
                "codec 'webp' encodes RGB or RGBA images (WebP has no grayscale); store grayscale with 'png' or "
                "'jpeg', or pass np.repeat(image, 3, axis=-1) for RGB"
            )
        array, channels = image_array(image, self.name, (3, 4))
        lossless = self.params["lossless"]
        options = {"quality": self.params["quality"], "lossless": lossless, "exact": lossless}
        blob = save(pil_image(array, channels), "WEBP", **options)
        return _mark_alpha(blob) if channels == 4 else blob

    def extension(self, info: ImageInfo) -> str:
        return ".webp"


def _mark_alpha(blob: bytes) -> bytes:
    """``blob`` (one WebP image) marked as having an alpha channel, if libwebp left it out for being all 255.

    Without the mark an opaque RGBA image decodes to RGB. Lossless (VP8L): its header's
    ``alpha_is_used`` bit (the pixels are ARGB either way). Lossy (VP8): the extended format's
    VP8X chunk with the alpha flag and no ALPH chunk, which libwebp decodes as alpha 255.
    """
    chunk = blob[12:16]
    if chunk == b"VP8L" and len(blob) > 24 and blob[20] == 0x2F:
        marked = bytearray(blob)
        marked[24] |= 0x10  # bit 28 of the 32 bits after the signature byte
        return bytes(marked)
    if chunk == b"VP8 " and len(blob) >= 30:
        width = int.from_bytes(blob[26:28], "little") & 0x3FFF
        height = int.from_bytes(blob[28:30], "little") & 0x3FFF
        vp8x = b"VP8X" + (10).to_bytes(4, "little") + b"\x10\0\0\0"
        vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        body = b"WEBP" + vp8x + blob[12:]
        return b"RIFF" + len(body).to_bytes(4, "little") + body
    return blob  # VP8X already: the image has transparency and its ALPH chunk


class KeepCodec(Codec):
    """Encoded files of any format Pillow opens, stored byte for byte; arrays are stored as lossless PNG."""

    name: ClassVar[str] = "keep"
    accepts: ClassVar[frozenset[str] | None] = None
    param_specs: ClassVar[dict[str, Param]] = {}

    def encode(self, image: np.ndarray) -> bytes:
        array, channels = image_array(image, self.name, (1, 2, 3, 4))
        return save(pil_image(array, channels), "PNG", compress_level=PngCodec.param_specs["compress_level"].default)

    def extension(self, info: ImageInfo) -> str:
        suffix = _SUFFIXES.get(info.format)
        if suffix is None:
            registered = [ext for ext, format in Image.registered_extensions().items() if format == info.format]
            suffix = registered[0] if registered else ".bin"
        return suffix
