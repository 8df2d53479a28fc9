"""PNG backend: one PNG file per image (Pillow), labels in one int64 file beside them.

Files fan out into folders of ``files_per_dir`` so no folder holds 100 000 files. Files past the
committed count are invisible and simply rewritten, which is what makes a crashed write harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

from imgstore.errors import CorruptStoreError, InvalidImageError
from imgstore.manifest import fsync_dir
from imgstore.store import Store

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PNG colour type
_LABELS = "labels.i64"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class PngStore(Store):
    name = "png"
    option_defaults = {"compress_level": 6, "files_per_dir": 1000}  # 6 is Pillow's default

    @classmethod
    def check_shape(cls, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in _MODES):
            raise InvalidImageError(
                f"the png backend holds [H, W] or [H, W, C] images with C in 1, 3, 4; got shape {shape}"
            )

    def _open(self, create: bool) -> None:
        self._labels_path = self.path / _LABELS
        if create:
            self._labels_path.touch()
        self._file_labels = None  # read lazily: a reader of one image should not load every label

    def _close(self) -> None:
        self._file_labels = None

    def image_path(self, index: int) -> Path:
        per_dir = self.options["files_per_dir"]
        return self.path / "png" / f"{index // per_dir:05d}" / f"{index:09d}.png"

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        mode = _MODES[images.shape[3] if images.ndim == 4 else 1]
        level = self.options["compress_level"]
        dirs: set[Path] = set()
        for k, image in enumerate(images):
            path = self.image_path(start + k)
            if path.parent not in dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(path.parent)
            Image.fromarray(image.reshape(image.shape[:2]) if mode == "L" else image, mode).save(
                path, format="PNG", compress_level=level
            )
        with open(self._labels_path, "r+b") as f:
            f.truncate(start * 8)  # drop labels a crashed write left past the committed count
            f.seek(start * 8)
            f.write(labels.astype("<i8").tobytes())
        self._file_labels = None
        if self.sync:
            _sync_filesystem(self.path)
            for d in dirs | {self.path / "png"}:
                fsync_dir(d)

    # -------------------------------------------------------------- reading

    def _labels(self) -> np.ndarray:
        if self._file_labels is None or len(self._file_labels) < len(self):
            labels = np.fromfile(self._labels_path, dtype="<i8")
            if len(labels) < len(self):
                raise CorruptStoreError(f"{self._labels_path} holds {len(labels)} labels; {len(self)} are committed")
            self._file_labels = labels
        return self._file_labels

    def _decode_into(self, index: int, out: np.ndarray) -> None:
        path = self.image_path(index)
        try:
            with Image.open(path, formats=["PNG"]) as image:
                if image.size != (out.shape[1], out.shape[0]) or image.mode != _MODES[out.size // (out.shape[0] * out.shape[1])]:
                    raise CorruptStoreError(f"{path} is {image.mode} {image.size}, not an image of shape {out.shape}")
                out[...] = np.asarray(image).reshape(out.shape)
        except FileNotFoundError:
            raise CorruptStoreError(f"image {index} is committed but {path} is missing") from None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for a damaged file
            raise CorruptStoreError(f"{path} is not a readable PNG: {exc}") from None

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        labels[:] = self._labels()[indices]
        for k, index in enumerate(indices.tolist()):
            self._decode_into(index, images[k])

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.shape, dtype=np.uint8)
        self._decode_into(index, image)
        with open(self._labels_path, "rb") as f:
            f.seek(index * 8)
            raw = f.read(8)
        if len(raw) != 8:
            raise CorruptStoreError(f"{self._labels_path} has no label for committed image {index}")
        return image, int.from_bytes(raw, "little")


def _sync_filesystem(path: Path) -> None:
    """One syncfs() for a whole batch of new files: far cheaper than an fsync per file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
