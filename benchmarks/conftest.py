"""Options, parametrization, shared stores and reporting of the imgstore benchmarks (see README.md here).

Every benchmark is one (subject, operation, cutoff) case of ``test_storage``; the cases are made
here from the options, so a backend registered in imgstore is benchmarked with no new code.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import imgstore
from benchmarks.data import ENCODED_DATASETS, BenchData, comma_list, cutoffs_for, selected_datasets
from benchmarks.data import load as load_data
from benchmarks.encoded import make_encoded_subjects
from benchmarks.epoch_report import is_epoch, write_epoch_group, write_epoch_targets
from benchmarks.folder import STATUS_QUO_BACKEND
from benchmarks.inject import SLOWDOWN_VARIABLE, Injection, parse_slowdown
from benchmarks.operations import NAMES, OPERATIONS, Subject, get_operation, set_round_limits
from benchmarks.options import IMAGENET_CODECS, add_options, epoch_in_default_run, in_default_run
from benchmarks.subjects import KINDS, make_subjects
from benchmarks.targets import write_encoded_group, write_targets
from benchmarks.verdict import write_verdict
from imgstore.analysis.report import format_seconds
from imgstore.analysis.schema import ResultRecord
from imgstore.fileio import disk_usage, file_bytes

RESULTS = pytest.StashKey[list]()  # the Metadata of every benchmark run, for the summary


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def selected_operations(config: pytest.Config) -> list[str]:
    """Names of the operations asked for, in the table's order (benchmarks/operations.py)."""
    value = config.getoption("ops")
    ops = comma_list(value) if value else list(NAMES)
    unknown = set(ops) - set(NAMES)
    if unknown:
        raise pytest.UsageError(f"--ops: unknown operation(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    return [op for op in NAMES if op in ops]


def selected_backends(config: pytest.Config) -> list[str]:
    """The imgstore backends asked for (--backends), default every installed one."""
    value = config.getoption("backends")
    registered = imgstore.available_backends()
    backends = comma_list(value) if value else imgstore.installed_backends()  # a missing library: not a row
    unknown = set(backends) - set(registered)
    if unknown:
        raise pytest.UsageError(
            f"--backends: no imgstore backend {', '.join(sorted(unknown))}; registered: {', '.join(registered)}"
        )
    return backends


def selected_caches(config: pytest.Config) -> list[str]:
    """--cache: the page-cache states of the operations that have a cold row."""
    value = config.getoption("cache")
    return ["warm", "cold"] if value == "both" else [value]


def selected_subjects(config: pytest.Config, dataset: str) -> list[Subject]:
    """The rows of ``dataset``: the fixed-shape suite's (subjects.py), or an encoded dataset's (encoded.py)."""
    backends = selected_backends(config)
    if dataset not in ENCODED_DATASETS:
        return make_subjects(backends)
    codecs = comma_list(config.getoption("imagenet_codecs"))
    unknown = set(codecs) - set(IMAGENET_CODECS)
    if unknown or not codecs:
        raise pytest.UsageError(f"--imagenet-codecs: takes a comma list of {', '.join(IMAGENET_CODECS)}")
    return make_encoded_subjects(backends, [c for c in IMAGENET_CODECS if c in codecs])


def pytest_configure(config: pytest.Config) -> None:
    try:
        set_round_limits(config.getoption("read_budget", None), config.getoption("max_rounds", None))
    except ValueError as exc:
        raise pytest.UsageError(f"--read-budget/--max-rounds: {exc}") from None
    if config.getoption("cifar10_dir", None) is not None:
        config.issue_config_time_warning(
            DeprecationWarning("--cifar10-dir is deprecated: use --dataset-root (it takes the same directory)"),
            stacklevel=2,
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Cases per dataset (the fixed-shape one first), cutoff, operation, subject: a group's rows run back to back."""
    if "loader_name" in metafunc.fixturenames:
        epoch_cases(metafunc)
        return
    if "subject_name" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = []
    trimmed = default_sizes(config)  # the default run: what stays affordable
    caches = selected_caches(config)
    for dataset in selected_datasets(config):
        subjects = selected_subjects(config, dataset)
        cases += [
            (subject.name, op, n, dataset, cache)
            for n in cutoffs_for(config, dataset)
            for op in selected_operations(config)
            if n in cutoffs_for(config, dataset, op)
            for cache in (caches if get_operation(op).cold else ["warm"])
            for subject in subjects
            if op in subject.operations and (not trimmed or in_default_run(subject, op, n))
        ]
    metafunc.parametrize(
        "subject_name,operation,cutoff,dataset_name,cache",
        cases,
        # the saved runs' names: never change (a cold row adds "-cold")
        ids=[f"{name}-{op}-{n}-{dataset}" + _cold_id(cache) for name, op, n, dataset, cache in cases],
    )


def default_sizes(config: pytest.Config) -> bool:
    """No size named (neither --cutoffs nor --op-cutoffs): the default run, trimmed by in_default_run."""
    return config.getoption("cutoffs") is None and not config.getoption("op_cutoffs")


def _cold_id(cache: str) -> str:
    return "-cold" if cache == "cold" else ""


def epoch_cases(metafunc: pytest.Metafunc) -> None:
    """The epoch rows: dataset, cutoff, cache, workers, loader (benchmarks/epoch.py; the default run's: options.py)."""
    from benchmarks.epoch import WORKERS, loader_classes

    config = metafunc.config
    cases = []
    if "epoch" in selected_operations(config):
        trimmed = default_sizes(config)
        for dataset in selected_datasets(config):
            encoded = dataset in ENCODED_DATASETS
            cases += [
                (cls.name, workers, n, dataset, cache)
                for n in cutoffs_for(config, dataset, "epoch")
                for cache in selected_caches(config)
                for workers in WORKERS
                for cls in loader_classes(selected_backends(config), encoded, n)
                if not trimmed
                or (cache == "warm" and epoch_in_default_run(cls.kind, getattr(cls, "backend", ""), encoded, n))
            ]
    metafunc.parametrize(
        "loader_name,workers,cutoff,dataset_name,cache",
        cases,
        ids=[f"{name}-epoch-w{w}-{n}-{dataset}" + _cold_id(cache) for name, w, n, dataset, cache in cases],
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def subjects(pytestconfig: pytest.Config) -> dict[str, dict[str, Subject]]:
    """Every row of the run: dataset -> subject name -> subject (both datasets have a "limit")."""
    return {
        dataset: {subject.name: subject for subject in selected_subjects(pytestconfig, dataset)}
        for dataset in selected_datasets(pytestconfig)
    }


class BenchDataSet:
    """The run's datasets, each loaded when its first benchmark runs, then kept for the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.loaded: dict[str, BenchData] = {}

    def get(self, name: str) -> BenchData:
        if name not in self.loaded:
            self.loaded[name] = load_data(self.config, name)
        return self.loaded[name]


@pytest.fixture(scope="session")
def bench_data(pytestconfig: pytest.Config) -> BenchDataSet:
    return BenchDataSet(pytestconfig)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every store of the session. Nothing in it is deleted before the session ends: mass deletes of
    files slow down file creation on this machine class for minutes, which would distort the PNG
    store benchmarks that follow. Deleted at the end (pytest would otherwise keep three sessions' worth)."""
    # Written back now, not during this session's write benchmarks: what an earlier run (say the
    # other side of an interleaved gate run) left unsynced or deleted.
    os.sync()
    path = tmp_path_factory.mktemp("imgstore-bench")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # and this session's deletes, before whatever runs next


class ReadStores:
    """The store each read benchmark reads: built once per (dataset, subject.store_key, cutoff), shared by reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str, int], tuple[Path, int, int]] = {}

    def get(self, data: BenchData, subject: Subject, n: int) -> tuple[Path, int, int]:
        """(path, bytes on disk, bytes in files) of the store holding the first ``n`` images."""
        key = (data.name, subject.store_key, n)
        if key not in self.built:
            path = self.root / f"{data.name}-{subject.store_key}-{n}"
            subject.build(path, data.images[:n], data.labels[:n])
            self.built[key] = (path, disk_usage(path), file_bytes(path))
        return self.built[key]


@pytest.fixture(scope="session")
def read_stores(work_dir: Path) -> ReadStores:
    return ReadStores(work_dir / "read")


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> list:
    return pytestconfig.stash.setdefault(RESULTS, [])


@pytest.fixture(scope="session")
def injected_slowdown() -> list[Injection]:
    return parse_slowdown(os.environ.get(SLOWDOWN_VARIABLE, ""))


# ---------------------------------------------------------------------- ratios, JSON, ordering, summary


def fill_ratios(benchmarks: list[Any]) -> None:
    """Set ratio_to_limit / ratio_to_tutorial of every row from the reference rows of this same run.

    The reference of a row is the row of the same dataset, operation and cutoff whose kind is
    "limit" and backend "raw" (the durable limit; an encoded dataset's LIMIT), and the "tutorial"
    row of the row's backend, or for an encoded dataset the ImageFolder status quo (the tutorial
    row of backend "imagefolder": the reference of every row of its group).
    A row of an operation with ``speedup_over`` (read_random_many) also gets speedup_over_single:
    the same subject's median of that operation (read_random: the same images, one get each) over
    its own.  Each row's extra_info is its :class:`ResultRecord`, read and written back whole.
    """
    rows = [(b, ResultRecord.from_extra_info(b.extra_info)) for b in benchmarks if b and "operation" in b.extra_info]
    limit: dict[tuple, float] = {}
    tutorial: dict[tuple, float] = {}
    status_quo: dict[tuple, float] = {}
    by_subject: dict[tuple, float] = {}  # every median, by (dataset, operation, images, subject)
    for bench, record in rows:
        key = _reference_key(bench, record)
        by_subject[(*key, _row_name(bench))] = bench.stats.median
        if record.kind == "limit" and record.backend == "raw":
            limit[key] = bench.stats.median
        if record.kind == "tutorial":
            tutorial[(*key, record.backend)] = bench.stats.median
            if record.backend == STATUS_QUO_BACKEND:
                status_quo[key] = bench.stats.median
    for bench, record in rows:
        key = _reference_key(bench, record)
        median = bench.stats.median
        to_limit, to_tutorial = limit.get(key), tutorial.get((*key, record.backend)) or status_quo.get(key)
        over = get_operation(record.operation).speedup_over
        single = by_subject.get((record.dataset, over, record.images, *key[3:], _row_name(bench))) if over else None
        filled = dataclasses.replace(
            record,
            ratio_to_limit=median / to_limit if to_limit else None,
            ratio_to_tutorial=median / to_tutorial if to_tutorial else None,
            speedup_over_single=single / median if single else None,
        )
        bench.extra_info.update(filled.to_extra_info())


def _reference_key(bench: Any, record: ResultRecord) -> tuple:
    """Rows compared with each other: same dataset, operation, N, page cache and (epoch) workers."""
    info = bench.extra_info
    return (record.dataset, record.operation, record.images, info.get("cache", "warm"), info.get("workers"))


def _row_name(bench: Any) -> str:
    return str(bench.params.get("subject_name") or bench.params.get("loader_name"))


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list[Any], output_json: dict) -> None:
    fill_ratios(benchmarks)
    by_name = {bench.fullname: bench.extra_info for bench in benchmarks}
    for entry in output_json["benchmarks"]:
        entry["extra_info"].update(by_name.get(entry["fullname"], {}))


def _group_order(name: str | None) -> tuple:
    """Groups "<operation> n=<cutoff>[ w=<workers>][ <encoded dataset>][ cold]": the fixed-shape dataset's first,
    each dataset's in the order of the operations' table, then by cutoff as a number, workers, warm before cold."""
    operation, _, rest = (name or "").partition(" n=")
    n, *words = rest.split(" ")
    cold = "cold" in words
    workers = next((int(w[2:]) for w in words if w.startswith("w=") and w[2:].isdigit()), -1)
    dataset = " ".join(w for w in words if w != "cold" and not w.startswith("w="))
    if operation in NAMES and n.isdigit():
        return (dataset, NAMES.index(operation), int(n), workers, cold, "")
    return ("~", len(NAMES), 0, 0, False, name or "")


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config: pytest.Config, benchmarks: list, group_by: str) -> Generator[None, list, list]:
    groups = yield
    if group_by == "group":
        groups = sorted(groups, key=lambda pair: _group_order(pair[0]))
    return groups


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(
    terminalreporter: Any, exitstatus: int, config: pytest.Config
) -> Generator[None, object, object]:
    """After pytest-benchmark's tables (even when its regression check fails): the figures its table cannot show."""
    try:
        return (yield)
    finally:
        _write_summary(terminalreporter, config.stash.get(RESULTS, []))


def _write_summary(tr: Any, benchmarks: list[Any]) -> None:
    rows = [b for b in benchmarks if b and "operation" in b.extra_info]
    if not rows:
        return
    fill_ratios(rows)
    tr.section("imgstore benchmarks: medians of this run; xlimit / xtutorial = median / that reference row's median")
    speedups = "; ".join(f"{op.speedup_over} median / {op.name} median" for op in OPERATIONS if op.speedup_over)
    tr.write_line(
        "disk MB: blocks allocated (as du counts); file MB: bytes in the files"
        + (f"; xsingle: {speedups} (the same images, one get each)" if speedups else "")
    )
    if any(bench.extra_info["dataset"] in ENCODED_DATASETS for bench in rows):
        tr.write_line(
            "encoded datasets (imagenet-like): MB/s and KB/image: the bytes stored (file MB) per second and per image; "
            "xfolder: median / the ImageFolder status quo's median"
        )
    slowdown = os.environ.get(SLOWDOWN_VARIABLE)
    if slowdown:
        tr.write_line(f"WARNING: {SLOWDOWN_VARIABLE}={slowdown} is set: that row is slowed down on purpose", red=True)
    groups: dict[str, list[Any]] = {}
    for bench in rows:
        groups.setdefault(bench.group, []).append(bench)
    for group in sorted(groups, key=_group_order):
        if is_epoch(groups[group][0]):
            write_epoch_group(tr, group, groups[group])
            continue
        ordered = sorted(
            groups[group],
            key=lambda b: (KINDS.index(b.extra_info["kind"]), b.extra_info["backend"], b.params["subject_name"]),
        )
        operation = get_operation(ordered[0].extra_info["operation"])
        if ordered[0].extra_info["dataset"] in ENCODED_DATASETS:
            write_encoded_group(tr, group, operation, ordered)
            continue
        many = operation.speedup_over is not None  # the xsingle column
        tr.write_line(f"{group} ({ordered[0].extra_info['dataset']}): {operation.title}", bold=True)
        tr.write_line(
            f"  {'subject':<24}{'median':>11}{'images/s':>13}{'xlimit':>9}{'xtutorial':>11}"
            f"{'disk MB':>10}{'file MB':>10}" + (f"{'xsingle':>9}" if many else "")
        )
        for bench in ordered:
            info = bench.extra_info
            tr.write_line(
                f"  {bench.params['subject_name']:<24}{format_seconds(bench.stats.median):>11}"
                f"{info['images_per_second']:>13,.0f}"
                f"{_ratio(info['ratio_to_limit']):>9}{_ratio(info['ratio_to_tutorial']):>11}"
                f"{info['disk_bytes'] / 1e6:>10.2f}{info['file_bytes'] / 1e6:>10.2f}"
                + (f"{_ratio(info['speedup_over_single']):>9}" if many else "")
            )
    write_targets(tr, rows)
    write_epoch_targets(tr, rows)
    write_verdict(tr, rows)
