"""A new user's folder of photos: converted, read in a real DataLoader, exactly what torchvision's ImageFolder gives.

The reference is torchvision's ``ImageFolder`` where torchvision imports (its registry wheels are CUDA
builds that do not import beside the CPU torch this machine class has), and otherwise ImageFolder's
documented rules, written out here independently of imgstore: classes are the sorted subfolder
names, files are sorted within a class (walking subfolders, following links), only files with an
image extension count, and the default loader is ``PIL.Image.open(f).convert("RGB")``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.convert import convert
from imgstore.datasets.imagenet_like import imagenet_like

torch = pytest.importorskip("torch")
from imgstore.torch import StoreDataset  # noqa: E402

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def reference_samples(root: Path) -> list[tuple[str, int]]:
    """(path, label) in torchvision's ImageFolder order, by its documented rules."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(EXTENSIONS):
                    samples.append((os.path.join(folder, file), label))
    return samples


def torchvision_samples(root: Path) -> list[tuple[np.ndarray, int]] | None:
    try:
        from torchvision.datasets import ImageFolder
    except Exception:  # not importable beside this torch: the documented rules stand in
        return None
    return [(np.asarray(image), label) for image, label in ImageFolder(str(root))]


def _save(path: Path, image: Image.Image, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: real photographs of varied size, and files of every mode Pillow meets."""
    root = tmp_path_factory.mktemp("photos")
    data = imagenet_like(24, seed=4, classes=3)
    for k, (blob, label) in enumerate(zip(data.blobs, data.labels.tolist(), strict=True)):
        sub = root / f"{['cat', 'Dog', 'bird'][label]}" / ("nested" if k % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"IMG_{k:03d}.{'JPG' if k % 4 == 0 else 'jpeg'}").write_bytes(blob)
    photo = Image.open(io.BytesIO(data.blobs[0])).convert("RGB").resize((64, 48))
    rng = np.random.default_rng(0)
    _save(root / "bird" / "grey.png", photo.convert("L"))
    _save(root / "bird" / "palette.png", photo.convert("P"))
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    _save(root / "bird" / "palette_transparent.png", palette, transparency=0)
    _save(root / "bird" / "rgba.png", Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8)))
    _save(root / "cat" / "cmyk.jpg", photo.convert("CMYK"), quality=90)
    _save(root / "cat" / "grey.jpg", photo.convert("L"), quality=85)
    _save(root / "cat" / "wide16.png", Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)))
    _save(root / "Dog" / "lossless.webp", photo, lossless=True)
    _save(root / "Dog" / "lossy.webp", photo, quality=80)
    _save(root / "Dog" / "old.bmp", photo)
    _save(root / "Dog" / "scan.tiff", photo)
    (root / "Dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "thumbs.db").write_bytes(b"\0" * 10)
    return root


@pytest.mark.parametrize("backend", ["lmdb", "hdf5", "png"])
@pytest.mark.parametrize("codec", ["keep", "png"])
def test_a_folder_of_photos_reads_back_as_imagefolder_gives_it(
    photos: Path, tmp_path: Path, backend: str, codec: str
) -> None:
    dest = tmp_path / "store"
    result = convert(photos, dest, backend=backend, codec=codec, workers=2)
    expected = reference_samples(photos)
    assert result.count == len(expected) and not result.skipped
    with imgstore.open_store(dest) as store:
        assert store.classes == ["Dog", "bird", "cat"]  # sorted as ImageFolder sorts: by code point
        assert [store.source_path(i) for i in range(len(store))] == [
            os.path.relpath(path, photos) for path, _ in expected
        ]
    # A real DataLoader with worker processes, one sample at a time (the images vary in size).
    loader = torch.utils.data.DataLoader(StoreDataset(dest), batch_size=None, num_workers=2)
    got = [(image.numpy(), int(label)) for image, label in loader]
    assert len(got) == len(expected)
    for (image, label), (path, want_label) in zip(got, expected, strict=True):
        with Image.open(path) as source:
            want = np.asarray(source.convert("RGB"))
        assert label == want_label, path
        assert image.shape == want.shape and np.array_equal(image, want), path
    reference = torchvision_samples(photos)
    if reference is not None:
        assert [label for _, label in reference] == [label for _, label in got]
        assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(reference, got, strict=True))


def test_batches_of_one_size_from_a_folder_of_varied_sizes(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "store"
    convert(photos, dest, backend="lmdb", workers=2)
    dataset = StoreDataset(dest, size=(32, 40))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2)
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (32, 40, 3)
        seen.extend(labels.tolist())
    assert sorted(seen) == sorted(label for _, label in reference_samples(photos))
