"""The regression gate's timer: CPU seconds of this process and of its reaped children.

``pytest --benchmark-timer=benchmarks.timer.cpu_seconds`` times every round in CPU seconds (user +
system) of the benchmark process (all its threads: ``get_many``'s decode pool) plus every child
process it has waited for (a ``DataLoader``'s workers, joined when an epoch ends, before the round's
timer stops). Why: on a shared machine a neighbour's load stretches wall time 1.5-4x between runs of
the same code at 10 000 images, while the CPU time of the same rows moves 1.1-1.3x (README,
"Regression gate"). What CPU time cannot see (lost parallelism, waits on a lock, the disk or a
sleep) is judged on each round's wall time, which the suite keeps beside it (``wall_rounds``,
:class:`WallRounds`).

``resource.getrusage`` gives microseconds (``os.times()`` gives clock ticks, 10 ms here, too coarse
for a round of a few ms); ``time.process_time`` has no children. The timer is only ever used through
``benchmark.pedantic`` (no calibration loop), so its resolution matters only against a round's length.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CPU_TIMER", "WallRounds", "cpu_seconds", "judged_clock", "judged_on_wall", "uses_cpu_timer"]

# What --benchmark-timer takes and pytest-benchmark writes as options.timer in a saved run.
CPU_TIMER = "benchmarks.timer.cpu_seconds"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its children that were reaped."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def uses_cpu_timer(config: Any) -> bool:
    """Whether this pytest session times rounds with :func:`cpu_seconds` (``--benchmark-timer``)."""
    try:
        return str(config.getoption("benchmark_timer")) == CPU_TIMER
    except ValueError:  # pytest-benchmark not loaded
        return False


def judged_on_wall(operation_kind: str, variant_kind: str, cache: str) -> bool:
    """Whether the gate judges a row on wall time even when the session's timer is CPU time.

    A row whose cost is waiting: a cold row reads its files from the disk (the wait is the point of
    the row) and a durable write (``sync=True``: every write row but ``-nosync``) waits for fsync.
    CPU time sees neither wait, and there it was not steadier anyway (``store_many`` of 10 000
    images, fsynced: 1.29x wall against 1.31x CPU over four runs of the same code).
    """
    return cache == "cold" or (operation_kind == "write" and variant_kind != "nosync")


def judged_clock(config: Any, on_wall: bool) -> Callable[[], float]:
    """The clock a row is judged on: the CPU timer when the session uses it and the row is not wall-judged."""
    return cpu_seconds if uses_cpu_timer(config) and not on_wall else time.perf_counter


class WallRounds:
    """The wall time of each call of a wrapped body: the suite keeps it beside the rounds of the session's timer.

    ``benchmark.pedantic(wall.wrap(body), ...)`` then ``extra_info["wall_rounds"] = wall.rounds``: the
    wrapper sits inside pytest-benchmark's timed call, so each wall round spans the same work as the
    timer's round (plus two ``perf_counter`` calls).
    """

    def __init__(self) -> None:
        self.rounds: list[float] = []

    def wrap(self, body: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return body(*args, **kwargs)
            finally:
                self.rounds.append(time.perf_counter() - start)

        return timed
