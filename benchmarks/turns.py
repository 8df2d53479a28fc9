"""Two benchmark sessions taking turns, one benchmark at a time: base's first, head's first, base's second...

``.ci/bench-gate`` runs the base and the head side as two pytest processes at once, each loaded with
``-p benchmarks.turns`` and ``IMGSTORE_BENCH_TURNS=DIR:SIDE``. Before each test a process waits for its
turn (a byte on its FIFO, ``DIR/SIDE``); after it, it hands the turn to the other (``DIR/OTHER``). So
only one of them runs at any time, and the two measurements of a benchmark are seconds apart rather
than a whole run apart: a neighbour's load that comes and goes over minutes, which moved whole runs of
the same code by 5-10% here, touches both sides alike (README, "Regression gate").

Neither starts its first test before the other has collected its tests (``R``), so one side's imports
do not overlap the other's first benchmarks. Each side lists its tests (``DIR/SIDE.ids``) before ``R``: a
test the other side does not have (a benchmark head added or removed) runs in its side's turn without
handing it over, so every benchmark both have still runs on the two sides one right after the other
(taken by index, a backend added in head would shift every pair after it).

A process that ends (or the driver, for one that died) writes ``D`` to the other's FIFO: the other
runs its remaining tests without waiting. A turn that does not come within ``TURN_TIMEOUT`` seconds
(the other side hung) is taken anyway. Without the variable the plugin does nothing.
"""

from __future__ import annotations

import os
import select
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["SIDES", "TURNS_VARIABLE", "TURN_TIMEOUT"]

TURNS_VARIABLE = "IMGSTORE_BENCH_TURNS"
SIDES = ("base", "head")
TURN_TIMEOUT = 1800.0  # s: longer than any one benchmark of the gated matrix takes
_TURN, _DONE, _READY = b"T", b"D", b"R"


class _Turns:
    def __init__(self, folder: str, side: str) -> None:
        if side not in SIDES:
            raise pytest.UsageError(f"{TURNS_VARIABLE}: the side is one of {', '.join(SIDES)}, not {side!r}")
        other = SIDES[1 - SIDES.index(side)]
        # O_RDWR: opening a FIFO so never blocks, whether or not the other side has opened it yet.
        self._mine = os.open(os.path.join(folder, side), os.O_RDWR)
        self._theirs = os.open(os.path.join(folder, other), os.O_RDWR)
        self._folder, self._side, self._other = folder, side, other
        self._other_ready = False  # the other side has collected its tests: its start-up is over
        self._other_ids: frozenset[str] | None = None  # its tests (None: not known, all taken as shared)
        self._turn = False
        self._alone = False  # the other side has ended: no more waiting

    def ready(self, ids: list[str]) -> None:
        """Tell the other side this one has collected (no test of either starts while one is importing)."""
        listed = os.path.join(self._folder, f"{self._side}.ids")
        with open(listed + ".part", "w", encoding="utf-8") as file:
            file.write("\n".join(ids))
        os.replace(listed + ".part", listed)  # whole before the other side reads it, on R
        os.write(self._theirs, _READY)

    def shared(self, nodeid: str) -> bool:
        """Whether the other side has this test too (then this side hands the turn over after it)."""
        return self._other_ids is None or nodeid in self._other_ids

    def wait(self) -> None:
        while not self._alone and not (self._turn and self._other_ready):
            readable, _, _ = select.select([self._mine], [], [], TURN_TIMEOUT)
            token = os.read(self._mine, 1) if readable else _DONE  # timed out: the other side hung
            if token == _READY:
                self._other_ready = True
                self._other_ids = _listed(os.path.join(self._folder, f"{self._other}.ids"))
            self._turn |= token == _TURN
            self._alone |= token == _DONE

    def hand_over(self, token: bytes = _TURN) -> None:
        self._turn = False
        os.write(self._theirs, token)

    def close(self) -> None:
        self.hand_over(_DONE)
        os.close(self._mine)
        os.close(self._theirs)


def _listed(path: str) -> frozenset[str] | None:
    try:
        with open(path, encoding="utf-8") as file:
            return frozenset(file.read().split("\n"))
    except FileNotFoundError:  # an older turns.py on that side (a base commit's own): every test is shared
        return None


_STATE = pytest.StashKey[_Turns]()


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(TURNS_VARIABLE)
    if value:
        folder, _, side = value.rpartition(":")
        config.stash[_STATE] = _Turns(folder, side)


def pytest_collection_finish(session: pytest.Session) -> None:
    turns = session.config.stash.get(_STATE, None)
    if turns is not None:
        turns.ready([item.nodeid for item in session.items])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Generator[None, None, None]:
    turns = item.config.stash.get(_STATE, None)
    if turns is None:
        yield
        return
    turns.wait()
    try:
        yield
    finally:
        if turns.shared(item.nodeid):
            turns.hand_over()


def pytest_unconfigure(config: pytest.Config) -> None:
    turns = config.stash.get(_STATE, None)
    if turns is not None:
        turns.close()
