"""Faster JPEG decoders than Pillow's: ``simplejpeg`` and ``turbojpeg`` (PyTurboJPEG), when installed.

They are libjpeg-turbo like Pillow's JPEG decoder, with the same IDCT, upsampling and colour
conversion, and they give Pillow's pixels bit for bit, at full size and at the DCT scales of a
``size=`` decode (checked on 176 JPEGs: matplotlib's and scikit-image's photos, and photos
encoded at qualities 30 to 100 with 4:4:4, 4:2:2 and 4:2:0 chroma, baseline and progressive, odd
sizes, grayscale); they are about 2x faster by skipping Pillow's per-file Python work. A library
version could change that, so each decoder is checked once per process against Pillow on a few
small JPEGs (4:2:0, 4:2:2 progressive, 4:4:4, grayscale; full size and half size): ``"auto"``
picks only a decoder that passed (:func:`resolve_decoder`). A decoder named explicitly is used
even if it did not (its difference is then its own).

A fast decoder takes only JPEGs whose colour space it converts like Pillow (YCbCr, grayscale);
CMYK and YCCK JPEGs, other formats, and any JPEG it cannot decode cleanly (a libjpeg warning is a
failure here) go through Pillow, which decides and words the error.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from imgstore.codecs.pillow import check_size, draft_scale, finish, to_array
from imgstore.errors import InvalidImageError, InvalidOptionError

PILLOW = "pillow"
AUTO = "auto"
#: Fastest first, as measured on a 500x375 photo of 106 KiB (simplejpeg 1.0 to 1.15 ms, turbojpeg 1.2 ms).
FAST = ("simplejpeg", "turbojpeg")
INSTALL_HINTS = {
    "simplejpeg": 'pip install "imgstore-ml[simplejpeg]"',
    "turbojpeg": 'pip install "imgstore-ml[turbojpeg]" (it also needs libjpeg-turbo\'s libturbojpeg; Debian: '
    "apt-get install libturbojpeg0)",
}
_HANDLED = ("Gray", "YCbCr")  # colour spaces a fast decoder converts exactly as Pillow does


class FastJpeg:
    """One fast decoder: a header read and a decode to RGB or gray at a DCT scale of 1, 2, 4 or 8."""

    name = ""

    def header(self, data: bytes | memoryview) -> tuple[int, int, str]:
        """(height, width, colour space: "Gray", "YCbCr" or another name)."""
        raise NotImplementedError

    def decode(self, data: bytes | memoryview, gray: bool, scale: int, height: int, width: int) -> np.ndarray:
        """[ceil(height / scale), ceil(width / scale), 1 or 3]; raises on any libjpeg warning."""
        raise NotImplementedError


class _Simplejpeg(FastJpeg):
    name = "simplejpeg"

    def __init__(self) -> None:
        import simplejpeg

        self._module: Any = simplejpeg

    def header(self, data: bytes | memoryview) -> tuple[int, int, str]:
        height, width, colorspace, _ = self._module.decode_jpeg_header(data)
        return int(height), int(width), str(colorspace)

    def decode(self, data: bytes | memoryview, gray: bool, scale: int, height: int, width: int) -> np.ndarray:
        # min_factor with the scaled size pins the scale to 1/scale (simplejpeg would also take 3/8, 5/8, ...).
        limits = {"min_height": -(-height // scale), "min_width": -(-width // scale), "min_factor": scale}
        array: np.ndarray = self._module.decode_jpeg(data, "GRAY" if gray else "RGB", strict=True, **limits)
        return array


class _Turbojpeg(FastJpeg):
    name = "turbojpeg"

    def __init__(self) -> None:
        import turbojpeg

        if not hasattr(turbojpeg.TurboJPEG, "_TurboJPEG__report_error"):
            # The override below is what keeps a damaged file from decoding half-way with a warning.
            raise RuntimeError("this PyTurboJPEG is not a 1.x (imgstore-ml[turbojpeg] pins PyTurboJPEG<2)")

        class StrictTurboJPEG(turbojpeg.TurboJPEG):  # type: ignore[misc]  # PyTurboJPEG has no type hints
            # PyTurboJPEG 1.x turns a libjpeg warning (a truncated or damaged file) into a Python
            # warning and returns the half-decoded image; here every reported problem is an error.
            def _TurboJPEG__report_error(self, handle: Any) -> None:
                raise OSError(self._TurboJPEG__get_error_string(handle))

        self._module: Any = turbojpeg
        self._decoder = StrictTurboJPEG()  # loads libturbojpeg: RuntimeError or OSError if missing or too old
        self._colorspaces = {turbojpeg.TJCS_GRAY: "Gray", turbojpeg.TJCS_YCbCr: "YCbCr"}
        self._flags = getattr(turbojpeg, "TJFLAG_STOPONWARNING", 8192)

    def header(self, data: bytes | memoryview) -> tuple[int, int, str]:
        width, height, _, colorspace = self._decoder.decode_header(data)
        return int(height), int(width), self._colorspaces.get(colorspace, f"TJCS {colorspace}")

    def decode(self, data: bytes | memoryview, gray: bool, scale: int, height: int, width: int) -> np.ndarray:
        tj = self._module
        array: np.ndarray = self._decoder.decode(
            data,
            pixel_format=tj.TJPF_GRAY if gray else tj.TJPF_RGB,
            scaling_factor=None if scale == 1 else (1, scale),
            flags=self._flags,
        )
        return array


_CLASSES: dict[str, type[FastJpeg]] = {"simplejpeg": _Simplejpeg, "turbojpeg": _Turbojpeg}
_loaded: dict[str, tuple[FastJpeg | None, bool, str]] = {}  # name -> (decoder or None, exact, why not)
_guard = threading.Lock()


def _new_guard() -> None:
    global _guard
    _guard = threading.Lock()  # a fork while another thread held it would leave the child's copy held forever


os.register_at_fork(after_in_child=_new_guard)


def _samples() -> list[bytes]:
    """Small JPEGs with a photo's mix of smooth and busy areas, odd sizes (partial MCUs) included."""
    rng = np.random.default_rng(20240601)
    y, x = np.mgrid[0:45, 0:61]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 24, smooth.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    blobs = []
    for source, options in (
        (image, {"quality": 90}),
        (image, {"quality": 75, "subsampling": 1, "progressive": True}),
        (image, {"quality": 95, "subsampling": 0}),
        (image.convert("L"), {"quality": 90}),
    ):
        buffer = io.BytesIO()
        source.save(buffer, "JPEG", **options)
        blobs.append(buffer.getvalue())
    return blobs


