"""Tests of the ``imgstore`` console script: parsing, help, exit codes, the optional matplotlib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imgstore import cli
from imgstore.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_run(path: Path, medians: dict[str, float], rounds: int = 30) -> Path:
    """A run in pytest-benchmark's layout, rounds spread +-5% around each median."""
    benchmarks = []
    for name, median in medians.items():
        data = [median * (0.95 + 0.1 * i / (rounds - 1)) for i in range(rounds)]
        benchmarks.append(
            {
                "group": "store_many n=10",
                "name": name,
                "fullname": f"bench.py::{name}",
                "params": None,
                "param": None,
                "options": {},
                "extra_info": {
                    "kind": "imgstore",
                    "backend": "lmdb",
                    "operation": "store_many",
                    "images": 10,
                    "dataset": "d",
                    "disk_bytes": 1000,
                    "images_per_second": 10 / median,
                    "ratio_to_limit": None,
                    "ratio_to_tutorial": None,
                },
                "stats": {
                    "median": median,
                    "min": data[0],
                    "max": data[-1],
                    "rounds": rounds,
                    "data": data,
                    "iterations": 1,
                },
            }
        )
    path.write_text(json.dumps({"benchmarks": benchmarks}), encoding="utf-8")
    return path


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "base": write_run(tmp_path / "base.json", {"test_a": 0.010, "test_b": 0.020}),
        "same": write_run(tmp_path / "same.json", {"test_a": 0.010, "test_b": 0.020}),
        "slow": write_run(tmp_path / "slow.json", {"test_a": 0.015, "test_b": 0.020}),
    }


def test_help_explains_the_workflow(capsys: Any) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("compare", "plot"):
        assert command in out
    assert "imgstore compare runs/base runs/head" in out and "--benchmark-save-data" in out
    assert ".benchmarks/" in out
    assert ".ci/bench-gate origin/main" in out


@pytest.mark.parametrize("where", ["README", "help"])
def test_the_saving_recipe_makes_its_folders_first(where: str, capsys: Any) -> None:
    """pytest-benchmark's --benchmark-json does not create its folder: it fails when it saves, at the end
    of the run, which is then lost. Every folder the recipe saves into is made before its first run."""
    if where == "README":
        text = (REPO / "README.md").read_text(encoding="utf-8")
        text = text[text.index("Saving and comparing runs:") :]
        text = text[: text.index("```", text.index("```sh") + 5)]
    else:
        assert main(["compare", "--help"]) == 0
        text = capsys.readouterr().out
    made: set[str] = set()
    saved = 0
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:2] == ["mkdir", "-p"]:
            made.update(word.rstrip("/") for word in words[2:])
        for word in words:
            if word.startswith("--benchmark-json="):
                saved += 1
                assert str(Path(word.split("=", 1)[1]).parent) in made, line
    assert saved >= 2


@pytest.mark.parametrize(
    "command,words",
    [
        (
            "compare",
            [
                "--threshold",
                "--confidence",
                "--markdown",
                "--columns",
                "exit status",
                "Bonferroni",
                "--benchmark-save-data",
                "--rerun",
                "slower? (rerun)",
                "slower (reference row)",
            ],
        ),
        ("plot", ["--out", "log-log", "imgstore-ml[plot]"]),
    ],
)
def test_subcommand_help(command: str, words: list[str], capsys: Any) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out


def test_no_command_is_a_usage_error(capsys: Any) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_exit_codes(runs: dict[str, Path], capsys: Any) -> None:
    assert main(["compare", str(runs["base"]), str(runs["same"])]) == 0
    assert main(["compare", str(runs["base"]), str(runs["slow"])]) == 1
    assert main(["compare", str(runs["slow"]), str(runs["base"])]) == 0
    assert main(["compare", str(runs["base"]), str(runs["base"].with_name("nope.json"))]) == 2
    # A 50% slowdown under a 60% threshold is not a regression.
    assert main(["compare", str(runs["base"]), str(runs["slow"]), "--threshold", "60%"]) == 0


