"""imagenet_like: deterministic JPEG files with ImageNet-1k's sizes and bytes, and their ImageFolder layout.

The statistics test needs the whole photo catalogue (the ``imagenet-like`` extra: scikit-image and
matplotlib); the others run on whatever part of it is installed (matplotlib's one photo is enough),
so they also run where the extra is not installed.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from imgstore.datasets import EncodedImages, imagenet_like, load_dataset, register_dataset, write_imagenet_like_folder
from imgstore.datasets import photos as photos_module
from imgstore.datasets import registry as dataset_registry
from imgstore.datasets.imagenet_like import INSTALL_HINT, class_names
from imgstore.errors import DatasetError, DatasetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
# The module, not the function of the same name that imgstore.datasets exports (and that shadows it there).
imagenet_like_module = importlib.import_module("imgstore.datasets.imagenet_like")

# ImageNet-1k train (module docstring of imgstore.datasets.imagenet_like): 115 kB a file on average,
# median 500x375. The tolerances allow for a sample of 300 (the mean of a skewed size distribution
# moves by several percent between samples) and nothing more.
IMAGENET_MEAN_KB = 115.0
SAMPLE = 300


def complete() -> bool:
    return len(photos_module.find_photos()) == len(photos_module.CATALOGUE)


@pytest.fixture
def photos(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole catalogue where it is installed, else the part that is (skips when none is)."""
    found = photos_module.find_photos()
    if not found:
        pytest.skip(f"no photo package installed ({INSTALL_HINT})")
    monkeypatch.setattr(photos_module, "CATALOGUE", tuple(photo for photo, _ in found))


def decode(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    image.load()
    return image


@pytest.fixture(scope="module")
def sample() -> tuple[EncodedImages, list[Image.Image], float]:
    """SAMPLE images of the whole catalogue, decoded, and the seconds they took to make."""
    if not complete():
        pytest.skip(f"the statistics need the whole photo catalogue ({INSTALL_HINT})")
    start = time.perf_counter()
    data = imagenet_like(SAMPLE, seed=11)
    seconds = time.perf_counter() - start
    return data, [decode(blob) for blob in data.blobs], seconds


def test_statistics_match_imagenet(sample: tuple[EncodedImages, list[Image.Image], float]) -> None:
    data, images, seconds = sample
    width = np.array([image.width for image in images])
    height = np.array([image.height for image in images])
    kilobytes = np.array([len(blob) for blob in data.blobs]) / 1000
    print(
        f"imagenet_like({SAMPLE}): {seconds:.1f} s; width median {np.median(width):.0f} mean {width.mean():.0f}, "
        f"height median {np.median(height):.0f} mean {height.mean():.0f}, "
        f"kB median {np.median(kilobytes):.1f} mean {kilobytes.mean():.1f}"
    )
    assert all(image.format == "JPEG" and image.mode == "RGB" for image in images)
    assert np.median(width) == 500 and 333 <= np.median(height) <= 400  # 500x375 and 500x333 dominate
    assert 440 <= width.mean() <= 510 and 360 <= height.mean() <= 420
    assert np.mean(np.maximum(width, height) == 500) == pytest.approx(0.68, abs=0.1)  # the web's 500-pixel size
    assert min(width.min(), height.min()) >= 32 and max(width.max(), height.max()) <= 1200
    assert kilobytes.mean() == pytest.approx(IMAGENET_MEAN_KB, rel=0.15)
    assert 75 <= np.median(kilobytes) <= 125  # right-skewed, like any set of JPEG sizes
    assert kilobytes.min() > 2 and kilobytes.max() < 1500
    # Most ImageNet files have no chroma subsampling (0 is 4:4:4 in Pillow's terms).
    assert np.mean([JpegImagePlugin.get_sampling(image) == 0 for image in images]) >= 0.8
    assert seconds < 20, f"{SAMPLE} images took {seconds:.1f} s"  # about 1.5 s on 2 cores


def test_images_are_not_near_duplicates(sample: tuple[EncodedImages, list[Image.Image], float]) -> None:
    data, images, _ = sample
    assert len({hashlib.sha256(blob).digest() for blob in data.blobs}) == len(data.blobs)
    # Grey 32x32 thumbnails, compared pairwise by correlation (brightness and contrast jitter do not
    # hide a copy): two crops of one photo differ in place, scale and flip. The highest pair is
    # 0.91-0.98 for 300 images of seeds 0, 3, 7, 11; whole-photo crops (before _MAX_SCALE) gave 0.999.
    thumbs = np.stack([np.asarray(image.convert("L").resize((32, 32)), dtype=np.float64).ravel() for image in images])
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True) + 1e-9
    correlation = thumbs @ thumbs.T
    np.fill_diagonal(correlation, -1)
    assert correlation.max() < 0.99, f"images {np.unravel_index(correlation.argmax(), correlation.shape)} look alike"


