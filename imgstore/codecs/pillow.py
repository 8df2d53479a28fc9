"""Reading any format with Pillow: identify from the header, decode, apply the mode policy, resize.

:func:`open_image` is ``PIL.Image.open`` without its two warnings: a decompression bomb (more
pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) is an error as soon as the header says so, not a
:class:`DecompressionBombWarning` below twice the limit, and an unidentified file does not warn
about the plugins that declined it. Warnings filters are process-wide state (not thread-safe to
change), so the decoder avoids the warnings instead of catching them. It tries the same plugins
in the same order as ``Image.open``, so the image object, and so its pixels, are the same (a
multi-picture JPEG, Pillow's "MPO", is opened as the "JPEG" it also is: its first picture).
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin

from imgstore.errors import InvalidImageError

# mode=None: what each Pillow mode decodes to (P and PA are decided per image: see stored_mode).
_AS_STORED = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}
_TO_L = {"1", "I", "F"}  # and every "I;16..." mode
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def stored_mode(image: Image.Image) -> str:
    """The mode an image decodes to with ``mode=None`` (the package docstring's policy)."""
    mode = image.mode
    if mode in _AS_STORED:
        return _AS_STORED[mode]
    if mode in _TO_L or mode.startswith("I;"):
        return "L"
    if mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    if mode == "PA":
        return "RGBA"
    if mode != "LAB" and ("A" in image.getbands() or "a" in image.getbands()):  # LAB's A is a colour
        return "RGBA"
    return "RGB"  # CMYK, YCbCr, LAB, HSV, ...


def open_image(data: bytes | memoryview) -> ImageFile.ImageFile:
    """The image in ``data``, opened (header read, pixels not decoded) as ``PIL.Image.open`` does."""
    fp = io.BytesIO(data)
    prefix = fp.read(16)
    declined: list[str] = []
    tried: set[str] = set()
    # Like Image.open: the common plugins first (cheap to import), then all of them.
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for format in list(Image.ID):
            if format in tried:
                continue
            tried.add(format)
            factory, accept = Image.OPEN[format]
            if format == "JPEG":
                # Not Pillow's jpeg_factory, which makes a camera's multi-picture JPEG an MPO image
                # and warns about a damaged MPO header: frame 0 is the same JPEG image either way.
                factory = JpegImagePlugin.JpegImageFile
            try:
                accepted = True if accept is None else accept(prefix)
                if isinstance(accepted, str):  # a plugin that would take it but cannot ("WEBP support not installed")
                    declined.append(accepted)
                    continue
                if not accepted:
                    continue
                if format == "GIF" and (canvas := _gif_canvas(data)) is not None:
                    check_size("GIF", canvas)  # before Pillow, which would warn while reading the first frame
                fp.seek(0)
                image = factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format after all: Image.open goes on to the next plugin too
            except InvalidImageError:
                raise
            except Image.DecompressionBombError as exc:
                raise InvalidImageError(f"a {format} decompression bomb: {exc}") from None
            except Exception as exc:
                raise InvalidImageError(f"a damaged {format} file: {type(exc).__name__}: {exc}") from None
            check_size(image.format or format, image.size)
            return image
    why = f" ({'; '.join(declined)})" if declined else ""
    raise InvalidImageError(f"not an image file that Pillow can read{why}")


def _gif_canvas(data: bytes | memoryview) -> tuple[int, int] | None:
    """The size Pillow gives a GIF when it opens it: the screen, grown to the first frame's extent.

    Walks the blocks as GifImagePlugin does (skipping unknown bytes); None where it cannot tell.
    """
    if len(data) < 13:
        return None
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while position < len(data) and data[position] != 0x3B:  # ";": the end of the file
        if data[position] == 0x2C:  # ",": the first image descriptor
            if position + 9 > len(data):
                return None
            left, top, frame_width, frame_height = struct.unpack_from("<4H", data, position + 1)
            return max(width, left + frame_width), max(height, top + frame_height)
        if data[position] == 0x21:  # "!": an extension, its label, then sub-blocks up to an empty one
            position += 2
            while position < len(data) and data[position]:
                position += 1 + data[position]
        position += 1
    return None


def check_size(format: str, size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidImageError(f"a {format} file whose header gives the size {width}x{height}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise InvalidImageError(
            f"a {format} file of {width}x{height} = {width * height} pixels, over PIL.Image.MAX_IMAGE_PIXELS "
            f"({limit}): a possible decompression bomb, not decoded"
        )


def draft_scale(width: int, height: int, size: tuple[int, int]) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that ``Image.draft`` picks: the largest that stays >= ``size`` (h, w)."""
    scale = min(width // size[1], height // size[0])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def finish(image: Image.Image, mode: str, size: tuple[int, int] | None) -> Image.Image:
    """``image`` (loaded) converted to ``mode``, then resized to ``size`` (h, w) with BILINEAR.

    Every decoder ends here, so a fast decoder's pixels go through the same Pillow steps.
    """
    if image.mode != mode:
        if image.mode == "P" and mode in ("RGB", "L"):
            # convert() warns for a palette with per-entry alpha ("should be converted to RGBA") and
            # then ignores the transparency; without it the pixels are the same and nothing warns.
            image.info.pop("transparency", None)
        try:
            image = image.convert(mode)
        except ValueError as exc:  # e.g. LAB to L: "conversion from LAB to RGB not supported"
            raise InvalidImageError(f"Pillow cannot convert this {image.mode} image to {mode}: {exc}") from None
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image


def to_array(image: Image.Image) -> np.ndarray:
    """The pixels of ``image`` as a [H, W, C] view (read-only: the caller copies it once, where it goes)."""
    array = np.asarray(image)
    return array.reshape(image.size[1], image.size[0], CHANNELS[image.mode])


def decode(data: bytes | memoryview, mode: str | None, size: tuple[int, int] | None) -> np.ndarray:
    image = open_image(data)
    format = image.format or "image"
    if size is not None and image.format == "JPEG":
        # A reduced-size decode (libjpeg's DCT scaling) straight to the smallest scale still >= size
        # (draft_scale, which the fast decoders use too); draft sets the size the decode must give.
        image.draft(image.mode, (size[1], size[0]))
    expected = image.size
    try:
        image.load()
    except Image.DecompressionBombError as exc:  # an inner part (a GIF frame, a TIFF tile) over the limit
        raise InvalidImageError(f"a {format} decompression bomb: {exc}") from None
    except Exception as exc:  # truncated or damaged data: OSError, SyntaxError, ValueError, EOFError, ...
        raise InvalidImageError(f"a damaged {format} file: {type(exc).__name__}: {exc}") from None
    if image.size != expected:
        raise InvalidImageError(f"a {format} file whose header gives the size {expected} decoded to {image.size}")
    return to_array(finish(image, mode or stored_mode(image), size))


def probe_info(data: bytes | memoryview) -> tuple[str, int, int, int, str]:
    """(format, height, width, channels with mode=None, Pillow mode) from the header alone."""
    image = open_image(data)
    format = image.format or "UNKNOWN"
    return format, image.size[1], image.size[0], CHANNELS[stored_mode(image)], image.mode
