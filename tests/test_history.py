"""``imgstore history``: real saved runs on a timeline, change points found and confirmed.

The fixture series (tests/data/history/, how it was made: its README.md) is 32 real runs saved by
pytest-benchmark, one commit each, with a real code change at run 16 that slows memmap's
``read_many`` (both of its rows); the files are trimmed to five benchmarks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ruptures")
pytest.importorskip("scipy")

from imgstore.analysis.changepoints import find_changes  # noqa: E402
from imgstore.analysis.history import build_history, find_run_files, load_history  # noqa: E402
from imgstore.analysis.history_html import format_history_html  # noqa: E402
from imgstore.analysis.history_report import format_history_markdown, format_history_table  # noqa: E402
from imgstore.analysis.load import load_run  # noqa: E402
from imgstore.cli import main  # noqa: E402

pytest_plugins = ["pytester"]

SERIES = Path(__file__).parent / "data" / "history"
CHANGE = (SERIES / "CHANGE_COMMIT").read_text().strip()
STEPPED = {
    "benchmarks/test_storage.py::test_storage[imgstore-memmap-read_many-1000-synthetic]",
    "benchmarks/test_storage.py::test_storage[imgstore-memmap-noverify-read_many-1000-synthetic]",
}


def series_files() -> list[Path]:
    return sorted(SERIES.rglob("*.json"))


def test_the_real_step_is_found_at_its_commit_and_nothing_else() -> None:
    history = load_history([SERIES])
    (machine,) = history.machines
    assert len(machine.commits) == 32
    assert [c.time for c in machine.commits] == sorted(c.time or "" for c in machine.commits)
    found = {}
    for series in machine.series:
        for change in series.changes:
            found[series.fullname] = (machine.commits[series.points[change.index]].commit, change)
    assert set(found) == STEPPED
    for commit, change in found.values():
        assert commit == CHANGE
        assert 1.1 < change.low < change.ratio < change.high < 2.5  # verified row 1.15x, noverify 1.99x
        assert (change.before_runs, change.after_runs) == (16, 16)


def test_runs_of_the_same_code_show_no_change() -> None:
    runs = [load_run(path) for path in series_files()]
    runs.sort(key=lambda run: run.commit_time or "")
    history = build_history(runs[:16])  # before the change: A/A
    assert list(history.changes()) == []


def test_noise_gives_no_change_and_a_step_is_found() -> None:
    # Heavy-tailed noise, as on this machine (t with 4 degrees of freedom, ~7% sd), 30 commits.
    rng = np.random.default_rng(7)
    for _ in range(20):
        noise = np.exp(rng.standard_t(4, size=(30, 2)) * 0.05) * 1e-3
        changes, _ = find_changes([tuple(p) for p in noise], alpha=0.01 / 20, confidence=0.99, min_change=0.05)
        assert changes == []
        stepped = noise.copy()
        stepped[15:] *= 1.25
        changes, _ = find_changes([tuple(p) for p in stepped], alpha=0.01 / 20, confidence=0.99, min_change=0.05)
        assert [c.index for c in changes] == [15]


def test_outputs_name_the_commit_range_and_ratio() -> None:
    history = load_history([SERIES])
    table = format_history_table(history)
    markdown = format_history_markdown(history)
    html = format_history_html(history)
    for text in (table, markdown, html):
        assert CHANGE[:10] in text
        assert "imgstore-memmap-read_many-1000-synthetic" in text
    assert markdown.startswith("### :x: Benchmark history")
    assert "| benchmark | last before | first after |" in markdown
    assert html.count("<svg class='series'") == 5
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


def test_text_from_a_run_file_is_escaped(tmp_path: Path) -> None:
    doc = json.loads(series_files()[0].read_text())
    doc["benchmarks"][0]["name"] = doc["benchmarks"][0]["fullname"] = "<script>alert(1)</script>"
    (tmp_path / "run.json").write_text(json.dumps(doc))
    html = format_history_html(load_history([tmp_path]))
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_machines_get_their_own_timeline_and_undated_runs_a_note(tmp_path: Path) -> None:
    for index, path in enumerate(series_files()[:6]):
        doc = json.loads(path.read_text())
        if index % 2:
            doc["machine_info"]["node"] = "other-host"
        if index == 0:
            doc["commit_info"]["time"] = None
        (tmp_path / f"{index}.json").write_text(json.dumps(doc))
    history = load_history([tmp_path])
    assert sorted(len(m.commits) for m in history.machines) == [3, 3]
    assert any(m.name.startswith("other-host") for m in history.machines)
    assert any("without commit_info.time" in note for note in history.notes)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.html"
    assert main(["history", str(SERIES), "--html", str(report)]) == 0
    assert "<svg" in report.read_text()
    assert capsys.readouterr().out.startswith("32 run(s), 1 machine(s): 2 change point(s)")
    assert main(["history", str(SERIES), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("### :x:")
    assert main(["history", str(SERIES), "--fail-on-slowdown"]) == 1
    assert main(["history", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["history", str(tmp_path / "empty")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    assert main(["history", str(tmp_path / "bad")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def _git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_runs_saved_by_pytest_benchmark_in_a_git_repository(pytester: pytest.Pytester) -> None:
    """The files as pytest-benchmark writes them, two commits: one timeline, in commit order."""
    _git(pytester.path, "init", "-q")
    storage = pytester.path / "history"
    commits = []
    for count in (2000, 4000):
        pytester.makepyfile(test_work=f"def test_work(benchmark):\n    benchmark(lambda: sum(range({count})))\n")
        _git(pytester.path, "add", "test_work.py")
        _git(pytester.path, "commit", "-q", "-m", f"work {count}")
        commits.append(_git(pytester.path, "rev-parse", "HEAD"))
        result = pytester.runpytest(
            "-p",
            "no:cacheprovider",
            "--benchmark-save=run",
            "--benchmark-save-data",
            f"--benchmark-storage=file://{storage}",
            "--benchmark-min-rounds=5",
            "--benchmark-max-time=0.01",
        )
        result.assert_outcomes(passed=1)
    files = find_run_files([storage])
    assert len(files) == 2 and files[0].parent.parent == storage  # .../<machine>/NNNN_run.json
    history = load_history([storage])
    (machine,) = history.machines
    assert [c.commit for c in machine.commits] == commits
    (series,) = machine.series
    assert series.name == "test_work" and len(series.points) == 2
    assert all(len(figures) == 1 for figures in series.figures)
