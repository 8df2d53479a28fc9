"""``imgstore convert`` and :func:`imgstore.convert.convert`: ImageFolder rules, codecs, bad files, resume, sources."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import imgstore
from imgstore.cli import main
from imgstore.convert import BadFileError, ConvertError, convert
from imgstore.errors import DatasetNotFoundError, InvalidOptionError

REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


# ---------------------------------------------------------------------- helpers


def reference_samples(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's ImageFolder rules, written out again here as the reference: (classes, [(path, label)])."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    return classes, samples


def rgb_of(path: str) -> np.ndarray:
    """What torchvision's default loader gives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a palette with transparency warns; the pixels are the point
        with open(path, "rb") as f:
            return np.asarray(Image.open(f).convert("RGB"))


def pixels(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    # Smooth gradients plus noise: compresses like a photo, and no two files are alike.
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(1, width - 1) + y * 97 // max(1, height - 1))[..., None] + rng.integers(0, 40, (1, 1, 3))
    image = (base + rng.integers(0, 25, (height, width, 3))) % 256
    return image.astype(np.uint8)[..., :channels] if channels < 3 else image.astype(np.uint8)


def save(path: Path, image: Image.Image, format: str | None = None, **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format, **options)


def make_folder(root: Path, seed: int = 0) -> Path:
    """Classes with nested folders, mixed-case extensions, files to ignore, every mode and varied sizes."""
    rng = np.random.default_rng(seed)

    def rgb(h: int, w: int) -> Image.Image:
        return Image.fromarray(pixels(rng, h, w, 3))

    save(root / "cat" / "a.jpg", rgb(37, 53), quality=90)
    save(root / "cat" / "B.JPG", rgb(40, 30).convert("L"), "JPEG")  # grayscale JPEG, upper-case extension
    save(root / "cat" / "sub" / "c.Png", rgb(21, 33).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    palette = rgb(16, 16).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 3
    save(root / "cat" / "sub" / "c2.png", palette, transparency=3)
    save(root / "cat" / "sub" / "deeper" / "d.PNG", Image.fromarray(pixels(rng, 19, 23, 3)).convert("RGBA"))
    save(root / "cat" / "sub" / "e.jpeg", rgb(45, 20).convert("CMYK"), "JPEG")  # CMYK JPEG
    save(root / "cat" / ".hidden.png", rgb(8, 9))  # hidden files count in torchvision too
    (root / "cat" / "notes.txt").write_text("not an image")
    save(root / "cat" / "anim.gif", rgb(10, 10), "GIF")  # an image, but not an ImageFolder extension
    sixteen = Image.fromarray((rng.integers(0, 65535, (24, 31))).astype(np.uint16))
    save(root / "dog" / "x16.png", sixteen, "PNG")  # 16-bit grayscale PNG
    save(root / "dog" / "y.WEBP", rgb(30, 41), "WEBP", quality=80)
    save(root / "dog" / "z.bmp", rgb(17, 29).convert("L"), "BMP")
    save(root / "dog" / "w.TIFF", rgb(26, 22), "TIFF")
    save(root / "dog" / "la.png", rgb(12, 14).convert("LA"), "PNG")
    save(root / "dog" / "one.png", rgb(12, 14).convert("1"), "PNG")
    (root / "dog" / "README").write_text("no extension")
    save(root / "Zebra" / "q.ppm", rgb(33, 27), "PPM")  # upper case sorts before lower case
    save(root / "Zebra" / "r.pgm", rgb(14, 50).convert("L"), "PPM")
    save(root / "Zebra" / "deep" / "er" / "s.jpg", rgb(64, 48), quality=75, subsampling=2)
    (root / "labels.csv").write_text("a file beside the classes: not a class")
    (root / "dog" / "link").symlink_to(root / "Zebra" / "deep", target_is_directory=True)  # followed, as torchvision
    return root


def jpeg_bytes(seed: int, size: tuple[int, int] = (24, 32)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels(np.random.default_rng(seed), *size, 3)).save(out, "JPEG", quality=90)
    return out.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def store_records(path: Path) -> list[tuple[bytes, int, str | None]]:
    with imgstore.open_store(path) as store:
        blobs, labels = store.get_encoded_many(range(len(store)))
        return [(b, int(label), store.source_path(i)) for i, (b, label) in enumerate(zip(blobs, labels, strict=True))]


def run_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "imgstore.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )


def encoded_backends() -> list[Any]:
    """Every backend, each skipped where it cannot hold encoded images yet (so it switches on by itself)."""
    return [pytest.param(name, id=name) for name in imgstore.available_backends()]


@pytest.fixture
def encoded_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    name: str = request.param
    probe = tmp_path_factory.mktemp(f"can-{name}")
    try:
        with imgstore.open_store(probe / "s", name, "w", codec="keep") as store:
            store.put_encoded_many([jpeg_bytes(0)], [0])
    except InvalidOptionError as exc:
        if "encoded" in str(exc):
            pytest.skip(f"the {name} backend cannot hold encoded images: {exc}")
        raise
    return name


# ---------------------------------------------------------------------- ImageFolder rules, every mode


@pytest.mark.parametrize("encoded_backend", encoded_backends(), indirect=True)
@pytest.mark.parametrize("codec", ["keep", "png"])
def test_folder_gives_what_imagefolder_gives(tmp_path: Path, encoded_backend: str, codec: str) -> None:
    root = make_folder(tmp_path / "src")
    classes, samples = reference_samples(root)
    assert classes == ["Zebra", "cat", "dog"] and len(samples) == 17
    assert (str(root / "dog" / "link" / "er" / "s.jpg"), 2) in samples
    result = convert(root, tmp_path / "dest", backend=encoded_backend, codec=codec, workers=2, batch_images=5)
    assert result.written == result.count == len(samples) and not result.skipped
    with imgstore.open_store(tmp_path / "dest") as store:
        assert store.classes == classes and store.codec == codec and store.image_mode == "RGB"
        for i, (path, label) in enumerate(samples):
            image, got = store.get(i)
            assert got == label and store.source_path(i) == os.path.relpath(path, root)
            np.testing.assert_array_equal(image, rgb_of(path), err_msg=path)
        if codec == "keep":  # the files themselves
            blobs, _ = store.get_encoded_many(range(len(store)))
            assert blobs == [Path(path).read_bytes() for path, _ in samples]


def test_same_samples_as_torchvision_imagefolder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    root = make_folder(tmp_path / "src")
    convert(root, tmp_path / "dest", backend="lmdb")
    folder = datasets.ImageFolder(str(root))
    with imgstore.open_store(tmp_path / "dest") as store:
        assert store.classes == folder.classes and len(store) == len(folder)
        for i, (path, label) in enumerate(folder.samples):
            image, got = store.get(i)
            assert got == label and store.source_path(i) == os.path.relpath(path, root)
            np.testing.assert_array_equal(image, np.asarray(folder[i][0]))


def test_raw_codec_decodes_to_varied_shapes_and_image_mode_l(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "src")
    _, samples = reference_samples(root)
    convert(root, tmp_path / "raw", backend="lmdb", codec="raw", workers=0)
    convert(root, tmp_path / "gray", backend="lmdb", codec="png", image_mode="L")
    with imgstore.open_store(tmp_path / "raw") as raw, imgstore.open_store(tmp_path / "gray") as gray:
        assert raw.codec == "raw" and raw.varied and raw.image_mode is None and gray.image_mode == "L"
        for i, (path, _) in enumerate(samples):
            np.testing.assert_array_equal(raw.get(i)[0], rgb_of(path))
            with Image.open(path) as opened:
                expected = np.asarray(opened.convert("L"))
            np.testing.assert_array_equal(gray.get(i)[0].reshape(expected.shape), expected)


def test_a_class_without_images_is_an_error_naming_it(tmp_path: Path, capsys: Any) -> None:
    root = make_folder(tmp_path / "src")
    (root / "empty" / "inner").mkdir(parents=True)
    (root / "empty" / "inner" / "x.txt").write_text("")
    assert main(["convert", str(root), str(tmp_path / "dest"), "--backend", "lmdb"]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "no image file" in err and not (tmp_path / "dest").exists()


def test_jpeg_quality_and_webp(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "src")
    convert(root, tmp_path / "jpeg", backend="lmdb", codec="jpeg", quality=70)
    with imgstore.open_store(tmp_path / "jpeg") as store:
        assert store.codec_params["quality"] == 70
        blobs, _ = store.get_encoded_many(range(len(store)))
        assert all(blob.startswith(b"\xff\xd8") for blob in blobs)


# ---------------------------------------------------------------------- bad files


def bad_folder(root: Path) -> dict[str, str]:
    """Good files around bad ones; returns each bad file's relative path and a word its reason holds."""
    for k in range(8):
        save(root / "a" / f"{k:02d}.jpg", Image.fromarray(pixels(np.random.default_rng(k), 20, 24, 3)))
    good = jpeg_bytes(99, (64, 64))
    (root / "a" / "02b.jpg").write_bytes(good[: len(good) // 2])  # truncated: the header is whole
    (root / "a" / "04b.jpg").write_text("this is a text file named .jpg\n")
    (root / "a" / "05b.png").write_bytes(b"")
    (root / "a" / "06b.png").write_bytes(bomb_png())
    return {"a/02b.jpg": "truncated", "a/04b.jpg": "not an image", "a/05b.png": "empty", "a/06b.png": "bomb"}


def test_bad_file_fails_after_committing_the_good_ones_before_it(tmp_path: Path, capsys: Any) -> None:
    root, dest = tmp_path / "src", tmp_path / "dest"
    bad_folder(root)
    args = ["convert", str(root), str(dest), "--backend", "lmdb", "--batch-images", "2"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "02b.jpg" in err and "truncated" in err and "--resume" in err and len(err.splitlines()) == 1
    assert "converted 3 images" in out
    assert [path for _, _, path in store_records(dest)] == ["a/00.jpg", "a/01.jpg", "a/02.jpg"]
    # Fixed (removed), the run resumes and stops at the next bad file, and so on.
    order = [("a/02b.jpg", "truncated"), ("a/04b.jpg", "not an image"), ("a/05b.png", "empty"), ("a/06b.png", "bomb")]
    for (fixed, _), (name, word) in zip(order, order[1:], strict=False):
        (root / fixed).unlink()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert name in err and word in err.lower(), err
    (root / "a" / "06b.png").unlink()
    assert main([*args, "--resume"]) == 0
    assert [path for _, _, path in store_records(dest)] == [f"a/{k:02d}.jpg" for k in range(8)]


def test_skip_lists_bad_files_and_resume_keeps_the_order(tmp_path: Path, capsys: Any) -> None:
    root, dest = tmp_path / "src", tmp_path / "dest"
    bad = bad_folder(root)
    assert (
        main(["convert", str(root), str(dest), "--backend", "lmdb", "--on-error", "skip", "--batch-images", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "skipped 4 bad files" in out
    for path, word in bad.items():
        line = next(line for line in out.splitlines() if path in line)
        assert word in line.lower(), line
    goods = [f"a/{k:02d}.jpg" for k in range(8)]
    assert [path for _, _, path in store_records(dest)] == goods
    # A resumed run does not go back to the skipped files, and says how many there were.
    assert main(["convert", str(root), str(dest), "--backend", "lmdb", "--on-error", "skip", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "converted 0 images, resumed at item 12" in out and "4 files were skipped" in out


def test_skipped_files_before_and_after_the_last_record_on_resume(tmp_path: Path) -> None:
    # A folder that grows: its old listing is a prefix of the new, so the first run is a stopped run of the second.
    root = tmp_path / "src"
    for k in (0, 1, 3, 4, 5):
        save(root / "c" / f"{k}.jpg", Image.fromarray(pixels(np.random.default_rng(k), 16, 16, 3)))
    (root / "c" / "2.jpg").write_text("bad")
    first = convert(root, tmp_path / "dest", backend="lmdb", on_error="skip", batch_images=2)
    assert [s.path for s in first.skipped] == ["c/2.jpg"] and first.count == 5
    for k in (6, 7, 9):
        save(root / "c" / f"{k}.jpg", Image.fromarray(pixels(np.random.default_rng(k), 16, 16, 3)))
    (root / "c" / "8.jpg").write_bytes(b"")
    second = convert(root, tmp_path / "dest", backend="lmdb", on_error="skip", batch_images=2, resume=True)
    assert second.start == 6 and second.skipped_before == 1 and [s.path for s in second.skipped] == ["c/8.jpg"]
    fresh = convert(root, tmp_path / "fresh", backend="lmdb", on_error="skip")
    assert store_records(tmp_path / "dest") == store_records(tmp_path / "fresh") and fresh.count == 8


def test_skip_needs_a_folder_and_an_encoded_codec(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="skip"):
        convert("synthetic:10", tmp_path / "a", backend="lmdb", on_error="skip")
    root = make_folder(tmp_path / "src")
    with pytest.raises(ConvertError, match="skip"):
        convert(root, tmp_path / "b", backend="lmdb", codec="raw", on_error="skip")


def test_full_check_decodes_files_that_look_whole(tmp_path: Path) -> None:
    # A PNG damaged inside, with its header and end intact: only a decode tells.
    root = tmp_path / "src"
    save(root / "c" / "a.png", Image.fromarray(pixels(np.random.default_rng(0), 40, 40, 3)))
    damaged = bytearray((root / "c" / "a.png").read_bytes())
    damaged[damaged.find(b"IDAT") + 30] ^= 0xFF
    (root / "c" / "b.png").write_bytes(bytes(damaged))
    assert convert(root, tmp_path / "quick", backend="lmdb").count == 2  # `imgstore verify --decode` would find it
    checked = convert(root, tmp_path / "full", backend="lmdb", full_check=True, on_error="skip")
    assert checked.count == 1 and [(s.path, "damaged" in s.reason) for s in checked.skipped] == [("c/b.png", True)]


def test_bad_file_error_carries_the_result(tmp_path: Path) -> None:
    root = tmp_path / "src"
    bad_folder(root)
    with pytest.raises(BadFileError) as caught:
        convert(root, tmp_path / "dest", backend="lmdb", codec="png", batch_images=100)
    assert caught.value.path == "a/02b.jpg" and caught.value.result.count == 3


# ---------------------------------------------------------------------- resume


def committed(dest: Path) -> int:
    """The images a store has committed (0 while it is not made yet): its manifest's count."""
    try:
        return int(json.loads((dest / "imgstore.json").read_text()).get("count", 0))
    except FileNotFoundError:
        return 0


def wait_and_kill(process: subprocess.Popen[bytes], manifest: Path, target: int | None, extra: float) -> None:
    """SIGKILL ``extra`` s after DEST has committed ``target`` images (None: after the start), or after the end."""
    while target is not None and process.poll() is None:
        try:
            if json.loads(manifest.read_text()).get("count", 0) >= target:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    time.sleep(extra)
    process.kill()
    process.wait()


@pytest.mark.parametrize("codec", ["keep", "png"])
def test_resume_after_sigkill_equals_an_uninterrupted_conversion(tmp_path: Path, codec: str) -> None:
    root = tmp_path / "src"
    rng = random.Random(codec)
    for k in range(90):
        size = (rng.randint(8, 40), rng.randint(8, 40))
        image = Image.fromarray(pixels(np.random.default_rng(k), *size, 3))
        save(root / f"c{k % 3}" / f"{k:03d}.{'png' if k % 4 == 0 else 'jpg'}", image)
    (root / "c1" / "050x.jpg").write_text("bad")  # skipped: must not shift what resumes where
    # One image a commit: a durable commit each, so the run lasts long enough that kills land mid-run.
    options = ["--backend", "lmdb", "--codec", codec, "--batch-images", "1", "--on-error", "skip", "--workers", "2"]
    reference = convert(root, tmp_path / "reference", backend="lmdb", codec=codec, on_error="skip")
    dest = tmp_path / "dest"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = fresh_starts = 0
    resume = False
    for attempt in range(12):
        if killed >= 2:
            break
        have = committed(dest)
        if have == reference.count:  # finished before two kills landed mid-run (a quick machine): again
            shutil.rmtree(dest)
            have, resume, fresh_starts = 0, False, fresh_starts + 1
        # The first kill at a moment from the start (importing, creating DEST, the first commits), sooner
        # after each run that finished first; the others after a random commit: between commits or in one.
        target = rng.randint(have, (have + reference.count) // 2) if resume else None
        extra = rng.uniform(0.05, 0.8) / 2**fresh_starts if target is None else rng.uniform(0, 0.03)
        args = [sys.executable, "-m", "imgstore.cli", "convert", str(root), str(dest), *options]
        process = subprocess.Popen([*args, "--resume"] if resume else args, env=env, stdout=subprocess.DEVNULL)
        wait_and_kill(process, dest / "imgstore.json", target, extra)
        count = committed(dest)
        killed += process.returncode == -9 and 0 < count < reference.count
        resume = True
        print(f"attempt {attempt}: target {target}, killed at {count}, exit {process.returncode}")
    assert killed >= 2  # most kills land mid-run, after a commit
    time.sleep(0.2)
    orphans = [p for p in Path("/proc").glob("[0-9]*") if str(dest).encode() in _cmdline(p)]
    assert not orphans, "worker processes outlived the killed conversion"
    final = convert(root, dest, backend="lmdb", codec=codec, on_error="skip", resume=True)
    assert final.count == reference.count == 90
    assert store_records(dest) == store_records(tmp_path / "reference")


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


def test_resume_with_other_options_is_refused(tmp_path: Path, capsys: Any) -> None:
    root = make_folder(tmp_path / "src")
    dest = tmp_path / "dest"
    assert main(["convert", str(root), str(dest), "--backend", "lmdb", "--batch-images", "4"]) == 0
    capsys.readouterr()
    for extra, words in (
        (["--codec", "png"], "codec 'keep' (this run: 'png')"),
        (["--image-mode", "L"], "image mode 'RGB' (this run: 'L')"),
        (["--backend", "hdf5"], "backend 'lmdb' (this run: 'hdf5')"),
    ):
        args = ["convert", str(root), str(dest), "--backend", "lmdb", "--resume", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert words in err and "rerun with the options it was made with" in err, err
    # Another class list, or files that are not this folder's.
    (root / "zz").mkdir()
    save(root / "zz" / "new.png", Image.new("RGB", (4, 4)))
    assert main(["convert", str(root), str(dest), "--backend", "lmdb", "--resume"]) == 2
    assert "classes" in capsys.readouterr().err
    other = make_folder(tmp_path / "other", seed=1)
    (other / "cat" / "a.jpg").rename(other / "cat" / "a0.jpg")
    assert main(["convert", str(other), str(dest), "--backend", "lmdb", "--resume"]) == 2
    assert "not in SOURCE" in capsys.readouterr().err
    other2 = make_folder(tmp_path / "other2", seed=2)  # same names, other pixels
    assert main(["convert", str(other2), str(dest), "--backend", "lmdb", "--resume"]) == 2
    assert "last image" in capsys.readouterr().err
    assert len(store_records(dest)) == 17  # nothing was written by the refused runs


def test_a_store_that_holds_images_needs_resume_or_overwrite(tmp_path: Path, capsys: Any) -> None:
    root = make_folder(tmp_path / "src")
    dest = tmp_path / "dest"
    assert main(["convert", str(root), str(dest), "--backend", "lmdb"]) == 0
    before = store_records(dest)
    capsys.readouterr()
    assert main(["convert", str(root), str(dest), "--backend", "lmdb"]) == 2
    err = capsys.readouterr().err
    assert "already holds 17 images" in err and "--resume" in err and "delete" in err
    assert store_records(dest) == before
    assert main(["convert", str(root), str(dest), "--backend", "lmdb", "--resume", "--overwrite"]) == 2
    assert main(["convert", str(root), str(dest), "--backend", "lmdb", "--overwrite", "--codec", "png"]) == 0
    with imgstore.open_store(dest) as store:
        assert store.codec == "png" and len(store) == 17
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("not a store")
    assert main(["convert", str(root), str(tmp_path / "other"), "--backend", "lmdb"]) == 2
    assert (tmp_path / "other" / "mine.txt").read_text() == "not a store"


def test_dest_inside_the_source_folder_is_refused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "src")
    with pytest.raises(ConvertError, match="inside SOURCE"):
        convert(root, root / "cat" / "store", backend="png")


# ---------------------------------------------------------------------- datasets and stores


def test_synthetic_source_and_resume_by_count(tmp_path: Path) -> None:
    images, labels = imgstore.datasets.load_dataset("synthetic", 50)
    first = convert("synthetic:30", tmp_path / "dest", backend="lmdb", batch_images=7)
    assert first.count == 30 and first.codec == "raw"
    second = convert("synthetic:50", tmp_path / "dest", backend="lmdb", resume=True)
    assert second.start == 30 and second.written == 20
    with imgstore.open_store(tmp_path / "dest") as store:
        got, got_labels = store.get_many(range(50))
        assert store.shape == (32, 32, 3) and store.classes is None
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(ConvertError, match="last image"):  # another seed's images are not its prefix
        convert("synthetic:60", tmp_path / "dest", backend="lmdb", resume=True, split="test")


def test_imagenet_like_source_keeps_the_files(tmp_path: Path) -> None:
    try:
        data = imgstore.datasets.imagenet_like(12)
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    result = convert("imagenet-like:12", tmp_path / "dest", backend="lmdb")
    assert result.count == 12
    with imgstore.open_store(tmp_path / "dest") as store:
        assert store.codec == "keep" and store.image_mode == "RGB" and store.classes == data.classes
        blobs, labels = store.get_encoded_many(range(12))
    assert blobs == data.blobs and labels.tolist() == data.labels.tolist()


@pytest.mark.parametrize("encoded_backend", encoded_backends(), indirect=True)
def test_store_to_store_keep_copies_bytes_paths_and_classes(tmp_path: Path, encoded_backend: str) -> None:
    root = make_folder(tmp_path / "src")
    convert(root, tmp_path / "lmdb", backend="lmdb")
    result = convert(tmp_path / "lmdb", tmp_path / "copy", backend=encoded_backend, batch_images=5)
    assert result.codec == "keep" and result.count == 17
    assert store_records(tmp_path / "copy") == store_records(tmp_path / "lmdb")
    with imgstore.open_store(tmp_path / "copy") as store:
        assert store.classes == ["Zebra", "cat", "dog"] and store.image_mode == "RGB"


def test_store_to_store_reencodes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "src")
    convert(root, tmp_path / "keep", backend="lmdb")
    convert(tmp_path / "keep", tmp_path / "png", backend="lmdb", codec="png")
    with imgstore.open_store(tmp_path / "keep") as keep, imgstore.open_store(tmp_path / "png") as png:
        assert png.codec == "png" and png.classes == keep.classes
        for i in range(len(keep)):
            np.testing.assert_array_equal(png.get(i)[0], keep.get(i)[0])
            assert png.source_path(i) == keep.source_path(i)


def test_raw_synthetic_store_to_jpeg(tmp_path: Path) -> None:
    convert("synthetic:64", tmp_path / "raw", backend="lmdb")
    result = convert(tmp_path / "raw", tmp_path / "jpeg", backend="lmdb", codec="jpeg", quality=95, batch_images=10)
    assert result.count == 64
    with imgstore.open_store(tmp_path / "raw") as raw, imgstore.open_store(tmp_path / "jpeg") as jpeg:
        assert jpeg.codec == "jpeg" and jpeg.shape == (32, 32, 3)
        images, labels = raw.get_many(range(64))
        got, got_labels = jpeg.get_many(range(64))
    np.testing.assert_array_equal(got_labels, labels)
    assert np.abs(got.astype(int) - images).mean() < 6  # lossy, but close
    # And back to raw pixels in another backend, by the command line.
    assert main(["convert", str(tmp_path / "jpeg"), str(tmp_path / "back"), "--backend", "hdf5", "--codec", "raw"]) == 0
    with imgstore.open_store(tmp_path / "back") as back:
        assert back.codec == "raw" and len(back) == 64
        np.testing.assert_array_equal(np.stack([back.get(i)[0] for i in range(64)]), got)


def test_cli_summary_and_bad_input(tmp_path: Path, capsys: Any) -> None:
    assert main(["convert", "synthetic:20", str(tmp_path / "s"), "--backend", "lmdb", "--batch-images", "8"]) == 0
    out = capsys.readouterr().out
    assert "converted 20 images" in out and "images/s" in out and "MB/s" in out and "MB on disk" in out
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "d"), "--backend", "lmdb"]) == 2
    assert "not a folder, a store or a dataset" in capsys.readouterr().err
    assert main(["convert", "synthetic:abc", str(tmp_path / "d"), "--backend", "lmdb"]) == 2
    assert main(["convert", "synthetic:5", str(tmp_path / "d"), "--backend", "nosuch"]) == 2
    assert main(["convert", "synthetic:5", str(tmp_path / "d"), "--backend", "lmdb", "--image-mode", "RGB"]) == 2


def test_progress_bar_stays_out_of_pipes(tmp_path: Path) -> None:
    result = run_cli("convert", "synthetic:30", tmp_path / "d", "--backend", "lmdb")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("converted 30 images")
