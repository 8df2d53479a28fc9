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

import numpy as np
import pytest

import imgstore
from benchmarks.operations import NAMES, OPERATIONS, Subject, get_operation
from benchmarks.options import ALL_CUTOFFS, add_options
from benchmarks.subjects import KINDS, make_subjects
from imgstore.analysis.report import format_seconds
from imgstore.analysis.schema import ResultRecord
from imgstore.fileio import disk_usage, file_bytes

SLOWDOWN_VARIABLE = "IMGSTORE_BENCH_INJECT_SLOWDOWN"
RESULTS = pytest.StashKey[list]()  # the Metadata of every benchmark run, for the summary


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def selected_cutoffs(config: pytest.Config) -> list[int]:
    value = config.getoption("cutoffs")
    if value == "all":
        return list(ALL_CUTOFFS)
    try:
        cutoffs = [int(item) for item in _comma_list(value)]
    except ValueError:
        raise pytest.UsageError(f"--cutoffs takes 'all' or a comma list of integers, got {value!r}") from None
    if not cutoffs or min(cutoffs) < 1:
        raise pytest.UsageError(f"--cutoffs must be positive image counts, got {value!r}")
    return cutoffs


def selected_operations(config: pytest.Config) -> list[str]:
    """Names of the operations asked for, in the table's order (benchmarks/operations.py)."""
    value = config.getoption("ops")
    ops = _comma_list(value) if value else list(NAMES)
    unknown = set(ops) - set(NAMES)
    if unknown:
        raise pytest.UsageError(f"--ops: unknown operation(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    return [op for op in NAMES if op in ops]


def selected_subjects(config: pytest.Config) -> list[Subject]:
    value = config.getoption("backends")
    registered = imgstore.available_backends()
    backends = _comma_list(value) if value else registered
    unknown = set(backends) - set(registered)
    if unknown:
        raise pytest.UsageError(
            f"--backends: no imgstore backend {', '.join(sorted(unknown))}; registered: {', '.join(registered)}"
        )
    return make_subjects(backends)


def selected_dataset(config: pytest.Config) -> tuple[str, str | None]:
    """(name, root) from --dataset and --dataset-root (or its deprecated alias --cifar10-dir)."""
    from imgstore.datasets import get_dataset

    name = config.getoption("dataset")
    root = config.getoption("dataset_root")
    alias = config.getoption("cifar10_dir")
    if alias is not None:
        if root is not None and root != alias:
            raise pytest.UsageError("--cifar10-dir is an alias of --dataset-root: give one of them")
        root = alias
    spec = get_dataset(name)
    if spec.needs_root and root is None:
        raise pytest.UsageError(f"--dataset {name} needs --dataset-root: {spec.install_hint}")
    return name, root


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("cifar10_dir", None) is not None:
        config.issue_config_time_warning(
            DeprecationWarning("--cifar10-dir is deprecated: use --dataset-root (it takes the same directory)"),
            stacklevel=2,
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Cases ordered cutoff, then operation, then subject: the rows of one group run back to back."""
    if "subject_name" not in metafunc.fixturenames:
        return
    config = metafunc.config
    dataset, _root = selected_dataset(config)
    subjects = selected_subjects(config)
    cases = [
        (subject.name, op, n)
        for n in selected_cutoffs(config)
        for op in selected_operations(config)
        for subject in subjects
        if op in subject.operations
    ]
    metafunc.parametrize(
        "subject_name,operation,cutoff", cases, ids=[f"{name}-{op}-{n}-{dataset}" for name, op, n in cases]
    )


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def subjects(pytestconfig: pytest.Config) -> dict[str, Subject]:
    return {subject.name: subject for subject in selected_subjects(pytestconfig)}


@pytest.fixture(scope="session")
def dataset(pytestconfig: pytest.Config) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, images, labels), as many as the biggest cutoff; each benchmark takes the first N."""
    name, root = selected_dataset(pytestconfig)
    from imgstore.datasets import load_dataset  # here, not at import: plain `pytest` loads this conftest too

    images, labels = load_dataset(name, max(selected_cutoffs(pytestconfig)), root=root, seed=0)
    return name, np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels)


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
    """The store each read benchmark reads: built once per (dataset, subject, cutoff), shared by all read operations."""

    def __init__(self, root: Path, dataset: tuple[str, np.ndarray, np.ndarray]) -> None:
        self.root = root
        self.dataset = dataset
        self.built: dict[tuple[str, int], tuple[Path, int, int]] = {}

    def get(self, subject: Subject, n: int) -> tuple[Path, int, int]:
        """(path, bytes on disk, bytes in files) of the store holding the first ``n`` images."""
        key = (subject.name, n)
        if key not in self.built:
            name, images, labels = self.dataset
            path = self.root / f"{name}-{subject.name}-{n}"
            subject.build(path, images[:n], labels[:n])
            self.built[key] = (path, disk_usage(path), file_bytes(path))
        return self.built[key]


@pytest.fixture(scope="session")
def read_stores(work_dir: Path, dataset: tuple[str, np.ndarray, np.ndarray]) -> ReadStores:
    return ReadStores(work_dir / "read", dataset)


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> list:
    return pytestconfig.stash.setdefault(RESULTS, [])


@pytest.fixture(scope="session")
def injected_slowdown() -> tuple[str, str, float] | None:
    return parse_slowdown(os.environ.get(SLOWDOWN_VARIABLE, ""))


def parse_slowdown(value: str) -> tuple[str, str, float] | None:
    """``"<subject>:<operation>:<fraction>"`` -> (subject, operation, fraction); empty -> None."""
    if not value:
        return None
    try:
        subject, operation, fraction = value.rsplit(":", 2)
        result = (subject, operation, float(fraction))
    except ValueError:
        raise pytest.UsageError(
            f"{SLOWDOWN_VARIABLE} must be '<subject>:<operation>:<fraction>', got {value!r}"
        ) from None
    if operation not in NAMES or result[2] < 0:
        raise pytest.UsageError(f"{SLOWDOWN_VARIABLE}: unknown operation or negative fraction in {value!r}")
    return result


# ---------------------------------------------------------------------- ratios, JSON, ordering, summary


def fill_ratios(benchmarks: list[Any]) -> None:
    """Set ratio_to_limit / ratio_to_tutorial of every row from the reference rows of this same run.

    The reference of a row is the row of the same dataset, operation and cutoff whose kind is
    "limit" and backend "raw" (the durable limit), and the "tutorial" row of the row's backend.
    A row of an operation with ``speedup_over`` (read_random_many) also gets speedup_over_single:
    the same subject's median of that operation (read_random: the same images, one get each) over
    its own.  Each row's extra_info is its :class:`ResultRecord`, read and written back whole.
    """
    rows = [(b, ResultRecord.from_extra_info(b.extra_info)) for b in benchmarks if b and "operation" in b.extra_info]
    limit: dict[tuple, float] = {}
    tutorial: dict[tuple, float] = {}
    by_subject: dict[tuple, float] = {}  # every median, by (dataset, operation, images, subject)
    for bench, record in rows:
        key = (record.dataset, record.operation, record.images)
        by_subject[(*key, bench.params["subject_name"])] = bench.stats.median
        if record.kind == "limit" and record.backend == "raw":
            limit[key] = bench.stats.median
        if record.kind == "tutorial":
            tutorial[(*key, record.backend)] = bench.stats.median
    for bench, record in rows:
        key = (record.dataset, record.operation, record.images)
        median = bench.stats.median
        to_limit, to_tutorial = limit.get(key), tutorial.get((*key, record.backend))
        over = get_operation(record.operation).speedup_over
        single = by_subject.get((record.dataset, over, record.images, bench.params["subject_name"])) if over else None
        filled = dataclasses.replace(
            record,
            ratio_to_limit=median / to_limit if to_limit else None,
            ratio_to_tutorial=median / to_tutorial if to_tutorial else None,
            speedup_over_single=single / median if single else None,
        )
        bench.extra_info.update(filled.to_extra_info())


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list[Any], output_json: dict) -> None:
    fill_ratios(benchmarks)
    by_name = {bench.fullname: bench.extra_info for bench in benchmarks}
    for entry in output_json["benchmarks"]:
        entry["extra_info"].update(by_name.get(entry["fullname"], {}))


def _group_order(name: str | None) -> tuple:
    """Groups "<operation> n=<cutoff>" in the order of the operations' table, then by cutoff as a number."""
    operation, _, n = (name or "").partition(" n=")
    if operation in NAMES and n.isdigit():
        return (NAMES.index(operation), int(n), "")
    return (len(NAMES), 0, name or "")


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
    slowdown = os.environ.get(SLOWDOWN_VARIABLE)
    if slowdown:
        tr.write_line(f"WARNING: {SLOWDOWN_VARIABLE}={slowdown} is set: that row is slowed down on purpose", red=True)
    groups: dict[str, list[Any]] = {}
    for bench in rows:
        groups.setdefault(bench.group, []).append(bench)
    for group in sorted(groups, key=_group_order):
        ordered = sorted(
            groups[group],
            key=lambda b: (KINDS.index(b.extra_info["kind"]), b.extra_info["backend"], b.params["subject_name"]),
        )
        operation = get_operation(ordered[0].extra_info["operation"])
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
