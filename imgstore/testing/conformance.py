"""``StoreConformance``: the behaviour every backend must show (pytest and Hypothesis needed).

Every test runs on the class's layout (raw pixels of one shape by default; see
:class:`~imgstore.testing.BackendTest`). The tests of what only encoded stores have (``size=``,
``get_encoded``, ``put_encoded_many``, source paths) are in ``encoded_conformance.py``, a base of
:class:`StoreConformance`; in raw classes they check that those calls are refused, or skip, saying so.
The tests of bad input (refused before anything is written) are in ``input_conformance.py``, another base.
"""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgstore
from imgstore import Store, open_store
from imgstore.errors import CorruptStoreError, InvalidImageError, InvalidOptionError
from imgstore.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from imgstore.testing.checks import (
    ImportOnUnpickle,
    check_images_equal,
    check_owned_array,
    check_records,
)
from imgstore.testing.encoded_conformance import EncodedConformance, Filled
from imgstore.testing.input_conformance import InputConformance
from imgstore.testing.layouts import Images, take


def _read_in_child(_: None, store: Store, indices: list[int], queue: multiprocessing.Queue[Any]) -> None:
    images, labels = store.get_many(indices)
    queue.put((images, labels.tolist()))


def _joined(batches: list[Any]) -> Images:
    """Batches of iter_batches as one: arrays concatenated, lists (varied shapes) chained."""
    if all(isinstance(batch, np.ndarray) for batch in batches):
        return np.concatenate(batches)
    return [image for batch in batches for image in batch]


def _each(images: Any) -> list[np.ndarray]:
    """The arrays a read returned: the batch array itself, or every image of a list."""
    return [images] if isinstance(images, np.ndarray) else list(images)


