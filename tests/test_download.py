"""download_cifar10 against a real HTTP server on 127.0.0.1 serving a small archive in the official layout."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgstore.datasets import download_cifar10, load_cifar10
from imgstore.datasets.cifar10 import PY_DIR, SPLITS
from imgstore.errors import DatasetError


class Server:
    """Serves the files of ``root``; ``requests`` counts the GETs."""

    def __init__(self, root: Path, base: str) -> None:
        self.root, self.base, self.requests = root, base, 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "www"
    root.mkdir()
    state = Server(root, "")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            state.requests += 1
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def write_tiny_cifar(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six python-version batch files with 3 images each, and the HWC images they hold."""
    folder.mkdir(parents=True)
    expected = {}
    for seed, name in enumerate(name for names in SPLITS.values() for name in names):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 3)
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(3, 3072)  # planar R, G, B
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": rows, b"filenames": [b"a"] * 3}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected[name] = (images, labels)
    return expected


def make_archive(path: Path, source: Path, extra: dict[str, tarfile.TarInfo | bytes] | None = None) -> str:
    """A tar.gz holding ``source`` as cifar-10-batches-py/ plus ``extra`` members; returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=PY_DIR)
        for name, member in (extra or {}).items():
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5_extracts_and_loads(tmp_path: Path, server: Server) -> None:
    expected = write_tiny_cifar(tmp_path / "src")
    md5 = make_archive(server.root / "cifar.tar.gz", tmp_path / "src")
    url = f"{server.base}/cifar.tar.gz"
    folder = download_cifar10(tmp_path / "data", url=url, md5=md5)
    assert folder == tmp_path / "data" / PY_DIR and server.requests == 1
    images, labels = load_cifar10(tmp_path / "data", "test")
    np.testing.assert_array_equal(images, expected["test_batch"][0])
    np.testing.assert_array_equal(labels, expected["test_batch"][1])
    train, _ = load_cifar10(folder, "train")
    np.testing.assert_array_equal(train[:3], expected["data_batch_1"][0])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [PY_DIR]  # no temporary left
    # A second call finds the extracted copy and downloads nothing.
    assert download_cifar10(tmp_path / "data", url=url, md5=md5) == folder
    assert server.requests == 1
    # An incomplete copy is fetched again.
    (folder / "data_batch_4").unlink()
    assert download_cifar10(tmp_path / "data", url=url, md5=md5) == folder
    assert server.requests == 2 and (folder / "data_batch_4").is_file()


def test_download_refuses_a_wrong_md5_and_leaves_nothing(tmp_path: Path, server: Server) -> None:
    write_tiny_cifar(tmp_path / "src")
    make_archive(server.root / "cifar.tar.gz", tmp_path / "src")
    with pytest.raises(DatasetError, match="md5"):
        download_cifar10(tmp_path / "data", url=f"{server.base}/cifar.tar.gz", md5="0" * 32)
    assert list((tmp_path / "data").iterdir()) == []


def _symlink_out() -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{PY_DIR}/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


@pytest.mark.parametrize(
    "name, member",
    [
        ("../evil", b"owned"),  # out of the extraction folder
        ("../../../evil", b"owned"),  # would land beside dest, in tmp_path
        (f"{PY_DIR}/link", _symlink_out()),  # a link pointing outside
    ],
    ids=["parent", "grandparents", "symlink"],
)
def test_download_refuses_unsafe_members(
    tmp_path: Path, server: Server, name: str, member: tarfile.TarInfo | bytes
) -> None:
    write_tiny_cifar(tmp_path / "src")
    md5 = make_archive(server.root / "evil.tar.gz", tmp_path / "src", {name: member})
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="refusing"):
        download_cifar10(dest, url=f"{server.base}/evil.tar.gz", md5=md5)
    assert list(dest.iterdir()) == []  # nothing extracted is kept, no temporary left
    assert [p for p in tmp_path.rglob("*") if p.name in ("evil", "link")] == []


def test_download_errors_are_dataset_errors(tmp_path: Path, server: Server) -> None:
    with pytest.raises(DatasetError, match="downloading"):  # 404
        download_cifar10(tmp_path / "a", url=f"{server.base}/missing.tar.gz", timeout=5)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DatasetError, match="downloading"):
        download_cifar10(tmp_path / "b", url=f"http://127.0.0.1:{port}/cifar.tar.gz", timeout=5)
    (server.root / "junk.tar.gz").write_bytes(b"not a tar.gz")
    md5 = hashlib.md5(b"not a tar.gz").hexdigest()
    with pytest.raises(DatasetError, match="refusing"):
        download_cifar10(tmp_path / "c", url=f"{server.base}/junk.tar.gz", md5=md5)
    (tmp_path / "d").mkdir()
    with tarfile.open(server.root / "empty.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    md5 = hashlib.md5((server.root / "empty.tar.gz").read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match="no cifar-10-batches-py"):
        download_cifar10(tmp_path / "d", url=f"{server.base}/empty.tar.gz", md5=md5)
    assert list((tmp_path / "d").iterdir()) == []
