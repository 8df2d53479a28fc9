"""imgstore.torch.make_loader: a real DataLoader with real worker processes, over every installed backend."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.errors import InvalidOptionError

torch = pytest.importorskip("torch")

from imgstore.torch import (  # noqa: E402
    BlockShuffleSampler,
    RandomBatchSampler,
    SequentialBatchSampler,
    StoreDataset,
    make_loader,
)
from imgstore.torch_ring import RingLoader  # noqa: E402
from imgstore.torch_samplers import same_block_fraction  # noqa: E402

N = 300  # not a multiple of the batch size: the last batch is short
BATCH = 64
SHAPE = (6, 5, 3)


def _write(path: Path, backend: str, n: int = N, shape: tuple[int, ...] = SHAPE, **options: object) -> np.ndarray:
    """A store whose label is the image's index, so a batch says which records it holds."""
    images = np.random.default_rng(7).integers(0, 256, (n, *shape), dtype=np.uint8)
    with imgstore.open_store(path, backend, "w", **options) as store:
        store.put_many(images, np.arange(n))
    return images


def _epoch(loader: torch.utils.data.DataLoader, images: np.ndarray, layout: str = "hwc") -> list[int]:
    """Every batch checked against the stored images; the labels in the order they came."""
    seen: list[int] = []
    for batch, labels in loader:
        assert batch.dtype == torch.uint8 and labels.dtype == torch.int64 and len(batch) == len(labels)
        hwc = batch.permute(0, 2, 3, 1) if layout == "chw" else batch
        expected = images[labels.numpy()]
        np.testing.assert_array_equal(hwc.numpy(), expected.reshape(hwc.shape))
        seen.extend(labels.tolist())
    return seen


def _order(loader: torch.utils.data.DataLoader) -> object:
    """The loader's batch sampler (with the shared hand-off it is wrapped: loader.sampler.sampler)."""
    return loader.sampler.sampler if isinstance(loader, RingLoader) else loader.sampler


@pytest.fixture(scope="module")
def raw_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("raw")
    return {name: (root / name, _write(root / name, name)) for name in imgstore.installed_backends()}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("backend", imgstore.installed_backends())
def test_an_epoch_is_every_record_once(
    raw_stores: dict[str, tuple[Path, np.ndarray]], backend: str, workers: int
) -> None:
    path, images = raw_stores[backend]
    loader = make_loader(path, batch_size=BATCH, num_workers=workers, seed=3)
    assert len(loader) == 5
    seen = _epoch(loader, images)
    assert sorted(seen) == list(range(N))
    assert seen != list(range(N))  # shuffled


def test_encoded_store_decodes_in_the_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(20, 60, (90, 2))]
    path = tmp_path / "jpeg"
    with imgstore.open_store(path, "lmdb", "w", codec="jpeg", shape=None) as store:
        store.put_many(arrays, np.arange(90))
        expected, _ = store.get_many(range(90), size=(16, 24))
    with pytest.raises(InvalidOptionError, match="size="):
        make_loader(path)  # varied shapes do not stack without a size
    for workers in (0, 2):
        loader = make_loader(path, batch_size=32, num_workers=workers, size=(16, 24), seed=workers)
        seen = _epoch(loader, expected)
        assert sorted(seen) == list(range(90))


