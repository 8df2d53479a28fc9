"""Backend options: each backend declares its options' types, ranges and whether they are part of the store.

A *fixed* option shapes the store's layout (where a record lives: PNG ``files_per_dir``, LMDB
``block_bytes``): it is chosen when the store is created, kept in the manifest, and reopening with
another value raises :class:`InvalidOptionError` instead of reading one record's bytes as another's.
Any other option is a setting of one handle (how hard to compress, how many processes): its creation
value is kept in the manifest as the store's default, and a reopen may override it for that handle only.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgstore.errors import CorruptStoreError, InvalidOptionError


@dataclass(frozen=True)
class Option:
    """An integer option in ``low .. high`` (``None`` too where ``allow_none``)."""

    default: int | None
    low: int
    high: int
    fixed: bool = False
    allow_none: bool = False
    doc: str = ""

    def accepts(self) -> str:
        none = " or None" if self.allow_none else ""
        return f"an integer in {self.low} .. {self.high}{none}"

    def check(self, name: str, value: Any) -> int | None:
        if value is None and self.allow_none:
            return None
        if isinstance(value, bool):
            raise InvalidOptionError(f"option {name} takes {self.accepts()}, got a bool ({value!r})")
        try:
            number = operator.index(value)
        except TypeError:
            raise InvalidOptionError(f"option {name} takes {self.accepts()}, got {value!r}") from None
        if not self.low <= number <= self.high:
            raise InvalidOptionError(f"option {name} takes {self.accepts()}, got {number}")
        return number


def check_options(backend: str, specs: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The given options, validated against ``specs`` (unknown names and bad values raise)."""
    unknown = sorted(set(given) - set(specs))
    if unknown:
        valid = ", ".join(sorted(specs)) or "none"
        raise InvalidOptionError(f"backend {backend!r} has no option {', '.join(unknown)} (options: {valid})")
    return {name: specs[name].check(name, value) for name, value in given.items()}


def resolve_options(
    backend: str, specs: Mapping[str, Option], stored: Mapping[str, Any], given: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(store options, handle overrides)`` for reopening a store whose manifest keeps ``stored``.

    A fixed option given with a different value than the store's raises; the others override the
    stored value for this handle only. Stored values are checked too: a manifest is input like any other.
    """
    given = check_options(backend, specs, given)
    kept = {name: specs[name].default for name in specs}
    for name, value in stored.items():
        if name in specs:  # an option a later version dropped is ignored
            try:
                kept[name] = specs[name].check(name, value)
            except InvalidOptionError as exc:
                raise CorruptStoreError(f"the store's manifest holds a bad value: {exc}") from None
    for name, value in given.items():
        if specs[name].fixed and value != kept[name]:
            raise InvalidOptionError(
                f"option {name} is part of this store's layout ({kept[name]!r}); it cannot be changed "
                f"to {value!r} when reopening (create a new store with mode='w' for another value)"
            )
    overrides = {name: value for name, value in given.items() if not specs[name].fixed}
    return kept, overrides
