"""The gate's paired sessions (.ci/gate-matrix's paired_run, benchmarks/turns.py): two real pytest processes
take turns one test at a time, the first side as asked, and a side that ends or dies early never holds
the other up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parents[1]


def _checkout(
    root: Path,
    side: str,
    tests: int | list[str],
    log: Path,
    broken: bool = False,
    slow: bool = False,
    failing: str = "",
) -> Path:
    """A folder with ``tests`` tests (a count, or their names) that each log '<side><name>' (and a benchmarks/
    package for the plugin); test ``failing`` fails after logging."""
    folder = root / side
    (folder / "benchmarks").mkdir(parents=True)
    (folder / "benchmarks" / "__init__.py").write_text("")
    body = "".join(
        f"def test_{i}():\n    with open({str(log)!r}, 'a') as f:\n"
        f"        f.write('{side[0]}{i} ')\n    time.sleep(0.05)\n    assert {str(i) != failing}\n"
        for i in (range(tests) if isinstance(tests, int) else tests)
    )
    start = "import time\n" + ("syntax error(\n" if broken else "")
    if slow:  # a slow import (torch, say), then a mark in the log when it is over
        start += f"time.sleep(1.5)\nwith open({str(log)!r}, 'a') as f:\n    f.write('{side[0]}-collected ')\n"
    (folder / "test_turns.py").write_text(start + body)
    return folder


def _paired(
    tmp_path: Path,
    first: str,
    base_tests: int | list[str],
    head_tests: int | list[str],
    broken: str = "",
    slow: str = "",
    failing: tuple[str, str] = ("", ""),
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """paired_run of a base and a head checkout; ``failing``: the side and the name of a test that fails."""
    log = tmp_path / "order.log"
    fails = {failing[0]: failing[1]}
    base = _checkout(tmp_path, "base", base_tests, log, broken == "base", slow == "base", fails.get("base", ""))
    head = _checkout(tmp_path, "head", head_tests, log, broken == "head", slow == "head", fails.get("head", ""))
    script = (
        f"source {REPO}/.ci/gate-matrix && gate_args=(-q -p no:cacheprovider test_turns.py) && "
        f"paired_run {base} {tmp_path}/b.json {head} {tmp_path}/h.json {first}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    order = log.read_text().split() if log.exists() else []
    return order, result


def test_the_two_sides_alternate_test_by_test_and_the_longer_one_finishes_alone(tmp_path: Path) -> None:
    order, result = _paired(tmp_path, "base", 3, 5)
    assert result.returncode == 0
    assert order == ["b0", "h0", "b1", "h1", "b2", "h2", "h3", "h4"]


def test_head_goes_first_when_asked(tmp_path: Path) -> None:
    order, result = _paired(tmp_path, "head", 3, 3)
    assert result.returncode == 0
    assert order == ["h0", "b0", "h1", "b1", "h2", "b2"]


def test_a_benchmark_added_or_removed_in_head_keeps_the_others_paired(tmp_path: Path) -> None:
    """A side's own tests run in its turn without handing it over, so every benchmark both sides have still runs
    on each side one after the other (by index, a backend added in head would shift every pair after it)."""
    order, result = _paired(tmp_path, "base", ["0", "1", "gone", "2", "3"], ["0", "new", "1", "2", "3", "newer"])
    assert result.returncode == 0
    assert order == ["b0", "h0", "b1", "hnew", "h1", "bgone", "b2", "h2", "b3", "h3", "hnewer"]


def test_no_test_starts_while_the_other_side_is_still_importing(tmp_path: Path) -> None:
    order, result = _paired(tmp_path, "base", 2, 2, slow="head")
    assert result.returncode == 0
    assert order == ["h-collected", "b0", "h0", "b1", "h1"]


def test_a_side_that_fails_stops_the_other_and_says_which(tmp_path: Path) -> None:
    """The session has no verdict then: the other side is stopped rather than left to run its tests out alone."""
    started = time.monotonic()
    order, result = _paired(tmp_path, "base", 3, 400, broken="base")  # base fails to collect: exit 2
    assert result.returncode == 2  # the session failed, and says so
    assert "the base side failed (pytest exit status 2" in result.stderr
    assert order == [f"h{i}" for i in range(len(order))] and len(order) < 100
    assert time.monotonic() - started < 60  # far below the plugin's 30 min turn timeout


@pytest.mark.parametrize("first", ["base", "head"])
def test_failed_tests_on_base_only_leave_head_to_run_on_and_a_verdict(tmp_path: Path, first: str) -> None:
    """A change that fixes a benchmark broken on base still gets its verdict: head's session goes on."""
    order, result = _paired(tmp_path, first, 3, 5, failing=("base", "1"))
    assert result.returncode == 0, result.stderr
    assert "tests failed on the base side (pytest exit status 1" in result.stderr
    assert sorted(order) == ["b0", "b1", "b2", "h0", "h1", "h2", "h3", "h4"]  # head's whole session ran


