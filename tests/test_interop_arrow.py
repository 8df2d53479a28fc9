"""The Arrow ecosystem reads an arrow store imgstore wrote: pyarrow (feather, ipc, dataset) and Hugging Face datasets.

What the README promises a user of those tools: the store's folder ``arrow-<gen>/`` holds Arrow IPC
(Feather v2) files ``part-*.arrow`` whose rows, in file-name order, are the records in order, with
columns ``image`` and ``label``; after a killed write, once a writer has opened the store again.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pytest

import imgstore
from imgstore.testing.layouts import image_file

SHAPE = (32, 32, 3)


def parts(store: Path) -> list[str]:
    """The store's fragment files, in order (the names sort as the records do)."""
    return sorted(glob.glob(f"{store}/arrow-*/part-*.arrow"))


def folder(store: Path) -> str:
    (directory,) = glob.glob(f"{store}/arrow-*")
    return directory


def pixels(table: pa.Table) -> np.ndarray:
    """The image column of a raw store as [N, 32, 32, 3] uint8, the pyarrow way."""
    column = table.column("image").combine_chunks()
    return np.asarray(column.flatten().flatten().flatten().to_numpy()).reshape(-1, *SHAPE)


def raw_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 10, n)


def hf_load(store: Path, cache: Path) -> datasets.Dataset:
    # The one line the README gives a Hugging Face user.
    return datasets.load_dataset(
        "arrow", data_files=f"{store}/arrow-*/part-*.arrow", split="train", cache_dir=str(cache)
    )


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_a_raw_store_of_several_commits_reads_in_pyarrow_and_datasets(tmp_path: Path) -> None:
    images, labels = raw_records(300, seed=1)
    store = tmp_path / "cifar"
    with imgstore.open_store(store, "arrow", "w") as s:
        s.put_many(images[:200], labels[:200])
    with imgstore.open_store(store, "arrow", "a") as s:  # appends: new fragment files
        s.put_many(images[200:280], labels[200:280])
        for k in range(280, 300):
            s.put(images[k], int(labels[k]))
    assert len(parts(store)) > 1

    table = pa.concat_tables([feather.read_table(path) for path in parts(store)])
    assert table.column_names == ["image", "label"]
    assert np.array_equal(pixels(table), images) and np.array_equal(table.column("label").to_numpy(), labels)

    with pa.memory_map(parts(store)[0]) as source:  # the IPC file API: random access to record batches
        first = ipc.open_file(source).read_all()
    assert np.array_equal(pixels(first), images[: first.num_rows])

    table = pds.dataset(folder(store), format="ipc").to_table()
    assert np.array_equal(pixels(table), images) and np.array_equal(table.column("label").to_numpy(), labels)

    loaded = hf_load(store, tmp_path / "hf").with_format("numpy")
    assert loaded.num_rows == 300
    assert np.array_equal(loaded["image"][:].astype(np.uint8), images)
    assert np.array_equal(loaded["label"][:], labels)


def test_a_keep_store_holds_the_files_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    blobs = [
        image_file(rng.integers(0, 256, (20 + k, 30 + k, 3), dtype=np.uint8), "JPEG" if k % 2 else "PNG")
        for k in range(40)
    ]
    labels = np.arange(40) % 7
    store = tmp_path / "photos"
    with imgstore.open_store(store, "arrow", "w", codec="keep") as s:
        s.put_encoded_many(blobs[:25], labels[:25])
        s.put_encoded_many(blobs[25:], labels[25:])

    table = pds.dataset(folder(store), format="feather").to_table()
    assert table.column("image").to_pylist() == blobs
    assert table.column("label").to_pylist() == labels.tolist()
    loaded = hf_load(store, tmp_path / "hf")
    assert loaded["image"] == blobs and loaded["label"] == labels.tolist()


KILLED_WRITER = """
import os, signal, sys
import numpy as np
import imgstore, imgstore.fixed
images = np.load(sys.argv[2])
store = imgstore.open_store(sys.argv[1], "arrow", "a")
# The kill comes where it hurts most: every file of the write is in place, the manifest not yet.
imgstore.fixed.write_manifest = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
store.put_many(images, np.arange(len(images)))
"""


@pytest.mark.parametrize("merging", [False, True])
def test_a_killed_write_is_invisible_once_a_writer_opens_the_store(tmp_path: Path, merging: bool) -> None:
    """A write killed before its commit leaves a fragment; imgstore never reads it, a writer's open removes it.

    ``merging``: the killed write was merging the last fragment into its file (which then holds more
    rows than are committed): a writer's open rewrites it to the committed rows.
    """
    images, labels = raw_records(130, seed=3)
    store = tmp_path / "s"
    with imgstore.open_store(store, "arrow", "w") as s:
        s.put_many(images[:100], labels[:100])
        s.put_many(images[100:110], labels[100:110])
    before = parts(store)
    extra = tmp_path / "extra.npy"
    np.save(extra, images[110:] if merging else images[110:115])  # 20 absorb the last 10; 5 do not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(store), str(extra)], env=env)
    assert result.returncode == -signal.SIGKILL
    assert parts(store) != before or merging  # the leftover is there for other tools to see
    if merging:
        assert pa.ipc.open_file(pa.memory_map(parts(store)[-1])).read_all().num_rows == 30

    with imgstore.open_store(store) as s:  # imgstore's readers: the committed records, nothing more
        got, got_labels = s.get_many(range(len(s)))
    assert np.array_equal(got, images[:110]) and np.array_equal(got_labels, labels[:110])

    imgstore.open_store(store, "arrow", "a").close()  # a writer's open tidies the folder
    assert parts(store) == before
    table = pds.dataset(folder(store), format="ipc").to_table()
    assert np.array_equal(pixels(table), images[:110])
    assert np.array_equal(table.column("label").to_numpy(), labels[:110])
