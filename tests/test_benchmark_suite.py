"""The benchmark suite itself, run for real at 10 images: what its tables and JSON promise; its operations' table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore

pytest.importorskip("pytest_benchmark")

from benchmarks.operations import (  # noqa: E402
    BATCH_SIZE,
    OPERATIONS,
    STORAGE_OPERATIONS,
    VARIANT_KINDS,
    Operation,
    Subject,
    get_operation,
)
from benchmarks.subjects import make_subjects  # noqa: E402
from benchmarks.verdict import NEEDS  # noqa: E402

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
        if info["dataset"] == "synthetic" and info["operation"] != "epoch":  # epoch: test_epoch_groups
            groups.setdefault(bench["group"], set()).add(f"{info['kind']}-{info['backend']}")
    assert len(groups) == len(STORAGE_OPERATIONS)  # one per operation at the one cutoff
    for group, rows in groups.items():
        assert "limit-raw" in rows, group
        for backend in imgstore.available_backends():
            assert f"imgstore-{backend}" in rows, group
            assert f"tutorial-{backend}" in rows or backend not in ("png", "lmdb", "hdf5"), group


def test_epoch_groups(run: dict[str, Any]) -> None:
    """Each epoch group: the LIMIT and every backend, named by workers; its figures in extra_info."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in run["doc"]["benchmarks"]:
        if bench["extra_info"]["operation"] == "epoch" and bench["extra_info"]["dataset"] == "synthetic":
            groups.setdefault(bench["group"], {})[bench["extra_info"]["loader"]] = bench
    assert set(groups) == {"epoch n=10 w=0", "epoch n=10 w=2"}
    for group, rows in groups.items():
        # a smoke run's epoch: the LIMIT and lmdb, hdf5 (every backend from 1 000 images: benchmarks/epoch.py)
        assert {"limit", "imgstore-lmdb", "imgstore-hdf5"} <= set(rows), group
        for name, bench in rows.items():
            info = bench["extra_info"]
            assert bench["name"] == f"test_epoch[{name}-epoch-w{info['workers']}-10-synthetic]"
            assert info["cache"] == "warm" and info["workers"] == int(group[-1])
            assert 0 < info["first_batch_seconds"] <= bench["stats"]["max"]
            assert 0 < info["main_cpu_seconds_per_image"] and info["exact_epoch"] in (True, False)
            assert info["ratio_to_limit"] > 0


def test_extra_info_and_ratios_are_filled(run: dict[str, Any]) -> None:
    tutorials = {b["extra_info"]["backend"] for b in run["doc"]["benchmarks"] if b["extra_info"]["kind"] == "tutorial"}
    assert {"png", "lmdb", "hdf5"} <= tutorials
    for bench in run["doc"]["benchmarks"]:
        info = bench["extra_info"]
        if info["dataset"] != "synthetic":
            continue  # the imagenet-like rows: tests/test_benchmarks_imagenet.py
        assert info["images"] == 10 and info["disk_bytes"] > 0 and info["file_bytes"] > 0
        assert len(bench["stats"]["data"]) == bench["stats"]["rounds"] >= (2 if info["operation"] == "epoch" else 5)
        if info["kind"] == "imgstore":
            assert info["ratio_to_limit"] > 0
            # a backend the tutorial has a row for (the others have no reference of their own)
            has_tutorial = info["backend"] in tutorials and info["operation"] != "epoch"
            assert (info["ratio_to_tutorial"] or 0) > 0 if has_tutorial else True
        many = get_operation(info["operation"]).speedup_over is not None
        assert (info["speedup_over_single"] is not None) == many, bench["name"]


