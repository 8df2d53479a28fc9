"""Root conftest: `pytest` runs the tests, `pytest --benchmark-only` runs the benchmarks.

Paths named on the command line are always collected, whatever the mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.options import add_options

ROOT = Path(__file__).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    # The benchmark options live here too: pytest parses the command line before it loads a
    # conftest below the root, so `--cutoffs 10` (with a space) would otherwise be refused.
    add_options(parser)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        return None  # the user named what to run
    benchmarking = config.getoption("benchmark_only", False)
    # Called for what is inside the testpaths folders, not for the folders themselves.
    if collection_path.is_relative_to(ROOT / "benchmarks") and not benchmarking:
        return True
    if collection_path.is_relative_to(ROOT / "tests") and benchmarking:
        return True
    return None
