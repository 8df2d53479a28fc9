"""The gate's paired sessions (.ci/gate-matrix's paired_run, benchmarks/turns.py): two real pytest processes
take turns one test at a time, the first side as asked, and a side that ends or dies early never holds
the other up."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parents[1]


def _checkout(root: Path, side: str, tests: int, log: Path, broken: bool = False, slow: bool = False) -> Path:
    """A folder with ``tests`` tests that each log '<side><i>' (and a benchmarks/ package for the plugin)."""
    folder = root / side
    (folder / "benchmarks").mkdir(parents=True)
    (folder / "benchmarks" / "__init__.py").write_text("")
    body = "".join(
        f"def test_{i}():\n    with open({str(log)!r}, 'a') as f:\n"
        f"        f.write('{side[0]}{i} ')\n    time.sleep(0.05)\n"
        for i in range(tests)
    )
    start = "import time\n" + ("syntax error(\n" if broken else "")
    if slow:  # a slow import (torch, say), then a mark in the log when it is over
        start += f"time.sleep(1.5)\nwith open({str(log)!r}, 'a') as f:\n    f.write('{side[0]}-collected ')\n"
    (folder / "test_turns.py").write_text(start + body)
    return folder


def _paired(
    tmp_path: Path, first: str, base_tests: int, head_tests: int, broken: str = "", slow: str = ""
) -> tuple[list[str], int]:
    log = tmp_path / "order.log"
    base = _checkout(tmp_path, "base", base_tests, log, broken == "base", slow == "base")
    head = _checkout(tmp_path, "head", head_tests, log, broken == "head", slow == "head")
    script = (
        f"source {REPO}/.ci/gate-matrix && gate_args=(-q -p no:cacheprovider test_turns.py) && "
        f"paired_run {base} {tmp_path}/b.json {head} {tmp_path}/h.json {first}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    order = log.read_text().split() if log.exists() else []
    return order, result.returncode


def test_the_two_sides_alternate_test_by_test_and_the_longer_one_finishes_alone(tmp_path: Path) -> None:
    order, status = _paired(tmp_path, "base", 3, 5)
    assert status == 0
    assert order == ["b0", "h0", "b1", "h1", "b2", "h2", "h3", "h4"]


def test_head_goes_first_when_asked(tmp_path: Path) -> None:
    order, status = _paired(tmp_path, "head", 3, 3)
    assert status == 0
    assert order == ["h0", "b0", "h1", "b1", "h2", "b2"]


def test_no_test_starts_while_the_other_side_is_still_importing(tmp_path: Path) -> None:
    order, status = _paired(tmp_path, "base", 2, 2, slow="head")
    assert status == 0
    assert order == ["h-collected", "b0", "h0", "b1", "h1"]


def test_a_side_that_dies_does_not_hold_up_the_other(tmp_path: Path) -> None:
    started = time.monotonic()
    order, status = _paired(tmp_path, "base", 3, 4, broken="base")  # base fails to collect: exit 2
    assert status != 0  # the session failed, and says so
    assert order == ["h0", "h1", "h2", "h3"]
    assert time.monotonic() - started < 120  # far below the plugin's 30 min turn timeout
