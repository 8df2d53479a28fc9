"""``ConcurrentAccess``: readers while a writer appends or re-creates, one writer at a time, forks, read-only media."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.testing.checks import (
    BackendTest,
    check_images_equal,
    check_records,
    import_backend_module,
    read_only_view,
)
from imgstore.testing.layouts import Records

TOTAL = 3000
#: an encoded layout's records are ~10x dearer to write and read: fewer still show a writer's progress
TOTAL_ENCODED = 150


def _append_slowly(
    backend_module: str | None, path: str, options: dict[str, Any], records: Records, done: Event
) -> None:
    import_backend_module(backend_module)  # a spawned child: nothing registered but what imports register
    with imgstore.open_store(path, mode="a", **options) as store:
        start = len(store)
        sizes = [1, 7, 64, 300] * 100
        for size in sizes:
            stop = min(start + size, len(records))
            if stop == start:
                break
            records[start:stop].put(store)
            start = stop
    done.set()


def _write_in_child(store: imgstore.Store, records: Records, conn: Connection) -> None:
    try:
        store.get(0)  # reading is fine
        records.put_one(store, 0)
        conn.send("acknowledged")
    except imgstore.StoreBusyError:
        conn.send("busy")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        conn.send(f"{type(exc).__name__}: {exc}")


def _hold_forever(conn: Connection) -> None:
    conn.send("ready")
    time.sleep(60)


def _recreate_repeatedly(path: str, kwargs: dict[str, Any], records: list[Records]) -> None:
    for batch in records:
        with imgstore.open_store(path, mode="w", **kwargs) as store:
            batch.put(store)


class ConcurrentAccess(BackendTest):
    """Several processes on one store: readers and a writer, forked children, a re-creating writer."""

    def test_readers_see_a_consistent_prefix_while_a_writer_appends(self, tmp_path: Path) -> None:
        records = self.records(TOTAL_ENCODED if self.scaled else TOTAL, (8, 8, 3), seed=21)
        path = tmp_path / self.backend
        with self.create(path, sync=False) as store:
            records[:10].put(store)
        context = multiprocessing.get_context("spawn")
        done = context.Event()
        writer = context.Process(
            target=_append_slowly, args=(self.backend_module, str(path), self.options, records, done)
        )
        with imgstore.open_store(path) as reader:
            writer.start()
            seen = set()
            deadline = time.monotonic() + 120
            while True:
                assert writer.is_alive() or done.is_set(), f"the writer failed (exit code {writer.exitcode})"
                assert time.monotonic() < deadline, "the writer did not finish in time"
                finished = done.is_set()
                count = reader.refresh()
                seen.add(count)
                got_images, got_labels = reader.get_many(range(count))  # never garbage, never a short read
                check_images_equal(got_images, records[:count].expected)
                np.testing.assert_array_equal(got_labels, records.labels[:count])
                if count:
                    check_images_equal([reader.get(count - 1)[0]], [records.expected[count - 1]])
                if self.layout.encoded:
                    assert len(reader.image_shapes()) == count
                if finished:
                    break
            writer.join(60)
            assert writer.exitcode == 0
            assert reader.refresh() == len(records)
            assert len(seen) > 2, "the reader never saw the writer's progress"
            reader.verify()
            check_records(reader, records)

    def test_only_one_writer_at_a_time(self, tmp_path: Path) -> None:
        records = self.records(4)
        path = tmp_path / self.backend
        with self.create(path) as writer:
            records.put(writer)
            with pytest.raises(imgstore.StoreBusyError):
                imgstore.open_store(path, mode="a")
            with pytest.raises(imgstore.StoreBusyError):
                self.create(path)  # nor may anyone erase it meanwhile
            with imgstore.open_store(path) as reader:  # readers are welcome
                assert len(reader) == 4
        with imgstore.open_store(path, mode="a") as writer:  # the lock went with the first writer
            records.put(writer)
            assert len(writer) == 8

    @pytest.fixture
    def read_only_dir(self, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
        """(a writable directory, the same directory mounted read-only) — as root, a read-only bind mount."""
        source = tmp_path / "src"
        source.mkdir()
        if os.geteuid() != 0:
            yield source, source  # the test makes the store read-only with chmod instead
            return
        with read_only_view(source, tmp_path / "ro") as mounted:
            yield source, mounted

    def test_store_on_read_only_media_opens_for_reading(self, read_only_dir: tuple[Path, Path]) -> None:
        source, mounted = read_only_dir
        records = self.records(50)
        with self.create(source / self.backend) as store:
            records.put(store)
        if mounted == source:
            for root, dirs, files in os.walk(source):
                for name in dirs + files:
                    os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
        assert not os.access(mounted / self.backend, os.W_OK)
        with imgstore.open_store(mounted / self.backend) as store:
            check_records(store, records)
            store.verify()
        with pytest.raises((imgstore.ReadOnlyError, PermissionError, OSError)):
            imgstore.open_store(mounted / self.backend, mode="a")

    def test_a_writer_handle_cannot_write_in_a_forked_child(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        records = self.fill(path)
        more = self.records(5, (8, 8, 3), seed=9)
        context = multiprocessing.get_context("fork")
        with imgstore.open_store(path, mode="a") as store:
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_write_in_child, args=(store, more, send))
            child.start()
            assert receive.recv() == "busy"
            child.join(30)
            more.put(store)  # the parent still writes, at the indices it expects
        with imgstore.open_store(path) as store:
            check_records(store, records + more)
            store.verify()

    def test_the_writer_lock_goes_with_the_writer_not_its_children(self, tmp_path: Path) -> None:
        """A child forked while a writer is open must not keep the store locked after the writer closes."""
        path = tmp_path / "s"
        self.fill(path)
        context = multiprocessing.get_context("fork")
        store = imgstore.open_store(path, mode="a")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_hold_forever, args=(send,), daemon=True)
        child.start()
        try:
            assert receive.recv() == "ready"
            store.close()
            imgstore.open_store(path, mode="a").close()  # not StoreBusyError
        finally:
            child.kill()
            child.join()

    def test_write_mode_while_this_process_reads_the_store(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        records = self.fill(path)
        with imgstore.open_store(path) as reader:
            reader.get_many(range(len(reader)))
            new = self.fill(path, n=12, seed=4)  # works, or refuses before deleting
            try:
                got_images, got_labels = reader.get_many(range(len(reader)))
            except imgstore.CorruptStoreError:
                pass  # an error is allowed; a mix is not
            else:
                check_images_equal(got_images, records.expected)
                np.testing.assert_array_equal(got_labels, records.labels)
        with imgstore.open_store(path) as store:
            check_records(store, new)

    @pytest.mark.parametrize("verify_reads", [True, False])
    def test_a_reader_sees_one_store_or_an_error_never_a_mix(self, tmp_path: Path, verify_reads: bool) -> None:
        path = tmp_path / "s"
        records = self.fill(path, n=40)
        context = multiprocessing.get_context("fork")
        kwargs = {"backend": self.backend, **self.layout.store_kwargs(), **self.options}
        # Each new store's labels are 100 k + the old ones: a mix of stores shows in the labels too.
        batches = [self.records(40, (8, 8, 3), seed=100 + k) for k in range(6 if self.scaled else 15)]
        batches = [batch.with_labels(batch.labels + 100 * (k + 1)) for k, batch in enumerate(batches)]
        with imgstore.open_store(path, verify_reads=verify_reads) as reader:
            reader.get_many(range(40))  # labels and checksums cached
            writer = context.Process(target=_recreate_repeatedly, args=(str(path), kwargs, batches))
            writer.start()
            errors = 0
            while writer.is_alive() or errors == 0:
                try:
                    got_images, got_labels = reader.get_many(range(40))
                    image, label = reader.get(17)
                except imgstore.CorruptStoreError:
                    errors += 1
                    if not writer.is_alive():
                        break
                    continue
                check_images_equal(got_images, records.expected)
                np.testing.assert_array_equal(got_labels, records.labels)
                check_images_equal([image], [records.expected[17]])
                assert label == records.labels[17]
                if not writer.is_alive():
                    break
            writer.join(60)
            assert writer.exitcode == 0
