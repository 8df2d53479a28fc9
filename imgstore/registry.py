"""Backends by name: built-ins listed here, third-party ones through the ``imgstore.backends`` entry-point group.

Imports are lazy so that ``import imgstore`` never needs a backend's dependency; a missing one is
reported with the command that installs it. Entry points are read once per process, a loaded class
is kept, and what a name loads is checked: a :class:`~imgstore.store.Store` subclass whose ``name``
is that name (a mismatch would create stores that cannot be reopened).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from imgstore.errors import BackendNotFoundError, InvalidOptionError, MissingDependencyError

if TYPE_CHECKING:
    from imgstore.store import Store

ENTRY_POINT_GROUP = "imgstore.backends"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    install_hint: str


_registry: dict[str, BackendSpec] = {}
_loaded: dict[str, type[Store]] = {}
_entry_points: dict[str, BackendSpec] | None = None
_guard = threading.Lock()


def register_backend(name: str, target: str, install_hint: str | None = None, *, clobber: bool = False) -> None:
    """Register ``target`` ("package.module:StoreClass") under ``name``; it is imported on first use.

    Registering a name that is taken raises :class:`InvalidOptionError` unless ``clobber=True``.
    """
    module, _, attribute = target.partition(":")
    if not name or not module or not attribute:
        raise InvalidOptionError(f"register_backend needs a name and a 'module:Class' target, got {name!r}, {target!r}")
    hint = install_hint or f"install the package that provides {module}"
    with _guard:
        if name in _registry and not clobber and _registry[name].target != target:
            raise InvalidOptionError(
                f"a backend named {name!r} is registered already ({_registry[name].target}); "
                "pass clobber=True to replace it"
            )
        _registry[name] = BackendSpec(name, target, hint)
        _loaded.pop(name, None)


register_backend("png", "imgstore.backends.png:PngStore", "pip install Pillow")
register_backend("lmdb", "imgstore.backends.lmdb:LmdbStore", "pip install lmdb")
register_backend("hdf5", "imgstore.backends.hdf5:Hdf5Store", "pip install h5py")
register_backend("zarr", "imgstore.backends.zarr:ZarrStore", "pip install 'imgstore-ml[zarr]'")
register_backend(
    "sqlite",
    "imgstore.backends.sqlite:SqliteStore",
    "sqlite3 is in Python's standard library; a Python built without it needs libsqlite3-dev, then a rebuild",
)
register_backend("arrow", "imgstore.backends.arrow:ArrowStore", "pip install 'imgstore-ml[arrow]'")
register_backend("memmap", "imgstore.backends.memmap:MemmapStore", "pip install 'imgstore-ml[memmap]'")
register_backend("tar", "imgstore.backends.tar:TarStore", "pip install 'imgstore-ml[tar]'")
register_backend("tiledb", "imgstore.backends.tiledb:TileDBStore", "pip install 'imgstore-ml[tiledb]'")
register_backend("leveldb", "imgstore.backends.leveldb:LeveldbStore", "pip install 'imgstore-ml[leveldb]'")


def _entry_point_specs() -> dict[str, BackendSpec]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {
            ep.name: BackendSpec(ep.name, ep.value, f"reinstall the package that registers {ep.value}")
            for ep in entry_points(group=ENTRY_POINT_GROUP)
        }
    return _entry_points


def refresh_entry_points() -> None:
    """Read the entry points again (after installing a package into a running process)."""
    global _entry_points
    with _guard:
        _entry_points = None
        _loaded.clear()


def available_backends() -> list[str]:
    """Names of every registered backend, built-in first (their dependencies may still be missing)."""
    return list(_registry) + sorted(set(_entry_point_specs()) - set(_registry))


def installed_backends() -> list[str]:
    """The registered backends whose libraries import here (the others name the extra to install)."""
    installed = []
    for name in available_backends():
        try:
            get_backend(name)
        except MissingDependencyError:
            continue
        installed.append(name)
    return installed


def get_backend(name: str) -> type[Store]:
    """The store class registered as ``name``, imported now (once per process)."""
    if not isinstance(name, str):
        raise BackendNotFoundError(f"a backend name is a string, got {type(name).__name__}")
    cls = _loaded.get(name)
    if cls is not None:
        return cls
    spec = _registry.get(name) or _entry_point_specs().get(name)
    if spec is None:
        raise BackendNotFoundError(f"no backend named {name!r}; available: {', '.join(available_backends())}")
    cls = _load(spec)
    _loaded[name] = cls
    return cls


def _load(spec: BackendSpec) -> type[Store]:
    from imgstore.store import Store

    module_name, _, class_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise  # the backend module itself is missing: a packaging bug, not a user's missing extra
        raise MissingDependencyError(
            f"backend {spec.name!r} needs the package {exc.name!r}, which is not installed: {spec.install_hint}"
        ) from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Store)):
        raise BackendNotFoundError(f"backend {spec.name!r}: {spec.target} is not an imgstore Store class")
    if getattr(cls, "name", None) != spec.name:
        raise BackendNotFoundError(
            f"backend {spec.name!r}: {spec.target} calls itself {getattr(cls, 'name', None)!r}; a store it made "
            "could not be reopened by name"
        )
    return cls
