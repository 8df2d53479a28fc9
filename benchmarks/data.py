"""The suite's dataset axis: which datasets a run measures, at which sizes, and their data (loaded once a session).

A run measures at most one *fixed-shape* dataset (CIFAR-like arrays: ``synthetic``, ``cifar10``,
``fashion-mnist``) at ``--cutoffs``, and the *encoded* one, ``imagenet-like`` (a list of JPEG
files of varied sizes), at ``--imagenet-cutoffs``: its rows are the imgstore stores holding those
files, the ImageFolder status quo and the in-memory decoding LIMIT (``benchmarks/encoded.py``,
``benchmarks/folder.py``). Both are in the default ``--dataset``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from benchmarks.options import ALL_CUTOFFS, DEFAULT_CUTOFFS, DEFAULT_DATASETS, DEFAULT_IMAGENET_CUTOFF

# Datasets whose loader returns encoded files (a list of bytes) rather than one array of pixels.
ENCODED_DATASETS = ("imagenet-like",)
SEED = 0


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _counts(option: str, value: str) -> list[int]:
    try:
        counts = [int(item) for item in comma_list(value)]
    except ValueError:
        raise pytest.UsageError(f"{option} takes a comma list of integers, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise pytest.UsageError(f"{option} must be positive image counts, got {value!r}")
    return counts


def selected_cutoffs(config: pytest.Config) -> list[int]:
    """The fixed-shape dataset's image counts (``--cutoffs``)."""
    value = config.getoption("cutoffs") or DEFAULT_CUTOFFS
    if value == "all":
        return list(ALL_CUTOFFS)
    try:
        return _counts("--cutoffs", value)
    except pytest.UsageError:
        raise pytest.UsageError(f"--cutoffs takes 'all' or a comma list of integers, got {value!r}") from None


def imagenet_cutoffs(config: pytest.Config) -> list[int]:
    """The encoded dataset's image counts (``--imagenet-cutoffs``; see its help for 'auto')."""
    value = config.getoption("imagenet_cutoffs")
    if value == "none":
        return []
    if value != "auto":
        return _counts("--imagenet-cutoffs", value)
    cutoffs = config.getoption("cutoffs")
    if cutoffs in (None, "all"):
        return [DEFAULT_IMAGENET_CUTOFF]
    if config.getoption("dataset") != DEFAULT_DATASETS:  # --dataset names it: the sizes named are for it
        return selected_cutoffs(config)
    # Named sizes below 1 000 are cheap (a smoke run checks these rows too); from 1 000 up a round
    # decodes ~0.5 GB, and a run that names its sizes (the gate: --cutoffs=1000) keeps its matrix.
    return [n for n in selected_cutoffs(config) if n < DEFAULT_IMAGENET_CUTOFF]


@functools.cache  # asked at collection and by the session's fixtures: find the photos (and warn) once
def _imagenet_like_missing() -> str | None:
    """Why imagenet-like cannot be made here (a photo package is missing), or None."""
    from imgstore.datasets import load_dataset
    from imgstore.errors import DatasetNotFoundError

    try:
        load_dataset("imagenet-like", 0)  # finds the photos, makes nothing
    except DatasetNotFoundError as exc:
        return str(exc)
    return None


def selected_datasets(config: pytest.Config) -> list[str]:
    """The datasets of this run, the fixed-shape one first; each with at least one cutoff."""
    from imgstore.datasets import available_datasets, get_dataset

    value = config.getoption("dataset")
    names = comma_list(value)
    unknown = [name for name in names if name not in available_datasets()]
    if unknown or not names:
        raise pytest.UsageError(
            f"--dataset: unknown dataset(s) {', '.join(unknown) or repr(value)}; "
            f"known: {', '.join(available_datasets())}"
        )
    fixed = [name for name in names if name not in ENCODED_DATASETS]
    if len(fixed) > 1:
        raise pytest.UsageError(f"--dataset: one fixed-shape dataset a run (their groups share names), got {fixed}")
    for name in fixed:
        spec = get_dataset(name)
        if spec.needs_root and dataset_root(config) is None:
            raise pytest.UsageError(f"--dataset {name} needs --dataset-root: {spec.install_hint}")
    encoded = [name for name in names if name in ENCODED_DATASETS and imagenet_cutoffs(config)]
    if encoded:
        missing = _imagenet_like_missing()
        if missing and value != DEFAULT_DATASETS:
            raise pytest.UsageError(f"--dataset imagenet-like: {missing}")
        if missing:  # the default run still measures the fixed-shape dataset
            warnings.warn(f"imagenet-like rows skipped: {missing}", stacklevel=1)
            encoded = []
    return fixed + encoded


