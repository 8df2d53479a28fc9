"""``EncodedConformance``: what encoded stores add to the API, tested on every layout (pytest needed).

``size=``, ``get_encoded``, ``put_encoded_many`` (its checks of each file, source paths), image
shapes and class names. :class:`~imgstore.testing.StoreConformance` inherits these tests, so every
backend's class runs them with the rest of the conformance suite; they are kept apart so that each
module stays readable. In raw classes the tests check that the encoded-only calls are refused, or
skip, saying so.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from imgstore import open_store
from imgstore.errors import (
    CorruptStoreError,
    ImgStoreError,
    InvalidImageError,
    InvalidLabelError,
    InvalidOptionError,
    ReadOnlyError,
)
from imgstore.testing.checks import BackendTest, check_images_equal, check_owned_array, check_records
from imgstore.testing.layouts import Records, bad_files, hwc, image_file, pillow_decode, take

Filled = tuple[Path, Records]  # the ``filled`` fixture: a copy of a store of 300 records, and those records


class EncodedConformance(BackendTest):
    """The tests of :class:`~imgstore.testing.StoreConformance` on what encoded stores add (it defines the fixtures)."""

    def test_image_shapes_are_what_get_returns(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path, mode="a") as store:
            more = self.records(7, seed=3)
            more.put(store)
            for handle in (store, open_store(path)):
                shapes = handle.image_shapes()
                assert shapes.dtype == np.uint32 and shapes.shape == (len(records) + 7, 3)
                want = [hwc(image.shape) for image in [*records.expected, *more.expected]]
                assert [tuple(row) for row in shapes.tolist()] == want
                handle.close()

    def test_get_many_with_size(self, filled: Filled) -> None:
        """``size=(h, w)``: one batch array, each image as the codecs decode its stored bytes to that size."""
        path, _ = filled
        picks = [5, 1, 299, 1]
        with open_store(path) as store:
            if not self.layout.encoded:
                with pytest.raises(InvalidOptionError):
                    store.get_many(picks, size=(5, 6))
                with pytest.raises(InvalidOptionError):
                    next(store.iter_batches(10, size=(5, 6)))
                return
            if self.layout.varied and self.image_mode is None:  # channel counts vary: no one array
                with pytest.raises(ImgStoreError) as refused:
                    store.get_many(range(len(store)), size=(5, 6))
                assert not isinstance(refused.value, CorruptStoreError), "an argument error, not damage"
                return
            from imgstore.codecs import decode

            batch, labels = store.get_many(picks, size=(5, 6))
            blobs, blob_labels = store.get_encoded_many(picks)
            assert isinstance(batch, np.ndarray) and batch.shape[:3] == (4, 5, 6)
            check_owned_array(batch)
            want = np.stack([decode(blob, mode=self.image_mode, size=(5, 6)) for blob in blobs])
            np.testing.assert_array_equal(batch.reshape(want.shape), want)
            np.testing.assert_array_equal(labels, blob_labels)
            scan = np.concatenate([b for b, _ in store.iter_batches(64, size=(5, 6))])
            np.testing.assert_array_equal(scan[picks], batch)
            for bad in [(0, 5), (5,), (2.5, 3), "5x6", (1 << 17, 4)]:
                with pytest.raises(InvalidOptionError):
                    store.get_many(picks, size=bad)  # type: ignore[arg-type]

    def test_an_empty_batch_with_size_has_the_channels_of_the_others(self, filled: Filled) -> None:
        """``get_many([], size=)`` is [0, h, w, C] with the C every other batch of the store has (to concatenate)."""
        self.skip_unless_encoded("size=")
        if self.layout.varied and self.image_mode is None:
            pytest.skip("channel counts vary in this layout: no batch with size= has one C")
        path, _ = filled
        with open_store(path) as store:
            batch, _ = store.get_many([0, 1], size=(5, 6))
            empty, labels = store.get_many([], size=(5, 6))
            assert empty.shape == (0, *batch.shape[1:]) and labels.shape == (0,)

    def test_get_encoded_gives_the_stored_bytes(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            if not self.layout.encoded:
                with pytest.raises(InvalidOptionError):
                    store.get_encoded(0)
                return
            picks = [0, 299, 17, 17, -1]
            blobs, labels = store.get_encoded_many(picks)
            np.testing.assert_array_equal(labels, records.labels[picks])
            assert all(type(blob) is bytes for blob in blobs)
            if records.blobs is not None:  # keep: the very files that were put
                assert blobs == take(records.blobs, picks)  # type: ignore[arg-type]
            mode = self.image_mode
            if self.codec == "raw":
                from imgstore.codecs import decode

                decoded = [decode(blob) for blob in blobs]
            else:
                decoded = [pillow_decode(blob, mode) for blob in blobs]  # Pillow reads them as they are
            check_images_equal(decoded, list(take(records.expected, picks)))
            assert store.get_encoded(-1) == (blobs[-1], int(labels[-1]))

    def test_put_encoded_many_checks_each_header(self, filled: Filled) -> None:
        """Empty, text, a JPEG cut in its header, decompression bombs: InvalidImageError, and nothing stored."""
        self.skip_unless_encoded("put_encoded_many")
        path, records = filled
        good = self.files_of(records[:2])
        with open_store(path, mode="a") as store:
            if not self.layout.takes_files:
                with pytest.raises(InvalidOptionError):
                    store.put_encoded_many(good, records.labels[:2])
                assert len(store) == len(records)
                return
            jpeg = image_file(np.zeros((16, 16, 3), np.uint8), "JPEG")
            for name, bad in bad_files(jpeg).items():
                for batch in ([bad], [good[0], bad, good[1]]):
                    with pytest.raises(InvalidImageError):
                        store.put_encoded_many(batch, [1] * len(batch))
                    assert len(store) == len(records), f"{name}: something was stored"
            from imgstore.codecs import get_codec

            accepts = get_codec(self.codec, **self.codec_params).accepts
            shape = hwc(self.layout.image_shape((8, 8, 3)) or (8, 8, 3))
            for format in ("JPEG", "PNG", "WEBP"):
                if accepts is None or format in accepts:
                    continue
                other = image_file(np.zeros(shape, np.uint8), format)
                with pytest.raises(InvalidImageError, match=format):  # e.g. a JPEG given to a png store
                    store.put_encoded_many([other], [1])
            if not self.layout.varied:  # a file of another size than the store's
                other = image_file(np.zeros((shape[0] + 1, shape[1], shape[2]), np.uint8), self._a_format(accepts))
                with pytest.raises(InvalidImageError):
                    store.put_encoded_many([other], [1])
            for bad_paths in (["only one"], ["a", "b\0c"], [b"x", 3]):
                with pytest.raises(InvalidOptionError):
                    store.put_encoded_many(good, records.labels[:2], paths=bad_paths)  # type: ignore[arg-type]
            with pytest.raises((InvalidImageError, InvalidLabelError)):  # one file, not a sequence of them
                store.put_encoded_many(good[0], [1])  # type: ignore[arg-type]
            with pytest.raises(InvalidImageError):
                store.put_encoded_many(["a str"], [1])  # type: ignore[list-item]
            assert len(store) == len(records)
        with open_store(path) as store:
            check_records(store, records)
            store.verify()

    @staticmethod
    def _a_format(accepts: frozenset[str] | None) -> str:
        return "PNG" if accepts is None else sorted(accepts)[0]

    def test_a_file_cut_in_its_pixel_data_is_refused_or_an_error_on_read(self, path: Path) -> None:
        """The header of a JPEG cut halfway is sane: put_encoded_many may take it; reading it is then an error."""
        self.skip_unless_encoded("put_encoded_many")
        if not self.layout.takes_files or self.codec not in ("keep", "jpeg"):
            pytest.skip(f"a {self.codec} store takes no JPEG files")
        shape = hwc(self.layout.image_shape((16, 16, 3)) or (16, 16, 3))
        jpeg = image_file(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), "JPEG")
        cut = jpeg[: (jpeg.index(b"\xff\xda") + len(jpeg)) // 2]
        with self.create(path) as store:
            try:
                store.put_encoded_many([cut], [1])
            except InvalidImageError:
                assert len(store) == 0
                return
            assert store.get_encoded(0) == (cut, 1)  # stored as given
            store.verify()  # its checksum is its own
            with pytest.raises(ImgStoreError):
                store.get(0)
            with pytest.raises(ImgStoreError):
                store.get_many([0])

    def test_source_paths_round_trip(self, path: Path) -> None:
        self.skip_unless_encoded("source paths (put_encoded_many(..., paths=))")
        if not self.layout.takes_files:
            pytest.skip("a raw store takes arrays only (put_many): its records have no source file")
        records = self.records(6)
        files = self.files_of(records)
        paths: list[str | os.PathLike[str]] = ["train/cat/1.jpg", Path("train/dog/2.png"), "", "é ü/ñ.webp", "a", "b"]
        with self.create(path) as store:
            assert store.put_encoded_many(files, records.labels, paths=paths) == range(6)
            files_only = self.records(2, seed=4)
            store.put_encoded_many(self.files_of(files_only), files_only.labels)  # no paths
            if files_only.arrays is not None:
                store.put_many(files_only.arrays, files_only.labels)  # arrays have no source
        unnamed = len(files_only) * (2 if files_only.arrays is not None else 1)
        want = [os.fspath(p) or None for p in paths] + [None] * unnamed
        with open_store(path) as store:
            assert [store.source_path(i) for i in range(len(store))] == want
            assert store.source_path(-len(store)) == "train/cat/1.jpg"
            with pytest.raises(IndexError):
                store.source_path(len(store))
            check_images_equal(store.get_many(range(6))[0], records.expected)
        with open_store(path, mode="a") as store:  # appending keeps them
            store.put_encoded_many(files[:1], records.labels[:1], paths=["late.jpg"])
            assert store.source_path(-1) == "late.jpg" and store.source_path(1) == "train/dog/2.png"

    def test_prepared_records_are_what_put_encoded_many_stores(self, path: Path) -> None:
        """prepare_encoded on threads, put_prepared in one commit: the store put_encoded_many makes."""
        self.skip_unless_encoded("prepare_encoded")
        if not self.layout.takes_files:
            pytest.skip("a raw store takes arrays only (put_many): no files to prepare")
        records = self.records(8)
        files = self.files_of(records)
        labels = records.labels.tolist()
        with self.create(path) as store:
            with ThreadPoolExecutor(2) as pool:
                prepared = list(
                    pool.map(lambda k: store.prepare_encoded(files[k], labels[k], path=f"f/{k}"), range(len(files)))
                )
            assert len(store) == 0  # preparing writes nothing
            assert store.put_prepared(prepared[:5]) == range(5)
            assert store.put_prepared(prepared[5:]) == range(5, 8)
            with pytest.raises(TypeError):
                pickle.dumps(prepared[0])
            with pytest.raises(InvalidImageError):
                store.put_prepared([files[0]])  # type: ignore[list-item]
            with pytest.raises(InvalidImageError):
                store.prepare_encoded(b"not an image", 1)
            with pytest.raises(InvalidLabelError):
                store.prepare_encoded(files[0], -1)
            assert len(store) == 8
        with open_store(path) as store:
            check_records(store, records)
            assert [store.source_path(k) for k in range(8)] == [f"f/{k}" for k in range(8)]
            store.verify()
            with pytest.raises(ReadOnlyError):
                store.put_prepared(prepared[:1])
        other = self.create(path.with_name(path.name + "-other"), image_mode="L" if self.image_mode != "L" else "RGB")
        with other:
            with pytest.raises(InvalidImageError):  # checked for a store that decodes otherwise
                other.put_prepared(prepared[:1])
            assert len(other) == 0

    def test_classes_name_the_labels(self, path: Path) -> None:
        classes = [f"class {k}" for k in range(10)]  # the records' labels are 0 .. 9
        records = self.records(20)
        with self.create(path, classes=classes) as store:
            assert store.classes == classes
            records.put(store)
            for label in (10, 2**40):
                with pytest.raises(InvalidLabelError):
                    records[:2].put(store, labels=[0, label])
                with pytest.raises(InvalidLabelError):
                    records.put_one(store, 0, label)
            assert len(store) == 20
        with open_store(path, mode="a") as store:
            assert store.classes == classes
            with pytest.raises(InvalidLabelError):
                records.put_one(store, 0, 10)
            check_records(store, records)
        with pytest.raises(InvalidOptionError):
            open_store(path, mode="a", classes=["other"])
        for bad in (["a", "a"], "abc", ["x" * 1001], [1, 2], [""]):
            with pytest.raises(InvalidOptionError):
                self.create(path.parent / "bad", classes=bad)
