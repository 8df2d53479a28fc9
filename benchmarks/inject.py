"""Slowdowns put into chosen rows on purpose, to measure the regression gate (``.ci/validate-gate``).

``IMGSTORE_BENCH_INJECT_SLOWDOWN="<subject>:<operation>:<fraction>[@<cutoff>][,...]"`` makes each named
row slower by ``fraction`` of its own time, a busy-wait inside the timed call; with ``@<cutoff>`` at
that image count only (a regression that only shows at the largest size). The time is the one the
gate judges the row on (``clock``): CPU seconds under the gate's CPU timer (the busy-wait burns
``fraction`` of the round's CPU time, its workers' included), wall seconds for a row judged on wall
time. The epoch rows take it
too (subject: the loader's name, e.g. ``imgstore-lmdb``; both worker counts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

from benchmarks.operations import NAMES

SLOWDOWN_VARIABLE = "IMGSTORE_BENCH_INJECT_SLOWDOWN"


class Injection(NamedTuple):
    """``fraction`` of the row's own time added to ``subject`` on ``operation``, at ``cutoff`` images (None: all)."""

    subject: str
    operation: str
    fraction: float
    cutoff: int | None = None

    def applies(self, subject: str, operation: str, n: int) -> bool:
        return (subject, operation) == (self.subject, self.operation) and self.cutoff in (None, n)


def parse_slowdown(value: str) -> list[Injection]:
    """The injections of ``value`` (the variable's text); empty: none. Bad text: a pytest usage error."""
    injections = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        spec, _, cutoff = item.partition("@")
        try:
            subject, operation, fraction = spec.rsplit(":", 2)
            injection = Injection(subject, operation, float(fraction), int(cutoff) if cutoff else None)
        except ValueError:
            raise pytest.UsageError(
                f"{SLOWDOWN_VARIABLE} takes '<subject>:<operation>:<fraction>[@<cutoff>]', comma-separated; "
                f"got {item!r}"
            ) from None
        bad_cutoff = injection.cutoff is not None and injection.cutoff < 1
        if operation not in NAMES or not injection.fraction >= 0 or bad_cutoff:
            raise pytest.UsageError(
                f"{SLOWDOWN_VARIABLE}: unknown operation, negative fraction or cutoff below 1 in {item!r}"
            )
        injections.append(injection)
    return injections


def slowed_down(
    body: Callable[..., Any],
    injections: list[Injection],
    subject: str,
    operation: str,
    n: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[..., Any]:
    """``body``, slowed by every injection that applies to this row (unchanged when none does)."""
    for injection in injections:
        if injection.applies(subject, operation, n):
            body = with_injected_slowdown(body, injection.fraction, clock)
    return body


def with_injected_slowdown(
    body: Callable[..., Any], fraction: float, clock: Callable[[], float] = time.perf_counter
) -> Callable[..., Any]:
    """``body`` made slower by ``fraction`` of its own time on ``clock`` (busy-wait inside the timed call)."""

    def slowed(*args: Any) -> Any:
        start = clock()
        result = body(*args)
        until = clock() + (clock() - start) * fraction
        while clock() < until:
            pass
        return result

    return slowed
