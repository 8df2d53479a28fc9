"""LMDB's shuffled batches out of a map of data.mdb (imgstore/backends/lmdb_mapped.py)."""

from __future__ import annotations

import ctypes
import struct
import threading
from pathlib import Path

import lmdb
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


def test_a_damaged_overflow_page_number_is_not_trusted(tmp_path: Path) -> None:
    """liblmdb never reads an overflow page's own page number; the mapped gather must not send a
    batch to the pages a damaged one names (another block's records, returned as good unverified)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w", block_bytes=4096) as store:  # 20 images a block
        store.put_many(images, np.arange(100))
    env = lmdb.open(str(next(path.glob("lmdb-*"))), readonly=True, lock=False)
    with env.begin(buffers=True) as txn:  # the first page of block 2's value, from liblmdb itself
        psize, value = env.stat()["psize"], txn.get((2).to_bytes(8, "big"))
        page = np.frombuffer(value, np.uint8).ctypes.data - 16
        pgno = struct.unpack("<Q", ctypes.string_at(page, 8))[0]
        other = struct.unpack("<Q", ctypes.string_at(page - 2 * psize, 8))[0]  # block 1's page
    env.close()
    assert other == pgno - 2
    with open(next(path.glob("lmdb-*")) / "data.mdb", "r+b") as file:
        file.seek(pgno * psize)
        file.write(struct.pack("<Q", other))  # block 2's header names block 1's pages
    batch = np.array([55, 41, 59, 40])  # block 2 only: the first value learned in the snapshot
    for verify in (True, False):
        with imgstore.open_store(path, verify_reads=verify) as reader:
            got, labels = reader.get_many(batch)
            np.testing.assert_array_equal(got, images[batch])  # as txn.get reads them
            assert labels.tolist() == batch.tolist()


def test_threads_sharing_a_handle_across_new_snapshots(tmp_path: Path) -> None:
    """Reading threads of one handle while commits make new snapshots: one thread learning a new
    snapshot's offsets must not pull the arrays from under another (an IndexError)."""
    images = np.random.default_rng(2).integers(0, 256, (3400, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w", block_bytes=4096) as store:  # 20 images a block
        store.put_many(images[:3000], np.arange(3000))
    errors: list[BaseException] = []
    done = threading.Event()

    def read(reader: imgstore.Store, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not done.is_set():
            batch = rng.choice(int(rng.integers(1, 3000)), 10)  # few blocks, of varied reach
            try:
                got, labels = reader.get_many(batch)
                np.testing.assert_array_equal(got, images[batch])
                assert labels.tolist() == batch.tolist()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                return

    with imgstore.open_store(path, verify_reads=False) as reader:
        threads = [threading.Thread(target=read, args=(reader, seed)) for seed in range(3)]
        for thread in threads:
            thread.start()
        try:
            with imgstore.open_store(path, mode="a", sync=False) as writer:
                for start in range(3000, 3400, 2):  # each commit a new snapshot
                    writer.put_many(images[start : start + 2], np.arange(start, start + 2))
                    if errors:
                        break
        finally:
            done.set()
            for thread in threads:
                thread.join()
    assert not errors, errors[0]
