"""Fetch the official CIFAR-10 archive (python version), check its md5 and extract it safely."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from imgstore.datasets.cifar10 import PY_DIR, SPLITS, load_cifar10
from imgstore.errors import DatasetError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def download_cifar10(
    dest: str | Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 60.0
) -> Path:
    """Download and extract CIFAR-10 into ``dest``; returns the extracted ``cifar-10-batches-py`` folder.

    Nothing is downloaded when a complete, readable copy is already there. The archive goes to a
    temporary folder inside ``dest``, is checked against ``md5`` before extraction, and is extracted
    with tarfile's ``"data"`` filter, which refuses members that would land outside (absolute paths,
    ``..``, links pointing out). On any failure the temporary folder is removed.
    """
    dest = Path(dest)
    target = dest / PY_DIR
    if _is_complete(target):
        return target
    if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4: no safe extraction
        raise DatasetError("extracting CIFAR-10 safely needs tarfile's data filter: use Python >= 3.10.12 or >= 3.11.4")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        digest = hashlib.md5(usedforsecurity=False)  # md5 is what the publisher gives; it detects damage only
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:  # URLError, HTTPError, timeouts and a full disk are all OSError
            raise DatasetError(f"downloading {url} failed: {exc}") from exc
        if digest.hexdigest() != md5.lower():
            raise DatasetError(f"{url}: md5 {digest.hexdigest()} does not match the expected {md5}")
        extracted = Path(tmp) / "extracted"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(extracted, filter="data")
        except (tarfile.TarError, OSError) as exc:  # FilterError (e.g. "../evil") is a TarError
            raise DatasetError(f"{url}: refusing the archive: {exc}") from exc
        if not (extracted / PY_DIR).is_dir():
            raise DatasetError(f"{url}: the archive holds no {PY_DIR}/ folder")
        if target.exists():  # an incomplete or damaged earlier copy
            shutil.rmtree(target)
        (extracted / PY_DIR).rename(target)
    return target


def _is_complete(folder: Path) -> bool:
    """All six batch files are there and the smallest split loads (a cheap check of the format)."""
    if not all((folder / name).is_file() for names in SPLITS.values() for name in names):
        return False
    try:
        load_cifar10(folder, "test")
    except DatasetError:
        return False
    return True
