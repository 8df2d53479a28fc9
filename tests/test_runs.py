"""Tests of imgstore.analysis.load and imgstore.analysis.schema: a malformed saved run is refused by
``imgstore compare`` and ``imgstore plot`` alike, with exit status 2 and one line naming the file
and what is wrong, never a traceback (and never exit 1, which means "regression"); the result
record the suite writes is read back the same, by this reader and by the previous one."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imgstore.analysis import load
from imgstore.analysis.load import MAX_SECONDS, MIN_SECONDS, load_run
from imgstore.analysis.schema import SCHEMA_VERSION, MalformedRunError, ResultRecord
from imgstore.cli import main
from imgstore.errors import ImgStoreError

NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # an integer JSON holds and float() cannot
# The commit whose imgstore compare read runs before the result record had a version.
PREVIOUS_READER = "8ec5f7b"
REPO = Path(__file__).resolve().parents[1]


def bench(fullname: str = "m.py::test_t", median: float = 1e-3, rounds: int = 10, **extra: Any) -> dict[str, Any]:
    """One benchmark as pytest-benchmark saves it, with the suite's extra_info."""
    data = [median * (0.95 + 0.1 * i / (rounds - 1)) for i in range(rounds)]
    return {
        "group": "store_many n=10",
        "name": fullname.rpartition("::")[2],
        "fullname": fullname,
        "params": {"subject_name": "imgstore-lmdb"},
        "param": "imgstore-lmdb",
        "extra_info": {
            "kind": "imgstore",
            "backend": "lmdb",
            "variant": "",
            "operation": "store_many",
            "images": 10,
            "dataset": "synthetic",
            "disk_bytes": 40_000,
            "file_bytes": 31_000,
            "images_per_second": 10 / median,
            "ratio_to_limit": None,
            **extra,
        },
        "options": {"disable_gc": False, "timer": "perf_counter", "min_rounds": 5},
        "stats": {
            "min": data[0],
            "max": data[-1],
            "mean": sum(data) / rounds,
            "stddev": 1e-5,
            "rounds": rounds,
            "median": data[rounds // 2],
            "iqr": 1e-5,
            "q1": data[2],
            "q3": data[-3],
            "iqr_outliers": 0,
            "stddev_outliers": 0,
            "outliers": "0;0",
            "ld15iqr": data[0],
            "hd15iqr": data[-1],
            "ops": 1 / median,
            "total": sum(data),
            "data": data,
            "iterations": 1,
        },
    }


def good_doc() -> dict[str, Any]:
    return {
        "machine_info": {"node": "ci", "cpu": {"count": 2}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [bench("m.py::test_a"), bench("m.py::test_b", 2e-3)],
        "datetime": "2025-01-01T00:00:00.000000+00:00",
        "version": "5.2.3",
    }


def changed(path: tuple[Any, ...], value: Any = None, *, delete: bool = False) -> bytes:
    """The good document with one field set (or deleted), as JSON (NaN/Infinity as Python writes them)."""
    doc = good_doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc).encode()


B0 = ("benchmarks", 0)
S0 = (*B0, "stats")
X0 = (*B0, "extra_info")

# name -> the file's bytes.  The first block is the issue's own list.
MALFORMED: dict[str, bytes] = {
    "median 1e300": changed((*S0, "median"), 1e300),
    "median 1e-300": changed((*S0, "median"), 1e-300),
    "median an integer of 400 digits": changed((*S0, "median"), HUGE),
    "deeply nested JSON": b"[" * 100_000 + b"]" * 100_000,
    "deeply nested inside a benchmark": changed((*B0, "params"), {"x": 1}).replace(
        b'{"x": 1}', b"[" * 100_000 + b"]" * 100_000
    ),
    "a list in extra_info.operation": changed((*X0, "operation"), ["store_many"]),
    # Reading the file.
    "empty file": b"",
    "whitespace only": b" \n",
    "not UTF-8": b'{"benchmarks": [], "note": "caf\xe9"}',
    "UTF-16": json.dumps(good_doc()).encode("utf-16"),
    "not JSON": b"{ this is not json",
    "truncated": json.dumps(good_doc()).encode()[:-40],
    "an integer of 5000 digits": changed((*S0, "median"), 1).replace(
        b'"median": 1,', b'"median": 1' + b"0" * 5000 + b","
    ),
    # The top level.
    "a top-level list": b"[]",
    "a top-level list of runs": json.dumps([good_doc()]).encode(),
    "a top-level string": b'"benchmarks"',
    "null": b"null",
    "{}": b"{}",
    "benchmarks an object": changed(("benchmarks",), {}),
    "benchmarks null": changed(("benchmarks",), None),
    "benchmarks a string": changed(("benchmarks",), "[]"),
    "machine_info a list": changed(("machine_info",), ["node"]),
    "commit_info a string": changed(("commit_info",), "0123abc"),
    "commit_info.id a list": changed(("commit_info", "id"), ["0123abc"]),
    "datetime a number": changed(("datetime",), 20250101),
    # A benchmark.
    "a benchmark that is a number": changed(B0, 1),
    "a benchmark that is a list": changed(B0, ["m.py::test_a"]),
    "no fullname": changed((*B0, "fullname"), delete=True),
    "empty fullname": changed((*B0, "fullname"), ""),
    "fullname a list": changed((*B0, "fullname"), ["m.py::test_a"]),
    "fullname a huge integer": changed((*B0, "fullname"), HUGE),
    "duplicate fullname": changed((*B0, "fullname"), "m.py::test_b"),
    "name a list": changed((*B0, "name"), ["test_a"]),
    "name a number": changed((*B0, "name"), 5),
    "group a list": changed((*B0, "group"), ["store_many n=10"]),
    "group an object": changed((*B0, "group"), {"n": 10}),
    "params a list": changed((*B0, "params"), ["imgstore-lmdb"]),
    "extra_info a list": changed(X0, [1, 2]),
    "extra_info a string": changed(X0, "store_many"),
    # stats.
    "no stats": changed(S0, delete=True),
    "stats a list": changed(S0, [1e-3]),
    "no median": changed((*S0, "median"), delete=True),
    "median null": changed((*S0, "median"), None),
    "median negative": changed((*S0, "median"), -1e-3),
    "median zero": changed((*S0, "median"), 0),
    "median NaN": changed((*S0, "median"), NAN),
    "median Infinity": changed((*S0, "median"), INF),
    "median -Infinity": changed((*S0, "median"), -INF),
    "median 1e400 (Infinity as a float)": changed((*S0, "median"), 1).replace(b'"median": 1,', b'"median": 1e400,'),
    "median true": changed((*S0, "median"), True),
    "median a string": changed((*S0, "median"), "0.001"),
    "median a list": changed((*S0, "median"), [1e-3]),
    "median beyond 1e9 seconds": changed((*S0, "median"), 2e9),
    "median below a picosecond": changed((*S0, "median"), 1e-13),
    "min a huge integer": changed((*S0, "min"), HUGE),
    "max Infinity": changed((*S0, "max"), INF),
    "mean NaN": changed((*S0, "mean"), NAN),
    "mean a string": changed((*S0, "mean"), "fast"),
    "stddev negative": changed((*S0, "stddev"), -1.0),
    "stddev a huge integer": changed((*S0, "stddev"), HUGE),
    "iqr NaN": changed((*S0, "iqr"), NAN),
    "rounds 0": changed((*S0, "rounds"), 0),
    "rounds negative": changed((*S0, "rounds"), -3),
    "rounds a float": changed((*S0, "rounds"), 10.5),
    "rounds true": changed((*S0, "rounds"), True),
    "rounds a huge integer": changed((*S0, "rounds"), HUGE),
    "data a string": changed((*S0, "data"), "1,2,3"),
    "data an object": changed((*S0, "data"), {"0": 1e-3}),
    "data null": changed((*S0, "data"), None),
    "data with a string": changed((*S0, "data"), [1e-3, "x"]),
    "data with null": changed((*S0, "data"), [1e-3, None]),
    "data with NaN": changed((*S0, "data"), [1e-3, NAN]),
    "data with Infinity": changed((*S0, "data"), [1e-3, INF]),
    "data with zero": changed((*S0, "data"), [1e-3, 0.0]),
    "data with a negative time": changed((*S0, "data"), [1e-3, -1e-3]),
    "data with true": changed((*S0, "data"), [1e-3, True]),
    "data with a huge integer": changed((*S0, "data"), [1e-3, HUGE]),
    "data with 1e300": changed((*S0, "data"), [1e-3, 1e300]),
    "data with a list": changed((*S0, "data"), [1e-3, [1e-3]]),
    # extra_info fields compare and plot use.
    "operation an object": changed((*X0, "operation"), {"name": "store_many"}),
    "operation a number": changed((*X0, "operation"), 5),
    "kind a list": changed((*X0, "kind"), ["limit"]),
    "kind a huge integer": changed((*X0, "kind"), HUGE),
    "backend a list": changed((*X0, "backend"), ["lmdb"]),
    "dataset an object": changed((*X0, "dataset"), {}),
    "variant a list": changed((*X0, "variant"), ["level0"]),
    "images a huge integer": changed((*X0, "images"), HUGE),
    "images 10**20": changed((*X0, "images"), 10**20),
    "images negative": changed((*X0, "images"), -10),
    "images zero": changed((*X0, "images"), 0),
    "images a float": changed((*X0, "images"), 10.0),
    "images a string": changed((*X0, "images"), "10"),
    "images true": changed((*X0, "images"), True),
    "images a list": changed((*X0, "images"), [10]),
    "disk_bytes a huge integer": changed((*X0, "disk_bytes"), HUGE),
    "disk_bytes negative": changed((*X0, "disk_bytes"), -1),
    "disk_bytes 1e300": changed((*X0, "disk_bytes"), 1e300),
    "file_bytes a huge integer": changed((*X0, "file_bytes"), HUGE),
    "file_bytes NaN": changed((*X0, "file_bytes"), NAN),
    # The rest of the result record (imgstore.analysis.schema).
    "images_per_second a string": changed((*X0, "images_per_second"), "fast"),
    "images_per_second negative": changed((*X0, "images_per_second"), -1.0),
    "ratio_to_limit NaN": changed((*X0, "ratio_to_limit"), NAN),
    "ratio_to_limit Infinity": changed((*X0, "ratio_to_limit"), INF),
    "ratio_to_tutorial true": changed((*X0, "ratio_to_tutorial"), True),
    "ratio_to_tutorial a huge integer": changed((*X0, "ratio_to_tutorial"), HUGE),
    "speedup_over_single a list": changed((*X0, "speedup_over_single"), [2.0]),
    "schema_version a string": changed((*X0, "schema_version"), "2"),
    "schema_version 0": changed((*X0, "schema_version"), 0),
    "schema_version a float": changed((*X0, "schema_version"), 2.0),
    "schema_version true": changed((*X0, "schema_version"), True),
}


def assert_one_line(err: str, command: str, bad: Path) -> None:
    assert err.startswith(f"imgstore {command}: error: {bad}: "), err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and len(err) < 400, err


@pytest.mark.parametrize("problem", list(MALFORMED))
def test_compare_refuses_a_malformed_run_with_one_line(problem: str, tmp_path: Path, capsys: Any) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(good_doc()), encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_bytes(MALFORMED[problem])
    # Either side, and the message names the bad file, not the good one.
    for args in ([good, bad], [bad, good], [bad, bad]):
        assert main(["compare", *map(str, args)]) == 2
        captured = capsys.readouterr()
        assert_one_line(captured.err, "compare", bad)
        assert captured.out == ""


@pytest.mark.parametrize("problem", list(MALFORMED))
def test_plot_refuses_a_malformed_run_with_one_line(problem: str, tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(MALFORMED[problem])
    out = tmp_path / "figures"
    assert main(["plot", str(bad), "--out", str(out)]) == 2
    assert_one_line(capsys.readouterr().err, "plot", bad)
    assert not out.exists()  # nothing drawn from a broken run


@pytest.mark.parametrize(
    "problem,words",
    [
        ("median 1e300", ["benchmarks[0]", "m.py::test_a", "stats.median", "1e+300"]),
        ("median an integer of 400 digits", ["stats.median", "integer of more than 30 digits"]),
        ("deeply nested JSON", ["nested too deeply"]),
        ("a list in extra_info.operation", ["extra_info.operation", "a list", "not a string"]),
        ("not UTF-8", ["UTF-8"]),
        ("a top-level list", ["top level is a list"]),
        ("rounds 0", ["stats.rounds"]),
        ("data with a string", ["stats.data[1]", "'x'"]),
        ("images a huge integer", ["extra_info.images"]),
        ("an integer of 5000 digits", ["integer too large"]),
    ],
)
def test_the_message_says_what_is_wrong(problem: str, words: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(MALFORMED[problem])
    with pytest.raises(ImgStoreError) as caught:
        load_run(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad}: ")
    for word in words:
        assert word in message


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(good_doc()), encoding="utf-8")
    assert load_run(path).benchmarks  # fine at the real limit
    monkeypatch.setattr(load, "MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ImgStoreError, match="too large"):
        load_run(path)


def test_one_bad_file_in_a_directory_of_runs_is_named(tmp_path: Path, capsys: Any) -> None:
    base, head = tmp_path / "base", tmp_path / "head"
    for side in (base, head):
        side.mkdir()
        for i in (1, 2):
            (side / f"run{i}.json").write_text(json.dumps(good_doc()), encoding="utf-8")
    assert main(["compare", str(base), str(head)]) == 0
    capsys.readouterr()
    (head / "run2.json").write_bytes(MALFORMED["median 1e300"])
    assert main(["compare", str(base), str(head)]) == 2
    assert_one_line(capsys.readouterr().err, "compare", head / "run2.json")


def test_a_name_with_a_newline_stays_on_one_line(tmp_path: Path, capsys: Any) -> None:
    doc = good_doc()
    doc["benchmarks"][0]["fullname"] = "m.py::test_a[\nline two]" + "x" * 10_000
    doc["benchmarks"][0]["stats"]["median"] = HUGE
    bad = tmp_path / "bad\nname.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    assert main(["compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "bad\\nname.json" in err and "line two" in err and len(err) < 400


def test_valid_runs_at_the_limits_are_read_unchanged(tmp_path: Path) -> None:
    doc = good_doc()
    doc["benchmarks"][0]["stats"].update(median=MIN_SECONDS, data=[MIN_SECONDS, 1, MAX_SECONDS], rounds=3, stddev=0)
    doc["benchmarks"][1]["stats"] = {"median": 2}  # the least pytest-benchmark-like run we accept
    doc["benchmarks"][1]["extra_info"] = {"operation": None, "images": None, "disk_bytes": 0}
    del doc["commit_info"], doc["machine_info"], doc["datetime"]
    doc["benchmarks"][0].update(group=None, params=None, name=None)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    run = load_run(path)
    first, second = run.benchmarks.values()
    assert first.median == MIN_SECONDS and first.rounds == (MIN_SECONDS, 1.0, MAX_SECONDS)
    assert first.name == first.fullname and first.group is None
    assert second.median == 2.0 and isinstance(second.median, float) and second.rounds == ()
    assert run.commit is None and run.datetime is None


def test_the_good_document_is_good(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(good_doc()), encoding="utf-8")
    run = load_run(path)
    assert list(run.benchmarks) == ["m.py::test_a", "m.py::test_b"]
    assert run.commit == "0123456789abcdef" and run.datetime == "2025-01-01T00:00:00.000000+00:00"
    bench_a = run.benchmarks["m.py::test_a"]
    assert bench_a.name == "test_a" and bench_a.group == "store_many n=10" and len(bench_a.rounds) == 10
    assert math.isclose(bench_a.median, 1e-3, rel_tol=0.05)
    assert bench_a.extra_info == copy.deepcopy(good_doc()["benchmarks"][0]["extra_info"])


# ------------------------------------------------------------------------------ the result record


def suite_record(**changes: Any) -> ResultRecord:
    """A record as benchmarks/test_storage.py writes it (every field given by name)."""
    fields: dict[str, Any] = dict(
        kind="imgstore",
        backend="lmdb",
        variant="",
        operation="read_random_many",
        images=1000,
        dataset="synthetic",
        disk_bytes=4_128_768,
        file_bytes=3_170_304,
        images_per_second=708_382.1,
        ratio_to_limit=1.18,
        ratio_to_tutorial=0.00321,
        speedup_over_single=1.99,
    )
    return ResultRecord(**{**fields, **changes})


def test_the_record_round_trips_through_extra_info() -> None:
    record = suite_record()
    info = record.to_extra_info()
    assert info["schema_version"] == SCHEMA_VERSION == record.schema_version
    assert set(info) == {"schema_version", *(f.name for f in dataclasses.fields(ResultRecord))}
    assert json.loads(json.dumps(info)) == info  # plain JSON, as pytest-benchmark writes it
    assert ResultRecord.from_extra_info(info) == record
    assert ResultRecord.from_extra_info(suite_record(ratio_to_limit=None).to_extra_info()).ratio_to_limit is None


def test_the_writer_must_give_every_field() -> None:
    with pytest.raises(TypeError, match="speedup_over_single"):
        ResultRecord(  # type: ignore[call-arg]
            kind="limit", backend="raw", variant="", operation="read_many", images=10, dataset="synthetic",
            disk_bytes=0, file_bytes=0, images_per_second=1.0, ratio_to_limit=1.0, ratio_to_tutorial=None,
        )  # fmt: skip
    with pytest.raises(MalformedRunError, match="extra_info.images"):
        suite_record(images=0)


def test_runs_saved_before_the_version_are_version_1() -> None:
    info = suite_record().to_extra_info()
    del info["schema_version"]
    assert ResultRecord.from_extra_info(info).schema_version == 1
    assert ResultRecord.from_extra_info(good_doc()["benchmarks"][0]["extra_info"]).schema_version == 1
    # What a hand-made or foreign run holds: the fields it lacks are None, keys it adds are ignored.
    partial = ResultRecord.from_extra_info({"operation": "read_many", "images": 10, "note": "by hand"})
    assert (partial.operation, partial.images, partial.kind, partial.variant) == ("read_many", 10, None, None)


def test_a_newer_version_is_read_as_far_as_its_fields_go(tmp_path: Path) -> None:
    # Versions only add fields: a record of a later version, with a field this reader does not
    # know, is read (its known fields), not refused.
    doc = good_doc()
    doc["benchmarks"][0]["extra_info"].update(schema_version=SCHEMA_VERSION + 1, threads=4)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    bench = load_run(path).benchmarks["m.py::test_a"]
    assert bench.record.schema_version == SCHEMA_VERSION + 1 and bench.record.backend == "lmdb"
    assert bench.extra_info["threads"] == 4  # kept as the file holds it


def previous_imgstore(tmp_path: Path) -> Path:
    """The imgstore package of commit PREVIOUS_READER, extracted under ``tmp_path`` (skip without git)."""
    root = tmp_path / "previous"
    root.mkdir()
    try:
        archive = subprocess.run(
            ["git", "archive", PREVIOUS_READER, "imgstore"], cwd=REPO, capture_output=True, timeout=60, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"the previous imgstore (git commit {PREVIOUS_READER}) is not in this checkout")
    return root


def previous_compare(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``imgstore compare ARGS`` as the previous imgstore runs it (its package, not this one)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import imgstore.cli as cli; "
        "assert cli.__file__.startswith(sys.argv[1]), cli.__file__; sys.exit(cli.main(sys.argv[2:]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code, str(root), "compare", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_previous_compare_reads_every_field_of_the_record(tmp_path: Path) -> None:
    # "The benchmark JSON of a default run is readable by the previous imgstore compare": the
    # compare of commit 8ec5f7b (before the record had a version) reads records with every field set.
    doc = good_doc()
    doc["benchmarks"][0]["extra_info"] = suite_record().to_extra_info()
    doc["benchmarks"][1]["extra_info"] = suite_record(kind="limit", backend="raw", ratio_to_tutorial=None,
                                                      speedup_over_single=None).to_extra_info()  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = previous_compare(previous_imgstore(tmp_path), str(path), str(path))
    assert result.returncode == 0, result.stderr
    assert "0 regressions" in result.stdout and "m.py::test_a" not in result.stderr
    assert [b.record for b in load_run(path).benchmarks.values()] == [
        ResultRecord.from_extra_info(b["extra_info"]) for b in doc["benchmarks"]
    ]


def test_the_previous_compare_reads_what_the_suite_writes(tmp_path: Path) -> None:
    # The same on a run of the real suite (every backend, one operation with speedup_over_single).
    pytest.importorskip("pytest_benchmark")
    root = previous_imgstore(tmp_path)
    path = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if k != "IMGSTORE_BENCH_INJECT_SLOWDOWN"}
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark-only", "--cutoffs=10", "--ops=read_random,read_random_many",
         "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    records = [bench.record for bench in load_run(path).benchmarks.values()]
    assert records and all(record.schema_version == SCHEMA_VERSION for record in records)
    for record in records:  # every field the suite always fills is there
        assert None not in (record.kind, record.backend, record.variant, record.operation, record.images)
        assert None not in (record.dataset, record.disk_bytes, record.file_bytes, record.images_per_second)
        if record.dataset != "imagenet-like":  # its rows at the smoke run's size have no read_random to compare
            assert (record.speedup_over_single is not None) == (record.operation == "read_random_many")
    result = previous_compare(root, str(path), str(path))
    assert result.returncode == 0, result.stderr
    assert f"0 regressions, 0 improvements, {len(records)} unchanged" in result.stdout
