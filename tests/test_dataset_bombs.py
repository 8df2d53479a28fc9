"""Hostile dataset files: each is refused with DatasetError, at a memory cost that follows the bytes really in it.

The hostile loads run in a child process under ``RLIMIT_AS`` (1.5 GiB above its baseline) with
tracemalloc on, which sees numpy's and Python's allocations: the child reports how the load ended
(a DatasetError, "loaded", or another exception) and its peak, and a crash shows as its exit status.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from imgstore.datasets import load_cifar10, load_fashion_mnist
from imgstore.datasets.cifar10 import _read_python_batch
from imgstore.datasets.fashion_mnist import read_idx
from imgstore.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
LIMIT = 1536 * MiB  # address space the child may add to its baseline

_PROBE = r"""
import resource, sys, tracemalloc
from pathlib import Path

import numpy  # loaded before the limit: its own mappings are not the loader's

from imgstore.datasets.cifar10 import _read_python_batch
from imgstore.datasets.fashion_mnist import read_idx
from imgstore.errors import DatasetError

kind, path, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
with open("/proc/self/status") as status:
    baseline = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
_, hard = resource.getrlimit(resource.RLIMIT_AS)
soft = baseline + limit
resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
tracemalloc.start()
try:
    _read_python_batch(path) if kind == "cifar" else read_idx(path, int(kind))
    outcome = "loaded"
except DatasetError as exc:
    outcome = f"DatasetError: {exc}"
