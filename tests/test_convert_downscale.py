"""``imgstore convert --downscale N``: larger images made smaller once, exactly as torchvision's
``Resize(N)`` on a PIL image (shorter side N, its rounding, antialiased bilinear), smaller ones kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.cli import main
from imgstore.codecs import decode, get_codec
from imgstore.codecs.downscale import downscale_array, downscaled_size
from imgstore.convert import BadFileError, convert
from imgstore.errors import ImgStoreError, InvalidImageError, InvalidOptionError
from imgstore.sharded import open_sharded
from imgstore.sharded.building import convert_sharded
from imgstore.sources import ConvertError

# (height, width) -> after Resize(24), as torchvision computes it: int(24 * long / short) on the long side
SIZES = {(48, 64): (24, 32), (64, 48): (32, 24), (50, 70): (24, 33), (71, 29): (58, 24), (20, 30): (20, 30),
         (24, 100): (24, 100), (25, 25): (24, 24)}  # fmt: skip


def photo(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """A smooth image with some detail (a resize of noise alone would hide a wrong filter in its noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / (3 + seed)) * np.cos(y / 5)
    pixels = base[:, :, None] + rng.normal(0, 12, (height, width, channels))
    clipped: np.ndarray = np.clip(pixels, 0, 255).astype(np.uint8)
    return clipped


def folder(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Class folders a/ and b/ of PNG files of these sizes; their paths in ImageFolder's order."""
    paths = []
    for k, (height, width) in enumerate(sizes):
        path = root / "ab"[k % 2] / f"{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(height, width, k)).save(path)
        paths.append(path)
    return paths[0::2] + paths[1::2]


def torchvision_resize(path: Path, shorter: int, mode: str = "RGB") -> np.ndarray:
    image = Image.open(path).convert(mode)
    height, width = SIZES[(image.height, image.width)] if shorter == 24 else (image.height, image.width)
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def test_the_sizes_are_torchvisions() -> None:
    for (height, width), expected in SIZES.items():
        assert downscaled_size(height, width, 24) == expected


@pytest.mark.parametrize("backend", ["lmdb", "hdf5"])
def test_a_folder_downscaled_into_raw_pixels_is_resize_exactly(tmp_path: Path, backend: str) -> None:
    paths = folder(tmp_path / "src", list(SIZES))
    dest = tmp_path / "dest"
    args = ["convert", str(tmp_path / "src"), str(dest), "--backend", backend, "--codec", "raw", "--downscale", "24"]
    assert main(args) == 0
    with imgstore.open_store(dest) as store:
        assert len(store) == len(paths) and store.varied
        for index, path in enumerate(paths):
            image, label = store.get(index)
            np.testing.assert_array_equal(image, torchvision_resize(path, 24))
            assert label == (0 if path.parent.name == "a" else 1)


def test_jpeg_keeps_the_sizes_and_is_close(tmp_path: Path) -> None:
    paths = folder(tmp_path / "src", list(SIZES))
    dest = tmp_path / "dest"
    convert(tmp_path / "src", dest, backend="lmdb", codec="jpeg", quality=95, downscale=24)
    jpeg = get_codec("jpeg", quality=95)
    with imgstore.open_store(dest) as store:
        assert store.codec == "jpeg"
        for index, path in enumerate(paths):
            image, _ = store.get(index)
            expected = decode(jpeg.encode(torchvision_resize(path, 24)))  # Resize(24), then the store's codec
            np.testing.assert_array_equal(image, expected)
            assert store.source_path(index) == path.relative_to(tmp_path / "src").as_posix()


def test_a_grey_folder_and_mode_none(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.fromarray(photo(48, 64, 1)[:, :, 0]).save(src / "grey.png")
    Image.fromarray(photo(48, 64, 2, channels=2), "LA").save(src / "la.png")
    convert(tmp_path / "src", tmp_path / "dest", backend="lmdb", codec="png", image_mode=None, downscale=24)
    with imgstore.open_store(tmp_path / "dest") as store:
        grey, _ = store.get(0)
        la, _ = store.get(1)
    assert grey.shape == (24, 32, 1) and la.shape == (24, 32, 2)
    expected = Image.open(src / "grey.png").resize((32, 24), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(grey[:, :, 0], np.asarray(expected))


def test_a_dataset_of_arrays_into_a_store_of_the_smaller_shape(tmp_path: Path) -> None:
    convert("synthetic:12", tmp_path / "small", backend="memmap", downscale=16)
    with imgstore.open_store(tmp_path / "small") as small:
        assert small.shape == (16, 16, 3) and len(small) == 12
        got, labels = small.get_many(range(12))
    convert("synthetic:12", tmp_path / "full", backend="memmap")
    with imgstore.open_store(tmp_path / "full") as full:
        originals, full_labels = full.get_many(range(12))
    expected = [np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BILINEAR)) for image in originals]
    np.testing.assert_array_equal(got, np.stack(expected))
    np.testing.assert_array_equal(labels, full_labels)


def test_a_larger_n_keeps_every_image_as_it_is(tmp_path: Path) -> None:
    paths = folder(tmp_path / "src", list(SIZES))
    convert(tmp_path / "src", tmp_path / "dest", backend="hdf5", codec="raw", downscale=1000)
    with imgstore.open_store(tmp_path / "dest") as store:
        for index, path in enumerate(paths):
            np.testing.assert_array_equal(store.get(index)[0], np.asarray(Image.open(path).convert("RGB")))


def test_keep_cannot_downscale_and_nothing_is_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder(tmp_path / "src", [(48, 64)] * 2)
    dest = tmp_path / "dest"
    assert main(["convert", str(tmp_path / "src"), str(dest), "--backend", "lmdb", "--downscale", "24"]) == 2
    err = capsys.readouterr().err
    assert "keep" in err and "--codec jpeg" in err
    assert not dest.exists()


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "24"])
def test_a_bad_downscale_is_refused(tmp_path: Path, bad: object) -> None:
    folder(tmp_path / "src", [(48, 64)] * 2)
    with pytest.raises(ImgStoreError, match="downscale"):
        convert(tmp_path / "src", tmp_path / "dest", backend="lmdb", codec="png", downscale=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "dest").exists()


