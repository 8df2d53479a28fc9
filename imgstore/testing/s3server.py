"""A real S3-compatible server on localhost for tests and benchmarks: moto's server mode, in its own process.

Clients reach it over HTTP only (s3fs with ``endpoint_url``), so network faults are real: killing
the process drops connections mid-transfer. Needs ``moto`` with its server's ``flask`` and
``flask-cors`` (the ``[test]`` extra), and ``s3fs`` for the clients.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
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

    def storage_options(self, *, attempts: int | None = None, endpoint: str | None = None) -> dict[str, Any]:
        """s3fs options for this server (or ``endpoint``, a relay to it); ``attempts`` caps botocore's own
        tries per request (its retry of a refused connection; to fail fast). s3fs's own retries (5, a
        class attribute) are left as they are."""
        options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": "us-east-1"},
        }
        if attempts is not None:
            options["config_kwargs"] = {"retries": {"max_attempts": attempts, "mode": "standard"}}
        return options

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FlakyProxy:
    """A TCP relay in front of a server that resets the first ``cuts`` connections once they have relayed
    ``cut_after`` bytes from the server: a real mid-transfer network fault, which clients may retry.
    ``relayed``: bytes relayed from the server so far, all connections (to act at a point of a transfer)."""

    def __init__(self, target_port: int, *, cut_after: int = 1 << 20, cuts: int = 1) -> None:
        self.target_port, self.cut_after, self.cuts_left, self.cut = target_port, cut_after, cuts, 0
        self.relayed = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        relayed = 0
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                relayed += len(data)
                if from_server:
                    with self._lock:
                        self.relayed += len(data)
                if from_server and relayed >= self.cut_after and self._take_cut():
                    # SO_LINGER 0: close sends a RST, as a dropped connection does
                    sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)  # first: it wakes the other direction's thread blocked in recv
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cut += 1
            return True

    def close(self) -> None:
        """Stop accepting: new connections are refused (shutdown wakes the thread blocked in accept)."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
