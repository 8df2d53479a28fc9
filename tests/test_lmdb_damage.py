"""LMDB backend: a damaged data.mdb is a CorruptStoreError or intact data, never a killed process.

liblmdb aborts (SIGABRT on a failed assertion) or faults (SIGBUS, SIGSEGV) on damaged pages, so
imgstore checks them first (imgstore/backends/lmdb_pages.py). Every case here runs in a worker
process, restarted when one kills it, so that a crash is a failed test and not the end of the run:
it opens the damaged store, reads everything every way and verifies it, then appends and reads again.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest

import imgstore
from imgstore.backends import lmdb_pages
from imgstore.backends.lmdb import LmdbStore

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096

# The worker: one JSON case a line in, one JSON outcome a line out.
_WORKER = """
import hashlib, json, sys
import numpy as np
import imgstore

OPTIONS = {
    "enc": {"codec": "png", "shape": None},  # one key a record: branch pages from ~40 small ones
    "raw1": {"block_bytes": 1},  # raw pixels, one record a block: likewise
    "raw": {},  # raw pixels in 64 KiB blocks: a value on overflow pages, rewritten by an append
}


def images(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "raw1":
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    if kind == "raw":
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out = []
    for i in range(n):  # small PNGs inside the leaf pages; every tenth on overflow pages of its own
        h, w = (40, 40) if i % 10 == 3 else rng.integers(4, 12, 2)
        out.append(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
    return out


def build(path, kind):
    data = images(kind, 60, 1)
    with imgstore.open_store(path, "lmdb", "w", **OPTIONS[kind]) as store:
        store.put_many(data[:45], np.arange(45))  # two commits: the second frees pages (a free list)
        store.put_many(data[45:], np.arange(45, 60))


def read_all(path):
    with imgstore.open_store(path) as store:
        n = len(store)
        got, labels = store.get_many(range(n))
        order = np.random.default_rng(0).permutation(n)
        some, some_labels = store.get_many(order)
        singles = [store.get(i) for i in range(n)]
        same = all(
            np.array_equal(got[i], some[k]) and labels[i] == some_labels[k] for k, i in enumerate(order.tolist())
        ) and all(np.array_equal(got[i], image) and labels[i] == label for i, (image, label) in enumerate(singles))
        if not same:
            return "WRONG DATA: the reads disagree"
        store.verify()
    digest = hashlib.sha256(labels.tobytes())
    for image in got:
        digest.update(repr(image.shape).encode() + image.tobytes())
    return "ok " + digest.hexdigest()[:16]


def append(path, kind):
    with imgstore.open_store(path, mode="a") as store:
        store.put_many(images(kind, 10, 2), np.arange(60, 70))
    return read_all(path)


def outcome(step):
    try:
        return step()
    except imgstore.CorruptStoreError:
        return "corrupt"
    except imgstore.ImgStoreError as exc:
        return f"error {type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"FOREIGN {type(exc).__name__}: {exc}"


for line in sys.stdin:
    case = json.loads(line)
    path, kind = case["path"], case["kind"]
    if case["op"] == "build":
        build(path, kind)
        result = "built"
    else:
        result = {"read": outcome(lambda: read_all(path)), "write": outcome(lambda: append(path, kind))}
    print(json.dumps(result), flush=True)
"""


class _Worker:
    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def ask(self, case: dict[str, str], timeout: float = 60) -> Any:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(_WORKER)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()  # an empty line: the worker died
        if line:
            return json.loads(line)
        code = self.process.wait(timeout)
        died = signal.Signals(-code).name if code < 0 else f"exit {code}"
        return {"read": f"CRASH ({died})", "write": f"CRASH ({died})"}

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker() -> Iterator[_Worker]:
    runner = _Worker()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, worker: _Worker) -> dict[str, tuple[Path, dict[str, str]]]:
    """A store of each kind, and what reading it (then appending to it) gives."""
    stores = {}
    for kind in ("enc", "raw1", "raw"):
        path = tmp_path_factory.mktemp("pristine") / kind
        assert worker.ask({"op": "build", "path": str(path), "kind": kind}) == "built"
        copy = path.with_name(kind + "-copy")
        shutil.copytree(path, copy)
        expected = worker.ask({"op": "read", "path": str(copy), "kind": kind})
        assert expected["read"].startswith("ok ") and expected["write"].startswith("ok "), expected
        stores[kind] = path, expected
    return stores


def _data_file(store: Path) -> Path:
    (data,) = store.glob("lmdb-*/data.mdb")
    return data


def _run_case(
    worker: _Worker, pristine: tuple[Path, dict[str, str]], kind: str, damage: Callable[[bytearray], None]
) -> dict[str, str]:
    store, _ = pristine
    case = store.with_name(kind + "-case")
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(store, case)
    data = _data_file(case)
    content = bytearray(data.read_bytes())
    damage(content)
    data.write_bytes(bytes(content))
    result: dict[str, str] = worker.ask({"op": "read", "path": str(case), "kind": kind})
    return result


def _judge(result: dict[str, str], expected: dict[str, str], what: str, bad: list[str], counts: Counter[str]) -> None:
    """Each step gives the intact records or a CorruptStoreError."""
    for step in ("read", "write"):
        got = result[step]
        counts[f"{step} {'intact' if got == expected[step] else got}"] += 1
        if got not in (expected[step], "corrupt"):
            bad.append(f"{what}: {step} -> {got}")


def _current_meta(content: bytes | bytearray) -> int:
    """The offset of the meta page LMDB reads: the one with the higher transaction id."""
    return PAGE * int(struct.unpack_from("<Q", content, PAGE + 144)[0] > struct.unpack_from("<Q", content, 144)[0])


def _tree(store: Path) -> dict[str, int]:
    env = lmdb.open(str(_data_file(store).parent), readonly=True, lock=False)
    try:
        stat = env.stat()
        return {key: int(stat[key]) for key in ("depth", "branch_pages", "leaf_pages", "entries")}
    finally:
        env.close()


# ---------------------------------------------------------------------- every page, three ways


def _zero(page: int) -> Callable[[bytearray], None]:
    def damage(content: bytearray) -> None:
        content[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)

    return damage


def _random(page: int) -> Callable[[bytearray], None]:
    def damage(content: bytearray) -> None:
        content[page * PAGE : (page + 1) * PAGE] = np.random.default_rng(page).bytes(PAGE)

    return damage


def _flip(page: int, seed: int) -> Callable[[bytearray], None]:
    def damage(content: bytearray) -> None:
        rng = np.random.default_rng([page, seed])
        # One bit of the header and first nodes (where the structure is), one anywhere in the page.
        for at in (int(rng.integers(0, 64)), int(rng.integers(0, PAGE))):
            content[page * PAGE + at] ^= 1 << int(rng.integers(0, 8))

    return damage


@pytest.mark.parametrize("kind", ["enc", "raw1"])
def test_every_page_zeroed_random_or_flipped(
    kind: str, worker: _Worker, pristine: dict[str, tuple[Path, dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    store, expected = pristine[kind]
    tree = _tree(store)
    assert tree["depth"] >= 2 and tree["branch_pages"] >= 1, tree  # what aborted liblmdb: branch pages
    pages = _data_file(store).stat().st_size // PAGE
    bad: list[str] = []
    counts: Counter[str] = Counter()
    for page in range(pages):
        for name, damage in (("zeroed", _zero(page)), ("random", _random(page)), ("flipped", _flip(page, 0))):
            _judge(_run_case(worker, pristine[kind], kind, damage), expected, f"page {page} {name}", bad, counts)
    with capsys.disabled():
        print(f"\n{kind}: {pages} pages x 3 damages: {dict(sorted(counts.items()))}")
    assert not bad, "\n".join(bad[:20])
    assert counts["read corrupt"] > pages  # the damage is found (most pages hold structure or records)


def test_many_bit_flips_in_structure_pages(worker: _Worker, pristine: dict[str, tuple[Path, dict[str, str]]]) -> None:
    """Single flipped bits in the headers and nodes of every page that is not a value's."""
    store, expected = pristine["enc"]
    pages = _data_file(store).stat().st_size // PAGE
    content = _data_file(store).read_bytes()
    structure = [p for p in range(pages) if struct.unpack_from("<H", content, p * PAGE + 10)[0] in (1, 2, 8)]
    bad: list[str] = []
    counts: Counter[str] = Counter()
    for page in structure:
        for seed in range(1, 6):
            _judge(_run_case(worker, pristine["enc"], "enc", _flip(page, seed)), expected, f"page {page}", bad, counts)
    assert not bad, "\n".join(bad[:20])


# ---------------------------------------------------------------------- meta pages

_META_FIELDS = {  # offsets in a meta page (MDB_page header, then MDB_meta)
    "magic": (16, "<I"),
    "free flags": (44, "<H"),
    "free depth": (46, "<H"),
    "free entries": (72, "<Q"),
    "free root": (80, "<Q"),
    "main flags": (92, "<H"),
    "main depth": (94, "<H"),
    "main branch pages": (96, "<Q"),
    "main leaf pages": (104, "<Q"),
    "main overflow pages": (112, "<Q"),
    "main entries": (120, "<Q"),
    "main root": (128, "<Q"),
    "last page": (136, "<Q"),
    "txnid": (144, "<Q"),
}


@pytest.mark.parametrize("slot", ["current", "previous"])
@pytest.mark.parametrize("field", sorted(_META_FIELDS))
def test_damaged_meta_fields(
    slot: str, field: str, worker: _Worker, pristine: dict[str, tuple[Path, dict[str, str]]]
) -> None:
    store, expected = pristine["enc"]
    offset, fmt = _META_FIELDS[field]
    current = _current_meta(_data_file(store).read_bytes()) // PAGE
    meta = current if slot == "current" else 1 - current
    bad: list[str] = []
    counts: Counter[str] = Counter()
    for change in (lambda v: v + 1, lambda v: v ^ (1 << 15), lambda v: 2, lambda v: 0):

        def damage(content: bytearray, change: Callable[[int], int] = change) -> None:
            at = meta * PAGE + offset
            value = struct.unpack_from(fmt, content, at)[0]
            struct.pack_into(fmt, content, at, change(value) % (1 << (8 * struct.calcsize(fmt))))

        _judge(_run_case(worker, pristine["enc"], "enc", damage), expected, f"{slot} meta {field}", bad, counts)
    assert not bad, "\n".join(bad)
    if slot == "current" and field not in ("txnid",):
        assert counts["read corrupt"] >= 2, counts  # liblmdb reads these: changing them is found


# ---------------------------------------------------------------------- free lists and overflow headers


def _free_list(content: bytes | bytearray) -> tuple[int, int]:
    """(offset of the first free-page list's count, its count) in a store whose free tree is one leaf page."""
    meta = _current_meta(content)
    depth, root = struct.unpack_from("<H", content, meta + 46)[0], struct.unpack_from("<Q", content, meta + 80)[0]
    assert depth == 1, "the free-page tree is one leaf page"
    node = root * PAGE + struct.unpack_from("<H", content, root * PAGE + 16)[0]
    lo, hi, flags, ksize = struct.unpack_from("<4H", content, node)
    assert flags == 0 and ksize == 8, "a list inside the leaf page"
    at = node + 8 + ksize
    return at, struct.unpack_from("<Q", content, at)[0]


@pytest.mark.parametrize("change", ["a live page", "out of the file", "out of order", "count too big", "count 0"])
def test_damaged_free_list(change: str, worker: _Worker, pristine: dict[str, tuple[Path, dict[str, str]]]) -> None:
    """A writer takes pages from the free lists: one that lists a live page would overwrite records."""
    store, expected = pristine["enc"]
    at, count = _free_list(_data_file(store).read_bytes())
    assert count >= 2

    def damage(content: bytearray) -> None:
        if change == "a live page":  # the records' B-tree's root: the list holds just it
            root = struct.unpack_from("<Q", content, _current_meta(content) + 128)[0]
            struct.pack_into("<2Q", content, at, 1, root)
        elif change == "out of the file":
            struct.pack_into("<Q", content, at + 8, 1 << 40)
        elif change == "out of order":
            first, second = struct.unpack_from("<2Q", content, at + 8)
            struct.pack_into("<2Q", content, at + 8, second, first)
        elif change == "count too big":
            struct.pack_into("<Q", content, at, 1 << 40)
        else:
            struct.pack_into("<Q", content, at, 0)  # fewer pages listed than room for: a leak, not damage

    result = _run_case(worker, pristine["enc"], "enc", damage)
    if change == "count 0":
        assert result == expected
    else:
        assert result == {"read": "corrupt", "write": "corrupt"}


def test_damaged_overflow_header_of_a_rewritten_block(
    worker: _Worker, pristine: dict[str, tuple[Path, dict[str, str]]]
) -> None:
    """An append rewrites the last, partly filled block: liblmdb frees as many overflow pages as their header
    says (a wrong count frees pages in use, or leaks), and asserts when its flags say dirty."""
    store, expected = pristine["raw"]
    content = _data_file(store).read_bytes()
    meta = _current_meta(content)
    assert struct.unpack_from("<H", content, meta + 94)[0] == 1, "the records' tree is one leaf page"
    root = struct.unpack_from("<Q", content, meta + 128)[0]
    lower = struct.unpack_from("<H", content, root * PAGE + 12)[0]
    last = root * PAGE + struct.unpack_from("<H", content, root * PAGE + lower - 2)[0]  # the last node
    assert struct.unpack_from("<H", content, last + 4)[0] == lmdb_pages.F_BIGDATA
    first = struct.unpack_from("<Q", content, last + 16)[0]
    # P_OVERFLOW|P_DIRTY; wrong page counts (the value is 14 pages).
    for flags, pages in ((0x14, None), (0x04, 1), (0x04, 3), (0x04, 40), (0x04, 1 << 20)):

        def damage(content: bytearray, flags: int = flags, pages: int | None = pages) -> None:
            struct.pack_into("<H", content, first * PAGE + 10, flags)
            if pages is not None:
                struct.pack_into("<I", content, first * PAGE + 12, pages)

        result = _run_case(worker, pristine["raw"], "raw", damage)
        # Reads need not look at the header (liblmdb 0.9.33 on checks its type).
        assert result["read"] in (expected["read"], "corrupt") and result["write"] == "corrupt", (flags, pages)


# ---------------------------------------------------------------------- cost: leaf pages checked as reads need them


def _snapshot(store: imgstore.Store) -> lmdb_pages.Snapshot:
    assert isinstance(store, LmdbStore)
    (pages,) = store._shared.snapshots.values()
    return pages


def test_leaf_pages_are_checked_by_the_reads_that_walk_them(tmp_path: Path) -> None:
    """A store of values smaller than half a page is nearly all leaf pages: opening it must not read them all."""
    n = 1300
    noise = np.random.default_rng(0).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)  # PNGs of ~1.8 KB: 2 a page
    with imgstore.open_store(tmp_path / "s", "lmdb", "w", codec="png", shape=None) as store:
        store.put_many(list(noise), np.arange(n))
    leaves = _tree(tmp_path / "s")["leaf_pages"]
    assert leaves > 2 * lmdb_pages.GROUP
    with imgstore.open_store(tmp_path / "s") as store:
        pages = _snapshot(store)
        assert pages.unchecked == leaves  # opening checked the branch pages only
        store.get(0)
        assert pages.unchecked == leaves - lmdb_pages.GROUP  # the group of the page read
        store.get_many(range(n))
        assert pages.unchecked == 0


_FAR_LEAF = """
import sys
import lmdb
from imgstore.backends.lmdb_pages import Snapshot
from imgstore.errors import CorruptStoreError

path = sys.argv[1]
env = lmdb.open(path, map_size=1 << 30)
with env.begin(write=True) as txn:
    for k in range(1400):
        txn.put(k.to_bytes(8, "big"), bytes(1500), append=True)
with env.begin() as txn:
    last = int(Snapshot(path + "/data.mdb", 4096, txn.id()).leaves[-1])
env.close()
with open(path + "/data.mdb", "r+b") as f:
    f.seek(last * 4096)
    f.write(bytes(4096))
env = lmdb.open(path, readonly=True, lock=False)
with env.begin() as txn:
    pages = Snapshot(path + "/data.mdb", 4096, txn.id())
    assert pages.unchecked > 0
    pages.check_key(0)
    assert txn.get((0).to_bytes(8, "big")) == bytes(1500)  # the damage is elsewhere
    try:
        pages.check_range(1300, 1399)
    except CorruptStoreError as exc:
        print(exc)
"""


def test_damage_in_a_leaf_page_no_read_has_walked_yet(tmp_path: Path) -> None:
    """Damage past the groups checked so far is found by the read that would walk it, not before, not after."""
    result = subprocess.run(
        [sys.executable, "-c", _FAR_LEAF, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "(records' leaf page) is damaged (another page's number)" in result.stdout


# ---------------------------------------------------------------------- no false alarm


def test_stores_written_many_ways_pass_every_check(tmp_path: Path) -> None:
    """Appends in many commits, rewritten blocks, records of every size: every page passes (and lmdb's own
    verifier, where py-lmdb has one, agrees)."""
    rng = np.random.default_rng(3)
    for name, options, shape in (
        ("raw", {"block_bytes": 3000}, (16, 16, 3)),
        ("raw1", {"block_bytes": 1}, (24, 24, 3)),
        ("enc", {"codec": "png", "shape": None}, None),
    ):
        path = tmp_path / name
        with imgstore.open_store(path, "lmdb", "w", **options) as store:
            for _ in range(40):
                k = int(rng.integers(1, 12))
                if shape is None:
                    sides = rng.integers(4, 70, (k, 2))
                    batch: Any = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in sides]
                else:
                    batch = rng.integers(0, 256, (k, *shape), dtype=np.uint8)
                store.put_many(batch, np.zeros(k, np.int64))
        with imgstore.open_store(path) as store:
            store.verify()
            pages = _snapshot(store)
            pages.check_range(0, 1 << 62)
            assert pages.unchecked == 0
        _lmdb_verify_agrees(path)


def test_big_free_lists_pass_every_check(tmp_path: Path) -> None:
    """A reader that keeps an old snapshot keeps the pages freed since from reuse: the free-page tree grows
    branch pages; then the writer takes from its lists and saves them again (overflow pages, spare room)."""
    rng = np.random.default_rng(4)
    path = tmp_path / "s"
    with imgstore.open_store(path, "lmdb", "w", sync=False) as writer:
        writer.put_many(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), np.zeros(50, np.int64))
        with imgstore.open_store(path) as reader:
            assert isinstance(reader, LmdbStore)
            with reader._env.begin():
                for _ in range(250):  # each rewrites the last block: its old pages are freed
                    writer.put_many(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), np.zeros(3, np.int64))
                content = _data_file(path).read_bytes()
                assert struct.unpack_from("<H", content, _current_meta(content) + 46)[0] >= 2  # free tree depth
        for _ in range(100):
            n = int(rng.integers(1, 40))
            writer.put_many(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.zeros(n, np.int64))
    with imgstore.open_store(path) as store:
        store.verify()
        assert _snapshot(store).unchecked == 0  # verify() read every leaf page: the meta's counts were checked too
    _lmdb_verify_agrees(path)


def _lmdb_verify_agrees(path: Path) -> None:
    try:
        from lmdb.verify import verify
    except ImportError:  # py-lmdb < 3 has no verifier
        return
    assert verify(str(_data_file(path).parent)) == []  # type: ignore[no-untyped-call]
