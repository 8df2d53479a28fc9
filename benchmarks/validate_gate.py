"""Replay the protocol of ``.ci/bench-gate`` on runs written by ``.ci/validate-gate``.

Runs ``aa_<i>.json`` are the same code; ``inj_<i>.json`` the same code with one benchmark slowed
by 25% (``IMGSTORE_BENCH_INJECT_SLOWDOWN``), taken alternately: aa_0, inj_0, aa_1, inj_1, ...

* A/A comparison i: base = aa_i and aa_i+2, head = aa_i+1 and aa_i+3 (each side two runs,
  interleaved, as the script takes them); a false alarm if anything is a regression.
* Injected comparison j: base = aa_j and aa_j+1, head = inj_j and inj_j+1; caught if the slowed
  benchmark is a regression (any other benchmark flagged counts as a false alarm too).
* Benchmarks left ``slower? (rerun)`` are judged again on two other runs a side (later ones, or
  earlier near the end), as the script's rerun stage would, and only those.

Consecutive comparisons share runs, so the counts are not independent trials.
    usage: python -m benchmarks.validate_gate DIR [--target SUBSTRING]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgstore import compare
from imgstore.compare import Run, Verdict


def gate(base: list[Run], head: list[Run], base2: list[Run], head2: list[Run]) -> tuple[list[str], list[str]]:
    """(regressions, benchmarks that needed the rerun stage) of one .ci/bench-gate invocation."""
    rows = compare.compare_runs(compare.merge_runs(base), compare.merge_runs(head))
    regressions = [row.fullname for row in rows if row.verdict is Verdict.REGRESSION]
    rerun = compare.unsure(rows)
    if not regressions and rerun and base2:  # no other runs to rerun on: stays unsettled
        again = compare.compare_runs(compare.merge_runs(base2), compare.merge_runs(head2))
        regressions = [row.fullname for row in again if row.fullname in rerun and row.verdict is Verdict.REGRESSION]
    return regressions, rerun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--target", default="imgstore-lmdb-read_many", help="the slowed benchmark (substring)")
    args = parser.parse_args()
    same = _series(args.dir, "aa")
    slowed = _series(args.dir, "inj")

    alarms = reruns = 0
    count_aa = max(0, len(same) - 3)
    for i in range(count_aa):
        j = i + 4 if i + 7 < len(same) else i - 4
        later = ([same[j], same[j + 2]], [same[j + 1], same[j + 3]]) if j >= 0 else ([], [])
        regressions, rerun = gate([same[i], same[i + 2]], [same[i + 1], same[i + 3]], *later)
        alarms += bool(regressions)
        reruns += bool(rerun)
        if regressions or rerun:
            print(f"A/A {i}: regressions {regressions}, rerun {rerun}")

    caught = others = reruns_injected = 0
    count_injected = max(0, min(len(slowed), len(same)) - 1)
    for i in range(count_injected):
        j = i + 2 if i + 3 < min(len(slowed), len(same)) else i - 2
        later = ([same[j], same[j + 1]], [slowed[j], slowed[j + 1]]) if j >= 0 else ([], [])
        regressions, rerun = gate([same[i], same[i + 1]], [slowed[i], slowed[i + 1]], *later)
        hit = any(args.target in name for name in regressions)
        extra = [name for name in regressions if args.target not in name]
        caught += hit
        others += bool(extra)
        reruns_injected += bool(rerun)
        if not hit or extra or rerun:
            print(f"injected {i}: regressions {regressions}, rerun {rerun}")
    print(
        f"A/A: {alarms} false alarms in {count_aa} comparisons (rerun stage in {reruns}); "
        f"25% slowdown: caught in {caught} of {count_injected}, another benchmark flagged in {others} "
        f"(rerun stage in {reruns_injected})"
    )


def _series(directory: Path, prefix: str) -> list[Run]:
    runs = []
    index = 0
    while (path := directory / f"{prefix}_{index}.json").exists():
        try:
            runs.append(compare.load_run(path))
        except compare.ImgStoreError:
            break  # a run still being written
        index += 1
    return runs


if __name__ == "__main__":
    main()
