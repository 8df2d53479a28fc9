"""Replay the protocol of ``.ci/bench-gate`` on the paired sessions written by ``.ci/validate-gate``.

A session ``<kind>_<i>`` is two runs of the gated matrix taken in turns, benchmark by benchmark
(``<kind>_<i>_base.json``, ``<kind>_<i>_head.json``): ``aa`` sessions pair the same code with itself
(A/A), ``inj`` sessions pair it with a copy slowed on purpose (busy-waits from
``IMGSTORE_BENCH_INJECT_SLOWDOWN`` and a real code change), taken alternately: aa_0, inj_0, aa_1, ...

* Comparison i of a kind: sessions i and i+1, as the gate's two sessions (``compare --paired``).
  A/A: a false alarm if anything is a regression. Injected: each target (a slowed benchmark,
  ``--target``) caught or not; any other benchmark flagged is a false alarm, unless it matches
  ``--affected`` (rows a real code change slows too).
* Benchmarks the first two sessions call a regression (to confirm) or leave ``slower? (rerun)`` (to
  settle) are judged again on four sessions: the comparison's two and two other sessions of the kind
  (later ones, or earlier near the end) cut down to those benchmarks, as the script's rerun stage
  runs just those and judges them on all four. A regression is one confirmed there.

Consecutive comparisons share a session, so the counts are not independent trials.
    usage: python -m benchmarks.validate_gate DIR [--target ID ...] [--affected SUBSTRING ...]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from imgstore import compare
from imgstore.compare import Run, Verdict

# The benchmarks .ci/validate-gate slows (pytest ids): busy-waits in LMDB's shuffled gets at both
# sizes, in HDF5's bulk store at 10 000 images only, in the LMDB loader's epochs at 10 000 images; and
# the real change of .ci/real-slowdown (no-range) in memmap's read_many.
DEFAULT_TARGETS = (
    "imgstore-lmdb-read_random-1000-synthetic",
    "imgstore-lmdb-read_random-10000-synthetic",
    "imgstore-hdf5-store_many-10000-synthetic",
    "imgstore-lmdb-epoch-w0-10000-synthetic",
    "imgstore-lmdb-epoch-w2-10000-synthetic",
    "imgstore-memmap-read_many-1000-synthetic",
    "imgstore-memmap-read_many-10000-synthetic",
)
# Rows the same slowdowns slow too, whose flags are no false alarm: the cold rows of the slowed
# operations, and the real change's other memmap rows that read ranges (-noverify, iterate).
DEFAULT_AFFECTED = (
    "imgstore-lmdb-read_random-",
    "imgstore-lmdb-epoch-",
    "imgstore-memmap-read_many-",
    "imgstore-memmap-noverify-read_many-",
    "imgstore-memmap-iterate-",
)


@dataclass
class Outcome:
    """One replayed .ci/bench-gate invocation: what failed it, and what needed the rerun stage."""

    regressions: list[str]
    rerun: list[str]


@dataclass
class Tally:
    comparisons: int = 0
    alarms: int = 0  # comparisons where a benchmark not slowed on purpose was a regression
    reruns: int = 0  # comparisons that needed the rerun stage
    caught: dict[str, int] = field(default_factory=dict)  # per target: comparisons where it was a regression
    flagged: dict[str, int] = field(default_factory=dict)  # per falsely flagged benchmark: how often


def benchmark_id(fullname: str) -> str:
    """``benchmarks/test_storage.py::test_storage[ID]`` -> ``ID``."""
    return fullname[fullname.index("[") + 1 : -1] if fullname.endswith("]") and "[" in fullname else fullname


def gate(base: list[Run], head: list[Run], base2: list[Run], head2: list[Run]) -> Outcome:
    """The verdict of one .ci/bench-gate invocation on these paired runs (base2/head2: its rerun stage's)."""
    rows = compare.compare_clocks(compare.merge_runs(base), compare.merge_runs(head), paired=True)
    rerun = compare.to_rerun(rows)  # the regressions, to confirm, and the unsure rows, to settle
    regressions = [row.fullname for row in rows if row.verdict is Verdict.REGRESSION] if not base2 else []
    if rerun and base2:  # no other runs to rerun on: the first stage's verdicts stand
        # .ci/bench-gate's rerun stage runs just these benchmarks and judges them on all four sessions
        # (the first two whole, the rerun's cut to those): a regression is one confirmed there.
        again = compare.compare_clocks(
            compare.merge_runs(base + only(base2, rerun), partial=True),
            compare.merge_runs(head + only(head2, rerun), partial=True),
            paired=True,
        )
        regressions += [row.fullname for row in again if row.verdict is Verdict.REGRESSION and row.fullname in rerun]
    return Outcome(regressions, rerun)


def only(runs: list[Run], names: list[str]) -> list[Run]:
    """The runs cut down to the benchmarks ``names``."""
    return [Run(run.path, {n: run.benchmarks[n] for n in names if n in run.benchmarks}) for run in runs]


Session = tuple[Run, Run]  # (base side, head side) of one paired session


def gate_outcomes(sessions: list[Session]) -> list[Outcome]:
    """Comparison i: sessions i and i+1, as the gate's two sessions; its rerun stage on two other sessions."""
    result = []
    count = len(sessions)
    for i in range(max(0, count - 1)):
        j = i + 2 if i + 3 < count else i - 2
        later = [sessions[j], sessions[j + 1]] if j >= 0 else []
        result.append(
            gate(
                [sessions[i][0], sessions[i + 1][0]],
                [sessions[i][1], sessions[i + 1][1]],
                [base for base, _ in later],
                [head for _, head in later],
            )
        )
    return result


def tally(outcomes: list[Outcome], targets: tuple[str, ...] = (), affected: tuple[str, ...] = ()) -> Tally:
    """Count catches per target and false alarms: flags of benchmarks neither a target nor ``affected``."""
    result = Tally(comparisons=len(outcomes), caught=dict.fromkeys(targets, 0))
    for outcome in outcomes:
        flagged = {benchmark_id(name) for name in outcome.regressions}
        for target in targets:
            result.caught[target] += target in flagged
        others = [name for name in flagged if name not in targets and not any(a in name for a in affected)]
        result.alarms += bool(others)
        result.reruns += bool(outcome.rerun)
        for name in others:
            result.flagged[name] = result.flagged.get(name, 0) + 1
    return result


def report(same: Tally, slowed: Tally) -> str:
    lines = [
        f"A/A: {same.alarms} false alarms in {same.comparisons} comparisons (rerun stage in {same.reruns})"
        + (f"; flagged: {same.flagged}" if same.flagged else ""),
        f"injected: {slowed.comparisons} comparisons; another benchmark flagged in {slowed.alarms} "
        f"(rerun stage in {slowed.reruns})" + (f"; flagged: {slowed.flagged}" if slowed.flagged else ""),
    ]
    lines += [f"  {target}: caught in {count} of {slowed.comparisons}" for target, count in slowed.caught.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--target", action="append", help="a slowed benchmark's pytest id (repeatable)")
    parser.add_argument("--affected", action="append", help="substring of rows the change may slow too (repeatable)")
    args = parser.parse_args()
    targets = tuple(args.target or DEFAULT_TARGETS)
    affected = tuple(args.affected if args.affected is not None else DEFAULT_AFFECTED)
    same, slowed = _series(args.dir, "aa"), _series(args.dir, "inj")
    same_outcomes, slowed_outcomes = gate_outcomes(same), gate_outcomes(slowed)
    for kind, outcomes in (("A/A", same_outcomes), ("injected", slowed_outcomes)):
        for i, outcome in enumerate(outcomes):
            if outcome.rerun or (kind == "A/A" and outcome.regressions):
                flagged = [benchmark_id(name) for name in outcome.regressions]
                print(f"{kind} {i}: regressions {flagged}, rerun {[benchmark_id(name) for name in outcome.rerun]}")
    print(f"{len(same)} A/A sessions, {len(slowed)} injected sessions in {args.dir}")
    print(report(tally(same_outcomes), tally(slowed_outcomes, targets, affected)))


def _series(directory: Path, prefix: str) -> list[Session]:
    """The sessions ``<prefix>_<i>_{base,head}.json`` in the order of i; a failed one (``.failed``, see
    .ci/validate-gate) is left out, and the series ends at the first index with neither (or at a
    session still being written)."""
    sessions = []
    index = 0
    while (base := directory / f"{prefix}_{index}_base.json").exists() or base.with_suffix(".failed").exists():
        head = directory / f"{prefix}_{index}_head.json"
        if base.exists() and head.exists():
            try:
                sessions.append((compare.load_run(base), compare.load_run(head)))
            except compare.ImgStoreError:
                break  # a session still being written
        index += 1
    return sessions


if __name__ == "__main__":
    main()
