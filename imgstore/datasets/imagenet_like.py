"""ImageNet-like JPEG files made offline: real photographs, sized and compressed like ImageNet-1k's training set.

What a storage or data-loading benchmark needs from ImageNet is its files: how many pixels, how
many bytes, how they decode. The real set cannot be fetched here (it is 148 GB behind a login), so
this makes files with the same statistics from 15 photographs that packages ship
(:mod:`imgstore.datasets.photos`: 14 from scikit-image, one from matplotlib; ``pip install
"imgstore-ml[imagenet-like]"``). They are real photographs, so they compress like photographs,
which no procedural model matches at these sizes.

The ImageNet figures this targets, and where they come from:

- 1 281 167 training images (TFDS ``imagenet2012``) in a 148 GB tar (``ILSVRC2012_img_train.tar``,
  listed as 41.9 + 41.9 + 41.9 + 22.1 GB in public mirrors): 115 kB a file, of which the tar's
  headers take under 1 kB. Target: mean 115 kB (the "110 KB" often quoted is the same in KiB).
- Sizes: most files are 500 pixels on their long side (the web's "medium" size, which the
  collection came from), 4:3 or 3:2, mostly landscape: 500x375, 500x333, 375x500 are the common
  ones, with a tail of smaller images and a few large ones (up to 2592x3888; M. Ehrlich, "Compression
  in the ImageNet Dataset", 2021). Quoted mean resolutions vary, from about 400x350 to 470x390.
  Target: median 500x375, mean about 475x390.
- Encoding: almost all colour, and most were saved at quality 96 without chroma subsampling
  (Ehrlich, ibid.), the rest at lower qualities and 4:2:0.

Each image k is made from its own generator, seeded by ``(seed, split, k)``:

1. a source photo, drawn by weight (:data:`~imgstore.datasets.photos.CATALOGUE`);
2. a target size from the mixture below (:func:`_target_size`);
3. a random crop like torchvision's RandomResizedCrop: its area a uniform fraction of the photo's,
   from ``_DETAIL`` times the target's area up to ``_MAX_SCALE`` of the photo, its aspect within
   10% of the target's. The floor keeps enlargement under 1.8x where the photo is large enough:
   the sources are about 0.3 MP, and a small crop blown up to 500x375 is a blur, which compresses
   far better than ImageNet's photographs. The ceiling keeps whole-photo crops out (any two would
   be near-duplicates). RandomResizedCrop's 3/4-4/3 stretch would visibly distort the scene;
4. resized (bicubic), flipped left-right half the time, a mild colour jitter (brightness, contrast,
   saturation, white balance: one colour matrix);
5. encoded by Pillow (libjpeg-turbo) at a drawn quality and subsampling.

The sources are sharpened once when loaded (an unsharp mask, as cameras and web resizing do), which
gives the enlarged crops back the fine detail, and the bytes, of ImageNet's photographs: without
it the mean is about a quarter lower. Crops of the same photo differ in position, scale, size, flip,
colour and encoding, as ImageNet's photographs of one kind of thing do; no two are the same file
or the same picture (the tests check that no two 32x32 thumbnails correlate above 0.99).

Image k is the same whatever ``n`` (the first k images of any larger request are the same), and the
same for a seed across runs and processes, for one set of installed photos and one Pillow build
(libjpeg versions may encode differently). Images are made on a few threads (Pillow releases the
GIL while it resizes), or forked processes for big requests (it holds it while it encodes); which
never changes the bytes.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageFilter, features

from imgstore.datasets import photos as _photos
from imgstore.errors import DatasetError, DatasetNotFoundError
from imgstore.parallel import can_fork, default_workers

__all__ = [
    "INSTALL_HINT",
    "EncodedImages",
    "class_names",
    "imagenet_like",
    "load_imagenet_like",
    "write_imagenet_like_folder",
]

INSTALL_HINT = 'pip install "imgstore-ml[imagenet-like]"'
_VERSION = 1  # of the generation: part of the cache folder's name, bumped whenever the output changes
_STREAMS = {"train": 0, "test": 1}  # part of each image's seed

# Target size: the long side is 500 for most files, a tail below and a few above; then an aspect.
_P_500, _P_SMALL = 0.68, 0.22  # the rest (0.10) is larger than 500
_SMALL = (160, 500)  # long side, uniform
_LARGE = (501, 1200)  # long side, log-uniform
_P_4_3, _P_3_2 = 0.55, 0.30  # the rest: a ratio uniform in _OTHER_RATIO
_OTHER_RATIO = (1.1, 2.0)
_P_LANDSCAPE, _P_PORTRAIT = 0.75, 0.17  # the rest is square
_MIN_SIDE = 32

# Crop area: from _DETAIL x the target's (but at least _MIN_SCALE of the photo) to _MAX_SCALE of
# the photo; aspect within exp(+-_STRETCH) of the target's. Chosen with _SHARPEN for the bytes and
# for few look-alikes (tests/test_imagenet_like.py).
_DETAIL, _MIN_SCALE, _MAX_SCALE, _STRETCH = 0.3, 0.08, 0.75, 0.1

# Colour jitter, each uniform in 1 +- its value; white balance gains ~ N(1, _WHITE_BALANCE).
_BRIGHTNESS, _CONTRAST, _SATURATION, _WHITE_BALANCE = 0.15, 0.15, 0.2, 0.03
_LUMA = np.array([0.299, 0.587, 0.114])

# Encoding: quality 96 for most files, else 90-95 or 75-89; 4:4:4 for most, else 4:2:0.
_P_Q96, _P_Q90 = 0.78, 0.14
_P_444 = 0.90
_SHARPEN = ImageFilter.UnsharpMask(radius=1.0, percent=175, threshold=2)  # sets the mean bytes (docstring)

# What the registry's loader makes when asked for the whole split (n=None): 100 train images a
# class and ImageNet's 50 validation images a class, for 10 classes; a few seconds to make.
_DEFAULT_N = {"train": 1_000, "test": 500}


@dataclass(frozen=True)
class EncodedImages:
    """Encoded image files and their labels: ``blobs[i]`` is a whole JPEG file, of class ``classes[labels[i]]``."""

    blobs: list[bytes]
    labels: np.ndarray  # int64 [n]
    classes: list[str]  # class names, sorted, so label i is the i-th folder of an ImageFolder

    def __len__(self) -> int:
        return len(self.blobs)

    def file_names(self) -> list[str]:
        """File name of each image, like ImageNet's (``<class>_<index>.JPEG``); sorting them sorts by index."""
        digits = max(8, len(str(len(self.blobs) - 1)))
        return [f"{self.classes[label]}_{i:0{digits}d}.JPEG" for i, label in enumerate(self.labels.tolist())]

    def write_image_folder(self, root: str | Path) -> list[Path]:
        """Write the files as torchvision's ImageFolder reads them: ``root/<class>/<class>_<index>.JPEG``.

        Returns the paths in ImageFolder's order (classes sorted, files sorted within a class), which
        is index order within a class. ``root`` must be missing or empty: files left from another
        write would become samples too.
        """
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(f"{root} is not an empty folder; write_image_folder needs an empty or new one")
        for name in self.classes:
            (root / name).mkdir(parents=True, exist_ok=True)
        names = self.file_names()
        paths = [root / self.classes[label] / name for label, name in zip(self.labels.tolist(), names, strict=True)]
        for path, blob in zip(paths, self.blobs, strict=True):
            path.write_bytes(blob)
        # Stable sort by label: within a class, index order, which is also the names' sorted order.
        return [paths[i] for i in np.argsort(self.labels, kind="stable").tolist()]


