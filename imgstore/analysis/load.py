"""Saved pytest-benchmark runs: read and checked in one place, for ``imgstore compare`` and ``plot``.

A run file comes from anywhere (an artifact of another CI job, a file edited by hand), so every
field the tools use is checked here, once, before any arithmetic or drawing sees it:

* timings (``stats.median``, ``min``, ``max``, ``mean``, every ``stats.data`` round) are numbers
  between :data:`MIN_SECONDS` and :data:`MAX_SECONDS`; ``stddev`` and ``iqr`` are between 0 and
  :data:`MAX_SECONDS`; ``stats.rounds`` is a count of at least one.  Within these bounds every ratio
  of two timings, its logarithm and the intervals built on it stay finite;
* ``name``, ``group``, ``datetime`` are strings (or null); ``params``, ``extra_info``,
  ``machine_info``, ``commit_info`` are objects (or null);
* ``extra_info`` is a result record as :mod:`imgstore.analysis.schema` defines it (every field of
  the right type and range, or absent or null; unknown keys are kept and ignored);
* not JSON, not UTF-8, nested too deeply, an integer of thousands of digits, a file over
  :data:`MAX_FILE_BYTES`: refused as well.

Booleans are never numbers here (``true`` seconds is a broken file).  Anything else raises
:class:`~imgstore.analysis.schema.MalformedRunError` (an :class:`ImgStoreError`) with one line: the
file, where in it, and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgstore.analysis.schema import MAX_COUNT, MalformedRunError, ResultRecord, describe, is_count, short
from imgstore.errors import ImgStoreError

__all__ = [
    "Benchmark",
    "Run",
    "load_run",
    "load_runs",
    "merge_runs",
    "MAX_COUNT",
    "MAX_FILE_BYTES",
    "MIN_SECONDS",
    "MAX_SECONDS",
]

# A saved run with every round of a full suite is a few MB; this is far beyond any real one.
MAX_FILE_BYTES = 256 * 2**20
# One picosecond to ~30 years: any real timing, and no ratio, log or exp of them overflows.
MIN_SECONDS, MAX_SECONDS = 1e-12, 1e9


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a run: identified across runs by ``fullname``; times in seconds.

    ``extra_info`` is the object as the file holds it (unknown keys included); :attr:`record` is
    the same, parsed into the suite's :class:`ResultRecord`.
    """

    fullname: str
    name: str
    group: str | None
    median: float
    rounds: tuple[float, ...] = ()
    extra_info: dict[str, Any] = field(default_factory=dict)
    # The rounds of each run, when several runs of the same code were merged (see merge_runs).
    run_rounds: tuple[tuple[float, ...], ...] = ()
    # The timer of the rounds (pytest-benchmark's options.timer: "perf_counter", or "cpu_seconds" for
    # the gate's CPU timer), and each round's wall time when the suite kept it (extra_info["wall_rounds"]);
    # run_wall_rounds: per run, as run_rounds. How the gate uses both: imgstore.analysis.clocks.
    timer: str | None = None
    wall_rounds: tuple[float, ...] = ()
    run_wall_rounds: tuple[tuple[float, ...], ...] = ()
    # Which of the merged runs (0-based, in merge order) hold run_rounds, when merge_runs(partial=True)
    # kept a benchmark only some runs have; () when every run has it.
    run_numbers: tuple[int, ...] = ()

    @property
    def figure(self) -> float:
        """The time a comparison's ratio is of: with several runs merged, each run's fastest round, geometric
        mean over the runs (imgstore.analysis.verdict, "Repeated runs"); else the median."""
        if len(self.run_rounds) > 1 and all(self.run_rounds):
            return math.exp(statistics.fmean(math.log(min(rounds)) for rounds in self.run_rounds))
        return self.median

    @property
    def record(self) -> ResultRecord:
        """The result record in ``extra_info`` (parsed on each access: a few microseconds)."""
        return ResultRecord.from_extra_info(self.extra_info)


@dataclass(frozen=True)
class Run:
    path: str
    benchmarks: dict[str, Benchmark]
    datetime: str | None = None
    commit: str | None = None
    # For ``imgstore history``: the commit's time (commit_info.time, ISO 8601), whether the tree was
    # dirty, and the machine (machine_info.node and the CPU's name), when the file has them.
    commit_time: str | None = None
    dirty: bool = False
    machine: str | None = None
    runs: int = 1  # how many runs (files) were merged into this one (:func:`merge_runs`)


