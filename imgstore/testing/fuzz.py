"""``DamageDetection``: damaged stores fail cleanly, and no read returns damaged data as good.

The fuzz test mutates and truncates every kind of file, then opens and reads in a subprocess.
Allowed outcomes: the store reads back exactly the original records, or an imgstore error is
raised (``CorruptStoreError`` and its kin). Not allowed: a crash (signal), a hang, any other
exception, or any read (scan, gather, single) that returns other bytes than were written, even
where ``verify()`` would catch the damage later. Cases run in a long-lived worker process,
``python -m imgstore.testing.fuzz worker [--backend-module MODULE]``, restarted after a crash or
hang. Also: flipped bytes in the checksum files, and forged manifests (valid checksum, wrong content).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imgstore
from imgstore.manifest import MANIFEST_NAME, _checksum, generation_name, read_manifest
from imgstore.testing.checks import BackendTest, child_env, import_backend_module
from imgstore.testing.layouts import Images, Layout, take

SHAPE, COUNT, SEED = (8, 8, 3), 40, 5
CASE_TIMEOUT = 20.0
PAGE = 4096
RAW = Layout()  # raw pixels of one shape: the default layout
#: the stages of a case that read records (after opening): a damaged record there is a CorruptStoreError
READ_STAGES = ("read_many", "gather", "get", "encoded")


def build_store(path: Path, backend: str, options: dict[str, Any], layout: Layout = RAW) -> None:
    records = layout.records(COUNT, SHAPE, SEED)
    with imgstore.open_store(path, backend, "w", **layout.store_kwargs(), **options) as store:
        records[:25].put(store)
        records[25:].put(store)


def mutate(store: Path, rng: random.Random) -> str:
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != "writer.lock")
    # Weigh files by size so the big data files get most of the damage, but every file gets some.
    target = (
        rng.choices(files, weights=[1 + p.stat().st_size for p in files])[0]
        if rng.random() < 0.7
        else rng.choice(files)
    )
    data = bytearray(target.read_bytes())
    kind = rng.choice(["flip", "flip", "overwrite", "zero", "truncate", "delete", "append"])
    if kind == "delete":
        target.unlink()
    elif kind == "truncate" or not data:
        target.write_bytes(bytes(data[: rng.randrange(len(data) + 1)]))
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind in ("overwrite", "zero"):
        start = rng.randrange(len(data))
        length = min(len(data) - start, rng.choice([1, 4, 16, 256, 4096]))
        data[start : start + length] = bytes(length) if kind == "zero" else rng.randbytes(length)
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(bytes(data) + rng.randbytes(rng.choice([1, 100, 5000])))
    return f"{kind} {target.relative_to(store)}"


def _same(got: Any, expected: Images) -> bool:
    """Exactly the expected images (pixels and shapes), as one array or as a list."""
    if isinstance(expected, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == np.uint8
            and got.shape == expected.shape
            and (bool(np.array_equal(got, expected)))
        )
    return (
        isinstance(got, list)
        and len(got) == len(expected)
        and all(
            a.dtype == np.uint8 and a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(got, expected, strict=True)
        )
    )


def read_case(path: str, layout: Layout = RAW, verify_reads: bool = True) -> str:
    """In the worker: open, read every way (each read checked against what was written), verify.

    Reads check checksums by default, so a read that returns anything but the bytes written is a
    failure even if ``verify()`` would have raised afterwards. With ``verify_reads=False`` a read
    may return damaged records ("unverified"), but then ``verify()`` must raise; and a record that
    cannot be decoded is still a CorruptStoreError, never another exception.
    """
    records = layout.records(COUNT, SHAPE, SEED)
    expected, labels = records.expected, records.labels
    stage = "open"
    unverified = False

    def wrong(got_images: Any, got_labels: Any, want_images: Images, want_labels: np.ndarray) -> bool:
        """Whether a read gave other records than were written (allowed, once, where reads are not verified)."""
        nonlocal unverified
        if _same(got_images, want_images) and np.array_equal(got_labels, want_labels):
            return False
        unverified = True
        return verify_reads

    try:
        with imgstore.open_store(path, verify_reads=verify_reads) as store:
            n = len(store)
            if n > COUNT or n not in (0, 25, COUNT):
                return f"WRONG COUNT {n}"
            stage = "read_many"
            if wrong(*store.get_many(range(n)), take(expected, slice(0, n)), labels[:n]):
                return "WRONG DATA in a scan"
            stage = "gather"
            shuffled = np.random.default_rng(0).permutation(n)
            if wrong(*store.get_many(shuffled), take(expected, shuffled), labels[shuffled]):
                return "WRONG DATA in a gather"
            stage = "get"
            for i in range(n):
                image, label = store.get(i)
                if wrong([image], np.array([label]), [expected[i]], labels[i : i + 1]):
                    return "WRONG DATA in a single read"
            if records.blobs is not None:
                stage = "encoded"
                blobs, blob_labels = store.get_encoded_many(range(n))
                if blobs != records.blobs[:n] or not np.array_equal(blob_labels, labels[:n]):
                    unverified = True
                    if verify_reads:
                        return "WRONG DATA in get_encoded_many"
            stage = "verify"
            store.verify()
    except imgstore.ImgStoreError as exc:
        if stage in READ_STAGES and layout.encoded and not isinstance(exc, imgstore.CorruptStoreError):
            return f"WRONG ERROR {type(exc).__name__} at {stage}: {exc}"[:300]
        return f"error {type(exc).__name__} at {stage}"
    except Exception as exc:  # noqa: BLE001 - exactly what the test is looking for
        return f"FOREIGN {type(exc).__module__}.{type(exc).__name__} at {stage}: {exc}"[:300]
    if unverified:
        return "UNDETECTED: reads (unverified) and verify() passed damaged records"
    return "ok"


def worker() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        layout = Layout(**{**case["layout"], "fixed_shape": _shape(case["layout"]["fixed_shape"])})
        print(json.dumps(read_case(case["path"], layout, case["verify_reads"])), flush=True)


def _shape(shape: list[int] | None) -> tuple[int, ...] | None:
    return tuple(shape) if shape is not None else None


class Worker:
    """The worker process: one case per line in (a JSON object), one outcome per line out."""

    def __init__(self, backend_module: str | None = None) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.command = [sys.executable, "-m", "imgstore.testing.fuzz", "worker"]
        if backend_module:
            self.command += ["--backend-module", backend_module]

    def run(self, path: Path, layout: Layout = RAW, verify_reads: bool = True) -> str:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
            )
        assert self.process.stdin and self.process.stdout
        case = {"path": str(path), "layout": dataclasses.asdict(layout), "verify_reads": verify_reads}
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], CASE_TIMEOUT)
        if not ready:
            self.process.kill()
            self.process.wait()
            return "HANG"
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            return f"CRASH (exit {code})"
        outcome: str = json.loads(line)
        return outcome

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _size(path: Path) -> int:
    return path.stat().st_size


def _tamper(path: Path, **fields: object) -> None:
    """Change manifest fields and recompute its checksum, as a deliberate forger would."""
    data = json.loads((path / MANIFEST_NAME).read_text())
    data.update(fields)
    data["crc32"] = _checksum(data)
    (path / MANIFEST_NAME).write_text(json.dumps(data))


class DamageDetection(BackendTest):
    """Damaged files and forged manifests are imgstore errors; damaged data is never returned as good."""

    def fuzz(self, tmp_path: Path, cases: int, seed: int, verify_reads: bool = True) -> Counter[str]:
        pristine = tmp_path / "pristine"
        build_store(pristine, self.backend, self.options, self.layout)
        rng = random.Random(seed)
        outcomes: Counter[str] = Counter()
        bad: list[str] = []
        runner = Worker(self.backend_module)
        try:
            path = tmp_path / "case"
            shutil.copytree(pristine, path)
            outcome = runner.run(path, self.layout, verify_reads)  # an error here would pass every case for nothing
            assert outcome == "ok", f"the worker cannot read the undamaged store (backend_module?): {outcome}"
            for case in range(cases):
                path = tmp_path / "case"
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(pristine, path)
                damage = mutate(path, rng)
                outcome = runner.run(path, self.layout, verify_reads)
                outcomes[outcome.split(" at ")[0].split(":")[0]] += 1
                if not (outcome == "ok" or outcome.startswith("error ")):
                    bad.append(f"case {case}: {damage} -> {outcome}")
        finally:
            runner.close()
        print(f"{self.backend}: {cases} cases (verify_reads={verify_reads}): {dict(outcomes)}")
        assert not bad, "\n".join(bad[:20])
        return outcomes

    def test_damaged_store_fails_cleanly(self, tmp_path: Path) -> None:
        outcomes = self.fuzz(tmp_path, cases=20 if self.scaled else 60, seed=1)
        assert sum(n for outcome, n in outcomes.items() if outcome.startswith("error")) > 0

    @pytest.mark.slow
    def test_damaged_store_fails_cleanly_1000_cases(self, tmp_path: Path) -> None:
        self.fuzz(tmp_path, cases=1000, seed=2)

    def test_unverified_reads_of_a_damaged_store_fail_cleanly(self, tmp_path: Path) -> None:
        """verify_reads=False: damaged records may be read, but never crash a decoder; verify() still finds them."""
        outcomes = self.fuzz(tmp_path, cases=20 if self.scaled else 60, seed=3, verify_reads=False)
        assert sum(n for outcome, n in outcomes.items() if outcome.startswith("error")) > 0

    @pytest.mark.slow
    def test_unverified_reads_of_a_damaged_store_fail_cleanly_1000_cases(self, tmp_path: Path) -> None:
        self.fuzz(tmp_path, cases=1000, seed=4, verify_reads=False)

    def test_every_zeroed_page_fails_cleanly(self, tmp_path: Path) -> None:
        """Pages of the biggest file zeroed one at a time (a lost write): ok or an error, never a crash.

        Unlike the random cases, this reaches every page of a small file, e.g. a B-tree's branch pages.
        """
        pristine = tmp_path / "pristine"
        build_store(pristine, self.backend, self.options, self.layout)
        files = sorted((p for p in pristine.rglob("*") if p.is_file() and p.name != "writer.lock"), key=_size)[-1:]
        runner = Worker(self.backend_module)
        bad: list[str] = []
        try:
            for file in files:
                pages = -(-file.stat().st_size // PAGE)
                for page in sorted({pages * k // 10 for k in range(10)}):  # at most 10, spread over the file
                    path = tmp_path / "case"
                    shutil.rmtree(path, ignore_errors=True)
                    shutil.copytree(pristine, path)
                    with open(path / file.relative_to(pristine), "r+b") as f:
                        f.seek(page * PAGE)
                        f.write(bytes(PAGE))
                    outcome = runner.run(path, self.layout)
                    if not (outcome == "ok" or outcome.startswith("error ")):
                        bad.append(f"page {page} of {file.relative_to(pristine)} zeroed -> {outcome}")
        finally:
            runner.close()
        assert not bad, "\n".join(bad[:20])

    def test_damaged_checksums_are_damage(self, tmp_path: Path) -> None:
        path = tmp_path / "s"
        self.fill(path, n=300)
        manifest = read_manifest(path)
        for name in manifest.files:
            if name.startswith(("checksums", "groups")):
                file = path / name
                data = bytearray(file.read_bytes())
                if not data:
                    continue
                data[len(data) // 2] ^= 0x10
                file.write_bytes(bytes(data))
        with imgstore.open_store(path) as store:
            with pytest.raises(imgstore.CorruptStoreError):
                store.get_many(range(300))
            with pytest.raises(imgstore.CorruptStoreError):
                store.verify()

    @pytest.mark.parametrize(
        "fields",
        [
            {"count": 10**12},
            {"count": 2**70},
            {"count": -1},
            {"shape": [10**6, 10**6, 3]},
            {"shape": [8, 8, 3, 1, 1, 1, 1, 1, 1]},
            {"shape": [8, 8, 0]},
            {"shape": "8x8"},
            # The same 192 bytes an image in another geometry: the checksums cover the shape.
            {"shape": [8, 24]},
            {"shape": [24, 8, 1]},
            {"shape": [192]},
            {"shape": [8, 8, 3, 1]},
            {"count": 31},
            {"files": ["../outside"]},
            {"group": -3},
            {"options": {"files_per_dir": 0, "block_bytes": 0, "chunk_bytes": 0, "shard_images": 0, "batch_bytes": 0}},
            {"options": []},
            {"backend": ["lmdb"]},
            {"generation": "../x"},
            {"format_version": 99},
            {"count": True},
            {"codec": "nonesuch"},
            {"codec": 3},
            {"image_mode": "CMYK"},
            {"varied": "yes"},
            {"classes": [1, 2]},
            {"classes": ["x" * 1001]},
            {"codec_params": {"quality": "high"}},
            {"codec_params": []},
            {"varied": False},
            {"varied": False, "shape": [8, 8, 3]},
        ],
    )
    def test_a_forged_manifest_is_an_imgstore_error_not_a_crash(
        self, tmp_path: Path, fields: dict[str, object]
    ) -> None:
        options = fields.get("options")
        if isinstance(options, dict) and not set(options) & set(imgstore.get_backend(self.backend).option_specs):
            pytest.skip("bad values for the built-in backends' options; a store ignores options it does not know")
        if "codec_params" in fields and not self.layout.encoded:
            pytest.skip("codec parameters: a store of raw pixels of one shape has no codec to give them to")
        if fields.get("varied") is False and not self.layout.varied:
            pytest.skip("varied=False: this store has one shape already, so the forgery changes nothing")
        path = tmp_path / "s"
        self.fill(path)
        _tamper(path, **fields)
        with pytest.raises(imgstore.ImgStoreError):
            with imgstore.open_store(path) as store:
                store.get_many(range(len(store)))
                store.verify()

    @pytest.mark.parametrize("damage", ["flip", "delete"])
    @pytest.mark.parametrize("side", ["shapes.u32", "paths.txt", "paths.ends"])
    def test_a_damaged_side_file_is_damage(
        self, tmp_path: Path, side: str, damage: str, request: pytest.FixtureRequest
    ) -> None:
        """A flipped byte in, or the loss of, what an encoded store keeps beside its records: an error, never a
        wrong answer nor another exception."""
        self.skip_unless_encoded("the side files of encoded stores (shapes, source paths)")
        if damage == "flip" and side.startswith("paths") and not self.layout.takes_files:
            pytest.skip("a raw store takes arrays only: no source paths to change")
        path = tmp_path / "s"
        records = self.records(10, (8, 8, 3))
        with self.create(path) as store:
            if self.layout.takes_files:
                store.put_encoded_many(self.files_of(records), records.labels, paths=[f"c/{k}.file" for k in range(10)])
            else:
                records.put(store)
            shapes, paths = store.image_shapes(), [store.source_path(k) for k in range(10)]
        file = path / generation_name(side, read_manifest(path).generation)
        if damage == "delete":
            file.unlink()
        else:
            data = bytearray(file.read_bytes())
            data[0 if side == "shapes.u32" else 8 if side == "paths.ends" else 6] ^= 0x01
            file.write_bytes(bytes(data))
        try:
            with imgstore.open_store(path) as store:
                try:
                    answers = (store.image_shapes().tolist(), [store.source_path(k) for k in range(10)])
                except imgstore.CorruptStoreError:
                    pass
                else:
                    assert answers == (shapes.tolist(), paths), "a wrong answer given as good"
                store.verify()
        except imgstore.CorruptStoreError:
            return
        assert damage == "delete" and side == "paths.txt" and not self.layout.takes_files, "verify() passed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imgstore.testing.fuzz", description="the fuzz tests' worker")
    parser.add_argument("command", choices=["worker"])
    parser.add_argument("--backend-module", help="a module to import first: it registers the backend under test")
    args = parser.parse_args(argv)
    os.environ.setdefault("HDF5_DISABLE_VERSION_CHECK", "1")
    import_backend_module(args.backend_module)
    worker()


if __name__ == "__main__":
    main()
