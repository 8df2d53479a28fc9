"""Building a sharded dataset from an ImageFolder: `convert --shards`, locally and on a real Dask LocalCluster."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.cli import main
from imgstore.sharded import open_sharded
from imgstore.sharded.building import convert_sharded


def _folder(root: Path, n: int = 12) -> list[np.ndarray]:
    """``n`` PNGs in two classes, in ImageFolder order; returns their pixels in that order."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        path = root / ("a" if i < n // 2 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        images.append(image)
    return images


def _check(dest: Path, images: list[np.ndarray], shards: int, seed: int | None = 0) -> None:
    """The dataset holds ``images`` (labelled as _folder does), in the order of the build's shuffle with
    ``seed`` (None: the folder's order)."""
    n = len(images)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    with open_sharded(dest) as data:
        assert len(data) == n and len(data.shards) == shards
        got, labels = data.get_many(range(n))
        assert np.array_equal(got, np.stack(images)[order])
        assert labels.tolist() == [int(k >= n // 2) for k in order.tolist()]
        data.verify()


def test_convert_shards_locally_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = _folder(tmp_path / "src")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "ds"), "--backend", "lmdb", "--shards", "5"]
    assert main(argv) == 0
    assert "converted 12 images into 5 lmdb shards" in capsys.readouterr().out
    _check(tmp_path / "ds", images, 5)
    assert main(argv) == 2  # a dataset is there already: refused, not appended to
    with pytest.raises(imgstore.InvalidOptionError):
        convert_sharded(tmp_path / "src", tmp_path / "other", shards=13)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--backend", "lmdb", "--engine", "dask"]) == 2


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dask_worker_killed_mid_task_has_its_shard_rewritten(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    images = _folder(tmp_path / "src")
    # The last file's opening waits, in the workers, until the test lets it (a FIFO would be a bad file): an audit
    # hook installed in each worker process stalls the real task there, mid-way through its shard.
    blocker, release = str(tmp_path / "src" / "b" / "11.png"), str(tmp_path / "release")

    def install() -> None:
        import sys

        def hook(event: str, args: tuple[object, ...]) -> None:
            if event == "open" and args and str(args[0]) == blocker:
                while not os.path.exists(release):
                    time.sleep(0.05)

        sys.addaudithook(hook)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            client.run(install)
            outcome: list[object] = []

            def run() -> None:
                try:
                    address = cluster.scheduler_address
                    outcome.append(
                        convert_sharded(tmp_path / "src", tmp_path / "ds", shards=3, scheduler=address, engine="dask")
                    )
                except BaseException as exc:  # reported by the assertion below
                    outcome.append(exc)

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 60
            while True:  # until the two other shards are done and only the blocked task runs
                busy = {w: keys for w, keys in client.processing().items() if keys}
                done = list((tmp_path / "ds" / "shards").glob("shard-*"))
                if len(done) == 2 and sum(map(len, busy.values())) == 1:
                    break
                assert time.monotonic() < deadline, "the conversion did not reach the blocked task"
                time.sleep(0.2)
            (address,) = busy
            pid = client.run(os.getpid, workers=[address])[address]  # on its event loop: the task blocks a thread
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                assert time.monotonic() < deadline + 30, "the killed worker did not exit"
                time.sleep(0.05)
            Path(release).touch()  # the task runs again elsewhere and reads the file
            thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], imgstore.sharded.DatasetManifest), outcome
    _check(tmp_path / "ds", images, 3)
    # The killed task's unsealed staging directory is left, never named by the manifest.
    assert len(list((tmp_path / "ds" / "shards").glob(".shard-*.tmp"))) == 1


