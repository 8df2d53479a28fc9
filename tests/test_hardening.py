"""The guarantees where an adversarial pass broke them (issue 9): each case as it was found.

Here: the cases about the front end (options, indices, inputs, manifests, paths) and the built-in
backends. The cases every backend must pass are in the suites of ``imgstore.testing`` that
``test_backends.py`` runs per backend: a writer handle in a forked child, the lock and forked
children, "w" while this process reads, a reader while another process re-creates the store
(``ConcurrentAccess``); damaged checksums, forged manifests (``DamageDetection``); creating a store
on a full disk (``FaultTolerance``); kills during "w" (``CrashSafety``). LMDB- and HDF5-specific
cases are in ``test_lmdb.py`` and ``test_hdf5.py``; malformed benchmark files in ``test_runs.py``;
the loaders' memory bombs in ``test_datasets.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.manifest import MANIFEST_NAME, read_manifest
from imgstore.testing import check_store_content, random_images, read_only_view

BACKENDS = imgstore.available_backends()


def _fill(path: Path, backend: str, n: int = 30, seed: int = 0, **options: object) -> tuple[np.ndarray, np.ndarray]:
    images, labels = random_images(n, (8, 8, 3), seed)
    with imgstore.open_store(path, backend, "w", **options) as store:
        store.put_many(images, labels)
    return images, labels


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 1. "w" deletes only the store's own files


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("foreign_manifest", ['{"format_version": 1}', "[1, 2]", '{"any": "json"}', "not json"])
def test_write_mode_refuses_a_directory_with_a_foreign_manifest(
    tmp_path: Path, backend: str, foreign_manifest: str
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / MANIFEST_NAME).write_text(foreign_manifest)
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    (photos / "notes").mkdir()
    (photos / "notes" / "todo.txt").write_text("keep me")
    before = _tree(photos)
    with pytest.raises(imgstore.StoreExistsError):
        imgstore.open_store(photos, backend, "w")
    assert _tree(photos) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_mode_keeps_files_a_user_put_inside_a_store(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    _fill(path, backend)
    (path / "README.txt").write_text("what this data set is")
    (path / "extra").mkdir()
    (path / "extra" / "a.png").write_bytes(b"mine")
    (path / "lmdb").mkdir(exist_ok=True)  # a name a backend used in format 1, but not this store's
    images, labels = _fill(path, backend, n=5, seed=3)
    assert (path / "README.txt").read_text() == "what this data set is"
    assert (path / "extra" / "a.png").read_bytes() == b"mine"
    assert (path / "lmdb").is_dir()
    with imgstore.open_store(path) as store:
        check_store_content(store, images, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_mode_replaces_a_store_of_another_backend(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    other = BACKENDS[(BACKENDS.index(backend) + 1) % len(BACKENDS)]
    _fill(path, other)
    images, labels = _fill(path, backend, n=7, seed=2)
    manifest = read_manifest(path)
    assert {entry.name for entry in path.iterdir()} == {*manifest.files, MANIFEST_NAME, "writer.lock"}
    with imgstore.open_store(path) as store:
        check_store_content(store, images, labels)


# ---------------------------------------------------------------------- 3 and 12. options


@pytest.mark.parametrize(
    ("backend", "option", "other"),
    [("png", "files_per_dir", 7), ("lmdb", "block_bytes", 4096), ("hdf5", "chunk_bytes", 999)],
)
@pytest.mark.parametrize("mode", ["r", "a"])
def test_reopening_with_another_layout_option_is_refused(
    tmp_path: Path, backend: str, option: str, other: int, mode: str
) -> None:
    path = tmp_path / "s"
    images, labels = _fill(path, backend, n=60)
    before = (path / MANIFEST_NAME).read_bytes()
    with pytest.raises(imgstore.InvalidOptionError, match=option):
        imgstore.open_store(path, mode=mode, **{option: other})
    assert (path / MANIFEST_NAME).read_bytes() == before
    default = imgstore.get_backend(backend).option_specs[option].default
    with imgstore.open_store(path, mode=mode, **{option: default}) as store:  # the same value is fine
        check_store_content(store, images, labels)


def test_handle_settings_apply_to_that_handle_only(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _fill(path, "png", compress_level=1)
    with imgstore.open_store(path, mode="a", compress_level=9, workers=1) as store:
        assert store.options["compress_level"] == 9 and store.options["workers"] == 1
        store.put_many(*random_images(3, (8, 8, 3)))
    assert read_manifest(path).options["compress_level"] == 1
    with imgstore.open_store(path) as store:
        assert store.options["compress_level"] == 1 and len(store) == 33


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("png", {"files_per_dir": 0}),
        ("png", {"workers": -1}),
        ("png", {"workers": 0}),
        ("png", {"compress_level": "fast"}),
        ("png", {"compress_level": 42}),
        ("png", {"compress_level": True}),
        ("png", {"parallel_min": 2.5}),
        ("lmdb", {"block_bytes": "big"}),
        ("lmdb", {"block_bytes": -5}),
        ("lmdb", {"block_bytes": 1 << 40}),
        ("hdf5", {"chunk_bytes": None}),
        ("hdf5", {"chunk_bytes": 0}),
    ],
)
def test_bad_option_values_are_refused_before_anything_is_written(
    tmp_path: Path, backend: str, options: dict[str, object]
) -> None:
    (name,) = options
    with pytest.raises(imgstore.InvalidOptionError, match=name):
        imgstore.open_store(tmp_path / "s", backend, "w", **options)
    assert not (tmp_path / "s").exists() or not (tmp_path / "s" / MANIFEST_NAME).exists()
    _fill(tmp_path / "t", backend)
    with pytest.raises(imgstore.InvalidOptionError, match=name):
        imgstore.open_store(tmp_path / "t", mode="a", **options)


@pytest.mark.parametrize("flag", ["sync", "verify_reads"])
def test_flags_must_be_bools(tmp_path: Path, flag: str) -> None:
    with pytest.raises(imgstore.InvalidOptionError, match=flag):
        imgstore.open_store(tmp_path / "s", "lmdb", "w", **{flag: "yes"})


# ---------------------------------------------------------------------- 4. the writer lock (forks: ConcurrentAccess)


def test_a_writer_dropped_without_close_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _fill(path, "png")
    store = imgstore.open_store(path, mode="a")
    del store
    imgstore.open_store(path, mode="a").close()


# ---------------------------------------------------------------------- 6. damage is caught on every read (raw layouts)


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
@pytest.mark.parametrize("what", ["pixels", "label"])
def test_a_flipped_byte_is_never_returned_as_good(tmp_path: Path, backend: str, what: str) -> None:
    path = tmp_path / "s"
    images, labels = random_images(300, (8, 8, 3), seed=5)
    labels = np.arange(300, dtype=np.int64) + 10**12  # each label's bytes are unique, so easy to find
    with imgstore.open_store(path, backend, "w") as store:
        store.put_many(images, labels)
        data_file = store.file(store.files[0])
    target = images[123].tobytes() if what == "pixels" else images[123].tobytes()[-16:]
    files = [data_file] if data_file.is_file() else sorted(p for p in data_file.rglob("*") if p.is_file())
    for file in files:
        data = bytearray(file.read_bytes())
        at = data.find(target)
        if at >= 0:
            break
    assert at >= 0
    if what == "pixels":
        data[at + 5] ^= 0x01
    else:  # the label: LMDB keeps it after the block's pixels, HDF5 in its own dataset
        label_bytes = int(labels[123]).to_bytes(8, "little")
        assert data.count(label_bytes) == 1  # one copy: no stale page, no old heap data in a page's unused tail
        at = data.find(label_bytes)
        data[at] ^= 0x02
    file.write_bytes(bytes(data))
    with imgstore.open_store(path) as store:
        with pytest.raises(imgstore.CorruptStoreError, match="index 123"):
            store.get(123)
        for indices in (range(300), range(100, 130), [5, 123, 7], np.random.default_rng(0).permutation(300)):
            with pytest.raises(imgstore.CorruptStoreError):
                store.get_many(indices)
        with pytest.raises(imgstore.CorruptStoreError):
            list(store.iter_batches(64))
        store.get(122)  # the neighbours are fine
        np.testing.assert_array_equal(store.get_many(range(124, 300))[0], images[124:])
    with imgstore.open_store(path, verify_reads=False) as store:
        assert not np.array_equal(store.get(123)[0], images[123]) or store.get(123)[1] != labels[123]


# ---------------------------------------------------------------------- 7. index dtypes


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_out_of_range_whatever_their_dtype(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    _fill(path, backend)
    with imgstore.open_store(path) as store:
        for bad in ([2**63], [2**64 - 1], [0, 2**63 + 29], np.array([2**63], np.uint64), np.array([30], np.uint8)):
            with pytest.raises(imgstore.StoreIndexError):
                store.get_many(np.asarray(bad, dtype=np.uint64) if isinstance(bad, list) else bad)
        with pytest.raises(imgstore.StoreIndexError):
            store.get(np.uint64(2**64 - 1))
        with pytest.raises(imgstore.StoreIndexError):
            store.get_many([2**70])
        with pytest.raises(imgstore.InvalidOptionError):
            store.get_many([1.0, 2.0])
        with pytest.raises(imgstore.InvalidOptionError):
            store.get("3")  # type: ignore[arg-type]
        np.testing.assert_array_equal(store.get_many(np.array([29, 0], np.uint64))[1], store.get_many([29, 0])[1])


def test_slices_with_a_step_and_bools(tmp_path: Path) -> None:
    path = tmp_path / "s"
    images, labels = _fill(path, "lmdb")
    with imgstore.open_store(path) as store:
        np.testing.assert_array_equal(store.get_many(slice(0, 10, 2))[0], images[0:10:2])
        np.testing.assert_array_equal(store.get_many(slice(None, None, -3))[1], labels[::-3])
        with pytest.raises(imgstore.InvalidOptionError):
            store.iter_batches(True)
        with pytest.raises(imgstore.InvalidOptionError):
            store.get(True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- 14. imgstore's errors, not plain ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_images_raise_invalid_image_error(tmp_path: Path, backend: str) -> None:
    with imgstore.open_store(tmp_path / "s", backend, "w") as store:
        for bad in (
            np.zeros((2, 0, 8, 3), np.uint8),
            np.zeros((2, 8, 0), np.uint8),
            [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],  # ragged
            [[1, 2], [3]],
        ):
            with pytest.raises(imgstore.InvalidImageError):
                store.put_many(bad, [1, 2])
        with pytest.raises(imgstore.InvalidImageError):
            store.put(np.zeros((0, 8, 3), np.uint8), 1)
        with pytest.raises(imgstore.InvalidLabelError):
            store.put_many(np.zeros((2, 8, 8, 3), np.uint8), [3, True])
        with pytest.raises(imgstore.InvalidLabelError):
            store.put_many(np.zeros((2, 8, 8, 3), np.uint8), [3, np.True_])
        assert len(store) == 0
    with pytest.raises(imgstore.InvalidImageError):
        imgstore.open_store(tmp_path / "t", backend, "w", shape=(0, 3))
    with pytest.raises(imgstore.InvalidImageError):
        imgstore.open_store(tmp_path / "u", backend, "w", shape=(1 << 20, 1 << 20, 3))


@pytest.mark.parametrize(
    "manifest",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"format_version": 2, "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
        " " * (2 << 20),
        "\udcff" if False else "\x00\x01",
    ],
)
def test_malformed_manifests_are_corrupt_store_errors(tmp_path: Path, manifest: str) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(imgstore.CorruptStoreError):
        imgstore.open_store(tmp_path / "s")
    with pytest.raises(imgstore.CorruptStoreError):
        imgstore.open_store(tmp_path / "s", mode="a")
    with pytest.raises(imgstore.StoreExistsError):
        imgstore.open_store(tmp_path / "s", "lmdb", "w")


def test_a_manifest_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "s" / MANIFEST_NAME).mkdir(parents=True)
    with pytest.raises(imgstore.ImgStoreError):
        imgstore.open_store(tmp_path / "s")
    with pytest.raises(imgstore.StoreExistsError):
        imgstore.open_store(tmp_path / "s", "png", "w")
    assert (tmp_path / "s" / MANIFEST_NAME).is_dir()


def test_a_dangling_symlink_as_the_path(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(imgstore.StoreNotFoundError):
        imgstore.open_store(link)
    for mode in ("w", "a"):
        with pytest.raises(imgstore.StoreExistsError):
            imgstore.open_store(link, "lmdb", mode)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source = tmp_path / "src"
    source.mkdir()
    with read_only_view(source, tmp_path / "ro") as mounted:
        yield source, mounted


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_on_read_only_media_is_a_read_only_error(read_only_mount: tuple[Path, Path], backend: str) -> None:
    source, mounted = read_only_mount
    images, labels = _fill(source / "s", backend)
    for mode in ("a", "w"):
        with pytest.raises(imgstore.ReadOnlyError):
            imgstore.open_store(mounted / "s", backend, mode)
        with pytest.raises(imgstore.ReadOnlyError):
            imgstore.open_store(mounted / "new", backend, mode)
    with imgstore.open_store(mounted / "s") as store:
        check_store_content(store, images, labels)


# ---------------------------------------------------------------------- found by the adversarial pass after the fixes


def _sleep_in_workers(conn: Connection) -> None:
    from imgstore import parallel

    def task(lo: int, hi: int) -> None:
        if lo:  # the forked worker (the parent runs the first part itself)
            conn.send(os.getpid())
        time.sleep(60)

    parallel.run_split(task, 2, 2)


def test_parallel_workers_die_with_a_killed_writer() -> None:
    """A PNG encoder worker that outlived a SIGKILLed writer would overwrite the next writer's files."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    writer = context.Process(target=_sleep_in_workers, args=(send,))
    writer.start()
    worker_pid = receive.recv()
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
            with open(f"/proc/{worker_pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # a zombie: dead, waiting to be reaped
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_in_one_thread_keeps_reads_checked_in_another(tmp_path: Path, backend: str) -> None:
    import threading

    path = tmp_path / "s"
    _fill(path, backend, n=200)
    checksums = path / next(name for name in read_manifest(path).files if name.startswith("checksums"))
    data = bytearray(checksums.read_bytes())
    data[8 * 150] ^= 1  # record 150's checksum: its record reads as damaged
    checksums.write_bytes(bytes(data))
    with imgstore.open_store(path) as store:
        stop = threading.Event()

        def verify_again() -> None:
            while not stop.is_set():
                with pytest.raises(imgstore.CorruptStoreError):
                    store.verify(batch_size=50)

        thread = threading.Thread(target=verify_again)
        thread.start()
        try:
            passed = 0
            for _ in range(300):
                try:
                    store.get(150)
                    passed += 1
                except imgstore.CorruptStoreError:
                    pass
        finally:
            stop.set()
            thread.join()
        assert passed == 0 and store.verify_reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_dimensions_than_a_manifest_holds_are_refused(tmp_path: Path, backend: str) -> None:
    with imgstore.open_store(tmp_path / "s", backend, "w") as store:
        with pytest.raises(imgstore.InvalidImageError):
            store.put_many(np.zeros((2, *(1,) * 9), np.uint8), [1, 2])
    with pytest.raises(imgstore.InvalidImageError):
        imgstore.open_store(tmp_path / "t", backend, "w", shape=(1,) * 9)
    with imgstore.open_store(tmp_path / "s") as store:
        assert len(store) == 0


def _append_five(path: str) -> None:
    with imgstore.open_store(path, mode="a") as writer:
        writer.put_many(*random_images(5, (8, 8, 3), seed=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_refresh_leaves_the_handle_as_it_was(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    images, labels = _fill(path, backend, n=10)
    with imgstore.open_store(path) as reader:
        appender = multiprocessing.get_context("spawn").Process(target=_append_five, args=(str(path),))
        appender.start()  # another process (HDF5 opens a file one way per process)
        appender.join(60)
        assert appender.exitcode == 0
        checksums = path / next(name for name in read_manifest(path).files if name.startswith("checksums"))
        os.truncate(checksums, 8 * 12)
        with pytest.raises(imgstore.CorruptStoreError):
            reader.refresh()
        assert len(reader) == 10
        check_store_content(reader, images, labels)
        with pytest.raises(imgstore.StoreIndexError):
            reader.get(12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_mode_keeps_a_users_backups_named_like_store_files(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    _fill(path, backend)
    backups = [path / f"{name}.bak" for name in read_manifest(path).files]
    for backup in backups:
        backup.write_text("a user's copy")
    _fill(path, backend, n=3, seed=1)
    assert all(backup.read_text() == "a user's copy" for backup in backups)


def test_overlapping_out_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _fill(path, "lmdb", n=40)
    buffer = np.zeros(40 * 8 * 8 * 3, np.uint8)
    images = buffer.reshape(40, 8, 8, 3)
    labels = buffer[-320:].view(np.int64)
    with imgstore.open_store(path) as store:
        with pytest.raises(imgstore.InvalidOptionError, match="overlap"):
            store.get_many(range(40), out=(images, labels))
        with pytest.raises(imgstore.InvalidOptionError):
            store.get_many(range(40), out=images)  # type: ignore[arg-type]


def test_a_link_planted_as_the_manifest_temporary_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _fill(path, "lmdb")
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    (path / f".{MANIFEST_NAME}.{os.getpid()}.tmp").symlink_to(outside)
    with imgstore.open_store(path, mode="a") as store:
        with pytest.raises(imgstore.StoreIOError):
            store.put(np.zeros((8, 8, 3), np.uint8), 1)
        assert len(store) == 30
    assert outside.read_text() == "not the store's"
    with imgstore.open_store(path) as store:
        assert len(store) == 30 and not (path / MANIFEST_NAME).is_symlink()


@pytest.mark.parametrize("path", [None, 3, "bad\0name"])
def test_paths_that_are_no_paths(path: object) -> None:
    with pytest.raises(imgstore.InvalidOptionError):
        imgstore.open_store(path)  # type: ignore[arg-type]
    with pytest.raises(imgstore.InvalidOptionError):
        imgstore.open_store(path, "lmdb", "w")  # type: ignore[arg-type]


def test_odd_indices_are_imgstore_errors(tmp_path: Path) -> None:
    path = tmp_path / "s"
    images, _ = _fill(path, "hdf5", n=20)
    with imgstore.open_store(path) as store:
        np.testing.assert_array_equal(store.get_many(np.array([0, 1], dtype=object))[0], images[[0, 1]])
        for bad in (slice(0, 7, 0), [0, True], np.array(["a"], dtype=object)):
            with pytest.raises(imgstore.InvalidOptionError):
                store.get_many(bad)  # type: ignore[arg-type]
        for size in (2.5, "3", None):
            with pytest.raises(imgstore.InvalidOptionError):
                store.verify(batch_size=size)  # type: ignore[arg-type]
            with pytest.raises(imgstore.InvalidOptionError):
                store.iter_batches(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["imgstore.json", "checksums", "groups"])
def test_a_fifo_in_place_of_a_store_file_is_an_error_not_a_hang(tmp_path: Path, which: str) -> None:
    """A FIFO (or device) where a store file should be would block a reader forever: it is damage."""
    import glob
    import subprocess
    import sys

    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w") as store:
        store.put_many(*random_images(300, (8, 8, 3), seed=1))
    file = glob.glob(str(path / (which if "." in which else f"{which}-*")))[0]
    os.unlink(file)
    os.mkfifo(file)
    script = (
        "import imgstore\n"
        f"try:\n    s = imgstore.open_store({str(path)!r}); s.get(0); s.get_many(range(300)); print('read')\n"
        "except imgstore.CorruptStoreError as exc:\n    print('CorruptStoreError', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("CorruptStoreError") and "not a regular file" in result.stdout, result
