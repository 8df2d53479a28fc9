"""The summary's last section: which backend for which need, from this run's figures.

Each line names the imgstore backend (default row: durable writes, verified reads) that did best
on one need in this run, at the largest fixed-shape cutoff that measured it, with the runner-up
and the ratio between them, so a user who runs the suite on their own machine sees what wins
there. "Safest" and "readable by other tools" are not timings: they come from each backend's
``caveats`` and ``readers`` (``imgstore.Store``), the README's Guarantees table in short.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.data import ENCODED_DATASETS
from imgstore.analysis.report import format_seconds
from imgstore.registry import get_backend

# (need, operation, what decides: "time" = the median, lower wins; "disk" = bytes on disk, lower wins)
NEEDS = (
    ("fastest bulk read (read_many)", "read_many", "time"),
    ("fastest shuffled read, one get each (read_random)", "read_random", "time"),
    ("fastest shuffled batches of 256 (read_random_many)", "read_random_many", "time"),
    ("fastest write (store_many)", "store_many", "time"),
    ("smallest on disk", "store_many", "disk"),
)


def _default_rows(rows: list[Any]) -> list[Any]:
    """The fixed-shape dataset's default imgstore rows (no variant)."""
    return [
        b
        for b in rows
        if b.extra_info["kind"] == "imgstore"
        and not b.extra_info.get("variant")
        and b.extra_info["dataset"] not in ENCODED_DATASETS
    ]


def _best(candidates: list[Any], key: Callable[[Any], float]) -> tuple[Any, Any | None]:
    ranked = sorted(candidates, key=key)
    return ranked[0], (ranked[1] if len(ranked) > 1 else None)


def verdict_lines(rows: list[Any]) -> list[str]:
    """The verdict, one line per need (empty when the run measured no default imgstore rows)."""
    chosen = _default_rows(rows)
    if not chosen:
        return []
    lines = []
    for need, operation, decides in NEEDS:
        measured = [b for b in chosen if b.extra_info["operation"] == operation]
        # Warm and cold-cache rows of one backend are not rivals (with --cache both, LMDB's cold row
        # was "the runner-up" of its warm one): the warm rows, or the cold ones of a cold-only run.
        warm = [b for b in measured if b.extra_info.get("cache") != "cold"]
        measured = warm or measured
        if not measured:
            continue
        n = max(b.extra_info["images"] for b in measured)
        at_n = [b for b in measured if b.extra_info["images"] == n]
        if decides == "time":
            best, second = _best(at_n, lambda b: b.stats.median)
            figure = format_seconds(best.stats.median)
            ratio = second.stats.median / best.stats.median if second else 0.0
            lead = f", {ratio:.2f}x faster than {second.extra_info['backend']}" if second else ""
        else:
            best, second = _best(at_n, lambda b: b.extra_info["disk_bytes"])
            figure = f"{best.extra_info['disk_bytes'] / 1e6:.1f} MB"
            ratio = second.extra_info["disk_bytes"] / max(best.extra_info["disk_bytes"], 1) if second else 0.0
            lead = f", {ratio:.2f}x smaller than {second.extra_info['backend']}" if second else ""
        cold = ", cold cache" if best.extra_info.get("cache") == "cold" else ""
        lines.append(f"{need}: {best.extra_info['backend']} ({figure} at {n:,} images{cold}{lead})")
    backends = sorted({b.extra_info["backend"] for b in chosen})
    classes = {name: get_backend(name) for name in backends}
    plain = [name for name in backends if not classes[name].caveats]
    differ = "; ".join(f"{name}: {', '.join(classes[name].caveats)}" for name in backends if classes[name].caveats)
    lines.append(
        "safest: "
        + (", ".join(plain) if plain else "none without a caveat")
        + " (every backend passes the same crash, full-disk, damage and concurrency suites"
        + (f"; where the others differ: {differ})" if differ else ")")
    )
    lines.append(
        "readable by other tools: "
        + "; ".join(f"{name}: {', '.join(classes[name].readers)}" for name in backends if classes[name].readers)
    )
    return lines


def write_verdict(tr: Any, rows: list[Any]) -> None:
    lines = verdict_lines(rows)
    if not lines:
        return
    tr.write_line("")
    tr.write_line("which backend for which need, on this machine (default rows: durable, verified reads)", bold=True)
    for line in lines:
        tr.write_line(f"  {line}")
    tr.write_line(f"  reproduce: {shlex.join(['pytest', *sys.argv[1:]])}")
