"""imgstore.codecs: codecs, decoders, the mode policy (bit-exact with Pillow's convert), size=, threads, bad input."""

from __future__ import annotations

import io
import multiprocessing
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgstore import codecs
from imgstore.codecs import (
    Codec,
    ImageInfo,
    api,
    available_codecs,
    available_decoders,
    decode,
    decode_many,
    encode_many,
    fast_jpeg,
    get_codec,
    pool,
    probe,
    raw,
    register_codec,
    resolve_decoder,
)
from imgstore.errors import InvalidImageError, InvalidOptionError


@pytest.fixture(autouse=True)
def no_warnings() -> Iterator[None]:
    """A warning anywhere in these tests fails them: the codecs must never let one through.

    Recorded, not raised: a warning raised as an exception could be caught and reworded as an
    InvalidImageError, and the test would not see it.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


DECODERS = ["pillow", "simplejpeg", "turbojpeg"]


@pytest.fixture(params=DECODERS)
def decoder(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name != "pillow":
        pytest.importorskip(name)
        if name not in available_decoders():
            pytest.skip(f"{name} imports but does not work here: {fast_jpeg.load(name)[2]}")
    return name


def photo(height: int, width: int, channels: int = 3, seed: int = 0, noise: float = 12) -> np.ndarray:
    """A photo-like image: smooth gradients, edges and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    bands = [(x * (3 + c) + y * (5 - c)) % 256 + 40 * ((x // 7 + y // 5) % 2) for c in range(channels)]
    pixels = np.stack(bands, axis=-1) + rng.normal(0, noise, (height, width, channels))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def real_jpeg() -> bytes:
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as file:  # a real camera JPEG, 512x600
        data: bytes = file.read()
    return data


def _sample_files() -> dict[str, bytes]:
    rgb = Image.fromarray(photo(45, 61))
    rgba = Image.fromarray(photo(45, 61, 4, seed=1))
    gray = rgb.convert("L")
    palette = rgb.quantize(64)
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = bytes(range(0, 256, 4))  # per-entry alpha (tRNS)
    palette_key = palette.copy()
    palette_key.info["transparency"] = 5  # one transparent entry
    deep = Image.fromarray(photo(45, 61, 1)[:, :, 0].astype(np.uint16) * 3)  # I;16, values over 255 too
    return {
        "jpeg-420": encoded(rgb, "JPEG", quality=90),
        "jpeg-444": encoded(rgb, "JPEG", quality=95, subsampling=0),
        "jpeg-422-progressive": encoded(rgb, "JPEG", quality=80, subsampling=1, progressive=True),
        "jpeg-gray": encoded(gray, "JPEG", quality=90),
        "jpeg-gray-progressive": encoded(gray, "JPEG", quality=70, progressive=True),
        "jpeg-cmyk": encoded(rgb.convert("CMYK"), "JPEG", quality=90),
        "jpeg-odd-size": encoded(Image.fromarray(photo(17, 9)), "JPEG", quality=85),
        "png-L": encoded(gray, "PNG"),
        "png-LA": encoded(rgba.convert("LA"), "PNG"),
        "png-P": encoded(palette, "PNG"),
        "png-P-alpha": encoded(palette_alpha, "PNG"),
        "png-P-key": encoded(palette_key, "PNG"),
        "png-RGB": encoded(rgb, "PNG"),
        "png-RGBA": encoded(rgba, "PNG"),
        "png-I;16": encoded(deep, "PNG"),
        "png-1": encoded(gray.convert("1"), "PNG"),
        "webp-lossy": encoded(rgb, "WEBP", quality=80),
        "webp-RGBA-lossless": encoded(rgba, "WEBP", lossless=True),
        "gif": encoded(palette, "GIF"),
        "gif-transparent": encoded(palette_key, "GIF", transparency=5),
        "bmp-RGB": encoded(rgb, "BMP"),
        "bmp-P": encoded(palette, "BMP"),
        "tiff-RGB": encoded(rgb, "TIFF"),
        "tiff-CMYK": encoded(rgb.convert("CMYK"), "TIFF"),
        "tiff-I;16": encoded(deep, "TIFF"),
        "tiff-I": encoded(Image.fromarray(photo(45, 61, 1)[:, :, 0].astype(np.int32) * 2 - 100), "TIFF"),
        "tiff-F": encoded(Image.fromarray(photo(45, 61, 1)[:, :, 0].astype(np.float32) * 1.7 - 50.3), "TIFF"),
        "tiff-LAB": encoded(Image.merge("LAB", rgb.split()), "TIFF"),
        "tiff-YCbCr": encoded(rgb.convert("YCbCr"), "TIFF"),
    }


SAMPLES = _sample_files()
# What mode=None gives per sample (the package docstring's policy).
STORED = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "1": "L", "I;16": "L", "I": "L", "F": "L"}
STORED |= {"CMYK": "RGB", "LAB": "RGB", "YCbCr": "RGB"}


def pillow_convert(blob: bytes, mode: str) -> np.ndarray:
    """What torchvision's loader does: ``Image.open(f).convert(mode)`` (as [H, W, C])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a palette with per-entry alpha warns on convert("RGB")
        array = np.asarray(Image.open(io.BytesIO(blob)).convert(mode))
    return array.reshape(array.shape[0], array.shape[1], -1)


def expected_stored_mode(blob: bytes) -> str:
    image = Image.open(io.BytesIO(blob))
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return STORED[image.mode]


def assert_fresh(array: np.ndarray) -> None:
    assert array.dtype == np.uint8 and array.flags.c_contiguous and array.flags.writeable and array.flags.owndata


# ---------------------------------------------------------------------------------------------- codecs


def test_registry_and_parameters() -> None:
    assert available_codecs()[:5] == ["raw", "png", "jpeg", "webp", "keep"]
    assert get_codec("jpeg").params == {"quality": 90}
    assert get_codec("webp").params == {"quality": 90, "lossless": False}
    assert get_codec("png").params == {"compress_level": 1}
    assert get_codec("png", compress_level=9).params == {"compress_level": 9}
    assert get_codec("raw").params == {} and get_codec("keep").params == {}
    assert get_codec("jpeg", quality=np.int64(50)).params == {"quality": 50}
    assert get_codec("jpeg", quality=70) == get_codec("jpeg", quality=70) != get_codec("jpeg")
    with pytest.raises(InvalidOptionError, match="no codec named 'gif'; codecs: raw, png, jpeg, webp, keep"):
        get_codec("gif")
    for name, params, words in [
        ("jpeg", {"quality": 0}, "quality takes an integer in 1 .. 100"),
        ("jpeg", {"quality": 101}, "quality takes an integer in 1 .. 100"),
        ("jpeg", {"quality": "90"}, "quality takes"),
        ("jpeg", {"quality": True}, "got a bool"),
        ("jpeg", {"qualty": 90}, "no parameter qualty; the parameters it takes: quality"),
        ("png", {"compress_level": 10}, "compress_level takes an integer in 0 .. 9"),
        ("webp", {"lossless": 1}, "lossless takes a bool"),
        ("raw", {"quality": 90}, "'raw' has no parameter quality; the parameters it takes: none"),
        ("keep", {"compress_level": 1}, "'keep' has no parameter compress_level"),
    ]:
        with pytest.raises(InvalidOptionError, match=words):
            get_codec(name, **params)


def test_register_codec() -> None:
    class Upside(Codec):
        name = "test-upside"
        accepts = frozenset()

        def encode(self, image: np.ndarray) -> bytes:
            return raw.pack(np.ascontiguousarray(image[::-1]))

        def extension(self, info: ImageInfo) -> str:
            return ".raw"

    class Other(Upside):
        pass

    register_codec(Upside)
    register_codec(Upside)  # the same class again is fine
    try:
        assert "test-upside" in available_codecs() and isinstance(get_codec("test-upside"), Upside)
        with pytest.raises(InvalidOptionError, match="registered already"):
            register_codec(Other)
        register_codec(Other, clobber=True)
        assert type(get_codec("test-upside")) is Other
    finally:
        codecs.registry._codecs.pop("test-upside")
    with pytest.raises(InvalidOptionError, match="Codec subclass"):
        register_codec(int)  # type: ignore[arg-type]

    class Nameless(Codec):
        pass

    with pytest.raises(InvalidOptionError, match="has no name"):
        register_codec(Nameless)


@pytest.mark.parametrize("codec", ["png", "keep"])
@pytest.mark.parametrize("channels", [0, 1, 2, 3, 4])  # 0: a [H, W] array
def test_lossless_round_trip(codec: str, channels: int) -> None:
    image = photo(13, 21, max(channels, 1))
    if channels == 0:
        image = image[:, :, 0]
    blob = get_codec(codec).encode(image)
    info = probe(blob)
    assert (info.format, info.height, info.width, info.channels) == ("PNG", 13, 21, max(channels, 1))
    back = decode(blob)
    assert_fresh(back)
    assert np.array_equal(back, image.reshape(13, 21, -1))  # [H, W] comes back [H, W, 1]


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("opaque", [False, True])
def test_webp_lossless_round_trip(channels: int, opaque: bool) -> None:
    image = photo(13, 21, channels, seed=2)
    if channels == 4:
        image[..., 3] = 255 if opaque else np.arange(21, dtype=np.uint8) * 12
    blob = get_codec("webp", lossless=True).encode(image)
    assert probe(blob) == ImageInfo("WEBP", 13, 21, channels, "RGBA" if channels == 4 else "RGB")
    # An all-255 alpha still decodes to 4 channels (libwebp would drop it), fully transparent colour is kept.
    assert np.array_equal(decode(blob), image)


@pytest.mark.parametrize(
    ("codec", "channels", "tolerance"),
    [("jpeg", 0, 4.0), ("jpeg", 1, 4.0), ("jpeg", 3, 9.0), ("webp", 3, 8.0), ("webp", 4, 8.0)],
)
def test_lossy_round_trip(codec: str, channels: int, tolerance: float) -> None:
    image = photo(48, 64, max(channels, 1), seed=3, noise=2)
    if channels == 0:
        image = image[:, :, 0]
    if channels == 4:
        image[..., 3] = 255  # opaque: it must still come back with its alpha
    back = decode(get_codec(codec).encode(image))
    assert back.shape == (48, 64, max(channels, 1))
    assert np.abs(back.astype(int) - image.reshape(back.shape)).mean() < tolerance
    if channels == 4:
        assert (back[..., 3] == 255).all()
    low = decode(get_codec(codec, quality=5).encode(image))  # the quality reaches the encoder
    assert np.abs(low.astype(int) - image.reshape(back.shape)).mean() > tolerance


@pytest.mark.parametrize("shape", [(5,), (13, 21), (13, 21, 1), (13, 21, 3), (13, 21, 7), (2, 3, 4, 5), (1,) * 8])
def test_raw_round_trip(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    blob = get_codec("raw").encode(image)
    assert blob[:8] == raw.MAGIC and len(blob) == 10 + 4 * len(shape) + image.size
    back = decode(blob)
    assert_fresh(back)
    assert back.shape == shape and np.array_equal(back, image)  # its own shape, not [H, W, C]
    info = probe(blob)
    assert (info.format, info.height) == ("RAW", shape[0])
    modes = {(13, 21): "L", (13, 21, 1): "L", (13, 21, 3): "RGB"}
    assert info.mode == modes.get(shape, f"RAW{len(shape)}")
    # Non-contiguous input is fine.
    assert np.array_equal(decode(get_codec("raw").encode(image[::-1])), image[::-1])
    [back_many] = decode_many([blob])
    assert np.array_equal(back_many, image)


def test_raw_images_with_mode_and_size() -> None:
    image = photo(20, 30, 4, seed=5)
    blob = get_codec("raw").encode(image)
    expected = np.asarray(Image.fromarray(image).convert("RGB"))
    assert np.array_equal(decode(blob, mode="RGB"), expected)
    resized = decode(blob, size=(10, 15))
    assert resized.shape == (10, 15, 4)
    assert np.array_equal(resized, np.asarray(Image.fromarray(image).resize((15, 10), Image.Resampling.BILINEAR)))
    gray = get_codec("raw").encode(image[:, :, 0])
    assert decode(gray, size=(5, 5)).shape == (5, 5, 1) and decode(gray, mode="L").shape == (20, 30, 1)
    for bad, kwargs in [
        (image[:, :, :2], {"size": (5, 5)}),  # LA: only with a mode
        (np.zeros((4, 4, 5), np.uint8), {"size": (2, 2)}),
        (np.zeros((4, 4, 5), np.uint8), {"mode": "RGB"}),
        (np.zeros((4,), np.uint8), {"mode": "L"}),
    ]:
        with pytest.raises(InvalidImageError, match="is not an image of"):
            decode(get_codec("raw").encode(bad), **kwargs)
    assert decode(get_codec("raw").encode(image[:, :, :2]), mode="RGB", size=(5, 5)).shape == (5, 5, 3)


def test_encode_refusals() -> None:
    for codec, image, words in [
        ("jpeg", np.zeros((4, 4, 2), np.uint8), "C in 1, 3"),
        ("jpeg", np.zeros((4, 4, 4), np.uint8), "C in 1, 3"),
        ("webp", np.zeros((4, 4), np.uint8), "WebP has no grayscale"),
        ("webp", np.zeros((4, 4, 1), np.uint8), "WebP has no grayscale"),
        ("webp", np.zeros((4, 4, 2), np.uint8), "C in 3, 4"),
        ("png", np.zeros((4, 4, 5), np.uint8), "C in 1, 2, 3, 4"),
        ("png", np.zeros((4, 4, 3), np.float32), "uint8"),
        ("png", np.zeros((0, 4, 3), np.uint8), "H, W >= 1"),
        ("keep", np.zeros((2, 4, 4, 3), np.uint8), "C in 1, 2, 3, 4"),
        ("png", [[1, 2]], "numpy arrays"),
        ("raw", np.zeros((1,) * 9, np.uint8), "1 to 8 dimensions"),
        ("raw", np.zeros((3, 0), np.uint8), "each >= 1"),
        ("raw", np.zeros(3, np.int16), "uint8"),
        ("webp", np.zeros((4, 17000, 3), np.uint8), "cannot encode"),  # over WebP's 16383 pixels a side
    ]:
        with pytest.raises(InvalidImageError, match=words):
            get_codec(codec).encode(image)  # type: ignore[arg-type]


def test_extensions_and_accepts() -> None:
    info = ImageInfo("PNG", 1, 1, 1, "L")
    assert [get_codec(name).extension(info) for name in ("raw", "png", "jpeg", "webp")] == [
        ".raw",
        ".png",
        ".jpg",
        ".webp",
    ]
    keep = get_codec("keep")
    suffixes = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif"}
    suffixes |= {"BMP": ".bmp", "PPM": ".pbm", "NOSUCHFORMAT": ".bin"}
    for format, suffix in suffixes.items():
        assert keep.extension(ImageInfo(format, 1, 1, 3, "RGB")) == suffix
    assert get_codec("jpeg").accepts == {"JPEG"} and get_codec("png").accepts == {"PNG"}
    assert get_codec("webp").accepts == {"WEBP"} and get_codec("keep").accepts is None
    assert get_codec("raw").accepts == frozenset()


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decode_is_pillows_convert(name: str, decoder: str) -> None:
    """mode="RGB" / "L" are Image.open(f).convert(...) bit for bit, with every decoder; mode=None is the policy."""
    blob = SAMPLES[name]
    for mode in ("RGB", "L"):
        try:
            expected = pillow_convert(blob, mode)
        except ValueError:  # Pillow cannot convert LAB to L: neither can decode
            with pytest.raises(InvalidImageError, match="cannot convert"):
                decode(blob, mode=mode, decoder=decoder)
            continue
        got = decode(blob, mode=mode, decoder=decoder)
        assert_fresh(got)
        assert np.array_equal(got, expected), mode
    stored = expected_stored_mode(blob)
    got = decode(blob, decoder=decoder)
    assert got.shape[2] == {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[stored]
    assert np.array_equal(got, pillow_convert(blob, stored))
    assert np.array_equal(decode(blob, mode="RGBA", decoder=decoder), pillow_convert(blob, "RGBA"))


def test_real_photo_is_exact(decoder: str) -> None:
    blob = real_jpeg()
    for data in (blob, encoded(Image.open(io.BytesIO(blob)), "JPEG", quality=75, subsampling=2)):
        assert np.array_equal(decode(data, mode="RGB", decoder=decoder), pillow_convert(data, "RGB"))
        assert np.array_equal(decode(data, mode="L", decoder=decoder), pillow_convert(data, "L"))


def test_multi_picture_jpeg(decoder: str) -> None:
    """A camera's MPO file is a JPEG (its first picture); a damaged MPO header is no warning, only a JPEG."""
    first = Image.fromarray(photo(30, 40))
    mpo = encoded(first, "MPO", save_all=True, append_images=[first.rotate(90)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert probe(mpo) == ImageInfo("JPEG", 30, 40, 3, "RGB")
    damaged = bytearray(mpo)
    start = damaged.index(b"MPF\x00")
    damaged[start + 4 : start + 6] = b"XX"  # the MP header's byte order mark
    for blob in (mpo, bytes(damaged)):
        assert np.array_equal(decode(blob, mode="RGB", decoder=decoder), pillow_convert(blob, "RGB"))
        assert np.array_equal(decode(blob, size=(15, 20), decoder=decoder), decode(blob, size=(15, 20)))


def test_size_is_the_same_with_every_decoder(decoder: str) -> None:
    """A size= decode is a DCT-scaled decode plus a BILINEAR resize: the same pixels from every decoder."""
    blob = real_jpeg()  # 600x512
    for size in [(300, 256), (150, 128), (100, 100), (75, 64), (40, 30), (600, 512), (700, 700)]:
        ours = decode(blob, mode="RGB", size=size, decoder=decoder)
        assert ours.shape == (*size, 3)
        assert np.array_equal(ours, decode(blob, mode="RGB", size=size, decoder="pillow"))
        full = Image.open(io.BytesIO(blob)).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)
        assert np.abs(ours.astype(int) - np.asarray(full)).mean() < 3.5, size  # measured: 0 to 2.9
    gray = decode(blob, mode="L", size=(75, 64), decoder=decoder)
    assert gray.shape == (75, 64, 1)


def test_size_batches() -> None:
    blobs = [SAMPLES[name] for name in ("jpeg-420", "png-P-alpha", "gif", "tiff-CMYK", "jpeg-gray", "webp-lossy")]
    blobs.append(get_codec("raw").encode(photo(9, 9)))
    batch = decode_many(blobs, mode="RGB", size=(24, 32))
    assert isinstance(batch, np.ndarray) and batch.shape == (7, 24, 32, 3)
    assert_fresh(batch)
    for k, blob in enumerate(blobs):
        assert np.array_equal(batch[k], decode(blob, mode="RGB", size=(24, 32)))
    assert decode_many(blobs, mode="L", size=(8, 8)).shape == (7, 8, 8, 1)
    with pytest.raises(InvalidImageError, match="same channel count"):
        decode_many(blobs, size=(8, 8))  # mode=None: RGB, RGBA and L images
    same = decode_many([SAMPLES["png-RGBA"], SAMPLES["webp-RGBA-lossless"]], size=(8, 8))
    assert same.shape == (2, 8, 8, 4)
    assert decode_many([], mode="RGB", size=(8, 8)).shape == (0, 8, 8, 3)
    assert decode_many([], size=(8, 8)).shape == (0, 8, 8, 0)
    assert decode_many([]) == []
    listed = decode_many(blobs, mode="RGB")
    assert isinstance(listed, list) and [a.shape for a in listed][:2] == [(45, 61, 3), (45, 61, 3)]


# ---------------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_probe(name: str) -> None:
    blob = SAMPLES[name]
    image = Image.open(io.BytesIO(blob))
    stored = expected_stored_mode(blob)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[stored]
    assert probe(blob) == ImageInfo(image.format or "", image.height, image.width, channels, image.mode)
    assert probe(memoryview(blob)) == probe(bytearray(blob)) == probe(blob)


def test_blob_types() -> None:
    blob = SAMPLES["jpeg-420"]
    expected = decode(blob)
    assert np.array_equal(decode(bytearray(blob)), expected)
    assert np.array_equal(decode(memoryview(blob)), expected)
    assert np.array_equal(decode(memoryview(np.frombuffer(blob, np.uint8))), expected)
    padded = np.frombuffer(blob + b"\0" * (-len(blob) % 4), np.uint32)  # a memoryview of another item size
    assert probe(memoryview(padded)).format == "JPEG"
    for bad in ("text", 12, None, [blob]):
        with pytest.raises(InvalidImageError, match="bytes or a memoryview"):
            decode(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match="sequence of encoded images, not one"):
        decode_many(blob)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- bad input


def png_file(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real bomb: a valid side x side PNG of zeros, under 1 MB on disk (side * (side + 1) bytes inflated).

    Built from one full-flushed deflate segment repeated (a segment after a full flush is the same
    bytes for the same input), so that making 900 MB of zeros' stream takes milliseconds.
    """
    block = side + 1  # one row: its filter byte, then the pixels
    rows = 100 if side % 100 == 0 else 1
    deflater = zlib.compressobj(9)
    first = deflater.compress(bytes(block * rows)) + deflater.flush(zlib.Z_FULL_FLUSH)
    again = deflater.compress(bytes(block * rows)) + deflater.flush(zlib.Z_FULL_FLUSH)
    assert again == first[2:]  # the same bytes, without the zlib header
    total = block * side
    adler = ((total % 65521) << 16) | 1  # Adler-32 of `total` zero bytes
    stream = first + again * (side // rows - 1) + b"\x03\x00" + struct.pack(">I", adler)
    return png_file(side, side, stream)


def test_png_bomb_builder_is_a_real_png() -> None:
    small = png_bomb(300)
    assert zlib.decompress(small[41:-16]) == bytes(301 * 300)
    assert np.array_equal(decode(small), np.zeros((300, 300, 1), np.uint8))


@pytest.mark.parametrize("side", [10_000, 30_000])  # 10 000: where Pillow would only warn; 30 000: raise
def test_decompression_bombs(side: int, decoder: str) -> None:
    bomb = png_bomb(side)
    assert len(bomb) < 1_000_000
    for call in (probe, lambda blob: decode(blob, decoder=decoder), lambda blob: decode_many([blob] * 4)):
        with pytest.raises(InvalidImageError, match="decompression bomb"):
            call(bomb)
    jpeg = bytearray(SAMPLES["jpeg-420"])  # a JPEG whose header claims 60000x60000
    start = jpeg.index(b"\xff\xc0")
    jpeg[start + 5 : start + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode(bytes(jpeg), decoder=decoder)


def test_gif_bomb_frame() -> None:
    """A GIF whose first frame reaches far past its 1x1 screen: Pillow would warn while opening it."""
    gif = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    gif += b"!\xfe\x03abc\x00" + b"?"  # a comment extension, then a byte Pillow skips
    for side in (10_000, 30_000):
        bomb = gif + b"," + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00;"
        for call in (probe, decode):
            with pytest.raises(InvalidImageError, match="decompression bomb"):
                call(bomb)


def _truncated_and_damaged() -> dict[str, bytes]:
    jpeg = SAMPLES["jpeg-420"]
    cases = {
        "empty": b"",
        "random": np.random.default_rng(6).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text": b"This is a text file, not an image.\n" * 20,
        "jpeg-start-only": b"\xff\xd8\xff",
        "jpeg-header-only": jpeg[: jpeg.index(b"\xff\xda") + 20],
        "jpeg-truncated": jpeg[: len(jpeg) // 2],
        "progressive-truncated": SAMPLES["jpeg-422-progressive"][: len(SAMPLES["jpeg-422-progressive"]) // 2],
        "gray-jpeg-truncated": SAMPLES["jpeg-gray"][:-200],
        "png-truncated": SAMPLES["png-RGB"][: len(SAMPLES["png-RGB"]) // 2],
        "png-zero-size": png_file(0, 10, zlib.compress(b"")),
        "png-garbage-idat": png_file(10, 10, b"not zlib data at all"),
        "webp-truncated": SAMPLES["webp-lossy"][:60],
        "gif-truncated": SAMPLES["gif"][:40],
        "tiff-truncated": SAMPLES["tiff-RGB"][:200],
        "bmp-truncated": SAMPLES["bmp-RGB"][:100],
        "raw-bad-version": raw.MAGIC + bytes([2, 1]) + struct.pack("<I", 1) + b"x",
        "raw-0-dims": raw.MAGIC + bytes([1, 0]),
        "raw-9-dims": raw.MAGIC + bytes([1, 9]) + struct.pack("<9I", *[1] * 9) + b"x",
        "raw-zero-dim": raw.MAGIC + bytes([1, 2]) + struct.pack("<2I", 3, 0),
        "raw-short-header": raw.MAGIC + bytes([1, 3]) + struct.pack("<2I", 3, 3),
        "raw-too-few-pixels": raw.MAGIC + bytes([1, 2]) + struct.pack("<2I", 3, 3) + bytes(8),
        "raw-too-many-pixels": raw.MAGIC + bytes([1, 2]) + struct.pack("<2I", 3, 3) + bytes(10),
        "raw-over-2-GiB": raw.MAGIC + bytes([1, 3]) + struct.pack("<3I", 65536, 65536, 3) + bytes(10),
    }
    return cases


BAD = _truncated_and_damaged()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_blobs(name: str, decoder: str) -> None:
    blob = BAD[name]
    with pytest.raises(InvalidImageError) as caught:
        decode(blob, decoder=decoder)
    assert str(caught.value)
    with pytest.raises(InvalidImageError):
        decode(blob, mode="RGB", size=(8, 8), decoder=decoder)
    with pytest.raises(InvalidImageError):
        decode_many([SAMPLES["jpeg-420"]] * 8 + [blob] + [SAMPLES["png-RGB"]] * 8, decoder=decoder, threads=2)
    if name.endswith(("-truncated", "header-only", "garbage-idat")):
        return  # the header is fine: probe reads only that
    with pytest.raises(InvalidImageError):
        probe(blob)


def test_error_messages() -> None:
    with pytest.raises(InvalidImageError, match="empty blob"):
        decode(b"")
    with pytest.raises(InvalidImageError, match="not an image file that Pillow can read"):
        probe(BAD["text"])
    with pytest.raises(InvalidImageError, match="damaged JPEG file.*truncated"):
        decode(BAD["jpeg-truncated"])
    with pytest.raises(InvalidImageError, match="size 0x10|not an image file"):  # Pillow's PNG plugin refuses it
        probe(BAD["png-zero-size"])
    with pytest.raises(InvalidImageError, match=r"has 9 bytes of pixels, but the blob holds 10"):
        probe(BAD["raw-too-many-pixels"])
    with pytest.raises(InvalidImageError, match="over the 2 GiB limit"):
        probe(BAD["raw-over-2-GiB"])


def test_bad_arguments() -> None:
    blob = SAMPLES["jpeg-420"]
    for kwargs, words in [
        ({"mode": "CMYK"}, "mode takes None"),
        ({"size": (0, 5)}, "size takes"),
        ({"size": 5}, "size takes"),
        ({"size": (1, 2, 3)}, "size takes"),
        ({"size": "ab"}, "size takes"),
        ({"decoder": "opencv"}, "no decoder named 'opencv'"),
    ]:
        with pytest.raises(InvalidOptionError, match=words):
            decode(blob, **kwargs)
    for threads in (0, -1, 1.5, True):
        with pytest.raises(InvalidOptionError, match="threads takes"):
            decode_many([blob], threads=threads)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="takes a Codec"):
        encode_many("png", [photo(2, 2)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- decoders


def test_decoder_resolution() -> None:
    names = available_decoders()
    assert names[0] == "pillow" and set(names) <= set(DECODERS)
    assert resolve_decoder("pillow") == "pillow"
    auto = resolve_decoder("auto")
    assert auto in names and (auto == "pillow" or fast_jpeg.load(auto)[1])  # auto is always exact
    for name in names:
        assert resolve_decoder(name) == name
    pytest.importorskip("simplejpeg")
    assert auto == "simplejpeg"  # the fastest, where it works


@pytest.mark.parametrize("name", ["simplejpeg", "turbojpeg"])
def test_missing_decoder(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing(fast_jpeg.FastJpeg):
        def __init__(self) -> None:
            raise ImportError(f"No module named {name!r}")

    monkeypatch.setitem(fast_jpeg._CLASSES, name, Missing)
    monkeypatch.setattr(fast_jpeg, "_loaded", {})
    assert name not in available_decoders()
    with pytest.raises(InvalidOptionError, match=rf'not available \(ImportError.*pip install "imgstore-ml\[{name}\]"'):
        resolve_decoder(name)
    with pytest.raises(InvalidOptionError, match="pip install"):
        decode(SAMPLES["jpeg-420"], decoder=name)
    assert resolve_decoder("auto") != name


def test_auto_never_picks_an_inexact_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    class OffByOne(fast_jpeg.FastJpeg):
        name = "simplejpeg"

        def header(self, data: bytes | memoryview) -> tuple[int, int, str]:
            image = Image.open(io.BytesIO(data))
            return image.height, image.width, "Gray" if image.mode == "L" else "YCbCr"

        def decode(self, data: bytes | memoryview, gray: bool, scale: int, height: int, width: int) -> np.ndarray:
            image = Image.open(io.BytesIO(data))
            image.draft(image.mode, (-(-width // scale), -(-height // scale)))
            pixels = np.asarray(image.convert("L" if gray else "RGB")).reshape(image.height, image.width, -1)
            return (pixels // 2 * 2).copy()  # close to Pillow, not equal

    monkeypatch.setitem(fast_jpeg._CLASSES, "simplejpeg", OffByOne)
    monkeypatch.setitem(fast_jpeg._CLASSES, "turbojpeg", OffByOne)
    monkeypatch.setattr(fast_jpeg, "_loaded", {})
    assert available_decoders() == ["pillow", "simplejpeg", "turbojpeg"]  # it works...
    assert resolve_decoder("auto") == "pillow"  # ...but auto does not take it
    blob = SAMPLES["jpeg-420"]
    assert np.array_equal(decode(blob, mode="RGB"), pillow_convert(blob, "RGB"))
    assert not np.array_equal(decode(blob, mode="RGB", decoder="simplejpeg"), pillow_convert(blob, "RGB"))


def test_fast_decoders_leave_other_jpegs_to_pillow(decoder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = fast_jpeg.fast_decode

    def spy(fast: fast_jpeg.FastJpeg, data: bytes | memoryview, *args: Any, **kwargs: Any) -> np.ndarray | None:
        result = original(fast, data, *args, **kwargs)
        seen.append("fast" if result is not None else "pillow")
        return result

    monkeypatch.setattr(api, "fast_decode", spy)
    decode(SAMPLES["jpeg-420"], decoder=decoder)
    decode(SAMPLES["jpeg-cmyk"], decoder=decoder)
    decode(SAMPLES["png-RGB"], decoder=decoder)
    decode(SAMPLES["jpeg-420"], mode="RGBA", decoder=decoder)
    assert seen == ([] if decoder == "pillow" else ["fast", "pillow"])


# ---------------------------------------------------------------------------------------------- threads


@pytest.fixture
def always_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "PARALLEL_MIN_AVERAGE_BYTES", 0)
    monkeypatch.setattr(api, "PARALLEL_MIN_IMAGES", 2)


def _batch(count: int) -> list[bytes]:
    names = sorted(SAMPLES)
    return [SAMPLES[names[k % len(names)]] for k in range(count)]


@pytest.mark.usefixtures("always_parallel")
def test_threads_give_the_same_results(decoder: str) -> None:
    blobs = _batch(60)
    one = decode_many(blobs, decoder=decoder, threads=1)
    for threads in (None, 2, 3):
        many = decode_many(blobs, decoder=decoder, threads=threads)
        assert len(many) == len(one) and all(np.array_equal(a, b) for a, b in zip(one, many, strict=True))
    sized = decode_many(blobs, mode="RGB", size=(16, 16), decoder=decoder, threads=1)
    assert np.array_equal(sized, decode_many(blobs, mode="RGB", size=(16, 16), decoder=decoder, threads=2))
    assert pool._pool is not None  # the pool did run


@pytest.mark.usefixtures("always_parallel")
@pytest.mark.parametrize("codec", ["png", "jpeg", "webp", "raw", "keep"])
def test_encode_many(codec: str) -> None:
    images = [photo(16 + k % 5, 24, 3, seed=k) for k in range(40)]
    one = encode_many(get_codec(codec), images, threads=1)
    assert one == encode_many(get_codec(codec), images, threads=2) == [get_codec(codec).encode(i) for i in images]
    with pytest.raises(InvalidImageError):
        encode_many(get_codec(codec), [*images, np.zeros((3, 3), np.float64)], threads=2)


def _decode_in_child(blobs: list[bytes], expected: list[np.ndarray]) -> None:
    dropped = pool._pool is None  # the parent's pool, whose threads do not exist here, was let go at the fork
    got = decode_many(blobs, threads=2)
    same = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    os._exit(0 if dropped and same and pool._pool is not None else 1)


@pytest.mark.usefixtures("always_parallel")
def test_pool_is_fork_safe() -> None:
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)  # Python 3.12+
    blobs = _batch(40)
    expected = decode_many(blobs, threads=2)  # the parent's pool exists, with its threads
    assert pool._pool is not None
    child = multiprocessing.get_context("fork").Process(target=_decode_in_child, args=(blobs, expected))
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # a child that waited on the parent's threads would hang here
        child.kill()
        pytest.fail("decode_many hung in a forked child")
    assert child.exitcode == 0
    assert decode_many(blobs, threads=2) is not None and pool._pool is not None  # the parent's pool is unharmed


def test_probe_of_a_jpeg_gives_what_pillow_says() -> None:
    """probe reads JPEG headers with the fast decoder where one is installed: the same answer as Pillow's."""
    import dataclasses

    from imgstore.codecs import pillow as pillow_codec

    blobs = []
    for mode, size in (("L", (30, 20)), ("RGB", (31, 17)), ("CMYK", (9, 9)), ("RGB", (640, 480))):
        for progressive in (False, True):
            out = io.BytesIO()
            Image.new(mode, size).save(out, "JPEG", progressive=progressive, subsampling=0 if progressive else 2)
            blobs.append(out.getvalue())
    for blob in blobs:
        assert dataclasses.astuple(codecs.probe(blob)) == pillow_codec.probe_info(blob)
