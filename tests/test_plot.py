"""Tests of ``imgstore plot`` on a run written by pytest-benchmark with the suite's extra_info."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from imgstore.analysis.load import load_run  # noqa: E402
from imgstore.analysis.plot import extract_points, plot_run  # noqa: E402
from imgstore.cli import main  # noqa: E402  (after the skips: plotting is an optional extra)

# A miniature of the real suite: three imgstore backends, two tutorial ones and the raw limit,
# four operations (no store_single/read_single: their figures must simply be skipped).
BENCH_FILE = textwrap.dedent(
    """
    import pytest

    SERIES = [("imgstore", "png", 30), ("imgstore", "lmdb", 4), ("imgstore", "hdf5", 3),
              ("tutorial", "png", 40), ("tutorial", "lmdb", 6), ("limit", "raw", 1)]
    OPERATIONS = ["store_many", "read_many", "read_random", "iterate"]

    def work(units):
        return sum(range(int(units)))

    @pytest.mark.parametrize("images", [10, 30, 100])
    @pytest.mark.parametrize("operation", OPERATIONS)
    @pytest.mark.parametrize("kind,backend,cost", SERIES)
    def test_suite(benchmark, kind, backend, cost, operation, images):
        benchmark.group = f"{operation} n={images}"
        disk = images * 3072 * (1.0 + cost / 100) + 8192 if operation == "store_many" else None
        benchmark.extra_info.update(
            kind=kind, backend=backend, operation=operation, images=images, dataset="synthetic",
            disk_bytes=None if disk is None else int(disk), images_per_second=0.0,
            ratio_to_limit=None, ratio_to_tutorial=None,
        )
        benchmark.pedantic(work, args=(100 * cost * images,), rounds=3, iterations=1)
    """
)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("plotrun")
    (directory / "test_mini_suite.py").write_text(BENCH_FILE, encoding="utf-8")
    output = directory / "run.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            f"--benchmark-json={output}",
            str(directory),
        ],
        cwd=directory,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def assert_png(path: Path, min_width: int = 700) -> None:
    assert path.stat().st_size > 20_000, f"{path} is suspiciously small"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= 500
        image.verify()


def test_plot_writes_the_tutorial_figures(run_file: Path, tmp_path: Path) -> None:
    written = plot_run(run_file, tmp_path / "figures")
    assert [path.name for path in written] == ["store_read.png", "disk_usage.png", "read_random.png", "iterate.png"]
    for path in written:
        assert path.parent == tmp_path / "figures"
        assert_png(path)
    # store_many and read_many side by side: the combined figure is wider than tall.
    with Image.open(written[0]) as image:
        assert image.width > image.height * 1.1


def test_points_follow_the_extra_info_contract(run_file: Path) -> None:
    points = extract_points(load_run(run_file))
    assert len(points) == 6 * 4 * 3
    assert {(p.kind, p.backend) for p in points} >= {("limit", "raw"), ("tutorial", "lmdb")}
    assert all(p.disk_bytes for p in points if p.operation == "store_many")


def test_cli_plot_prints_the_paths(run_file: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "new" / "dir"
    assert main(["plot", str(run_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(out / name) for name in ("store_read.png", "disk_usage.png", "read_random.png", "iterate.png")
    ]
    assert all(Path(path).is_file() for path in printed)


def synthetic_run(path: Path, benchmarks: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"benchmarks": benchmarks}), encoding="utf-8")
    return path


def bench(operation: str, images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    info = {
        "kind": "imgstore",
        "backend": "lmdb",
        "operation": operation,
        "images": images,
        "dataset": "d",
        "disk_bytes": None,
        **extra,
    }
    name = f"t::{operation}-{images}-{info['backend']}"
    return {"fullname": name, "name": name, "extra_info": info, "stats": {"median": seconds}}


def test_missing_operations_are_skipped_not_errors(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "run.json", [bench("read_many", n, n * 1e-4) for n in (10, 100, 1000)])
    written = plot_run(run, tmp_path / "out")
    # No store_many (one column only), no disk_bytes (no disk figure), no other operation.
    assert [path.name for path in written] == ["store_read.png"]
    assert_png(written[0], min_width=500)


def test_run_without_the_extra_info_draws_nothing(tmp_path: Path, capsys: Any) -> None:
    run = synthetic_run(tmp_path / "run.json", [{"fullname": "t::x", "extra_info": {}, "stats": {"median": 1.0}}])
    assert plot_run(run, tmp_path / "out") == []
    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "extra_info" in capsys.readouterr().err


def test_operation_names_cannot_escape_the_output_directory(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "run.json", [bench("../../evil op", 10, 1e-3), bench("../../evil op", 100, 1e-2)])
    written = plot_run(run, tmp_path / "out")
    assert [path.name for path in written] == ["evil_op.png"]
    assert written[0].parent == tmp_path / "out"


def test_single_cutoff_and_few_decades_still_draw(tmp_path: Path) -> None:
    run = synthetic_run(
        tmp_path / "run.json",
        [
            bench("store_many", 50, 0.02, disk_bytes=200_000),
            bench("iterate", 50, 0.01),
            bench("iterate", 80, 0.015),
        ],
    )
    names = [path.name for path in plot_run(run, tmp_path / "out")]
    assert names == ["store_read.png", "disk_usage.png", "iterate.png"]


def test_presets_are_drawn_as_time_against_bytes(tmp_path: Path) -> None:
    rows = []
    for variant, seconds, size in (("", 0.7, 2_300_000), ("level0", 0.5, 3_200_000), ("level9", 0.75, 2_290_000)):
        for operation in ("store_many", "read_many"):
            row = bench(operation, 1000, seconds, backend="png", variant=variant, file_bytes=size, disk_bytes=4_100_000)
            row["fullname"] = row["name"] = f"t::{operation}-png-{variant}"
            rows.append(row)
    nosync = bench("store_many", 1000, 0.4, backend="png", variant="nosync", file_bytes=2_300_000)
    nosync["fullname"] = nosync["name"] = "t::store_many-png-nosync"
    run = synthetic_run(tmp_path / "run.json", [*rows, nosync])
    points = extract_points(load_run(run))
    assert {p.variant for p in points} == {"", "level0", "level9", "nosync"}
    written = plot_run(run, tmp_path / "out")
    assert [path.name for path in written] == ["store_read.png", "disk_usage.png", "presets.png"]
    assert_png(written[2], min_width=1000)


# ----------------------------------------------------------------- names and numbers from the file


@pytest.mark.parametrize("fixed", ["store_read", "disk_usage", "presets", "Store_Read", "PRESETS", "./disk_usage"])
def test_an_operation_never_overwrites_a_fixed_figure(fixed: str, tmp_path: Path) -> None:
    # An operation named store_read used to write store_read.png over the main figure.
    rows = [bench("store_many", n, n * 1e-4, disk_bytes=n * 4000) for n in (10, 100)]
    rows += [bench(fixed, n, n * 1e-4) for n in (10, 100)]
    presets = bench("store_many", 100, 1e-2, backend="png", variant="level0", file_bytes=300_000)
    presets["fullname"] = "t::store_many-png-level0"
    run = synthetic_run(tmp_path / "run.json", [*rows, presets, bench("read_many", 100, 1e-2, backend="png")])
    written = plot_run(run, tmp_path / "out")
    names = [path.name for path in written]
    assert names[:3] == ["store_read.png", "disk_usage.png", "presets.png"]
    assert len(names) == 4 and names[3].casefold() != fixed.casefold() + ".png"
    assert len({name.casefold() for name in names}) == 4
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(names)
    # The main figure is still the main figure (store_many and read_many side by side).
    with Image.open(written[0]) as image:
        assert image.width > image.height * 1.1


def test_operation_names_give_distinct_safe_file_names(tmp_path: Path) -> None:
    operations = [
        "../x",
        "/etc/x",
        "x",  # the two above reduce to it
        "a/b",
        "a_b",
        "a b",
        "nul\0byte",
        ".hidden",
        "..",
        "...",
        "-rf",
        "iterate",
        "Iterate",
        "z" * 300,
        "z" * 301,
        "operation",
    ]
    rows = [bench(op, n, n * 1e-4) for op in operations for n in (10, 100)]
    for index, row in enumerate(rows):
        row["fullname"] = row["name"] = f"t::{index}"
    written = plot_run(synthetic_run(tmp_path / "run.json", rows), tmp_path / "out")
    assert len(written) == len(operations)
    for path in written:
        assert path.parent == tmp_path / "out"
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,110}\.png", path.name), path.name
    assert len({path.name.casefold() for path in written}) == len(operations)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(path.name for path in written)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out" / "a").exists()


def test_dollar_signs_in_names_are_drawn_literally(tmp_path: Path) -> None:
    # A '$' starts matplotlib's mathtext; "$\\frac{" in a backend used to raise at draw time.
    rows = [
        bench(operation, n, n * 1e-4, backend="lm$db\\frac{", variant=variant, file_bytes=n * 3000)
        for operation in ("store_many", "read_many", "op$\\y{")
        for variant in ("", "le$vel")
        for n in (10, 100)
    ]
    for index, row in enumerate(rows):
        row["fullname"] = f"t::{index}"
    run = synthetic_run(tmp_path / "run$x.json", rows)
    assert [path.name for path in plot_run(run, tmp_path / "out")] == ["store_read.png", "presets.png", "op_y.png"]


@pytest.mark.parametrize(
    "field,digits", [("images", 400), ("disk_bytes", 400), ("file_bytes", 400), ("images", 20), ("kind", 400)]
)
def test_huge_integers_exit_2_with_one_line(field: str, digits: int, tmp_path: Path, capsys: Any) -> None:
    # Each used to end in an OverflowError traceback (or, for kind, to be drawn as a number).
    row = bench("store_many", 10, 1e-3, backend="png", variant="level0", file_bytes=1000, disk_bytes=2000)
    row["extra_info"][field] = 10**digits
    run = synthetic_run(tmp_path / "run.json", [row, bench("store_many", 100, 1e-2, backend="png", file_bytes=9000)])
    out = tmp_path / "out"
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imgstore plot: error: {run}: ") and f"extra_info.{field}" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