class StoreConformance(EncodedConformance, InputConformance):
    """Behaviour every backend must show. Subclasses set ``backend`` (and optionally ``options`` and a layout).

    The tests of what encoded stores add are inherited from :class:`EncodedConformance`, those of
    bad input from :class:`InputConformance`.
    """

    #: image shapes this backend holds; others must raise InvalidImageError before writing
    shapes: ClassVar[tuple[tuple[int, ...], ...]] = ((32, 32, 3), (28, 28), (28, 28, 1), (5, 7, 4), (3, 2, 2))

    def supports(self, shape: tuple[int, ...]) -> bool:
        try:
            imgstore.get_backend(self.backend).check_shape(shape)
        except InvalidImageError:
            return False
        return True

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / "store"

    @pytest.fixture(scope="class")
    @classmethod
    def pristine(cls, tmp_path_factory: pytest.TempPathFactory) -> Filled:
        """A store of 300 records in two commits, made once per class (encoding them is dear): tests copy it."""
        self = cls()  # a class-scoped fixture has no test instance; the layout is all in class attributes
        self.check_layout_supported()  # before the function-scoped autouse fixture that also does
        path = tmp_path_factory.mktemp(cls.__name__) / "store"
        records = self.records(300)
        with self.create(path) as store:
            records[:200].put(store)
            records[200:].put(store)
        return path, records

    @pytest.fixture
    def filled(self, pristine: Filled, path: Path) -> Filled:
        shutil.copytree(pristine[0], path)
        return path, pristine[1]

    # ------------------------------------------------------------------ round trip

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(
        shape_index=st.integers(0, 4),
        batches=st.lists(st.integers(0, 17), min_size=1, max_size=4),
        seed=st.integers(0, 2**32 - 1),
        big_labels=st.booleans(),
    )
    def test_round_trip_is_exact(self, shape_index: int, batches: list[int], seed: int, big_labels: bool) -> None:
        shape = self.shapes[shape_index]  # varied layouts: the scale of their shapes; fixed encoded: unused
        records = self.records(sum(batches), shape, seed)
        if big_labels:
            records = records.with_labels(records.labels * (2**62 // 10))  # labels are int64, not bytes
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s"
            store = self.create(path, sync=False)
            if not self.layout.encoded and not self.supports(shape):
                images, labels = records.expected, records.labels
                with pytest.raises(InvalidImageError):
                    store.put_many(images if len(images) else images[:1], labels if len(images) else labels[:1])
                assert len(store) == 0
                return
            start = 0
            for size in batches:
                assert records[start : start + size].put(store) == range(start, start + size)
                start += size
            check_records(store, records)
            store.close()
            with open_store(path) as reopened:
                check_records(reopened, records)

    def test_put_returns_consecutive_indices(self, path: Path) -> None:
        records = self.records(5)
        with self.create(path) as store:
            assert [records.put_one(store, k) for k in range(5)] == list(range(5))
            assert records.put(store) == range(5, 10)
            check_records(store, records + records)

    def test_put_accepts_python_ints_and_numpy_integers(self, path: Path) -> None:
        records = self.records(3)
        with self.create(path) as store:
            records.put_one(store, 0, 7)
            records.put_one(store, 1, np.uint8(3))
            if records.blobs is not None:
                store.put_encoded_many(records.blobs[2:], [np.int32(9)])
            else:
                assert records.arrays is not None
                store.put_many(records.arrays[2:], [np.int32(9)])
            assert store.get_many([0, 1, 2])[1].tolist() == [7, 3, 9]

    def test_non_contiguous_and_fortran_input_is_stored_correctly(self, path: Path) -> None:
        records = self.records(12)
        with self.create(path) as store:
            if records.blobs is not None:  # files: any bytes-like object
                copies: list[Any] = [bytearray(blob) for blob in records.blobs]
                views: list[Any] = [memoryview(blob) for blob in records.blobs]
                store.put_encoded_many(copies, records.labels)
                store.put_encoded_many(views, records.labels)
                store.put_encoded_many([*views[3:4]], records.labels[3:4])
            else:
                arrays = records.arrays
                assert arrays is not None
                fortran: Images
                strided: Images
                if isinstance(arrays, np.ndarray):
                    fortran = np.asfortranarray(arrays)
                    strided = np.repeat(arrays, 2, axis=0)[::2]  # a strided view equal to the images
                else:
                    fortran = [np.asfortranarray(array) for array in arrays]
                    strided = [np.repeat(array, 2, axis=1)[:, ::2] for array in arrays]
                store.put_many(fortran, records.labels)
                store.put_many(strided, records.labels)
                store.put(arrays[3][...], records.labels[3])
            check_records(store, records + records + records[[3]])

    # ------------------------------------------------------------------ reading

    def test_get_many_in_any_order_with_repeats(self, filled: Filled) -> None:
        path, records = filled
        expected, labels = records.expected, records.labels
        order = np.random.default_rng(1).permutation(len(records))
        picks = np.concatenate([order[:50], order[:5], [0, 0, len(records) - 1, -1, -300]])
        with open_store(path) as store:
            got_images, got_labels = store.get_many(picks)
            check_images_equal(got_images, take(expected, picks))
            np.testing.assert_array_equal(got_labels, labels[picks])
            got_images, _ = store.get_many(slice(10, 20))
            check_images_equal(got_images, take(expected, slice(10, 20)))
            got_images, _ = store.get_many(range(250, 10, -7))
            check_images_equal(got_images, take(expected, range(250, 10, -7)))

    def test_negative_index_counts_from_end(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            image, label = store.get(-1)
            check_images_equal([image], [records.expected[-1]])
            assert label == records.labels[-1]
            check_images_equal([store[-300][0]], [records.expected[0]])

    @pytest.mark.parametrize("bad", [300, -301, 10**12])
    def test_index_out_of_range_raises_index_error(self, filled: Filled, bad: int) -> None:
        path, _ = filled
        with open_store(path) as store:
            with pytest.raises(IndexError):
                store.get(bad)
            with pytest.raises(IndexError):
                store.get_many([0, bad])
            with pytest.raises(IndexError):
                store.get_many(range(bad, bad + 2) if bad > 0 else range(0, 302))

    def test_returned_arrays_are_owned_writable_contiguous(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            image, _ = store.get(5)
            batch, labels = store.get_many([9, 3, 4])
            scan, _ = store.get_many(range(0, 100))
            first, _ = next(iter(store))
            chunk, _ = next(store.iter_batches(7))
            for array in [image, labels, first, *_each(batch), *_each(scan), *_each(chunk)]:
                check_owned_array(array)
            image[:] = 0  # writing to a returned array never reaches the store
            for array in _each(batch):
                array[:] = 0
            check_images_equal([store.get(5)[0]], [records.expected[5]])

    def test_iteration_and_batches_cover_everything_in_order(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            items = list(store)
            assert len(items) == len(records)
            check_images_equal([image for image, _ in items], list(records.expected))
            assert [label for _, label in items] == records.labels.tolist()
            batches = list(store.iter_batches(64))
            assert [len(b[0]) for b in batches] == [64, 64, 64, 64, 44]
            check_images_equal(_joined([b[0] for b in batches]), records.expected)
            np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), records.labels)
            with pytest.raises(ValueError):
                next(store.iter_batches(0))

    def test_empty_store(self, path: Path) -> None:
        shape = self.layout.image_shape((32, 32, 3))
        with self.create(path, **({"shape": shape} if shape is not None else {})) as store:
            assert len(store) == 0
            assert list(store) == []
            assert list(store.iter_batches(10)) == []
            images, labels = store.get_many([])
            if shape is None:  # varied shapes: a list, empty
                assert isinstance(images, list) and images == []
            else:
                assert images.shape == (0, *shape)
            assert labels.shape == (0,)
            with pytest.raises(IndexError):
                store.get(0)
        with open_store(path) as reopened:
            assert len(reopened) == 0 and reopened.shape == shape

    # ------------------------------------------------------------------ persistence and modes

    def test_manifest_describes_the_store(self, filled: Filled) -> None:
        path, records = filled
        manifest = read_manifest(path)
        assert (path / MANIFEST_NAME).is_file()
        assert manifest.backend == self.backend
        assert manifest.shape == self.layout.image_shape((32, 32, 3))
        assert manifest.dtype == "uint8"
        assert manifest.count == len(records)
        assert manifest.format_version == FORMAT_VERSION
        assert manifest.codec == self.codec and manifest.image_mode == self.image_mode
        assert manifest.encoded == self.layout.encoded
        assert {key: manifest.codec_params.get(key) for key in self.codec_params} == self.codec_params
        entries = {entry.name for entry in path.iterdir()}
        assert set(manifest.files) <= entries, "the manifest names files the store does not have"
        assert all(manifest.owns(name) for name in entries), "the store holds files its manifest does not name"

    def test_reopen_finds_backend_from_manifest(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            assert store.backend == self.backend and store.mode == "r"
            assert store.codec == self.codec and store.varied == self.layout.varied
            check_records(store, records)

    def test_append_mode_adds_after_existing(self, filled: Filled) -> None:
        path, records = filled
        more = self.records(20, seed=5)
        with open_store(path, mode="a") as store:
            assert more.put(store) == range(300, 320)
        with open_store(path) as store:
            check_records(store, records + more)

    def test_append_mode_creates_a_missing_store(self, path: Path) -> None:
        records = self.records(4)
        with open_store(path, self.backend, "a", **self.layout.store_kwargs(), **self.options) as store:
            records.put(store)
        with open_store(path, mode="a") as store:
            records.put(store)
            assert len(store) == 8
            check_records(store, records + records)

    def test_relative_paths_follow_the_working_directory(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A store opened by a relative path is where the path says, also after a chdir (no library may
        resolve it against the directory of its first use), and nothing is written outside it."""
        records = self.records(5)
        for name in ("one", "two"):
            (path / name).mkdir(parents=True)
            monkeypatch.chdir(path / name)
            with open_store("s", self.backend, "w", **self.layout.store_kwargs(), **self.options) as store:
                records.put(store)
            with open_store("s", mode="a") as store:
                records.put(store)
        for name in ("one", "two"):
            assert sorted(p.name for p in (path / name).iterdir()) == ["s"], name
            with open_store(path / name / "s") as store:
                check_records(store, records + records)
        # A handle opened by a relative path keeps its store after a chdir (a write lands there).
        monkeypatch.chdir(path / "one")
        with open_store("s", mode="a") as store:
            monkeypatch.chdir(path / "two")
            records.put(store)
        with open_store(path / "one" / "s") as store:
            check_records(store, records + records + records)
        with open_store(path / "two" / "s") as store:
            check_records(store, records + records)
        assert sorted(p.name for p in (path / "two").iterdir()) == ["s"]

    def test_write_mode_replaces_an_existing_store(self, filled: Filled) -> None:
        path, _ = filled
        records = self.records(3, seed=9)
        with self.create(path) as store:
            assert len(store) == 0
            records.put(store)
        with open_store(path) as store:
            check_records(store, records)

    def test_read_only_refuses_writes_and_keeps_data(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path, mode="r") as store:
            with pytest.raises(PermissionError):
                records.put_one(store, 0, 1)
            with pytest.raises(imgstore.ReadOnlyError):
                records[:2].put(store)
            with pytest.raises(imgstore.ReadOnlyError):
                store.put_many(records.expected[:2], records.labels[:2])
            assert len(store) == len(records)
        with open_store(path) as store:
            check_records(store, records)

    def test_closed_store_refuses_use(self, filled: Filled) -> None:
        path, _ = filled
        store = open_store(path)
        store.close()
        store.close()  # closing twice is harmless
        with pytest.raises(imgstore.StoreClosedError):
            store.get(0)

    # ------------------------------------------------------------------ processes

    def test_pickled_store_reopens(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path) as store:
            clone = pickle.loads(pickle.dumps(store))
        with clone:
            assert clone.mode == "r"
            check_records(clone, records)

    @pytest.mark.parametrize("start_method", ["fork", "spawn"])
    def test_child_process_reads_after_parent_used_store(self, filled: Filled, start_method: str) -> None:
        path, records = filled
        context = (
            multiprocessing.get_context("fork") if start_method == "fork" else multiprocessing.get_context("spawn")
        )
        picks = [7, 250, 3, 3, 99]
        with open_store(path) as store:
            store.get_many(range(len(store)))  # the parent's handles are live when the child starts
            queue = context.Queue()
            import_first = ImportOnUnpickle(self.backend_module)  # before the store reopens in a spawned child
            child = context.Process(target=_read_in_child, args=(import_first, store, picks, queue))
            child.start()
            got_images, got_labels = queue.get(timeout=60)
            child.join(timeout=60)
            assert child.exitcode == 0
            check_images_equal(got_images, take(records.expected, picks))
            assert got_labels == records.labels[picks].tolist()
            check_records(store, records)  # the parent's handles still work

    def test_get_many_fills_caller_arrays(self, filled: Filled) -> None:
        path, records = filled
        picks = [5, 1, 9, 1]
        with open_store(path) as store:
            if self.layout.varied:  # one array needs one shape: size=, and one channel count (image_mode)
                with pytest.raises(InvalidOptionError):
                    store.get_many(picks, out=(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64)))
                if self.image_mode is None:
                    return  # channel counts vary: test_get_many_with_size covers that
                resized, labels = store.get_many(picks, size=(5, 6))
                out = (np.zeros(resized.shape, np.uint8), np.zeros(4, np.int64))
                got = store.get_many(picks, out=out, size=(5, 6))
                assert got[0] is out[0] and got[1] is out[1]
                np.testing.assert_array_equal(out[0], resized)
                np.testing.assert_array_equal(out[1], labels)
                return
            expected = records.expected
            assert isinstance(expected, np.ndarray)
            out = (np.zeros((4, *expected.shape[1:]), np.uint8), np.zeros(4, np.int64))
            got = store.get_many(picks, out=out)
            assert got[0] is out[0] and got[1] is out[1]
            np.testing.assert_array_equal(out[0], expected[picks])
            np.testing.assert_array_equal(out[1], records.labels[picks])
            store.get_many(range(4), out=out)
            np.testing.assert_array_equal(out[0], expected[:4])
            with pytest.raises(InvalidOptionError):
                store.get_many(range(5), out=out)
            with pytest.raises(InvalidOptionError):
                store.get_many(range(4), out=(out[0].astype(np.int16), out[1]))

    def test_verify_passes_on_an_intact_store(self, filled: Filled) -> None:
        path, _ = filled
        with open_store(path) as store:
            store.verify()
            store.verify(batch_size=7)

    def test_verify_detects_a_flipped_byte_in_any_backend_file(self, filled: Filled) -> None:
        """Flip one byte inside the stored bytes of a record: reads may not notice, verify must."""
        path, records = filled
        if self.layout.encoded:
            with open_store(path) as store:
                target = store.get_encoded(123)[0]  # the record's bytes, as the backend keeps them
        else:
            target = records.expected[123].tobytes()[:64]
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            data = bytearray(file.read_bytes())
            at = data.find(target)
            if at < 0:
                continue
            data[at + min(10, len(target) // 2)] ^= 0xFF
            file.write_bytes(data)
            break
        else:
            pytest.skip("this backend does not keep the records' bytes in a file (e.g. compressed): see the fuzz tests")
        with open_store(path) as store:
            with pytest.raises(CorruptStoreError, match="index 123"):
                store.verify()

    def test_single_puts_use_about_as_much_disk_as_one_batch(self, tmp_path: Path) -> None:
        records = self.records(60 if self.scaled else 200)  # an encoded commit costs ~2x a raw one
        with self.create(tmp_path / "batch", sync=False) as store:
            records.put(store)
            batch_bytes = store.disk_usage()
        with self.create(tmp_path / "single", sync=False) as store:
            for k in range(len(records)):
                records.put_one(store, k)
            single_bytes = store.disk_usage()
            check_records(store, records)
        assert single_bytes < 3 * batch_bytes + (1 << 20), (single_bytes, batch_bytes)
