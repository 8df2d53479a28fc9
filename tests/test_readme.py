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


def test_readme_first_screen_converts_a_folder_and_reads_it_in_a_dataloader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first screen's commands and code, on a folder of photos as a new user has one."""
    import subprocess

    pytest.importorskip("torch")
    from imgstore.datasets.imagenet_like import imagenet_like

    text = README.read_text()
    start = text.index("Your own folder of images")
    shell = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert shell is not None and code is not None
    imagenet_like(40, classes=4).write_image_folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    for line in shell.group(1).splitlines():
        command = line.split("#")[0].strip()
        if command:
            subprocess.run(command, shell=True, check=True, cwd=tmp_path, capture_output=True)
    names: dict[str, object] = {}
    exec(compile(code.group(1), str(README), "exec"), names)
    assert tuple(names["images"].shape) == (40 % 256, 224, 224, 3)  # type: ignore[attr-defined]


def test_readme_usage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example is not None
    code = example.group(1).replace("100_000", "2_000")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert {p.name for p in tmp_path.iterdir()} >= {"cifar-png", "cifar-lmdb", "cifar-hdf5"}


def test_the_minimal_backend_in_the_readme_passes_every_suite(tmp_path: Path) -> None:
    """The README's complete backend, built from its text: conformance, robustness and the benchmarks."""
    import subprocess
    import sys

    code = re.search(r"<!-- minimal-backend -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    assert len(code.group(1).splitlines()) < 100
    (tmp_path / "npy_store.py").write_text(code.group(1))
    dist = tmp_path / "npy_store-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: npy-store\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[imgstore.backends]\nnpy = npy_store:NpyStore\n")
    (tmp_path / "test_npy.py").write_text(
        "from imgstore.testing import StoreConformance, StoreRobustness\n\n\n"
        "class TestNpy(StoreConformance, StoreRobustness):\n"
        '    backend = "npy"\n'
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "test_npy.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--benchmark-only",
            "--cutoffs=10",
            "--backends=npy",
            "--ops=read_many",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=README.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-2000:]
    assert "imgstore-npy" in bench.stdout and "imgstore-npy-noverify" in bench.stdout