def test_order_is_a_function_of_seed_and_epoch(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=BATCH, num_workers=0, seed=5)
    first, second = _epoch(loader, images), _epoch(loader, images)  # iterating again: the next epoch
    assert first != second and sorted(first) == sorted(second)
    sampler = _order(loader)
    assert isinstance(sampler, RandomBatchSampler)
    sampler.set_epoch(1)
    assert _epoch(loader, images) == second
    again = make_loader(path, batch_size=BATCH, num_workers=2, seed=5)
    assert _epoch(again, images) == first  # the same seed and epoch: the same order, with workers too
    other = make_loader(path, batch_size=BATCH, num_workers=0, seed=6)
    assert _epoch(other, images) != first
    unseeded = [_epoch(make_loader(path, batch_size=BATCH, num_workers=0), images) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_batches_hold_ascending_indices() -> None:
    for batch in RandomBatchSampler(1000, 100, seed=0):
        assert np.all(np.diff(batch) > 0)


def test_block_order_covers_every_index_sequential_within_blocks() -> None:
    n, block, window = 40 * 256, 256, 4
    sampler = BlockShuffleSampler(n, 128, block_size=block, window=window, seed=2)
    batches = list(sampler)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(n))
    # each batch draws from at most `window` blocks (two when it straddles two windows: 2 * window)
    assert max(len(np.unique(b // block)) for b in batches) <= 2 * window
    # the epoch walks the store one window of blocks at a time
    windows = order // block
    for start in range(0, n - block * window, block * window):
        assert len(np.unique(windows[start : start + block * window])) <= window
    assert np.array_equal(batches[3], np.sort(sampler.order(0)[3 * 128 : 4 * 128]))
    fraction = same_block_fraction(sampler.order(0), block)  # the order before a batch is sorted
    assert 0.18 < fraction < 0.32  # about 1 / window
    uniform = same_block_fraction(RandomBatchSampler(n, 128, seed=2).order(0), block)
    assert uniform < 0.05
    assert not np.array_equal(np.concatenate(list(sampler)), np.concatenate(list(sampler)))  # epochs differ
    sampler.set_epoch(0)
    assert np.array_equal(np.concatenate(list(sampler)), order)


def test_block_order_through_the_loader(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["hdf5"]
    loader = make_loader(path, batch_size=BATCH, num_workers=2, order="block", block_size=32, seed=1)
    assert isinstance(_order(loader), BlockShuffleSampler)
    assert sorted(_epoch(loader, images)) == list(range(N))
    default = make_loader(path, order="block")
    assert isinstance(_order(default), BlockShuffleSampler) and _order(default).block_size >= 1


def test_sequential_order(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=BATCH, shuffle=False, num_workers=0)
    assert isinstance(_order(loader), SequentialBatchSampler)
    assert _epoch(loader, images) == list(range(N))


def test_channels_first(tmp_path: Path, raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["lmdb"]
    batch, labels = next(iter(make_loader(path, batch_size=BATCH, num_workers=2, layout="chw", seed=0)))
    assert batch.shape == (BATCH, 3, 6, 5)
    np.testing.assert_array_equal(batch.permute(0, 2, 3, 1).numpy(), images[labels.numpy()])
    gray = _write(tmp_path / "gray", "hdf5", 40, (6, 5))
    batch, labels = next(iter(make_loader(tmp_path / "gray", batch_size=8, num_workers=0, layout="chw")))
    assert batch.shape == (8, 1, 6, 5)
    np.testing.assert_array_equal(batch[:, 0].numpy(), gray[labels.numpy()])
    batch, _ = next(iter(make_loader(tmp_path / "gray", batch_size=8, num_workers=0)))
    assert batch.shape == (8, 6, 5, 1)
    assert StoreDataset(path, layout="chw")[4][0].shape == (3, 6, 5)
    assert StoreDataset(tmp_path / "gray", layout="chw")[4][0].shape == (1, 6, 5)
    assert StoreDataset(tmp_path / "gray", layout="hwc")[4][0].shape == (6, 5, 1)
    assert StoreDataset(tmp_path / "gray")[4][0].shape == (6, 5)  # as stored, as before
    image, label = StoreDataset(path, layout="chw", output="numpy")[9]
    np.testing.assert_array_equal(image, images[9].transpose(2, 0, 1))
    samples = torch.utils.data.DataLoader(StoreDataset(path, layout="chw"), batch_size=BATCH, num_workers=2)
    assert next(iter(samples))[0].shape == (BATCH, 3, 6, 5)


def test_pin_memory_and_persistent_workers(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=BATCH, num_workers=2, seed=4, pin_memory=True, persistent_workers=True)
    with warnings.catch_warnings():
        # CPU-only torch warns that there is no accelerator to pin for, and does not pin
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true but no accelerator")
        first = _epoch(loader, images)
        workers = loader._iterator._workers  # type: ignore[union-attr]
        second = _epoch(loader, images)
        assert loader._iterator._workers is workers  # type: ignore[union-attr]  # the same processes
    assert sorted(first) == sorted(second) == list(range(N)) and first != second


def test_drop_last_and_short_last_batch(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["hdf5"]
    loader = make_loader(path, batch_size=BATCH, num_workers=2, seed=8, drop_last=True)
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [BATCH] * (N // BATCH) and len(loader) == N // BATCH
    seen = _epoch(loader, images)
    assert len(set(seen)) == len(seen) == N // BATCH * BATCH
    assert [len(labels) for _, labels in make_loader(path, batch_size=BATCH, num_workers=0)][-1] == N % BATCH


def test_length_is_fixed_when_the_loader_is_made(tmp_path: Path) -> None:
    path = tmp_path / "grows"
    images = _write(path, "lmdb", 100)
    loader = make_loader(path, batch_size=32, num_workers=2, seed=0)
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images[:50], np.arange(100, 150))
    assert sorted(_epoch(loader, images)) == list(range(100))
    assert make_loader(path).sampler.n == 150  # type: ignore[attr-defined]  # a new loader sees the new records


def test_the_dataset_pickles_without_its_handle(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["hdf5"]
    dataset = make_loader(path).dataset
    batch, labels = dataset[[3, 1, 2]]
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._store is None and dataset._store is not None
    np.testing.assert_array_equal(copy[[3, 1, 2]][0].numpy(), batch.numpy())


@pytest.mark.slow  # spawned workers import torch anew: ~10-20 s on a busy 2-core machine
def test_spawned_workers(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["hdf5"]
    loader = make_loader(path, batch_size=128, num_workers=2, seed=0, multiprocessing_context="spawn")
    assert sorted(_epoch(loader, images)) == list(range(N))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"order": "zigzag"}, "order"),
        ({"shuffle": False, "order": "random"}, "contradicts"),
        ({"order": "sequential"}, "contradicts"),
        ({"layout": "nhwc"}, "layout"),
        ({"sampler": None}, "sampler"),
        ({"collate_fn": None}, "collate_fn"),
        ({"block_size": 8}, "block_size"),
        ({"order": "block", "block_size": 0}, "block_size"),
        ({"order": "block", "window": 0}, "window"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"size": (8, 8)}, "size"),
        ({"drop_last": "yes"}, "drop_last"),
        ({"transform": 3}, "transform"),
    ],
)
def test_bad_arguments(raw_stores: dict[str, tuple[Path, np.ndarray]], kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        make_loader(raw_stores["lmdb"][0], **kwargs)


def test_bad_store_and_epoch(tmp_path: Path, raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    with pytest.raises(imgstore.StoreNotFoundError):
        make_loader(tmp_path / "missing")
    loader = make_loader(raw_stores["lmdb"][0])
    with pytest.raises(InvalidOptionError, match="epoch"):
        loader.sampler.set_epoch(-1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("workers", [0, 2])
def test_shared_handoff_ring(raw_stores: dict[str, tuple[Path, np.ndarray]], workers: int) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(
        path, batch_size=BATCH, num_workers=workers, seed=2, handoff="shared", persistent_workers=workers > 0
    )
    plain = make_loader(path, batch_size=BATCH, num_workers=0, seed=2)
    first, second = _epoch(loader, images), _epoch(loader, images)  # each batch checked before the next is taken
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    assert first == _epoch(plain, images)  # the same order as the default hand-off
    kept = [(batch.clone(), labels.clone()) for batch, labels in loader]  # clones outlive the ring's reuse
    for batch, labels in kept:
        np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()])
    chw = make_loader(path, batch_size=BATCH, num_workers=workers, layout="chw", handoff="shared")
    assert sorted(_epoch(chw, images, "chw")) == list(range(N))


def test_shared_handoff_of_decoded_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(20, 50, (40, 2))]
    path = tmp_path / "jpeg"
    with imgstore.open_store(path, "hdf5", "w", codec="jpeg", shape=None, image_mode="RGB") as store:
        store.put_many(arrays, np.arange(40))
        expected, _ = store.get_many(range(40), size=(12, 16))
    loader = make_loader(path, batch_size=16, num_workers=2, size=(12, 16), handoff="shared")
    assert sorted(_epoch(loader, expected)) == list(range(40))


def test_shared_handoff_keeps_every_batch_held(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=16, num_workers=2, seed=1)  # handoff="auto": the ring
    assert isinstance(loader, RingLoader)
    held = list(loader)  # 19 batches kept, more than the ring has slots: the rest take torch's hand-off
    assert len(held) > loader.ring.slots
    for batch, labels in held:
        np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()])
    assert sorted(label for _, labels in held for label in labels.tolist()) == list(range(N))
    del held, batch, labels
    slots = {images.data_ptr() for images in loader.ring.images}
    for batch, labels in loader:  # a loop that lets each batch go is served from the ring's slots
        assert batch.data_ptr() in slots
        np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()])
    assert isinstance(make_loader(path, handoff="torch"), torch.utils.data.DataLoader)
    assert not isinstance(make_loader(path, handoff="torch"), RingLoader)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"handoff": "pipes"}, "handoff"),
        ({"handoff": "shared", "transform": lambda x: x}, "transform"),
        ({"handoff": "shared", "pin_memory": True}, "pin_memory"),
    ],
)
def test_bad_handoff(raw_stores: dict[str, tuple[Path, np.ndarray]], kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        make_loader(raw_stores["lmdb"][0], **kwargs)


def test_shared_handoff_across_broken_and_concurrent_passes(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    path, images = raw_stores["hdf5"]
    persistent = make_loader(path, batch_size=16, num_workers=2, seed=3, persistent_workers=True)
    for _ in range(3):  # a pass broken off after two batches: its workers' batches in flight are drained
        for count, (batch, labels) in enumerate(persistent):
            np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()])
            if count == 1:
                break
    assert sorted(_epoch(persistent, images)) == list(range(N))
    loader = make_loader(path, batch_size=16, num_workers=2, seed=3)
    first, second = iter(loader), iter(loader)  # two passes at once, each with its own workers
    seen: list[int] = []
    for (a, a_labels), (b, b_labels) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.numpy(), images[a_labels.numpy()])
        np.testing.assert_array_equal(b.numpy(), images[b_labels.numpy()])
        seen.extend(b_labels.tolist())
    assert sorted(seen) == list(range(N))


