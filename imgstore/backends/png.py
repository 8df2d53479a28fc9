"""PNG backend: one file per image, in fan-out folders; labels in one int64 file beside them.

Layout (``<gen>`` is the store's generation, ``<i>`` the record's index)::

    png-<gen>/<i // files_per_dir:05d>/<i:09d><ext>   one file per record, files_per_dir (1000) to a folder
    png-<gen>/suffix.txt                              keep stores only: their one <ext> (e.g. ".jpg")
    labels-<gen>.i64                                  label of record i: int64 little-endian at byte 8 i

Raw stores of one shape: each file is a PNG of the image (``.png``), encoded and decoded here by
Pillow; batches of ``parallel_min`` images or more by ``workers`` processes. Encoded stores (codec
``png``, ``jpeg``, ``webp``, ``keep``, or ``raw`` of varied shapes): each file is the record's bytes
as stored, nothing added, so any viewer opens them: ``.png``, ``.jpg``, ``.webp``; ``.raw`` for raw
(imgstore's shape header, then the pixels). A ``keep`` store's files share one suffix, chosen by its
first write: that of the most common format among its first files (``.jpg`` for JPEGs; ``.bin`` for
a format without one); a file of another format keeps that suffix (its bytes say what it is). One
suffix per store, not per record, so a reader finds record i's file without looking anything up.

Files past the committed count are invisible and simply rewritten, which is what makes a crashed
write harmless. A write makes its files durable with one ``syncfs``, before the manifest commits.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from imgstore import parallel
from imgstore.codecs import Codec, ImageInfo, probe
from imgstore.errors import CorruptStoreError, InvalidImageError
from imgstore.fileio import sync_filesystem
from imgstore.manifest import MAX_IMAGE_BYTES
from imgstore.options import Option
from imgstore.store import Store

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PNG colour type
_LABELS = "labels.i64"
_SUFFIX_FILE = "suffix.txt"  # in the png folder, of keep stores
# A suffix read back from the store is input: nothing but a dot and a few letters can reach a path.
_SUFFIX = re.compile(r"\.[a-z0-9]{1,16}")
_SUFFIX_SAMPLE = 64  # a keep store's suffix: the most common format among its first files (up to this many)
_ANY_IMAGE = ImageInfo("", 0, 0, 0, "")  # the png/jpeg/webp/raw codecs' suffix does not depend on the image
# Reading files on threads overlaps their I/O waits. Measured (256 shuffled ~110 KB JPEGs, 2 cores,
# median): cold cache 150 ms serial, 58 ms on 4 threads, 43 ms on 8; warm 26 ms either way.
# Small batches read serially: a thread hand-off costs more than it overlaps.
_READ_THREADS = 8
_THREADED_READ_MIN = 16


class PngStore(Store):
    name = "png"
    damage_errors = (OSError,)  # e.g. the labels file is missing
    files = ("png", "labels.i64")
    link_check_depth = 1  # its folders, not the files in them (a million of them: a walk would cost seconds)
    readers = ("any image viewer or loader: one PNG/JPEG/WebP file per image", "torchvision ImageFolder-style tools")
    caveats = ()
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
        self._suffix: str | None = None  # encoded stores: their files' suffix, once known (never changes)

    def _close(self) -> None:
        self._file_labels = None

    def _refresh(self, old_count: int) -> None:
        self._file_labels = None

    def image_path(self, index: int) -> Path:
        """Where record ``index``'s file is."""
        suffix = self._record_suffix() if self._encoded is not None else ".png"
        return Path(_image_path(self._root, self.options["files_per_dir"], index, suffix))

    def _record_suffix(self) -> str:
        """The suffix of this encoded store's files: one per store, so no record needs a lookup."""
        if self._suffix is None:
            codec = self._codec()
            if codec.name != "keep":
                self._suffix = codec.extension(_ANY_IMAGE)
            else:
                path = os.path.join(self._root, _SUFFIX_FILE)
                try:
                    with open(path, "rb") as f:
                        text = f.read(64).decode("ascii", "replace")
                except FileNotFoundError:
                    raise CorruptStoreError(f"{path} is missing: it names the files of the committed images") from None
                if not _SUFFIX.fullmatch(text):
                    raise CorruptStoreError(f"{path} holds {text[:20]!r}, not a file suffix")
                self._suffix = text
        return self._suffix

    def _codec(self) -> Codec:
        assert self._encoded is not None, "only encoded stores keep records as bytes"
        return self._encoded.codec

    def _read_ahead(self) -> int:
        return self.options["parallel_min"] if self._workers(self.options["parallel_min"]) > 1 else 0

    def _workers(self, n: int) -> int:
        if n < self.options["parallel_min"] or not parallel.can_fork():
            return 1
        return self.options["workers"] or parallel.default_workers()

    # -------------------------------------------------------------- writing

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        per_dir = self.options["files_per_dir"]
        self._make_dirs(start, len(images))
        args = (self._root, per_dir, start, self.options["compress_level"])
        parallel.run_split(lambda lo, hi: _encode_range(images, lo, hi, args), len(images), self._workers(len(images)))
        self._write_labels(start, labels)
        if self.sync:
            sync_filesystem(self.path)  # one syncfs for every new file and folder entry

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        if start == 0 and self._codec().name == "keep":  # the first write (maybe again, after a crash) picks it
            Path(self._root).mkdir(parents=True, exist_ok=True)
            suffix = _store_suffix(self._codec(), blobs)
            with open(os.path.join(self._root, _SUFFIX_FILE), "w", encoding="ascii") as f:
                f.write(suffix)
            self._suffix = suffix
        suffix = self._record_suffix()
        per_dir = self.options["files_per_dir"]
        self._make_dirs(start, len(blobs))
        for k, blob in enumerate(blobs):
            with open(_created(_image_path(self._root, per_dir, start + k, suffix)), "wb") as f:
                f.write(blob)
        self._write_labels(start, labels)
        if self.sync:
            sync_filesystem(self.path)  # one syncfs for every new file and folder entry

    def _make_dirs(self, start: int, n: int) -> None:
        per_dir = self.options["files_per_dir"]
        for folder in range(start // per_dir, (start + n - 1) // per_dir + 1):
            os.makedirs(f"{self._root}/{folder:05d}", exist_ok=True)

    def _write_labels(self, start: int, labels: np.ndarray) -> None:
        with open(self._labels_path, "r+b") as f:
            f.truncate(start * 8)  # drop labels a crashed write left past the committed count
            f.seek(start * 8)
            f.write(labels.astype("<i8").tobytes())
        self._file_labels = None

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

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        labels = self._labels()[indices].astype(np.int64)
        try:
            suffix = self._record_suffix()
            paths = [_image_path(self._root, self.options["files_per_dir"], i, suffix) for i in indices.tolist()]
            return _read_files(paths), labels
        except CorruptStoreError:
            if self._replaced():  # its files went with the old generation: say so, not "missing"
                raise CorruptStoreError(
                    f"{self.path} was replaced (mode 'w') under this handle; open it again"
                ) from None
            raise


# ---------------------------------------------------------------------- per-image work (also run in pool workers)


def _image_path(root: str, per_dir: int, index: int, suffix: str = ".png") -> str:
    return f"{root}/{index // per_dir:05d}/{index:09d}{suffix}"


def _encode_range(images: np.ndarray, lo: int, hi: int, args: tuple[str, int, int, int]) -> None:
    root, per_dir, start, level = args
    for k in range(lo, hi):
        image = images[k]
        pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        with open(_created(_image_path(root, per_dir, start + k)), "wb") as f:
            pil.save(f, format="PNG", compress_level=level)


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


# ---------------------------------------------------------------------- encoded records


def _store_suffix(codec: Codec, blobs: Sequence[bytes]) -> str:
    """A keep store's one suffix: that of the most common format among its first files (".jpg" for JPEGs).

    The most common, not "the one": a folder of photos may hold a stray PNG (ImageNet's does), and
    one odd file should not name all the others ".bin". A sample: probing every file costs time.
    """
    infos: dict[str, tuple[int, ImageInfo]] = {}
    for blob in blobs[:_SUFFIX_SAMPLE]:
        try:
            info = probe(blob)
        except InvalidImageError:  # the store probed it already: cannot happen; no reason to fail over a name
            continue
        infos[info.format] = (infos.get(info.format, (0, info))[0] + 1, info)
    if not infos:
        return ".bin"
    suffix = codec.extension(max(infos.values(), key=lambda seen: seen[0])[1])  # ties: the first seen
    return suffix.lower() if _SUFFIX.fullmatch(suffix.lower()) else ".bin"


def _read_files(paths: list[str]) -> list[bytes]:
    if len(paths) < _THREADED_READ_MIN:
        return [_read_file(path) for path in paths]
    pieces = [paths[k::_READ_THREADS] for k in range(_READ_THREADS)]  # strided: even if sizes trend
    blobs: list[bytes] = [b""] * len(paths)
    for k, piece in enumerate(_read_pool().map(_read_serially, pieces)):
        blobs[k::_READ_THREADS] = piece
    return blobs


def _read_serially(paths: list[str]) -> list[bytes]:
    return [_read_file(path) for path in paths]


def _read_file(path: str) -> bytes:
    """One record's bytes; missing, empty or oversized files are damage (the size is checked before reading)."""
    try:
        # O_NONBLOCK: a FIFO in a record's place must not hang the open (it changes nothing for a file)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CorruptStoreError(f"{path} is committed but missing") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise CorruptStoreError(f"{path} is not a file")
        size = status.st_size
        if not 0 < size <= MAX_IMAGE_BYTES:
            raise CorruptStoreError(f"{path} holds {size} bytes; a record holds 1 byte to 2 GiB")
        chunks, remaining = [], size
        while remaining:  # one read, but Linux reads at most 2 GiB - 4 KiB at once
            chunk = os.read(fd, remaining)
            if not chunk:
                break  # it shrank since fstat: the checksum (or the decoder) says it is damaged
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="imgstore-png-read")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool = None  # a forked child has none of the parent's threads: work sent to them would never run
    _pool_lock = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_forget_pool)


def _created(path: str) -> int:
    """A record's file, opened for writing (a leftover is truncated); O_NOFOLLOW: a link planted in the
    store must not make a write cut and overwrite a file elsewhere."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
