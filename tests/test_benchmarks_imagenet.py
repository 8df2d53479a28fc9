"""The benchmark suite's imagenet-like axis: its rows, references, summary and targets; the cutoffs it runs at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import imgstore

pytest.importorskip("pytest_benchmark")
pytest.importorskip("skimage")  # the photographs imagenet-like is made from

from benchmarks.data import BenchData, imagenet_cutoffs  # noqa: E402
from benchmarks.encoded import make_encoded_subjects, supports_encoded  # noqa: E402
from benchmarks.operations import BATCH_SIZE, get_operation  # noqa: E402
from benchmarks.options import DEFAULT_DATASETS  # noqa: E402
from benchmarks.targets import evaluate  # noqa: E402
from imgstore.codecs import available_decoders, resolve_decoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENCODED_BACKENDS = [b for b in imgstore.available_backends() if supports_encoded(b)]
READS = ("read_many", "read_random", "read_random_many")


def _pytest(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    command = [sys.executable, "-m", "pytest", "--benchmark-only", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("suite") / "run.json"
    result = _pytest("--cutoffs=10", "--dataset=imagenet-like", f"--benchmark-json={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"doc": json.loads(out.read_text()), "stdout": result.stdout}


def _storage_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The storage operations' rows; the training-epoch rows are checked in tests/test_benchmark_epoch.py."""
    rows = [bench for bench in run["doc"]["benchmarks"] if bench["extra_info"].get("operation") != "epoch"]
    assert rows
    return rows


def test_every_group_has_the_limit_the_status_quo_and_a_row_per_backend_and_decoder(run: dict[str, Any]) -> None:
    groups: dict[str, set[str]] = {}
    for bench in _storage_rows(run):
        assert bench["extra_info"]["dataset"] == "imagenet-like"
        groups.setdefault(bench["group"], set()).add(bench["params"]["subject_name"])
    assert set(groups) == {f"{op} n=10 imagenet-like" for op in ("store_many", *READS)}
    fastest = resolve_decoder("auto")
    for group, rows in groups.items():
        assert {"limit", "imagefolder"} <= rows, group
        for backend in ENCODED_BACKENDS:
            if group.startswith("store_many"):
                assert f"imgstore-{backend}-keep" in rows
                continue
            for decoder in available_decoders():
                # The fastest decoder on every read; the others where decoding is the whole cost.
                measured = decoder == fastest or group.startswith("read_random_many")
                assert (f"imgstore-{backend}-keep-{decoder}" in rows) == measured, (group, decoder)


def test_rows_carry_their_ratios_to_the_limit_and_the_status_quo(run: dict[str, Any]) -> None:
    for bench in _storage_rows(run):
        info = bench["extra_info"]
        assert info["images"] == 10 and info["file_bytes"] > 10 * 20_000  # JPEG files, not thumbnails
        assert info["ratio_to_limit"] > 0 and info["ratio_to_tutorial"] > 0, bench["name"]
        if info["kind"] == "imgstore":
            assert info["variant"].startswith("keep") and info["backend"] in ENCODED_BACKENDS
        many = get_operation(info["operation"]).speedup_over is not None
        has_single = info["operation"] == "read_random_many" and (
            info["kind"] != "imgstore" or info["variant"].endswith(resolve_decoder("auto"))
        )
        assert (info["speedup_over_single"] is not None) == (many and has_single), bench["name"]
    names = {bench["name"] for bench in run["doc"]["benchmarks"]}
    assert "test_storage[imgstore-lmdb-keep-simplejpeg-read_random_many-10-imagenet-like]" in names or (
        resolve_decoder("auto") != "simplejpeg"
    )


def test_summary_gives_rates_bytes_per_image_and_the_targets(run: dict[str, Any]) -> None:
    out = run["stdout"]
    assert "read_random_many n=10 imagenet-like: Reading shuffled batches" in out
    assert "MB/s" in out and "KB/image" in out and "xfolder" in out
    # The targets are about batches of 256: at 10 images the section says so (evaluated below on 1 000).
    assert "targets: measured on a read_random_many of 256 images or more (none here)" in out


# ---------------------------------------------------------------------- which sizes a run measures


def _config(**options: str | None) -> Any:
    values = {"cutoffs": None, "imagenet_cutoffs": "auto", "dataset": DEFAULT_DATASETS, **options}
    return SimpleNamespace(getoption=lambda name: values[name])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [1000]),  # the default run
        ({"cutoffs": "all"}, [1000]),
        ({"cutoffs": "10"}, [10]),  # the CI smoke run
        ({"cutoffs": "1000"}, []),  # the gate's matrix stays CIFAR's
        ({"cutoffs": "10,100,1000"}, [10, 100]),
        ({"imagenet_cutoffs": "none"}, []),
        ({"cutoffs": "10", "imagenet_cutoffs": "2000,5000"}, [2000, 5000]),
        ({"cutoffs": "1000,10000", "dataset": "imagenet-like"}, [1000, 10000]),  # asked for by name: as named
        ({"dataset": "imagenet-like"}, [1000]),
    ],
)
def test_imagenet_cutoffs(options: dict[str, str], expected: list[int]) -> None:
    assert imagenet_cutoffs(_config(**options)) == expected


