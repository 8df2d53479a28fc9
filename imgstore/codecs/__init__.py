"""Image codecs and decoders: how a store turns arrays into bytes and any image file back into arrays.

A store keeps one *codec* (named in its manifest): ``raw`` (pixels behind a small shape header),
``png`` (lossless, 1 to 4 channels), ``jpeg`` (lossy, 1 or 3 channels), ``webp`` (3 or 4 channels,
lossy or lossless) or ``keep`` (encoded files stored as given, in any format Pillow opens; arrays
as PNG). :func:`get_codec` makes one from its name and parameters; :func:`register_codec` adds one.

Decoding reads the format from the blob itself, so one call reads any store's records.

Decoded arrays are uint8 [H, W, C], owned, writable and C-contiguous; C is 1 for grayscale, so a
[H, W] array stored with png, jpeg or keep comes back [H, W, 1]. Blobs of the ``raw`` codec decode
to the shape they were given (a [H, W] array stays [H, W]).

Mode policy
-----------
``mode=None``, as stored: L is 1 channel, LA 2, RGB 3, RGBA 4. Other Pillow modes are converted
with Pillow's own ``convert``: ``1``, ``I``, ``I;16`` and ``F`` to L (values outside 0 .. 255
clip); P and PA to RGBA if the image has transparency (PA always), else RGB; CMYK, YCbCr, LAB,
HSV and other colour modes to RGB (a conversion Pillow cannot do raises
:class:`~imgstore.errors.InvalidImageError`). ``mode="RGB"`` is exactly
``PIL.Image.open(f).convert("RGB")``, what torchvision's ``ImageFolder`` loader gives, bit for
bit, and ``mode="L"`` is ``.convert("L")`` (``"LA"`` and ``"RGBA"`` are Pillow's ``convert``
too). An animated image gives its first frame; a camera's multi-picture JPEG (Pillow's "MPO")
is read, and probed, as the JPEG it also is.

Decoders
--------
``decoder="pillow"`` decodes every format. ``"simplejpeg"`` and ``"turbojpeg"`` decode JPEGs about
2x faster (a 500x375 photo of 106 KiB: 1.0 to 1.2 ms against Pillow's 1.9 to 2.3 ms; 3x on 64x64
images), only those in YCbCr or grayscale; everything else still goes through Pillow. ``"auto"``
(the default) is the fastest one installed that gives Pillow's pixels exactly, checked once per
process: so ``mode="RGB"`` stays bit-exact with torchvision whichever decoder runs. Install them
with ``pip install "imgstore-ml[simplejpeg]"`` or ``"imgstore-ml[turbojpeg]"``.

``size=(h, w)``
---------------
Decodes each image straight to exactly h x w: a JPEG is decoded at the smallest DCT scale (1/2,
1/4 or 1/8, what ``Image.draft`` picks) still at least h x w, then every image is resized with
Pillow's ``Image.resize(..., Image.Resampling.BILINEAR)`` (antialiased, as torchvision's
``Resize`` on a PIL image), after the mode conversion. :func:`decode_many` then returns one
[N, h, w, C] array (every image must decode to the same C: ``mode="RGB"`` or ``"L"`` makes sure).

Threads
-------
:func:`decode_many` and :func:`encode_many` split a batch of 4 images or more, of 4 KiB or more
on average (smaller ones are mostly Python work that holds the GIL), over a thread pool of one
thread per core (the decoders and encoders release the GIL); ``threads=1`` runs in the calling
thread. A forked child (a DataLoader worker) gets a fresh pool.

Errors
------
A bad blob (empty, truncated, not an image, a zero size, a decompression bomb: more pixels than
``PIL.Image.MAX_IMAGE_PIXELS``, a decoded size other than the header's) raises
:class:`~imgstore.errors.InvalidImageError`; a bad argument raises
:class:`~imgstore.errors.InvalidOptionError`. Nothing is set in Pillow (no ``LOAD_TRUNCATED_IMAGES``).
Pillow's ``DecompressionBombWarning`` never shows: a bomb is an error before Pillow would warn.
Warnings are avoided, not caught (the warnings filters are process-wide and not thread-safe to
change), so the UserWarnings Pillow gives about a damaged TIFF's tags (it skips the tag and reads
on) or an ICO whose image is not the size its directory gives still pass through.
"""

from __future__ import annotations

from imgstore.codecs.api import decode, decode_many, encode_many, is_whole, probe
from imgstore.codecs.base import Codec, ImageInfo, Param
from imgstore.codecs.encoders import JpegCodec, KeepCodec, PngCodec, WebpCodec
from imgstore.codecs.fast_jpeg import available_decoders, resolve_decoder
from imgstore.codecs.raw import RawCodec
from imgstore.codecs.registry import available_codecs, get_codec, register_codec

__all__ = [
    "Codec",
    "ImageInfo",
    "JpegCodec",
    "KeepCodec",
    "Param",
    "PngCodec",
    "RawCodec",
    "WebpCodec",
    "available_codecs",
    "available_decoders",
    "decode",
    "decode_many",
    "encode_many",
    "get_codec",
    "is_whole",
    "probe",
    "register_codec",
    "resolve_decoder",
]
