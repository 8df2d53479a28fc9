"""Compatibility shim: ``imgstore.compare`` as it was before the analysis got its own package.

The comparison now lives in :mod:`imgstore.analysis` (``load``: saved runs, ``stats``: intervals
and spreads, ``verdict``: ``compare_runs``, ``report``: table and Markdown).  This module re-exports
its public names for code written against ``imgstore.compare`` (``benchmarks/validate_gate.py``
among them); new code imports from :mod:`imgstore.analysis` directly.
"""

from __future__ import annotations

from imgstore.analysis.clocks import DEFAULT_WALL_THRESHOLD, compare_clocks
from imgstore.analysis.load import Benchmark, Run, load_run, load_runs, merge_runs
from imgstore.analysis.report import (
    COLUMNS,
    DEFAULT_COLUMNS,
    format_markdown,
    format_seconds,
    format_table,
    notes,
    summary,
)
from imgstore.analysis.schema import REFERENCE_KINDS
from imgstore.analysis.stats import (
    Drift,
    between_run_spreads,
    machine_drift,
    ratio_interval,
    repeated_run_spreads,
    rounds_needed,
)
from imgstore.analysis.verdict import (
    CONFIDENCE_RANGE,
    Comparison,
    Verdict,
    compare_runs,
    has_regression,
    parse_threshold,
    to_rerun,
    unsure,
)
from imgstore.errors import ImgStoreError

__all__ = [
    "Benchmark",
    "COLUMNS",
    "CONFIDENCE_RANGE",
    "Comparison",
    "DEFAULT_WALL_THRESHOLD",
    "DEFAULT_COLUMNS",
    "Drift",
    "ImgStoreError",
    "REFERENCE_KINDS",
    "Run",
    "Verdict",
    "between_run_spreads",
    "compare_clocks",
    "compare_runs",
    "format_markdown",
    "format_seconds",
    "format_table",
    "has_regression",
    "load_run",
    "load_runs",
    "machine_drift",
    "merge_runs",
    "notes",
    "parse_threshold",
    "ratio_interval",
    "repeated_run_spreads",
    "rounds_needed",
    "summary",
    "to_rerun",
    "unsure",
]
