"""Every saved run on one timeline: the series of each benchmark per machine, and its change points.

``imgstore history DIR...`` reads every pytest-benchmark JSON file under the folders (as
``--benchmark-save`` lays them out, ``.benchmarks/<machine>/NNNN_<name>.json``, or any folder of
runs), groups the runs by machine (``machine_info``: node and CPU; runs of different machines are
never on one timeline, nor runs timed in CPU time, the gate's timer, with runs timed in wall
time), orders them by commit time (``commit_info.time``; the run's own ``datetime`` when a file
has no commit time, said in a note) and makes one point per commit: the runs of one commit are
repeated measurements of the same code.  Each benchmark's series of points
is then searched for change points (:mod:`imgstore.analysis.changepoints`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgstore.analysis.changepoints import Change, find_changes
from imgstore.analysis.clocks import WALL_TIMERS
from imgstore.analysis.load import Run, load_run
from imgstore.analysis.schema import REFERENCE_KINDS
from imgstore.errors import ImgStoreError

__all__ = ["Commit", "History", "Series", "build_history", "find_run_files", "load_history", "run_figure"]

UNKNOWN_MACHINE = "unknown machine"


@dataclass(frozen=True)
class Commit:
    """One point of the timeline: a commit (or one run without a commit) and its runs."""

    label: str  # the commit's id (first 10 characters, + "-dirty"), or the run's file name
    commit: str | None
    time: str | None  # what the point is ordered by (commit time, else the run's datetime)
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Series:
    """One benchmark on one machine: per point of the timeline it is in, its runs' figures."""

    fullname: str
    name: str
    kind: str | None
    points: tuple[int, ...]  # indices into History.commits
    figures: tuple[tuple[float, ...], ...]  # per point: each run's figure (seconds)
    changes: tuple[Change, ...]
    unconfirmed: int = 0  # proposed changes the runs did not confirm

    @property
    def reference(self) -> bool:
        return self.kind in REFERENCE_KINDS

    def median(self, position: int) -> float:
        values = sorted(self.figures[position])
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else math.sqrt(values[middle - 1] * values[middle])


@dataclass(frozen=True)
class Machine:
    name: str
    commits: tuple[Commit, ...]
    series: tuple[Series, ...]


@dataclass
class History:
    machines: list[Machine]
    files: int
    confidence: float
    min_change: float
    notes: list[str] = field(default_factory=list)

    def changes(self) -> Iterable[tuple[Machine, Series, Change]]:
        for machine in self.machines:
            for series in machine.series:
                for change in series.changes:
                    yield machine, series, change

    def slowdowns(self) -> list[tuple[Machine, Series, Change]]:
        """Confirmed slowdowns of imgstore rows (not of tutorial/limit rows: those measure the machine)."""
        return [(m, s, c) for m, s, c in self.changes() if c.ratio > 1 and not s.reference]


def find_run_files(folders: Sequence[str | Path]) -> list[Path]:
    """Every ``*.json`` under the folders (a file given by name is taken as it is), sorted, once each."""
    found: dict[Path, None] = {}
    for folder in folders:
        path = Path(folder)
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            for file in sorted(path.rglob("*.json")):
                if file.is_file():
                    found[file.resolve()] = None
        else:
            raise ImgStoreError(f"{folder}: no such file or folder")
    return sorted(found)


def run_figure(rounds: Sequence[float], median: float) -> float:
    """A run's figure for a benchmark: its fastest round (interference only adds time), or the
    median pytest-benchmark saved when the run has no rounds (saved without --benchmark-save-data)."""
    return min(rounds) if rounds else median


def load_history(folders: Sequence[str | Path], *, confidence: float = 0.99, min_change: float = 0.05) -> History:
    files = find_run_files(folders)
    if not files:
        raise ImgStoreError(f"no *.json benchmark run under {', '.join(map(str, folders))}")
    return build_history([load_run(file) for file in files], confidence=confidence, min_change=min_change)


def build_history(runs: Sequence[Run], *, confidence: float = 0.99, min_change: float = 0.05) -> History:
    """Group, order and analyse runs (see the module docstring)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if min_change < 0 or not math.isfinite(min_change):
        raise ValueError(f"min_change must be a non-negative fraction, not {min_change}")
    history = History([], len(runs), confidence, min_change)
    undated = [run for run in runs if not run.commit_time]
    if undated:
        history.notes.append(
            f"{len(undated)} run(s) without commit_info.time are placed by the time they ran (datetime), "
            f"e.g. {Path(undated[0].path).name}."
        )
    by_machine: dict[str, list[Run]] = {}
    for run in runs:
        by_machine.setdefault(_timeline(run), []).append(run)
    for name in sorted(by_machine):
        commits = _commits(by_machine[name])
        history.machines.append(Machine(name, tuple(commits), tuple(_series(commits, confidence, min_change))))
    if len(history.machines) > 1:
        history.notes.append(
            f"{len(history.machines)} machines: each has its own timeline (timings of different machines "
            "are never compared)."
        )
    return history


def _timeline(run: Run) -> str:
    """The machine, and the timer when it is not wall time (the gate's CPU timer): CPU seconds and wall
    seconds of one benchmark are never on one timeline."""
    machine = run.machine or UNKNOWN_MACHINE
    timers = sorted({bench.timer for bench in run.benchmarks.values() if bench.timer} - WALL_TIMERS)
    return f"{machine}, timed with {'/'.join(timers)}" if timers else machine


def _commits(runs: list[Run]) -> list[Commit]:
    groups: dict[tuple[str | None, bool, str], list[Run]] = {}
    for run in runs:
        known = run.commit if run.commit and run.commit not in ("unversioned", "unknown") else None
        # A run without a commit is a point of its own; a dirty tree is not its commit's code.
        groups.setdefault((known, run.dirty, "" if known else run.path), []).append(run)
    commits = []
    for (commit, dirty, path), members in groups.items():
        label = f"{commit[:10]}{'-dirty' if dirty else ''}" if commit else Path(path).name
        time = min(run.commit_time or run.datetime or "" for run in members) or None
        ordered = tuple(sorted(members, key=lambda run: (run.datetime or "", run.path)))
        commits.append(Commit(label, commit, time, ordered))
    # Times compared in UTC; a point without any time goes first.
    return sorted(commits, key=lambda c: (_sortable(c.time), c.runs[0].datetime or "", c.label))


def _sortable(time: str | None) -> str:
    if not time:
        return ""
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(time.replace("Z", "+00:00"))
    except ValueError:
        return time
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


def _series(commits: Sequence[Commit], confidence: float, min_change: float) -> list[Series]:
    names: dict[str, tuple[str, str | None]] = {}
    for commit in commits:
        for run in commit.runs:
            for fullname, bench in run.benchmarks.items():
                names.setdefault(fullname, (bench.name, bench.record.kind))
    # Bonferroni over the benchmarks of the machine: "did anything change" keeps the confidence.
    alpha = (1 - confidence) / max(len(names), 1)
    result = []
    for fullname in sorted(names):
        points, figures = [], []
        for index, commit in enumerate(commits):
            benches = [run.benchmarks[fullname] for run in commit.runs if fullname in run.benchmarks]
            values = [run_figure(bench.rounds, bench.median) for bench in benches]
            if values:
                points.append(index)
                figures.append(tuple(values))
        changes, unconfirmed = find_changes(figures, alpha=alpha, confidence=confidence, min_change=min_change)
        name, kind = names[fullname]
        result.append(Series(fullname, name, kind, tuple(points), tuple(figures), tuple(changes), unconfirmed))
    return result
