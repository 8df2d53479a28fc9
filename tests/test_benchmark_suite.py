"""The benchmark suite itself, run for real at 10 images: what its tables and JSON promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import imgstore

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("suite") / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"doc": json.loads(out.read_text()), "stdout": result.stdout}


def test_every_group_has_the_references_and_every_backend(run: dict[str, Any]) -> None:
    groups: dict[str, set[str]] = {}
    for bench in run["doc"]["benchmarks"]:
        info = bench["extra_info"]
        groups.setdefault(bench["group"], set()).add(f"{info['kind']}-{info['backend']}")
    assert len(groups) == 7  # one per operation at the one cutoff
    for group, rows in groups.items():
        assert "limit-raw" in rows, group
        for backend in imgstore.available_backends():
            assert f"imgstore-{backend}" in rows, group
            assert f"tutorial-{backend}" in rows or backend not in ("png", "lmdb", "hdf5"), group


def test_extra_info_and_ratios_are_filled(run: dict[str, Any]) -> None:
    for bench in run["doc"]["benchmarks"]:
        info = bench["extra_info"]
        assert info["images"] == 10 and info["disk_bytes"] > 0 and info["file_bytes"] > 0
        assert len(bench["stats"]["data"]) == bench["stats"]["rounds"] >= 5
        if info["kind"] == "imgstore":
            assert info["ratio_to_limit"] > 0 and info["ratio_to_tutorial"] > 0
        many = info["operation"] == "read_random_many"
        assert (info["speedup_over_single"] is not None) == many, bench["name"]


def test_variants_are_measured_where_they_matter(run: dict[str, Any]) -> None:
    operations: dict[str, set[str]] = {}
    for bench in run["doc"]["benchmarks"]:
        operations.setdefault(bench["params"]["subject_name"], set()).add(bench["extra_info"]["operation"])
    for backend in imgstore.available_backends():
        assert operations[f"imgstore-{backend}-nosync"] == {"store_single", "store_many"}
        assert operations[f"imgstore-{backend}-noverify"] == {"read_many", "read_random", "read_random_many"}
        for preset in imgstore.get_backend(backend).presets:
            assert operations[f"imgstore-{backend}-{preset}"] == {"store_many", "read_many"}
    assert {"imgstore-png-level0", "imgstore-png-level9"} <= set(operations)


def test_summary_prints_every_group(run: dict[str, Any]) -> None:
    out = run["stdout"]
    from benchmarks.subjects import OPERATIONS

    for operation in OPERATIONS:
        assert f"{operation} n=10 (synthetic)" in out
    assert "xsingle" in out


def test_saved_runs_compare_and_fail_as_pytest_benchmark_documents(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    base = [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10", "--ops=read_many",
            "--backends=lmdb", "-q", "-p", "no:cacheprovider", f"--benchmark-storage={storage}"]  # fmt: skip

    def run(*extra: str, slowdown: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
        if slowdown:
            env["IMGSTORE_BENCH_INJECT_SLOWDOWN"] = slowdown
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    saved = run("--benchmark-save=baseline", "--benchmark-save-data")
    assert saved.returncode == 0, saved.stdout[-2000:]
    (baseline,) = storage.glob("*/0001_baseline.json")
    doc = json.loads(baseline.read_text())
    assert all(len(b["stats"]["data"]) == b["stats"]["rounds"] for b in doc["benchmarks"])
    assert all(b["extra_info"]["ratio_to_limit"] for b in doc["benchmarks"] if b["extra_info"]["kind"] == "imgstore")

    # A threefold slowdown of one row against the saved run: pytest-benchmark's own gate fails it.
    slow = run("--benchmark-compare=0001", "--benchmark-compare-fail=min:50%", slowdown="imgstore-lmdb:read_many:2")
    assert slow.returncode != 0
    assert "Performance has regressed" in slow.stdout + slow.stderr
    assert "imgstore-lmdb-read_many" in slow.stdout + slow.stderr
    autosaved = run("--benchmark-autosave")
    assert autosaved.returncode == 0
    assert len(list(storage.glob("*/0002_*.json"))) == 1
