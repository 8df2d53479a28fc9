"""What ``imgstore convert`` reads: a folder in torchvision's ImageFolder layout, a dataset by name, another store.

A :class:`Source` is an ordered list of items, each with a label; the order is fixed by the source
alone (never by timing or workers), which is what lets a killed conversion resume: the store it
wrote holds a prefix of that list (less any skipped files). ``batch(lo, hi)`` hands out items
``lo .. hi - 1`` as a :class:`Batch` for :func:`prepare_batch`, which runs in the worker pool.

A folder is listed with exactly the rules of ``torchvision.datasets.ImageFolder`` (torchvision's
``find_classes`` and ``make_dataset``, ``allow_empty=False``): classes are the sorted names of the
root's subdirectories (symbolic links to directories count), label ``i`` is ``classes[i]``; a
class's files are those of ``sorted(os.walk(class_dir, followlinks=True))``, each folder's names
sorted, whose lower-cased name ends with one of :data:`IMG_EXTENSIONS`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from imgstore.codecs import decode, get_codec, is_whole, probe
from imgstore.codecs.downscale import checked_shorter_side, downscale_array, downscale_blob, downscaled_size
from imgstore.encoded import PreparedRecord
from imgstore.errors import DatasetError, ImgStoreError, InvalidImageError
from imgstore.fileio import open_regular
from imgstore.manifest import MANIFEST_NAME

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "Batch",
    "ConvertError",
    "Plan",
    "Prepared",
    "Source",
    "Target",
    "find_classes",
    "image_files",
    "make_target",
    "memory_source",
    "open_source",
    "prepare_batch",
]

#: torchvision.datasets.folder.IMG_EXTENSIONS: the files an ImageFolder takes (compared lower-cased).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ItemKind = Literal["file", "bytes", "array"]


class ConvertError(ImgStoreError, ValueError):
    """The conversion's input is not usable: a bad source, DEST, option or file (the CLI's exit status 2)."""


# ---------------------------------------------------------------------- torchvision's ImageFolder rules


def find_classes(root: str | os.PathLike[str]) -> list[str]:
    """torchvision's ``find_classes``: the sorted names of the subdirectories of ``root``."""
    try:
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as exc:
        raise ConvertError(f"{os.fspath(root)}: cannot list the folder: {exc.strerror or exc}") from None
    if not classes:
        raise ConvertError(f"{os.fspath(root)}: no class folder in it (ImageFolder layout: ROOT/<class>/<image>)")
    return classes


