"""synthetic_cifar10: deterministic, fast, and compressing like real CIFAR-10 photographs."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgstore.datasets import synthetic_cifar10
from imgstore.errors import DatasetError

REAL_CIFAR10_PNG_BYTES = 2273  # mean Pillow-default PNG size of the real CIFAR-10 training images
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full() -> tuple[np.ndarray, np.ndarray, float]:
    """The default 50 000 images (made once for the module), their labels and how long they took."""
    start = time.perf_counter()
    images, labels = synthetic_cifar10()
    return images, labels, time.perf_counter() - start


def png_size(image: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # Pillow's defaults, as the size was measured
    return buffer.tell()


def test_shape_dtype_contiguity_and_speed(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, labels, seconds = full
    print(f"synthetic_cifar10(50_000): {seconds:.1f} s")
    assert images.shape == (50_000, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    assert labels.shape == (50_000,) and labels.dtype == np.int64
    assert seconds < 30, f"50 000 images took {seconds:.1f} s"  # a sanity bound; a few seconds is usual


def test_deterministic_per_seed_and_prefix_stable(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, labels, _ = full
    # Any prefix, across block boundaries, is the same as asking for that many.
    for k in (1, 7, 250, 1_234):
        prefix, prefix_labels = synthetic_cifar10(k)
        np.testing.assert_array_equal(prefix, images[:k])
        np.testing.assert_array_equal(prefix_labels, labels[:k])
    again, again_labels = synthetic_cifar10(600, seed=3)
    other, other_labels = synthetic_cifar10(600, seed=3)
    np.testing.assert_array_equal(again, other)
    np.testing.assert_array_equal(again_labels, other_labels)
    different, different_labels = synthetic_cifar10(600, seed=4)
    assert np.abs(different.astype(np.int16) - again).mean() > 20
    assert not np.array_equal(different_labels, again_labels)
    test_split, _ = synthetic_cifar10(600, seed=3, split="test")
    assert np.abs(test_split.astype(np.int16) - again).mean() > 20


def test_same_bytes_in_another_process() -> None:
    images, labels = synthetic_cifar10(300, seed=5)
    here = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    code = (
        "import hashlib; from imgstore.datasets import synthetic_cifar10 as s; i, l = s(300, seed=5); "
        "print(hashlib.sha256(i.tobytes() + l.tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


def test_png_size_matches_real_cifar10(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, _, _ = full
    sample = images[:: len(images) // 1_000]  # 1 000 images spread over every block region
    mean = float(np.mean([png_size(image) for image in sample]))
    print(f"synthetic mean PNG size: {mean:.0f} B (real CIFAR-10: {REAL_CIFAR10_PNG_BYTES} B)")
    assert 0.85 * REAL_CIFAR10_PNG_BYTES <= mean <= 1.15 * REAL_CIFAR10_PNG_BYTES
    # The band really excludes the easy fakes: uniform noise, and flat colours.
    noise = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    assert np.mean([png_size(image) for image in noise]) > 1.15 * REAL_CIFAR10_PNG_BYTES
    assert png_size(np.full((32, 32, 3), 120, np.uint8)) < 0.85 * REAL_CIFAR10_PNG_BYTES


def test_labels_balanced_and_shuffled(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    _, labels, _ = full
    assert np.bincount(labels, minlength=10).tolist() == [5_000] * 10
    assert labels.min() == 0 and labels.max() == 9
    for n in (10, 130, 2_500):
        assert np.bincount(synthetic_cifar10(n)[1], minlength=10).tolist() == [n // 10] * 10
    # Shuffled: no fixed cycle, and each class appears at every position of a run of 10.
    assert not np.array_equal(labels[:10], labels[10:20])
    assert (np.bincount(labels[::10], minlength=10) > 400).all()


def test_no_near_duplicates(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, _, _ = full
    assert len({hashlib.sha1(image.tobytes()).digest() for image in images}) == len(images)  # no exact repeats
    # Pairwise RMS difference of 8x8 thumbnails of 2 000 images, all pairs at once with a matrix product.
    small = images[:2_000].reshape(2_000, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(2_000, -1)
    small = small.astype(np.float64)
    squared = (small**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * small @ small.T
    np.fill_diagonal(distances, np.inf)
    rms = float(np.sqrt(max(distances.min(), 0) / small.shape[1]))
    print(f"closest pair of 2 000 thumbnails: {rms:.1f} grey levels RMS")
    assert rms > 8, f"two images differ by only {rms:.1f} grey levels RMS"


def test_pixel_statistics_are_plausible(full: tuple[np.ndarray, np.ndarray, float]) -> None:
    images, labels, _ = full
    sample = images[:5_000]
    assert 60 <= sample.mean() <= 190 and sample.std() > 30  # real CIFAR-10: about 121 and 64
    saturated = np.mean((sample == 0) | (sample == 255))
    assert saturated < 0.08, f"{saturated:.1%} of the pixels are clipped"
    per_image = sample.reshape(len(sample), -1).std(axis=1)
    assert np.mean(per_image < 5) < 0.01  # hardly any flat images
    # Neighbouring pixels and colour channels correlate as in photographs (noise would give ~0).
    flat = sample[:500].astype(np.float32)
    assert np.corrcoef(flat[:, :, :-1].ravel(), flat[:, :, 1:].ravel())[0, 1] > 0.8
    channels = np.corrcoef(flat.reshape(-1, 3).T)
    assert channels[np.triu_indices(3, 1)].min() > 0.7
    # Labels carry some signal: mean colours differ between classes.
    class_means = np.stack([images[labels == k].mean(axis=(0, 1, 2)) for k in range(10)])
    assert np.ptp(class_means, axis=0).max() > 5


@pytest.mark.parametrize("n, seed, split", [(-1, 0, "train"), (2.0, 0, "train"), (5, -1, "train"), (5, 0, "val")])
def test_bad_arguments(n: object, seed: object, split: str) -> None:
    with pytest.raises(DatasetError):
        synthetic_cifar10(n, seed, split=split)  # type: ignore[arg-type]


def test_zero_images() -> None:
    images, labels = synthetic_cifar10(0)
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