def test_convert_shards_honours_codec_and_shape_and_batches_into_tensors(tmp_path: Path) -> None:
    """--codec raw --shape: shards of one shape (memmap takes them), batched by ShardedIterable as they are."""
    torch = pytest.importorskip("torch")
    from imgstore.sharded.torch import ShardedIterable

    images = _folder(tmp_path / "src")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "ds"), "--backend", "memmap", "--shards", "3"]
    assert main([*argv, "--codec", "raw", "--shape", "6x5x3"]) == 0
    with open_sharded(tmp_path / "ds") as data:
        assert {(s.codec, s.shape) for s in data.shards} == {("raw", (6, 5, 3))}
    _check(tmp_path / "ds", images, 3)
    it = ShardedIterable(tmp_path / "ds", batch_size=5, shuffle=False)
    batches = list(torch.utils.data.DataLoader(it, batch_size=None, num_workers=2))
    got = torch.cat([b[0] for b in batches]).numpy()
    assert got.shape == (12, 6, 5, 3) and sorted(map(bytes, got)) == sorted(map(bytes, images))
    # a file of another shape is a bad file: nothing committed, and the message names it
    assert main([*argv[:3], str(tmp_path / "other"), *argv[4:], "--codec", "raw", "--shape", "5x5x3"]) != 0
    assert not (tmp_path / "other" / "imgstore-sharded.json").exists()
    assert main([*argv[:3], str(tmp_path / "x"), *argv[4:], "--resume"]) == 2
    assert main([*argv[:3], str(tmp_path / "x"), *argv[4:], "--overwrite"]) == 2


def test_a_kept_folder_batches_with_size_through_a_dataloader(tmp_path: Path) -> None:
    """The default codec keeps the files (of any shape): size=(h, w) resizes them into one batch tensor."""
    torch = pytest.importorskip("torch")
    from imgstore.sharded.torch import ShardedIterable

    rng = np.random.default_rng(1)
    for i in range(10):
        path = tmp_path / "src" / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8)).save(path)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ds"), "--backend", "tar", "--shards", "2"]) == 0
    with pytest.raises(imgstore.InvalidOptionError, match="size="):
        next(iter(ShardedIterable(tmp_path / "ds", batch_size=4)))
    it = ShardedIterable(tmp_path / "ds", batch_size=4, size=(8, 9), layout="chw")
    batches = list(torch.utils.data.DataLoader(it, batch_size=None, num_workers=2))
    assert {tuple(b[0].shape[1:]) for b in batches} == {(3, 8, 9)}
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 5 + [1] * 5
    with pytest.raises(imgstore.InvalidOptionError):
        ShardedIterable(tmp_path / "ds", batch_size=4, size=(0, 9))


def test_convert_shards_from_a_dataset_and_not_from_a_store(tmp_path: Path) -> None:
    manifest = convert_sharded("synthetic:300", tmp_path / "ds", shards=4, backend="hdf5")
    assert [s.count for s in manifest.shards] == [75] * 4
    assert {(s.codec, s.shape) for s in manifest.shards} == {("raw", (32, 32, 3))}
    with imgstore.open_store(tmp_path / "one", "lmdb", "w") as store:
        store.put_many(*imgstore.testing.random_images(10, (4, 4, 3)))
    with pytest.raises(imgstore.ImgStoreError, match="not split into shards"):
        convert_sharded(tmp_path / "one", tmp_path / "ds2", shards=2)


def test_info_and_verify_take_a_sharded_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    convert_sharded("synthetic:100", tmp_path / "ds", shards=3, backend="lmdb")
    assert main(["info", str(tmp_path / "ds"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["shards"], info["backends"], info["shape"]) == (100, 3, ["lmdb"], [32, 32, 3])
    assert main(["info", str(tmp_path / "ds")]) == 0 and "sharded" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "ds"), "--decode"]) == 0
    assert capsys.readouterr().out.startswith("ok: 100 images in 3 shards")
    victim = sorted((tmp_path / "ds" / "shards").glob("shard-*/lmdb-*/data.mdb"))[1]
    victim.chmod(0o644)
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert main(["verify", str(tmp_path / "ds")]) == 1
    assert victim.parent.parent.name in capsys.readouterr().err