def _check(decoder: FastJpeg) -> bool:
    """Whether ``decoder`` gives Pillow's pixels (``convert("RGB")``, at full and half size) on the samples."""
    for blob in _samples():
        for size in (None, (20, 28)):
            reference = Image.open(io.BytesIO(blob))
            if size is not None:
                reference.draft(reference.mode, (size[1], size[0]))
            expected = np.asarray(reference.convert("RGB"))
            got = fast_decode(decoder, blob, "RGB", None, scale_for=size)
            if got is None:
                raise RuntimeError("it cannot decode a plain JPEG")
            if not np.array_equal(got, expected):
                return False
    return True


def load(name: str) -> tuple[FastJpeg | None, bool, str]:
    """(the decoder, whether it matched Pillow, why it is missing), once per process."""
    with _guard:
        if name not in _loaded:
            try:
                decoder = _CLASSES[name]()
                exact = _check(decoder)
            except Exception as exc:  # ImportError; the library missing or too old (RuntimeError, OSError); or
                # it imports but fails on a plain JPEG: as good as missing
                lines = str(exc).strip().splitlines()
                _loaded[name] = (None, False, f"{type(exc).__name__}: {lines[0] if lines else ''}")
            else:
                _loaded[name] = (decoder, exact, "")
        return _loaded[name]


def available_decoders() -> list[str]:
    """``"pillow"``, then each fast JPEG decoder that imports and decodes here."""
    return [PILLOW] + [name for name in FAST if load(name)[0] is not None]


def resolve_decoder(name: str) -> str:
    """The decoder ``name`` stands for: ``"auto"`` is the fastest installed one that matches Pillow exactly."""
    if not isinstance(name, str) or name not in (AUTO, PILLOW, *FAST):
        raise InvalidOptionError(f"no decoder named {name!r}; decoders: {AUTO}, {PILLOW}, {', '.join(FAST)}")
    if name == AUTO:
        return next((fast for fast in FAST if load(fast)[1]), PILLOW)
    if name != PILLOW and load(name)[0] is None:
        raise InvalidOptionError(f"the {name} decoder is not available ({load(name)[2]}): {INSTALL_HINTS[name]}")
    return name


def decoder_object(name: str) -> FastJpeg | None:
    """The fast decoder a resolved name stands for (None for Pillow)."""
    return None if name == PILLOW else load(name)[0]


def fast_decode(
    decoder: FastJpeg,
    data: bytes | memoryview,
    mode: str | None,
    size: tuple[int, int] | None,
    scale_for: tuple[int, int] | None = None,
) -> np.ndarray | None:
    """The JPEG ``data`` decoded by ``decoder``, or None where Pillow must decode it.

    ``scale_for`` decodes at the DCT scale ``size`` would, without the resize (the self-check).
    """
    try:
        height, width, colorspace = decoder.header(data)
    except Exception:
        return None
    if colorspace not in _HANDLED:
        return None
    try:
        check_size("JPEG", (width, height))
    except InvalidImageError:
        return None  # Pillow raises the same error, in the same words as for any other format
    gray = colorspace == "Gray" and mode in (None, "L")
    target = size or scale_for
    scale = draft_scale(width, height, target) if target else 1
    try:
        array = decoder.decode(data, gray, scale, height, width)
    except Exception:
        return None
    scaled = (-(-height // scale), -(-width // scale), 1 if gray else 3)
    if array.shape != scaled or array.dtype != np.uint8:
        return None  # not what the header said: let Pillow decode (and check) it
    decoded_mode = "L" if gray else "RGB"
    wanted = mode or decoded_mode
    if wanted == decoded_mode and (size is None or scaled[:2] == size):
        return array
    pixels = np.ascontiguousarray(array)
    image = Image.frombuffer(decoded_mode, (scaled[1], scaled[0]), pixels, "raw", decoded_mode, 0, 1)
    return to_array(finish(image, wanted, size))
