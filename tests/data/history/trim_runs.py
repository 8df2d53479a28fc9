"""Trim saved runs of .ci/history-series into the test fixture: five benchmarks, rounds to 4 digits."""

import json
import shutil
import sys
from pathlib import Path

KEEP = {
    "test_storage[imgstore-memmap-read_many-1000-synthetic]",
    "test_storage[imgstore-memmap-noverify-read_many-1000-synthetic]",
    "test_storage[imgstore-lmdb-read_many-1000-synthetic]",
    "test_storage[imgstore-hdf5-read_random-1000-synthetic]",
    "test_storage[limit-read_many-1000-synthetic]",
}
MACHINE = ("node", "processor", "machine", "python_implementation", "python_version", "release", "system")


def main(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    for path in sorted(src.rglob("*.json")):
        doc = json.loads(path.read_text())
        benches = []
        for bench in doc["benchmarks"]:
            if bench["name"] not in KEEP:
                continue
            stats = bench["stats"]
            stats["data"] = [float(f"{t:.4g}") for t in stats["data"]]
            bench["stats"] = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in stats.items()}
            bench["options"] = {}
            benches.append(bench)
        doc["benchmarks"] = benches
        info = doc["machine_info"]
        cpu = info.get("cpu", {})
        doc["machine_info"] = {k: info[k] for k in MACHINE if k in info}
        doc["machine_info"]["cpu"] = {"brand_raw": cpu.get("brand_raw"), "count": cpu.get("count")}
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, separators=(",", ":")))
    if (src / "CHANGE_COMMIT").exists():
        shutil.copy(src / "CHANGE_COMMIT", dst / "CHANGE_COMMIT")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