def test_variants_are_measured_where_they_matter(run: dict[str, Any]) -> None:
    operations: dict[str, set[str]] = {}
    for bench in run["doc"]["benchmarks"]:
        if bench["extra_info"]["dataset"] != "synthetic" or bench["extra_info"]["operation"] == "epoch":
            continue
        operations.setdefault(bench["params"]["subject_name"], set()).add(bench["extra_info"]["operation"])
    on = {kind: {op.name for op in OPERATIONS if kind in op.variants} for kind in VARIANT_KINDS}
    assert on["nosync"] and on["noverify"] and on["preset"]
    assert all(get_operation(name).kind == "write" for name in on["nosync"])
    assert all(get_operation(name).kind == "read" for name in on["noverify"])
    for backend in imgstore.available_backends():
        assert operations[f"imgstore-{backend}"] == {op.name for op in STORAGE_OPERATIONS}
        assert operations[f"imgstore-{backend}-nosync"] == on["nosync"]
        assert operations[f"imgstore-{backend}-noverify"] == on["noverify"]
        for preset in imgstore.get_backend(backend).presets:
            assert operations[f"imgstore-{backend}-{preset}"] == on["preset"]
    assert operations["limit-nofsync"] == on["nosync"]
    assert {"imgstore-png-level0", "imgstore-png-level9"} <= set(operations)


def test_benchmark_names_are_the_saved_runs_names(run: dict[str, Any]) -> None:
    # Saved runs compare by name: "test_storage[<subject>-<operation>-<N>-<dataset>]", group "<operation> n=<N>".
    names = {bench["name"]: bench for bench in run["doc"]["benchmarks"]}
    for op in STORAGE_OPERATIONS:
        bench = names[f"test_storage[imgstore-lmdb-{op.name}-10-synthetic]"]
        assert bench["group"] == f"{op.name} n=10"
        assert bench["extra_info"]["operation"] == op.name
        assert set(bench["extra_info"]) >= {  # what saved runs hold; a reader may add its own (a schema version)
            "kind", "backend", "variant", "operation", "images", "dataset", "disk_bytes", "file_bytes",
            "images_per_second", "ratio_to_limit", "ratio_to_tutorial", "speedup_over_single",
        }  # fmt: skip


def test_summary_prints_every_group(run: dict[str, Any]) -> None:
    out = run["stdout"]
    for op in STORAGE_OPERATIONS:
        assert f"{op.name} n=10 (synthetic): {op.title}" in out
    for workers in (0, 2):
        assert f"epoch n=10 w={workers} (synthetic): {get_operation('epoch').title}" in out
    assert "xsingle" in out


def test_summary_ends_with_the_verdict_of_this_run(run: dict[str, Any]) -> None:
    """Which backend for which need: each need names a measured backend, the figure and the runner-up."""
    out = run["stdout"]
    verdict = out[out.index("which backend for which need") :]
    backends = imgstore.available_backends()
    for need in NEEDS:
        line = next(line for line in verdict.splitlines() if line.strip().startswith(need[0]))
        winner = line.split(": ", 1)[1].split(" ", 1)[0]
        assert winner in backends and "at 10 images" in line, line
        assert ("faster than" in line or "smaller than" in line) == (len(backends) > 1), line
    # the figure is this run's: the winner's median of read_many is the fastest of the default rows
    medians = {
        b["extra_info"]["backend"]: b["stats"]["median"]
        for b in run["doc"]["benchmarks"]
        if b["extra_info"]["kind"] == "imgstore" and not b["extra_info"]["variant"]
        and b["extra_info"]["operation"] == "read_many" and b["extra_info"]["dataset"] == "synthetic"
    }  # fmt: skip
    line = next(line for line in verdict.splitlines() if "fastest bulk read" in line)
    assert line.split(": ", 1)[1].startswith(min(medians, key=medians.__getitem__) + " ")
    assert "safest: " in verdict and "readable by other tools: " in verdict and "reproduce: pytest" in verdict
    for backend in backends:
        assert f"{backend}: " in verdict.split("readable by other tools: ", 1)[1], backend


@pytest.mark.parametrize("cache", ["both", "cold"])
def test_the_verdict_compares_warm_rows_with_warm_rows(cache: str) -> None:
    """With --cache both, LMDB's cold read_random row was the runner-up of its own warm row ("lmdb
    (2.91 ms, 1.43x faster than lmdb)"); a cold-only run names its rows cold. One backend: no
    runner-up, and no empty "where the others differ" clause."""
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "--backends=lmdb", "--ops=read_random",
               "--cutoffs=10", "--dataset=synthetic", f"--cache={cache}", "-q", "-p", "no:cacheprovider"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdict = result.stdout[result.stdout.index("which backend for which need") :].splitlines()
    line = next(line for line in verdict if "fastest shuffled read" in line)
    assert line.split(": ", 1)[1].startswith("lmdb (") and "faster than" not in line, line
    assert ("cold cache" in line) == (cache == "cold"), line
    safest = next(line for line in verdict if line.strip().startswith("safest: "))
    assert "differ" not in safest and safest.endswith("concurrency suites)"), safest


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


