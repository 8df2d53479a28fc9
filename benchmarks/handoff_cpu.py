"""The training process's CPU per image with 2 DataLoader workers: the shared ring against torch's hand-off.

    PYTHONPATH=. python -m benchmarks.handoff_cpu [N] [BACKEND] [EPOCHS]

Makes N synthetic CIFAR images in a BACKEND store (in a temporary folder), then times EPOCHS
shuffled epochs of batch 256 through ``make_loader`` with persistent workers, for each hand-off,
alternated: ``time.process_time`` of the training process (what a training loop loses to loading,
the workers excluded) per image, and images/s. The first epoch (workers starting) is left out.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import imgstore
from imgstore.datasets import load_dataset
from imgstore.torch import make_loader


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 50_000
    backend = argv[1] if len(argv) > 1 else "lmdb"
    epochs = int(argv[2]) if len(argv) > 2 else 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        images, labels = load_dataset("synthetic", n)
        with imgstore.open_store(path, backend, "w") as store:
            store.put_many(images, labels)
        loaders = {
            handoff: make_loader(
                path, batch_size=256, shuffle=True, num_workers=2, persistent_workers=True, handoff=handoff
            )
            for handoff in ("shared", "torch")
        }
        for loader in loaders.values():
            for _ in loader:  # workers started, pages warm
                pass
        for epoch in range(epochs):
            for handoff, loader in loaders.items():
                cpu, wall, seen = time.process_time(), time.perf_counter(), 0
                for _, batch_labels in loader:
                    seen += len(batch_labels)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                print(
                    f"epoch {epoch} {handoff:>6}: {1e6 * cpu / seen:.2f} us CPU an image, {seen / wall:,.0f} images/s"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
