"""Helpers shared by the suites, the project's tests and the benchmarks, and the base of every suite class."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from imgstore import Store, open_store
from imgstore.testing.layouts import Images, Layout, Records


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount_point`` (made here), unmounted after: a disk that fills up.

    Skips the test where it cannot be mounted (mounting needs root).
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if result.returncode:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@contextlib.contextmanager
def read_only_view(source: Path, mounted: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``mounted`` (a read-only bind mount), unmounted after; skips without root."""
    mounted.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    try:
        subprocess.run(["mount", "--bind", str(source), str(mounted)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a read-only mount here: {exc}")
    try:
        yield mounted
    finally:
        subprocess.run(["umount", str(mounted)], check=False)


def random_images(n: int, shape: tuple[int, ...] = (32, 32, 3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images that exercise every byte value, and labels 0..9: round trips must be exact."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def check_owned_array(array: np.ndarray) -> None:
    """Returned arrays belong to the caller: owned, writable, C-contiguous."""
    assert isinstance(array, np.ndarray)
    assert array.flags.owndata or array.base is None or _owns_through_base(array), "array is a view into the store"
    assert array.flags.writeable
    assert array.flags.c_contiguous


def _owns_through_base(array: np.ndarray) -> bool:
    # A reshape of a fresh array is still the caller's own memory (no library buffer behind it).
    base = array.base
    while isinstance(base, np.ndarray) and not base.flags.owndata:
        base = base.base
    return isinstance(base, np.ndarray) and base.flags.owndata


def check_images_equal(got: Any, expected: Images) -> None:
    """``got`` (a batch array, or a list of arrays for varied shapes) is exactly ``expected``: pixels and shapes."""
    if isinstance(expected, np.ndarray) and isinstance(got, np.ndarray):
        assert got.dtype == np.uint8
        if len(expected) == 0:  # a store without a shape yet gives [0] or [0, *shape]
            assert got.size == 0
            return
        assert got.shape == expected.shape, (got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected)
        return
    assert isinstance(got, list), f"a store of varied shapes gives a list of images, not {type(got).__name__}"
    assert len(got) == len(expected)
    for k, (image, want) in enumerate(zip(got, expected, strict=True)):
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.shape == want.shape, f"image {k}: shape {image.shape}, expected {want.shape}"
        np.testing.assert_array_equal(image, want, err_msg=f"image {k}")


def check_store_content(store: Store, images: Images, labels: np.ndarray) -> None:
    """The store holds exactly these records in this order, by every read path.

    ``images`` is what reading must give: one array, or a list of arrays in a store of varied shapes.
    """
    assert len(store) == len(images)
    got_images, got_labels = store.get_many(range(len(store)))
    check_images_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    if len(images):
        for i in {0, len(images) // 2, len(images) - 1}:
            image, label = store.get(i)
            check_images_equal([image], [images[i]])
            assert label == labels[i] and type(label) is int


def check_threads_read(
    data: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    threads: int = 4,
    steps: int = 25,
    disturb: Callable[[int], None] | None = None,
) -> None:
    """``threads`` threads each read ``steps`` random batches of 3-7 records from the one handle ``data``
    and check them; with ``disturb``, thread 0 calls ``disturb(step)`` instead (e.g. opens shards)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for step in range(steps):
            if worker == 0 and disturb is not None:
                disturb(step)
                continue
            picked = rng.choice(len(images), int(rng.integers(3, 8)), replace=False)
            got, got_labels = data.get_many(picked)
            assert np.array_equal(got, images[picked]) and np.array_equal(got_labels, labels[picked]), picked

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))


def check_records(store: Store, records: Records) -> None:
    """The store holds exactly ``records``: decoded as expected, and a ``keep`` store's files byte for byte."""
    check_store_content(store, records.expected, records.labels)
    if records.blobs is not None and len(records):
        blobs, labels = store.get_encoded_many(range(len(records)))
        assert blobs == records.blobs, "get_encoded_many gives other bytes than were put"
        np.testing.assert_array_equal(labels, records.labels)


# ---------------------------------------------------------------------- other interpreters


def import_backend_module(module: str | None) -> None:
    """Import the module that registers the backend (``register_backend``), in a process that did not fork."""
    if module:
        importlib.import_module(module)


class ImportOnUnpickle:
    """Put first in a spawned child's arguments: the module is imported before the next ones (a store) unpickle."""

    def __init__(self, module: str | None) -> None:
        self.module = module

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_imported, (self.module,))


def _imported(module: str | None) -> None:
    import_backend_module(module)


def child_env() -> dict[str, str]:
    """The environment for a new interpreter that must import what this one imports.

    ``PYTHONPATH`` is this process's ``sys.path``: imgstore, and a backend module that pytest made
    importable (rootdir insertion) but no installation did.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(entry) for entry in sys.path if entry))
    return env


# ---------------------------------------------------------------------- the base of every suite class


class BackendTest:
    """What every suite class knows of the backend it tests; a test class sets ``backend`` once for all of them.

    The class attributes ``codec``, ``codec_params``, ``image_mode``, ``varied`` and ``fixed_shape``
    pick the *layout* of every store the suites make (:class:`~imgstore.testing.layouts.Layout`):
    the default is raw pixels of one shape; ``varied = True`` gives images of many shapes (a list
    per batch); ``codec = "keep"`` stores JPEG, PNG and WebP files as they are. A backend that does
    not implement ``_write_blobs`` gets the raw layout's tests; its classes of other layouts skip.
    """

    #: the registered name of the backend under test
    backend: ClassVar[str]
    #: options every store of the tests is created with (layout options, handle settings)
    options: ClassVar[dict[str, Any]] = {}
    #: for a backend registered with ``register_backend`` in a module (not through the
    #: ``imgstore.backends`` entry points): the module, imported before each test and by the processes
    #: that are not forked from the test's (the fuzz worker, spawned children, ``python -c`` scripts)
    backend_module: ClassVar[str | None] = None
    #: the layout: how records are stored (``raw``, ``png``, ``jpeg``, ``webp``, ``keep``) ...
    codec: ClassVar[str] = "raw"
    #: ... with these codec parameters (e.g. ``{"quality": 75}``) ...
    codec_params: ClassVar[dict[str, Any]] = {}
    #: ... decoded to this mode (``"RGB"``, ``"L"``; None: as stored) ...
    image_mode: ClassVar[str | None] = None
    #: ... images of many shapes (``shape=None``) ...
    varied: ClassVar[bool] = False
    #: ... or all of this shape, given at creation (needed for an encoded layout that is not varied)
    fixed_shape: ClassVar[tuple[int, ...] | None] = None

    @property
    def layout(self) -> Layout:
        return Layout(self.codec, self.codec_params, self.image_mode, self.varied, self.fixed_shape)

    @pytest.fixture(autouse=True)
    def _backend_registered(self) -> None:
        self.check_layout_supported()

    def check_layout_supported(self) -> None:
        """Import the backend's module; skip where the backend cannot hold stores of the class's layout."""
        import_backend_module(self.backend_module)  # here too, so the test module need not import it
        if self.layout.encoded:
            missing = missing_encoded_primitives(self.backend)
            if missing:
                pytest.skip(missing)

    @property
    def scaled(self) -> bool:
        """Whether the robustness loops run fewer rounds: encoded records cost ~10x raw ones to make and write.

        The ``slow`` variants run the full counts on every layout.
        """
        return self.layout.encoded

    def skip_unless_encoded(self, what: str) -> None:
        """Skip a test of what only encoded stores have (``what``) in a class of the fixed raw layout."""
        missing = missing_encoded_primitives(self.backend)
        if missing:
            pytest.skip(f"{what}: {missing}")
        if not self.layout.encoded:
            pytest.skip(f"{what}: only encoded stores have it; this class tests raw pixels of one shape")

    def create(self, path: Path, **kwargs: Any) -> Store:
        """A new store (mode ``"w"``) of this backend, with the class's layout and options."""
        return open_store(path, self.backend, "w", **{**self.layout.store_kwargs(), **self.options, **kwargs})

    def records(self, n: int, shape: tuple[int, ...] = (32, 32, 3), seed: int = 0) -> Records:
        """``n`` records of the class's layout (images of ``shape`` where the layout does not decide)."""
        return self.layout.records(n, shape, seed)

    def files_of(self, records: Records) -> list[bytes]:
        """Files a store of this layout takes with put_encoded_many that decode to ``records.expected``."""
        if records.blobs is not None:
            return records.blobs
        from imgstore.codecs import get_codec

        codec = get_codec(self.codec, **self.codec_params)  # the store's own encoding of the same arrays
        assert records.arrays is not None
        return [codec.encode(array) for array in records.arrays]

    def fill(self, path: Path, n: int = 30, seed: int = 0) -> Records:
        """A new store of ``n`` records (8x8x3 where the layout does not decide) in one commit; returns them."""
        records = self.records(n, (8, 8, 3), seed)
        with self.create(path) as store:
            records.put(store)
        return records


def missing_encoded_primitives(backend: str) -> str | None:
    """Why ``backend`` cannot hold encoded or varied-shape stores (the primitives it lacks), or None."""
    from imgstore.registry import get_backend

    cls = get_backend(backend)
    missing = [name for name in ("_write_blobs", "_read_blobs") if getattr(cls, name) is getattr(Store, name)]
    if not missing:
        return None
    return (
        f"the {backend} backend does not implement {' and '.join(missing)}: it holds no encoded or varied-shape stores"
    )