def test_deterministic_and_prefix_stable(photos: None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = imagenet_like(40, seed=3)
    assert len(data) == 40 and all(isinstance(blob, bytes) for blob in data.blobs)
    assert imagenet_like(40, seed=3).blobs == data.blobs
    assert imagenet_like(7, seed=3).blobs == data.blobs[:7]  # image k does not depend on n
    assert imagenet_like(0, seed=3).blobs == []
    other = imagenet_like(40, seed=4).blobs
    assert sum(a != b for a, b in zip(other, data.blobs, strict=True)) == 40
    test_split = imagenet_like(40, seed=3, split="test").blobs
    assert sum(a != b for a, b in zip(test_split, data.blobs, strict=True)) == 40
    # Each image is made on its own, so the threads, processes and chunks that made it do not matter.
    sources = imagenet_like_module._load_sources(photos_module.find_photos())
    for k in (0, 31, 32, 39):
        assert imagenet_like_module._make(sources, 3, 0, k) == data.blobs[k]
    monkeypatch.setattr(imagenet_like_module, "_PROCESS_MIN", 1)  # forked workers, as for big requests
    assert imagenet_like(40, seed=3).blobs == data.blobs


def test_same_bytes_in_another_process(photos: None) -> None:
    names = [photo.name for photo in photos_module.CATALOGUE]
    code = (
        "import hashlib, sys\n"
        "from imgstore.datasets import photos, imagenet_like\n"
        "photos.CATALOGUE = tuple(p for p in photos.CATALOGUE if p.name in sys.argv[1:])\n"
        "print(hashlib.sha256(b''.join(imagenet_like(12, seed=5).blobs)).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    assert result.stdout.strip() == hashlib.sha256(b"".join(imagenet_like(12, seed=5).blobs)).hexdigest()


def test_decodes_to_rgb_and_labels_are_balanced(photos: None) -> None:
    data = imagenet_like(30, seed=1, classes=3)
    for blob in data.blobs:
        image = decode(blob)
        assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= 32
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [k % 3 for k in range(30)]
    assert data.classes == ["class_00", "class_01", "class_02"]
    assert class_names(10)[-1] == "class_09" and class_names(101)[0] == "class_000"
    assert imagenet_like(30, seed=1, classes=5).blobs == data.blobs  # classes only change the labels


def image_folder_order(root: Path) -> list[Path]:
    """torchvision.datasets.ImageFolder's sample order: classes sorted, then each class's files sorted."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths = []
    for name in classes:
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            paths.extend(Path(folder) / file for file in sorted(files))
    return paths


def test_write_image_folder(photos: None, tmp_path: Path) -> None:
    data = imagenet_like(25, seed=2, classes=4)
    root = tmp_path / "train"
    paths = data.write_image_folder(root)
    assert sorted(entry.name for entry in root.iterdir()) == data.classes
    assert paths == image_folder_order(root)
    assert all(path.suffix == ".JPEG" and path.name.startswith(path.parent.name + "_") for path in paths)
    # Sample i of the ImageFolder is image indices[i]: its bytes, its label, and index order within a class.
    indices = [int(path.stem.rsplit("_", 1)[1]) for path in paths]
    assert sorted(indices) == list(range(25))
    for path, index in zip(paths, indices, strict=True):
        assert path.read_bytes() == data.blobs[index]
        assert data.classes.index(path.parent.name) == data.labels[index]
    assert indices == sorted(indices, key=lambda i: (data.labels[i], i))
    with pytest.raises(DatasetError, match="not an empty folder"):
        data.write_image_folder(root)
    assert write_imagenet_like_folder(tmp_path / "again", 25, seed=2, classes=4) == image_folder_order(
        tmp_path / "again"
    )
    assert [path.read_bytes() for path in image_folder_order(tmp_path / "again")] == [p.read_bytes() for p in paths]


def test_cache_dir_is_read_back_and_filled_in(photos: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = imagenet_like(12, seed=6).blobs
    assert imagenet_like(8, seed=6, cache_dir=tmp_path).blobs == expected[:8]
    (folder,) = list(tmp_path.glob("imagenet-like-*/train-6"))
    assert len(list(folder.iterdir())) == 8  # one file per image, nothing else (no temporary left)
    made: list[int] = []
    make = imagenet_like_module._make

    def counting_make(sources: object, seed: int, stream: int, k: int) -> bytes:
        made.append(k)
        return make(sources, seed, stream, k)  # type: ignore[arg-type]

    monkeypatch.setattr(imagenet_like_module, "_make", counting_make)
    assert imagenet_like(12, seed=6, cache_dir=tmp_path).blobs == expected
    assert sorted(made) == [8, 9, 10, 11]  # the first 8 were read, not made again
    assert len(list(folder.iterdir())) == 12
    assert imagenet_like(12, seed=6, cache_dir=tmp_path).blobs == expected and len(made) == 4


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = photos_module._package_dir
    monkeypatch.setattr(photos_module, "_package_dir", lambda module: None if module == "skimage" else real(module))
    with pytest.raises(DatasetNotFoundError, match="scikit-image") as error:
        imagenet_like(3)
    assert INSTALL_HINT in str(error.value) and 'pip install "imgstore-ml[imagenet-like]"' in str(error.value)
    monkeypatch.setattr(photos_module, "_package_dir", lambda module: None)
    with pytest.raises(DatasetNotFoundError, match="matplotlib, scikit-image are missing"):
        load_dataset("imagenet-like", 3)
    with pytest.raises(DatasetNotFoundError):
        write_imagenet_like_folder(tmp_path / "train", 3)
    assert not (tmp_path / "train").exists()


def test_bad_arguments() -> None:
    for kwargs in ({"n": -1}, {"n": 2.0}, {"n": 1, "seed": -1}, {"n": 1, "seed": True}, {"n": 1, "classes": 0}):
        with pytest.raises(DatasetError, match="must be an integer"):
            imagenet_like(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="split"):
        imagenet_like(1, split="val")


def test_registry_loader_returns_files(photos: None) -> None:
    blobs, labels = load_dataset("imagenet-like", 12, seed=3)
    assert isinstance(blobs, list) and blobs == imagenet_like(12, seed=3).blobs
    assert labels.tolist() == [k % 10 for k in range(12)]
    test_blobs, _ = load_dataset("imagenet-like", 2, seed=3, split="test")
    assert test_blobs == imagenet_like(2, seed=3, split="test").blobs


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(dataset_registry._registry)
    yield
    dataset_registry._registry.clear()
    dataset_registry._registry.update(saved)


def test_load_dataset_takes_and_repeats_a_list(restore_registry: None) -> None:
    def three_files(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[list[bytes], np.ndarray]:
        return [b"a", b"b", b"c"], np.array([0, 1, 2], dtype=np.int64)  # a real dataset: whatever n is

    register_dataset("three-files", three_files)
    blobs, labels = load_dataset("three-files", 7)
    assert blobs == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"] and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    blobs, labels = load_dataset("three-files", 2)
    assert blobs == [b"a", b"b"] and labels.tolist() == [0, 1]
    blobs, labels = load_dataset("three-files")
    assert blobs == [b"a", b"b", b"c"] and labels.tolist() == [0, 1, 2]
