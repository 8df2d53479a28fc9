"""The summary of the epoch groups, and the epoch targets (measured ratios, PASS or MISS; reported, never asserted).

Targets of the loader issue, each a ratio of images/s within one group of the same run (same
dataset, N, workers, cache), judged on the fastest rounds (interference only adds time), the
medians' ratio beside:

- warm, 0 workers: imgstore-lmdb at least 0.6x the LIMIT, imgstore-hdf5 at least 0.5x;
- warm, 2 workers: both at least the LIMIT;
- cold, 2 workers: lmdb at least the LIMIT, hdf5 at least 0.8x, both at least 2x the fastest peer;
- every imgstore row faster than every peer row, warm and cold;
- imagenet-like: imgstore (the fastest decoder) at least 2x the ImageFolder row.
"""

from __future__ import annotations

from typing import Any

from imgstore.analysis.report import format_seconds

EPOCH_KINDS = ("limit", "imgstore", "peer")  # the order of rows in a group
MIN_TARGET_IMAGES = 1_000  # no targets on a smoke run's few batches
# (cache, workers, backend) -> the least images/s over the LIMIT's
LIMIT_TARGETS = {
    ("warm", 0, "lmdb"): 0.6,
    ("warm", 0, "hdf5"): 0.5,
    ("warm", 2, "lmdb"): 1.0,
    ("warm", 2, "hdf5"): 1.0,
    ("cold", 2, "lmdb"): 1.0,
    ("cold", 2, "hdf5"): 0.8,
}
PEER_SPEEDUP_COLD = 2.0  # cold, 2 workers: over the fastest peer
FOLDER_SPEEDUP = 2.0  # imagenet-like: over the ImageFolder row
FOLDER_PEER = "imagefolder"


def is_epoch(bench: Any) -> bool:
    return bool(bench.extra_info.get("operation") == "epoch")


def _name(bench: Any) -> str:
    return str(bench.extra_info.get("loader") or bench.params.get("loader_name"))


def _order(bench: Any) -> tuple[int, str]:
    kind = bench.extra_info["kind"]
    return (EPOCH_KINDS.index(kind) if kind in EPOCH_KINDS else len(EPOCH_KINDS), _name(bench))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def write_epoch_group(tr: Any, group: str, rows: list[Any]) -> None:
    """One epoch group: images/s, the time to the first batch, the main process's CPU per image."""
    tr.write_line(
        f"{group} ({rows[0].extra_info['dataset']}): One shuffled training epoch through a DataLoader", bold=True
    )
    tr.write_line(
        f"  {'subject':<26}{'median':>10}{'images/s':>11}{'xlimit':>8}{'1st batch':>11}{'CPU us/img':>12}"
        f"{'disk MB':>9}  note"
    )
    for bench in sorted(rows, key=_order):
        info = bench.extra_info
        note = "" if info.get("exact_epoch", True) else f"not an exact epoch ({info.get('epoch_note', '')})"
        tr.write_line(
            f"  {_name(bench):<26}{format_seconds(bench.stats.median):>10}{info['images_per_second']:>11,.0f}"
            f"{_ratio(info['ratio_to_limit']):>8}{format_seconds(info['first_batch_seconds']):>11}"
            f"{info['main_cpu_seconds_per_image'] * 1e6:>12.2f}{info['disk_bytes'] / 1e6:>9.1f}  {note}"
        )


def _groups(rows: list[Any]) -> dict[tuple[str, int, int, str], dict[str, Any]]:
    groups: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    for bench in rows:
        if is_epoch(bench):
            info = bench.extra_info
            key = (info["dataset"], info["images"], info["workers"], info["cache"])
            groups.setdefault(key, {})[_name(bench)] = bench
    return groups


def _line(where: str, name: str, n: int, bench: Any, reference: Any, what: str, least: float) -> tuple[str, bool]:
    """``bench``'s images/s over ``reference``'s, fastest rounds (medians in brackets), against ``least``."""
    ratio, median = reference.stats.min / bench.stats.min, reference.stats.median / bench.stats.median
    figures = (
        f"{n / bench.stats.min:,.0f} images/s, {what} {n / reference.stats.min:,.0f}: {ratio:.2f}x ({median:.2f}x)"
    )
    return f"{where} {name}: {figures}, target >= {least:g}x", ratio >= least


def evaluate(rows: list[Any]) -> list[tuple[str, bool]]:
    """(line, passed) for every epoch target measurable in ``rows``."""
    results: list[tuple[str, bool]] = []
    for (dataset, n, workers, cache), by_name in sorted(_groups(rows).items()):
        if n < MIN_TARGET_IMAGES:
            continue
        where = f"{dataset} n={n} w={workers} {cache}"
        kinds = {name: b.extra_info["kind"] for name, b in by_name.items()}
        stores = {name: b for name, b in by_name.items() if kinds[name] == "imgstore"}
        exact = [b for name, b in by_name.items() if kinds[name] == "peer" and b.extra_info.get("exact_epoch", True)]
        best_peer = min(exact, key=lambda b: b.stats.min) if exact else None
        limit, folder = by_name.get("limit"), by_name.get(FOLDER_PEER)
        for name, bench in sorted(stores.items()):
            backend = bench.extra_info["backend"]
            least = LIMIT_TARGETS.get((cache, workers, backend)) if dataset != "imagenet-like" else None
            if limit is not None and least is not None:
                results.append(_line(where, name, n, bench, limit, "LIMIT", least))
            if best_peer is not None:  # "faster than every reference row"; cold w=2 LMDB/HDF5: 2x
                cold_target = (cache, workers) == ("cold", 2) and backend in ("lmdb", "hdf5")
                peer = f"fastest peer ({_name(best_peer)})"
                results.append(_line(where, name, n, bench, best_peer, peer, PEER_SPEEDUP_COLD if cold_target else 1.0))
            if dataset == "imagenet-like" and folder is not None:
                results.append(_line(where, name, n, bench, folder, "ImageFolder", FOLDER_SPEEDUP))
    return results


def write_epoch_targets(tr: Any, rows: list[Any]) -> None:
    results = evaluate(rows)
    if not results:
        return
    tr.write_line(
        "epoch targets (images/s over the reference row's, same group; fastest rounds, medians' ratio in brackets)",
        bold=True,
    )
    for line, passed in results:
        tr.write_line(f"  {line}  {'PASS' if passed else 'MISS'}", green=passed, red=not passed)
