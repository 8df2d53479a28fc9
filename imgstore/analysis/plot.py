"""Figures of one benchmark run, after the tutorial "Three Ways of Storing and Accessing Lots of
Images in Python": seconds against number of images, one line per (kind, backend) series.

Written files (a figure whose data the run lacks is skipped, not an error):

* ``store_read.png``  -- store_many and read_many side by side, linear axes above, log-log below;
* ``disk_usage.png``  -- bytes on disk per series at the largest cutoff, and bytes against images;
* ``presets.png``     -- per backend with presets (e.g. PNG compression levels): store_many and
  read_many time against bytes in the files, at the largest cutoff, one point per setting;
* ``<operation>.png`` -- one log-log figure per other operation in the run (store_single, ...);
  the operation comes from the file, so its file name keeps only ``[A-Za-z0-9_.-]`` and is made
  distinct (``-2``, ``-3``, ...) from the three above and from the other operations' files.

Only benchmarks whose result record (:mod:`imgstore.analysis.schema`) has an operation and a
count of images are drawn; the run is read and checked by :func:`imgstore.analysis.load.load_run`.
matplotlib is an optional extra and is imported only when a figure is drawn; figures are drawn on
the Agg canvas directly, without pyplot, so nothing global (the backend of an application that
imports imgstore) is changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgstore.analysis.load import Run, load_run
from imgstore.errors import MissingDependencyError

if TYPE_CHECKING:  # only for annotations: matplotlib is optional
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Point", "extract_points", "plot_run"]

# The two operations of the tutorial's main figure, then the others in a stable order.
MAIN_OPERATIONS = ("store_many", "read_many")
# The files every run may write; an operation's figure never takes one of these names.
FIXED_FIGURES = ("store_read", "disk_usage", "presets")
OPERATION_TITLES = {
    "store_many": "Storing many images at once",
    "read_many": "Reading many images at once",
    "store_single": "Storing images one at a time",
    "read_single": "Reading images one at a time",
    "read_random": "Reading images in random order",
    "read_random_many": "Reading shuffled batches",
    "iterate": "Iterating over all images",
}
KIND_ORDER = {"imgstore": 0, "tutorial": 1, "limit": 2}
DPI = 110


@dataclass(frozen=True)
class Point:
    """One benchmark of the run, reduced to what the figures need."""

    kind: str
    backend: str
    dataset: str
    operation: str
    images: int
    seconds: float  # median of the rounds
    disk_bytes: int | None
    variant: str = ""  # a non-default imgstore setting, e.g. "nosync" or "level0"
    file_bytes: int | None = None


# Variants that change how a store is written or read, not what it holds: the same bytes as the default.
SAME_BYTES_VARIANTS = ("nosync", "noverify")
SeriesKey = tuple[str, str, str, str]  # (kind, backend, dataset, variant)


def extract_points(run: Run) -> list[Point]:
    """The run's benchmarks whose result record has an operation and a count of images; others are ignored."""
    points = []
    for bench in run.benchmarks.values():
        record = bench.record
        if record.operation is None or record.images is None:
            continue
        points.append(
            Point(
                kind=record.kind if record.kind is not None else "imgstore",
                backend=record.backend if record.backend is not None else "?",
                dataset=record.dataset if record.dataset is not None else "",
                operation=record.operation,
                images=record.images,
                seconds=bench.median,
                disk_bytes=record.disk_bytes,
                variant=record.variant or "",
                file_bytes=record.file_bytes,
            )
        )
    return points


