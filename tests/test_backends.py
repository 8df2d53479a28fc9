"""Every backend passes the one conformance suite: a new backend adds one class here."""

from __future__ import annotations

import imgstore
from imgstore.testing import StoreConformance


class TestPng(StoreConformance):
    backend = "png"


class TestLmdb(StoreConformance):
    backend = "lmdb"


class TestHdf5(StoreConformance):
    backend = "hdf5"


def test_every_registered_backend_has_a_conformance_class() -> None:
    tested = {cls.backend for cls in StoreConformance.__subclasses__()}
    assert set(imgstore.available_backends()) <= tested
