"""clean_shards / ``imgstore sharded-clean``: only old shard folders no manifest names go, locally and on S3."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.cli import main
from imgstore.sharded import ShardedWriter, commit_shards, open_sharded, write_shard
from imgstore.sharded.cleaning import clean_shards
from imgstore.testing import random_images
from imgstore.testing.s3server import MotoServer

IMAGES, LABELS = random_images(60, (8, 8, 3), seed=31)
DAY = 24 * 3600


def _age(path: Path, seconds: float) -> None:
    """Make everything under ``path`` last written ``seconds`` ago (as a killed writer's leftovers are)."""
    when = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def _dataset(root: Path) -> tuple[str, str]:
    """A dataset of 2 committed shards, an old sealed shard never committed, an old half-written one."""
    with ShardedWriter(root, backend="lmdb", shard_size=30) as writer:
        writer.add(IMAGES, LABELS)
    orphan = write_shard(root, IMAGES[:10], LABELS[:10], backend="lmdb")
    staging = root / "shards" / ".shard-0123456789abcdef.tmp"
    staging.mkdir()
    (staging / "data.mdb").write_bytes(b"half a store")
    for path in (root / "shards" / orphan.name, staging):
        _age(path, 2 * DAY)
    return orphan.name, staging.name


def test_only_old_unreferenced_shard_folders_are_listed_then_deleted(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    orphan, staging = _dataset(root)
    young = write_shard(root, IMAGES[10:20], LABELS[10:20], backend="lmdb")  # a writer about to commit
    other = root / "shards" / "notes"  # not a shard's name: never touched
    other.mkdir()
    _age(other, 9 * DAY)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the dataset's")
    os.symlink(outside, root / "shards" / "shard-fedcba9876543210")  # a link named like a shard: never followed
    before = sorted(p.name for p in (root / "shards").iterdir())

    found = clean_shards(root)  # a dry run
    assert [f.name for f in found] == sorted([orphan, staging])
    assert all(f.age > DAY for f in found) and found[[f.name for f in found].index(staging)].bytes == 12
    assert sorted(p.name for p in (root / "shards").iterdir()) == before

    assert [f.name for f in clean_shards(root, delete=True)] == sorted([orphan, staging])
    left = sorted(p.name for p in (root / "shards").iterdir())
    assert left == sorted(set(before) - {orphan, staging}) and young.name in left
    assert (outside / "keep.txt").read_text() == "not the dataset's"
    with open_sharded(root) as data:
        data.verify()
        assert np.array_equal(data.get_many(range(60))[0], IMAGES)
    commit_shards(root, [young])  # the young shard's writer commits as if nothing happened
    with open_sharded(root) as data:
        assert len(data) == 70
    assert clean_shards(root, grace=0) == []


def test_a_running_writers_shards_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with ShardedWriter(root, backend="lmdb", shard_size=30) as writer:
        writer.add(IMAGES[:30], LABELS[:30])
    with ShardedWriter(root, backend="lmdb", shard_size=10) as writer:
        writer.add(IMAGES[30:], LABELS[30:])  # 3 shards sealed, not committed yet
        assert len(writer.written) == 3
        assert clean_shards(root, delete=True) == []  # the default grace: 24 h
    with open_sharded(root) as data:
        assert len(data) == 60 and np.array_equal(data.get_many(range(60))[0], IMAGES)


def test_a_commit_of_a_deleted_shard_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    orphan, _staging = _dataset(root)
    info = write_shard(root, IMAGES[:5], LABELS[:5], backend="lmdb")
    _age(root / "shards" / info.name, 2 * DAY)  # a writer that waited past the grace
    clean_shards(root, delete=True)
    with pytest.raises(imgstore.StoreIOError, match="not written there"):
        commit_shards(root, [info])
    with open_sharded(root) as data:
        assert len(data) == 60


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(imgstore.InvalidOptionError, match="grace"):
        clean_shards(tmp_path, grace=-1)
    with pytest.raises(imgstore.StoreNotFoundError):
        clean_shards(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(imgstore.StoreNotFoundError):
        clean_shards(tmp_path / "empty")


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ds"
    orphan, staging = _dataset(root)
    assert main(["sharded-clean", str(root)]) == 0
    out, err = capsys.readouterr()
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == sorted([orphan, staging])
    assert "2 shard folders" in err and "dry run" in err and (root / "shards" / orphan).is_dir()
    assert main(["sharded-clean", str(root), "--grace-hours", "72"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["sharded-clean", str(root), "--delete"]) == 0
    assert "deleted" in capsys.readouterr().err and not (root / "shards" / orphan).exists()
    assert main(["sharded-clean", str(tmp_path / "nothing")]) == 2


def test_on_s3(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options(attempts=2)
    with ShardedWriter(s3_url, backend="lmdb", shard_size=30, storage_options=options) as writer:
        writer.add(IMAGES, LABELS)
    orphan = write_shard(s3_url, IMAGES[:10], LABELS[:10], backend="lmdb", storage_options=options)
    assert clean_shards(s3_url, storage_options=options) == []  # just uploaded: within the grace
    found = clean_shards(s3_url, grace=0, storage_options=options)
    assert [(f.name, f.bytes) for f in found] == [(orphan.name, orphan.bytes)]
    clean_shards(s3_url, grace=0, delete=True, storage_options=options)
    assert clean_shards(s3_url, grace=0, storage_options=options) == []
    with open_sharded(s3_url, cache_dir=tmp_path / "cache", storage_options=options, remote_reads="whole") as data:
        assert np.array_equal(data.get_many(range(60))[0], IMAGES)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_links_are_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    orphan, _staging = _dataset(root)
    outside = tmp_path / "elsewhere"
    (outside / "shard-0123456789").mkdir(parents=True)
    (outside / "shard-0123456789" / "keep.txt").write_text("not the dataset's")
    os.symlink(outside, root / "shards" / orphan / "inner")  # a link inside an old orphan: it goes, not its target
    _age(root / "shards" / orphan, 2 * DAY)
    assert orphan in [f.name for f in clean_shards(root, delete=True)]
    assert _tree(outside) == ["shard-0123456789", "shard-0123456789/keep.txt"]

    linked = tmp_path / "linked"  # a dataset whose shards/ is a link to a folder elsewhere
    linked.mkdir()
    (linked / "imgstore-sharded.json").write_bytes((root / "imgstore-sharded.json").read_bytes())
    os.symlink(outside, linked / "shards")
    for delete in (False, True):
        with pytest.raises(imgstore.CorruptStoreError, match="symbolic link"):
            clean_shards(linked, delete=delete, grace=0)
        assert main(["sharded-clean", str(linked), "--delete", "--grace-hours", "0"]) == 1
    assert _tree(outside) == ["shard-0123456789", "shard-0123456789/keep.txt"]


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "notds"  # shard-named folders, no manifest (another tool's, or a dataset that lost it)
    (folder / "shards" / "shard-abcdef0123").mkdir(parents=True)
    (folder / "shards" / "shard-abcdef0123" / "precious.bin").write_text("x")
    _age(folder / "shards", 2 * DAY)
    before = _tree(folder)
    for delete in (False, True):
        with pytest.raises(imgstore.StoreNotFoundError, match="no imgstore-sharded.json"):
            clean_shards(folder, delete=delete, grace=0)
    (tmp_path / "damaged").mkdir()
    damaged = tmp_path / "damaged"
    (damaged / "imgstore-sharded.json").write_text("{garbage")
    (damaged / "shards" / "shard-abcdef0123").mkdir(parents=True)
    with pytest.raises(imgstore.CorruptStoreError):
        clean_shards(damaged, delete=True, grace=0)
    assert _tree(folder) == before  # nothing deleted, no lock file made
    assert _tree(damaged) == ["imgstore-sharded.json", "shards", "shards/shard-abcdef0123"]


def test_a_writer_whose_shard_is_cleaned_away_gets_an_imgstore_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with ShardedWriter(root, backend="tar", shard_size=30) as writer:
        writer.add(IMAGES, LABELS)

    def fill(store: imgstore.Store) -> None:
        store.put_many(IMAGES[:10], LABELS[:10])
        assert len(clean_shards(root, delete=True, grace=0)) == 1  # --grace-hours 0 takes this unsealed shard

    with pytest.raises(imgstore.StoreIOError, match="unsealed shard was removed"):
        write_shard(root, fill=fill, backend="tar")
    with open_sharded(root) as data:
        assert len(data) == 60 and np.array_equal(data.get_many(range(60))[0], IMAGES)


def test_a_commit_of_a_deleted_shard_is_refused_on_s3(s3_server: MotoServer, s3_url: str, tmp_path: Path) -> None:
    options = s3_server.storage_options(attempts=2)
    with ShardedWriter(s3_url, backend="tar", shard_size=30, storage_options=options) as writer:
        writer.add(IMAGES, LABELS)
    info = write_shard(s3_url, IMAGES[:10], LABELS[:10], backend="tar", storage_options=options)
    assert [f.name for f in clean_shards(s3_url, grace=0, delete=True, storage_options=options)] == [info.name]
    with pytest.raises(imgstore.StoreIOError, match="not written there"):
        commit_shards(s3_url, [info], storage_options=options)
    with open_sharded(s3_url, cache_dir=tmp_path / "cache", storage_options=options, remote_reads="whole") as data:
        assert len(data) == 60 and np.array_equal(data.get_many(range(60))[0], IMAGES)
