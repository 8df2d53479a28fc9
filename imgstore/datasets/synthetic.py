"""Realistic CIFAR-10-shaped images made offline from a seed: the default data of tests, benchmarks, examples.

Why procedural and not photos: no package we can depend on ships a few thousand small photos
(scikit-image ships a dozen, and is a heavy dependency for that), a download is impossible offline,
and a procedural model costs nothing to install, is deterministic and makes any number of distinct
images. What a storage benchmark needs from the data is how it compresses and decodes, so the model
reproduces the statistics of photographs that decide that, and the tests check the one that matters
most: a Pillow-default PNG of these images averages within 15% of real CIFAR-10's 2 273 bytes
(uniform noise gives 3 170 B, a flat colour about 100 B).

The model, all vectorised numpy over blocks of images:

- background: a smooth colour field with a steep 1/f^3 amplitude spectrum (batched inverse FFTs),
  like out-of-focus scenery, split by a soft, tilted horizon into "sky" and "ground" tints;
- colour as in photographs: one luminance field plus weaker chroma fields, mixed into RGB, so the
  three channels are strongly correlated;
- "dead leaves": a few anti-aliased ellipses occlude each other near the centre, like an object in
  front of its background; each has a flat colour plus its own amount of a 1/f-textured surface
  (photographs' spectrum), which gives edges and texture;
- a random brightness and contrast per image, and a little sensor noise;
- per-class tendencies (background and object tints, object size), so labels carry some signal.

Images are made in fixed blocks of ``_BLOCK`` with a generator derived from ``(seed, block)``, so the
output is bit-identical for a seed across runs and processes (for one numpy build on one CPU kind;
SIMD paths of other CPUs could in principle round a float differently), and ``synthetic_cifar10(k)``
is exactly the first k images of ``synthetic_cifar10(n)`` for any k <= n. Blocks are independent, so
they are made on a few threads (numpy releases the GIL); the thread count never changes the output.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgstore.errors import DatasetError

NUM_CLASSES = 10
_SIZE = 32
_BLOCK = 250  # images per seeded block: small enough that a few images cost little, a multiple of 10
_BG_ALPHA = 3.0  # amplitude spectrum exponent of the background: smooth, like out of focus
_TEX_ALPHA = 1.0  # amplitude spectrum exponent of object surfaces: photographs' 1/f
_CHROMA = 0.3  # chroma relative to luminance: photographs are mostly luminance
_CHROMA_STEEPER = 0.5  # extra spectral exponent of the background's chroma
_LEAVES = 5  # occluding ellipses per image
_TEXTURE = 0.5  # mean largest texture gain of a leaf (relative to its colour contrast)
_NOISE = 1.5  # sensor noise, grey levels (standard deviation)
_CONTRAST = 52.0  # mean per-image standard deviation, grey levels

# Per class: tints in the opponent chroma channels (red-green, yellow-blue) of the sky, the ground
# and the object, and the object's size (fraction of the image). Mild, as in real photographs.
# fmt: off
_CLASS_LOOK = np.array([
    # sky         ground       object      size
    [-0.1, -0.6,  0.0, -0.1,   0.0, 0.0,   0.35],  # airplane
    [0.0, -0.1,   0.0, 0.0,    0.5, 0.0,   0.45],  # automobile
    [-0.1, -0.4,  -0.3, 0.2,   0.1, 0.3,   0.30],  # bird
    [0.1, 0.1,    0.1, 0.2,    0.2, 0.3,   0.40],  # cat
    [-0.1, -0.2,  -0.3, 0.3,   0.3, 0.4,   0.40],  # deer
    [0.1, 0.1,    0.1, 0.2,    0.2, 0.3,   0.40],  # dog
    [-0.2, 0.1,   -0.4, 0.3,   -0.4, 0.4,  0.35],  # frog
    [-0.1, -0.3,  -0.3, 0.3,   0.4, 0.4,   0.45],  # horse
    [-0.1, -0.6,  -0.1, -0.5,  0.0, 0.0,   0.40],  # ship
    [0.0, -0.2,   0.0, 0.0,    0.3, 0.1,   0.50],  # truck
], dtype=np.float32)
# fmt: on
_SKY, _GROUND, _OBJECT, _OBJECT_SIZE = _CLASS_LOOK[:, 0:2], _CLASS_LOOK[:, 2:4], _CLASS_LOOK[:, 4:6], _CLASS_LOOK[:, 6]

_COORD = np.arange(_SIZE, dtype=np.float32)
_STREAMS = {"train": 0, "test": 1}  # part of each block's seed


def _amplitude(alpha: float) -> np.ndarray:
    """rfft2-layout amplitudes of a 1/f^alpha field, scaled so the field has unit variance."""
    fy, fx = np.fft.fftfreq(_SIZE)[:, None], np.fft.rfftfreq(_SIZE)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = np.inf  # no DC: the mean is set separately
    amp = f**-alpha
    weight = np.full_like(amp, 2.0)  # columns 1..15 stand for their conjugate mirror too
    weight[:, 0] = weight[:, -1] = 1.0
    spectrum: np.ndarray = (amp * _SIZE * _SIZE / np.sqrt((weight * amp * amp).sum())).astype(np.float32)
    return spectrum


# Chroma is smoother than luminance in photographs: a steeper spectrum for the two chroma fields.
_BG_AMP = np.stack([_amplitude(_BG_ALPHA)] + [_amplitude(_BG_ALPHA + _CHROMA_STEEPER)] * 2)
_TEX_AMP = _amplitude(_TEX_ALPHA)


def synthetic_cifar10(n: int = 50_000, seed: int = 0, *, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 [n, 32, 32, 3] (C-contiguous, RGB) and labels int64 [n].

    Deterministic from ``seed``; the first k images of a larger ``n`` are ``synthetic_cifar10(k)``.
    Every run of 10 labels from the start holds each class once, in shuffled order, so classes are
    exactly balanced when ``n`` is a multiple of 10. ``split="test"`` draws from a separate stream,
    so a test set never repeats training images.
    """
    if split not in _STREAMS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DatasetError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be an integer >= 0, got {seed!r}")
    images = np.empty((n, _SIZE, _SIZE, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)

    def fill(block: int) -> None:
        start = block * _BLOCK
        stop = min(n, start + _BLOCK)
        block_images, block_labels = _block(int(seed), block, _STREAMS[split])
        images[start:stop] = block_images[: stop - start]
        labels[start:stop] = block_labels[: stop - start]

    blocks = range(-(-n // _BLOCK))
    workers = min(4, os.cpu_count() or 1, len(blocks))
    if workers <= 1:
        for block in blocks:
            fill(block)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, blocks))  # list() re-raises a worker's exception
    return images, labels


def _fields(rng: np.random.Generator, count: int, channels: int, amp: np.ndarray) -> np.ndarray:
    """``count`` x ``channels`` unit-variance random fields [count, channels, 32, 32] with spectrum ``amp``."""
    # Uniform rather than Gaussian coefficients: 5x cheaper to draw, and each pixel sums hundreds
    # of them, so the field is Gaussian all the same.
    z = rng.random((count, channels, _SIZE, _SIZE // 2 + 1, 2), dtype=np.float32)
    z -= 0.5
    z *= np.float32(np.sqrt(6.0))  # variance 1/2 per real and imaginary part
    spectrum = z.view(np.complex64)[..., 0]
    spectrum *= amp
    return np.fft.irfft2(spectrum, s=(_SIZE, _SIZE)).astype(np.float32, copy=False)  # numpy 1.x computes in float64


def _block(seed: int, block: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [_BLOCK, 32, 32, 3] and labels of one block, from its own generator."""
    # spawn_key is numpy's way to derive independent streams; an entropy list such as [seed, block]
    # would not do: SeedSequence reads it as one big number, so [1, 0] and [1] are the same seed.
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    m, k_leaves = _BLOCK, _LEAVES
    labels = rng.permuted(np.tile(np.arange(NUM_CLASSES), (m // NUM_CLASSES, 1)), axis=1).reshape(m)

    # Background in opponent space [m, 3 (luminance, red-green, yellow-blue), 32, 32].
    img = _fields(rng, m, 3, _BG_AMP)
    img[:, 1:] *= _CHROMA
    # Soft horizon: a tilted line, ~1.5 px ramp, sky above and ground below.
    height = rng.uniform(4, 28, m).astype(np.float32)
    slope = rng.normal(0, 0.3, m).astype(np.float32)
    below = (_COORD[None, :, None] - height[:, None, None]) - slope[:, None, None] * (_COORD[None, None, :] - 15.5)
    below = np.clip(below / 1.5 + 0.5, 0, 1)
    sky_light, ground_light = rng.normal(0.5, 0.6, (2, m)).astype(np.float32)
    ground_light -= 0.5  # the sky is brighter on average
    img[:, 0] += sky_light[:, None, None] + below * (ground_light - sky_light)[:, None, None]
    sky, ground = _SKY[labels], _GROUND[labels]  # [m, 2]
    img[:, 1:] += (sky[:, :, None, None] + below[:, None] * (ground - sky)[:, :, None, None]) * np.float32(_CHROMA * 2)

    # Dead leaves: anti-aliased ellipses, later ones in front, near the centre like a photographed object.
    texture = _fields(rng, m, 1, _TEX_AMP)[:, 0]
    colour = rng.standard_normal((m, k_leaves, 3), dtype=np.float32) * np.array([1, _CHROMA, _CHROMA], dtype=np.float32)
    colour[:, :, 1:] += _OBJECT[labels][:, None, :] * np.float32(_CHROMA * 2)
    # Some images are busy, some plain: a per-image texture richness widens the spread of PNG sizes.
    richness = rng.uniform(0.2, 1.8, (m, 1)) * _TEXTURE
    gain = (rng.uniform(0, 1, (m, k_leaves)) * richness).astype(np.float32)
    centre = (15.5 + rng.normal(0, 8, (2, m, k_leaves))).astype(np.float32)
    radius = (_SIZE * _OBJECT_SIZE[labels][:, None] * rng.uniform(0.25, 1.0, (m, k_leaves))).astype(np.float32)
    shear = rng.normal(0, 0.35, (m, k_leaves, 2, 2)).astype(np.float32) + np.eye(2, dtype=np.float32)
    # |shear @ (x - c)|^2 as a quadratic form qa dx^2 + qb dx dy + qc dy^2, evaluated separably.
    qa = shear[..., 0, 0] ** 2 + shear[..., 1, 0] ** 2
    qb = 2 * (shear[..., 0, 0] * shear[..., 0, 1] + shear[..., 1, 0] * shear[..., 1, 1])
    qc = shear[..., 0, 1] ** 2 + shear[..., 1, 1] ** 2
    inv = 1 / (2 * radius)  # (r^2 - d^2) / 2r is about the signed distance to the edge, in pixels
    surface = np.zeros((m, _SIZE, _SIZE), np.float32)  # texture gain of the front-most leaf
    for k in range(k_leaves):
        dx = _COORD - centre[0, :, k, None]  # [m, 32] along x
        dy = _COORD - centre[1, :, k, None]  # [m, 32] along y
        rows = (radius[:, k] ** 2 * inv[:, k] + 0.5)[:, None] - qc[:, k, None] * inv[:, k, None] * dy * dy
        cover = rows[:, :, None] - (qa[:, k, None] * inv[:, k, None] * dx * dx)[:, None, :]
        cover -= (qb[:, k, None] * inv[:, k, None] * dy)[:, :, None] * dx[:, None, :]
        np.clip(cover, 0, 1, out=cover)  # 1 inside, 0 outside, a 1-px ramp at the edge (anti-aliasing)
        for c in range(3):
            plane = img[:, c]
            plane += cover * (colour[:, k, c, None, None] - plane)
        surface += cover * (gain[:, k, None, None] - surface)
    img[:, 0] += surface * texture

    # Opponent -> RGB: luminance in all three channels, chroma as small differences.
    lum, rg, yb = img[:, 0], img[:, 1], img[:, 2]
    rgb = np.empty_like(img)
    np.add(lum, 0.6 * rg + 0.3 * yb, out=rgb[:, 0])
    np.add(lum, 0.3 * yb - 0.6 * rg, out=rgb[:, 1])
    np.add(lum, -0.9 * yb, out=rgb[:, 2])

    brightness = rng.normal(120, 25, (m, 1, 1, 1)).astype(np.float32)
    contrast = np.clip(rng.normal(_CONTRAST, 12, (m, 1, 1, 1)), 20, 90).astype(np.float32)
    rgb -= rgb.mean(axis=(1, 2, 3), keepdims=True)
    rgb *= contrast / (rgb.std(axis=(1, 2, 3), keepdims=True) + np.float32(1e-6))
    rgb += brightness
    noise = rng.random(rgb.shape, dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(_NOISE * np.sqrt(12.0))  # uniform with standard deviation _NOISE
    rgb += noise
    np.clip(rgb, 0, 255, out=rgb)
    images = np.rint(rgb).astype(np.uint8).transpose(0, 2, 3, 1)  # planar -> HWC
    return np.ascontiguousarray(images), labels.astype(np.int64)
