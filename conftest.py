"""Root conftest: `pytest` runs the tests, `pytest --benchmark-only` runs the benchmarks.

Naming a path on the command line always collects it, whatever the mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def _named_on_command_line(config: pytest.Config) -> bool:
    return any(not arg.startswith("-") and arg != "." for arg in config.args) and config.args != config.getini("testpaths")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if _named_on_command_line(config):
        return None
    benchmarking = config.getoption("benchmark_only", False)
    if collection_path == ROOT / "benchmarks" and not benchmarking:
        return True
    if collection_path == ROOT / "tests" and benchmarking:
        return True
    return None