def load_run(path: str | Path) -> Run:
    """Read a pytest-benchmark JSON file; raise :class:`ImgStoreError` with a one-line reason."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImgStoreError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path (only through the API: argv cannot hold one)
        raise ImgStoreError(f"{path!r}: cannot read: not a valid path") from None
    if len(raw) > MAX_FILE_BYTES:
        raise MalformedRunError(f"{path}: too large for a benchmark run (over {MAX_FILE_BYTES // 2**20} MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRunError(f"{path}: not a text file (not UTF-8 at byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedRunError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedRunError(f"{path}: not a benchmark run: JSON nested too deeply") from None
    except ValueError:  # an integer of more digits than int() accepts from text (4300)
        raise MalformedRunError(f"{path}: not a benchmark run: holds an integer too large to read") from None
    try:
        return _parse_run(doc, str(path))
    except MalformedRunError as exc:
        raise MalformedRunError(f"{path}: {exc}") from None


def _parse_run(doc: object, path: str) -> Run:
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        what = f"the top level is {describe(doc)}" if not isinstance(doc, dict) else "no 'benchmarks' list"
        raise MalformedRunError(f"not a pytest-benchmark JSON file ({what})")
    for key in ("machine_info", "commit_info"):
        _optional(doc, key, dict, "an object")
    datetime = _optional(doc, "datetime", str, "a string")
    commit_info = doc.get("commit_info") or {}
    commit = _optional(commit_info, "id", str, "a string", "commit_info.id")
    commit_time = _optional(commit_info, "time", str, "a string", "commit_info.time")
    dirty = _optional(commit_info, "dirty", bool, "true or false", "commit_info.dirty") or False

    benchmarks: dict[str, Benchmark] = {}
    for index, raw in enumerate(doc["benchmarks"]):
        bench = _parse_benchmark(raw, f"benchmarks[{index}]")
        if bench.fullname in benchmarks:
            raise MalformedRunError(f"benchmark {short(bench.fullname)} appears twice")
        benchmarks[bench.fullname] = bench
    return Run(
        path=path,
        benchmarks=benchmarks,
        datetime=datetime,
        commit=commit,
        commit_time=commit_time,
        dirty=dirty,
        machine=_machine(doc.get("machine_info") or {}),
    )


def _machine(info: dict[str, Any]) -> str | None:
    """``node (CPU name)`` from pytest-benchmark's machine_info; None if it has neither."""
    node = info.get("node") if isinstance(info.get("node"), str) else None
    cpu = info.get("cpu")
    brand = cpu.get("brand_raw") if isinstance(cpu, dict) and isinstance(cpu.get("brand_raw"), str) else None
    if node and brand:
        return f"{node} ({brand})"
    return node or brand


def _parse_benchmark(raw: object, where: str) -> Benchmark:
    if not isinstance(raw, dict):
        raise MalformedRunError(f"{where} is {describe(raw)}, not an object")
    fullname = raw.get("fullname")
    if not isinstance(fullname, str) or not fullname:
        raise MalformedRunError(f"{where} has no 'fullname'")
    where = f"{where} ({short(fullname)})"
    name = _optional(raw, "name", str, "a string", where=where)
    group = _optional(raw, "group", str, "a string", where=where)
    _optional(raw, "params", dict, "an object", where=where)
    options = _optional(raw, "options", dict, "an object", where=where) or {}
    timer = _optional(options, "timer", str, "a string", "options.timer", where=where)
    extra_info = _optional(raw, "extra_info", dict, "an object", where=where) or {}
    try:
        ResultRecord.from_extra_info(extra_info)
    except MalformedRunError as exc:
        raise MalformedRunError(f"{where}: {exc}") from None

    stats = raw.get("stats")
    if not isinstance(stats, dict):
        raise MalformedRunError(f"{where} has no 'stats'")
    if "median" not in stats:
        raise MalformedRunError(f"{where} has no 'stats.median'")
    for key in ("median", "min", "max", "mean"):
        if key in stats:
            _check_seconds(stats[key], f"{where}: stats.{key}", MIN_SECONDS)
    for key in ("stddev", "iqr"):
        if key in stats:
            _check_seconds(stats[key], f"{where}: stats.{key}", 0.0)
    if "rounds" in stats and not is_count(stats["rounds"], 1):
        raise MalformedRunError(
            f"{where}: stats.rounds is {describe(stats['rounds'])}, not a count of rounds (1 or more)"
        )
    data = stats.get("data", [])
    if not isinstance(data, list):
        raise MalformedRunError(f"{where}: 'stats.data' is {describe(data)}, not a list of positive times")
    for index, seconds in enumerate(data):
        _check_seconds(seconds, f"{where}: stats.data[{index}]", MIN_SECONDS)
    wall = extra_info.get("wall_rounds") or []
    if not isinstance(wall, list):
        raise MalformedRunError(f"{where}: 'extra_info.wall_rounds' is {describe(wall)}, not a list of positive times")
    for index, seconds in enumerate(wall):
        _check_seconds(seconds, f"{where}: extra_info.wall_rounds[{index}]", MIN_SECONDS)
    return Benchmark(
        fullname=fullname,
        name=name or fullname,
        group=group,
        median=float(stats["median"]),
        rounds=tuple(float(t) for t in data),
        extra_info=extra_info,
        timer=timer,
        wall_rounds=tuple(float(t) for t in wall),
    )


