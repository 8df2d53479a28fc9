"""The peer loaders of the ``epoch`` rows (benchmarks/loaders/peer_*.py), each on its real library.

Every peer that imports here is built from raw CIFAR-shaped pixels and from small JPEG files, then
read for one epoch with 0 and 2 real worker processes: every record exactly once (pixels and
label), uint8 ``[B, H, W, C]`` batches with int64 labels, and another seed gives another order.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from benchmarks.loaders import PEERS, EpochLoader, EpochSource, load_peer, missing_requirement  # noqa: E402
from benchmarks.loaders.peer_support import files_under  # noqa: E402

RAW = 300
ENCODED = 40
SIZE = (24, 20)  # (height, width) the JPEG files are decoded to
BATCH = {"raw": 64, "encoded": 16}  # neither divides its count: last batches are short


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _raw_source() -> EpochSource:
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (RAW, 32, 32, 3), dtype=np.uint8)
    return EpochSource("raw", images, rng.integers(0, 10, RAW).astype(np.int64))


def _encoded_source() -> EpochSource:
    rng = np.random.default_rng(14)
    files = []
    for index in range(ENCODED):
        height, width = (30, 28) if index % 2 else (40, 36)  # not the target size: every image is resized
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return EpochSource("encoded", files, rng.integers(0, 1000, ENCODED).astype(np.int64), size=SIZE)


def _expected(source: EpochSource) -> Counter[tuple[str, int]]:
    if isinstance(source.images, np.ndarray):
        pixels = list(source.images)
    else:
        # What an ImageFolder + Resize user gets: Pillow's RGB decode, bilinear resize.
        pixels = [
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(SIZE[::-1], Image.Resampling.BILINEAR))
            for data in source.images
        ]
    return Counter((_digest(image), int(label)) for image, label in zip(pixels, source.labels, strict=True))


@pytest.fixture(scope="module", params=sorted(PEERS))
def peer_class(request: pytest.FixtureRequest) -> type[EpochLoader]:
    cls = load_peer(request.param)
    reason = missing_requirement(cls)
    if reason is not None:
        pytest.skip(reason)
    return cls


@pytest.fixture(scope="module", params=["raw", "encoded"])
def built(
    request: pytest.FixtureRequest, peer_class: type[EpochLoader], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EpochLoader, EpochSource, Path]]:
    source = _raw_source() if request.param == "raw" else _encoded_source()
    root = tmp_path_factory.mktemp(f"{peer_class.name}-{source.name}")
    peer = peer_class()
    peer.build(source, root)
    yield peer, source, root
    peer.close()


def _epoch(peer: EpochLoader, source: EpochSource, *, num_workers: int, seed: int) -> list[tuple[str, int]]:
    batch_size = BATCH[source.name]
    delivered = []
    for images, labels in peer.loader(batch_size=batch_size, num_workers=num_workers, seed=seed):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.ndim == 4 and images.shape[0] == labels.shape[0] <= batch_size
        expected_shape = (32, 32, 3) if source.size is None else (*source.size, 3)
        assert tuple(images.shape[1:]) == expected_shape
        delivered += [(_digest(image.numpy()), int(label)) for image, label in zip(images, labels, strict=True)]
    return delivered


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_delivers_every_record_once(built: tuple[EpochLoader, EpochSource, Path], num_workers: int) -> None:
    peer, source, _ = built
    delivered = _epoch(peer, source, num_workers=num_workers, seed=1)
    if peer.exact_epoch:
        assert Counter(delivered) == _expected(source)
    else:
        assert set(delivered) <= set(_expected(source))


def test_seeds_give_different_orders(built: tuple[EpochLoader, EpochSource, Path]) -> None:
    peer, source, _ = built
    first = _epoch(peer, source, num_workers=0, seed=1)
    assert _epoch(peer, source, num_workers=0, seed=1) == first  # seeded: the same seed, the same order
    assert _epoch(peer, source, num_workers=0, seed=2) != first


def test_files_are_what_build_wrote(built: tuple[EpochLoader, EpochSource, Path]) -> None:
    peer, _, root = built
    listed = peer.files()
    assert listed and all(path.is_file() for path in listed)
    assert set(listed) == set(files_under(root))  # nothing an epoch reads is left out of a cold round's eviction
