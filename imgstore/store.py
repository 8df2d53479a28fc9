"""One store API over every backend.

:class:`Store` holds everything backends share: argument checking, the manifest and its commit
protocol, index handling, batching, iteration, pickling and reopening after ``fork()``. A backend
subclasses it in one file and implements a few primitives (``_open``, ``_write``, ``_read_into``,
``_close``; optionally faster ``_read_range_into`` and ``_read_one``), then is registered by name in
:mod:`imgstore.registry`.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import operator
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from imgstore.checksums import read_checksums, record_checksums, write_checksums
from imgstore.errors import (
    CorruptStoreError,
    ImgStoreError,
    InvalidImageError,
    InvalidLabelError,
    InvalidOptionError,
    ReadOnlyError,
    StoreBusyError,
    StoreClosedError,
    StoreExistsError,
    StoreFullError,
    StoreIndexError,
    StoreIOError,
    StoreNotFoundError,
)
from imgstore.manifest import Manifest, manifest_path, read_manifest, write_manifest

Mode = Literal["r", "w", "a"]
IndexLike = int | Sequence[int] | np.ndarray | range | slice

WRITER_LOCK_NAME = "writer.lock"
_INT64_MAX = np.iinfo(np.int64).max
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Store(abc.ABC):
    """A store of same-shaped uint8 images, each with an integer label, addressed 0 .. len-1.

    Open one with :func:`imgstore.open_store`. Every returned array is owned, writable and
    C-contiguous. Writes are committed per ``put``/``put_many`` call.
    """

    #: The name the backend is registered under, kept in every store's manifest.
    name: ClassVar[str]
    #: Exceptions of the backend's library that mean its files are damaged (become CorruptStoreError).
    damage_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Creation options the backend accepts, with their defaults; kept in the manifest.
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    #: Named sets of those options whose trade-off a user should see (the benchmarks measure each).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, path: Path, manifest: Manifest, mode: Mode, *, sync: bool) -> None:
        self.path = path
        self.mode: Mode = mode
        self.sync = sync
        self._manifest = manifest
        self._closed = False
        self._pid = os.getpid()
        self._writer_lock: int | None = None  # fd holding the store's writer lock (modes "w", "a")

    # ------------------------------------------------------------------ backend primitives

    @classmethod
    def check_shape(cls, shape: tuple[int, ...]) -> None:
        """Raise :class:`InvalidImageError` if the backend cannot hold images of this shape."""

    @abc.abstractmethod
    def _open(self, create: bool) -> None:
        """Open (``create``: make) the backend's files and keep the handles for later calls."""

    @abc.abstractmethod
    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Write records ``start .. start + len(images) - 1``, durably if ``self.sync``.

        Records at ``start`` and beyond may already exist from a write that crashed before its
        commit: overwrite them. Nothing here is visible until the manifest is committed.
        """

    @abc.abstractmethod
    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """Fill ``images[k], labels[k]`` with record ``indices[k]`` (int64, in range, any order, repeats allowed)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's handles."""

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Fill the arrays with records ``start .. stop - 1``; override where a scan beats a gather."""
        self._read_into(np.arange(start, stop, dtype=np.int64), images, labels)

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        """One record; override where a single lookup beats a one-element gather."""
        images, labels = self._batch(1, None)
        self._read_into(np.array([index], dtype=np.int64), images, labels)
        return images[0], int(labels[0])

    def _refresh(self, old_count: int) -> None:
        """The manifest now commits more records than when the handle last looked: drop stale caches."""

    def _reopen_after_fork(self) -> None:
        """Handles inherited through ``fork()`` are not safe to use: open new ones, never touch the old."""
        self._open(create=False)

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        return self.name

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of one image; None while an empty store has not been given one."""
        return self._manifest.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._manifest.dtype)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._manifest.options)

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self._manifest.count

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self.mode!r}"
        return f"<{type(self).__name__} {str(self.path)!r} n={len(self)} shape={self.shape} {state}>"

    def disk_usage(self) -> int:
        """Bytes the store occupies on disk (allocated blocks, as ``du`` counts them)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total

    # ------------------------------------------------------------------ writing

    def put(self, image: np.ndarray, label: int) -> int:
        """Append one image; returns its index."""
        image = np.asarray(image)
        return self.put_many(image[np.newaxis], [_as_label(label)])[0]

    def put_many(self, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> range:
        """Append images ``[N, *shape]`` with their labels in one all-or-nothing commit; returns their indices."""
        self._check_usable()
        if not self.writable:
            raise ReadOnlyError(f"store {self.path} is open read-only (mode='r')")
        images = self._checked_images(images)
        labels = _checked_labels(labels, len(images))
        start = len(self)
        if len(images) == 0:
            return range(start, start)
        manifest = self._manifest
        if manifest.shape is None:
            manifest = replace(manifest, shape=images.shape[1:])
        try:
            self._write(start, images, labels)
            write_checksums(self.path, start, record_checksums(images, labels), sync=self.sync)
            manifest = manifest.with_count(start + len(images))
            write_manifest(self.path, manifest, sync=self.sync)
        except ImgStoreError:
            raise
        except OSError as exc:
            if exc.errno in _DISK_FULL_ERRNOS:
                raise StoreFullError(f"no space left for {len(images)} images in {self.path}: {exc}") from exc
            raise StoreIOError(f"writing {len(images)} images to {self.path} failed: {exc}") from exc
        self._manifest = manifest
        return range(start, start + len(images))

    def _checked_images(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise InvalidImageError(
                f"images must be uint8 arrays, got dtype {array.dtype}; convert explicitly "
                "(e.g. (x * 255).round().astype(np.uint8)) so no value is silently wrapped or clipped"
            )
        shape = self.shape
        if shape is None:
            if array.ndim < 3:
                raise InvalidImageError(
                    f"put_many takes a batch [N, H, W] or [N, H, W, C]; got an array of shape {array.shape}"
                )
            self.check_shape(tuple(array.shape[1:]))
        elif array.shape[1:] != shape or array.ndim != len(shape) + 1:
            raise InvalidImageError(
                f"this store holds images of shape {shape}; got a batch of shape {array.shape} "
                f"(expected [N, {', '.join(map(str, shape))}])"
            )
        # Fortran-ordered or strided input is fine; backends get one C-contiguous block.
        return np.ascontiguousarray(array)

    # ------------------------------------------------------------------ reading

    def get(self, index: int) -> tuple[np.ndarray, int]:
        """The image and label at ``index`` (negative counts from the end)."""
        self._check_usable()
        index = self._checked_index(index)
        try:
            return self._read_one(index)
        except self.damage_errors as exc:
            raise self._damaged(exc) from exc

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.get(index)

    def get_many(
        self, indices: IndexLike, *, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images ``[N, *shape]`` and labels ``[N]`` (int64) for any indices, in the order given.

        ``out=(images, labels)`` fills arrays the caller reuses (e.g. one pair per training step)
        instead of allocating new ones; they are returned.
        """
        self._check_usable()
        count = len(self)
        contiguous = _as_contiguous_range(indices, count)
        if contiguous is not None:
            start, stop = contiguous
            images, labels = self._batch(stop - start, out)
            try:
                if stop > start:
                    self._read_range_into(start, stop, images, labels)
            except self.damage_errors as exc:
                raise self._damaged(exc) from exc
            return images, labels
        idx = _checked_indices(indices, count)
        images, labels = self._batch(len(idx), out)
        try:
            if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
                self._read_range_into(int(idx[0]), int(idx[-1]) + 1, images, labels)
            elif len(idx):
                self._read_into(idx, images, labels)
        except self.damage_errors as exc:
            raise self._damaged(exc) from exc
        return images, labels

    def _damaged(self, exc: BaseException) -> ImgStoreError:
        if isinstance(exc, PermissionError):  # not damage: keep the built-in's meaning
            return StoreIOError(f"{self.path}: {exc}")
        return CorruptStoreError(f"{self.path} is damaged: {type(exc).__name__}: {exc}")

    def refresh(self) -> int:
        """See what writers committed since this handle opened (or last refreshed); returns the new length.

        A handle otherwise keeps the length it opened with: reads are always of a consistent prefix.
        """
        self._check_usable()
        manifest = read_manifest(self.path)
        if manifest.count < len(self) or manifest.backend != self.name:
            raise CorruptStoreError(f"{self.path} was replaced or shrank under this handle; open it again")
        if manifest.count != len(self) or manifest.shape != self.shape:
            old = len(self)
            self._manifest = replace(manifest, options=self._manifest.options)
            try:
                self._refresh(old)
            except self.damage_errors as exc:
                raise self._damaged(exc) from exc
        return len(self)

    def verify(self, batch_size: int = 4096) -> None:
        """Read every committed record and check it against its checksum; raise :class:`CorruptStoreError` on damage."""
        self._check_usable()
        count = len(self)
        expected = read_checksums(self.path, count)
        if len(expected) < count:
            raise CorruptStoreError(f"{self.path}: {count} images are committed but only {len(expected)} checksums")
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            try:
                images, labels = self.get_many(range(start, stop))
            except CorruptStoreError:
                for index in range(start, stop):  # find which one, for the message
                    try:
                        self.get(index)
                    except CorruptStoreError as exc:
                        raise CorruptStoreError(f"{self.path}: damaged image at index {index}: {exc}") from exc
                raise
            bad = np.flatnonzero(record_checksums(images, labels) != expected[start : start + len(images)])
            if len(bad):
                raise CorruptStoreError(
                    f"{self.path}: {len(bad)} damaged image(s) from index {start + int(bad[0])} "
                    "(pixels or label differ from what was written)"
                )

    def iter_batches(self, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every record in order, as ``(images, labels)`` batches of ``batch_size`` (the last may be shorter)."""
        if operator.index(batch_size) < 1:
            raise InvalidOptionError(f"batch_size must be >= 1, got {batch_size}")
        count = len(self)  # a snapshot: appends during iteration are not read
        # Read whole spans of batches when the backend is faster per image on bigger reads (PNG
        # decodes big reads on every core); each batch is then a copy, so it stays the caller's own.
        span = batch_size * -(-max(self._read_ahead(), batch_size) // batch_size)
        for low in range(0, count, span):
            images, labels = self.get_many(range(low, min(low + span, count)))
            if span == batch_size:
                yield images, labels
                continue
            for start in range(0, len(images), batch_size):
                yield images[start : start + batch_size].copy(), labels[start : start + batch_size].copy()

    def _read_ahead(self) -> int:
        """Images per backend read worth batching up in iter_batches (0: just the batch)."""
        return 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for images, labels in self.iter_batches():
            for image, label in zip(images, labels.tolist(), strict=False):
                yield image.copy(), label

    def _batch(self, n: int, out: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        shape = (n, *(self.shape or ()))
        if out is None:
            return np.empty(shape, dtype=np.uint8), np.empty(n, dtype=np.int64)
        images, labels = out
        for array, want, dtype in ((images, shape, np.uint8), (labels, (n,), np.int64)):
            if (
                not isinstance(array, np.ndarray)
                or array.shape != want
                or array.dtype != dtype
                or not array.flags.c_contiguous
                or not array.flags.writeable
            ):
                raise InvalidOptionError(
                    f"out must be writable C-contiguous arrays of shapes {shape} uint8 and ({n},) int64"
                )
        return images, labels

    def _checked_index(self, index: int) -> int:
        if isinstance(index, (bool, np.bool_)):
            raise InvalidOptionError("an index must be an integer, not a bool")
        i = operator.index(index)
        count = len(self)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise StoreIndexError(f"index {index} is out of range for a store of {count} images")
        return i

    # ------------------------------------------------------------------ lifecycle

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._reopen_after_fork()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if os.getpid() == self._pid:
                try:
                    self._close()
                finally:
                    if self._writer_lock is not None:
                        os.close(self._writer_lock)
                        self._writer_lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A store pickles as "how to reopen it" (e.g. for spawn-started DataLoader workers);
        # a "w" handle reopens as "a" so unpickling never erases the store.
        mode = "r" if self.mode == "r" else "a"
        return (_reopen, (str(self.path), self.name, mode, self.sync, self._runtime_options()))

    def _runtime_options(self) -> dict[str, Any]:
        return dict(self._manifest.options)


def _reopen(path: str, backend: str, mode: Mode, sync: bool, options: dict[str, Any]) -> Store:
    return open_store(path, backend, mode, sync=sync, **options)


# ---------------------------------------------------------------------- argument checks


def _as_label(label: Any) -> int:
    if isinstance(label, (bool, np.bool_)):
        raise InvalidLabelError("a label must be an integer, not a bool")
    try:
        return operator.index(label)
    except TypeError:
        raise InvalidLabelError(f"a label must be an integer, got {type(label).__name__} {label!r}") from None


def _checked_labels(labels: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    try:
        array = np.asarray(labels)
    except (ValueError, OverflowError) as exc:
        raise InvalidLabelError(f"labels must be a 1-D sequence of integers: {exc}") from None
    if array.dtype == object:  # e.g. Python ints beyond int64 or mixed types
        array = np.asarray([_as_label(x) for x in array.ravel()], dtype=object)
        if any(not 0 <= x <= _INT64_MAX for x in array):
            raise InvalidLabelError("labels must be integers in 0 .. 2**63 - 1")
        array = array.astype(np.int64)
    if array.ndim != 1:
        raise InvalidLabelError(f"labels must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise InvalidLabelError(f"labels must be integers, got dtype {array.dtype}")
    if len(array) != count:
        raise InvalidLabelError(f"got {count} images but {len(array)} labels")
    if array.size and (array.min() < 0 or (array.dtype == np.uint64 and array.max() > _INT64_MAX)):
        raise InvalidLabelError("labels must be integers in 0 .. 2**63 - 1 (negative labels are not stored)")
    return np.ascontiguousarray(array, dtype=np.int64)


def _as_contiguous_range(indices: IndexLike, count: int) -> tuple[int, int] | None:
    """``(start, stop)`` when ``indices`` is a step-1 range or slice (the cheap path for scans)."""
    if isinstance(indices, slice):
        indices = range(*indices.indices(count))
    if not isinstance(indices, range) or (indices.step != 1 and len(indices) > 1):
        return None
    if len(indices) == 0:
        return (0, 0)
    start, stop = indices[0], indices[-1] + 1
    if start < 0 or stop > count:
        raise StoreIndexError(f"indices {indices} are out of range for a store of {count} images")
    return start, stop


def _checked_indices(indices: IndexLike, count: int) -> np.ndarray:
    array = np.asarray(indices)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise InvalidOptionError(f"indices must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InvalidOptionError(f"indices must be 1-D, got shape {array.shape}")
    array = array.astype(np.int64)
    if array.min() < -count or array.max() >= count:
        bad = array[(array < -count) | (array >= count)][0]
        raise StoreIndexError(f"index {bad} is out of range for a store of {count} images")
    return np.where(array < 0, array + count, array)


# ---------------------------------------------------------------------- opening


def open_store(
    path: str | os.PathLike[str],
    backend: str | None = None,
    mode: Mode = "r",
    *,
    shape: Sequence[int] | None = None,
    sync: bool = True,
    **options: Any,
) -> Store:
    """Open the store at ``path`` (a directory).

    ``mode``: ``"r"`` read only (writes raise :class:`ReadOnlyError`); ``"a"`` append, creating the
    store if there is none; ``"w"`` create, replacing an existing store (never a directory that is
    not a store). ``backend`` is needed to create; on opening it is read from the manifest (giving a
    different one raises). ``shape`` fixes the image shape up front (else the first write does).
    ``sync=False`` skips fsync: faster writes, but the last commits may be lost on power failure.
    ``options`` are the backend's own (see its ``option_defaults``).
    """
    from imgstore.registry import get_backend

    if mode not in ("r", "w", "a"):
        raise InvalidOptionError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    store_path = Path(path)
    if mode == "r":
        manifest = read_manifest(store_path)
        return _open_existing(store_path, manifest, backend, mode, sync, options)

    creating = mode == "w" or not manifest_path(store_path).exists()
    if creating:
        if backend is None:
            raise (InvalidOptionError if mode == "w" else StoreNotFoundError)(
                f"no store at {store_path}; pass backend=... to create one"
            )
        cls = get_backend(backend)
        image_shape = tuple(operator.index(s) for s in shape) if shape is not None else None
        if image_shape is not None:
            if not image_shape or min(image_shape) < 1:
                raise InvalidImageError(f"shape must be positive dimensions, got {shape}")
            cls.check_shape(image_shape)
        new_manifest = Manifest(backend=cls.name, shape=image_shape, options=_checked_options(cls, options))
        _check_replaceable(store_path)
        store_path.mkdir(parents=True, exist_ok=True)
    lock = _lock_for_writing(store_path)
    try:
        if creating and (mode == "w" or not manifest_path(store_path).exists()):  # re-checked under the lock
            _empty_except_lock(store_path)
            store = cls(store_path, new_manifest, mode, sync=sync)
            store._open(create=True)
            write_manifest(store_path, new_manifest, sync=sync)
        else:
            store = _open_existing(store_path, read_manifest(store_path), backend, mode, sync, options)
    except BaseException:
        os.close(lock)
        raise
    store._writer_lock = lock
    return store


def _open_existing(
    path: Path, manifest: Manifest, backend: str | None, mode: Mode, sync: bool, options: Mapping[str, Any]
) -> Store:
    from imgstore.registry import get_backend

    if backend is not None and backend != manifest.backend:
        raise InvalidOptionError(f"{path} is a {manifest.backend!r} store, not {backend!r}")
    cls = get_backend(manifest.backend)
    merged = {**manifest.options, **_checked_options(cls, options, defaults=False)}
    store = cls(path, replace(manifest, options=merged), mode, sync=sync)
    try:
        store._open(create=False)
    except cls.damage_errors as exc:
        raise store._damaged(exc) from exc
    return store


def _lock_for_writing(path: Path) -> int:
    """One writer per store: the commit protocol appends at the count the writer read when it opened."""
    fd = os.open(path / WRITER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusyError(f"{path} is open for writing by another handle or process") from None
    return fd


def _checked_options(cls: type[Store], options: Mapping[str, Any], *, defaults: bool = True) -> dict[str, Any]:
    unknown = set(options) - set(cls.option_defaults)
    if unknown:
        valid = ", ".join(sorted(cls.option_defaults)) or "none"
        raise InvalidOptionError(f"backend {cls.name!r} has no option {', '.join(sorted(unknown))} (options: {valid})")
    return {**cls.option_defaults, **options} if defaults else dict(options)


def _check_replaceable(path: Path) -> None:
    """Refuse to create a store over a file or over a directory that is not a store."""
    if path.exists() and not path.is_dir():
        raise StoreExistsError(f"{path} is a file; a store is a directory")
    if path.is_dir() and not manifest_path(path).exists():
        if any(p.name != WRITER_LOCK_NAME for p in path.iterdir()):
            raise StoreExistsError(f"{path} is a non-empty directory that is not an imgstore store; not overwriting it")


def _empty_except_lock(path: Path) -> None:
    # The manifest goes first: a crash part-way leaves a directory that is not a store, not a broken one.
    manifest_path(path).unlink(missing_ok=True)
    for entry in path.iterdir():
        if entry.name == WRITER_LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
