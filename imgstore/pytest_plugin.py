"""pytest plugin (entry point ``pytest11``): the ``slow`` marker of the robustness suites' 10x loops.

Registered, so ``--strict-markers`` accepts it; and in a project that does not select by marker
(no ``-m``), the slow variants are skipped with a note instead of tripling the run. ``-m slow`` runs them.
pytest loads it in every project of an environment that has imgstore-ml: it imports nothing of
``imgstore.testing`` (whose suites need Hypothesis, which the ``[bench]`` extra does not install).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: 10x kill and fuzz loops of imgstore's suites; run with -m slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr", ""):
        return  # the project selects by marker itself (this repository: -m "not slow")
    skip = pytest.mark.skip(reason="imgstore's 10x robustness loops: run them with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None and item.nodeid and _from_suites(item):
            item.add_marker(skip)


def _from_suites(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    return getattr(function, "__module__", "").startswith("imgstore.testing")
