"""PNG backend: one PNG file per image (Pillow), labels in one int64 file beside them.

Files fan out into folders of ``files_per_dir`` so no folder holds 100 000 files. Files past the
committed count are invisible and simply rewritten, which is what makes a crashed write harmless.
Batches of ``parallel_min`` images or more are encoded/decoded by ``workers`` processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgstore import parallel
from imgstore.errors import CorruptStoreError, InvalidImageError
from imgstore.fileio import sync_filesystem
from imgstore.options import Option
from imgstore.store import Store

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PNG colour type
_LABELS = "labels.i64"


class PngStore(Store):
    name = "png"
    damage_errors = (OSError,)  # e.g. the labels file is missing
    files = ("png", "labels.i64")
    scan_piece_bytes = None  # decoding is the cost: check a scan after one read, decoded on every core
    option_specs = {
        # Pillow's default; 1 is faster and larger, 9 slower and smaller. Applies to new writes only.
        "compress_level": Option(6, 0, 9),
        "files_per_dir": Option(1000, 1, 1 << 30, fixed=True),  # where image i's file is
        "workers": Option(None, 1, 1024, allow_none=True),  # processes for big batches; None: one per CPU
        "parallel_min": Option(2048, 1, 1 << 40),  # smaller batches stay in this process: a pool round trip costs more
    }
    # Level 0 stores deflate blocks uncompressed: 2x faster to encode, 1.5x to decode, +40% bytes
    # (a 32x32 PNG still fits one 4 KiB block); 9 squeezes hardest. 1 is no faster than 6 here.
    presets = {"level0": {"compress_level": 0}, "level9": {"compress_level": 9}}

    @classmethod
    def check_shape(cls, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in _MODES):
            raise InvalidImageError(
                f"the png backend holds [H, W] or [H, W, C] images with C in 1, 3, 4; got shape {shape}"
            )

    def _open(self, create: bool) -> None:
        self._labels_path = self.file(_LABELS)
        self._root = str(self.file("png"))
        if create:
            self._labels_path.touch()
        self._file_labels: np.ndarray | None = None  # loaded on first read of many

    def _close(self) -> None:
        self._file_labels = None

    def _refresh(self, old_count: int) -> None:
        self._file_labels = None

    def image_path(self, index: int) -> Path:
        return Path(_image_path(self._root, self.options["files_per_dir"], index))

    def _read_ahead(self) -> int:
        return self.options["parallel_min"] if self._workers(self.options["parallel_min"]) > 1 else 0

    def _workers(self, n: int) -> int:
        if n < self.options["parallel_min"] or not parallel.can_fork():
            return 1
        return self.options["workers"] or parallel.default_workers()

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        per_dir = self.options["files_per_dir"]
        dirs = {self.file("png") / f"{i // per_dir:05d}" for i in range(start, start + len(images), per_dir)}
        dirs.add(self.image_path(start + len(images) - 1).parent)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        args = (self._root, per_dir, start, self.options["compress_level"])
        parallel.run_split(lambda lo, hi: _encode_range(images, lo, hi, args), len(images), self._workers(len(images)))
        with open(self._labels_path, "r+b") as f:
            f.truncate(start * 8)  # drop labels a crashed write left past the committed count
            f.seek(start * 8)
            f.write(labels.astype("<i8").tobytes())
        self._file_labels = None
        if self.sync:
            sync_filesystem(self.path)  # one syncfs for every new file and folder entry

    # -------------------------------------------------------------- reading

    def _labels(self) -> np.ndarray:
        if self._file_labels is None or len(self._file_labels) < len(self):
            labels = np.fromfile(self._labels_path, dtype="<i8")
            if len(labels) < len(self):
                raise CorruptStoreError(f"{self._labels_path} holds {len(labels)} labels; {len(self)} are committed")
            self._file_labels = labels
        return self._file_labels

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        labels[:] = self._labels()[indices]
        args = (self._root, self.options["files_per_dir"], indices)
        workers = self._workers(len(indices))
        if workers == 1:
            _decode_range(images, 0, len(indices), args)
            return
        shared = parallel.shared_like(images)  # children decode here; the parent's own slice goes to images
        first = parallel.split(len(indices), workers)[0][1]

        def decode(lo: int, hi: int) -> None:
            _decode_range(images if lo == 0 else shared, lo, hi, args)

        parallel.run_split(decode, len(indices), workers)
        images[first:] = shared[first:]

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.image_shape, dtype=np.uint8)
        _decode_into(_image_path(self._root, self.options["files_per_dir"], index), image)
        return image, int(self._labels()[index])  # labels are read once per handle, not per image


# ---------------------------------------------------------------------- per-image work (also run in pool workers)


def _image_path(root: str, per_dir: int, index: int) -> str:
    return f"{root}/{index // per_dir:05d}/{index:09d}.png"


def _encode_range(images: np.ndarray, lo: int, hi: int, args: tuple[str, int, int, int]) -> None:
    root, per_dir, start, level = args
    for k in range(lo, hi):
        image = images[k]
        pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        pil.save(_image_path(root, per_dir, start + k), format="PNG", compress_level=level)


def _decode_range(images: np.ndarray, lo: int, hi: int, args: tuple[str, int, np.ndarray]) -> None:
    root, per_dir, indices = args
    for k in range(lo, hi):
        _decode_into(_image_path(root, per_dir, int(indices[k])), images[k])


def _decode_into(path: str, out: np.ndarray) -> None:
    """Decode a PNG (and only a PNG) of exactly ``out``'s shape into ``out``."""
    height, width = out.shape[:2]
    mode = _MODES[out.shape[2] if out.ndim == 3 else 1]
    try:
        with Image.open(path, formats=["PNG"]) as image:
            # Checked before decoding: a damaged or hostile file cannot make us inflate a huge image.
            if image.size != (width, height) or image.mode != mode:
                raise CorruptStoreError(f"{path} is a {image.mode} {image.size} image, not {mode} {(width, height)}")
            out[...] = np.asarray(image).reshape(out.shape)
    except FileNotFoundError:
        raise CorruptStoreError(f"{path} is committed but missing") from None
    except (OSError, SyntaxError, ValueError) as exc:  # how Pillow reports a damaged file
        raise CorruptStoreError(f"{path} is not a readable PNG: {exc}") from None