def class_names(classes: int) -> list[str]:
    """``class_00``, ``class_01``, ...: zero-padded, so sorted order is label order."""
    digits = max(2, len(str(classes - 1)))
    return [f"class_{i:0{digits}d}" for i in range(classes)]


def imagenet_like(
    n: int,
    seed: int = 0,
    *,
    classes: int = 10,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> EncodedImages:
    """``n`` ImageNet-like JPEG files (module docstring) and balanced labels ``k % classes``.

    Deterministic from ``seed``; image k is the same whatever ``n``. ``split="test"`` draws from a
    separate stream. ``cache_dir``: a folder to keep the files in (one file per image, under a name
    that changes with everything the bytes depend on), so a second call reads instead of encoding.
    Raises :class:`~imgstore.errors.DatasetNotFoundError`, naming what to install, when a package of
    the photo catalogue (scikit-image, matplotlib) is missing.
    """
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    _check_int("classes", classes, 1)
    if split not in _STREAMS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    found = _find_all_photos()
    labels = np.arange(n, dtype=np.int64) % classes
    blobs: list[bytes | None] = [None] * n
    folder = None if cache_dir is None else _cache_folder(Path(cache_dir), found, split, int(seed))
    if folder is not None:
        for k in range(n):
            path = folder / f"{k:08d}.jpg"
            if path.is_file():
                blobs[k] = path.read_bytes()
    missing = [k for k in range(n) if blobs[k] is None]
    if missing:
        sources = _load_sources(found)
        made = _make_many(sources, int(seed), _STREAMS[split], missing)
        for k, blob in zip(missing, made, strict=True):
            blobs[k] = blob
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for k, blob in zip(missing, made, strict=True):
                _write_atomically(folder / f"{k:08d}.jpg", blob)
    return EncodedImages([blob for blob in blobs if blob is not None], labels, class_names(classes))


def load_imagenet_like(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[list[bytes], np.ndarray]:
    """The registry's loader (``load_dataset("imagenet-like", n, root)``): ``root`` is an optional cache folder."""
    data = imagenet_like(_DEFAULT_N.get(split, 0) if n is None else n, seed, split=split, cache_dir=root)
    return data.blobs, data.labels


def write_imagenet_like_folder(
    root: str | Path,
    n: int,
    seed: int = 0,
    *,
    classes: int = 10,
    split: str = "train",
    cache_dir: str | Path | None = None,
) -> list[Path]:
    """``imagenet_like(n, seed, ...)`` written as an ImageFolder under ``root``; the paths in ImageFolder order."""
    return imagenet_like(n, seed, classes=classes, split=split, cache_dir=cache_dir).write_image_folder(root)


# ---------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Sources:
    images: list[Image.Image]  # RGB, tinted and sharpened, loaded
    cumulative: np.ndarray  # cumulative weights, ending at 1


_sources_lock = threading.Lock()
_sources_cache: dict[tuple[str, ...], _Sources] = {}


def _find_all_photos() -> list[tuple[_photos.Photo, Path]]:
    found = _photos.find_photos()
    if len(found) < len(_photos.CATALOGUE):
        have = {photo for photo, _ in found}
        missing = sorted({_photos.DISTRIBUTIONS[photo.module] for photo in _photos.CATALOGUE if photo not in have})
        raise DatasetNotFoundError(
            f"imagenet-like makes its images from photographs that packages ship; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: {INSTALL_HINT}"
        )
    return found


def _load_sources(found: list[tuple[_photos.Photo, Path]]) -> _Sources:
    """The photos decoded and prepared, once per process (about 30 MB for the whole catalogue)."""
    key = tuple(f"{photo.name}={path}" for photo, path in found)
    with _sources_lock:
        cached = _sources_cache.get(key)
        if cached is not None:
            return cached
        images = []
        for photo, path in found:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            if photo.tint is not None:
                r, g, b = photo.tint
                image = image.convert("RGB", (r, 0, 0, 0, 0, g, 0, 0, 0, 0, b, 0))
            images.append(image.filter(_SHARPEN))
        weights = np.array([photo.weight for photo, _ in found])
        cumulative = np.cumsum(weights) / weights.sum()
        cumulative[-1] = 1.0
        sources = _Sources(images, cumulative)
        _sources_cache.clear()  # one set of photos per process is the normal case; don't hoard others
        _sources_cache[key] = sources
        return sources


# From this many images on, forked processes make them: Pillow holds the GIL while it encodes (about
# a third of an image's time), so threads reach only ~1.4x on 2 cores. Below it, a fork and the
# pickled results cost more than they save.
_PROCESS_MIN = 2_000
_CHUNK = 32  # images per task: few enough tasks to cost nothing, enough to balance the workers
_worker_sources: _Sources | None = None  # in a forked worker: the sources it inherited


def _make_many(sources: _Sources, seed: int, stream: int, indices: Sequence[int]) -> list[bytes]:
    chunks = [indices[i : i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
    workers = min(4, default_workers(), len(chunks))
    if workers <= 1:
        return [_make(sources, seed, stream, k) for k in indices]
    if len(indices) >= _PROCESS_MIN and can_fork():
        # Fork (see imgstore.parallel): the workers inherit the decoded photos instead of loading them.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_adopt, initargs=(sources,)) as pool:
            parts = list(pool.map(_make_chunk, [seed] * len(chunks), [stream] * len(chunks), chunks))
    else:
        with ThreadPoolExecutor(workers) as threads:
            parts = list(threads.map(lambda ks: [_make(sources, seed, stream, k) for k in ks], chunks))
    return [blob for part in parts for blob in part]


def _adopt(sources: _Sources) -> None:
    global _worker_sources
    _worker_sources = sources


def _make_chunk(seed: int, stream: int, indices: Sequence[int]) -> list[bytes]:
    assert _worker_sources is not None  # set by _adopt when the worker started
    return [_make(_worker_sources, seed, stream, k) for k in indices]


def _make(sources: _Sources, seed: int, stream: int, k: int) -> bytes:
    """Image k's JPEG file, from its own generator (so it does not depend on any other image)."""
    # spawn_key derives independent streams; see synthetic._block for why not an entropy list.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, k)))
    photo = sources.images[int(np.searchsorted(sources.cumulative, rng.random(), side="right"))]
    width, height = _target_size(rng)

    # The crop: RandomResizedCrop's recipe with the area floor and aspect bound of the docstring.
    w, h = photo.size
    area = w * h
    high = _MAX_SCALE
    low = min(high, max(_MIN_SCALE, _DETAIL * width * height / area))
    scale = rng.uniform(low, high)
    ratio = width / height * math.exp(rng.uniform(-_STRETCH, _STRETCH))
    crop_w, crop_h = math.sqrt(scale * area * ratio), math.sqrt(scale * area / ratio)
    fit = min(1.0, w / crop_w, h / crop_h)  # a crop wider or taller than the photo shrinks to fit
    crop_w, crop_h = crop_w * fit, crop_h * fit
    x, y = rng.uniform(0, max(0.0, w - crop_w)), rng.uniform(0, max(0.0, h - crop_h))
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + crop_w, y + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # Colour jitter as one affine map: saturation (towards luma), white balance and brightness,
    # then contrast about mid-grey. Pillow applies it in one pass and clips to 0..255.
    brightness, contrast, saturation = 1 + rng.uniform(-1, 1, 3) * (_BRIGHTNESS, _CONTRAST, _SATURATION)
    gains = rng.normal(1.0, _WHITE_BALANCE, 3)
    matrix = saturation * np.eye(3) + (1 - saturation) * _LUMA[None, :]
    matrix *= (contrast * brightness * gains)[:, None]
    offset = np.full((3, 1), (1 - contrast) * 128.0)
    image = image.convert("RGB", tuple(np.hstack([matrix, offset]).ravel().tolist()))

    u = rng.random()
    quality = 96 if u < _P_Q96 else int(rng.integers(90, 96)) if u < _P_Q96 + _P_Q90 else int(rng.integers(75, 90))
    subsampling = 0 if rng.random() < _P_444 else 2  # Pillow: 0 is 4:4:4, 2 is 4:2:0
    out = BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling=subsampling)
    return out.getvalue()


def _target_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) from the mixture of the module docstring."""
    u = rng.random()
    if u < _P_500:
        long = 500
    elif u < _P_500 + _P_SMALL:
        long = int(rng.integers(*_SMALL))
    else:
        long = round(math.exp(rng.uniform(math.log(_LARGE[0]), math.log(_LARGE[1]))))
    v = rng.random()
    ratio = 4 / 3 if v < _P_4_3 else 3 / 2 if v < _P_4_3 + _P_3_2 else rng.uniform(*_OTHER_RATIO)
    short = max(_MIN_SIDE, round(long / ratio))
    o = rng.random()
    if o < _P_LANDSCAPE:
        return long, short
    if o < _P_LANDSCAPE + _P_PORTRAIT:
        return short, long
    return long, long


# ---------------------------------------------------------------------- cache and checks


def _cache_folder(cache_dir: Path, found: list[tuple[_photos.Photo, Path]], split: str, seed: int) -> Path:
    # Everything the bytes depend on is in the name, so a stale file is never read: the photos,
    # this module's version, the encoder (Pillow and its libjpeg) and numpy (the random streams).
    versions = f"{_VERSION}|{PIL.__version__}|{features.version_codec('jpg')}|{np.__version__}"
    key = hashlib.sha256(f"{versions}|{_photos.photos_fingerprint(found)}".encode()).hexdigest()[:16]
    return cache_dir / f"imagenet-like-{key}" / f"{split}-{seed}"


def _write_atomically(path: Path, data: bytes) -> None:
    # A reader (another process filling the same cache) sees the whole file or none.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")
