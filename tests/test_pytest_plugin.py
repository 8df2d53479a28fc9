"""imgstore's pytest plugin loads in every pytest run of its environment: it must not need the suites' Hypothesis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A Python where Hypothesis is not installed (as after pip install -e ".[bench]").
NO_HYPOTHESIS = (
    "import sys\n"
    "class NoHypothesis:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'hypothesis' or name.startswith('hypothesis.'):\n"
    "            raise ModuleNotFoundError(\"No module named 'hypothesis'\")\n"
    "sys.meta_path.insert(0, NoHypothesis())\n"
)


def _run(script: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_HYPOTHESIS + script], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_plugin_loads_without_hypothesis_and_without_the_suites(tmp_path: Path) -> None:
    # A fresh `pip install -e ".[bench]"` has no Hypothesis: pytest failed to start in any project (exit 3).
    _run(
        "import imgstore.pytest_plugin\n"
        "assert 'imgstore.testing' not in sys.modules, 'the plugin imported the suites'\n",
        tmp_path,
    )


def test_the_entry_point_names_the_plugin_module() -> None:
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as file:
        entry = tomllib.load(file)["project"]["entry-points"]["pytest11"]["imgstore"]
    assert entry == "imgstore.pytest_plugin"


def test_the_benchmarks_helpers_import_without_hypothesis(tmp_path: Path) -> None:
    # The benchmarks import imgstore.testing.s3server; only the conformance suite needs Hypothesis ([test]).
    _run(
        "import imgstore.testing.s3server, imgstore.testing\n"
        "from imgstore.testing import check_records\n"
        "try:\n"
        "    from imgstore.testing import StoreConformance\n"
        "except ModuleNotFoundError as exc:\n"
        "    assert 'hypothesis' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('StoreConformance imported without Hypothesis')\n",
        tmp_path,
    )