def test_a_failed_build_leaves_no_shard_and_dest_must_be_new_or_a_builds(tmp_path: Path) -> None:
    images = _folder(tmp_path / "src", 40)
    (tmp_path / "src" / "a" / "00x.png").write_text("not an image")  # in the first shard
    (tmp_path / "src" / "b" / "39x.png").write_text("not an image")  # in the last
    for _run in range(2):  # the second into the failed build's folder
        with pytest.raises(imgstore.ImgStoreError, match="00x.png"):
            convert_sharded(tmp_path / "src", tmp_path / "ds", shards=8, backend="lmdb", workers=2)
        assert sorted(os.listdir(tmp_path / "ds" / "shards")) == []  # the shards it sealed are gone too
    (tmp_path / "src" / "a" / "00x.png").unlink()
    (tmp_path / "src" / "b" / "39x.png").unlink()
    convert_sharded(tmp_path / "src", tmp_path / "ds", shards=8, backend="lmdb")
    _check(tmp_path / "ds", images, 8)
    # Not a new folder nor a build's: refused, and left as it was.
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with imgstore.open_store(tmp_path / "store", "lmdb", "w") as store:
        store.put_many(*imgstore.testing.random_images(3, (4, 4, 3)))
    for dest in ("file", "folder", "store"):
        before = sorted(p.name for p in (tmp_path / dest).iterdir()) if dest != "file" else None
        with pytest.raises(imgstore.StoreExistsError):
            convert_sharded(tmp_path / "src", tmp_path / dest, shards=2, backend="lmdb")
        assert (sorted(p.name for p in (tmp_path / dest).iterdir()) if dest != "file" else None) == before
    assert (tmp_path / "file").read_text() == "mine"