def plot_run(run: Run | str | Path, out_dir: str | Path) -> list[Path]:
    """Write the run's figures as PNG files into ``out_dir`` (created); return their paths."""
    _require_matplotlib()
    if not isinstance(run, Run):
        run = load_run(run)
    points = extract_points(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style = _Style(points)
    title = _text(Path(run.path).name + (f" ({run.datetime[:19]})" if run.datetime else ""))

    written: list[Path] = []
    figure = _store_read_figure(points, style, title)
    if figure is not None:
        written.append(_save(figure, out / "store_read.png"))
    figure = _disk_figure(points, style, title)
    if figure is not None:
        written.append(_save(figure, out / "disk_usage.png"))
    figure = _presets_figure(points, style, title)
    if figure is not None:
        written.append(_save(figure, out / "presets.png"))
    others = sorted({p.operation for p in points} - set(MAIN_OPERATIONS), key=_operation_order)
    for operation, name in _file_names(others).items():
        figure = _operation_figure(points, operation, style, title)
        written.append(_save(figure, out / f"{name}.png"))
    return written


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("plotting needs matplotlib: pip install 'imgstore-ml[plot]'") from exc


# ------------------------------------------------------------------------------------- styling


class _Style:
    """Consistent look of a series across every figure of the run.

    One colour per backend, so lmdb in imgstore and lmdb in the tutorial are easy to pair; the kind
    sets the line: imgstore solid, tutorial dashed, the hardware limit a grey dotted line.
    """

    def __init__(self, points: Sequence[Point]) -> None:
        from matplotlib import colormaps

        backends = sorted({p.backend for p in points if p.kind != "limit"})
        palette = colormaps["tab10"].colors  # type: ignore[attr-defined]  # a ListedColormap
        self.colors = {backend: palette[i % len(palette)] for i, backend in enumerate(backends)}
        variants = sorted({p.variant for p in points if p.variant})
        self.markers = {variant: "^v<>DPX*"[i % 8] for i, variant in enumerate(variants)}
        self.several_datasets = len({p.dataset for p in points}) > 1

    def label(self, key: SeriesKey) -> str:
        kind, backend, dataset, variant = key
        label = f"{backend} ({kind}, {variant})" if variant else f"{backend} ({kind})"
        return _text(f"{label}, {dataset}" if self.several_datasets and dataset else label)

    def line(self, key: SeriesKey) -> dict[str, Any]:
        kind, backend, _, variant = key
        if kind == "limit":
            return {"color": "0.45", "linestyle": ":", "marker": "x", "linewidth": 2}
        color = self.colors.get(backend, "black")
        if kind == "tutorial":
            return {"color": color, "linestyle": "--", "marker": "s", "markerfacecolor": "none"}
        if variant:  # same backend, another setting: same colour, thinner dash-dot line, own marker
            return {"color": color, "linestyle": "-.", "marker": self.markers.get(variant, "^"), "linewidth": 1}
        return {"color": color, "linestyle": "-", "marker": "o", "linewidth": 2}


def _series(points: Iterable[Point], operation: str) -> dict[SeriesKey, list[Point]]:
    """Points of one operation grouped by series, each sorted by images; series in legend order."""
    groups: dict[SeriesKey, list[Point]] = {}
    for point in points:
        if point.operation == operation:
            groups.setdefault((point.kind, point.backend, point.dataset, point.variant), []).append(point)
    ordered = sorted(groups, key=lambda k: (KIND_ORDER.get(k[0], 3), k[0], k[1], k[3], k[2]))
    return {key: sorted(groups[key], key=lambda p: p.images) for key in ordered}


def _operation_order(operation: str) -> tuple[int, str]:
    titles = list(OPERATION_TITLES)
    return (titles.index(operation) if operation in titles else len(titles), operation)


def _safe_name(operation: str) -> str:
    # The operation comes from the JSON file; it must not escape out_dir or be an odd file name.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", operation)[:100].strip("._-") or "operation"


def _file_names(operations: Sequence[str]) -> dict[str, str]:
    """A file name (without .png) per operation: safe, and distinct from the fixed figures and from
    each other, ignoring case (``Store_Read.png`` is ``store_read.png`` on macOS and Windows)."""
    taken = {name.casefold() for name in FIXED_FIGURES}
    names = {}
    for operation in operations:
        base = name = _safe_name(operation)
        suffix = 1
        while name.casefold() in taken:
            suffix += 1
            name = f"{base}-{suffix}"
        taken.add(name.casefold())
        names[operation] = name
    return names


def _text(text: str) -> str:
    """Text from the file as matplotlib shows it literally: a '$' would start mathtext (and a
    malformed formula raises at draw time); control characters are shown escaped."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text).replace("$", r"\$")


# ------------------------------------------------------------------------------------- figures


def _store_read_figure(points: Sequence[Point], style: _Style, title: str) -> Figure | None:
    from matplotlib.figure import Figure

    present = [op for op in MAIN_OPERATIONS if any(p.operation == op for p in points)]
    if not present:
        return None
    figure = Figure(figsize=(6.5 * len(present), 10), layout="constrained")
    axes = figure.subplots(2, len(present), squeeze=False)
    for column, operation in enumerate(present):
        series = _series(points, operation)
        for row, log in enumerate((False, True)):
            ax = axes[row][column]
            _draw_seconds(ax, series, style, log=log)
            scale = "log-log axes" if log else "linear axes"
            ax.set_title(f"{OPERATION_TITLES[operation]} ({operation}), {scale}")
    _legend(figure, [ax for row in axes for ax in row], ncols=4)
    figure.suptitle(f"Time against number of images, median of rounds: {title}")
    return figure


def _operation_figure(points: Sequence[Point], operation: str, style: _Style, title: str) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6.5), layout="constrained")
    ax = figure.subplots()
    _draw_seconds(ax, _series(points, operation), style, log=True)
    ax.set_title(_text(f"{OPERATION_TITLES.get(operation, operation)} ({operation}), log-log axes"))
    _legend(figure, [ax], ncols=3)
    figure.suptitle(f"Median of rounds: {title}", fontsize="medium")
    return figure


def _presets_figure(points: Sequence[Point], style: _Style, title: str) -> Figure | None:
    """Time against file bytes for each setting of a backend that has presets (not nosync)."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    wanted = [
        p
        for p in points
        if p.kind == "imgstore"
        and p.operation in MAIN_OPERATIONS
        and p.variant not in SAME_BYTES_VARIANTS
        and p.file_bytes
    ]
    backends = sorted({p.backend for p in wanted if p.variant})
    if not backends:
        return None
    figure = Figure(figsize=(13, 5 * len(backends)), layout="constrained")
    axes = figure.subplots(len(backends), 2, squeeze=False)
    for row, backend in enumerate(backends):
        for column, operation in enumerate(MAIN_OPERATIONS):
            ax = axes[row][column]
            these = [p for p in wanted if p.backend == backend and p.operation == operation]
            if not these:
                ax.set_visible(False)
                continue
            largest = max(p.images for p in these)
            for p in sorted((p for p in these if p.images == largest), key=lambda p: p.variant):
                key = (p.kind, p.backend, p.dataset, p.variant)
                ax.plot([p.file_bytes], [p.seconds], **{**style.line(key), "linestyle": "none", "markersize": 9})
                label = _text(p.variant or "default")
                ax.annotate(label, (p.file_bytes, p.seconds), textcoords="offset points", xytext=(6, 4))
            ax.set_title(_text(f"{backend}: {operation} of {largest:,} images, by setting"))
            ax.set_xlabel("bytes in the files")
            ax.set_ylabel("time (median)")
            ax.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
            ax.yaxis.set_major_formatter(ticker.EngFormatter(unit="s"))
            ax.margins(0.25)
            ax.grid(True, alpha=0.4)
    figure.suptitle(f"Presets: time against bytes: {title}")
    return figure


