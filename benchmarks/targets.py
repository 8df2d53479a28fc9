"""The summary of an encoded dataset's groups, and the targets section (measured ratios, PASS or MISS).

Targets are reported, never asserted: a timed test that fails on a slow machine tells nothing a
ratio printed beside its threshold does not. Both compare rows of the same run, on the same files
in the same shuffled order (``read_random_many``: an epoch in batches of 256), by their fastest
rounds (the verdict: on a shared machine interference only adds time, as the regression gate
also reasons) and, printed beside, by their medians:

1. a shuffled batch from an LMDB or HDF5 store holding the files as they are (codec ``keep``),
   decoded with the fastest decoder, takes at most 1.15x the LIMIT's time (the same files decoded
   from memory with the same decoder on every core);
2. that row reads at least 2x the images/s of the ImageFolder status quo (Pillow, one file at a
   time, in one process).
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.data import ENCODED_DATASETS
from benchmarks.operations import BATCH_SIZE, Operation
from imgstore.analysis.report import format_seconds

TARGET_LIMIT_RATIO = 1.15  # imgstore's time over the LIMIT's, at most
TARGET_FOLDER_SPEEDUP = 2.0  # imgstore's images/s over the status quo's, at least
TARGET_BACKENDS = ("lmdb", "hdf5")
TARGET_OPERATION = "read_random_many"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def write_encoded_group(tr: Any, group: str, operation: Operation, ordered: list[Any]) -> None:
    """One group of an encoded dataset: rates in images and in stored bytes, and the bytes an image takes."""
    many = operation.speedup_over is not None
    tr.write_line(f"{group}: {operation.title}", bold=True)
    tr.write_line(
        f"  {'subject':<32}{'median':>10}{'images/s':>10}{'MB/s':>9}{'KB/image':>10}{'xlimit':>8}{'xfolder':>9}"
        f"{'disk MB':>9}" + (f"{'xsingle':>9}" if many else "")
    )
    for bench in ordered:
        info = bench.extra_info
        median = bench.stats.median
        tr.write_line(
            f"  {bench.params['subject_name']:<32}{format_seconds(median):>10}{info['images_per_second']:>10,.0f}"
            f"{info['file_bytes'] / 1e6 / median:>9,.1f}{info['file_bytes'] / 1e3 / info['images']:>10.1f}"
            f"{_ratio(info['ratio_to_limit']):>8}{_ratio(info['ratio_to_tutorial']):>9}"
            f"{info['disk_bytes'] / 1e6:>9.1f}" + (f"{_ratio(info['speedup_over_single']):>9}" if many else "")
        )


def evaluate(rows: list[Any]) -> list[dict[str, Any]]:
    """Every target measurable in ``rows``: one dict per (dataset, N, backend, target)."""
    from imgstore.codecs import resolve_decoder

    fastest = resolve_decoder("auto")
    by_name: dict[tuple[str, int, str], tuple[float, float]] = {}  # -> (fastest round, median)
    for bench in rows:
        info = bench.extra_info
        if info["dataset"] in ENCODED_DATASETS and info["operation"] == TARGET_OPERATION:
            by_name[(info["dataset"], info["images"], bench.params["subject_name"])] = (
                bench.stats.min,
                bench.stats.median,
            )
    results = []
    for (dataset, n, name), (best, median) in sorted(by_name.items()):
        backend = next((b for b in TARGET_BACKENDS if name == f"imgstore-{b}-keep-{fastest}"), None)
        if backend is None or n < BATCH_SIZE:  # the targets are about batches of 256: none in a smoke run
            continue
        batches = math.ceil(n / BATCH_SIZE)
        common = {"dataset": dataset, "images": n, "subject": name, "backend": backend, "best": best}
        limit, folder = by_name.get((dataset, n, "limit")), by_name.get((dataset, n, "imagefolder"))
        if limit:
            ratio = best / limit[0]
            results.append(
                common | {"target": 1, "ratio": ratio, "median_ratio": median / limit[1], "reference": limit[0],
                          "passed": ratio <= TARGET_LIMIT_RATIO, "batch": best / batches,
                          "reference_batch": limit[0] / batches}
            )  # fmt: skip
        if folder:
            speedup = folder[0] / best
            results.append(
                common | {"target": 2, "ratio": speedup, "median_ratio": folder[1] / median, "reference": folder[0],
                          "passed": speedup >= TARGET_FOLDER_SPEEDUP}
            )  # fmt: skip
    return results


def write_targets(tr: Any, rows: list[Any]) -> None:
    from imgstore.codecs import resolve_decoder

    results = evaluate(rows)
    if not results:
        encoded = [b.extra_info for b in rows if b.extra_info["dataset"] in ENCODED_DATASETS]
        if any(info["operation"] == TARGET_OPERATION for info in encoded):  # a smoke run: say why there are none
            tr.write_line(f"targets: measured on a {TARGET_OPERATION} of {BATCH_SIZE} images or more (none here)")
        return

    tr.write_line(
        f"targets ({TARGET_OPERATION}: the same shuffled epoch in batches of {BATCH_SIZE}, codec keep, decoder "
        f"{resolve_decoder('auto')} (the fastest installed); fastest rounds, medians' ratio in brackets)",
        bold=True,
    )
    for r in results:
        verdict = "PASS" if r["passed"] else "MISS"
        where = f"{r['dataset']} n={r['images']} {r['subject']}"
        if r["target"] == 1:
            tr.write_line(
                f"  1. a batch within {TARGET_LIMIT_RATIO}x the LIMIT's time: {where}: "
                f"{format_seconds(r['batch'])} a batch, LIMIT {format_seconds(r['reference_batch'])}: "
                f"{r['ratio']:.2f}x ({r['median_ratio']:.2f}x)  {verdict}",
                green=r["passed"],
                red=not r["passed"],
            )
        else:
            n = r["images"]
            tr.write_line(
                f"  2. at least {TARGET_FOLDER_SPEEDUP:g}x the ImageFolder status quo's images/s: {where}: "
                f"{n / r['best']:,.0f} images/s, imagefolder {n / r['reference']:,.0f}: "
                f"{r['ratio']:.2f}x ({r['median_ratio']:.2f}x)  {verdict}",
                green=r["passed"],
                red=not r["passed"],
            )
