"""``imgstore convert --shape``: a folder of files into a store of one shape (memmap holds nothing else);
and the summary's line for a bad file the store refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.cli import main


def folder(root: Path, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Class folders a/ and b/ of PNG files of these (height, width): their RGB pixels, in ImageFolder order."""
    rng = np.random.default_rng(3)
    images = []
    for k, (height, width) in enumerate(sizes):
        (root / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "ab"[k % 2] / f"{k}.png")
        images.append(image)
    return images[0::2] + images[1::2]  # class a's files, then class b's


def test_memmap_from_a_folder_takes_the_shape_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = folder(tmp_path / "src", [(12, 10)] * 6)
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "dest"), "--backend", "memmap", "--codec", "raw"]
    assert main(args) == 2  # files may vary in shape: the message says the command line's way
    err = capsys.readouterr().err
    assert "--shape HxWxC" in err and "memmap" in err
    assert main([*args, "--shape", "12x10x3"]) == 0
    with imgstore.open_store(tmp_path / "dest") as store:
        assert store.backend == "memmap" and store.shape == (12, 10, 3) and len(store) == 6
        got, labels = store.get_many(range(6))
        np.testing.assert_array_equal(got, np.stack(images))
        assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_file_of_another_shape_is_a_bad_file_named_by_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder(tmp_path / "src", [(12, 10), (12, 10), (12, 10), (12, 10), (9, 10), (12, 10)])  # a/4.png differs
    dest = tmp_path / "dest"
    args = ["convert", str(tmp_path / "src"), str(dest), "--backend", "memmap", "--codec", "raw", "--shape", "12x10x3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "4.png" in err and "(9, 10, 3)" in err
    with imgstore.open_store(dest) as store:
        assert len(store) == 2  # a/0.png and a/2.png, committed before it


@pytest.mark.parametrize("bad", ["12x", "axb", "0x10x3", "1x2x3x4"])
def test_a_bad_shape_is_a_usage_error(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder(tmp_path / "src", [(12, 10)] * 2)
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "dest"), "--backend", "memmap", "--codec", "raw"]
    try:
        code = main([*args, "--shape", bad])  # sizes out of range, or too many: the conversion's check
    except SystemExit as exc:  # not numbers: argparse's
        code = exc.code
    assert code == 2 and "shape" in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_a_grey_store_of_two_dimensions(tmp_path: Path) -> None:
    images = folder(tmp_path / "src", [(8, 8)] * 2)
    dest = tmp_path / "dest"
    args = ["convert", str(tmp_path / "src"), str(dest), "--backend", "memmap", "--codec", "raw", "--image-mode", "L"]
    assert main([*args, "--shape", "8x8"]) == 0
    with imgstore.open_store(dest) as store:
        assert store.shape == (8, 8)
        expected = [np.asarray(Image.fromarray(image).convert("L")) for image in images]
        np.testing.assert_array_equal(store.get_many(range(2))[0], np.stack(expected))


def test_a_file_the_store_refuses_is_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder(tmp_path / "src", [(12, 10)] * 2)
    Image.new("L", (20000, 20000)).save(tmp_path / "src" / "a" / "bomb.png")  # past Pillow's pixel limit
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "dest"), "--backend", "lmdb", "--on-error", "skip"]
    assert main(args) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "bomb.png" in line)
    assert line.strip().startswith("a/bomb.png: a PNG file of 20000x20000") and line.count("bomb.png") == 1, line
