"""``StoreConformance``: the behaviour every backend must show (pytest and Hypothesis needed)."""

from __future__ import annotations

import multiprocessing
import pickle
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imgstore
from imgstore import Store, open_store
from imgstore.errors import ImgStoreError, InvalidImageError
from imgstore.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from imgstore.testing.checks import (
    BackendTest,
    ImportOnUnpickle,
    check_owned_array,
    check_store_content,
    random_images,
)


def _read_in_child(_: None, store: Store, indices: list[int], queue: multiprocessing.Queue[Any]) -> None:
    images, labels = store.get_many(indices)
    queue.put((images.tobytes(), labels.tolist()))


class StoreConformance(BackendTest):
    """Behaviour every backend must show. Subclasses set ``backend`` (and optionally ``options``)."""

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

    @pytest.fixture
    def filled(self, path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
        images, labels = random_images(300)
        with self.create(path) as store:
            store.put_many(images[:200], labels[:200])
            store.put_many(images[200:], labels[200:])
        return path, images, labels

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
        shape = self.shapes[shape_index]
        images, labels = random_images(sum(batches), shape, seed)
        if big_labels:
            labels = labels * (2**62 // 10)  # labels are int64, not bytes
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s"
            store = self.create(path, sync=False)
            if not self.supports(shape):
                with pytest.raises(InvalidImageError):
                    store.put_many(images if len(images) else images[:1], labels if len(images) else labels[:1])
                assert len(store) == 0
                return
            start = 0
            for size in batches:
                assert store.put_many(images[start : start + size], labels[start : start + size]) == range(
                    start, start + size
                )
                start += size
            check_store_content(store, images, labels)
            store.close()
            with open_store(path) as reopened:
                check_store_content(reopened, images, labels)

    def test_put_returns_consecutive_indices(self, path: Path) -> None:
        images, labels = random_images(5)
        with self.create(path) as store:
            assert [store.put(image, label) for image, label in zip(images, labels, strict=False)] == list(range(5))
            assert store.put_many(images, labels) == range(5, 10)
            check_store_content(store, np.concatenate([images, images]), np.concatenate([labels, labels]))

    def test_put_accepts_python_ints_and_numpy_integers(self, path: Path) -> None:
        images, _ = random_images(3)
        with self.create(path) as store:
            store.put(images[0], 7)
            store.put(images[1], np.uint8(3))
            store.put_many(images[2:], [np.int32(9)])
            assert store.get_many([0, 1, 2])[1].tolist() == [7, 3, 9]

    def test_non_contiguous_and_fortran_input_is_stored_correctly(self, path: Path) -> None:
        images, labels = random_images(12)
        fortran = np.asfortranarray(images)
        strided = np.repeat(images, 2, axis=0)[::2]  # a strided view equal to images
        with self.create(path) as store:
            store.put_many(fortran, labels)
            store.put_many(strided, labels[:12])
            store.put(images[3][:, :, :], labels[3])
            check_store_content(
                store, np.concatenate([images, images[:12], images[3:4]]), np.concatenate([labels, labels, labels[3:4]])
            )

    # ------------------------------------------------------------------ reading

    def test_get_many_in_any_order_with_repeats(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        order = np.random.default_rng(1).permutation(len(images))
        picks = np.concatenate([order[:50], order[:5], [0, 0, len(images) - 1, -1, -300]])
        with open_store(path) as store:
            got_images, got_labels = store.get_many(picks)
            np.testing.assert_array_equal(got_images, images[picks])
            np.testing.assert_array_equal(got_labels, labels[picks])
            got_images, _ = store.get_many(slice(10, 20))
            np.testing.assert_array_equal(got_images, images[10:20])
            got_images, _ = store.get_many(range(250, 10, -7))
            np.testing.assert_array_equal(got_images, images[250:10:-7])

    def test_negative_index_counts_from_end(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        with open_store(path) as store:
            image, label = store.get(-1)
            np.testing.assert_array_equal(image, images[-1])
            assert label == labels[-1]
            np.testing.assert_array_equal(store[-300][0], images[0])

    @pytest.mark.parametrize("bad", [300, -301, 10**12])
    def test_index_out_of_range_raises_index_error(self, filled: tuple[Path, np.ndarray, np.ndarray], bad: int) -> None:
        path, _, _ = filled
        with open_store(path) as store:
            with pytest.raises(IndexError):
                store.get(bad)
            with pytest.raises(IndexError):
                store.get_many([0, bad])
            with pytest.raises(IndexError):
                store.get_many(range(bad, bad + 2) if bad > 0 else range(0, 302))

    def test_returned_arrays_are_owned_writable_contiguous(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, _ = filled
        with open_store(path) as store:
            image, _ = store.get(5)
            batch, labels = store.get_many([9, 3, 4])
            scan, _ = store.get_many(range(0, 100))
            first, _ = next(iter(store))
            chunk, _ = next(store.iter_batches(7))
            for array in (image, batch, labels, scan, first, chunk):
                check_owned_array(array)
            image[:] = 0  # writing to a returned array never reaches the store
            batch[:] = 0
            np.testing.assert_array_equal(store.get(5)[0], images[5])

    def test_iteration_and_batches_cover_everything_in_order(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        with open_store(path) as store:
            items = list(store)
            assert len(items) == len(images)
            np.testing.assert_array_equal(np.stack([image for image, _ in items]), images)
            assert [label for _, label in items] == labels.tolist()
            batches = list(store.iter_batches(64))
            assert [len(b[0]) for b in batches] == [64, 64, 64, 64, 44]
            np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
            np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
            with pytest.raises(ValueError):
                next(store.iter_batches(0))

    def test_empty_store(self, path: Path) -> None:
        with self.create(path, shape=(32, 32, 3)) as store:
            assert len(store) == 0
            assert list(store) == []
            assert list(store.iter_batches(10)) == []
            images, labels = store.get_many([])
            assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
            with pytest.raises(IndexError):
                store.get(0)
        with open_store(path) as reopened:
            assert len(reopened) == 0 and reopened.shape == (32, 32, 3)

    # ------------------------------------------------------------------ persistence and modes

    def test_manifest_describes_the_store(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, _ = filled
        manifest = read_manifest(path)
        assert (path / MANIFEST_NAME).is_file()
        assert manifest.backend == self.backend
        assert manifest.shape == images.shape[1:]
        assert manifest.dtype == "uint8"
        assert manifest.count == len(images)
        assert manifest.format_version == FORMAT_VERSION
        entries = {entry.name for entry in path.iterdir()}
        assert set(manifest.files) <= entries, "the manifest names files the store does not have"
        assert all(manifest.owns(name) for name in entries), "the store holds files its manifest does not name"

    def test_reopen_finds_backend_from_manifest(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        with open_store(path) as store:
            assert store.backend == self.backend and store.mode == "r"
            check_store_content(store, images, labels)

    def test_append_mode_adds_after_existing(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        more, more_labels = random_images(20, seed=5)
        with open_store(path, mode="a") as store:
            assert store.put_many(more, more_labels) == range(300, 320)
        with open_store(path) as store:
            check_store_content(store, np.concatenate([images, more]), np.concatenate([labels, more_labels]))

    def test_append_mode_creates_a_missing_store(self, path: Path) -> None:
        images, labels = random_images(4)
        with open_store(path, self.backend, "a", **self.options) as store:
            store.put_many(images, labels)
        with open_store(path, mode="a") as store:
            store.put_many(images, labels)
            assert len(store) == 8

    def test_write_mode_replaces_an_existing_store(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, _, _ = filled
        images, labels = random_images(3, seed=9)
        with self.create(path) as store:
            assert len(store) == 0
            store.put_many(images, labels)
        with open_store(path) as store:
            check_store_content(store, images, labels)

    def test_read_only_refuses_writes_and_keeps_data(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        with open_store(path, mode="r") as store:
            with pytest.raises(PermissionError):
                store.put(images[0], 1)
            with pytest.raises(imgstore.ReadOnlyError):
                store.put_many(images[:2], labels[:2])
            assert len(store) == len(images)
        with open_store(path) as store:
            check_store_content(store, images, labels)

    def test_closed_store_refuses_use(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, _, _ = filled
        store = open_store(path)
        store.close()
        store.close()  # closing twice is harmless
        with pytest.raises(imgstore.StoreClosedError):
            store.get(0)

    # ------------------------------------------------------------------ invalid input

    def test_invalid_input_raises_and_writes_nothing(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        bad_calls: list[tuple[Any, Any, type[ImgStoreError]]] = [
            (images[:2].astype(np.float32), labels[:2], InvalidImageError),
            (images[:2].astype(bool), labels[:2], InvalidImageError),
            (images[:2].astype(np.int16), labels[:2], InvalidImageError),
            (images[:2, :16], labels[:2], InvalidImageError),
            (images[:2].transpose(0, 3, 1, 2), labels[:2], InvalidImageError),  # CHW given to an HWC store
            (images[0], labels[:1], InvalidImageError),  # one image where a batch is expected
            (images[:2], labels[:3], imgstore.InvalidLabelError),
            (images[:2], [1, -1], imgstore.InvalidLabelError),
            (images[:2], [1, 2**64], imgstore.InvalidLabelError),
            (images[:2], [1.0, 2.0], imgstore.InvalidLabelError),
            (images[:2], [True, False], imgstore.InvalidLabelError),
            (images[:2], np.array([[1, 2]]), imgstore.InvalidLabelError),
        ]
        with open_store(path, mode="a") as store:
            for bad_images, bad_labels, error in bad_calls:
                with pytest.raises(error):
                    store.put_many(bad_images, bad_labels)
                assert issubclass(error, ImgStoreError) and issubclass(error, ValueError)
            with pytest.raises(imgstore.InvalidLabelError):
                store.put(images[0], -3)
            with pytest.raises(imgstore.InvalidLabelError):
                store.put(images[0], 2.5)  # type: ignore[arg-type]
            with pytest.raises(InvalidImageError):
                store.put(images[0].astype(np.float64), 1)
            assert len(store) == len(images)
        with open_store(path) as store:
            check_store_content(store, images, labels)

    def test_unknown_option_is_refused(self, path: Path) -> None:
        with pytest.raises(imgstore.InvalidOptionError, match="no option"):
            open_store(path, self.backend, "w", not_an_option=1)
        assert not (path / MANIFEST_NAME).exists()

    # ------------------------------------------------------------------ processes

    def test_pickled_store_reopens(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        with open_store(path) as store:
            clone = pickle.loads(pickle.dumps(store))
        with clone:
            assert clone.mode == "r"
            check_store_content(clone, images, labels)

    @pytest.mark.parametrize("start_method", ["fork", "spawn"])
    def test_child_process_reads_after_parent_used_store(
        self, filled: tuple[Path, np.ndarray, np.ndarray], start_method: str
    ) -> None:
        path, images, labels = filled
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
            raw, got_labels = queue.get(timeout=60)
            child.join(timeout=60)
            assert child.exitcode == 0
            np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(-1, *images.shape[1:]), images[picks])
            assert got_labels == labels[picks].tolist()
            check_store_content(store, images, labels)  # the parent's handles still work

    def test_get_many_fills_caller_arrays(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, images, labels = filled
        out = (np.zeros((4, *images.shape[1:]), np.uint8), np.zeros(4, np.int64))
        with open_store(path) as store:
            got = store.get_many([5, 1, 9, 1], out=out)
            assert got[0] is out[0] and got[1] is out[1]
            np.testing.assert_array_equal(out[0], images[[5, 1, 9, 1]])
            np.testing.assert_array_equal(out[1], labels[[5, 1, 9, 1]])
            store.get_many(range(4), out=out)
            np.testing.assert_array_equal(out[0], images[:4])
            with pytest.raises(imgstore.InvalidOptionError):
                store.get_many(range(5), out=out)
            with pytest.raises(imgstore.InvalidOptionError):
                store.get_many(range(4), out=(out[0].astype(np.int16), out[1]))

    def test_verify_passes_on_an_intact_store(self, filled: tuple[Path, np.ndarray, np.ndarray]) -> None:
        path, _, _ = filled
        with open_store(path) as store:
            store.verify()
            store.verify(batch_size=7)

    def test_verify_detects_a_flipped_byte_in_any_backend_file(
        self, filled: tuple[Path, np.ndarray, np.ndarray]
    ) -> None:
        """Flip one byte inside the stored pixels of a record: reads may not notice, verify must."""
        path, images, _ = filled
        target = images[123].tobytes()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            data = bytearray(file.read_bytes())
            at = data.find(target[:64])
            if at < 0:
                continue
            data[at + 10] ^= 0xFF
            file.write_bytes(data)
            break
        else:
            pytest.skip("this backend does not keep raw pixels in a file (e.g. compressed): covered by the fuzz tests")
        with open_store(path) as store:
            with pytest.raises(imgstore.CorruptStoreError, match="index 123"):
                store.verify()

    def test_single_puts_use_about_as_much_disk_as_one_batch(self, tmp_path: Path) -> None:
        images, labels = random_images(200)
        with self.create(tmp_path / "batch", sync=False) as store:
            store.put_many(images, labels)
            batch_bytes = store.disk_usage()
        with self.create(tmp_path / "single", sync=False) as store:
            for image, label in zip(images, labels, strict=False):
                store.put(image, label)
            single_bytes = store.disk_usage()
            check_store_content(store, images, labels)
        assert single_bytes < 3 * batch_bytes + (1 << 20), (single_bytes, batch_bytes)
