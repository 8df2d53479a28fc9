"""The tar backend's shards read by their own ecosystem: ``webdataset.WebDataset`` and GNU ``tar -t``.

Every shard is a WebDataset shard at every moment: the committed records as whole samples (image
and ``.cls`` label under one key), in index order; a writer killed at any write of an append
leaves shards that ``tar`` lists without complaint and webdataset reads to the end.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.backends import tar_format
from imgstore.datasets import synthetic_cifar10

wds = pytest.importorskip("webdataset")  # the [test] extra has it; the backend itself does not need it
TAR = shutil.which("tar")
PAGE = 4096


def shards(store: Path) -> list[str]:
    """The store's shards, as a WebDataset user lists them (``.tmp`` files of a write in progress excluded)."""
    return sorted(str(p) for p in store.glob("tar-*/shard-*.tar"))


def samples(store: Path) -> list[dict[str, Any]]:
    """Every sample webdataset reads from the store's shards, undecoded (bytes), in shard order."""
    return list(wds.WebDataset(shards(store), shardshuffle=False, empty_check=False))


def tar_members(shard: str) -> list[str]:
    assert TAR is not None
    listed = subprocess.run([TAR, "-tf", shard], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and not listed.stderr, (listed.returncode, listed.stderr)
    return listed.stdout.split()


def check_raw_samples(got: list[dict[str, Any]], images: np.ndarray, labels: np.ndarray) -> None:
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(len(images))]
    for k, sample in enumerate(got):
        array = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)  # a plain .npy file, no pickle
        assert array.dtype == np.uint8 and np.array_equal(array, images[k]), k
        assert int(sample["cls"]) == labels[k], k


@pytest.mark.skipif(TAR is None, reason="needs the tar program")
def test_webdataset_and_tar_read_an_appended_raw_store(tmp_path: Path) -> None:
    images, labels = synthetic_cifar10(300, seed=1)
    path = tmp_path / "cifar"
    # Small shards: the commits append to a shard in place, fill it and start new ones.
    with imgstore.open_store(path, "tar", "w", shard_bytes=400_000) as store:
        store.put_many(images[:120], labels[:120])
        for i in range(120, 125):
            store.put(images[i], int(labels[i]))
        store.put_many(images[125:], labels[125:])
    assert len(shards(path)) >= 3
    check_raw_samples(samples(path), images, labels)
    # webdataset's own decoding: .npy to an array, .cls to an int.
    decoded = list(wds.WebDataset(shards(path), shardshuffle=False).decode().to_tuple("npy", "cls"))
    assert len(decoded) == 300
    assert all(np.array_equal(a, images[k]) and c == labels[k] for k, (a, c) in enumerate(decoded))
    members = [name for shard in shards(path) for name in tar_members(shard)]
    assert members == [f"{i:09d}{ext}" for i in range(300) for ext in (".npy", ".cls")]


def _file(rng: np.random.Generator, format: str) -> bytes:
    buffer = io.BytesIO()
    size = (int(rng.integers(8, 80)), int(rng.integers(8, 80)))
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format)
    return buffer.getvalue()


@pytest.mark.skipif(TAR is None, reason="needs the tar program")
def test_webdataset_reads_the_files_of_a_keep_store_as_they_were_put(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    files = [_file(rng, "JPEG" if k % 3 else "PNG") for k in range(60)]
    labels = rng.integers(0, 1000, 60)
    path = tmp_path / "photos"
    with imgstore.open_store(path, "tar", "w", codec="keep", shard_bytes=100_000) as store:
        store.put_encoded_many(files[:40], labels[:40])
        store.put_encoded_many(files[40:], labels[40:])
    got = samples(path)
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(60)]
    for k, sample in enumerate(got):
        ext = "png" if k % 3 == 0 else "jpg"
        assert sample[ext] == files[k] and int(sample["cls"]) == labels[k], k
    decoded = list(wds.WebDataset(shards(path), shardshuffle=False).decode("rgb8").to_tuple("jpg;png", "cls"))
    assert [c for _, c in decoded] == labels.tolist()
    with Image.open(io.BytesIO(files[1])) as first:
        assert np.array_equal(decoded[1][0], np.asarray(first.convert("RGB")))
    for shard in shards(path):
        assert all(name.endswith((".jpg", ".png", ".cls")) for name in tar_members(shard))


