"""Every backend passes the conformance and robustness suites: a new backend adds one class here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import imgstore
from imgstore.testing import StoreConformance, StoreRobustness


class TestPng(StoreConformance, StoreRobustness):
    backend = "png"


class TestLmdb(StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestHdf5(StoreConformance, StoreRobustness):
    backend = "hdf5"


# The same suites on the other layouts (see imgstore.testing.BackendTest): encoded records, varied shapes.


class KeepFiles:
    """JPEG, PNG and WebP files of many shapes and modes, stored as given (put_encoded_many), read as RGB."""

    codec, varied, image_mode = "keep", True, "RGB"


class PngVaried:
    """Arrays of many shapes and 1 to 4 channels (2-D too), encoded to PNG by the store: exact round trips."""

    codec, varied = "png", True


class JpegFixed:
    """Arrays of one shape given at creation, encoded to JPEG: the fixed-shape encoded path (batches are arrays)."""

    codec, fixed_shape = "jpeg", (32, 32, 3)


class RawVaried:
    """Raw pixels of many shapes (shape=None): variable-length records without a codec."""

    varied = True


class TestPngKeep(KeepFiles, StoreConformance, StoreRobustness):
    backend = "png"


class TestPngPng(PngVaried, StoreConformance, StoreRobustness):
    backend = "png"


class TestPngJpeg(JpegFixed, StoreConformance, StoreRobustness):
    backend = "png"


class TestPngRawVaried(RawVaried, StoreConformance, StoreRobustness):
    backend = "png"


# Found by the suites, not fixed here (imgstore/backends/lmdb.py is not this file's): reproducer in the reason.
LMDB_DAMAGED_PAGE_ABORTS = (
    "lmdb backend: a damaged page of data.mdb kills the reading process (SIGABRT: liblmdb's "
    "\"mdb.c:6273: Assertion 'IS_LEAF(mp)' failed in mdb_cursor_next()\", or SIGBUS) instead of a CorruptStoreError, "
    "once the B-tree has a branch page: encoded stores (one key per record) from ~40 small records, raw stores with "
    "many blocks too (block_bytes=1). Reproducer: 40 records in codec='png', shape=None; zero page 6 of "
    "lmdb-<gen>/data.mdb; get_many(range(40)) -> _read_blob_range's cursor.iternext() aborts"
)


class LmdbDamagedPagesAbort:
    """The LMDB backend's damage tests on encoded stores: xfail (LMDB_DAMAGED_PAGE_ABORTS) until it is fixed."""

    @pytest.mark.xfail(strict=True, reason=LMDB_DAMAGED_PAGE_ABORTS)
    def test_every_zeroed_page_fails_cleanly(self, tmp_path: Path) -> None:
        super().test_every_zeroed_page_fails_cleanly(tmp_path)  # type: ignore[misc]

    # Not strict: whether a random case hits a branch page, and whether the read then faults, varies.
    @pytest.mark.xfail(strict=False, reason=LMDB_DAMAGED_PAGE_ABORTS)
    def test_damaged_store_fails_cleanly(self, tmp_path: Path) -> None:
        super().test_damaged_store_fails_cleanly(tmp_path)  # type: ignore[misc]

    @pytest.mark.xfail(strict=False, reason=LMDB_DAMAGED_PAGE_ABORTS)
    def test_unverified_reads_of_a_damaged_store_fail_cleanly(self, tmp_path: Path) -> None:
        super().test_unverified_reads_of_a_damaged_store_fail_cleanly(tmp_path)  # type: ignore[misc]


class TestLmdbKeep(LmdbDamagedPagesAbort, KeepFiles, StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestLmdbPng(LmdbDamagedPagesAbort, PngVaried, StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestLmdbJpeg(LmdbDamagedPagesAbort, JpegFixed, StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestLmdbRawVaried(LmdbDamagedPagesAbort, RawVaried, StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestLmdbWebp(StoreConformance):
    """Lossy WebP (RGB and RGBA), conformance only: its encoder is the slowest."""

    backend = "lmdb"
    codec, varied, codec_params = "webp", True, {"quality": 80}


class TestHdf5Keep(KeepFiles, StoreConformance, StoreRobustness):
    backend = "hdf5"


class TestHdf5Png(PngVaried, StoreConformance, StoreRobustness):
    backend = "hdf5"


class TestHdf5Jpeg(JpegFixed, StoreConformance, StoreRobustness):
    backend = "hdf5"


class TestHdf5RawVaried(RawVaried, StoreConformance, StoreRobustness):
    backend = "hdf5"


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_subclasses(direct)}}


def test_every_registered_backend_has_a_conformance_class() -> None:
    for suite in (StoreConformance, StoreRobustness):
        tested = {cls.backend for cls in _subclasses(suite)}
        assert set(imgstore.available_backends()) <= tested, suite.__name__


def test_a_backend_of_another_package_gets_the_suites_with_one_class(tmp_path: Path) -> None:
    """A backend registered in a test module: the fuzz worker, spawned children and scripts import it first."""
    (tmp_path / "other_backend.py").write_text(
        textwrap.dedent(
            """
            import imgstore
            from imgstore.backends.lmdb import LmdbStore

            class OtherStore(LmdbStore):
                name = "other"

            imgstore.register_backend("other", "other_backend:OtherStore")
            """
        )
    )
    (tmp_path / "test_other.py").write_text(
        textwrap.dedent(
            """
            from imgstore.testing import StoreConformance, StoreRobustness

            class TestOther(StoreConformance, StoreRobustness):
                backend = "other"
                backend_module = "other_backend"
            """
        )
    )
    (tmp_path / "pytest.ini").write_text(
        '[pytest]\nmarkers =\n    slow: long runs\naddopts = --strict-markers -m "not slow"\n'
    )
    selected = (
        "test_damaged_store_fails_cleanly or test_readers_see_a_consistent_prefix"
        " or (test_child_process_reads_after_parent_used_store and spawn) or test_creating_a_store_on_a_full_disk"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selected],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    expected = 6 if os.geteuid() == 0 else 3  # the full-disk cases mount a tmpfs
    assert f"{expected} passed" in result.stdout, result.stdout[-2000:]
