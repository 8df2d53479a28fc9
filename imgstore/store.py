"""One store API over every backend.

:class:`Store` holds everything backends share: argument checking, the manifest and its commit
protocol, record checksums (checked on every read), index handling, batching, iteration, pickling
and reopening after ``fork()``. A backend subclasses it in one file and implements a few primitives
(``_open``, ``_write``, ``_read_into``, ``_close``; optionally faster ``_read_range_into``,
``_read_new`` and ``_read_one``; ``_write_blobs`` and ``_read_blobs`` for encoded stores, see :mod:`imgstore.encoded`),
declared with the backend's class attributes in :mod:`imgstore.primitives`, then is registered by
name in :mod:`imgstore.registry`. Opening, creating and replacing stores is :mod:`imgstore.opening`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imgstore import fixed
from imgstore.arguments import (
    IndexLike,
    as_contiguous_range,
    as_image_array,
    as_label,
    batch_arrays,
    checked_batch_size,
    checked_index,
    checked_indices,
    checked_labels,
    checked_size,
)
from imgstore.checksums import Checksums
from imgstore.errors import (
    CorruptStoreError,
    InvalidImageError,
    InvalidLabelError,
    InvalidOptionError,
    ReadOnlyError,
    StoreBusyError,
    StoreClosedError,
    StoreIndexError,
)
from imgstore.fileio import disk_usage
from imgstore.locking import WriterLock
from imgstore.manifest import Manifest, generation_name, read_manifest
from imgstore.primitives import BackendPrimitives
from imgstore.refreshing import RefreshGuard

if TYPE_CHECKING:
    from imgstore.encoded import EncodedRecords, PreparedRecord

Mode = Literal["r", "w", "a"]

# Forks this process has been through (as a child): a handle that saw fewer was made in a parent.
# get's hot path compares this instead of calling os.getpid() (a system call, ~0.2-0.5 us a get).
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_count_fork)


class Store(BackendPrimitives):
    """A store of same-shaped uint8 images, each with an integer label, addressed 0 .. len-1.

    Open one with :func:`imgstore.open_store`. Every returned array is owned, writable and
    C-contiguous. Writes are committed per ``put``/``put_many`` call. Every read checks what it
    returns against the record's checksum unless the store was opened with ``verify_reads=False``.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        mode: Mode,
        *,
        sync: bool,
        verify_reads: bool = True,
        overrides: Mapping[str, Any] | None = None,
        decoder: str = "auto",
    ) -> None:
        self.path = path
        self.mode: Mode = mode
        self.sync = sync
        self.verify_reads = verify_reads
        self._manifest = manifest
        self._overrides = dict(overrides or {})
        self._closed = False
        self._pid = os.getpid()
        self._forks = _forks[0]
        self._lock: WriterLock | None = None  # modes "w" and "a"
        self._checksums = self._make_checksums(manifest)
        self._refreshes = RefreshGuard()  # reads in other threads during refresh(): imgstore.refreshing
        self._encoded: EncodedRecords | None = None
        if manifest.encoded:
            from imgstore.encoded import EncodedRecords

            self._encoded = EncodedRecords(self, decoder)

    # ------------------------------------------------------------------ backend primitives
    # (the others, and the backend's class attributes: imgstore.primitives)

    def _read_new(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records ``indices`` (not a range) into new arrays; override where a gather that makes its
        own array beats one into a given array (a shuffled batch of a training loader, no ``out``)."""
        images, labels = self._batch(len(indices), None)
        self._read_into(indices, images, labels)
        return images, labels

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        """One record; override where a single lookup beats a one-element gather."""
        images, labels = self._batch(1, None)
        self._read_into(np.array([index], dtype=np.int64), images, labels)
        return images[0], int(labels[0])

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        return self.name

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of one image; None while an empty store has not been given one."""
        return self._manifest.shape

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, for backends reading records (which exist only once the shape is known)."""
        shape = self._manifest.shape
        if shape is None:
            raise StoreIndexError(f"{self.path} holds no image yet")
        return shape

    @property
    def codec(self) -> str:
        """How records are stored: ``raw`` pixels; ``png``, ``jpeg``, ``webp`` bytes; ``keep``: files as given."""
        return self._manifest.codec

    @property
    def codec_params(self) -> dict[str, Any]:
        return dict(self._manifest.codec_params)

    @property
    def varied(self) -> bool:
        """Whether images may differ in shape (then ``get_many`` gives a list, or a batch with ``size=``)."""
        return self._manifest.shape is None and self._manifest.encoded

    @property
    def image_mode(self) -> str | None:
        """What encoded images decode to: ``"RGB"``, ``"L"`` (PIL's ``convert``), or None: as stored."""
        return self._manifest.image_mode

    @property
    def downscale(self) -> int | None:
        """N when ``imgstore convert --downscale N`` made the images (shorter side at most N), else None."""
        return self._manifest.downscale

    @property
    def decoder(self) -> str | None:
        """The decoder this handle uses for encoded images (None for raw stores)."""
        return self._encoded.decoder if self._encoded is not None else None

    @property
    def classes(self) -> list[str] | None:
        """Class names: label ``i`` is ``classes[i]``; None when the store was given none."""
        return list(self._manifest.classes) if self._manifest.classes is not None else None

    def image_shapes(self) -> np.ndarray:
        """``[N, 3]`` uint32: each image's height, width and channels (1 for a 2-D image)."""
        self._check_usable()
        if self._encoded is not None:
            return self._encoded.shapes()
        shape = self.shape or (0, 0)
        hwc = (*shape[:2], shape[2] if len(shape) > 2 else 1) if len(shape) >= 2 else (shape[0], 1, 1)
        return np.tile(np.array(hwc, dtype=np.uint32), (len(self), 1))

    def source_path(self, index: int) -> str | None:
        """The path of the file record ``index`` came from (``put_encoded_many(..., paths=)``), or None."""
        self._check_usable()
        index = self._checked_index(index)
        return self._encoded.source_path(index) if self._encoded is not None else None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._manifest.dtype)

    @property
    def options(self) -> dict[str, Any]:
        """The store's options (from its manifest), with this handle's own settings over them."""
        return {**self._manifest.options, **self._overrides}

    @property
    def writable(self) -> bool:
        """Whether this handle may write: opened for writing, in the process that holds the writer lock."""
        return self.mode != "r" and self._lock is not None and self._lock.owned

    @property
    def closed(self) -> bool:
        return self._closed

    def file(self, name: str) -> Path:
        """Where the backend's entry ``name`` (one of its ``files``) of this store lives."""
        return self.path / generation_name(name, self._manifest.generation)

    def __len__(self) -> int:
        return self._manifest.count

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self.mode!r}"
        return f"<{type(self).__name__} {str(self.path)!r} n={len(self)} shape={self.shape} {state}>"

    def disk_usage(self) -> int:
        """Bytes the store occupies on disk (allocated blocks, as ``du`` counts them)."""
        return disk_usage(self.path)

    # ------------------------------------------------------------------ checksums

    def _make_checksums(self, manifest: Manifest) -> Checksums:
        if manifest.checksum == "crc32":
            return Checksums(self.path / generation_name("checksums.crc32", manifest.generation), None, "crc32", 1)
        groups = self.path / generation_name("groups.xxh3", manifest.generation)
        decoding = json.dumps(
            [manifest.codec, manifest.codec_params, manifest.image_mode, manifest.shape], sort_keys=True
        )
        return Checksums(
            self.file("checksums.xxh3"), groups, manifest.checksum, manifest.group, manifest.shape, decoding
        )

    def _load_checksums(self) -> None:
        self._checksums.load(len(self))

    # ------------------------------------------------------------------ writing

    def put(self, image: np.ndarray, label: int) -> int:
        """Append one image; returns its index."""
        image = as_image_array(image)
        return self.put_many(image[np.newaxis], [as_label(label)])[0]

    def put_many(self, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> range:
        """Append images ``[N, *shape]`` with their labels in one all-or-nothing commit; returns their indices."""
        self._check_writable()
        if self._encoded is not None:
            if isinstance(images, np.ndarray) and images.ndim < 3:
                raise InvalidImageError(f"put_many takes a batch of images; got an array of shape {images.shape}")
            labels = self._checked_labels(labels, len(images))
            return self._encoded.put_arrays(images, labels)
        images = fixed.checked_images(self, images)
        return fixed.put(self, images, self._checked_labels(labels, len(images)))

    def put_encoded_many(
        self,
        blobs: Sequence[bytes],
        labels: Sequence[int] | np.ndarray,
        *,
        paths: Sequence[str | os.PathLike[str]] | None = None,
    ) -> range:
        """Append encoded image files' bytes as given (after checking each header decodes to a sane size).

        ``paths``, optional, are kept as each record's source (:meth:`source_path`). One commit.
        """
        self._check_writable()
        if self._encoded is None:
            raise InvalidOptionError(
                f"{self.path} holds raw pixels of one shape: create it with codec='keep' (or 'jpeg', 'png', 'webp') "
                "to store encoded files"
            )
        try:
            count = len(blobs)
        except TypeError:
            raise InvalidImageError("put_encoded_many takes a sequence of encoded images (bytes)") from None
        return self._encoded.put_encoded(blobs, self._checked_labels(labels, count), paths)

    def prepare_encoded(self, blob: bytes, label: int, *, path: str | os.PathLike[str] | None = None) -> PreparedRecord:
        """Check and hash one file as :meth:`put_encoded_many` would, without writing: thread-safe, so a
        pool of readers can prepare files while one thread commits them with :meth:`put_prepared`."""
        self._check_usable()
        encoded = self._encoded_records("prepare_encoded")
        return encoded.prepare(blob, int(self._checked_labels([label], 1)[0]), path)

    def put_prepared(self, records: Sequence[PreparedRecord]) -> range:
        """Append records made by :meth:`prepare_encoded`, in their order, in one commit."""
        self._check_writable()
        return self._encoded_records("put_prepared").put_prepared(records)

    def _encoded_records(self, method: str) -> EncodedRecords:
        if self._encoded is None:
            raise InvalidOptionError(f"{self.path} holds raw pixels of one shape: {method} is for encoded stores")
        return self._encoded

    def _checked_labels(self, labels: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
        checked = checked_labels(labels, count)
        classes = self._manifest.classes
        if classes is not None and checked.size and int(checked.max()) >= len(classes):
            raise InvalidLabelError(f"label {int(checked.max())} has no class: this store has {len(classes)} classes")
        return checked

    def _check_writable(self) -> None:
        self._check_usable()
        if self.mode == "r":
            raise ReadOnlyError(f"store {self.path} is open read-only (mode='r')")
        if not self.writable:
            owner = self._lock.pid if self._lock else "another process"
            raise StoreBusyError(
                f"this handle on {self.path} was opened for writing by process {owner}; only that process "
                "may write (open the store in this process, after the other closes it)"
            )

    # ------------------------------------------------------------------ reading

    def get(self, index: int) -> tuple[np.ndarray, int]:
        """The image and label at ``index`` (negative counts from the end)."""
        active = self._refreshes.active  # counted before the closed check: close() waits for this read
        active.append(None)
        try:
            refreshes = self._refreshes.count
            try:
                if (  # the hot path of a shuffled epoch: an int in range on an open raw handle of this process
                    type(index) is int
                    and 0 <= index < self._manifest.count
                    and self._forks == _forks[0]
                    and not self._closed
                    and self._encoded is None
                ):
                    return fixed.get(self, index)
                self._check_usable()
                index = self._checked_index(index)
                if self._encoded is not None:
                    return self._encoded.get(index)
                return fixed.get(self, index)
            except Exception:
                if self._refreshes.raced(refreshes):
                    return self.get(index)
                raise
        finally:
            active.pop()

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.get(index)

    def get_many(
        self,
        indices: IndexLike,
        *,
        out: tuple[np.ndarray, np.ndarray] | None = None,
        size: tuple[int, int] | None = None,
    ) -> tuple[Any, np.ndarray]:
        """Images ``[N, *shape]`` and labels ``[N]`` (int64) for any indices, in the order given.

        ``out=(images, labels)`` fills arrays the caller reuses (e.g. one pair per training step)
        instead of allocating new ones; they are returned. In a store of varied shapes the images
        are a list of arrays; with ``size=(h, w)`` an encoded store decodes each image straight to
        that size (JPEG: a reduced-size decode, then a bilinear resize) into one batch array.
        """
        return self._refreshes.retrying(self._get_many, indices, out, size)

    def _get_many(
        self, indices: IndexLike, out: tuple[np.ndarray, np.ndarray] | None, size: tuple[int, int] | None
    ) -> tuple[Any, np.ndarray]:
        self._check_usable()
        count = len(self)
        contiguous = as_contiguous_range(indices, count)
        if self._encoded is not None:
            size = checked_size(size)
            where = contiguous if contiguous is not None else checked_indices(indices, count)
            return self._encoded.get_many(where, out, size)
        if size is not None:
            raise InvalidOptionError("size= resizes encoded images; this store holds raw pixels of one shape")
        return fixed.get_many(self, contiguous if contiguous is not None else checked_indices(indices, count), out)

    def get_encoded(self, index: int) -> tuple[bytes, int]:
        """The stored bytes of image ``index`` (e.g. the source JPEG of a ``keep`` store) and its label."""
        blobs, labels = self.get_encoded_many([index])
        return blobs[0], int(labels[0])

    def get_encoded_many(self, indices: IndexLike) -> tuple[list[bytes], np.ndarray]:
        """The stored bytes of images ``indices`` and their labels, checked, not decoded."""
        return self._refreshes.retrying(self._get_encoded_many, indices)

    def _get_encoded_many(self, indices: IndexLike) -> tuple[list[bytes], np.ndarray]:
        self._check_usable()
        if self._encoded is None:
            raise InvalidOptionError(f"{self.path} holds raw pixels of one shape, not encoded images; use get_many")
        count = len(self)
        contiguous = as_contiguous_range(indices, count)
        return self._encoded.read(contiguous if contiguous is not None else checked_indices(indices, count))

    def refresh(self) -> int:
        """See what writers committed since this handle opened (or last refreshed); returns the new length.

        A handle otherwise keeps the length it opened with: reads are always of a consistent prefix.
        """
        with self._refreshes.refreshing():
            return self._refresh_handle()

    def _refresh_handle(self) -> int:
        self._check_usable()
        manifest = read_manifest(self.path)
        same = manifest.backend == self.name and manifest.generation == self._manifest.generation
        if manifest.count < len(self) or not same or manifest.creating:
            raise CorruptStoreError(f"{self.path} was replaced or shrank under this handle; open it again")
        if manifest.count != len(self) or manifest.shape != self.shape:
            # All or nothing: a refresh that fails leaves the handle as it was.
            old_manifest, old_checksums = self._manifest, self._checksums
            new_manifest = replace(manifest, files=old_manifest.files, options=old_manifest.options)
            checksums = self._make_checksums(new_manifest)
            checksums.load(new_manifest.count)
            self._manifest, self._checksums = new_manifest, checksums
            if self._encoded is not None:
                self._encoded.forget()
            try:
                self._refresh(old_manifest.count)
            except BaseException as exc:
                self._manifest, self._checksums = old_manifest, old_checksums
                if isinstance(exc, self.damage_errors):
                    raise self._damaged(exc) from exc
                raise
        return len(self)

    def verify(self, batch_size: int = 4096) -> None:
        """Read every committed record and check it against its checksum; raise :class:`CorruptStoreError` on damage."""
        with self._refreshes.reading():  # counted before the closed check: close() waits for it
            self._check_usable()
            batch_size, count = checked_batch_size(batch_size), len(self)
            if self._encoded is None:
                return fixed.verify(self, batch_size)
            for start in range(0, count, batch_size):  # each record's bytes against its checksum
                blobs, labels = self._encoded.read((start, min(start + batch_size, count)))
                self._checksums.check_blobs(np.arange(start, start + len(blobs)), blobs, labels, self.path)
            self._encoded.check_side_files()

    def iter_batches(
        self, batch_size: int = 1024, *, size: tuple[int, int] | None = None
    ) -> Iterator[tuple[Any, np.ndarray]]:
        """Every record in order, as ``(images, labels)`` batches of ``batch_size`` (the last may be shorter).

        Images are as :meth:`get_many` gives them (a list in a store of varied shapes, unless ``size``).
        """
        batch_size = checked_batch_size(batch_size)
        if self._encoded is not None:
            self._check_usable()
            return self._encoded.iter_batches(batch_size, checked_size(size))
        if size is not None:
            raise InvalidOptionError("size= resizes encoded images; this store holds raw pixels of one shape")
        return fixed.iter_batches(self, batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for images, labels in self.iter_batches():
            for image, label in zip(images, labels.tolist(), strict=False):
                yield image.copy(), label

    def _batch(
        self, n: int, out: tuple[np.ndarray, np.ndarray] | None, image_shape: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return batch_arrays((n, *(image_shape or self.shape or ())), out)

    def _checked_index(self, index: int) -> int:
        return checked_index(index, len(self))

    # ------------------------------------------------------------------ lifecycle

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")
        if os.getpid() != self._pid:
            self._pid = os.getpid()  # a forked child: new handles, and no writing (the parent holds the lock)
            self._refreshes = RefreshGuard()  # a thread of the parent may have held its lock
            self._reopen_after_fork()
        self._forks = _forks[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if os.getpid() == self._pid:
                try:
                    self._refreshes.wait_for_reads()  # reads other threads started end first
                    self._close()
                finally:
                    if self._lock is not None:
                        self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A store pickles as "how to reopen it" (e.g. for spawn-started DataLoader workers);
        # a "w" handle reopens as "a" so unpickling never erases the store.
        from imgstore.opening import reopen

        mode = "r" if self.mode == "r" else "a"
        decoder = self._encoded.decoder if self._encoded is not None else "auto"
        overrides = dict(self._overrides)
        return (reopen, (str(self.path), self.name, mode, self.sync, self.verify_reads, overrides, decoder))