def test_resuming_with_another_downscale_is_refused(tmp_path: Path) -> None:
    folder(tmp_path / "src", list(SIZES))
    dest = tmp_path / "dest"
    convert(tmp_path / "src", dest, backend="lmdb", codec="raw", downscale=24, batch_images=2)
    before = imgstore.open_store(dest).get_many(range(len(SIZES)))[0]
    with pytest.raises(ConvertError, match=r"downscale 24 \(this run: 20\)"):
        convert(tmp_path / "src", dest, backend="lmdb", codec="raw", downscale=20, resume=True)
    convert(tmp_path / "src", dest, backend="lmdb", codec="raw", downscale=24, resume=True)  # the same: nothing to do
    with imgstore.open_store(dest) as store:
        assert len(store) == len(SIZES)
        for old, new in zip(before, store.get_many(range(len(SIZES)))[0], strict=True):
            np.testing.assert_array_equal(old, new)


def test_a_sharded_build_downscales_every_shard(tmp_path: Path) -> None:
    paths = folder(tmp_path / "src", list(SIZES))
    convert_sharded(tmp_path / "src", tmp_path / "sharded", shards=2, backend="lmdb", codec="png", downscale=24)
    expected = {path.relative_to(tmp_path / "src").as_posix(): torchvision_resize(path, 24) for path in paths}
    dataset = open_sharded(tmp_path / "sharded")
    assert len(dataset) == len(paths) and len(dataset.shards) == 2
    seen = set()
    for k in range(2):
        store = dataset.shard(k)
        assert json.loads((store.path / "imgstore.json").read_text())["downscale"] == 24
        for index in range(len(store)):
            path = store.source_path(index)
            assert path is not None
            np.testing.assert_array_equal(store.get(index)[0], expected[path])
            seen.add(path)
    dataset.close()
    assert seen == set(expected)


def test_an_array_it_cannot_resize_is_a_clear_error() -> None:
    with pytest.raises(InvalidImageError, match="C 1 to 4"):
        downscale_array(np.zeros((40, 40, 5), np.uint8), 20)
    with pytest.raises(InvalidImageError, match="float32"):
        downscale_array(np.zeros((40, 40, 3), np.float32), 20)
    small = np.zeros((10, 40, 3), np.uint8)
    assert downscale_array(small, 20) is small  # nothing to do: the same array


