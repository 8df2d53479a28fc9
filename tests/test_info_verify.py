"""``imgstore info`` and ``imgstore verify``: what they print, and their exit status on damage."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.cli import main
from imgstore.convert import convert


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


@pytest.fixture
def folder_store(tmp_path: Path) -> Path:
    """A keep store from a folder: classes 'ant' (3 images) and 'bee' (2), sizes 10x20 .. 50x60."""
    sizes = {"ant/1.jpg": (10, 20), "ant/2.jpg": (30, 40), "ant/sub/3.jpg": (50, 60), "bee/4.jpg": (20, 30)}
    sizes["bee/5.jpg"] = (40, 50)
    for k, (name, size) in enumerate(sizes.items()):
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(k, size))
    convert(tmp_path / "src", tmp_path / "store", backend="lmdb")
    return tmp_path / "store"


def flip_record_byte(store_path: Path, record: bytes) -> None:
    """Damage one stored record: flip a byte in the middle of its bytes inside the LMDB data file."""
    (data,) = store_path.glob("lmdb-*/data.mdb")
    content = bytearray(data.read_bytes())
    middle = len(record) // 2
    at = content.find(record[middle - 32 : middle + 32])
    assert at >= 0 and content.find(record[middle - 32 : middle + 32], at + 1) < 0
    content[at + 32] ^= 0xFF
    data.write_bytes(bytes(content))


def test_info_text(folder_store: Path, capsys: Any) -> None:
    assert main(["info", str(folder_store)]) == 0
    out = capsys.readouterr().out
    for line in ("backend     lmdb", "codec       keep", "image mode  RGB", "images      5", "shape       varied"):
        assert line in out, out
    assert "height      10 / 30 / 50 (min / median / max)" in out
    assert "width       20 / 40 / 60 (min / median / max)" in out
    assert "channels    3: 5 images" in out and "kB per image" in out
    assert "classes     2" in out
    assert [line.split() for line in out.splitlines()[-2:]] == [["ant", "3"], ["bee", "2"]]


def test_info_json(folder_store: Path, capsys: Any) -> None:
    assert main(["info", str(folder_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "lmdb" and info["codec"] == "keep" and info["count"] == 5 and info["varied"]
    assert info["height"] == {"min": 10, "median": 30.0, "max": 50}
    assert info["width"] == {"min": 20, "median": 40.0, "max": 60}
    assert info["channels"] == {"3": 5} and info["classes"] == ["ant", "bee"]
    assert info["images_per_class"] == {"ant": 3, "bee": 2}
    with imgstore.open_store(folder_store) as store:
        assert info["disk_bytes"] == store.disk_usage() and info["bytes_per_image"] == store.disk_usage() / 5


def test_info_of_a_raw_store_without_class_names(tmp_path: Path, capsys: Any) -> None:
    convert("synthetic:40", tmp_path / "raw", backend="hdf5")
    assert main(["info", str(tmp_path / "raw"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codec"] == "raw" and info["shape"] == [32, 32, 3] and not info["varied"]
    assert info["classes"] is None and info["images_per_class"] == {str(k): 4 for k in range(10)}
    assert main(["info", str(tmp_path / "raw")]) == 0
    assert "classes     unnamed" in capsys.readouterr().out


def test_info_of_an_empty_store(tmp_path: Path, capsys: Any) -> None:
    imgstore.open_store(tmp_path / "empty", "lmdb", "w", codec="png").close()
    assert main(["info", str(tmp_path / "empty")]) == 0
    assert "images      0" in capsys.readouterr().out


def test_verify_ok(folder_store: Path, capsys: Any) -> None:
    assert main(["verify", str(folder_store)]) == 0
    assert capsys.readouterr().out == "ok: 5 images\n"
    assert main(["verify", str(folder_store), "--decode"]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 images")


def test_verify_names_the_first_damaged_record_and_its_source(folder_store: Path, capsys: Any) -> None:
    with imgstore.open_store(folder_store) as store:
        record = store.get_encoded(3)[0]
        assert store.source_path(3) == "bee/4.jpg"
    flip_record_byte(folder_store, record)
    assert main(["verify", str(folder_store)]) == 1
    err = capsys.readouterr().err
    assert "image 3 (source bee/4.jpg) is damaged" in err and len(err.splitlines()) == 1


def test_verify_decode_finds_what_checksums_cannot(tmp_path: Path, capsys: Any) -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, "PNG")
    damaged = bytearray(out.getvalue())
    damaged[len(damaged) // 2] ^= 0xFF  # inside the pixel data: the file still ends with its IEND chunk
    with imgstore.open_store(tmp_path / "s", "lmdb", "w", codec="keep") as store:
        # Whole (its header and end are right), damaged inside: the store takes it, its checksum is right.
        store.put_encoded_many([jpeg(1, (8, 8)), bytes(damaged)], [0, 0], paths=["a.jpg", "cut.png"])
    assert main(["verify", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "s"), "--decode"]) == 1
    err = capsys.readouterr().err
    assert "image 1 (source cut.png)" in err and "cannot be decoded" in err


def test_verify_a_damaged_raw_store(tmp_path: Path, capsys: Any) -> None:
    convert("synthetic:100", tmp_path / "raw", backend="lmdb")
    with imgstore.open_store(tmp_path / "raw") as store:
        pixels = store.get(57)[0].tobytes()
    flip_record_byte(tmp_path / "raw", pixels)
    assert main(["verify", str(tmp_path / "raw")]) == 1
    err = capsys.readouterr().err
    assert "image 57 is damaged" in err


def test_verify_and_info_of_what_is_not_a_store(tmp_path: Path, capsys: Any) -> None:
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no imgstore store" in capsys.readouterr().err


def test_a_hard_linked_file_counts_once_on_disk(tmp_path: Path) -> None:
    """A LevelDB reader's view hard-links the tables: a store with a reader open read twice its size."""
    from imgstore import fileio

    (tmp_path / "a").write_bytes(b"x" * 100_000)
    (tmp_path / "views").mkdir()
    os.link(tmp_path / "a", tmp_path / "views" / "a")
    assert fileio.file_bytes(tmp_path) == 100_000
    assert 100_000 <= fileio.disk_usage(tmp_path) < 200_000


def test_a_leveldb_reader_does_not_double_the_stores_size(tmp_path: Path) -> None:
    pytest.importorskip("plyvel")
    images = np.random.default_rng(0).integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    with imgstore.open_store(tmp_path / "s", "leveldb", mode="w") as store:
        store.put_many(images, np.arange(500))
        written = store.disk_usage()
    with imgstore.open_store(tmp_path / "s") as reader:
        reader.get(0)  # its view: hard links to the tables, copies of the small files
        assert reader.disk_usage() < 1.2 * written
