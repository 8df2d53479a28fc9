"""Every backend passes the conformance and robustness suites: a new backend adds one class here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import imgstore
from imgstore.testing import StoreConformance, StoreRobustness


class TestPng(StoreConformance, StoreRobustness):
    backend = "png"


class TestLmdb(StoreConformance, StoreRobustness):
    backend = "lmdb"


class TestHdf5(StoreConformance, StoreRobustness):
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