def image_files(root: str | os.PathLike[str], classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """torchvision's ``make_dataset``: each image file's path relative to ``root`` and its label, in its order."""
    prefix = os.path.join(os.fspath(root), "")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        class_dir = prefix + name
        if not os.path.isdir(class_dir):  # as torchvision: gone since it was listed
            continue
        before = len(paths)
        for folder, _dirs, names in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    # Relative by slicing, not os.path.relpath: no normalization, and 10x cheaper per file.
                    paths.append(os.path.join(folder, fname)[len(prefix) :])
        labels.extend([label] * (len(paths) - before))
        if len(paths) == before:
            empty.append(name)
    if empty:
        raise ConvertError(
            f"{prefix[:-1]}: no image file in the class folder(s) {', '.join(sorted(empty))} (torchvision's "
            f"ImageFolder refuses an empty class too; image files end with {', '.join(IMG_EXTENSIONS)}, any case)"
        )
    return paths, np.array(labels, dtype=np.int64)


# ---------------------------------------------------------------------- sources


class Batch(NamedTuple):
    kind: ItemKind  # file: inputs are paths to read; bytes: encoded images; array: uint8 arrays
    inputs: Any  # a sequence: list, or an array of images
    labels: np.ndarray
    paths: list[str] | None  # each record's source path, kept in the store (relative to a folder source)


@dataclass
class Source:
    """An ordered list of labelled items, and what a conversion of it does by default."""

    description: str
    origin: Literal["folder", "dataset", "store"]
    kind: ItemKind
    total: int
    classes: list[str] | None
    default_codec: str
    default_image_mode: str | None
    default_params: dict[str, Any]
    shape: tuple[int, ...] | None  # arrays of one shape: the raw store's shape; else None (varied)
    root: Path | None = None  # a folder
    paths: list[str] | None = None  # a folder's files, relative to root
    labels: np.ndarray | None = None  # a folder's or a dataset's labels
    data: np.ndarray | list[bytes] | None = None  # a dataset's images
    store: Any = None  # a store source's read-only handle
    numbers: np.ndarray | None = None  # a part's items' positions in the whole source (for messages)

    def batch(self, lo: int, hi: int) -> Batch:
        if self.origin == "store":
            return self._store_batch(lo, hi)
        assert self.labels is not None
        labels = self.labels[lo:hi]
        if self.origin == "folder":
            assert self.root is not None and self.paths is not None
            rel = self.paths[lo:hi]
            prefix = os.path.join(self.root, "")
            return Batch("file", [prefix + p for p in rel], labels, rel)
        assert self.data is not None
        return Batch(self.kind, self.data[lo:hi], labels, None)

    def _store_batch(self, lo: int, hi: int) -> Batch:
        store = self.store
        if self.kind == "bytes":
            blobs, labels = store.get_encoded_many(range(lo, hi))
            paths = [store.source_path(i) or "" for i in range(lo, hi)]
            return Batch("bytes", blobs, labels, paths if any(paths) else None)
        images, labels = store.get_many(range(lo, hi))
        return Batch("array", images, labels, None)

    def part(self, items: np.ndarray) -> Source:
        """These items (positions in this source, in this order) as a source of their own, which pickles
        (a sharded build's task): a folder's paths, absolute (its files are read where the task runs),
        or a dataset's images."""
        if self.origin == "store":
            raise ConvertError(
                f"{self.description}: a store is not split into shards; convert a folder or a dataset, or convert "
                "the store to a single store"
            )
        assert self.labels is not None
        picked = items.tolist()
        data: Any = self.data
        if isinstance(data, np.ndarray):
            data = data[items]
        elif data is not None:
            data = [data[i] for i in picked]
        return replace(
            self,
            description=f"{self.description}, {len(picked)} of its items",
            total=len(picked),
            root=None if self.root is None else self.root.absolute(),
            paths=None if self.paths is None else [self.paths[i] for i in picked],
            labels=self.labels[items],
            data=data,
            numbers=items if self.numbers is None else self.numbers[items],
        )

    def number(self, position: int) -> int:
        """Item ``position``'s number in the whole source (a part's differ from its positions)."""
        return position if self.numbers is None else int(self.numbers[position])

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def check_outside(self, dest: Path) -> None:
        """Refuse a store inside the folder (or store) it reads: it would become part of it (png files are images)."""
        here = dest.resolve()
        there = self.root.resolve() if self.root is not None else self.store.path.resolve() if self.store else None
        if there is not None and (here == there or there in here.parents):
            raise ConvertError(f"DEST {dest} is inside SOURCE {there}: write the store somewhere else")

    def resume_position(self, store: Any, *, by_path: bool) -> int:
        """Where a conversion into ``store`` (holding a prefix of this source, less skipped files) goes on.

        ``by_path``: after the item of the store's last record, found by its source path (a folder
        converted to a store that keeps paths); else at the store's count.
        """
        count = len(store)
        if not (by_path and self.paths is not None):
            if count > self.total:
                raise ConvertError(
                    f"{store.path} holds {count} images, more than SOURCE's {self.total}: not its prefix"
                )
            return count
        where = {path: k for k, path in enumerate(self.paths)}
        last = -1
        for index in range(count):  # every record, in order: DEST must be a subsequence of SOURCE
            path = store.source_path(index)
            k = where.get(path, -1) if path else -1
            if k <= last:
                why = "is not in SOURCE (any more)" if k < 0 else "comes before the record it follows in SOURCE"
                raise ConvertError(
                    f"{store.path}: image {index} came from {path!r}, which {why}: DEST was converted from another "
                    "folder, or the folder changed since; delete DEST (or pass --overwrite) to convert it anew"
                )
            last = k
        return last + 1


def open_source(text: str | os.PathLike[str], *, split: str = "train") -> Source:
    """The source ``text`` names: ``NAME:ARG`` for a registered dataset, a store's directory, or an ImageFolder."""
    if isinstance(text, str) and not os.path.exists(text):
        from imgstore.datasets import available_datasets  # here: it imports every loader, which a folder needs not

        name, _, arg = text.partition(":")
        if name in available_datasets():
            return _dataset_source(name, arg, split)
    path = Path(text)
    if (path / MANIFEST_NAME).exists():
        return _store_source(path)
    if not path.is_dir():
        from imgstore.datasets import available_datasets

        datasets = ", ".join(f"{n}:..." for n in available_datasets())
        raise ConvertError(f"{path}: not a folder, a store or a dataset ({datasets})")
    classes = find_classes(path)
    paths, labels = image_files(path, classes)
    return Source(
        description=f"folder {path} ({len(classes)} classes)",
        origin="folder",
        kind="file",
        total=len(paths),
        classes=classes,
        default_codec="keep",
        default_image_mode="RGB",  # what torchvision's default loader gives: Image.open(f).convert("RGB")
        default_params={},
        shape=None,
        root=path,
        paths=paths,
        labels=labels,
    )


def _dataset_source(name: str, arg: str, split: str) -> Source:
    from imgstore.datasets import get_dataset, load_dataset
    from imgstore.datasets.imagenet_like import class_names

    counted = name in ("synthetic", "imagenet-like") or (arg.isdigit() and name not in ("cifar10", "fashion-mnist"))
    if counted and not arg.isdigit():
        raise ConvertError(f"{name} takes a number of images: {name}:N, e.g. {name}:1000")
    n, root = (int(arg), None) if counted else (None, arg or None)
    spec = get_dataset(name)
    if root is None and not counted and spec.needs_root:
        raise ConvertError(f"{name} needs the folder of its files: {name}:PATH ({spec.install_hint})")
    try:
        images, labels = load_dataset(name, n, root, split=split)
    except DatasetError as exc:
        raise ConvertError(str(exc)) from None
    names = {"cifar10": list(CIFAR10_CLASSES), "fashion-mnist": list(FASHION_MNIST_CLASSES)}
    if name == "imagenet-like":  # labels k % 10, named as its image folders are
        names[name] = class_names(10)
    return memory_source(f"dataset {name} ({split}, {len(images)} images)", images, labels, names.get(name))


def memory_source(
    description: str, images: np.ndarray | list[bytes], labels: Any, classes: list[str] | None = None
) -> Source:
    """Images in memory as a source: arrays ``[N, ...]`` (default codec raw) or encoded files (keep, RGB)."""
    encoded = isinstance(images, list)
    return Source(
        description=description,
        origin="dataset",
        kind="bytes" if encoded else "array",
        total=len(images),
        classes=classes,
        default_codec="keep" if encoded else "raw",
        default_image_mode="RGB" if encoded else None,
        default_params={},
        shape=None if isinstance(images, list) else tuple(images.shape[1:]),
        labels=np.asarray(labels, dtype=np.int64),
        data=images,
    )


def _store_source(path: Path) -> Source:
    from imgstore.opening import open_store

    store = open_store(path, mode="r")
    encoded = store.codec != "raw" or store.varied
    return Source(
        description=f"{store.backend} store {path} ({store.codec}, {len(store)} images)",
        origin="store",
        kind="bytes" if encoded else "array",
        total=len(store),
        classes=store.classes,
        default_codec=store.codec,
        default_image_mode=store.image_mode,
        default_params=store.codec_params,
        shape=None if encoded else store.shape,
        store=store,
    )


# ---------------------------------------------------------------------- what a conversion makes of a source


@dataclass(frozen=True)
class Target:
    """The store a conversion makes: resolved from its options and the source's defaults."""

    codec: str
    params: dict[str, Any]
    image_mode: str | None  # the store's (None for raw pixels)
    classes: list[str] | None
    shape: tuple[int, ...] | None | Literal["auto"]
    plan: Plan

    @property
    def encoded(self) -> bool:
        return self.codec != "raw" or self.shape is None

    @property
    def keeps_paths(self) -> bool:
        return self.codec != "raw"  # raw pixels go in by put_many, which keeps no source paths


def make_target(
    src: Source,
    codec: str | None,
    quality: int | None,
    image_mode: Any,
    full_check: bool,
    shape: tuple[int, ...] | None = None,
    downscale: int | None = None,
) -> Target:
    name = src.default_codec if codec is None else codec
    shorter = checked_shorter_side(downscale)
    if shorter is not None and name == "keep":
        raise ConvertError(
            "downscale re-encodes the images, and codec keep stores the files as they are: pass a codec "
            "(--codec jpeg --quality 90, png, webp or raw)"
        )
    params: dict[str, Any] = dict(src.default_params) if name == src.default_codec and quality is None else {}
    if quality is not None:
        params["quality"] = quality
    resolved = get_codec(name, **params).params  # an unknown codec or parameter: InvalidOptionError
    mode = src.default_image_mode if image_mode == "auto" else image_mode
    if mode not in (None, "RGB", "L"):
        raise ConvertError(f"image_mode takes 'RGB', 'L' or None, not {image_mode!r}")
    if src.kind == "array" and name == "raw" and mode is not None:
        raise ConvertError("a dataset of arrays stored as raw pixels keeps them as they are: no image mode")
    fixed = checked_shape(shape)
    made = src.shape  # the shape of the source's arrays as stored: downscaled, like the shape given is
    if made is not None and shorter is not None:
        made = (*downscaled_size(made[0], made[1], shorter), *made[2:])
        if made != src.shape and (len(made) not in (2, 3) or made[2:] > (4,)):  # every item would fail
            raise ConvertError(
                f"{src.description} holds arrays of shape {src.shape}: downscale resizes images [H, W] or "
                "[H, W, C] with C 1 to 4 (L, LA, RGB, RGBA)"
            )
    if fixed is not None and src.kind == "array" and made is not None and fixed != made:
        what = f"{made} once downscaled" if made != src.shape else f"{made}"
        raise ConvertError(f"{src.description} holds images of shape {what}, not {fixed}: leave out the shape")
    store_shape: tuple[int, ...] | None | Literal["auto"]
    if fixed is not None:  # the caller's: images of another shape are bad items
        store_shape = fixed
    elif name == "raw":
        store_shape = made if src.kind == "array" else None  # decoded files vary in shape
    elif shorter is not None:
        store_shape = "auto"
    else:  # the source's fixed shape where the images decode as they did
        store_shape = src.shape if src.shape is not None and mode == src.default_image_mode else "auto"
    store_mode = None if name == "raw" else mode
    plan = Plan(name, resolved, mode, full_check, fixed, shorter)
    return Target(name, resolved, store_mode, src.classes, store_shape, plan)


def checked_shape(shape: Any) -> tuple[int, ...] | None:
    """A conversion's fixed image shape: (H, W) or (H, W, C) of positive sizes, or None (the source's)."""
    if shape is None:
        return None
    try:
        sizes = tuple(operator.index(size) for size in shape)
    except TypeError:
        sizes = ()
    if len(sizes) not in (2, 3) or min(sizes) < 1:
        raise ConvertError(f"shape must be (H, W) or (H, W, C) of positive sizes (--shape HxW or HxWxC), not {shape!r}")
    return sizes


# ---------------------------------------------------------------------- preparing records (in the workers)


@dataclass(frozen=True)
class Plan:
    """What a worker makes of each item: the store's codec, the decode mode, how hard to check a kept file."""

    codec: str
    params: dict[str, Any]
    mode: str | None  # decode to this Pillow mode (None: as stored)
    full_check: bool  # keep: decode every file (else: its header, and decode only files not visibly whole)
    shape: tuple[int, ...] | None = None  # every decoded image must be of this shape (else: the store checks)
    downscale: int | None = None  # the shorter side of larger images made this (codecs.downscale), else as is


class Prepared(NamedTuple):
    record: bytes | np.ndarray | PreparedRecord | None  # None: a bad item; PreparedRecord: checked by the store
    read: int  # bytes read from the source
    error: str | None


def prepare_batch(kind: ItemKind, inputs: Sequence[Any], plan: Plan) -> list[Prepared]:
    """Each item made into the record the store takes (bytes for an encoded store, an array for a raw one)."""
    codec = get_codec(plan.codec, **plan.params)
    return [_prepare(kind, item, plan, codec) for item in inputs]


def _prepare(kind: ItemKind, item: Any, plan: Plan, codec: Any) -> Prepared:
    read = 0
    try:
        if kind == "array":
            array = np.asarray(item)
            read = array.nbytes
            if plan.downscale is not None:
                array = downscale_array(array, plan.downscale)
            return Prepared(array if plan.codec == "raw" else codec.encode(array), read, None)
        if kind == "file":
            with open_regular(item) as file:  # a FIFO named like an image would block the conversion forever
                data = file.read()
        else:
            data = bytes(item)
        read = len(data)
        if not data:
            return Prepared(None, 0, "an empty file")
        if plan.codec == "keep":
            # The header is checked by the store (put_encoded_many probes every file): here only
            # what the header cannot tell, that the file is whole (else it is decoded to decide).
            if plan.full_check or not is_whole(data):
                decode(data, mode=plan.mode)
            return Prepared(data, read, None)
        if plan.downscale is not None:
            array = downscale_blob(data, plan.mode, plan.downscale)
        else:
            array = decode(data, mode=plan.mode)
        if plan.shape is not None:
            if array.shape[:2] != plan.shape[:2] or array.size != int(np.prod(plan.shape)):
                return Prepared(None, read, f"it decodes to shape {array.shape}, not the store's {plan.shape}")
            array = array.reshape(plan.shape)  # [H, W, 1] of a grey image as an [H, W] store holds it
        return Prepared(array if plan.codec == "raw" else codec.encode(array), read, None)
    except InvalidImageError as exc:
        return Prepared(None, read, str(exc))
    except OSError as exc:
        return Prepared(None, read, f"cannot read it: {exc.strerror or exc}")


def first_refused(records: Sequence[object]) -> tuple[int | None, str]:
    """The first encoded record whose header the store refuses (``probe``, as ``put_encoded_many``), and why."""
    for k, record in enumerate(records):
        if isinstance(record, bytes):
            try:
                probe(record)
            except InvalidImageError as exc:
                return k, str(exc)
    return None, ""


def record_size(record: bytes | np.ndarray | PreparedRecord) -> int:
    if isinstance(record, PreparedRecord):
        return len(record.blob)
    return record.nbytes if isinstance(record, np.ndarray) else len(record)
