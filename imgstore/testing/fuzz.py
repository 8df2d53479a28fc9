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
from imgstore.manifest import MANIFEST_NAME, _checksum, read_manifest
from imgstore.testing.checks import BackendTest, child_env, import_backend_module, random_images

SHAPE, COUNT, SEED = (8, 8, 3), 40, 5
CASE_TIMEOUT = 20.0


def build_store(path: Path, backend: str, options: dict[str, Any]) -> None:
    images, labels = random_images(COUNT, SHAPE, SEED)
    with imgstore.open_store(path, backend, "w", **options) as store:
        store.put_many(images[:25], labels[:25])
        store.put_many(images[25:], labels[25:])


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


def read_case(path: str) -> str:
    """In the worker: open, read every way (each read checked against what was written), verify.

    Reads check checksums by default, so a read that returns anything but the bytes written is a
    failure even if ``verify()`` would have raised afterwards.
    """
    images, labels = random_images(COUNT, SHAPE, SEED)
    stage = "open"
    try:
        with imgstore.open_store(path) as store:
            n = len(store)
            if n > COUNT or n not in (0, 25, COUNT):
                return f"WRONG COUNT {n}"
            stage = "read_many"
            got_images, got_labels = store.get_many(range(n))
            if got_images.shape != (n, *SHAPE) or got_images.dtype != np.uint8 or got_labels.dtype != np.int64:
                return f"WRONG SHAPE {got_images.shape} {got_images.dtype}"
            if not np.array_equal(got_images, images[:n]) or not np.array_equal(got_labels, labels[:n]):
                return "WRONG DATA in a scan"
            stage = "gather"
            shuffled = np.random.default_rng(0).permutation(n)
            got_images, got_labels = store.get_many(shuffled)
            if not np.array_equal(got_images, images[shuffled]) or not np.array_equal(got_labels, labels[shuffled]):
                return "WRONG DATA in a gather"
            stage = "get"
            for i in range(n):
                image, label = store.get(i)
                if not np.array_equal(image, images[i]) or label != labels[i]:
                    return "WRONG DATA in a single read"
            stage = "verify"
            store.verify()
    except imgstore.ImgStoreError as exc:
        return f"error {type(exc).__name__} at {stage}"
    except Exception as exc:  # noqa: BLE001 - exactly what the test is looking for
        return f"FOREIGN {type(exc).__module__}.{type(exc).__name__} at {stage}: {exc}"[:300]
    return "ok"


def worker() -> None:
    for line in sys.stdin:
        print(json.dumps(read_case(line.strip())), flush=True)


class Worker:
    """The worker process: one case per line in, one outcome per line out."""

    def __init__(self, backend_module: str | None = None) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.command = [sys.executable, "-m", "imgstore.testing.fuzz", "worker"]
        if backend_module:
            self.command += ["--backend-module", backend_module]

    def run(self, path: Path) -> str:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
            )
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(f"{path}\n")
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


def _tamper(path: Path, **fields: object) -> None:
    """Change manifest fields and recompute its checksum, as a deliberate forger would."""
    data = json.loads((path / MANIFEST_NAME).read_text())
    data.update(fields)
    data["crc32"] = _checksum(data)
    (path / MANIFEST_NAME).write_text(json.dumps(data))


class DamageDetection(BackendTest):
    """Damaged files and forged manifests are imgstore errors; damaged data is never returned as good."""

    def fuzz(self, tmp_path: Path, cases: int, seed: int) -> Counter[str]:
        pristine = tmp_path / "pristine"
        build_store(pristine, self.backend, self.options)
        rng = random.Random(seed)
        outcomes: Counter[str] = Counter()
        bad: list[str] = []
        runner = Worker(self.backend_module)
        try:
            path = tmp_path / "case"
            shutil.copytree(pristine, path)
            outcome = runner.run(path)  # an error here would pass every case below for nothing
            assert outcome == "ok", f"the worker cannot read the undamaged store (backend_module?): {outcome}"
            for case in range(cases):
                path = tmp_path / "case"
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(pristine, path)
                damage = mutate(path, rng)
                outcome = runner.run(path)
                outcomes[outcome.split(" at ")[0].split(":")[0]] += 1
                if not (outcome == "ok" or outcome.startswith("error ")):
                    bad.append(f"case {case}: {damage} -> {outcome}")
        finally:
            runner.close()
        print(f"{self.backend}: {cases} cases: {dict(outcomes)}")
        assert not bad, "\n".join(bad[:20])
        return outcomes

    def test_damaged_store_fails_cleanly(self, tmp_path: Path) -> None:
        outcomes = self.fuzz(tmp_path, cases=60, seed=1)
        assert sum(n for outcome, n in outcomes.items() if outcome.startswith("error")) > 0

    @pytest.mark.slow
    def test_damaged_store_fails_cleanly_1000_cases(self, tmp_path: Path) -> None:
        self.fuzz(tmp_path, cases=1000, seed=2)

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
            {"options": {"files_per_dir": 0, "block_bytes": 0, "chunk_bytes": 0}},
            {"options": []},
            {"backend": ["lmdb"]},
            {"generation": "../x"},
            {"format_version": 99},
            {"count": True},
        ],
    )
    def test_a_forged_manifest_is_an_imgstore_error_not_a_crash(
        self, tmp_path: Path, fields: dict[str, object]
    ) -> None:
        options = fields.get("options")
        if isinstance(options, dict) and not set(options) & set(imgstore.get_backend(self.backend).option_specs):
            pytest.skip("bad values for the built-in backends' options; a store ignores options it does not know")
        path = tmp_path / "s"
        self.fill(path)
        _tamper(path, **fields)
        with pytest.raises(imgstore.ImgStoreError):
            with imgstore.open_store(path) as store:
                store.get_many(range(len(store)))
                store.verify()


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