except BaseException as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(tracemalloc.get_traced_memory()[1])
print(outcome)
"""


def load_in_child(kind: str, path: Path) -> tuple[str, int]:
    """How loading ``path`` ended in a memory-limited child, and its peak; ``kind``: "cifar" or an IDX file's dims."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, kind, str(path), str(LIMIT)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"the loader crashed (exit status {result.returncode}): {result.stderr[-2000:]}"
    peak, outcome = result.stdout.splitlines()[-2:]
    return outcome, int(peak)


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """In-process tracemalloc peak of the block, in bytes (the list holds it afterwards)."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the memory-limited child reads /proc/self/status and RLIMIT_AS"
)

# ---------------------------------------------------------------------- CIFAR-10 python batches


class Call:
    """Pickles as the call ``func(*args)`` (then ``__setstate__(state)`` if given): what a hostile file does."""

    def __init__(self, func: Callable[..., object], *args: object, state: object = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[object, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 1.26
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


def batch(data: object, labels: object) -> bytes:
    return pickle.dumps({b"batch_label": b"hostile", b"labels": labels, b"data": data, b"filenames": []}, protocol=2)


def ndarray_call() -> bytes:
    # 600 KB of labels, and numpy.ndarray(shape, dtype) called directly: 879 MiB of uninitialised "images".
    return batch(Call(np.ndarray, (300_000, 3072), "u1"), [0] * 300_000)


def reconstruct_shape(module: str) -> Callable[[], bytes]:
    def make() -> bytes:
        # numpy's own _reconstruct asked for the whole array at once: 146 MiB from 100 KB.
        data = batch(Call(_reconstruct, np.ndarray, (50_000, 3072), b"B"), [0] * 50_000)
        return data.replace(b"cnumpy._core.multiarray\n", f"c{module}\n".encode())

    return make


def state_shape_mismatch() -> bytes:
    # A proper empty array whose state declares 50 000 rows but carries 100 bytes.
    state = (1, (50_000, 3072), np.dtype("u1"), False, bytes(100))
    return batch(Call(_reconstruct, np.ndarray, (0,), b"b", state=state), [0] * 50_000)


def object_dtype() -> bytes:
    # An object array whose state lists fewer items than its shape: numpy reads past the list (a crash).
    state = (1, (2, 3072), np.dtype("O"), False, [0])
    return batch(Call(_reconstruct, np.ndarray, (0,), b"b", state=state), [0, 0])


def bytes8_claim() -> bytes:
    # BINBYTES8 announcing 1 GiB followed by 10 bytes: the unpickler allocates before it reads.
    return b"\x80\x04\x8e" + (1 << 30).to_bytes(8, "little") + b"x" * 10


def memo_index() -> bytes:
    # LONG_BINPUT at index 2**25: the unpickler grows its memo table to 2**26 entries (512 MiB).
    return b"\x80\x02N" + b"r" + (1 << 25).to_bytes(4, "little") + b"."


def encode_repeat() -> bytes:
    # 1 MiB of text memoized once, turned into bytes 200 times by _codecs.encode: 200 MiB from 1 MiB.
    text = b"a" * MiB
    head = (
        b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text + b"q\x01X\x06\x00\x00\x00latin1q\x02"
    )
    return head + b"(" + b"h\x00h\x01h\x02\x86R" * 200 + b"l."


def many_lists() -> bytes:
    # 2 million empty lists, one byte each: 150 MiB of list objects from 2 MB.
    return b"\x80\x02(" + b"]" * 2_000_000 + b"l."


def deep_tuple_key() -> bytes:
    # A dict key nested a million tuples deep: hashing it overflows the C stack.
    return b"\x80\x02}N" + b"\x85" * 1_000_000 + b"K\x00s."


def deep_labels() -> bytes:
    # b'labels' a list nested 100 000 deep, with a proper b'data'.
    good = batch(np.zeros((1, 3072), np.uint8), [0])
    assert good.endswith(b"u.")
    depth = 100_000
    return good[:-2] + b"U\x06labels" + b"]" * depth + b"a" * (depth - 1) + b"u."


@needs_linux
@pytest.mark.parametrize(
    "make, bound",
    [
        pytest.param(ndarray_call, 32 * MiB, id="ndarray-call"),
        pytest.param(reconstruct_shape("numpy._core.multiarray"), 32 * MiB, id="reconstruct-shape-numpy2"),
        pytest.param(reconstruct_shape("numpy.core.multiarray"), 32 * MiB, id="reconstruct-shape-numpy1"),
        pytest.param(state_shape_mismatch, 32 * MiB, id="state-shape-mismatch"),
        pytest.param(object_dtype, 32 * MiB, id="object-dtype"),
        pytest.param(bytes8_claim, 32 * MiB, id="bytes8-claim"),
        pytest.param(memo_index, 32 * MiB, id="memo-index"),
        pytest.param(encode_repeat, 32 * MiB, id="encode-repeat"),
        pytest.param(many_lists, 48 * MiB, id="many-lists"),
        pytest.param(deep_tuple_key, 32 * MiB, id="deep-tuple-key"),
        pytest.param(deep_labels, 32 * MiB, id="deep-labels"),
    ],
)
def test_hostile_cifar10_batch_is_refused_cheaply(tmp_path: Path, make: Callable[[], bytes], bound: int) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(make())
    outcome, peak = load_in_child("cifar", path)
    assert outcome.startswith(f"DatasetError: {path}"), outcome  # the message names the file
    assert peak < bound, f"peak {peak / MiB:.0f} MiB for a file of {path.stat().st_size / MiB:.1f} MiB"


def test_hostile_cifar10_batch_through_load_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(reconstruct_shape("numpy.core.multiarray")())
    with traced_peak() as peak, pytest.raises(DatasetError, match="_reconstruct"):
        load_cifar10(tmp_path, "test")
    assert peak[0] < 32 * MiB


FORTRAN = (1, (1, 3072), np.dtype("u1"), True, bytes(3072))  # a column-major array's state


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param(batch(np.zeros((1, 3072), np.uint8), [0] * 60_001), "60000", id="too-many-labels"),
        pytest.param(batch(np.zeros((1, 3072), np.uint8), [[0]]), "integers 0-9", id="nested-labels"),
        pytest.param(batch(np.zeros((1, 3072), np.uint8), [True]), "integers 0-9", id="bool-labels"),
        pytest.param(batch(np.zeros((1, 3072), np.uint16), [0]), "uint8", id="uint16-data"),
        pytest.param(batch(np.zeros((2, 3072), np.uint8), [0]), r"\[1, 3072\]", id="rows-not-labels"),
        pytest.param(batch(Call(_reconstruct, np.ndarray, (0,), b"B"), []), "_reconstruct", id="reconstruct-dtype"),
        pytest.param(batch(Call(np.dtype, "u1", False, True, state={"x": 1}), []), "numpy.dtype", id="dtype-state"),
        pytest.param(batch(Call(_reconstruct, np.ndarray, (0,), b"b", state=FORTRAN), [0]), "C-ordered", id="fortran"),
        pytest.param(b"\x80\x02cnumpy\ndtype\n}b.", "refusing to set the state", id="build-on-a-global"),
        pytest.param(b"\x80\x02cnumpy\nndarray\n)\x81.", "NEWOBJ", id="newobj"),
    ],
)
def test_cifar10_batch_must_be_what_the_real_files_hold(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        _read_python_batch(path)


def test_cifar10_files_larger_than_a_batch_can_be_are_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgstore.datasets import cifar10

    path = tmp_path / "test_batch"
    path.write_bytes(batch(np.zeros((3, 3072), np.uint8), [0, 1, 2]))
    monkeypatch.setattr(cifar10, "_MAX_FILE_BYTES", path.stat().st_size - 1)  # the real cap: 369 MB
    with pytest.raises(DatasetError, match="too large for a CIFAR-10 batch"):
        _read_python_batch(path)
    binary = tmp_path / "test_batch.bin"
    np.zeros((3, 3073), np.uint8).tofile(binary)
    monkeypatch.setattr(cifar10, "_MAX_IMAGES", 2)
    with pytest.raises(DatasetError, match="more than the 2 records"):
        cifar10._read_binary_batch(binary)


class CPickleWriter:
    """Writes opcodes as Python 2's cPickle did, numbering the memo from 1 as cPickle does."""

    def __init__(self) -> None:
        self.out, self.memo = [b"\x80\x02"], 0

    def put(self, *chunks: bytes) -> CPickleWriter:
        self.memo += 1
        self.out += [*chunks, b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)]
        return self

    def raw(self, *chunks: bytes) -> CPickleWriter:
        self.out += chunks
        return self

    @staticmethod
    def str(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value if len(value) < 256 else b"T" + struct.pack("<i", len(value)) + value

    @staticmethod
    def int(value: int) -> bytes:
        if value < 256:
            return b"K" + bytes([value])
        return b"M" + struct.pack("<H", value) if value < 65536 else b"J" + struct.pack("<i", value)


def cpickle_batch(rows: np.ndarray, labels: list[int], name: bytes) -> bytes:
    """A batch as Python 2's cPickle and numpy 1.x wrote the real files: GLOBALs naming numpy.core, memo from 1,
    ``dtype('u1', 0, 1)`` with int flags, the pixels one BINSTRING, the dict in Python 2's key order."""
    w, s, i = CPickleWriter(), CPickleWriter.str, CPickleWriter.int
    w.put(b"}").raw(b"(").put(s(b"data")).put(b"cnumpy.core.multiarray\n_reconstruct\n").put(b"cnumpy\nndarray\n")
    w.raw(i(0), b"\x85").put(s(b"b")).raw(b"\x87").put(b"R")  # _reconstruct(ndarray, (0,), 'b')
    w.raw(b"(", i(1), i(len(rows)), i(3072), b"\x86").put(b"cnumpy\ndtype\n").put(s(b"u1"))
    w.raw(i(0), i(1), b"\x87").put(b"R")  # dtype('u1', 0, 1)
    w.raw(b"(", i(3)).put(s(b"|")).raw(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff", i(0), b"t").raw(b"b")
    w.raw(b"\x89").put(s(rows.tobytes())).raw(b"t").raw(b"b")  # state (1, shape, dtype, False, data)
    w.put(s(b"labels")).put(b"]").raw(b"(", *(i(label) for label in labels), b"e")
    w.put(s(b"batch_label")).put(s(name))
    w.put(s(b"filenames")).put(b"]").raw(b"(")
    for k in range(len(labels)):
        w.put(s(f"img_{k}.png".encode()))
    return b"".join(w.raw(b"e", b"u", b".").out)


def test_cifar10_cpickle_bytes_as_in_the_real_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows, labels = rng.integers(0, 256, (300, 3072), dtype=np.uint8), rng.integers(0, 10, 300).tolist()
    content = cpickle_batch(rows, labels, b"testing batch 1 of 1")
    assert content.startswith(b"\x80\x02}q\x01(U\x04dataq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03")
    assert pickle.loads(content, encoding="bytes")[b"labels"] == labels  # what the plain unpickler reads
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(content)
    images, got_labels = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got_labels, labels)


# ---------------------------------------------------------------------- IDX files (Fashion-MNIST)


def idx_header(*shape: int) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(size.to_bytes(4, "big") for size in shape)


def zeros_gzip(gib: float) -> bytes:
    """Gzip members inflating to ``gib`` GiB of zeros in about 1 MB: members concatenate into one stream."""
    member = gzip.compress(bytes(16 * MiB), compresslevel=9)
    return member * int(gib * 64)


@needs_linux
def test_gzip_claiming_more_than_it_can_hold_is_refused_before_decompressing(tmp_path: Path) -> None:
    # 1 MB of gzip inflating to 1 GiB, whose header claims 2.1 GB: the old loader reached 2 GiB before refusing.
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(2_700_000, 28, 28)) + zeros_gzip(1))
    outcome, peak = load_in_child("3", path)
    assert outcome.startswith(f"DatasetError: {path}: header says (2700000, 28, 28)"), outcome
    assert "can hold at most" in outcome
    assert peak < 8 * MiB