def test_a_shape_given_with_arrays_is_the_downscaled_one(tmp_path: Path) -> None:
    """--shape is the store's shape, after the resize, for arrays as for files (it was compared to the
    source's own shape: the right shape refused, the source's accepted and then failing at the first write)."""
    convert("synthetic:6", tmp_path / "full", backend="memmap")
    convert("synthetic:6", tmp_path / "small", backend="memmap", codec="raw", shape=(16, 16, 3), downscale=16)
    with imgstore.open_store(tmp_path / "full") as full, imgstore.open_store(tmp_path / "small") as small:
        assert small.shape == (16, 16, 3)
        expected = [
            np.asarray(Image.fromarray(full.get(k)[0]).resize((16, 16), Image.Resampling.BILINEAR)) for k in range(6)
        ]
        np.testing.assert_array_equal(small.get_many(range(6))[0], np.stack(expected))
    with pytest.raises(ConvertError, match=r"\(16, 16, 3\) once downscaled, not \(32, 32, 3\)"):
        convert("synthetic:6", tmp_path / "wrong", backend="memmap", codec="raw", shape=(32, 32, 3), downscale=16)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_resuming_with_another_downscale_is_refused_when_the_last_image_cannot_tell(tmp_path: Path, codec: str) -> None:
    """A run stopped after an image no downscale changes (20x30 here): resuming with another N, or none,
    once made a store of two sizes, its last image being the same either way. The store keeps N."""
    paths = folder(tmp_path / "src", [(48, 64), (48, 64), (48, 64), (48, 64), (20, 30)])
    broken = paths[3]  # b/01, after a/00, a/02 and a/04 (the 20x30): the run stops there
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    dest = tmp_path / "dest"
    with pytest.raises(BadFileError):
        convert(tmp_path / "src", dest, backend="lmdb", codec=codec, downscale=24, batch_images=1)
    assert json.loads((dest / "imgstore.json").read_text())["downscale"] == 24
    broken.write_bytes(good)
    for other in (20, None):
        with pytest.raises(ConvertError, match="downscale 24 \\(this run: " + str(other)):
            convert(tmp_path / "src", dest, backend="lmdb", codec=codec, downscale=other, resume=True)
    with pytest.raises(InvalidOptionError, match="downscale 24; 20 was given"):
        imgstore.open_store(dest, mode="a", downscale=20)
    convert(tmp_path / "src", dest, backend="lmdb", codec=codec, downscale=24, resume=True)
    with imgstore.open_store(dest) as store:
        for index, path in enumerate(paths):
            np.testing.assert_array_equal(store.get(index)[0], torchvision_resize(path, 24))
    convert(tmp_path / "src", tmp_path / "plain", backend="lmdb", codec=codec)
    assert "downscale" not in json.loads((tmp_path / "plain" / "imgstore.json").read_text())


def test_arrays_it_cannot_resize_are_refused_before_a_store_is_made(tmp_path: Path) -> None:
    """Every item would fail: refused up front, not as the first "bad file" of an empty DEST."""
    with imgstore.open_store(tmp_path / "five", "memmap", "w") as store:
        store.put_many(np.zeros((2, 40, 40, 5), np.uint8), [0, 1])
    with pytest.raises(ConvertError, match=r"shape \(40, 40, 5\): downscale resizes"):
        convert(tmp_path / "five", tmp_path / "dest", backend="lmdb", codec="raw", downscale=20)
    assert not (tmp_path / "dest").exists()
    convert(tmp_path / "five", tmp_path / "kept", backend="lmdb", codec="raw", downscale=40)  # nothing to resize
    assert imgstore.open_store(tmp_path / "kept").shape == (40, 40, 5)


def test_info_says_the_store_was_downscaled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder(tmp_path / "src", [(48, 64)] * 2)
    convert(tmp_path / "src", tmp_path / "small", backend="hdf5", codec="png", downscale=24)
    convert(tmp_path / "src", tmp_path / "full", backend="hdf5", codec="png")
    with imgstore.open_store(tmp_path / "small") as small, imgstore.open_store(tmp_path / "full") as full:
        assert small.downscale == 24 and full.downscale is None
    assert main(["info", str(tmp_path / "small")]) == 0
    assert "downscaled  to shorter side 24" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "full"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["downscale"] is None
    assert main(["info", str(tmp_path / "full")]) == 0
    assert "downscaled" not in capsys.readouterr().out
