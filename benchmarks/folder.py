"""The status quo of an encoded dataset: a folder of the JPEG files, read one by one as torchvision's ImageFolder does.

What a training script does today with ImageNet-style files, and the row every imgstore row of
an encoded dataset is compared with (``xfolder``; kind ``tutorial``, backend ``imagefolder``):

- ``store_many``: the files written into ``root/<class>/<index>.JPEG``, one ``write_bytes`` each
  (copying a dataset into place; nothing is fsynced, as the tutorial's rows sync nothing);
- reads: torchvision's ``pil_loader`` per file, ``Image.open(f).convert("RGB")``, made into the
  array a ``ToTensor``-style transform takes (``np.asarray``), in the calling process, one file at
  a time: a ``DataLoader`` with ``num_workers=0``. ``read_many`` goes in index order;
  ``read_random`` and ``read_random_many`` in the shuffled order, the latter collecting batches of
  256 (a list: the sizes vary, so no collate can stack them).

The reader lists the folder like ImageFolder (classes sorted, their files sorted; the class is
the folder's position) and maps each dataset index to its file, so every subject reads the same
image at the same place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.encoded import OPERATIONS_ENCODED, EncodedSubject
from benchmarks.operations import BATCH_SIZE

STATUS_QUO_BACKEND = "imagefolder"  # a "tutorial" row with this backend is the reference of its whole group
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def pil_loader(path: str) -> np.ndarray:
    """torchvision.datasets.folder.pil_loader, then the array its transforms would make of the image."""
    with open(path, "rb") as f:
        image = Image.open(f)
        return np.asarray(image.convert("RGB"))


class _Folder:
    """ImageFolder's index of a root: (path, class index) per file, here in dataset index order."""

    def __init__(self, root: Path) -> None:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        samples: list[tuple[str, int]] = []
        for class_index, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
                samples += [
                    (os.path.join(dirpath, f), class_index) for f in sorted(files) if f.lower().endswith(EXTENSIONS)
                ]
        samples.sort(key=lambda sample: int(Path(sample[0]).stem))  # file <index>.JPEG: dataset order
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)


class ImageFolderSubject(EncodedSubject):
    """The status quo (module docstring)."""

    kind = "tutorial"
    backend = STATUS_QUO_BACKEND
    name = "imagefolder"
    supports = OPERATIONS_ENCODED

    def open_writer(self, path: Path, shape: tuple[int, ...]) -> Path:
        path.mkdir(parents=True)
        return path

    def open_reader(self, path: Path, shape: tuple[int, ...]) -> _Folder:
        return _Folder(path)

    def store_many(self, target: Path, blobs: list[bytes], labels: np.ndarray) -> None:
        # Class folders named so that sorted order is label order: ImageFolder's class index is the label.
        digits = max(3, len(str(int(labels.max()) if len(labels) else 0)))
        made: set[int] = set()
        for i, (blob, label) in enumerate(zip(blobs, labels.tolist(), strict=True)):
            folder = target / f"class_{label:0{digits}d}"
            if label not in made:
                folder.mkdir(exist_ok=True)
                made.add(label)
            (folder / f"{i:09d}.JPEG").write_bytes(blob)

    def read_many(self, reader: _Folder, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        return [pil_loader(reader.paths[i]) for i in range(n)], reader.labels[:n].copy()

    def read_random(self, reader: _Folder, order: list[int]) -> tuple[np.ndarray, int]:
        for i in order:
            image, label = pil_loader(reader.paths[i]), int(reader.labels[i])
        return image, label

    def read_random_many(self, reader: _Folder, order: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        for start in range(0, len(order), BATCH_SIZE):
            indices = order[start : start + BATCH_SIZE]
            batch = [pil_loader(reader.paths[i]) for i in indices], reader.labels[indices]
        return batch