def test_compare_refuses_runs_with_no_benchmark_in_common(runs: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    renamed = write_run(tmp_path / "renamed.json", {"test_c": 0.010})
    assert main(["compare", str(runs["base"]), str(renamed)]) == 2
    assert "nothing was compared" in capsys.readouterr().err
    assert main(["compare", str(runs["base"]), str(runs["same"]), "--only", str(_names(tmp_path, "test_z"))]) == 2


def _names(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "only.txt"
    path.write_text("\n".join(names), encoding="utf-8")
    return path


def test_compare_table_on_stdout(runs: dict[str, Path], capsys: Any) -> None:
    main(["compare", str(runs["base"]), str(runs["slow"])])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["benchmark", "baseline", "candidate", "ratio", "interval", "verdict"]
    assert lines[2].startswith("test_a") and lines[2].endswith("regression")
    assert "10 ms" in lines[2] and "15 ms" in lines[2] and "1.500" in lines[2]
    # Columns line up: numbers right-aligned under their header, verdicts left-aligned.
    assert lines[0].index("ratio") + len("ratio") == lines[2].index("1.500") + len("1.500")
    assert lines[0].index("verdict") == lines[2].index("regression") == lines[3].index("unchanged")
    assert any(line.startswith("1 regression, 0 improvements, 1 unchanged") for line in lines)


def test_markdown_written(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "pr-comment.md"
    assert main(["compare", str(runs["base"]), str(runs["slow"]), "--markdown", str(target)]) == 1
    text = target.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "### :x: Benchmarks: 1 regression, 0 improvements, 1 unchanged"
    assert "| test_a | 10 ms | 15 ms | 1.500 |" in text


def test_plot_without_matplotlib_says_what_to_install(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(runs["base"]), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'imgstore-ml[plot]'" in err and "Traceback" not in err
    # compare needs no matplotlib at all.
    assert main(["compare", str(runs["base"]), str(runs["same"])]) == 0


def test_plot_command(runs: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("matplotlib")
    assert main(["plot", str(runs["base"]), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["store_read.png", "disk_usage.png"]


def test_plot_of_a_run_of_one_size_says_so(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("matplotlib")
    one_size = sorted((REPO / "tests" / "data" / "history").rglob("*.json"))[0]  # a real run at 1 000 images
    assert main(["plot", str(one_size), "--out", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "one size (1,000 images)" in err and "--cutoffs" in err


def test_plot_requires_out(runs: dict[str, Path], capsys: Any) -> None:
    assert main(["plot", str(runs["base"])]) == 2
    assert "--out" in capsys.readouterr().err


def test_console_script_runs_as_a_module_without_importing_matplotlib() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys, imgstore.cli; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "imgstore.cli", "compare", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "BASELINE CANDIDATE" in result.stdout


def test_commands_are_listed_in_one_place() -> None:
    # Adding a command = writing _add_<name> and listing it here.
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(choices) == ["compare", "plot", "history", "convert", "info", "verify", "sharded-clean"]
    assert len(cli.COMMANDS) == 4  # compare, plot, history, and the data commands' group (imgstore.data_commands)


def test_only_file_that_is_not_utf8_exits_2(runs: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    only = tmp_path / "only.txt"
    only.write_bytes(b"bench.py::test_a\n\xff\xfe\n")
    assert main(["compare", str(runs["base"]), str(runs["slow"]), "--only", str(only)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imgstore compare: error: {only}: ") and "UTF-8" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_error_messages_stay_on_one_line(runs: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    # A file name is the user's: a newline in it must not split the message.
    missing = tmp_path / "no\nsuch\rfile.json"
    assert main(["compare", str(runs["base"]), str(missing)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no\\nsuch\\rfile.json" in err and "cannot read" in err
    assert main(["plot", str(missing), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgstore plot: error: ") and len(err.splitlines()) == 1


def test_malformed_run_exits_2_as_a_console_script(runs: dict[str, Path], tmp_path: Path) -> None:
    # The cases, end to end through `python -m imgstore.cli`: exit 2 (not 1, "regression"),
    # one line on stderr naming the file, nothing on stdout.
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    good = json.loads(runs["base"].read_text(encoding="utf-8"))
    cases = {
        "tiny.json": ("median", 1e-300),
        "huge.json": ("median", 1e300),
        "bigint.json": ("median", 10**400),
    }
    for name, (key, value) in cases.items():
        doc = json.loads(json.dumps(good))
        doc["benchmarks"][0]["stats"][key] = value
        (tmp_path / name).write_text(json.dumps(doc), encoding="utf-8")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    doc = json.loads(json.dumps(good))
    doc["benchmarks"][0]["extra_info"]["operation"] = ["store_many"]
    (tmp_path / "oplist.json").write_text(json.dumps(doc), encoding="utf-8")
    pairs = [("tiny.json", "huge.json"), ("bigint.json", "bigint.json"), ("deep.json", "deep.json")]
    for a, b in [*pairs, ("oplist.json", "oplist.json")]:
        result = subprocess.run(
            [sys.executable, "-m", "imgstore.cli", "compare", str(tmp_path / a), str(tmp_path / b)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"imgstore compare: error: {tmp_path / a}: ")
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