def _draw_seconds(ax: Axes, series: dict[SeriesKey, list[Point]], style: _Style, *, log: bool) -> None:
    from matplotlib import ticker

    for key, pts in series.items():
        ax.plot([p.images for p in pts], [p.seconds for p in pts], label=style.label(key), **style.line(key))
    ax.set_xlabel("number of images")
    ax.set_ylabel("time (median)")
    if log:
        _log_axes(ax, y_unit="s")
    else:
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_formatter(ticker.EngFormatter())
        ax.yaxis.set_major_formatter(ticker.EngFormatter(unit="s"))
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)


def _log_axes(ax: Axes, y_unit: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label_log_axis(ax.xaxis, unit="")
    _label_log_axis(ax.yaxis, unit=y_unit)


def _label_log_axis(axis: Any, unit: str) -> None:
    """Labels such as '1 k' or '10 ms': engineering labels read faster than 10^-2."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(base=10))
    axis.set_major_formatter(ticker.EngFormatter(unit=unit))
    # Label 2x and 5x too when the data spans few decades, or there may be one label only.
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=(2, 5)))
    low, high = axis.get_data_interval()
    few_decades = low > 0 and high / low < 300
    axis.set_minor_formatter(ticker.EngFormatter(unit=unit) if few_decades else ticker.NullFormatter())


def _disk_figure(points: Sequence[Point], style: _Style, title: str) -> Figure | None:
    from matplotlib import ticker
    from matplotlib.figure import Figure

    # Bytes per (series, images): from store_many when it reported them, else any operation.
    disk: dict[SeriesKey, dict[int, int]] = {}
    for point in sorted(points, key=lambda p: p.operation != "store_many"):
        if point.disk_bytes is not None and point.variant not in SAME_BYTES_VARIANTS:
            sizes = disk.setdefault((point.kind, point.backend, point.dataset, point.variant), {})
            sizes.setdefault(point.images, point.disk_bytes)
    if not disk:
        return None
    keys = sorted(disk, key=lambda k: (KIND_ORDER.get(k[0], 3), k[0], k[1], k[3], k[2]))
    largest = max(n for sizes in disk.values() for n in sizes)

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    bars, per_image = figure.subplots(1, 2)
    at_largest = [key for key in keys if largest in disk[key]]
    values = [disk[key][largest] for key in at_largest]
    positions = list(range(len(at_largest)))
    drawn = bars.barh(positions, values, color=[style.line(k)["color"] for k in at_largest])
    for bar, key in zip(drawn, at_largest, strict=True):
        if key[0] == "tutorial":  # same colour as its backend, hatched like its dashed line
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    size = ticker.EngFormatter(unit="B", places=1)
    for y, value in zip(positions, values, strict=True):
        bars.annotate(size(value), (value, y), xytext=(4, 0), textcoords="offset points", va="center")
    bars.set_yticks(positions, [style.label(k) for k in at_largest])
    bars.invert_yaxis()  # legend order, top to bottom
    bars.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
    bars.set_xlim(right=max(values, default=1) * 1.25)  # room for the value labels
    bars.set_xlabel("bytes on disk")
    bars.set_title(f"Disk usage for {largest:,} images")
    bars.grid(True, axis="x", alpha=0.4)

    # Bytes *per image*: total bytes grow with N for every backend and the lines would overlap;
    # per image, the fixed overhead (small N) and the per-image cost (large N) both show.
    for key in keys:
        by_images = sorted(disk[key].items())
        per_image.plot(
            [n for n, _ in by_images], [b / n for n, b in by_images], label=style.label(key), **style.line(key)
        )
    per_image.set_xscale("log")
    _label_log_axis(per_image.xaxis, unit="")
    low, high = per_image.yaxis.get_data_interval()
    if low > 0 and high / low > 10:  # a large fixed overhead would squash the rest
        per_image.set_yscale("log")
    else:
        per_image.set_ylim(bottom=0)
    per_image.yaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
    per_image.set_xlabel("number of images")
    per_image.set_ylabel("bytes on disk per image")
    per_image.set_title("Disk usage per image against number of images")
    per_image.grid(True, which="major", alpha=0.4)
    per_image.legend(fontsize="small")
    figure.suptitle(f"Disk usage: {title}")
    return figure


def _legend(figure: Figure, axes: Sequence[Axes], ncols: int) -> None:
    """One legend under the figure for every series of its panels (a panel may lack some)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(list(entries.values()), list(entries), loc="outside lower center", ncols=ncols)


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path
