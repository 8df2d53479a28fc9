"""Fixtures shared by test modules: a real S3 server (moto's, its own process) and a fresh bucket a test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from imgstore.testing.s3server import MotoServer, s3_available


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    if s3_available() is not None:
        pytest.skip(str(s3_available()))
    with MotoServer() as running:
        yield running


@pytest.fixture
def s3_url(s3_server: MotoServer, request: pytest.FixtureRequest) -> str:
    """``s3://<a bucket of this test's own>/cifar``."""
    name = f"t{abs(hash(request.node.nodeid)) % 10**12}-{os.getpid()}"
    return s3_server.make_bucket(name) + "/cifar"
