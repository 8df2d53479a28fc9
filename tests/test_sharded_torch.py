"""Reading a sharded dataset on many ranks: the split, the shuffle, the padding, and 2 real ranks x 2 real workers."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import pickle
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import imgstore  # noqa: E402
from imgstore.sharded import ShardedWriter  # noqa: E402
from imgstore.sharded.torch import ShardedIterable, slice_records  # noqa: E402
from imgstore.testing import random_images  # noqa: E402

N = 37  # 4 shards of 8 and one of 5: uneven for 4 slots and for the shards
IMAGES, _ = random_images(N, (4, 4, 3), seed=3)


def _write(path: Path) -> Path:
    """Labels are the records' global indices, so what a reader saw is its labels."""
    with ShardedWriter(path, backend="lmdb", shard_size=8, mode="w") as writer:
        writer.add(IMAGES, np.arange(N))
    return path


@pytest.mark.parametrize("counts", [[8, 8, 8, 8, 5], [1, 30, 2], [3], [5, 0, 4]])
@pytest.mark.parametrize("slots", [1, 3, 4, 7])
def test_slices_cover_every_record_once_and_are_equal(counts: list[int], slots: int) -> None:
    n = sum(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for drop_last in (False, True):
        seen = [
            np.concatenate(
                [
                    offsets[k] + local
                    for k, local in slice_records(counts, seed=1, epoch=2, slot=s, slots=slots, drop_last=drop_last)
                ]
                or [np.empty(0, np.int64)]
            )
            for s in range(slots)
        ]
        lengths = {len(part) for part in seen}
        if drop_last:
            assert lengths == {n // slots}
            all_seen = np.concatenate(seen)
            assert len(set(all_seen.tolist())) == len(all_seen)  # nothing twice; the tail dropped
        else:
            assert lengths == {-(-n // slots)}
            counted = Counter(np.concatenate(seen).tolist())
            assert set(counted) == set(range(n))  # every record, and the padding repeats fewer than slots
            assert sum(counted.values()) - n == -(-n // slots) * slots - n < slots


def test_order_depends_on_seed_and_epoch_only() -> None:
    counts = [8, 8, 8, 8, 5]

    def plan(seed: int, epoch: int) -> list[int]:
        return [
            i
            for k, local in slice_records(counts, seed=seed, epoch=epoch, slot=0, slots=1)
            for i in (k * 100 + local).tolist()
        ]

    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 0) != plan(1, 1) and plan(1, 0) != plan(2, 0)
    unshuffled = slice_records(counts, seed=1, epoch=0, slot=0, slots=1, shuffle=False)
    assert [k for k, _ in unshuffled] == [0, 1, 2, 3, 4] and all(
        np.array_equal(r, np.arange(len(r))) for _, r in unshuffled
    )


def test_samples_and_batches_in_one_process(tmp_path: Path) -> None:
    path = _write(tmp_path / "ds")
    seen: list[int] = []
    for rank in range(3):
        it = ShardedIterable(path, rank=rank, world_size=3, drop_last=True, seed=4)
        samples = list(it)
        assert len(samples) == it.steps() == N // 3
        for image, label in samples:
            assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(IMAGES[label]))
        seen += [label for _image, label in samples]
    assert len(set(seen)) == len(seen) == 3 * (N // 3)

    it = ShardedIterable(path, batch_size=5, layout="chw", seed=4)
    batches = list(DataLoader(it, batch_size=None))
    assert len(batches) == it.steps() == 8 and batches[0][0].shape == (5, 3, 4, 4)
    labels = torch.cat([b[1] for b in batches])
    assert sorted(labels.tolist()) == list(range(N))
    images = torch.cat([b[0] for b in batches]).movedim(1, -1)
    assert torch.equal(images, torch.from_numpy(IMAGES[labels.numpy()]))


def test_bad_options(tmp_path: Path) -> None:
    path = _write(tmp_path / "ds")
    for bad in ({"rank": 2, "world_size": 2}, {"rank": 0}, {"batch_size": 0}, {"seed": -1}, {"layout": "nhwc"}):
        with pytest.raises(imgstore.InvalidOptionError):
            ShardedIterable(path, **bad)  # type: ignore[arg-type]
    with pytest.raises(imgstore.StoreNotFoundError):
        ShardedIterable(tmp_path / "nothing")


def _rank(rank: int, port: int, path: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        it = ShardedIterable(path, batch_size=3, seed=7)  # rank and world size from torch.distributed
        # fork, as under torchrun: a rank started by spawn inherits "spawn" as its default, and spawned
        # workers each import torch again (40 s a worker on this loaded machine)
        loader = DataLoader(it, batch_size=None, num_workers=2, multiprocessing_context="fork")
        epochs = []
        for epoch in (0, 1, 0):
            it.set_epoch(epoch)
            steps = 0
            labels: list[int] = []
            for images, batch_labels in loader:
                assert torch.equal(images, torch.from_numpy(IMAGES[batch_labels.numpy()]))
                total = torch.ones(1)
                dist.all_reduce(total)  # a collective every step: a rank with fewer steps would hang here
                labels += batch_labels.tolist()
                steps += 1
            epochs.append({"steps": steps, "labels": labels, "expected": it.steps(2)})
        gathered: list[object] = [None, None]
        dist.all_gather_object(gathered, epochs)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_read_every_record_once(tmp_path: Path) -> None:
    path = _write(tmp_path / "ds")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "seen.json"
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_rank, args=(r, port, str(path), str(out))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    by_rank = json.loads(out.read_text())
    for epoch in range(3):
        steps = [by_rank[r][epoch]["steps"] for r in range(2)]
        # 37 records over 4 slices: 10 each (3 padded), 4 batches of 3 (the last of 1) per worker
        assert steps == [8, 8] == [by_rank[r][epoch]["expected"] for r in range(2)]
        counted = Counter(label for r in range(2) for label in by_rank[r][epoch]["labels"])
        assert set(counted) == set(range(N)) and sum(counted.values()) == 40
    order = [[by_rank[r][epoch]["labels"] for r in range(2)] for epoch in range(3)]
    assert order[0] == order[2]  # epoch 0 again: the same records, the same order, on each rank
    assert order[0] != order[1]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(tmp_path: Path, context: str) -> None:
    it = ShardedIterable(_write(tmp_path / "ds"), batch_size=5, seed=0)
    loader = DataLoader(it, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context=context)
    orders = []
    for epoch in (0, 1, 0):
        it.set_epoch(epoch)
        seen = torch.cat([labels for _images, labels in loader]).tolist()
        assert sorted(set(seen)) == list(range(N))
        orders.append(seen)
    assert orders[0] != orders[1] and orders[0] == orders[2]
    copy = pickle.loads(pickle.dumps(it))  # outside a worker's start: the epoch goes as a number
    it.set_epoch(7)
    assert copy.epoch == 0 and it.epoch == 7


def test_samples_of_varied_shapes_and_size_on_raw_pixels(tmp_path: Path) -> None:
    from imgstore.sharded import ShardedWriter

    shapes = [(5 + i % 3, 4 + i % 2, 3) for i in range(10)]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    with ShardedWriter(tmp_path / "varied", backend="lmdb", shard_size=4, codec="png") as writer:
        writer.add(images, np.arange(10))
    got = {label: image for image, label in ShardedIterable(tmp_path / "varied", shuffle=False, layout="chw")}
    assert sorted(got) == list(range(10))
    assert all(np.array_equal(got[k].permute(1, 2, 0).numpy(), images[k]) for k in range(10))
    with pytest.raises(imgstore.InvalidOptionError, match="size="):
        next(iter(ShardedIterable(tmp_path / "varied", batch_size=4)))
    with pytest.raises(imgstore.InvalidOptionError, match="raw pixels of another size"):
        ShardedIterable(_write(tmp_path / "raw"), batch_size=4, size=(2, 2))