@needs_linux
def test_gzip_inflating_past_its_header_is_refused_at_the_announced_size(tmp_path: Path) -> None:
    # One 28x28 image announced, then 1 GiB of "trailing" zeros: only 784 + 1 bytes are inflated.
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(1, 28, 28) + bytes(784)) + zeros_gzip(1))
    outcome, peak = load_in_child("3", path)
    assert outcome.startswith(f"DatasetError: {path}: header says (1, 28, 28) but the file holds more than"), outcome
    assert peak < 8 * MiB


def test_absurd_idx_sizes_are_refused_before_reading_the_data(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    for shape in [(10**7 + 1,), (10, 10**4 + 1)]:
        path.write_bytes(idx_header(*shape) + bytes(8 * MiB))
        with traced_peak() as peak, pytest.raises(DatasetError, match=f"{path.name}.*absurd"):
            read_idx(path, len(shape))
        assert peak[0] < MiB


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_idx_holding_less_than_its_header_says_is_refused_cleanly(tmp_path: Path, gzipped: bool) -> None:
    # 47 MB announced, 200 KB (incompressible, so within what the gzip could hold) really there.
    data = idx_header(60_000, 28, 28) + np.random.default_rng(0).bytes(200_000)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gzipped else ""))
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with traced_peak() as peak, pytest.raises(DatasetError, match="header says"):
        read_idx(path, 3)
    assert peak[0] < 4 * MiB  # what is there (and the read chunk), never the 47 MB announced


def test_fashion_mnist_image_size_is_checked_before_the_data(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_header(9_000, 1000, 1000) + bytes(MiB))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_header(1) + bytes(1))
    with traced_peak() as peak, pytest.raises(DatasetError, match="28x28"):
        load_fashion_mnist(tmp_path, "test")
    assert peak[0] < MiB
