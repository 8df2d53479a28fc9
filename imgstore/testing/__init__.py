"""The test suites every backend passes (pytest and Hypothesis needed), and helpers for tests and benchmarks.

A backend's tests are one class::

    from imgstore.testing import StoreConformance, StoreRobustness

    class TestMyBackend(StoreConformance, StoreRobustness):
        backend = "mine"
        options = {}  # optional: what every store of the tests is created with
        backend_module = None  # or the module that calls register_backend("mine", ...)

    class TestMyBackendJpegFiles(StoreConformance, StoreRobustness):  # the same suites on another layout
        backend = "mine"
        codec, varied, image_mode = "keep", True, "RGB"  # JPEG/PNG/WebP files of many shapes, as given

A class's *layout* (``codec``, ``codec_params``, ``image_mode``, ``varied``, ``fixed_shape``; see
:class:`BackendTest` and :mod:`imgstore.testing.layouts`) decides what every store of its tests
is; the default is raw pixels of one shape. Tests that only make sense for one kind of store skip
on the others, saying why; a backend without ``_write_blobs`` skips every layout but the default.

Third-party backends inherit them the same way, as zarr's stores do with ``zarr.testing``.

- :class:`StoreConformance` (``conformance``): the API's behaviour, round trips (Hypothesis), modes.
- :class:`StoreRobustness` is all four opt-in suites, each usable alone:
  :class:`CrashSafety` (``crash``: writers killed with SIGKILL), :class:`FaultTolerance`
  (``faults``: injected write failures, a full tmpfs, RLIMIT_FSIZE), :class:`DamageDetection`
  (``fuzz``: mutated files read in a worker process, damaged checksums, forged manifests),
  :class:`ConcurrentAccess` (``concurrency``: readers beside writers, forked children, read-only media).

A backend that is registered with ``register_backend`` in a module (rather than through the
``imgstore.backends`` entry points) sets ``backend_module`` to that module: the processes the
suites start without forking (the fuzz worker, spawned children, scripts) import it first.
The full-disk and read-only-mount tests need root (they mount a tmpfs or a bind mount) and skip
without it. Long variants (60 kills, 1 000 fuzz cases, 120 kills during ``"w"``) carry
``@pytest.mark.slow``: a project that uses ``--strict-markers`` registers that marker, e.g.
``markers = ["slow: long runs"]`` and ``addopts = ["-m", "not slow"]`` to leave them out by default.

The suites are imported on first use (``from imgstore.testing import StoreRobustness``), so that
``python -m imgstore.testing.fuzz worker`` does not import its own module twice, and so that the
helpers (``imgstore.testing.s3server``, which the benchmarks use) need no Hypothesis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pytest

_MODULES = (
    "checks",
    "conformance",
    "concurrency",
    "crash",
    "encoded_conformance",
    "faults",
    "fuzz",
    "input_conformance",
    "layouts",
    "robustness",
)
# The suites' asserts explain themselves as they did in tests/ (before any of these modules is imported).
pytest.register_assert_rewrite(*(f"{__name__}.{module}" for module in _MODULES))

from imgstore.testing.checks import (  # noqa: E402
    BackendTest,
    ImportOnUnpickle,
    check_images_equal,
    check_owned_array,
    check_records,
    check_store_content,
    check_threads_read,
    child_env,
    import_backend_module,
    missing_encoded_primitives,
    random_images,
    read_only_view,
    small_tmpfs,
)
from imgstore.testing.layouts import Layout, Records  # noqa: E402

if TYPE_CHECKING:
    from imgstore.testing.concurrency import ConcurrentAccess
    from imgstore.testing.conformance import StoreConformance
    from imgstore.testing.crash import CrashSafety
    from imgstore.testing.faults import FaultTolerance
    from imgstore.testing.fuzz import DamageDetection
    from imgstore.testing.robustness import StoreRobustness

_LAZY = {  # Hypothesis (the [test] extra) only for StoreConformance: imgstore.testing.s3server needs none
    "StoreConformance": "conformance",
    "ConcurrentAccess": "concurrency",
    "CrashSafety": "crash",
    "FaultTolerance": "faults",
    "DamageDetection": "fuzz",
    "StoreRobustness": "robustness",
}

__all__ = [
    "BackendTest",
    "ConcurrentAccess",
    "CrashSafety",
    "DamageDetection",
    "FaultTolerance",
    "ImportOnUnpickle",
    "Layout",
    "Records",
    "StoreConformance",
    "StoreRobustness",
    "check_images_equal",
    "check_owned_array",
    "check_records",
    "check_threads_read",
    "check_store_content",
    "child_env",
    "import_backend_module",
    "missing_encoded_primitives",
    "random_images",
    "read_only_view",
    "small_tmpfs",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
