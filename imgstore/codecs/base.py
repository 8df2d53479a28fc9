"""What every codec shares: :class:`ImageInfo`, the :class:`Codec` base class and its parameter checks."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from imgstore.errors import InvalidImageError, InvalidOptionError


@dataclass(frozen=True)
class ImageInfo:
    """What an encoded image's header says, read without decoding its pixels (:func:`imgstore.codecs.probe`)."""

    format: str  # Pillow's format name ("JPEG", "PNG", "WEBP", "GIF", ...), or "RAW" for the raw codec's blobs
    height: int
    width: int
    channels: int  # what the image decodes to with mode=None
    mode: str  # Pillow's mode of the file ("RGB", "L", "CMYK", "P", "I;16", ...); raw: L, LA, RGB, RGBA or RAW<ndim>


@dataclass(frozen=True)
class Param:
    """One codec parameter: an integer in ``low .. high``, or a bool where ``low`` and ``high`` are None."""

    default: int | bool
    low: int | None = None
    high: int | None = None

    def accepts(self) -> str:
        if self.low is None:
            return f"a bool (default {self.default})"
        return f"an integer in {self.low} .. {self.high} (default {self.default})"

    def check(self, codec: str, name: str, value: Any) -> int | bool:
        if self.low is None or self.high is None:
            if not isinstance(value, (bool, np.bool_)):
                raise InvalidOptionError(f"codec {codec!r}: {name} takes {self.accepts()}, got {value!r}")
            return bool(value)
        if isinstance(value, (bool, np.bool_)):  # True would pass as 1: almost certainly a mistake
            raise InvalidOptionError(f"codec {codec!r}: {name} takes {self.accepts()}, got a bool ({value!r})")
        try:
            number = operator.index(value)
        except TypeError:
            raise InvalidOptionError(f"codec {codec!r}: {name} takes {self.accepts()}, got {value!r}") from None
        if not self.low <= number <= self.high:
            raise InvalidOptionError(f"codec {codec!r}: {name} takes {self.accepts()}, got {number}")
        return number


class Codec:
    """How one store encodes the images it is given as arrays; one subclass per codec, registered by name.

    A subclass sets ``name``, ``accepts`` (the formats ``put_encoded_many`` may store as they are:
    a set of Pillow format names, None for any format Pillow opens, an empty set for none) and
    ``param_specs``, and implements :meth:`encode` and :meth:`extension`. Decoding does not go
    through the codec: :func:`imgstore.codecs.decode` reads any format from its header.
    """

    name: ClassVar[str] = ""
    accepts: ClassVar[frozenset[str] | None] = frozenset()
    param_specs: ClassVar[Mapping[str, Param]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.param_specs))
        if unknown:
            takes = ", ".join(f"{key} ({spec.accepts()})" for key, spec in self.param_specs.items()) or "none"
            raise InvalidOptionError(
                f"codec {self.name!r} has no parameter {', '.join(unknown)}; the parameters it takes: {takes}"
            )
        resolved = {key: spec.default for key, spec in self.param_specs.items()}
        resolved.update({key: self.param_specs[key].check(self.name, key, value) for key, value in params.items()})
        self.params: dict[str, Any] = resolved

    def encode(self, image: np.ndarray) -> bytes:
        """The bytes of one image (a uint8 array) in this codec's format."""
        raise NotImplementedError

    def extension(self, info: ImageInfo) -> str:
        """The file suffix of one record (with its dot), for exports and the store's file names."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"get_codec({self.name!r}{', ' if params else ''}{params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.params == self.params

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params.items()))))


def image_array(image: Any, codec: str, channels: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """``image`` as a C-contiguous uint8 [H, W, C] array and its C, if the codec takes that many channels.

    A [H, W] array is one channel (it decodes back as [H, W, 1]).
    """
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"codec {codec!r} encodes numpy arrays, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"codec {codec!r} encodes uint8 arrays, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in channels or image.shape[0] < 1 or image.shape[1] < 1:
        takes = ", ".join(map(str, channels))
        raise InvalidImageError(
            f"codec {codec!r} encodes [H, W] or [H, W, C] arrays with C in {takes} and H, W >= 1; got {image.shape}"
        )
    return np.ascontiguousarray(image), int(image.shape[2])