def _optional(
    mapping: dict[str, Any], key: str, kind: type, article: str, label: str | None = None, where: str = ""
) -> Any:
    """``mapping[key]`` if it is of ``kind``, None if absent or null; else malformed."""
    value = mapping.get(key)
    if value is not None and not isinstance(value, kind):
        prefix = f"{where}: " if where else ""
        raise MalformedRunError(f"{prefix}{label or key} is {describe(value)}, not {article}")
    return value


def _check_seconds(value: object, what: str, smallest: float) -> None:
    """A time in seconds: a number (not a bool) within [smallest, MAX_SECONDS] (positive if smallest > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRunError(f"{what} is {describe(value)}, not a time in seconds")
    # Compared as they are: float(10**400) would overflow, and nan fails every comparison.
    if not smallest <= value <= MAX_SECONDS:
        raise MalformedRunError(f"{what} is {describe(value)}, not a time from {smallest:g} to {MAX_SECONDS:g} seconds")


def load_runs(path: str | Path, *, partial: bool = False) -> Run:
    """A JSON file, or a directory whose ``*.json`` files are repeated runs of the same code (merged,
    in file-name order; ``partial``: see :func:`merge_runs`).

    The directory is searched recursively, so a ``--benchmark-storage`` folder
    (``<folder>/<machine>/NNNN_<name>.json``) is taken as it is."""
    path = Path(path)
    if not path.is_dir():
        return load_run(path)
    files = sorted((file for file in path.rglob("*.json") if file.is_file()), key=lambda file: _natural(file, path))
    if not files:
        raise ImgStoreError(f"{path}: a directory with no *.json run in it")
    return merge_runs([load_run(file) for file in files], partial=partial)


def _natural(file: Path, root: Path) -> tuple[list[tuple[int, int | str]], str]:
    """Sort key: numbers in the names by value, so that run 10 follows run 9 (not 1), and 1.json, 02.json on
    one side and 01.json, 2.json on the other still pair run N with run N; then the name itself (1 before 01)."""
    name = file.relative_to(root).as_posix()
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part], name


def merge_runs(runs: Sequence[Run], *, partial: bool = False) -> Run:
    """Several runs of the same code as one: rounds pooled, each run's rounds kept (``run_rounds``).

    Runs of one side taken at different times (base, head, base, head, ...) are what lets
    :func:`imgstore.analysis.verdict.compare_runs` see how much a benchmark moves between runs of
    the same code.  A benchmark enters the merged run only if every run has it; with ``partial``,
    if any run has it, with the runs that do (:attr:`Benchmark.run_numbers` says which): the
    gate's rerun sessions hold only the benchmarks to settle, judged on every session that has them.
    """
    if not runs:
        raise ImgStoreError("no runs to merge")
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    names = dict.fromkeys(name for run in runs for name in run.benchmarks) if partial else first.benchmarks
    benchmarks = {}
    for name in names:
        held = [(number, run.benchmarks[name]) for number, run in enumerate(runs) if name in run.benchmarks]
        if len(held) < len(runs) and not partial:
            continue
        copies = [copy for _, copy in held]
        bench = copies[0]
        per_run = tuple(copy.rounds for copy in copies)
        per_run_wall = tuple(copy.wall_rounds for copy in copies)
        timers = {copy.timer for copy in copies}
        if len(timers) > 1:  # CPU seconds pooled with wall seconds would be neither
            timer_names = ", ".join(sorted(map(str, timers)))
            raise ImgStoreError(f"{short(name)}: the runs were timed with different timers ({timer_names})")
        rounds = tuple(t for run_rounds in per_run for t in run_rounds)
        medians = [copy.median for copy in copies]
        benchmarks[name] = Benchmark(
            fullname=name,
            name=bench.name,
            group=bench.group,
            median=statistics.median(rounds) if rounds else statistics.median(medians),
            rounds=rounds if all(per_run) else (),
            extra_info=bench.extra_info,
            run_rounds=per_run if all(per_run) else (),
            timer=bench.timer,
            wall_rounds=tuple(t for run_wall in per_run_wall for t in run_wall) if all(per_run_wall) else (),
            run_wall_rounds=per_run_wall if all(per_run_wall) else (),
            run_numbers=tuple(number for number, _ in held) if len(held) < len(runs) else (),
        )
    return Run(
        path=" + ".join(run.path for run in runs),
        benchmarks=benchmarks,
        datetime=first.datetime,
        commit=first.commit,
        runs=sum(run.runs for run in runs),
    )
