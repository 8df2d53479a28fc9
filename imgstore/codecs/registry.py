"""Codecs by name: the built-in ones, and any a program registers (:func:`register_codec`)."""

from __future__ import annotations

import threading
from typing import Any

from imgstore.codecs.base import Codec
from imgstore.codecs.encoders import JpegCodec, KeepCodec, PngCodec, WebpCodec
from imgstore.codecs.raw import RawCodec
from imgstore.errors import InvalidOptionError

_codecs: dict[str, type[Codec]] = {}
_guard = threading.Lock()


def register_codec(cls: type[Codec], *, clobber: bool = False) -> None:
    """Register a :class:`Codec` subclass under its ``name``.

    A name that is taken by another class raises :class:`InvalidOptionError` unless ``clobber=True``
    (a store records only the codec's name, so two classes under one name would read each other's stores).
    """
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise InvalidOptionError(f"register_codec takes a Codec subclass, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"codec class {cls.__qualname__} has no name (set its class attribute name)")
    with _guard:
        taken = _codecs.get(name)
        if taken is not None and taken is not cls and not clobber:
            raise InvalidOptionError(
                f"a codec named {name!r} is registered already ({taken.__module__}.{taken.__qualname__}); "
                "pass clobber=True to replace it"
            )
        _codecs[name] = cls


for _builtin in (RawCodec, PngCodec, JpegCodec, WebpCodec, KeepCodec):
    register_codec(_builtin)


def available_codecs() -> list[str]:
    """Names of every registered codec, built-in first."""
    return list(_codecs)


def get_codec(name: str, **params: Any) -> Codec:
    """A codec ``name`` with ``params`` (checked: a bad or unknown one raises :class:`InvalidOptionError`)."""
    cls = _codecs.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidOptionError(f"no codec named {name!r}; codecs: {', '.join(available_codecs())}")
    return cls(**params)
