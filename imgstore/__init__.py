"""imgstore: store lots of small images with their labels and read them back fast for training.

>>> with imgstore.open_store("cifar.store", "lmdb", "w") as store:
...     store.put_many(images, labels)
"""

from imgstore.errors import (
    BackendNotFoundError,
    CorruptStoreError,
    DatasetError,
    DatasetNotFoundError,
    FormatVersionError,
    ImgStoreError,
    InvalidImageError,
    InvalidLabelError,
    InvalidOptionError,
    MissingDependencyError,
    ReadOnlyError,
    StoreBusyError,
    StoreClosedError,
    StoreExistsError,
    StoreFullError,
    StoreIndexError,
    StoreIOError,
    StoreNotFoundError,
)
from imgstore.opening import open_store
from imgstore.registry import available_backends, get_backend, installed_backends, register_backend
from imgstore.store import Store

__version__ = "0.1.0"

__all__ = [
    "BackendNotFoundError",
    "CorruptStoreError",
    "DatasetError",
    "DatasetNotFoundError",
    "FormatVersionError",
    "ImgStoreError",
    "InvalidImageError",
    "InvalidLabelError",
    "InvalidOptionError",
    "MissingDependencyError",
    "ReadOnlyError",
    "Store",
    "StoreBusyError",
    "StoreClosedError",
    "StoreExistsError",
    "StoreFullError",
    "StoreIOError",
    "StoreIndexError",
    "StoreNotFoundError",
    "available_backends",
    "installed_backends",
    "get_backend",
    "open_store",
    "register_backend",
]
