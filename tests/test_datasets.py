"""The CIFAR-10 and Fashion-MNIST loaders on files written in the real formats, load_dataset and the registry."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import imgstore.datasets as dataset_module
from imgstore.datasets import (
    DATASETS,
    DatasetSpec,
    available_datasets,
    get_dataset,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    register_dataset,
    synthetic_cifar10,
)
from imgstore.datasets import registry as dataset_registry
from imgstore.datasets.cifar10 import _read_python_batch
from imgstore.datasets.fashion_mnist import DEBIAN_ROOT, read_idx
from imgstore.errors import DatasetError, DatasetNotFoundError

TRAIN = {f"data_batch_{i}": 3 + i for i in range(1, 6)}  # batch name -> images (real files: 10 000 each)
TEST = {"test_batch": 4}

# ---------------------------------------------------------------------- CIFAR-10 files in the real formats


def planar_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows as CIFAR-10 stores them (planar R, G, B), the HWC images they must become, and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 1] = (10, 20, 30)  # row 0, column 1: R=10, G=20, B=30
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, 3072)
    # The known pattern, written out: plane offsets 0 (R), 1024 (G), 2048 (B), pixel index 1.
    assert (rows[0, 1], rows[0, 1024 + 1], rows[0, 2048 + 1]) == (10, 20, 30)
    assert rows[0].sum() == 60
    return rows, images, rng.integers(0, 10, n)


class Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2's cPickle wrote its str (BINSTRING opcodes), as in the real files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def pickle_batch(batch: dict[bytes, object], style: str) -> bytes:
    """Protocol 2 as the real files: ``"py3"`` is what Python 3 writes, ``"py2"`` mimics cPickle + numpy 1.x."""
    if style == "py3":
        return pickle.dumps(batch, protocol=2)
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(batch)
    # numpy 1.x named its module numpy.core; GLOBAL is newline-terminated text, so renaming is safe.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_python_batches(folder: Path, sizes: dict[str, int], style: str = "py3") -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for seed, (name, n) in enumerate(sizes.items()):
        rows, images, labels = planar_batch(n, seed)
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels.tolist(),
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle_batch(batch, style))
        expected[name] = (images, labels)
    return expected


def write_binary_batches(folder: Path, sizes: dict[str, int]) -> dict[str, tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for seed, (name, n) in enumerate(sizes.items()):
        rows, images, labels = planar_batch(n, seed)
        np.concatenate([labels.astype(np.uint8)[:, None], rows], axis=1).tofile(folder / f"{name}.bin")
        expected[name] = (images, labels)
    return expected


@pytest.mark.parametrize("version", ["python-py3", "python-py2", "binary"])
def test_cifar10_round_trip_both_versions_both_roots(tmp_path: Path, version: str) -> None:
    if version == "binary":
        folder = tmp_path / "cifar-10-batches-bin"
        expected = write_binary_batches(folder, {**TRAIN, **TEST})
    else:
        folder = tmp_path / "cifar-10-batches-py"
        expected = write_python_batches(folder, {**TRAIN, **TEST}, style=version.split("-")[1])
    for root in (tmp_path, folder, str(folder)):
        images, labels = load_cifar10(root, "train")
        assert images.shape == (sum(TRAIN.values()), 32, 32, 3)
        assert images.dtype == np.uint8 and images.flags.c_contiguous
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        np.testing.assert_array_equal(images, np.concatenate([expected[k][0] for k in TRAIN]))
        np.testing.assert_array_equal(labels, np.concatenate([expected[k][1] for k in TRAIN]))
        assert tuple(images[0, 0, 1]) == (10, 20, 30)  # planar R, G, B became one HWC pixel
        test_images, test_labels = load_cifar10(root, split="test")
        np.testing.assert_array_equal(test_images, expected["test_batch"][0])
        np.testing.assert_array_equal(test_labels, expected["test_batch"][1])


def test_cifar10_rejects_an_unknown_split(tmp_path: Path) -> None:
    write_binary_batches(tmp_path / "cifar-10-batches-bin", TEST)
    with pytest.raises(DatasetError, match="split"):
        load_cifar10(tmp_path, "validation")


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.code,))


@pytest.mark.parametrize("make", [_System, _Eval], ids=["os.system", "eval"])
def test_cifar10_pickle_cannot_run_code(tmp_path: Path, make: Callable[[str], object]) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, TEST)
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if make is _System else f"open({str(marker)!r}, 'w').close()"
    # The payload sits where the real data would be, so a plain pickle.load would run it.
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": make(command), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a pickle", id="garbage"),
        pytest.param(pickle.dumps([1, 2, 3], protocol=2), id="not-a-dict"),
        pytest.param(pickle.dumps({b"labels": [1]}, protocol=2), id="no-data"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [1, 2]}, 2), id="bad-shape"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, 2), id="bad-dtype"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, 2), id="label-count"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, 2), id="label-10"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, -1]}, 2), id="label-neg"),
        pytest.param(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, 2), id="label-str"),
        pytest.param(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, 2), id="str-keys"),
    ],
)
def test_damaged_cifar10_python_batch_is_a_dataset_error(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, TEST)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DatasetError):
        load_cifar10(tmp_path, "test")


def test_truncated_cifar10_python_batch_is_a_dataset_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, TEST)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:-10])
    with pytest.raises(DatasetError):
        load_cifar10(tmp_path, "test")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_batch_or_a_dataset_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("batch") / "test_batch"
    # With a protocol-2 header too, so that hypothesis explores opcodes rather than the header.
    for payload in (data, b"\x80\x02" + data):
        path.write_bytes(payload)
        try:
            rows, labels = _read_python_batch(path)
        except DatasetError:
            continue
        assert rows.dtype == np.uint8 and rows.shape[1] == 3072 and len(labels) == len(rows)


def test_truncated_or_missing_cifar10_binary_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_binary_batches(folder, {**TRAIN, **TEST})
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DatasetError, match="3 073"):
        load_cifar10(tmp_path, "test")
    (folder / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DatasetError):
        load_cifar10(tmp_path, "test")
    records = np.zeros((2, 3073), np.uint8)
    records[1, 0] = 10  # label 10 does not exist
    records.tofile(folder / "test_batch.bin")
    with pytest.raises(DatasetError, match="0-9"):
        load_cifar10(tmp_path, "test")
    (folder / "data_batch_2.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):
        load_cifar10(tmp_path, "train")


def test_missing_cifar10_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="download_cifar10"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # what callers that know nothing of imgstore catch
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_fashion_mnist_idx_files(tmp_path: Path, compress: bool, split: str, prefix: str) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
    write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, compress)
    got_images, got_labels = load_fashion_mnist(tmp_path, split)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_images.flags.writeable and got_labels.dtype == np.int64
    other = "test" if split == "train" else "train"
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, other)


def test_fashion_mnist_damaged_files(tmp_path: Path) -> None:
    images = tmp_path / "t10k-images-idx3-ubyte"
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(images, np.zeros((3, 28, 28)))
    write_idx(labels, np.zeros(4))
    with pytest.raises(DatasetError, match="3 images but 4 labels"):
        load_fashion_mnist(tmp_path, "test")
    write_idx(labels, np.full(3, 10))
    with pytest.raises(DatasetError, match="0-9"):
        load_fashion_mnist(tmp_path, "test")
    write_idx(labels, np.zeros(3))
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="header says"):
        load_fashion_mnist(tmp_path, "test")
    images.write_bytes(b"\x00\x00\x09\x03" + bytes(12 + 3 * 784))  # 0x09: signed bytes, not this format
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_fashion_mnist(tmp_path, "test")
    write_idx(images, np.zeros((3, 28)))  # 2-D where 3-D is due
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_fashion_mnist(tmp_path, "test")
    write_idx(images, np.zeros((3, 32, 32)))
    with pytest.raises(DatasetError, match="28x28"):
        load_fashion_mnist(tmp_path, "test")
    images.unlink()
    gz = write_idx(images, np.zeros((3, 28, 28)), compress=True)
    gz.write_bytes(gz.read_bytes()[:-12])  # a truncated download
    with pytest.raises(DatasetError, match="decompressed"):
        load_fashion_mnist(tmp_path, "test")
    gz.write_bytes(b"\x1f\x8b" + bytes(40))
    with pytest.raises(DatasetError):
        load_fashion_mnist(tmp_path, "test")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 3))
def test_read_idx_gives_data_or_a_dataset_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, ndim: int
) -> None:
    path = tmp_path_factory.mktemp("idx") / "f-idx-ubyte"
    # Half the examples start with a valid magic, so that headers and sizes get explored too.
    for payload in (data, bytes([0, 0, 8, ndim]) + data):
        path.write_bytes(payload)
        try:
            array = read_idx(path, ndim)
        except DatasetError:
            continue
        assert array.ndim == ndim and array.dtype == np.uint8 and array.size == len(payload) - 4 - 4 * ndim


@pytest.mark.skipif(
    not DEBIAN_ROOT.is_dir(), reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_ROOT}); CI installs it"
)
def test_real_fashion_mnist_from_debian() -> None:
    images, labels = load_fashion_mnist()
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6_000] * 10
    assert 60 < images.mean() < 90  # real clothing on black: about 72.9
    test_images, test_labels = load_fashion_mnist(split="test")
    assert test_images.shape == (10_000, 28, 28) and np.bincount(test_labels).tolist() == [1_000] * 10


# ---------------------------------------------------------------------- load_dataset


def test_load_dataset_synthetic() -> None:
    assert available_datasets()[:3] == ["synthetic", "cifar10", "fashion-mnist"]
    assert DATASETS == tuple(available_datasets())  # the old constant, now read from the registry
    images, labels = load_dataset("synthetic", 12, seed=2)
    expected_images, expected_labels = synthetic_cifar10(12, seed=2)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    test_images, _ = load_dataset("synthetic", 12, seed=2, split="test")
    assert not np.array_equal(test_images, images)
    assert load_dataset("synthetic", 0)[0].shape == (0, 32, 32, 3)


def test_load_dataset_cifar10_prefix_and_tiling(tmp_path: Path) -> None:
    write_binary_batches(tmp_path / "cifar-10-batches-bin", {**TRAIN, **TEST})
    train, train_labels = load_cifar10(tmp_path)
    images, labels = load_dataset("cifar10", root=tmp_path)
    np.testing.assert_array_equal(images, train)
    few, few_labels = load_dataset("cifar10", 5, root=tmp_path)
    np.testing.assert_array_equal(few, train[:5])
    np.testing.assert_array_equal(few_labels, train_labels[:5])
    assert few.base is None  # a copy, not a view keeping the whole dataset alive
    # Past the end, the dataset repeats in order (the tutorial doubled CIFAR-10's 50 000 to 100 000).
    n = 2 * len(train) + 3
    tiled, tiled_labels = load_dataset("cifar10", n, root=tmp_path)
    np.testing.assert_array_equal(tiled, np.concatenate([train, train, train[:3]]))
    np.testing.assert_array_equal(tiled_labels, np.concatenate([train_labels, train_labels, train_labels[:3]]))
    assert tiled.flags.c_contiguous and tiled_labels.dtype == np.int64
    test_images, _ = load_dataset("cifar10", root=tmp_path, split="test")
    assert len(test_images) == TEST["test_batch"]


def test_load_dataset_fashion_mnist_with_root(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([3, 4]), compress=True)
    got, labels = load_dataset("fashion-mnist", 5, root=tmp_path)
    np.testing.assert_array_equal(got, images[[0, 1, 0, 1, 0]])
    np.testing.assert_array_equal(labels, [3, 4, 3, 4, 3])


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="synthetic, cifar10, fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(DatasetNotFoundError, match="download_cifar10"):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", root=tmp_path)
    for bad in (-1, 2.5, True):
        with pytest.raises(DatasetError, match="n must be"):
            load_dataset("synthetic", bad)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="split"):
        load_dataset("synthetic", 10, split="val")


# ---------------------------------------------------------------------- the registry


def test_builtin_specs_say_what_they_need() -> None:
    for name in available_datasets():
        spec = get_dataset(name)
        assert isinstance(spec, DatasetSpec) and spec.name == name and spec.description
        assert spec.install_hint or not spec.needs_root
    assert get_dataset("cifar10").needs_root and not get_dataset("synthetic").needs_root
    assert not get_dataset("fashion-mnist").needs_root  # Debian's files by default
    with pytest.raises(DatasetNotFoundError, match="download_cifar10"):
        load_dataset("cifar10")  # the spec's install_hint


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(dataset_registry._registry)
    yield
    dataset_registry._registry.clear()
    dataset_registry._registry.update(saved)


def test_register_dataset_is_one_call(restore_registry: None, tmp_path: Path) -> None:
    calls: list[tuple[int | None, Path | None, int, str]] = []

    def loader(n: int | None, *, root: Path | None, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        calls.append((n, root, seed, split))
        return np.full((3, 8, 8), seed, np.uint8), np.arange(3, dtype=np.int64)  # a whole split, whatever n is

    spec = register_dataset("tiny", loader, needs_root=True, install_hint="make tiny", description="three images")
    assert spec == get_dataset("tiny") and available_datasets()[-1] == "tiny"
    assert "tiny" in dataset_module.DATASETS  # read when asked
    images, labels = load_dataset("tiny", 5, str(tmp_path), seed=7, split="test")  # root positional, as a str
    assert calls == [(5, tmp_path, 7, "test")]
    assert images.shape == (5, 8, 8) and labels.tolist() == [0, 1, 2, 0, 1]  # repeated past the end, like the others
    with pytest.raises(DatasetNotFoundError, match="make tiny"):
        load_dataset("tiny", 2)
    with pytest.raises(DatasetError, match="registered already"):
        register_dataset("tiny", loader)
    register_dataset("tiny", synthetic_loader_for_test, clobber=True)
    assert load_dataset("tiny", 2)[0].shape == (2, 32, 32, 3)
    for bad_name, bad_loader in (("", loader), ("x", None)):
        with pytest.raises(DatasetError, match="register_dataset needs"):
            register_dataset(bad_name, bad_loader)  # type: ignore[arg-type]


def synthetic_loader_for_test(
    n: int | None, *, root: Path | None, seed: int, split: str
) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_cifar10(n or 1, seed, split=split)
