"""imgstore's exception types.

Every error imgstore raises on purpose is an :class:`ImgStoreError`. The specific classes also
subclass the built-in a caller would already catch (``FileNotFoundError``, ``PermissionError``,
``ValueError``, ...), so ``except ValueError`` keeps working for code that knows nothing of imgstore.
"""

from __future__ import annotations


class ImgStoreError(Exception):
    """Base class of every error imgstore raises on purpose."""


class StoreNotFoundError(ImgStoreError, FileNotFoundError):
    """There is no store (no manifest) at the path."""


class StoreExistsError(ImgStoreError, FileExistsError):
    """The path holds something that is not a store, so imgstore will not write over it."""


class ReadOnlyError(ImgStoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class StoreClosedError(ImgStoreError, ValueError):
    """The store was used after ``close()``."""


class InvalidImageError(ImgStoreError, ValueError):
    """An image has the wrong dtype, shape or type for the store."""


class InvalidLabelError(ImgStoreError, ValueError):
    """A label is not a non-negative integer that fits in int64, or labels and images differ in count."""


class InvalidOptionError(ImgStoreError, ValueError):
    """An argument of ``open_store`` (mode, option, backend name) is not valid."""


class BackendNotFoundError(InvalidOptionError):
    """No backend is registered under the name given."""


class MissingDependencyError(ImgStoreError, ImportError):
    """A backend or integration needs a package that is not installed; the message says what to install."""


class FormatVersionError(ImgStoreError, ValueError):
    """The store was written in a format version this imgstore cannot read."""


class CorruptStoreError(ImgStoreError):
    """The store's files are damaged or inconsistent."""


class StoreIOError(ImgStoreError, OSError):
    """A write failed in the operating system; the store still holds its last committed state."""


class StoreFullError(StoreIOError):
    """The disk (or a file size limit) is full; the store still holds its last committed state."""


class StoreBusyError(ImgStoreError, BlockingIOError):
    """Another process holds the store in a way that excludes this operation."""


class StoreIndexError(ImgStoreError, IndexError):
    """An index is out of range for the store."""


class DatasetError(ImgStoreError, ValueError):
    """A dataset's files are missing, damaged or not of the expected format."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are not where they were looked for."""
