"""LMDB's shuffled batches out of a map of data.mdb (imgstore/backends/lmdb_mapped.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import imgstore


def test_mapped_batches_follow_new_snapshots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (700, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w", block_bytes=4096) as store:  # 20 images a block
        store.put_many(images[:450], np.arange(450))  # the last block is partly filled
    with imgstore.open_store(path) as reader:
        batch = np.sort(rng.permutation(450)[:200])
        got, labels = reader.get_many(batch)
        assert reader._mapped is not None and (reader._mapped._offsets >= 0).sum() > 0  # the mapped path ran
        np.testing.assert_array_equal(got, images[batch])
        assert labels.tolist() == batch.tolist()
        with imgstore.open_store(path, mode="a") as writer:  # rewrites the last block, in a new snapshot
            writer.put_many(images[450:], np.arange(450, 700))
        assert reader.refresh() == 700
        every = rng.permutation(700)
        for start in range(0, 700, 128):
            batch = np.sort(every[start : start + 128])
            got, labels = reader.get_many(batch)
            np.testing.assert_array_equal(got, images[batch])
            assert labels.tolist() == batch.tolist()
