"""open_store, the registry and the error types: behaviour shared by all backends."""

from __future__ import annotations

import json
import multiprocessing
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore import errors, open_store
from imgstore.manifest import MANIFEST_NAME
from imgstore.testing import check_store_content, random_images


def test_every_error_is_an_imgstore_error_and_a_builtin() -> None:
    builtins = {
        errors.StoreNotFoundError: FileNotFoundError,
        errors.StoreExistsError: FileExistsError,
        errors.ReadOnlyError: PermissionError,
        errors.InvalidImageError: ValueError,
        errors.InvalidLabelError: ValueError,
        errors.BackendNotFoundError: ValueError,
        errors.MissingDependencyError: ImportError,
        errors.StoreFullError: OSError,
        errors.StoreIndexError: IndexError,
        errors.DatasetNotFoundError: FileNotFoundError,
    }
    for cls, builtin in builtins.items():
        assert issubclass(cls, errors.ImgStoreError) and issubclass(cls, builtin), cls
        assert str(cls("a clear message")) == "a clear message"


def test_unknown_backend_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(imgstore.BackendNotFoundError, match="available: png, lmdb, hdf5"):
        open_store(tmp_path / "s", "zip", "w")
    assert not (tmp_path / "s").exists()


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(imgstore.InvalidOptionError, match="mode"):
        open_store(tmp_path / "s", "lmdb", "x")  # type: ignore[arg-type]


def test_missing_store_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "nothing")
    with pytest.raises(imgstore.StoreNotFoundError, match="backend="):
        open_store(tmp_path / "nothing", mode="a")


def test_a_file_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    with pytest.raises(FileExistsError):
        open_store(target, "hdf5", "w")
    with pytest.raises(imgstore.StoreNotFoundError):
        open_store(target)
    assert target.read_text() == "precious"


def test_a_non_store_directory_is_never_emptied(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("precious")
    with pytest.raises(imgstore.StoreExistsError, match="not an imgstore store"):
        open_store(tmp_path / "data", "lmdb", "w")
    assert (tmp_path / "data" / "thesis.tex").read_text() == "precious"


def test_reopening_with_another_backend_name_is_refused(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", "lmdb", "w") as store:
        store.put_many(*random_images(2))
    with pytest.raises(imgstore.InvalidOptionError, match="is a 'lmdb' store"):
        open_store(tmp_path / "s", "hdf5", "a")


def test_another_format_version_is_refused_clearly(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", "hdf5", "w") as store:
        store.put_many(*random_images(2))
    manifest = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (tmp_path / "s" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(imgstore.FormatVersionError, match="version 99"):
        open_store(tmp_path / "s")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"format_version": 1}',
        '{"format_version": 1, "backend": "png", "shape": [32], "count": -4, "dtype": "uint8"}',
    ],
)
def test_a_damaged_manifest_is_a_corrupt_store(tmp_path: Path, text: str) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST_NAME).write_text(text)
    with pytest.raises(imgstore.CorruptStoreError):
        open_store(tmp_path / "s")