def _killed_writer(path: str, images: np.ndarray, labels: np.ndarray, kill_at: int) -> None:
    """Append; SIGKILL this process in its ``kill_at``-th ``os.pwrite`` (its first pages written) or ``os.replace``."""
    calls = 0
    pwrite, replace = os.pwrite, os.replace

    def dying_pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == kill_at:  # a kill lands in a big write between two pages: the kernel wrote the first ones
            cut = (offset + len(data) // 2) // PAGE * PAGE - offset
            if cut > 0:
                pwrite(fd, bytes(data)[:cut], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        return pwrite(fd, data, offset)

    def dying_replace(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(*args)

    os.pwrite, os.replace = dying_pwrite, dying_replace  # type: ignore[assignment]
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images, labels)
    os._exit(3)  # the write finished: no call left to kill at


@pytest.mark.skipif(TAR is None, reason="needs the tar program")
def test_a_killed_append_never_leaves_a_shard_tar_or_webdataset_cannot_read(tmp_path: Path) -> None:
    """Killed before each write of an append: the shards stay readable; leftovers past the commit are whole samples."""
    images, labels = synthetic_cifar10(200, seed=3)
    base = tmp_path / "base"
    with imgstore.open_store(base, "tar", "w", shard_bytes=300_000) as store:
        store.put_many(images[:50], labels[:50])  # the last shard has room: the append goes in place, then on
    context = multiprocessing.get_context("fork")
    outcomes = set()
    for kill_at in range(1, 40):
        path = tmp_path / f"kill{kill_at}"
        shutil.copytree(base, path)
        writer = context.Process(target=_killed_writer, args=(str(path), images[50:], labels[50:], kill_at))
        writer.start()
        writer.join(60)
        if writer.exitcode == 3:
            break  # every write of the append has been killed once
        assert writer.exitcode == -signal.SIGKILL
        for shard in shards(path):
            tar_members(shard)  # exit 0, nothing on stderr
        got = samples(path)  # webdataset reads every shard to its end
        with imgstore.open_store(path) as store:
            committed = len(store)
        assert committed in (50, 200) and len(got) >= committed
        # What webdataset sees past the commit is whole records of the killed write, never garbage.
        check_raw_samples(got, images[: len(got)], labels[: len(got)])
        outcomes.add((committed, len(got)))
        with imgstore.open_store(path, mode="a") as store:  # the next write cuts the leftovers off
            store.put_many(images[committed : committed + 10], labels[committed : committed + 10])
        check_raw_samples(samples(path), images[: committed + 10], labels[: committed + 10])
    else:
        pytest.fail("the append never finished")
    assert kill_at > 4, "the append made too few writes to test"
    assert (50, 50) in outcomes  # killed before the records became visible to tar


@pytest.mark.parametrize("text", [b"x", b"-"])
def test_a_damaged_label_text_is_a_corrupt_store_on_every_read(tmp_path: Path, text: bytes) -> None:
    """What webdataset reads as the label (``KEY.cls``) is what a get parses: damage there is CorruptStoreError."""
    images, labels = synthetic_cifar10(3, seed=2)
    with imgstore.open_store(tmp_path / "s", "tar", "w") as store:
        store.put_many(images, labels)
    entry = np.fromfile(next((tmp_path / "s").glob("tarindex-*.bin")), dtype=tar_format.ENTRY)[1]
    end = int(tar_format.label_ends(*(np.array([entry[k]], np.int64) for k in ("offset", "length", "label_len")))[0])
    at = end - int(entry["label_len"])  # record 1's label text, as webdataset reads it (KEY.cls)
    shard = Path(shards(tmp_path / "s")[0])
    data = shard.read_bytes()
    assert int(data[at:end]) == labels[1] == int(samples(tmp_path / "s")[1]["cls"])
    shard.write_bytes(data[:at] + text * (end - at) + data[end:])
    for verify in (True, False):
        with imgstore.open_store(tmp_path / "s", verify_reads=verify) as store:
            assert store.get(0)[1] == labels[0]
            with pytest.raises(imgstore.CorruptStoreError):
                store.get(1)
            with pytest.raises(imgstore.CorruptStoreError):
                store.get_many([1, 0])
