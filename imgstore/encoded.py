"""Encoded stores: records of variable-length bytes (a JPEG, PNG or WebP file, or raw pixels with their shape).

A store whose codec is not ``raw``, or a raw store of varied shapes, keeps each image as one
variable-length record in its backend (``Store._write_blobs`` / ``_read_blobs``), with its label.
Beside the backend's files the store keeps, per record: an XXH3 checksum of the bytes (seeded with
the label), the image's shape (``shapes-<gen>.u32``: height, width, channels as reads give them,
1 for a 2-D image, and a check word) and its source path (``paths-<gen>.txt``, with end offsets and
hashes in ``paths-<gen>.ends``; empty when none was given). All of them are written before the
manifest commits, like the records.

Reads check each record's bytes against its checksum, then decode them (:mod:`imgstore.codecs`):
on both cores, with the fastest installed decoder, to the store's ``image_mode``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgstore.arguments import io_error
from imgstore.codecs import Codec, ImageInfo, decode_many, encode_many, get_codec, is_whole, probe, resolve_decoder
from imgstore.columns import ShapeColumn, TextColumn
from imgstore.errors import (
    CorruptStoreError,
    ImgStoreError,
    InvalidImageError,
    InvalidOptionError,
)
from imgstore.manifest import MAX_DIMS, MAX_IMAGE_BYTES, write_manifest

if TYPE_CHECKING:
    from imgstore.store import Store

#: The files an encoded store keeps beside the backend's own (named per generation).
ENCODED_FILES = ("shapes.u32", "paths.txt", "paths.ends")
_CHANNELS = {"RGB": 3, "L": 1}
Images = list[np.ndarray] | np.ndarray


@dataclass(frozen=True)
class PreparedRecord:
    """One encoded image checked and hashed for a store (:meth:`~imgstore.store.Store.prepare_encoded`).

    Made by the store, in this process: it does not pickle (a record from elsewhere would bypass
    the checks), and :meth:`~imgstore.store.Store.put_prepared` takes only records of a store that
    decodes as it does.
    """

    blob: bytes
    label: int
    shape: tuple[int, ...]  # height, width, channels as reads give them
    path: str  # the source path kept with it ("" for none)
    checksum: int
    seed: int  # the store's record checksum seed: its codec, parameters, image mode and shape

    def __reduce__(self) -> Any:
        raise TypeError("a PreparedRecord is for the store that made it, in this process: it does not pickle")


class EncodedRecords:
    """The encoded-record half of one store handle: writing, reading and decoding its records."""

    def __init__(self, store: Store, decoder: str) -> None:
        # A proxy: the store holds this object, and a cycle would keep a dropped writer's lock alive.
        self.store: Store = weakref.proxy(store)
        manifest = store._manifest
        self.codec: Codec = get_codec(manifest.codec, **manifest.codec_params)
        self.decoder = resolve_decoder(decoder)
        self.image_mode = manifest.image_mode
        self.shape_column = ShapeColumn(store.file("shapes.u32"))
        self.paths = TextColumn(store.file("paths.txt"), store.file("paths.ends"))
        self._shapes: np.ndarray | None = None  # loaded on first use
        self._paths_loaded = False

    def forget(self) -> None:
        """The manifest changed under the handle (refresh): reload the side files when next needed."""
        self._shapes, self._paths_loaded = None, False

    # ------------------------------------------------------------------ writing

    def put_arrays(self, images: Images | Sequence[np.ndarray], labels: np.ndarray) -> range:
        arrays = [self._checked_array(k, image) for k, image in enumerate(images)]
        try:
            blobs = encode_many(self.codec, arrays)
        except InvalidImageError:
            for k, array in enumerate(arrays):  # which one, for the message
                try:
                    self.codec.encode(array)
                except InvalidImageError as exc:
                    raise InvalidImageError(f"image {k}: {exc}") from None
            raise
        shapes = np.array([self._decoded_hwc(_hwc(a.shape)) for a in arrays], dtype="<u4").reshape(-1, 3)
        return self.put_blobs(blobs, labels, shapes, None)

    def put_encoded(self, blobs: Sequence[Any], labels: np.ndarray, paths: Sequence[Any] | None) -> range:
        self._check_takes_files()
        if isinstance(blobs, (bytes, bytearray, memoryview, str)):
            raise InvalidImageError("put_encoded_many takes a sequence of encoded images (bytes), not one")
        texts = None if paths is None else self._checked_paths(paths, len(blobs))
        # A bad file is named by its path when the caller gave one (the index alone means little in a folder).
        checked = [
            self._checked_blob(f"image {k}" if texts is None else f"image {k} ({texts[k]!r})", blob)
            for k, blob in enumerate(blobs)
        ]
        if len(checked) != len(labels):
            from imgstore.errors import InvalidLabelError

            raise InvalidLabelError(f"got {len(checked)} images but {len(labels)} labels")
        hwc = [self._decoded_hwc((info.height, info.width, info.channels)) for _, info in checked]
        return self.put_blobs([blob for blob, _ in checked], labels, np.array(hwc, "<u4").reshape(-1, 3), texts)

    def prepare(self, blob: Any, label: int, path: Any) -> PreparedRecord:
        """What :meth:`put_encoded` checks and computes for one file, without writing (thread-safe)."""
        self._check_takes_files()
        text = "" if path is None else self._checked_paths([path], 1)[0]
        data, info = self._checked_blob(repr(text) if text else "", blob)
        checksum = int(self.store._checksums.of_blobs([data], np.array([label], np.int64))[0])
        hwc = self._decoded_hwc((info.height, info.width, info.channels))
        return PreparedRecord(data, label, hwc, text, checksum, self.store._checksums.blob_seed)

    def put_prepared(self, records: Sequence[Any]) -> range:
        seed = self.store._checksums.blob_seed
        for k, record in enumerate(records):
            # The seed says how the store decodes (codec, mode, shape): the same checks passed.
            if not isinstance(record, PreparedRecord) or record.seed != seed:
                raise InvalidImageError(
                    f"record {k}: put_prepared takes what this store's prepare_encoded made "
                    "(or a store's of the same codec, image mode and shape)"
                )
        labels = np.array([record.label for record in records], np.int64)
        shapes = np.array([record.shape for record in records], "<u4").reshape(-1, 3)
        texts = [record.path for record in records]
        checksums = np.array([record.checksum for record in records], "<u8")
        blobs = [record.blob for record in records]
        return self.put_blobs(blobs, labels, shapes, texts if any(texts) else None, checksums)

    def _check_takes_files(self) -> None:
        if self.codec.accepts is not None and not self.codec.accepts:
            raise InvalidOptionError(
                f"{self.store.path} is a raw store: it takes arrays (put_many); create it with codec='keep', 'jpeg', "
                "'png' or 'webp' to store encoded files"
            )

    @staticmethod
    def _checked_paths(paths: Sequence[Any], count: int) -> list[str]:
        texts = [os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else p for p in paths]
        if len(texts) != count or not all(isinstance(t, str) and "\0" not in t for t in texts):
            raise InvalidOptionError("paths must be one path (str or os.PathLike, no NUL) per image")
        try:
            for text in texts:
                text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise InvalidOptionError(
                "paths must be file names (str from the file system, no lone surrogates)"
            ) from None
        return texts

    def _checked_array(self, k: int, image: Any) -> np.ndarray:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise InvalidImageError(f"image {k}: images must be uint8 arrays, got dtype {array.dtype}")
        if array.ndim not in (2, 3) or min(array.shape) < 1 or array.nbytes > MAX_IMAGE_BYTES:
            raise InvalidImageError(
                f"image {k}: an image is [H, W] or [H, W, C] with positive sizes and at most 2 GiB; got {array.shape}"
            )
        shape = self.store.shape
        if shape is not None and _hwc(array.shape) != _hwc(shape):
            raise InvalidImageError(f"image {k}: this store holds images of shape {shape}; got {array.shape}")
        return np.ascontiguousarray(array)

    def _checked_blob(self, where: str, blob: Any) -> tuple[bytes, ImageInfo]:
        where = f"{where}: " if where else ""  # "image 3: ..." in a batch; a lone image needs no name
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise InvalidImageError(f"{where}an encoded image is bytes, got {type(blob).__name__}")
        data = bytes(blob)
        if not data or len(data) > MAX_IMAGE_BYTES:
            raise InvalidImageError(f"{where}an encoded image has 1 byte to 2 GiB, got {len(data)} bytes")
        try:
            info = probe(data)
            if not is_whole(data):  # a truncated file's header is fine: decode it to know (rare formats too)
                decode_many([data], threads=1)
        except InvalidImageError as exc:
            raise InvalidImageError(f"{where}{exc}") from None
        accepts = self.codec.accepts
        if info.format == "RAW" and self.codec.name != "raw":
            raise InvalidImageError(f"{where}imgstore's own raw pixel format is not an image file")
        if accepts is not None and info.format not in accepts:
            raise InvalidImageError(
                f"{where}a {self.codec.name} store takes {', '.join(sorted(accepts))} files, got {info.format} "
                "(use codec='keep' to store files of any format as they are)"
            )
        shape = self.store.shape
        if shape is not None:
            got = self._decoded_hwc((info.height, info.width, info.channels))
            if got != _hwc(shape):
                raise InvalidImageError(f"{where}this store holds images of shape {shape}; this one is {got}")
        return data, info

    def _decoded_hwc(self, hwc: tuple[int, ...]) -> tuple[int, ...]:
        """The (height, width, channels) an image of this stored shape decodes to in this store."""
        if self.codec.name == "raw" or self.image_mode is None:
            return hwc
        return (*hwc[:2], _CHANNELS[self.image_mode])

    def put_blobs(
        self,
        blobs: Sequence[bytes],
        labels: np.ndarray,
        shapes: np.ndarray,
        paths: Sequence[str] | None,
        checksums: np.ndarray | None = None,
    ) -> range:
        store = self.store
        start, n = len(store), len(blobs)
        if n == 0:
            return range(start, start)
        self._load_paths()
        records = store._checksums.of_blobs(blobs, labels) if checksums is None else checksums
        manifest = store._manifest.with_count(start + n)
        try:
            store._write_blobs(start, blobs, labels)
            store._checksums.write(start, records, {}, sync=store.sync)
            self.shape_column.write(start, shapes, sync=store.sync)
            ends = self.paths.write(start, paths if paths is not None else [""] * n, sync=store.sync)
            write_manifest(store.path, manifest, sync=store.sync)
        except OSError as exc:
            if isinstance(exc, ImgStoreError):
                raise
            raise io_error(exc, f"writing {n} images to {store.path}") from exc
        store._manifest = manifest
        store._checksums.extend(start, records, {})
        self.paths.extend(start, ends)
        if self._shapes is not None:
            self._shapes = np.concatenate([self._shapes[:start], shapes.astype("<u4")])
        return range(start, start + n)

    # ------------------------------------------------------------------ reading

    def read(self, indices: np.ndarray | tuple[int, int]) -> tuple[list[bytes], np.ndarray]:
        """The stored bytes and labels of records ``indices`` (or a ``(start, stop)`` range), checked."""
        store = self.store
        if isinstance(indices, tuple):
            start, stop = indices
            idx = np.arange(start, stop, dtype=np.int64)
        else:
            idx = indices
        if len(idx) == 0:
            return [], np.empty(0, np.int64)
        try:
            blobs, labels = (
                store._read_blob_range(*indices) if isinstance(indices, tuple) else store._read_blobs(indices)
            )
        except store.damage_errors as exc:
            raise store._damaged(exc) from exc
        if len(blobs) != len(idx) or len(labels) != len(idx):
            raise CorruptStoreError(f"{store.path}: the backend returned {len(blobs)} of {len(idx)} records")
        if store.verify_reads:
            store._checksums.check_blobs(idx, blobs, labels, store.path)
        return blobs, labels

    def get(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self.get_many(np.array([index], dtype=np.int64), None, None)
        return images[0], int(labels[0])

    def get_many(
        self,
        indices: np.ndarray | tuple[int, int],
        out: tuple[np.ndarray, np.ndarray] | None,
        size: tuple[int, int] | None,
    ) -> tuple[Images, np.ndarray]:
        blobs, labels = self.read(indices)
        if not blobs and size is not None:  # no image to take the channels from
            return self.store._batch(0, out, self.batch_shape(size))
        images = self.decode(blobs, indices, size)
        shape = self.store.shape
        if size is None and shape is None:
            if out is not None:
                raise InvalidOptionError("out= needs one batch array: give size=(h, w) for a store of varied shapes")
            return images, labels
        if isinstance(images, np.ndarray) and out is None:
            return images, labels  # decoded straight into one batch
        batch_shape = images.shape[1:] if isinstance(images, np.ndarray) else self.batch_shape(size)
        if out is not None:
            batch, batch_labels = self.store._batch(len(blobs), out, batch_shape)
        else:
            batch, batch_labels = np.empty((len(blobs), *batch_shape), np.uint8), labels
        if isinstance(images, np.ndarray) and images.shape == batch.shape:
            batch[...] = images
        else:
            for k, image in enumerate(images):
                batch[k] = image.reshape(batch.shape[1:])  # [H, W, 1] and [H, W] are the same pixels
        batch_labels[...] = labels
        return batch, batch_labels

    def batch_shape(self, size: tuple[int, int] | None) -> tuple[int, ...]:
        shape = self.store.shape
        if size is None:
            assert shape is not None
            return shape
        channels = _CHANNELS.get(self.image_mode or "") or (_hwc(shape)[2] if shape is not None else 0)
        if not channels:
            raise InvalidOptionError(
                "size= gives one batch array: the images must share a channel count; create the store with "
                "image_mode='RGB' (or 'L')"
            )
        return (*size, channels)

    def decode(
        self, blobs: Sequence[bytes], indices: np.ndarray | tuple[int, int], size: tuple[int, int] | None
    ) -> Images:
        try:
            images = decode_many(blobs, mode=self.image_mode, size=size, decoder=self.decoder)
        except InvalidImageError:
            idx = np.arange(*indices) if isinstance(indices, tuple) else indices
            for k, blob in enumerate(blobs):  # which one, for the message
                try:
                    decode_many([blob], mode=self.image_mode, size=size, decoder=self.decoder, threads=1)
                except InvalidImageError as exc:
                    if size is not None and self._decodes(blob):  # intact, but cannot take size=
                        raise InvalidImageError(f"the image at index {int(idx[k])}: {exc}") from None
                    raise CorruptStoreError(
                        f"{self.store.path}: the image at index {int(idx[k])} cannot be decoded: {exc}"
                    ) from None
            raise
        shape = self.store.shape
        if size is None and shape is not None:
            for k, image in enumerate(images):
                if _hwc(image.shape) != _hwc(shape):
                    idx = np.arange(*indices) if isinstance(indices, tuple) else indices
                    raise CorruptStoreError(
                        f"{self.store.path}: the image at index {int(idx[k])} decodes to {image.shape}, not {shape}"
                    )
        return images

    def _decodes(self, blob: bytes) -> bool:
        try:
            decode_many([blob], mode=self.image_mode, decoder=self.decoder, threads=1)
        except InvalidImageError:
            return False
        return True

    def iter_batches(self, batch_size: int, size: tuple[int, int] | None) -> Iterator[tuple[Images, np.ndarray]]:
        count = len(self.store)
        for start in range(0, count, batch_size):
            yield self.get_many((start, min(start + batch_size, count)), None, size)

    # ------------------------------------------------------------------ side files

    def shapes(self) -> np.ndarray:
        if self._shapes is None:
            count = len(self.store)
            self._shapes = self.shape_column.load(count)
        return np.array(self._shapes, copy=True)

    def source_path(self, index: int) -> str | None:
        self._load_paths()
        path = self.paths.get(index)
        return path or None

    def check_side_files(self) -> None:
        """Check every record's shape and source path (``verify``)."""
        self._shapes = None
        self.shapes()
        self._load_paths()
        self.paths.check_all()

    def _load_paths(self) -> None:
        if not self._paths_loaded:
            self.paths.load(len(self.store))
            self._paths_loaded = True


def _hwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An image shape as (height, width, channels): a 2-D image has 1 channel."""
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    if len(shape) > MAX_DIMS:
        raise InvalidImageError(f"shape {shape} has more than {MAX_DIMS} dimensions")
    return tuple(shape)
