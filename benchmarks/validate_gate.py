"""Replay the protocol of ``.ci/bench-gate`` on runs written by ``.ci/validate-gate``.

Runs ``aa_<i>.json`` are the same code (A); ``inj_<i>.json`` the same code with slowdowns put in
on purpose (I: busy-waits from ``IMGSTORE_BENCH_INJECT_SLOWDOWN`` and a real code change), taken
alternately: aa_0, inj_0, aa_1, inj_1, ...

* A/A comparison i: base = aa_i and aa_i+2, head = aa_i+1 and aa_i+3 (each side two runs,
  interleaved, as the script takes them); a false alarm if anything is a regression.
* Injected comparison j: base = aa_j and aa_j+1, head = inj_j and inj_j+1; each target (a slowed
  benchmark, ``--target``) caught or not; any other benchmark flagged is a false alarm, unless it
  matches ``--affected`` (rows a real code change slows too).
* Benchmarks left ``slower? (rerun)`` are judged again, among themselves, on two other runs a side
  (later ones, or earlier near the end), as the script's rerun stage runs and judges just those.

Consecutive comparisons share runs, so the counts are not independent trials.
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
    """The verdict of one .ci/bench-gate invocation on these runs (base2/head2: its rerun stage's)."""
    rows = compare.compare_clocks(compare.merge_runs(base), compare.merge_runs(head))
    regressions = [row.fullname for row in rows if row.verdict is Verdict.REGRESSION]
    rerun = compare.unsure(rows)
    if not regressions and rerun and base2:  # no other runs to rerun on: stays unsettled
        # .ci/bench-gate's rerun stage runs just these benchmarks: judged among themselves
        again = compare.compare_clocks(compare.merge_runs(only(base2, rerun)), compare.merge_runs(only(head2, rerun)))
        regressions = [row.fullname for row in again if row.verdict is Verdict.REGRESSION]
    return Outcome(regressions, rerun)


def only(runs: list[Run], names: list[str]) -> list[Run]:
    """The runs cut down to the benchmarks ``names``."""
    return [Run(run.path, {n: run.benchmarks[n] for n in names if n in run.benchmarks}) for run in runs]


def same_code_outcomes(same: list[Run]) -> list[Outcome]:
    """A/A: base A_i, A_i+2 against head A_i+1, A_i+3; the rerun stage on four other A runs."""
    outcomes = []
    for i in range(max(0, len(same) - 3)):
        j = i + 4 if i + 7 < len(same) else i - 4
        later = ([same[j], same[j + 2]], [same[j + 1], same[j + 3]]) if j >= 0 else ([], [])
        outcomes.append(gate([same[i], same[i + 2]], [same[i + 1], same[i + 3]], *later))
    return outcomes


def injected_outcomes(same: list[Run], slowed: list[Run]) -> list[Outcome]:
    """A_j, A_j+1 against I_j, I_j+1; the rerun stage on two other pairs."""
    count = min(len(slowed), len(same))
    outcomes = []
    for i in range(max(0, count - 1)):
        j = i + 2 if i + 3 < count else i - 2
        later = ([same[j], same[j + 1]], [slowed[j], slowed[j + 1]]) if j >= 0 else ([], [])
        outcomes.append(gate([same[i], same[i + 1]], [slowed[i], slowed[i + 1]], *later))
    return outcomes


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
    same_outcomes, slowed_outcomes = same_code_outcomes(same), injected_outcomes(same, slowed)
    for kind, outcomes in (("A/A", same_outcomes), ("injected", slowed_outcomes)):
        for i, outcome in enumerate(outcomes):
            if outcome.rerun or (kind == "A/A" and outcome.regressions):
                flagged = [benchmark_id(name) for name in outcome.regressions]
                print(f"{kind} {i}: regressions {flagged}, rerun {[benchmark_id(name) for name in outcome.rerun]}")
    print(f"{len(same)} A runs, {len(slowed)} I runs in {args.dir}")
    print(report(tally(same_outcomes), tally(slowed_outcomes, targets, affected)))


def _series(directory: Path, prefix: str) -> list[Run]:
    """The runs ``<prefix>_<i>.json`` in the order of i; a failed run (``.failed``, see .ci/validate-gate) is
    left out, and the series ends at the first index with neither (or at a run still being written)."""
    runs = []
    index = 0
    while (path := directory / f"{prefix}_{index}.json").exists() or path.with_suffix(".failed").exists():
        if path.exists():
            try:
                runs.append(compare.load_run(path))
            except compare.ImgStoreError:
                break  # a run still being written
        index += 1
    return runs


if __name__ == "__main__":
    main()
