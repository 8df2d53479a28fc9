"""``imgstore convert`` on a FIFO named like an image: a bad file, never a conversion blocked forever."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgstore.convert import BadFileError, convert
from imgstore.sharded.building import convert_sharded
from imgstore.sources import ConvertError


def _folder_with_fifo(root: Path) -> Path:
    for k in range(4):
        path = root / "c" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(path)
    fifo = root / "c" / "2b.png"
    os.mkfifo(fifo)
    return fifo


def _bounded(fifo: Path, run: Any) -> BaseException | None:
    """Run ``run()`` in a thread; a hang on the FIFO is a failure (the FIFO is then opened for writing, to free it)."""
    caught: list[BaseException | None] = []

    def target() -> None:
        try:
            run()
            caught.append(None)
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader blocked in open() goes on (EOF)
        thread.join(20)
        pytest.fail("the conversion blocked on a FIFO named like an image")
    return caught[0]


def test_a_fifo_named_like_an_image_is_a_bad_file(tmp_path: Path) -> None:
    fifo = _folder_with_fifo(tmp_path / "src")
    error = _bounded(fifo, lambda: convert(tmp_path / "src", tmp_path / "one", backend="lmdb"))
    assert isinstance(error, BadFileError) and error.path == "c/2b.png" and "not a regular file" in error.reason
    skipped = convert(tmp_path / "src", tmp_path / "skip", backend="lmdb", on_error="skip")
    assert skipped.count == 4 and [s.path for s in skipped.skipped] == ["c/2b.png"]
    error = _bounded(fifo, lambda: convert_sharded(tmp_path / "src", tmp_path / "ds", shards=2, backend="lmdb"))
    assert isinstance(error, ConvertError) and "2b.png" in str(error) and "not a regular file" in str(error)
