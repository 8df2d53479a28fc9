"""The ``imgstore`` console script.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
sets ``handler`` and ``command``; the handler takes the parsed arguments and returns the exit status.  To add a
command, write the pair and list the first one in ``COMMANDS``.

Exit status: 0 success, 1 the command's check failed (a regression), 2 bad input or usage.
Errors imgstore raises on purpose (:class:`ImgStoreError`) become one line on stderr, no traceback.

The console script sits in the analysis layer, beside :mod:`imgstore.analysis`: it imports the
analysis modules inside each handler (so ``imgstore compare`` needs no matplotlib), and the
storage library never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from imgstore.errors import ImgStoreError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

WORKFLOW = """\
workflow:
  1. save runs of the base branch and of your branch, alternating, each side in its own folder
     (one run a side cannot tell a benchmark's drift between runs from a change):
       mkdir -p runs/base runs/head    # --benchmark-json does not create them
       git switch main      && pytest --benchmark-only --benchmark-json=runs/base/1.json
       git switch my-change && pytest --benchmark-only --benchmark-json=runs/head/1.json
       ... and again: runs/base/2.json, runs/head/2.json
  2. compare the folders (exit 1 on a regression):
       imgstore compare runs/base runs/head --threshold 10%
  3. draw a run:
       imgstore plot runs/head/1.json --out figures/
  4. every saved run on a timeline, change points per benchmark:
       imgstore history .benchmarks/ --html history.html
  To gate a change (what CI does), from the repository root with the change in the working tree:
       .ci/bench-gate origin/main
  runs base and head in two paired sessions of the gated matrix (taking turns, benchmark by
  benchmark), compares the two directories of runs, runs the rows called a regression or left
  "slower? (rerun)" in two more sessions and judges them on all four (exit 1 on a regression
  confirmed there).
  (--benchmark-save=NAME --benchmark-save-data folders work too; a folder is searched recursively.)
"""

COMPARE_HELP = """\
Compare benchmark runs and give each benchmark a verdict that holds on a noisy machine.

BASELINE and CANDIDATE are each a pytest-benchmark JSON file, or a directory of such files taken
as repeated runs of the same code.

One file a side: per benchmark, the ratio of medians candidate/baseline and a confidence interval
for it from the saved rounds (Hodges-Lehmann/Mann-Whitney on log times), widened by the drift
between the two runs that the tutorial and limit rows of the same operation show.

A directory a side: each run is reduced to its fastest round (interference only adds time); the
ratio is that of the geometric means of these, and its interval comes from how far the runs of the
same code spread, per benchmark (never below what is usual for its operation).  With --paired (what
.ci/bench-gate gives: run N of each side taken in turns, benchmark by benchmark), the spread is that
of each benchmark's differences between the sides.  This is the gate whose false-alarm and
detection rates the README gives.

Verdicts:
  regression             the interval lies above 1 + THRESHOLD at CONFIDENCE and the slowdown is
                         significant after Bonferroni over the suite: exit status 1
  improvement            the mirror image
  slower? (rerun)        (directories) over the threshold, but not confirmed by these runs;
                         not a failure; --rerun FILE lists them, more runs settle them
  slower (reference row) a tutorial/limit row: the machine or the reference code moved; never fails
  unchanged              none of the above
  ... (unconfirmed)      no saved rounds, or too few for the suite-wide test (8 per run for 40
                         benchmarks at 0.99), or (--partial-runs) too few runs: judged on medians
                         only, never fails
  added / removed        in one side only
exit status: 0 no regression, 1 at least one regression, 2 bad input.
"""

PLOT_HELP = """\
Draw PNG figures of one run: time (median of rounds) against the number of images per
(kind, backend) series -- store_many and read_many side by side in linear and log-log axes --,
disk usage per backend, and one log-log figure per other operation in the run.  Operations the
run lacks are skipped.  Needs matplotlib: pip install 'imgstore-ml[plot]'.
"""


# --------------------------------------------------------------------------------------- compare


def _add_compare(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from imgstore.analysis.report import COLUMNS, DEFAULT_COLUMNS

    parser = subparsers.add_parser(
        "compare",
        help="compare two benchmark runs; exit 1 on a regression",
        description=COMPARE_HELP,
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "baseline", metavar="BASELINE", help="the run to compare against (JSON file), or a directory of repeated runs"
    )
    parser.add_argument(
        "candidate", metavar="CANDIDATE", help="the run being judged (JSON file), or a directory of repeated runs"
    )
    parser.add_argument(
        "--threshold",
        type=_threshold,
        default=0.10,
        metavar="PERCENT",
        help="smallest slowdown worth failing over: a percentage (10%%) or a fraction below 1 (0.10); "
        "a bare number of 1 or more is refused as ambiguous (default: 10%%)",
    )
    parser.add_argument(
        "--confidence",
        type=_confidence,
        default=0.99,
        help="confidence of each interval, between 0 and 1; the suite-wide significance check "
        "uses it Bonferroni-adjusted (default: 0.99)",
    )
    parser.add_argument(
        "--wall-threshold",
        type=_threshold,
        default=0.50,
        metavar="PERCENT",
        help="runs timed in CPU time with each round's wall time kept (the gate's timer, benchmarks/timer.py): "
        "the smallest wall-time slowdown that fails a row judged on CPU time, which CPU time cannot see "
        "(lost parallelism, waits); as --threshold (default: 50%%)",
    )
    parser.add_argument(
        "--markdown",
        metavar="FILE",
        type=Path,
        help="also write a Markdown summary (for a pull-request comment) to FILE",
    )
    parser.add_argument(
        "--columns",
        type=_columns,
        default=DEFAULT_COLUMNS,
        help=f"comma-separated table columns out of: {', '.join(COLUMNS)} (default: {','.join(DEFAULT_COLUMNS)})",
    )
    parser.add_argument(
        "--rerun",
        metavar="FILE",
        type=Path,
        help="write the full names of the benchmarks to run again, one per line: the regressions (to confirm) and "
        "the 'slower? (rerun)' rows (to settle); .ci/bench-gate reruns them and judges them on all its runs",
    )
    parser.add_argument(
        "--only",
        metavar="FILE",
        type=Path,
        help="report and judge only the benchmarks named in FILE, one full name a line (as --rerun writes it; "
        "a name neither side has is an error); the others still inform the intervals",
    )
    parser.add_argument(
        "--partial-runs",
        action="store_true",
        help="keep a benchmark that only some runs of a directory hold, judged on those runs (.ci/bench-gate's "
        "rerun sessions hold just the benchmarks to settle: judged on every session, the spread floors from all); "
        "with --paired, on the runs both sides hold it in (fewer than two: judged on its medians, never a "
        "regression); without it such a benchmark is left out of that side",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="directories whose runs were taken in turns, benchmark by benchmark: run N of BASELINE with run N "
        "of CANDIDATE, in file-name order (.ci/bench-gate's sessions); each benchmark's spread is then that of "
        "its N differences (as many runs a side, at least two)",
    )
    parser.add_argument(
        "--normalize",
        action="store_true",
        help="divide every ratio by the machine drift (the median ratio of the tutorial and "
        "limit benchmarks, which no imgstore change can affect)",
    )
    parser.set_defaults(handler=_run_compare, command="compare")


def _run_compare(args: argparse.Namespace) -> int:
    from imgstore.analysis import clocks, load, report, stats, verdict
    from imgstore.analysis.schema import short

    baseline = load.load_runs(args.baseline, partial=args.partial_runs)
    candidate = load.load_runs(args.candidate, partial=args.partial_runs)
    rows = clocks.compare_clocks(
        baseline,
        candidate,
        args.threshold,
        args.confidence,
        normalize=args.normalize,
        wall_threshold=args.wall_threshold,
        paired=args.paired,
    )
    suite = None
    if args.only is not None:
        try:
            # One name a line, as --rerun writes it: a parametrize id may hold a space.
            wanted = {line.strip() for line in args.only.read_text(encoding="utf-8").splitlines() if line.strip()}
        except OSError as exc:
            raise ImgStoreError(f"{args.only}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ImgStoreError(f"{args.only}: not a text file (not UTF-8 at byte {exc.start})") from None
        if not wanted:
            raise ImgStoreError(f"{args.only}: names no benchmark (one full name a line, as --rerun writes them)")
        # A name asked for and judged nowhere must not pass the gate unjudged.
        missing = sorted(wanted - {row.fullname for row in rows})
        if missing:
            listed = ", ".join(map(short, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ImgStoreError(f"{args.only}: names benchmarks neither side has: {listed}")
        suite = sum(row.confidence is not None for row in rows)
        rows = [row for row in rows if row.fullname in wanted]
    if all(row.verdict in (verdict.Verdict.ADDED, verdict.Verdict.REMOVED) for row in rows):
        # A gate that compared nothing must not pass: benchmarks renamed, or a run that ran none.
        raise ImgStoreError("no benchmark is in both runs: nothing was compared (renamed benchmarks, or an empty run?)")
    drift = stats.machine_drift(baseline, candidate)
    notes = report.notes(
        rows, drift, threshold=args.threshold, normalized=args.normalize, paired=args.paired, suite=suite
    )

    print(report.format_table(rows, args.columns))
    print()
    shown = verdict.format_threshold(args.threshold)
    print(f"{report.summary(rows)} (threshold {shown}, confidence {args.confidence:g})")
    for note in notes:
        print(f"  {note}")
    if args.markdown is not None:
        text = report.format_markdown(
            rows,
            baseline=baseline,
            candidate=candidate,
            threshold=args.threshold,
            confidence=args.confidence,
            columns=args.columns,
            notes=notes,
        )
        try:
            args.markdown.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ImgStoreError(f"{args.markdown}: cannot write: {exc.strerror or exc}") from None
    if args.rerun is not None:
        names = verdict.to_rerun(rows)
        try:
            args.rerun.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        except OSError as exc:
            raise ImgStoreError(f"{args.rerun}: cannot write: {exc.strerror or exc}") from None
    return EXIT_FAILED if verdict.has_regression(rows) else EXIT_OK


def _threshold(text: str) -> float:
    from imgstore.analysis.verdict import parse_threshold

    try:
        return parse_threshold(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _confidence(text: str) -> float:
    from imgstore.analysis.verdict import CONFIDENCE_RANGE

    low, high = CONFIDENCE_RANGE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 ({low:f} to {high:f}), not {text!r}")
    return value


def _columns(text: str) -> tuple[str, ...]:
    from imgstore.analysis.report import COLUMNS

    columns = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown or not columns:
        raise argparse.ArgumentTypeError(
            f"unknown column(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(COLUMNS)}"
        )
    return columns


# ------------------------------------------------------------------------------------------ plot


def _add_plot(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw PNG figures of one benchmark run",
        description=PLOT_HELP,
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN.json", help="a saved pytest-benchmark run")
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="directory for the PNG files (created if missing)"
    )
    parser.set_defaults(handler=_run_plot, command="plot")


def _run_plot(args: argparse.Namespace) -> int:
    # Imported here: matplotlib is optional, and `imgstore compare` must work without it.
    from imgstore.analysis import load, plot

    run = load.load_run(args.run)
    try:
        written = plot.plot_run(run, args.out)
    except OSError as exc:
        raise ImgStoreError(f"{args.out}: cannot write figures: {exc.strerror or exc}") from None
    if not written:
        raise ImgStoreError(
            f"{args.run}: no benchmark has the extra_info the figures need (kind, backend, operation, images)"
        )
    for path in written:
        print(path)
    sizes = {point.images for point in plot.extract_points(run)}
    if len(sizes) == 1:
        # Every line is one point: a column of dots. Say what would draw a curve.
        print(
            f"imgstore plot: note: the run has one size ({sizes.pop():,} images), so each series is a single "
            "point; save a run with several --cutoffs (e.g. --cutoffs=100,1000,10000) to see time against size, "
            "or use imgstore history for time against commit",
            file=sys.stderr,
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------- history

HISTORY_HELP = """\
Every saved pytest-benchmark run under the folders on one timeline, per machine, and the change
points of each benchmark's series.

The runs are grouped by machine (machine_info: node and CPU), ordered by commit time
(commit_info.time; a run without one by the time it ran, with a note), and the runs of one commit
make one point: the median of their fastest rounds.  Change points are found by ruptures (binary
segmentation, l1 cost, a penalty calibrated on noise) and each is confirmed on the runs: a
Mann-Whitney test of the runs before against after (Bonferroni over the benchmarks), a bootstrap
interval of the ratio of medians that excludes 1, and a change of at least --min-change.  Each is
reported with the last commit before it, the first after, the ratio and its interval.
Needs the [history] extra: pip install 'imgstore-ml[history]'.
exit status: 0 (1 with --fail-on-slowdown when an imgstore row got slower), 2 bad input.
"""


def _add_history(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "history",
        help="every saved benchmark run on a timeline: series and change points per benchmark",
        description=HISTORY_HELP,
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folders", nargs="+", metavar="DIR", help="folders of saved runs (searched recursively)")
    parser.add_argument(
        "--format", choices=("table", "markdown"), default="table", help="what to print (default: table)"
    )
    parser.add_argument("--html", metavar="FILE", type=Path, help="also write a self-contained HTML report to FILE")
    parser.add_argument(
        "--confidence",
        type=_confidence,
        default=0.99,
        help="confidence of the test and interval of each change point (Bonferroni over the benchmarks; default 0.99)",
    )
    parser.add_argument(
        "--min-change",
        type=_threshold,
        default=0.05,
        metavar="PERCENT",
        help="smallest change reported: a percentage (5%%) or a fraction (0.05) (default: 5%%)",
    )
    parser.add_argument(
        "--fail-on-slowdown", action="store_true", help="exit 1 if an imgstore benchmark has a confirmed slowdown"
    )
    parser.set_defaults(handler=_run_history, command="history")


def _run_history(args: argparse.Namespace) -> int:
    from imgstore.analysis import history, history_html, history_report

    timeline = history.load_history(args.folders, confidence=args.confidence, min_change=args.min_change)
    if args.format == "markdown":
        print(history_report.format_history_markdown(timeline), end="")
    else:
        print(history_report.format_history_table(timeline), end="")
    if args.html is not None:
        try:
            args.html.write_text(history_html.format_history_html(timeline), encoding="utf-8")
        except OSError as exc:
            raise ImgStoreError(f"{args.html}: cannot write: {exc.strerror or exc}") from None
    return EXIT_FAILED if args.fail_on_slowdown and timeline.slowdowns() else EXIT_OK


# ------------------------------------------------------------------------------ convert, info, verify


def _add_data_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Imported here, like the analysis modules: importing imgstore.cli loads neither side.
    from imgstore.data_commands import DATA_COMMANDS

    for add in DATA_COMMANDS:
        add(subparsers)


# ------------------------------------------------------------------------------------------ main

Subcommands = argparse._SubParsersAction  # argparse's own name for what add_subparsers returns
COMMANDS: tuple[Callable[[Subcommands[argparse.ArgumentParser]], None], ...] = (
    _add_compare,
    _add_plot,
    _add_history,
    _add_data_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgstore",
        description="imgstore tools: convert images into stores, describe and verify stores (imgstore.data_commands); "
        "judge and draw pytest-benchmark runs.",
        epilog=WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): report it, don't exit under a caller
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.handler(args)
        return code
    except ImgStoreError as exc:
        print(f"imgstore {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `imgstore info STORE | head`: the reader is gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK


def _one_line(text: str) -> str:
    """The message with its control characters escaped: a path or name with a newline stays on one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


if __name__ == "__main__":
    sys.exit(main())