def dataset_root(config: pytest.Config) -> str | None:
    """--dataset-root (or its deprecated alias --cifar10-dir)."""
    root = config.getoption("dataset_root")
    alias = config.getoption("cifar10_dir")
    if alias is not None:
        if root is not None and root != alias:
            raise pytest.UsageError("--cifar10-dir is an alias of --dataset-root: give one of them")
        root = alias
    return root  # type: ignore[no-any-return]


def parse_op_cutoffs(values: list[str] | None, known: tuple[str, ...]) -> dict[str, list[int]]:
    """``["store_single=100,1000", ...]`` (``--op-cutoffs``, repeatable) -> operation -> its image counts."""
    counts: dict[str, list[int]] = {}
    for value in values or ():
        op, sep, sizes = value.partition("=")
        op = op.strip()
        if not sep or op not in known:
            raise pytest.UsageError(
                f"--op-cutoffs takes OPERATION=N[,N...] with one of {', '.join(known)}, got {value!r}"
            )
        if op in counts:
            raise pytest.UsageError(f"--op-cutoffs: {op} given twice")
        counts[op] = _counts("--op-cutoffs", sizes)
    return counts


def op_cutoffs(config: pytest.Config) -> dict[str, list[int]]:
    """--op-cutoffs: the operations measured at their own sizes instead of --cutoffs (fixed-shape dataset)."""
    from benchmarks.operations import NAMES

    return parse_op_cutoffs(config.getoption("op_cutoffs"), NAMES)


def cutoffs_for(config: pytest.Config, name: str, operation: str | None = None) -> list[int]:
    """``name``'s image counts: of ``operation`` (its --op-cutoffs, else --cutoffs), or of any operation (None)."""
    if name in ENCODED_DATASETS:
        return imagenet_cutoffs(config)
    own = op_cutoffs(config)
    if operation is not None:
        return own.get(operation, selected_cutoffs(config))
    return sorted(set(selected_cutoffs(config)).union(*own.values()))


@dataclass
class BenchData:
    """One dataset of the run, as many images as its biggest cutoff; each benchmark takes the first N."""

    name: str
    images: np.ndarray | list[bytes]  # pixels [N, ...], or encoded files
    labels: np.ndarray
    # Encoded data: each file's decode as torchvision's loader gives it, kept as (shape, XXH3) so
    # that checking a read of 1 000 images costs a hash of each, not a Pillow decode of each.
    _expected: dict[int, tuple[tuple[int, ...], int]] = field(default_factory=dict, repr=False)

    @property
    def encoded(self) -> bool:
        return isinstance(self.images, list)

    @property
    def shape(self) -> tuple[int, ...]:
        """The image shape the subjects' open_writer/open_reader take; () for files of varied sizes."""
        return () if isinstance(self.images, list) else tuple(self.images.shape[1:])

    def group(self, operation: str, n: int) -> str:
        # The fixed-shape groups keep their names (saved runs and plots know them); encoded rows get their own.
        return f"{operation} n={n}" + (f" {self.name}" if self.encoded else "")

    def expected(self, indices: list[int]) -> list[tuple[tuple[int, ...], int]]:
        """(shape, XXH3 of the pixels) of ``PIL.Image.open(file).convert("RGB")`` for each index."""
        from benchmarks.encoded import decoded_rgb, digest

        missing = [i for i in dict.fromkeys(indices) if i not in self._expected]
        if missing:
            from concurrent.futures import ThreadPoolExecutor

            files = self.images
            assert isinstance(files, list)
            with ThreadPoolExecutor(2) as pool:  # Pillow decodes without the GIL
                for i, array in zip(missing, pool.map(lambda k: decoded_rgb(files[k]), missing), strict=True):
                    self._expected[i] = (array.shape, digest(array))
        return [self._expected[i] for i in indices]


def load(config: pytest.Config, name: str) -> BenchData:
    """``name``'s data for this run: its biggest cutoff's worth, from a cache folder when it has one."""
    from imgstore.datasets import load_dataset

    n = max(cutoffs_for(config, name))
    root: str | Path | None = dataset_root(config)
    if name in ENCODED_DATASETS:
        # Making an imagenet-like image costs ~5 ms: keep them across runs in pytest's cache folder
        # (or --dataset-root), named by everything the bytes depend on. -p no:cacheprovider: none.
        cache = getattr(config, "cache", None)
        if root is None and cache is not None:
            root = cache.mkdir("imgstore-imagenet-like")
        files, labels = load_dataset(name, n, root=root, seed=SEED)
        return BenchData(name, list(files), np.asarray(labels, dtype=np.int64))
    images, labels = load_dataset(name, n, root=root, seed=SEED)
    return BenchData(name, np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels))