def test_the_gate_matrix_has_no_imagenet_rows() -> None:
    gate = _pytest("--cutoffs=1000", "--ops=store_many,read_many,read_random", "--collect-only", timeout=300)
    assert gate.returncode == 0, gate.stdout[-2000:]
    ids = [line for line in gate.stdout.splitlines() if "test_storage[" in line]
    assert ids and not [line for line in ids if "imagenet" in line]
    default = _pytest("--collect-only", timeout=300)
    imagenet = [line for line in default.stdout.splitlines() if "imagenet-like]" in line]
    assert imagenet and all("-1000-imagenet-like]" in line for line in imagenet)


# ---------------------------------------------------------------------- the subjects and their check


@pytest.mark.parametrize("n", [1, BATCH_SIZE + 3])  # one batch, and a short last batch
def test_every_encoded_subject_reads_what_its_check_expects(tmp_path: Path, n: int) -> None:
    from imgstore.datasets import load_dataset

    files, labels = load_dataset("imagenet-like", n)
    data = BenchData("imagenet-like", list(files), np.asarray(labels, np.int64))
    subjects = make_encoded_subjects(ENCODED_BACKENDS, ["keep"])
    for subject in subjects:
        ops = [get_operation(name) for name in subject.operations if get_operation(name).kind == "read"]
        if not ops:
            continue
        path = tmp_path / subject.store_key
        if not path.exists():
            subject.build(path, data.images, data.labels)
        reader = subject.open_reader(path, ())
        try:
            for op in ops:
                argument = op.argument(n)
                last = subject.body(op.name)(reader, argument)
                subject.check_last(op, last, argument, data)
                images, got_labels = last
                first = images if isinstance(images, np.ndarray) else images[0]
                wrong = np.array(first, copy=True)
                wrong[0, 0, 0] ^= 1  # one pixel off: the check sees it
                changed = wrong if isinstance(images, np.ndarray) else [wrong, *images[1:]]
                with pytest.raises(AssertionError, match="wrong pixels"):
                    subject.check_last(op, (changed, got_labels), argument, data)
                with pytest.raises(AssertionError, match="wrong labels"):
                    subject.check_last(op, (images, np.asarray(got_labels) + 1), argument, data)
        finally:
            subject.close_reader(reader)


def _bench(name: str, best: float, n: int = 1000) -> Any:
    info = {"dataset": "imagenet-like", "operation": "read_random_many", "images": n}
    stats = SimpleNamespace(min=best, median=best * 1.5)  # the verdict is on the fastest rounds
    return SimpleNamespace(extra_info=info, params={"subject_name": name}, stats=stats)


def test_targets_pass_and_miss_on_their_thresholds() -> None:
    fastest = resolve_decoder("auto")
    rows = [
        _bench("limit", 1.0),
        _bench("imagefolder", 4.0),
        _bench(f"imgstore-lmdb-keep-{fastest}", 1.15),  # at the threshold: passes
        _bench(f"imgstore-hdf5-keep-{fastest}", 2.5),  # 2.5x the limit, 1.6x the status quo: misses both
        _bench("imgstore-png-keep-" + fastest, 1.0),  # not a target backend
    ]
    assert evaluate([_bench(row.params["subject_name"], row.stats.min, n=255) for row in rows]) == []
    results = {(r["backend"], r["target"]): r for r in evaluate(rows)}
    assert set(results) == {("lmdb", 1), ("lmdb", 2), ("hdf5", 1), ("hdf5", 2)}
    assert results["lmdb", 1]["passed"] and results["lmdb", 2]["passed"]
    assert results["lmdb", 2]["ratio"] == pytest.approx(4.0 / 1.15) == results["lmdb", 2]["median_ratio"]
    assert not results["hdf5", 1]["passed"] and not results["hdf5", 2]["passed"]
    assert results["lmdb", 1]["batch"] == pytest.approx(1.15 / 4)  # 1 000 images: 4 batches of up to 256


def test_the_default_run_leaves_out_the_dear_cases_at_10000_and_named_cutoffs_keep_them() -> None:
    """No --cutoffs: store_single stops at 10, variant and tutorial per-call rows at 1 000; named: all."""
    default = _pytest("--collect-only", "--dataset=synthetic", timeout=300)
    named = _pytest("--collect-only", "--dataset=synthetic", "--cutoffs=10,100,1000,10000", timeout=300)
    assert default.returncode == 0 and named.returncode == 0, default.stdout[-2000:] + named.stdout[-2000:]
    ids = {line for line in default.stdout.splitlines() if "test_storage[" in line}
    named_ids = {line for line in named.stdout.splitlines() if "test_storage[" in line}
    assert ids < named_ids
    left_out = named_ids - ids
    assert left_out and all("-10000-" in case or "store_single-" in case for case in left_out)
    assert any("store_single-10000" in case for case in left_out)
    assert any("-nosync-" in case for case in left_out) and any("-noverify-" in case for case in left_out)
    assert not any("store_single-10000" in case for case in ids)
    assert any("imgstore-lmdb-read_many-10000" in case for case in ids)  # the default rows stay at 10 000
    assert not any("store_single-100-" in case for case in ids) and any("store_single-10-" in case for case in ids)
    assert any("tutorial-lmdb-read_many-10000" in case for case in ids)
    assert not any("tutorial-lmdb-read_random-10000" in case for case in ids)
