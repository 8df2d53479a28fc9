"""Realistic CIFAR-10-shaped images made offline from a seed: the default data of tests, benchmarks, examples.

Why procedural and not photos: no package we depend on ships photos (scikit-image does, but is a
heavy dependency for crops of a dozen pictures), and a procedural model is deterministic, costs
nothing to install and makes any number of distinct images. The model is the classic one for
natural-image statistics: a Gaussian field with a 1/f^alpha spectrum (alpha = 3.5 in power, close to
photographs' ~2 in amplitude after the occlusions flatten it), with luminance and weaker, smoother
chroma channels mixed into correlated RGB as in photographs, occluded by flat-ish "dead leaves"
discs that give edges, then scaled to a random brightness and contrast. Each class has a colour
tendency, so labels carry some signal.

The realism bar checked by the tests: a Pillow-default PNG of these images averages within 15% of
real CIFAR-10's 2 273 bytes (uniform noise gives 3 170), classes are balanced, no two images are
near-duplicates. Generation is batched in fixed blocks of 5 000 with a generator per block, so
``synthetic_cifar10(k)`` is exactly the first k images of ``synthetic_cifar10(n)`` for any k <= n.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
_BLOCK = 5_000  # images per generator block (a multiple of 10 keeps classes exactly balanced)
_ALPHA = 3.5  # spectral exponent of the luminance power spectrum
_CHROMA = 0.18  # chroma amplitude relative to luminance (photos are mostly luminance)
_LEAVES = 4  # occluding discs tried per image (each kept with probability 1/2)
_RGB_FROM_LCC = np.array([[1, 1, 1], [1.2, -0.6, 0], [0, -0.4, 1.4]], np.float32)


def synthetic_cifar10(n: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 [n, 32, 32, 3] and labels int64 [n] (classes 0-9, balanced, shuffled)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for block, start in enumerate(range(0, n, _BLOCK)):
        block_images, block_labels = _block(seed, block)
        stop = min(n, start + _BLOCK)
        images[start:stop] = block_images[: stop - start]
        labels[start:stop] = block_labels[: stop - start]
    return images, labels


def _block(seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, block])
    m = _BLOCK
    labels = rng.permutation(np.arange(m) % NUM_CLASSES)

    fy, fx = np.fft.fftfreq(32)[:, None], np.fft.rfftfreq(32)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    chroma_amp = _CHROMA / f ** ((_ALPHA + 0.6) / 2)  # chroma is smoother than luminance in photos
    amplitude = np.stack([1 / f ** (_ALPHA / 2), chroma_amp, chroma_amp]).astype(np.float32)
    amplitude[:, 0, 0] = 0
    spectrum = rng.standard_normal((m, 3, 32, 17, 2), dtype=np.float32).view(np.complex64)[..., 0] * amplitude
    fields = np.moveaxis(np.fft.irfft2(spectrum, s=(32, 32), axes=(-2, -1)).astype(np.float32), 1, -1)
    fields /= fields[..., 0].std(axis=(1, 2))[:, None, None, None] + 1e-6

    # Class colour tendency: a hue per class, shifting the chroma channels.
    hue = 2 * np.pi * labels / NUM_CLASSES
    fields[..., 1] += (0.25 * np.cos(hue))[:, None, None].astype(np.float32)
    fields[..., 2] += (0.25 * np.sin(hue))[:, None, None].astype(np.float32)

    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    for _ in range(_LEAVES):
        cy, cx = rng.uniform(-4, 36, (2, m, 1, 1)).astype(np.float32)
        radius2 = rng.uniform(2, 12, (m, 1, 1)).astype(np.float32) ** 2
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius2) & (rng.random((m, 1, 1)) < 0.5)
        colour = rng.standard_normal((m, 1, 1, 3), dtype=np.float32) * np.float32([1, _CHROMA, _CHROMA])
        fields = np.where(disc[..., None], colour + 0.25 * fields, fields)  # a leaf keeps a little texture

    rgb = fields @ _RGB_FROM_LCC
    brightness = rng.uniform(70, 170, (m, 1, 1, 1)).astype(np.float32)
    contrast = rng.uniform(35, 65, (m, 1, 1, 1)).astype(np.float32)
    rgb = brightness + rgb * (contrast / (rgb.std(axis=(1, 2, 3), keepdims=True) + 1e-6))
    np.clip(np.rint(rgb, out=rgb), 0, 255, out=rgb)
    return rgb.astype(np.uint8), labels.astype(np.int64)
