"""Fetch the official CIFAR-10 archive, check it and extract it safely."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from imgstore.datasets.cifar10 import PY_DIR, load_cifar10
from imgstore.errors import DatasetError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def download_cifar10(dest: str | Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 60.0) -> Path:
    """Download and extract CIFAR-10 (python version) into ``dest``; returns the extracted folder.

    Nothing is downloaded when a readable copy is already there. The archive is checked against
    ``md5`` before extraction, and extracted with tarfile's ``"data"`` filter, which refuses members
    that would land outside ``dest`` (absolute paths, ``..``, links pointing out).
    """
    dest = Path(dest)
    target = dest / PY_DIR
    if target.is_dir():
        try:
            load_cifar10(target, "test")
            return target
        except DatasetError:
            pass  # incomplete or damaged: fetch again
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive = Path(tmp) / "cifar-10.tar.gz"
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:
            raise DatasetError(f"downloading {url} failed: {exc}") from exc
        if digest.hexdigest() != md5:
            raise DatasetError(f"{url}: md5 {digest.hexdigest()} does not match the expected {md5}")
        extracted = Path(tmp) / "extracted"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(extracted, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"{url}: refusing the archive: {exc}") from exc
        if not (extracted / PY_DIR).is_dir():
            raise DatasetError(f"{url}: the archive holds no {PY_DIR}/ folder")
        if target.exists():
            shutil.rmtree(target)
        (extracted / PY_DIR).rename(target)
    return target
