"""Data loaders on files written in the real formats, the safe unpickler, the download, and the synthetic data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.datasets import (
    DATASETS,
    download_cifar10,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    synthetic_cifar10,
)
from imgstore.datasets.fashion_mnist import DEBIAN_ROOT

REAL_CIFAR10_PNG_BYTES = 2273  # mean Pillow-default PNG size of the real CIFAR-10 training images


def planar_batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows as CIFAR-10 stores them (planar R, G, B) and the HWC images they must become."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 1] = (10, 20, 30)  # pixel (row 0, col 1): R=10, G=20, B=30
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    assert rows[0, 1] == 10 and rows[0, 1024 + 1] == 20 and rows[0, 2048 + 1] == 30
    return rows, images, rng.integers(0, 10, n)


def write_python_batches(folder: Path, sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    expected = {}
    for seed, (name, n) in enumerate(sizes.items()):
        rows, images, labels = planar_batch(n, seed)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": rows, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected[name] = (images, labels)
    return expected


def write_binary_batches(folder: Path, sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    expected = {}
    for seed, (name, n) in enumerate(sizes.items()):
        rows, images, labels = planar_batch(n, seed)
        records = np.concatenate([labels.astype(np.uint8)[:, None], rows], axis=1)
        records.tofile(folder / f"{name}.bin")
        expected[name] = (images, labels)
    return expected


TRAIN = {f"data_batch_{i}": 3 + i for i in range(1, 6)}
TEST = {"test_batch": 4}


@pytest.mark.parametrize("version", ["python", "binary"])
def test_cifar10_both_versions_round_trip(tmp_path: Path, version: str) -> None:
    folder = tmp_path / ("cifar-10-batches-py" if version == "python" else "cifar-10-batches-bin")
    write = write_python_batches if version == "python" else write_binary_batches
    expected = write(folder, {**TRAIN, **TEST})
    for root in (tmp_path, folder):
        images, labels = load_cifar10(root, "train")
        assert images.shape == (sum(TRAIN.values()), 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, np.concatenate([expected[k][0] for k in TRAIN]))
        np.testing.assert_array_equal(labels, np.concatenate([expected[k][1] for k in TRAIN]))
        assert tuple(images[0, 0, 1]) == (10, 20, 30)  # planar R, G, B became HWC
        test_images, test_labels = load_cifar10(root, "test")
        np.testing.assert_array_equal(test_images, expected["test_batch"][0])
        np.testing.assert_array_equal(test_labels, expected["test_batch"][1])


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_cifar10_pickle_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, {**TRAIN, **TEST})
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(imgstore.DatasetError, match="refusing to load posix.system"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:-10]),
        lambda p: p.write_bytes(b"not a pickle"),
        lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [1, 2]}, protocol=2)),
        lambda p: p.write_bytes(pickle.dumps([1, 2, 3], protocol=2)),
    ],
)
def test_damaged_cifar10_python_batch_is_a_dataset_error(tmp_path: Path, damage: object) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, {**TRAIN, **TEST})
    damage(folder / "test_batch")  # type: ignore[operator]
    with pytest.raises(imgstore.DatasetError):
        load_cifar10(tmp_path, "test")


def test_damaged_or_missing_cifar10_binary_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    write_binary_batches(folder, {**TRAIN, **TEST})
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(imgstore.DatasetError, match="3 073"):
        load_cifar10(tmp_path, "test")
    (folder / "data_batch_2.bin").unlink()
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path, "train")
    with pytest.raises(imgstore.DatasetNotFoundError, match="download_cifar10"):
        load_cifar10(tmp_path / "nowhere")


# ---------------------------------------------------------------------- download


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving the files in a folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_archive(path: Path, source: Path, extra: dict[str, bytes] | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(tmp_path: Path, serve: tuple[Path, str]) -> None:
    www, base = serve
    expected = write_python_batches(tmp_path / "src" / "cifar-10-batches-py", {**TRAIN, **TEST})
    md5 = make_archive(www / "cifar.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    folder = download_cifar10(tmp_path / "data", url=f"{base}/cifar.tar.gz", md5=md5)
    images, labels = load_cifar10(folder, "test")
    np.testing.assert_array_equal(images, expected["test_batch"][0])
    (www / "cifar.tar.gz").unlink()  # a second call finds the extracted copy and downloads nothing
    assert download_cifar10(tmp_path / "data", url=f"{base}/cifar.tar.gz", md5=md5) == folder


def test_download_refuses_a_wrong_md5_and_leaves_nothing(tmp_path: Path, serve: tuple[Path, str]) -> None:
    www, base = serve
    write_python_batches(tmp_path / "src" / "cifar-10-batches-py", TEST)
    make_archive(www / "cifar.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    with pytest.raises(imgstore.DatasetError, match="md5"):
        download_cifar10(tmp_path / "data", url=f"{base}/cifar.tar.gz", md5="0" * 32)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_refuses_path_traversal(tmp_path: Path, serve: tuple[Path, str]) -> None:
    www, base = serve
    write_python_batches(tmp_path / "src" / "cifar-10-batches-py", TEST)
    md5 = make_archive(www / "evil.tar.gz", tmp_path / "src" / "cifar-10-batches-py", {"../evil": b"owned"})
    with pytest.raises(imgstore.DatasetError, match="refusing"):
        download_cifar10(tmp_path / "data", url=f"{base}/evil.tar.gz", md5=md5)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data" / "evil").exists()
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_download_without_a_server_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(imgstore.DatasetError, match="downloading"):
        download_cifar10(tmp_path, url="http://127.0.0.1:9/none.tar.gz", timeout=5)


# ---------------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_idx_files(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress)
    got_images, got_labels = load_fashion_mnist(tmp_path, "test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    with pytest.raises(imgstore.DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")


def test_fashion_mnist_damaged_header(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), False)
    with pytest.raises(imgstore.DatasetError, match="3 images but 4 labels"):
        load_fashion_mnist(tmp_path, "test")
    data = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data[:-5])
    with pytest.raises(imgstore.DatasetError, match="header says"):
        load_fashion_mnist(tmp_path, "test")


@pytest.mark.skipif(not DEBIAN_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_real_fashion_mnist_from_debian() -> None:
    images, labels = load_fashion_mnist()
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    assert np.bincount(labels).tolist() == [6_000] * 10
    test_images, _ = load_fashion_mnist(split="test")
    assert test_images.shape == (10_000, 28, 28)
    with imgstore.open_store(Path(os.environ.get("TMPDIR", "/tmp")) / f"fmnist-{os.getpid()}", "png", "w") as store:
        store.put_many(images[:100], labels[:100])
        np.testing.assert_array_equal(store.get_many(range(100))[0], images[:100])


# ---------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_prefix_stable() -> None:
    images, labels = synthetic_cifar10(6_000, seed=3)
    again, again_labels = synthetic_cifar10(6_000, seed=3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    prefix, prefix_labels = synthetic_cifar10(1_234, seed=3)
    np.testing.assert_array_equal(prefix, images[:1_234])
    np.testing.assert_array_equal(prefix_labels, labels[:1_234])
    other, _ = synthetic_cifar10(100, seed=4)
    assert not np.array_equal(other, images[:100])
    assert images.dtype == np.uint8 and images.shape == (6_000, 32, 32, 3) and images.flags.c_contiguous


def test_synthetic_png_size_matches_real_cifar10() -> None:
    images, _ = synthetic_cifar10(1_000, seed=0)
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        sizes.append(buffer.tell())
    mean = float(np.mean(sizes))
    print(f"synthetic mean PNG size: {mean:.0f} B (real CIFAR-10: {REAL_CIFAR10_PNG_BYTES} B)")
    assert 0.85 * REAL_CIFAR10_PNG_BYTES <= mean <= 1.15 * REAL_CIFAR10_PNG_BYTES
    noise = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    noise_size = np.mean([len(_png(x)) for x in noise])
    assert noise_size > 1.15 * REAL_CIFAR10_PNG_BYTES  # the bar really excludes uniform noise


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_synthetic_statistics_are_plausible() -> None:
    images, labels = synthetic_cifar10(50_000, seed=0)
    assert np.bincount(labels, minlength=10).tolist() == [5_000] * 10
    assert not np.array_equal(labels[:20], np.arange(20) % 10)  # shuffled
    means, stds = images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))
    assert 60 <= means.mean() <= 190 and stds.mean() > 30
    # Neighbouring pixels correlate as in photos (noise would give ~0).
    dx = np.corrcoef(images[:500, :, :-1].ravel().astype(float), images[:500, :, 1:].ravel().astype(float))[0, 1]
    assert dx > 0.8
    # Labels carry signal: the mean colour differs between classes.
    class_means = np.stack([images[labels == k].mean(axis=(0, 1, 2)) for k in range(10)])
    assert np.ptp(class_means, axis=0).max() > 5


def test_synthetic_images_are_not_near_duplicates() -> None:
    images, _ = synthetic_cifar10(2_000, seed=0)
    small = images.reshape(2_000, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(2_000, -1).astype(np.float32)
    squared = (small**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * small @ small.T
    np.fill_diagonal(distances, np.inf)
    rms = np.sqrt(np.maximum(distances.min(), 0) / small.shape[1])
    assert rms > 5, f"two images differ by only {rms:.1f} grey levels RMS"


def test_load_dataset(tmp_path: Path) -> None:
    assert DATASETS == ("synthetic", "cifar10", "fashion-mnist")
    images, labels = load_dataset("synthetic", 12)
    np.testing.assert_array_equal(images, synthetic_cifar10(12)[0])
    write_binary_batches(tmp_path / "cifar-10-batches-bin", {**TRAIN, **TEST})
    train, train_labels = load_cifar10(tmp_path)
    doubled, doubled_labels = load_dataset("cifar10", 2 * len(train) + 3, root=tmp_path)
    np.testing.assert_array_equal(doubled, np.concatenate([train, train, train[:3]]))
    np.testing.assert_array_equal(doubled_labels, np.concatenate([train_labels, train_labels, train_labels[:3]]))
    few, _ = load_dataset("cifar10", 5, root=tmp_path)
    assert few.shape == (5, 32, 32, 3) and few.base is None
    with pytest.raises(imgstore.DatasetError, match="synthetic, cifar10, fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(imgstore.DatasetNotFoundError, match="root="):
        load_dataset("cifar10")
