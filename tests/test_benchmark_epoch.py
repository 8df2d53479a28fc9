"""The epoch benchmark's parts, real and small: its check on real DataLoaders, page-cache eviction, the default run."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from benchmarks.epoch import DECODE_SIZE, EpochCheck, epoch_source, keep, run_epoch  # noqa: E402
from benchmarks.loaders.imgstore_rows import imgstore_loader  # noqa: E402
from benchmarks.loaders.limit import LimitLoader, _Gather  # noqa: E402
from benchmarks.pagecache import StillCachedError, files_under, make_cold, resident_bytes  # noqa: E402
from imgstore.testing import random_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 300  # two batches of 256, the second short


@pytest.fixture(scope="module")
def source() -> object:
    images, labels = random_images(N, (6, 6, 3), seed=5)
    return epoch_source("synthetic", images, labels)


def _epoch(loader: object) -> list:
    return [(images.clone(), labels.clone()) for images, labels in loader]  # type: ignore[attr-defined]


def _kept(batches: list) -> list:
    return [keep(images, labels) for images, labels in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_limit_and_imgstore_rows_deliver_an_exact_epoch(source: object, tmp_path: Path, workers: int) -> None:
    check = EpochCheck(source)  # type: ignore[arg-type]
    for cls in (LimitLoader, imgstore_loader("lmdb")):
        row = cls()
        row.build(source, tmp_path / cls.name)  # type: ignore[arg-type]
        loader = row.loader(batch_size=256, num_workers=workers, seed=0)
        first: list = []
        second: list = []
        run_epoch(loader, first, [], [])  # the timed body: keeps copies, drops the batches
        run_epoch(loader, second, [], [])
        assert check.problems(first) is None and check.problems(second) is None, cls.name
        assert not torch.equal(first[0].labels, second[0].labels)  # each iter() is a new shuffle
        row.close()


def test_the_check_catches_a_dropped_or_repeated_record(source: object, tmp_path: Path) -> None:
    check = EpochCheck(source)  # type: ignore[arg-type]
    row = LimitLoader()
    row.build(source, tmp_path)  # type: ignore[arg-type]
    batches = _epoch(row.loader(batch_size=256, num_workers=0, seed=0))
    images, labels = batches[-1]
    dropped = [*batches[:-1], (images[1:], labels[1:])]
    assert "299 records delivered of 300, 0 repeated, 1 missing" in str(check.problems(_kept(dropped)))
    repeated = [*batches[:-1], (torch.cat([images[:1], images[:-1]]), torch.cat([labels[:1], labels[:-1]]))]
    assert "300 records delivered of 300, 1 repeated, 1 missing" in str(check.problems(_kept(repeated)))
    relabelled = [*batches[:-1], (images, (labels + 1) % 10)]
    assert "not an exact epoch" in str(check.problems(_kept(relabelled)))
    assert "not uint8" in str(check.problems(_kept([(images.float(), labels)])))
    # a real DataLoader that samples with replacement: a streaming loader's inexact epoch
    sampled = DataLoader(
        _Gather(tmp_path, None),
        batch_size=None,
        sampler=torch.utils.data.BatchSampler(RandomSampler(range(N), replacement=True), 256, drop_last=False),
    )
    assert "repeated" in str(check.problems(_kept(_epoch(sampled))))


def test_decoded_files_carry_their_index_and_are_checked(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(40):  # distinct flat colours: a swapped image is far from its file's decode
        out = io.BytesIO()
        Image.fromarray(np.full((48, 40, 3), (i * 6, 255 - i * 6, int(rng.integers(256))), np.uint8)).save(out, "JPEG")
        files.append(out.getvalue())
    source = epoch_source("imagenet-like", files, np.zeros(40, np.int64))
    assert source.size == DECODE_SIZE and list(source.labels) == list(range(40))
    check = EpochCheck(source)
    row = LimitLoader()
    row.build(source, tmp_path)
    batches = _epoch(row.loader(batch_size=16, num_workers=2, seed=0))
    assert check.problems(_kept(batches)) is None
    assert tuple(batches[0][0].shape[1:]) == (*DECODE_SIZE, 3)
    images, labels = batches[0]
    assert "missing" in str(check.problems(_kept([(images[1:], labels[1:]), *batches[1:]])))
    swapped = [(images.flip(0), labels)] * 8  # every sampled image is another file's
    assert "is not the decode of file" in str(
        check.problems(_kept(swapped[:1] + batches[1:])) or check.problems(_kept(swapped))
    )


def test_the_downscaled_row_holds_jpegs_at_the_decode_size_and_passes_the_check(tmp_path: Path) -> None:
    from benchmarks.loaders.imgstore_rows import loader_for_name
    from imgstore import open_store
    from imgstore.codecs import probe
    from imgstore.datasets import load_dataset

    files, _ = load_dataset("imagenet-like", 24)
    source = epoch_source("imagenet-like", files, np.zeros(24, np.int64))
    row = loader_for_name("imgstore-lmdb-downscaled")()
    assert row.name == "imgstore-lmdb-downscaled" and row.backend == "lmdb"
    row.build(source, tmp_path)
    with open_store(tmp_path / "store") as store:
        assert store.codec == "jpeg" and store.codec_params["quality"] == 90 and len(store) == 24
        shapes = [store.get(i)[0].shape for i in range(24)]
    originals = [probe(data) for data in files]
    assert [min(shape[:2]) for shape in shapes] == [min(i.height, i.width, *DECODE_SIZE) for i in originals]
    assert max(min(i.height, i.width) for i in originals) > min(DECODE_SIZE)  # some were made smaller
    assert sum(path.stat().st_size for path in row.files()) < sum(map(len, files)) / 2
    batches = _epoch(row.loader(batch_size=8, num_workers=2, seed=0))
    assert EpochCheck(source).problems(_kept(batches)) is None
    row.close()
    with pytest.raises(ValueError, match="no imgstore epoch row"):
        loader_for_name("imgstore-lmdb-sideways")


def test_eviction_leaves_the_page_cache_and_the_data(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    data = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(data)  # dirty pages: make_cold writes them back first
    path.read_bytes()
    assert resident_bytes(path) > 0
    assert make_cold([path]) == len(data)
    assert resident_bytes(path) == 0
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert resident_bytes(path) == len(data)


def test_eviction_reports_pages_a_process_maps(tmp_path: Path) -> None:
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"x" * (1 << 20))
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        mapped[:]  # touched: the kernel keeps the pages
        with pytest.raises(StillCachedError, match="mapped.bin"):
            make_cold([path])
    make_cold([path])


def test_a_store_evicted_reads_back_the_same(source: object, tmp_path: Path) -> None:
    row = imgstore_loader("hdf5")()
    row.build(source, tmp_path)  # type: ignore[arg-type]
    assert files_under(tmp_path) and make_cold(row.files()) > 0
    assert all(resident_bytes(path) == 0 for path in row.files())
    assert EpochCheck(source).problems(_kept(_epoch(row.loader(batch_size=256, num_workers=0, seed=1)))) is None  # type: ignore[arg-type]


def _collected(*options: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_epoch.py", "--benchmark-only", "--collect-only", "-q",
         "-p", "no:cacheprovider", *options],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines() if line.startswith("benchmarks/")]


def test_the_default_run_measures_a_small_warm_slice() -> None:
    from benchmarks.loaders import PEERS

    ids = _collected()
    expected = {
        f"{name}-epoch-w{w}-10000-synthetic"
        for name in ("limit", "imgstore-lmdb", "imgstore-hdf5", *PEERS)
        for w in (0, 2)
    }
    assert set(ids) == expected
    cold = _collected("--ops=epoch", "--cache=both", "--cutoffs=1000", "--dataset=synthetic", "--backends=lmdb")
    assert {
        "limit-epoch-w2-1000-synthetic-cold",
        "imgstore-lmdb-epoch-w0-1000-synthetic",
        "imgstore-lmdb-epoch-w2-1000-synthetic-cold",
    } <= set(cold)
    assert len(cold) == 2 * 2 * (2 + len(PEERS))


def test_without_torch_the_suite_runs_and_the_epoch_rows_say_why_they_skip(tmp_path: Path) -> None:
    # The README's `pip install -e ".[bench]"` brings no torch (a plain "torch" is several GB of CUDA here).
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ModuleNotFoundError("No module named torch", name="torch")\n')
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10", "--ops=epoch,read_many", "-q"]
    command += ["-p", "no:cacheprovider", "-rs", "--backends=lmdb"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the epoch rows need PyTorch" in result.stdout
    assert " passed" in result.stdout  # the other operations ran
