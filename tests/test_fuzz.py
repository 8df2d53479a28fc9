"""Damaged stores: mutate and truncate every kind of file, then open and read in a subprocess.

Allowed outcomes: the store reads back exactly the original records, or an imgstore error is
raised (``CorruptStoreError`` and its kin). Not allowed: a crash (signal), a hang, any other
exception, or any read (scan, gather, single) that returns other bytes than were written, even
where ``verify()`` would catch the damage later. Cases run in a long-lived worker
process that is restarted after a crash or hang.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import imgstore
from imgstore.testing import random_images

SHAPE, COUNT, SEED = (8, 8, 3), 40, 5
CASE_TIMEOUT = 20.0


def build_store(path: Path, backend: str) -> None:
    images, labels = random_images(COUNT, SHAPE, SEED)
    with imgstore.open_store(path, backend, "w") as store:
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
    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def run(self, path: Path) -> str:
        import select

        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
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
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def fuzz(tmp_path: Path, backend: str, cases: int, seed: int) -> Counter:
    pristine = tmp_path / "pristine"
    build_store(pristine, backend)
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    bad: list[str] = []
    runner = Worker()
    try:
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
    print(f"{backend}: {cases} cases: {dict(outcomes)}")
    assert not bad, "\n".join(bad[:20])
    return outcomes


@pytest.mark.parametrize("backend", imgstore.available_backends())
def test_damaged_store_fails_cleanly(tmp_path: Path, backend: str) -> None:
    outcomes = fuzz(tmp_path, backend, cases=60, seed=1)
    assert sum(n for outcome, n in outcomes.items() if outcome.startswith("error")) > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", imgstore.available_backends())
def test_damaged_store_fails_cleanly_1000_cases(tmp_path: Path, backend: str) -> None:
    fuzz(tmp_path, backend, cases=1000, seed=2)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    os.environ.setdefault("HDF5_DISABLE_VERSION_CHECK", "1")
    worker()