def test_verify_names_a_missing_shard_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    convert_sharded("synthetic:30", tmp_path / "ds", shards=3, backend="lmdb")
    gone = sorted((tmp_path / "ds" / "shards").iterdir())[1]
    for path in gone.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(gone)
    assert main(["verify", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imgstore verify: error:") and gone.name in err and "missing" in err
    with open_sharded(tmp_path / "ds") as data, pytest.raises(imgstore.CorruptStoreError, match=gone.name):
        data.verify()


def test_ctrl_c_mid_build_deletes_its_shards_and_exits_130(tmp_path: Path) -> None:
    import subprocess
    import sys

    dest = tmp_path / "ds"
    argv = [sys.executable, "-m", "imgstore.cli", "convert", "synthetic:3000", str(dest), "--backend", "lmdb"]
    process = subprocess.Popen([*argv, "--shards", "30", "--workers", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(dest.glob("shards/shard-*")):  # a first shard sealed: the build is under way
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it was interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not list(dest.glob("shards/*")) and not (dest / "imgstore-sharded.json").exists()


def test_shards_mix_the_classes_unless_the_order_is_kept_and_append_adds(tmp_path: Path) -> None:
    images = _folder(tmp_path / "src", 24)
    convert_sharded(tmp_path / "src", tmp_path / "mixed", shards=3, backend="lmdb", seed=5)
    with open_sharded(tmp_path / "mixed") as data:
        assert all(len(set(data.shard(k).get_many(range(8))[1].tolist())) == 2 for k in range(3))
    _check(tmp_path / "mixed", images, 3, seed=5)
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "kept"), "--backend", "lmdb", "--shards", "2"]
    assert main([*argv, "--keep-order"]) == 0
    _check(tmp_path / "kept", images, 2, seed=None)
    assert main(argv) == 2  # a dataset there: refused, saying --append adds to it
    assert main([*argv, "--append", "--seed", "1"]) == 0
    with open_sharded(tmp_path / "kept") as data:
        assert len(data) == 48 and len(data.shards) == 4 and data.manifest.revision == 2
        order = np.random.default_rng(1).permutation(24)
        assert np.array_equal(data.get_many(range(24, 48))[0], np.stack(images)[order])
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--backend", "lmdb", "--append"]) == 2


def test_dask_bad_file_fails_once_without_retries_and_leaves_no_shard(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    _folder(tmp_path / "src", 12)
    (tmp_path / "src" / "b" / "07.png").write_bytes(b"not a png")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with pytest.raises(imgstore.ImgStoreError, match="07.png"):
            convert_sharded(
                tmp_path / "src", tmp_path / "ds", shards=4, engine="dask", scheduler=cluster.scheduler_address
            )
    assert not list((tmp_path / "ds" / "shards").glob("shard-*"))
    assert not (tmp_path / "ds" / "imgstore-sharded.json").exists()


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    _folder(tmp_path / "src", 4)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(imgstore.StoreIOError, match="cannot reach the Dask scheduler"):
            convert_sharded(
                tmp_path / "src", tmp_path / "ds", shards=2, engine="dask", scheduler=f"tcp://127.0.0.1:{port}"
            )


def test_a_remote_dest_holding_other_objects_is_refused() -> None:
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://imgstore-dest-{os.getpid()}-{time.monotonic_ns()}"
    fsspec.filesystem("memory").pipe(f"{url}/notes.txt", b"mine")
    with pytest.raises(imgstore.StoreExistsError, match="notes.txt"):
        convert_sharded("synthetic:10", url, shards=2)
    assert fsspec.filesystem("memory").cat(f"{url}/notes.txt") == b"mine"
    manifest = convert_sharded("synthetic:10", f"{url}/ds", shards=2)
    assert manifest.count == 10
    assert convert_sharded("synthetic:10", f"{url}/ds", shards=2, append=True).count == 20


def test_the_dataset_knows_its_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _folder(tmp_path / "src", 8)
    convert_sharded(tmp_path / "src", tmp_path / "ds", shards=2)
    with open_sharded(tmp_path / "ds") as data:
        assert data.classes == ["a", "b"]
    assert main(["info", str(tmp_path / "ds")]) == 0
    assert "classes     2" in capsys.readouterr().out
    convert_sharded("synthetic:10", tmp_path / "ds", shards=1, append=True)  # shards without names
    with open_sharded(tmp_path / "ds") as data:
        assert data.classes is None and len(data) == 18


def test_append_refuses_other_classes_and_a_raw_shard_batches_beside_encoded_ones(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from imgstore.sharded import ShardedWriter
    from imgstore.sharded.torch import ShardedIterable

    _folder(tmp_path / "src", 8)  # classes a, b; 6x5 PNGs
    convert_sharded(tmp_path / "src", tmp_path / "ds", shards=2)
    (tmp_path / "other" / "x").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "other" / "x" / "0.png")
    with pytest.raises(imgstore.InvalidOptionError, match="classes"):
        convert_sharded(tmp_path / "other", tmp_path / "ds", shards=1, append=True)
    with pytest.raises(imgstore.InvalidOptionError, match="classes"):
        ShardedWriter(tmp_path / "ds", backend="lmdb", classes=["x"])
    assert (
        not list((tmp_path / "ds" / "shards").glob(".shard-*"))
        and len(list((tmp_path / "ds" / "shards").iterdir())) == 2
    )
    with ShardedWriter(tmp_path / "ds", backend="lmdb", classes=["a", "b"]) as writer:  # raw pixels, 6x5
        writer.add(np.zeros((3, 6, 5, 3), np.uint8), [0, 1, 0])
    it = ShardedIterable(tmp_path / "ds", batch_size=4, size=(6, 5))
    assert sum(len(labels) for _images, labels in torch.utils.data.DataLoader(it, batch_size=None)) == 11
    with pytest.raises(imgstore.InvalidOptionError, match="another size"):
        ShardedIterable(tmp_path / "ds", batch_size=4, size=(4, 4))


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_on_error_skip_leaves_out_every_bad_file_and_lists_them(
    tmp_path: Path, engine: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if engine == "dask":
        pytest.importorskip("distributed")
    images = _folder(tmp_path / "src", 12)
    (tmp_path / "src" / "a" / "01.png").write_bytes(b"not a png")
    (tmp_path / "src" / "b" / "09.png").write_bytes(b"neither")
    skipped: list[Any] = []
    manifest = convert_sharded(
        tmp_path / "src", tmp_path / "ds", shards=3, on_error="skip", skipped=skipped, engine=engine, workers=2
    )
    assert sorted(item.path for item in skipped) == ["a/01.png", "b/09.png"]
    assert manifest.count == 10
    with open_sharded(tmp_path / "ds") as data:
        got = {bytes(image) for image in data.get_many(range(10))[0]}
    assert got == {bytes(image) for k, image in enumerate(images) if k not in (1, 9)}
    if engine == "local":
        argv = ["convert", str(tmp_path / "src"), str(tmp_path / "cli"), "--backend", "lmdb", "--shards", "2"]
        assert main([*argv, "--on-error", "skip"]) == 0
        assert "skipped 2 bad files" in capsys.readouterr().out