def test_a_failed_test_on_head_fails_the_session(tmp_path: Path) -> None:
    order, result = _paired(tmp_path, "base", 400, 3, failing=("head", "1"))
    assert result.returncode == 1
    assert "the head side failed (pytest exit status 1" in result.stderr
    assert len(order) < 100  # base was stopped when head ended, not left to run its tests out


def _session(tmp_path: Path, base_tests: int, head_tests: int) -> tuple[subprocess.Popen[str], Path]:
    """paired_run of two checkouts whose tests take 1 s each, started in a session of its own (as a terminal
    runs a command), its FIFO folder under ``tmp_path/tmp``."""
    log = tmp_path / "order.log"
    for side, tests in (("base", base_tests), ("head", head_tests)):
        folder = _checkout(tmp_path, side, tests, log)
        text = (folder / "test_turns.py").read_text().replace("time.sleep(0.05)", "time.sleep(1)")
        (folder / "test_turns.py").write_text(text)
    (tmp_path / "tmp").mkdir()
    script = (
        f"source {REPO}/.ci/gate-matrix && gate_args=(-q -p no:cacheprovider test_turns.py) && "
        f"paired_run {tmp_path}/base {tmp_path}/b.json {tmp_path}/head {tmp_path}/h.json base; echo returned $?"
    )
    process = subprocess.Popen(
        ["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(log.read_text().split() if log.exists() else []) < 2:
        time.sleep(0.1)  # both sides running
    return process, log


def _in_session(sid: int) -> list[int]:
    """The processes left in session ``sid`` (the driver's pytest children, once it has ended)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
            left.append(int(stat.parent.name))
    return left


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_session_stops_both_sides_at_once_and_leaves_nothing_behind(tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the terminal's whole process group) or `kill` of the driver alone (SIGTERM): both sides
    are stopped and waited for before the driver exits (the gate's EXIT trap then removes the base worktree
    they run in), not left to run the session out (minutes of the gated matrix) after it has gone."""
    process, log = _session(tmp_path, 30, 30)
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.terminate()
    out, err = process.communicate(timeout=20)
    assert process.returncode == (130 if how == "ctrl-c" else 143), (out, err)
    assert "returned" not in out  # the script that ran it stops too, as on any Ctrl-C
    assert _in_session(process.pid) == []
    assert len(log.read_text().split()) < 10
    assert list((tmp_path / "tmp").iterdir()) == []  # the FIFOs


def test_a_side_killed_mid_session_stops_the_other_and_says_which(tmp_path: Path) -> None:
    process, log = _session(tmp_path, 30, 30)
    pytests = [pid for pid in _in_session(process.pid) if pid != process.pid]
    heads = [pid for pid in pytests if "h.json" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(heads[0], signal.SIGKILL)
    out, err = process.communicate(timeout=20)
    assert "returned 137" in out, (out, err)
    assert "head side" in err and "137" in err
    assert _in_session(process.pid) == []
    assert len(log.read_text().split()) < 10  # base did not run its 30 tests out alone
    assert list((tmp_path / "tmp").iterdir()) == []
