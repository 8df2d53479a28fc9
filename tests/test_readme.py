"""The README's usage example runs as written (with fewer images, to stay quick)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:8] if line.startswith(("pip ", "python", "pytest"))]
    assert len(commands) == 2
    assert "pytest --benchmark-only" in commands[0]
    assert commands[1].split("&&")[-1].split("#")[0].strip() == "pytest"


def test_readme_usage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert example is not None
    code = example.group(1).replace("100_000", "2_000")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert {p.name for p in tmp_path.iterdir()} >= {"cifar-png", "cifar-lmdb", "cifar-hdf5"}