# ---------------------------------------------------------------------- the operations' table, without running pytest


def test_the_table_is_well_formed() -> None:
    assert len({op.name for op in OPERATIONS}) == len(OPERATIONS)
    for op in OPERATIONS:
        assert op.name.isidentifier() and op.title and op.definition
        assert (op.last_at is None) == (op.kind != "read")  # epoch: checked by its own rows (benchmarks/epoch.py)
        assert op.timed_rounds(10) >= 2 and op.timed_rounds(100_000) >= 2
        if op.kind == "read":
            assert op.timed_rounds(10, warmup_seconds=1e-4) >= op.timed_rounds(10)
    with pytest.raises(ValueError, match="says where"):
        Operation("read_sideways", "read", "Reading sideways", "no last_at")


def test_a_subject_declares_only_operations_it_implements() -> None:
    with pytest.raises(TypeError, match="no method read_many"):

        class _Missing(Subject):
            supports = ("read_many",)

    with pytest.raises(TypeError, match="not in benchmarks.operations"):

        class _Unknown(Subject):
            supports = ("read_sideways",)

            def read_sideways(self) -> None:
                pass


@pytest.mark.parametrize("n", [1, BATCH_SIZE + 44])  # one batch, and a short last batch
def test_every_subject_reads_what_its_records_check(tmp_path: Path, n: int) -> None:
    """Each subject's read bodies return what Operation.check_last expects, past one batch too (the suite runs 10)."""
    from imgstore.datasets import load_dataset

    images, labels = load_dataset("synthetic", n)
    subjects = {s.name: s for s in make_subjects(imgstore.available_backends())}
    reads = [op for op in OPERATIONS if op.kind == "read"]
    for subject in subjects.values():
        ops = [op for op in reads if op.name in subject.operations]
        if not ops:
            continue
        path = tmp_path / subject.name
        subject.build(path, images, labels)
        reader = subject.open_reader(path, images.shape[1:])
        try:
            for op in ops:
                argument = op.argument(n)
                last = subject.body(op.name)(reader, argument)
                op.check_last(last, argument, images, labels)
                wrong = (np.asarray(last[0]) ^ 1, last[1])  # a body that read other pixels fails the check
                with pytest.raises(AssertionError, match=op.name):
                    op.check_last(wrong, argument, images, labels)
        finally:
            subject.close_reader(reader)


def _cifar10_binary(root: Path, per_batch: int) -> None:
    """CIFAR-10 in its binary version: each record is the label byte, then 3072 planar pixels."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = rng.integers(0, 256, (per_batch, 1 + 3072), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / f"{name}.bin").write_bytes(records.tobytes())


@pytest.mark.parametrize("option", ["--dataset-root", "--cifar10-dir"])
def test_dataset_root_and_its_deprecated_alias(tmp_path: Path, option: str) -> None:
    _cifar10_binary(tmp_path / "data", per_batch=3)
    out = tmp_path / "run.json"
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10", "--ops=read_many",
               "--backends=lmdb", "-q", "-p", "no:cacheprovider", "--dataset=cifar10",
               f"{option}={tmp_path / 'data'}",  # "=": a separate existing path would be taken for the rootdir
               f"--benchmark-json={out}"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert benchmarks and {b["extra_info"]["dataset"] for b in benchmarks} == {"cifar10"}
    assert ("--cifar10-dir is deprecated" in result.stdout + result.stderr) == (option == "--cifar10-dir")


def test_a_dataset_that_needs_a_root_says_so() -> None:
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider",
               "--cutoffs=10", "--dataset=cifar10"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--dataset cifar10 needs --dataset-root" in result.stdout + result.stderr
