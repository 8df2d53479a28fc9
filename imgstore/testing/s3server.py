"""A real S3-compatible server on localhost for tests and benchmarks: moto's server mode, in its own process.

Clients reach it over HTTP only (s3fs with ``endpoint_url``), so network faults are real: killing
the process drops connections mid-transfer. Needs ``moto`` with its server's ``flask`` and
``flask-cors`` (the ``[test]`` extra), and ``s3fs`` for the clients.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from imgstore.errors import MissingDependencyError

HINT = "pip install 'imgstore-ml[test]' (moto, flask, flask-cors, s3fs)"


def s3_available() -> str | None:
    """Why an S3 server test cannot run here (a missing package and the install hint), or None."""
    for module in ("moto.server", "flask_cors", "s3fs"):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc}): {HINT}"
    return None


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1: :meth:`start`, :meth:`kill` (SIGKILL), :meth:`stop`."""

    def __init__(self, port: int | None = None) -> None:
        if s3_available() is not None:
            raise MissingDependencyError(str(s3_available()))
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: connections drop mid-transfer, nothing is flushed (moto keeps its objects in memory)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def make_bucket(self, name: str) -> str:
        """Create a bucket (an anonymous HTTP PUT, which moto accepts); returns ``s3://name``."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"s3://{name}"

    def storage_options(self, *, retries: int = 5, attempts: int | None = None) -> dict[str, Any]:
        """s3fs options for this server; ``attempts`` caps botocore's own tries per request (to fail fast)."""
        options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "retries": retries,
            "skip_instance_cache": True,
        }
        if attempts is not None:
            options["config_kwargs"] = {"retries": {"max_attempts": attempts, "mode": "standard"}}
        return options

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
