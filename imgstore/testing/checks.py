"""Helpers shared by the suites, the project's tests and the benchmarks, and the base of every suite class."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from imgstore import Store, open_store


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


def check_store_content(store: Store, images: np.ndarray, labels: np.ndarray) -> None:
    """The store holds exactly these records in this order, by every read path."""
    assert len(store) == len(images)
    got_images, got_labels = store.get_many(range(len(store)))
    if len(images) == 0 and store.shape is None:  # no image has fixed the shape yet
        assert got_images.size == 0
    else:
        np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    if len(images):
        for i in {0, len(images) // 2, len(images) - 1}:
            image, label = store.get(i)
            np.testing.assert_array_equal(image, images[i])
            assert label == labels[i] and type(label) is int


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
    """What every suite class knows of the backend it tests; a test class sets ``backend`` once for all of them."""

    #: the registered name of the backend under test
    backend: ClassVar[str]
    #: options every store of the tests is created with (layout options, handle settings)
    options: ClassVar[dict[str, Any]] = {}
    #: for a backend registered with ``register_backend`` in a module (not through the
    #: ``imgstore.backends`` entry points): the module, imported before each test and by the processes
    #: that are not forked from the test's (the fuzz worker, spawned children, ``python -c`` scripts)
    backend_module: ClassVar[str | None] = None

    @pytest.fixture(autouse=True)
    def _backend_registered(self) -> None:
        import_backend_module(self.backend_module)  # here too, so the test module need not import it

    def create(self, path: Path, **kwargs: Any) -> Store:
        """A new store (mode ``"w"``) of this backend, with the class's options."""
        return open_store(path, self.backend, "w", **{**self.options, **kwargs})

    def fill(self, path: Path, n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A new store of ``n`` 8x8x3 records in one commit; returns them."""
        images, labels = random_images(n, (8, 8, 3), seed)
        with self.create(path) as store:
            store.put_many(images, labels)
        return images, labels
