"""The result record of one benchmark, defined once: the suite writes it, every reader parses it.

The benchmark suite (``benchmarks/``) stores a :class:`ResultRecord` in each benchmark's
``extra_info`` (:meth:`ResultRecord.to_extra_info`), so it lands in ``--benchmark-json`` and in
saved runs; ``imgstore compare`` and ``imgstore plot`` read it back with
:meth:`ResultRecord.from_extra_info`, which checks every field (:class:`MalformedRunError`, one
line, on a wrong type or an impossible value).  The fields:

==================== ===================================================================================
``kind``             ``"imgstore"``, ``"tutorial"`` or ``"limit"``
``backend``          ``"png"``, ``"lmdb"``, ``"hdf5"``, ..., ``"raw"``, ``"raw-nofsync"``
``variant``          ``""`` for the defaults, else ``"nosync"``, ``"noverify"`` or a preset's name
``operation``        one of the suite's operations (``store_many``, ``read_many``, ...)
``images``           the cutoff N (a whole number, 1 or more)
``dataset``          ``"synthetic"``, ``"cifar10"``, ``"fashion-mnist"``
``disk_bytes``       bytes allocated on disk (as ``du``) by the target written or the store read
``file_bytes``       bytes in those files
``images_per_second`` N / median
``ratio_to_limit``   median / the ``limit`` row's median (same dataset, operation, N, run), or None
``ratio_to_tutorial`` median / the ``tutorial-<backend>`` row's median, or None
``speedup_over_single`` ``read_random_many`` rows: the same subject's ``read_random`` median / this one
``schema_version``   :data:`SCHEMA_VERSION` when written; a record without it is version 1
==================== ===================================================================================

Versions: 1 is every run saved before the record had a version (the same fields, no
``schema_version`` key); 2 adds the key.  Versions only ever add fields: a reader takes the fields
it knows from a record of any version, ignores keys it does not know, and a record missing a field
(an older version, a run written by hand) reads it as None.  That is also why the previous
``imgstore compare`` reads what this suite writes: it checks the types of the fields it knows and
ignores the rest.

Every field is optional on reading (None when absent or null): runs written by hand or by other
suites carry a part of it.  Writing, the constructor takes every field by name, so the suite cannot
leave one out by mistake.  This module depends on nothing of imgstore but :mod:`imgstore.errors`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgstore.errors import ImgStoreError

__all__ = [
    "KINDS",
    "MAX_COUNT",
    "MalformedRunError",
    "REFERENCE_KINDS",
    "ResultRecord",
    "SCHEMA_VERSION",
    "UNVERSIONED",
]

SCHEMA_VERSION = 2
UNVERSIONED = 1  # the version of a record without "schema_version": runs saved before it existed
# The kinds of row the suite writes; tutorial and limit rows run code a change to imgstore cannot
# touch: if they moved, the machine did.
KINDS = ("imgstore", "tutorial", "limit")
REFERENCE_KINDS = frozenset({"tutorial", "limit"})
# Images, bytes and rounds: exact as floats (below 2**53), so plotting them cannot overflow.
MAX_COUNT = 10**15

# Field name -> what it holds, by the check it gets (None is always allowed).
_TEXT_FIELDS = ("kind", "backend", "operation", "dataset", "variant")
_COUNT_FIELDS = {"images": 1, "disk_bytes": 0, "file_bytes": 0}  # name -> smallest value
_RATE_FIELDS = ("images_per_second", "ratio_to_limit", "ratio_to_tutorial", "speedup_over_single")


class MalformedRunError(ImgStoreError):
    """A saved run, or a record in it, is not what the schema says (one line: where, and what is wrong)."""


@dataclass(frozen=True)
class ResultRecord:
    """What one benchmark of the suite measured beside its timings: its ``extra_info``."""

    kind: str | None
    backend: str | None
    variant: str | None
    operation: str | None
    images: int | None
    dataset: str | None
    disk_bytes: int | None
    file_bytes: int | None
    images_per_second: float | None
    ratio_to_limit: float | None
    ratio_to_tutorial: float | None
    speedup_over_single: float | None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise MalformedRunError(f"extra_info.{name} is {describe(value)}, not a string")
        for name, smallest in _COUNT_FIELDS.items():
            value = getattr(self, name)
            if value is not None and not is_count(value, smallest):
                raise MalformedRunError(
                    f"extra_info.{name} is {describe(value)}, not a whole number from {smallest} to {MAX_COUNT:.0e}"
                )
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_rate(value):
                raise MalformedRunError(f"extra_info.{name} is {describe(value)}, not a finite number, 0 or more")
        if not is_count(self.schema_version, UNVERSIONED):
            raise MalformedRunError(
                f"extra_info.schema_version is {describe(self.schema_version)}, not a version number (1 or more)"
            )

    @classmethod
    def from_extra_info(cls, info: Mapping[str, Any]) -> ResultRecord:
        """The record in a benchmark's ``extra_info``: known fields checked, absent ones None, others ignored."""
        if not isinstance(info, Mapping):
            raise MalformedRunError(f"extra_info is {describe(info)}, not an object")
        version = info.get("schema_version")
        values = {name: info.get(name) for name in FIELDS}
        return cls(**values, schema_version=UNVERSIONED if version is None else version)

    def to_extra_info(self) -> dict[str, Any]:
        """The JSON object the suite stores: ``schema_version`` and every field (null when None)."""
        return {"schema_version": self.schema_version, **{name: getattr(self, name) for name in FIELDS}}


# The record's fields, in the order they are written (schema_version aside).
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultRecord) if f.name != "schema_version")


def is_count(value: object, smallest: int) -> bool:
    """A whole number (not a bool) from ``smallest`` to :data:`MAX_COUNT`."""
    return isinstance(value, int) and not isinstance(value, bool) and smallest <= value <= MAX_COUNT


def _is_rate(value: object) -> bool:
    # Compared as they are: float(10**400) would overflow, and nan fails every comparison.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= sys.float_info.max


def describe(value: object) -> str:
    """A short description of a JSON value for an error message: never huge, never two lines."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # str() of a huge int is slow, long, or refused (over 4300 digits)
        return str(value) if abs(value) < 10**30 else "an integer of more than 30 digits"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return repr(value) if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return f"the string {short(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def short(text: str, limit: int = 60) -> str:
    """repr() of a string from the file, cut to ``limit`` characters: one short line whatever it holds."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown[:-1]}...{shown[-1]}"