def test_shape_given_up_front_is_enforced(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", "lmdb", "w", shape=(28, 28)) as store:
        with pytest.raises(imgstore.InvalidImageError, match=r"\(28, 28\)"):
            store.put_many(*random_images(2))
        store.put_many(*random_images(2, (28, 28)))
    with pytest.raises(imgstore.InvalidImageError):
        open_store(tmp_path / "t", "lmdb", "w", shape=(0, 3))


def test_png_refuses_shapes_png_cannot_hold_before_writing(tmp_path: Path) -> None:
    with pytest.raises(imgstore.InvalidImageError, match="C in 1, 3, 4"):
        open_store(tmp_path / "s", "png", "w", shape=(32, 32, 2))
    with open_store(tmp_path / "t", "png", "w") as store:
        with pytest.raises(imgstore.InvalidImageError):
            store.put_many(*random_images(3, (8, 8, 5)))
        assert len(store) == 0 and store.shape is None


def test_options_persist_in_the_manifest(tmp_path: Path) -> None:
    with open_store(tmp_path / "s", "png", "w", compress_level=1) as store:
        store.put_many(*random_images(2))
    with open_store(tmp_path / "s", mode="a") as store:
        assert store.options["compress_level"] == 1


# ---------------------------------------------------------------------- registry


def _write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_missing_dependency_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "needs_missing_dep", "import a_package_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(imgstore.registry, "_registry", dict(imgstore.registry._registry))
    imgstore.register_backend("fancy", "needs_missing_dep:FancyStore", "pip install 'imgstore-ml[fancy]'")
    with pytest.raises(imgstore.MissingDependencyError, match=r"a_package_nobody_installed.*imgstore-ml\[fancy\]"):
        open_store(tmp_path / "s", "fancy", "w")
    assert "fancy" in imgstore.available_backends() and "fancy" not in imgstore.installed_backends()
    assert {"png", "lmdb", "hdf5"} <= set(imgstore.installed_backends())


def test_third_party_backend_via_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that declares an ``imgstore.backends`` entry point is found with no registration code."""
    _write_module(
        tmp_path,
        "thirdparty_store",
        """
        from imgstore.backends.hdf5 import Hdf5Store
        from imgstore.options import Option

        class SmallChunkStore(Hdf5Store):
            name = "hdf5-small-chunks"
            option_specs = {"chunk_bytes": Option(4096, 1, 1 << 31, fixed=True)}
        """,
    )
    dist = tmp_path / "thirdparty_store-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-store\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[imgstore.backends]\nhdf5-small-chunks = thirdparty_store:SmallChunkStore\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(imgstore.registry, "_entry_points", None)  # entry points are read once a process
    monkeypatch.setattr(imgstore.registry, "_loaded", {})
    assert "hdf5-small-chunks" in imgstore.available_backends()
    images, labels = random_images(40)
    with open_store(tmp_path / "s", "hdf5-small-chunks", "w") as store:
        store.put_many(images, labels)
    with open_store(tmp_path / "s") as store:
        assert store.backend == "hdf5-small-chunks"
        check_store_content(store, images, labels)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("from imgstore.backends.hdf5 import Hdf5Store as Misnamed\n", "calls itself 'hdf5'"),
        ("class Misnamed:\n    name = 'odd'\n", "not an imgstore Store class"),
        ("Misnamed = 42\n", "not an imgstore Store class"),
    ],
)
def test_registry_checks_what_a_name_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    module = f"odd_backend_{abs(hash(source))}"  # a fresh module per case: imports are cached
    _write_module(tmp_path, module, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(imgstore.registry, "_registry", dict(imgstore.registry._registry))
    monkeypatch.setattr(imgstore.registry, "_loaded", {})
    imgstore.register_backend("odd", f"{module}:Misnamed")
    with pytest.raises(imgstore.BackendNotFoundError, match=message):
        open_store(tmp_path / "s", "odd", "w")
    assert not (tmp_path / "s" / MANIFEST_NAME).exists()


def test_registry_refuses_a_clobber_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imgstore.registry, "_registry", dict(imgstore.registry._registry))
    monkeypatch.setattr(imgstore.registry, "_loaded", dict(imgstore.registry._loaded))
    with pytest.raises(imgstore.InvalidOptionError, match="clobber"):
        imgstore.register_backend("lmdb", "somewhere:Else")
    assert imgstore.get_backend("lmdb").__name__ == "LmdbStore"
    imgstore.register_backend("lmdb", "imgstore.backends.lmdb:LmdbStore")  # the same target again is fine
    imgstore.register_backend("lmdb", "imgstore.backends.hdf5:Hdf5Store", clobber=True)
    with pytest.raises(imgstore.BackendNotFoundError, match="calls itself"):
        imgstore.get_backend("lmdb")


def test_registry_loads_a_class_once() -> None:
    assert imgstore.get_backend("png") is imgstore.get_backend("png")
    with pytest.raises(imgstore.BackendNotFoundError):
        imgstore.get_backend(["png"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- LMDB map growth


def test_lmdb_map_grows_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far past the initial map size, through bulk and single writes: never a MapFullError."""
    from imgstore.backends import lmdb as lmdb_backend

    monkeypatch.setattr(lmdb_backend, "_INITIAL_MAP_SIZE", 64 << 20)  # the default (1 TiB) practically never grows

    images, labels = random_images(200, (128, 128, 3))  # 9.8 MB a batch
    total = 0
    with open_store(tmp_path / "s", "lmdb", "w", sync=False) as store:
        while total * images[0].nbytes < 3 * lmdb_backend._INITIAL_MAP_SIZE:
            store.put_many(images, labels)
            store.put(images[0], 3)
            total += len(images) + 1
        assert store._env.info()["map_size"] > lmdb_backend._INITIAL_MAP_SIZE
    with open_store(tmp_path / "s") as store:
        assert len(store) == total
        np.testing.assert_array_equal(store.get(-1)[0], images[0])
        np.testing.assert_array_equal(store.get_many(range(total - 201, total - 1))[0], images)


def _read_after_writer_grew_map(
    path: str, ready: multiprocessing.Event, grown: multiprocessing.Event, out: multiprocessing.Queue
) -> None:
    with open_store(path) as store:
        store.get(0)  # the map is mapped at its old size now
        ready.set()
        grown.wait(60)
        images, labels = store.get_many(range(len(store)))
        out.put((len(store), int(images.sum()), labels.tolist()))


def test_lmdb_reader_survives_a_writer_growing_the_map(tmp_path: Path) -> None:
    images, labels = random_images(50, (128, 128, 3))
    path = tmp_path / "s"
    with open_store(path, "lmdb", "w", sync=False) as store:
        store.put_many(images, labels)
    context = multiprocessing.get_context("spawn")
    ready, grown, out = context.Event(), context.Event(), context.Queue()
    reader = context.Process(target=_read_after_writer_grew_map, args=(str(path), ready, grown, out))
    reader.start()
    assert ready.wait(60)
    with open_store(path, mode="a", sync=False) as store:
        for _ in range(12):
            store.put_many(images, labels)  # ~100 MB more: the map must grow
    grown.set()
    count, pixel_sum, got_labels = out.get(timeout=60)
    reader.join(60)
    assert reader.exitcode == 0
    assert count == 50 and pixel_sum == int(images.sum()) and got_labels == labels.tolist()


def test_lmdb_values_are_raw_pixels_and_label_not_pickles(tmp_path: Path) -> None:
    """No store format holds a pickle: the LMDB values are raw pixel bytes plus the label."""
    import lmdb

    images, labels = random_images(3)
    with open_store(tmp_path / "s", "lmdb", "w") as store:
        store.put_many(images, labels)
        environment = store.file("lmdb")
    env = lmdb.open(str(environment), readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get((0).to_bytes(8, "big"))  # block 0: the three images' pixels, then their labels
    env.close()
    assert value == images.tobytes() + labels.astype("<i8").tobytes()


def test_a_bad_file_is_named_by_its_path_when_given(tmp_path: Path) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(random_images(1, (8, 8, 3))[0][0]).save(buffer, "PNG")
    good, bad = buffer.getvalue(), b"GIF89a not really"
    with open_store(tmp_path / "s", "png", "w", codec="keep") as store:
        with pytest.raises(errors.InvalidImageError, match=r"^image 1 \('cats/b\.gif'\): "):
            store.put_encoded_many([good, bad], [0, 1], paths=["cats/a.png", "cats/b.gif"])
        with pytest.raises(errors.InvalidImageError, match=r"^image 1: "):  # no paths: the index
            store.put_encoded_many([good, bad], [0, 1])
        with pytest.raises(errors.InvalidImageError, match=r"^'cats/b\.gif': "):
            store.prepare_encoded(bad, 1, path=Path("cats/b.gif"))
        assert len(store) == 0
        store.put_prepared([store.prepare_encoded(good, 0, path="cats/a.png")])
        assert store.source_path(0) == "cats/a.png"


def _get_first_in_child(store: imgstore.Store, index: int, conn: object) -> None:
    image, label = store.get(index)  # the child's first call: get's hot path must not take the parent's handles
    conn.send((image, label, store._pid == os.getpid()))  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["memmap", "sqlite"])
def test_get_first_in_a_forked_child_opens_the_childs_own_handles(tmp_path: Path, backend: str) -> None:
    images, labels = random_images(6, (4, 5, 3), seed=3)
    with open_store(tmp_path / "s", backend, "w") as store:
        store.put_many(images, labels)
    with open_store(tmp_path / "s") as store:
        store.get(2)  # the parent's handles are live at the fork
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_get_first_in_child, args=(store, 4, send))
        child.start()
        image, label, reopened = receive.recv()
        child.join(30)
        assert child.exitcode == 0 and reopened
        np.testing.assert_array_equal(image, images[4])
        assert label == labels[4]
        assert store.get(5)[1] == labels[5]  # the parent's handle still reads
