"""The benchmark suite's command-line options, in one place so the root conftest.py can register them too.

pytest reads options of a conftest below the root only when it loads that conftest before parsing
the command line. Run from the root with a separate value (``--cutoffs 10``), the value is taken
for a path, testpaths are not used and benchmarks/conftest.py is loaded too late: only
``--cutoffs=10`` works. Registering them from the root conftest (``add_options(parser)`` in its
``pytest_addoption``) makes both forms work; whichever conftest calls first registers them.
"""

from __future__ import annotations

import pytest

from benchmarks.operations import NAMES
from imgstore.datasets import available_datasets, get_dataset

ALL_CUTOFFS = (10, 100, 1_000, 10_000, 100_000)
DEFAULT_CUTOFFS = "10,100,1000,10000"  # see benchmarks/README.md, "Measured"; `--cutoffs=all` adds 100 000


def add_options(parser: pytest.Parser) -> None:
    if getattr(parser, "_imgstore_benchmark_options", False):
        return  # already registered by the other conftest
    parser._imgstore_benchmark_options = True  # type: ignore[attr-defined]
    group = parser.getgroup("imgstore benchmarks")
    group.addoption(
        "--cutoffs",
        default=DEFAULT_CUTOFFS,
        help=f"comma list of image counts, or 'all' ({','.join(map(str, ALL_CUTOFFS))}); default {DEFAULT_CUTOFFS}",
    )
    group.addoption(
        "--backends", default=None, help="comma list of imgstore backends to benchmark; default every registered one"
    )
    group.addoption("--ops", default=None, help=f"comma list of operations; default all: {','.join(NAMES)}")
    group.addoption(
        "--dataset",
        default="synthetic",
        choices=available_datasets(),  # the registry of imgstore.datasets
        help="images to store (imgstore.datasets.load_dataset); default synthetic",
    )
    group.addoption(
        "--dataset-root",
        default=None,
        help="directory of the dataset's files; needed by "
        + ", ".join(name for name in available_datasets() if get_dataset(name).needs_root),
    )
    group.addoption("--cifar10-dir", default=None, help="deprecated alias of --dataset-root")
