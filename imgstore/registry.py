"""Backends by name: built-ins listed here, third-party ones through the ``imgstore.backends`` entry-point group.

Imports are lazy so that ``import imgstore`` never needs a backend's dependency; a missing one is
reported with the command that installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from imgstore.errors import BackendNotFoundError, MissingDependencyError

if TYPE_CHECKING:
    from imgstore.store import Store

ENTRY_POINT_GROUP = "imgstore.backends"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    install_hint: str


_registry: dict[str, BackendSpec] = {}


def register_backend(name: str, target: str, install_hint: str | None = None) -> None:
    """Register ``target`` ("package.module:StoreClass") under ``name``; it is imported on first use."""
    hint = install_hint or f"install the package that provides {target.partition(':')[0]}"
    _registry[name] = BackendSpec(name, target, hint)


register_backend("png", "imgstore.backends.png:PngStore", "pip install Pillow")
register_backend("lmdb", "imgstore.backends.lmdb:LmdbStore", "pip install lmdb")
register_backend("hdf5", "imgstore.backends.hdf5:Hdf5Store", "pip install h5py")


def _entry_point_specs() -> dict[str, BackendSpec]:
    return {
        ep.name: BackendSpec(ep.name, ep.value, f"reinstall the package that registers {ep.value}")
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    }


def available_backends() -> list[str]:
    """Names of every registered backend, built-in first (their dependencies may still be missing)."""
    return list(_registry) + sorted(set(_entry_point_specs()) - set(_registry))


def get_backend(name: str) -> type[Store]:
    """The store class registered as ``name``, imported now."""
    spec = _registry.get(name) or _entry_point_specs().get(name)
    if spec is None:
        raise BackendNotFoundError(f"no backend named {name!r}; available: {', '.join(available_backends())}")
    module_name, _, class_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise  # the backend module itself is missing: a packaging bug, not a user's missing extra
        raise MissingDependencyError(
            f"backend {name!r} needs the package {exc.name!r}, which is not installed: {spec.install_hint}"
        ) from exc
    return getattr(module, class_name)