def test_shared_handoff_keeps_a_batch_held_by_its_storage_alone(raw_stores: dict[str, tuple[Path, np.ndarray]]) -> None:
    # torch's Python storage object (tensor.untyped_storage(), .storage()) holds no use count of it
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=16, num_workers=2, seed=5)
    assert isinstance(loader, RingLoader)
    held = [(batch.untyped_storage(), batch.shape, labels.clone()) for batch, labels in loader]
    for storage, shape, labels in held:
        batch = torch.empty(0, dtype=torch.uint8).set_(storage)[: int(np.prod(shape))].view(shape)
        np.testing.assert_array_equal(batch.numpy(), images[labels.numpy()])
    del held, storage, batch
    slots = {images.data_ptr() for images in loader.ring.images}
    assert all(batch.data_ptr() in slots for batch, _ in loader)  # dropped storages free their slots


def _to_float(batch: torch.Tensor) -> torch.Tensor:  # module level: workers pickle it under spawn too
    return batch.float() / 255


def _to_numpy(batch: torch.Tensor) -> np.ndarray:
    return batch.numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_transform_runs_on_each_batch_and_must_return_a_tensor(
    raw_stores: dict[str, tuple[Path, np.ndarray]], workers: int
) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=BATCH, shuffle=True, num_workers=workers, transform=_to_float)
    seen = []
    for batch, labels in loader:
        assert batch.dtype == torch.float32
        np.testing.assert_allclose(batch.numpy(), images[labels.numpy()] / 255, rtol=1e-6)
        seen.extend(labels.tolist())
    assert sorted(seen) == list(range(N))
    bad = make_loader(path, batch_size=BATCH, num_workers=workers, transform=_to_numpy)
    with pytest.raises(InvalidOptionError, match="transform must return a tensor .* got ndarray"):
        next(iter(bad))


def test_shared_handoff_keeps_the_profiler_range_while_profiling(
    raw_stores: dict[str, tuple[Path, np.ndarray]],
) -> None:
    path, images = raw_stores["lmdb"]
    loader = make_loader(path, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    assert isinstance(loader, RingLoader)
    assert sorted(_epoch(loader, images)) == list(range(N))  # without a profiler: torch's inner step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        assert sorted(_epoch(loader, images)) == list(range(N))
    ranges = [event.key for event in profiler.key_averages() if event.key.startswith("enumerate(DataLoader)")]
    assert ranges, "the DataLoader's per-batch profiler range is missing under a profiler"
