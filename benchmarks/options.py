"""The benchmark suite's command-line options, in one place so the root conftest.py can register them too.

pytest reads options of a conftest below the root only when it loads that conftest before parsing
the command line. Run from the root with a separate value (``--cutoffs 10``), the value is taken
for a path, testpaths are not used and benchmarks/conftest.py is loaded too late: only
``--cutoffs=10`` works. Registering them from the root conftest (``add_options(parser)`` in its
``pytest_addoption``) makes both forms work; whichever conftest calls first registers them.
"""

from __future__ import annotations

import pytest

from benchmarks.operations import NAMES, Subject
from imgstore.datasets import available_datasets, get_dataset

ALL_CUTOFFS = (10, 100, 1_000, 10_000, 100_000)
DEFAULT_CUTOFFS = "10,100,1000,10000"  # see benchmarks/README.md, "Measured"; `--cutoffs=all` adds 100 000
# The default run (--cutoffs left as is) leaves out the cases whose cost grows fastest with every
# backend (see in_default_run); any --cutoffs (the gate's =1000, =all) runs the whole matrix at its sizes.
DEFAULT_RUN_FULL_UP_TO = 1_000
DEFAULT_RUN_STORE_SINGLE_UP_TO = 10
DEFAULT_RUN_ALL_DECODERS = ("lmdb", "hdf5", "png")  # the targets' backends, and the one-file-per-image folder


def in_default_run(subject: Subject, operation: str, n: int) -> bool:
    """Whether the default run measures this case. ``store_single`` (one durable commit per image:
    1-4 s a round per row at 100 images, at 10 000 half of a three-backend run's time) up to 10
    images; the imagenet-like rows of the slower decoders for lmdb, hdf5 and png only; the other
    operations up to 1 000 for every row, and at 10 000 for the default imgstore rows, the limit,
    and the tutorial's bulk rows (``store_many``, ``read_many``)."""
    if operation == "store_single":
        return n <= DEFAULT_RUN_STORE_SINGLE_UP_TO
    if getattr(subject, "decoder", None) and not getattr(subject, "fastest", True):
        # imagenet-like rows of the slower decoders: for the backends the own-images targets name only
        return subject.backend in DEFAULT_RUN_ALL_DECODERS
    if n <= DEFAULT_RUN_FULL_UP_TO:
        return True
    if subject.kind == "tutorial":  # its per-call reads reopen the file: seconds a round at 10 000
        return operation in ("store_many", "read_many")
    return not subject.variant_kind


# The epoch rows of the default run: warm, the fixed-shape dataset at 10 000 images, 0 and 2 workers,
# the LIMIT, these imgstore backends and every installed peer (~1 min); the rest behind the options.
DEFAULT_RUN_EPOCH_CUTOFF = 10_000
DEFAULT_RUN_EPOCH_BACKENDS = ("lmdb", "hdf5")
CACHES = ("warm", "cold", "both")


def epoch_in_default_run(kind: str, backend: str, encoded: bool, n: int) -> bool:
    """Whether the default run measures this epoch row (warm rows only: cold needs --cache)."""
    if encoded or n != DEFAULT_RUN_EPOCH_CUTOFF:
        return False
    return kind != "imgstore" or backend in DEFAULT_RUN_EPOCH_BACKENDS


# The fixed-shape (CIFAR-like) dataset, then the encoded one: its rows run at --imagenet-cutoffs.
DEFAULT_DATASETS = "synthetic,imagenet-like"
# imagenet-like rows at 1 000 images (~0.1 GB of JPEGs) in the default run: a round decodes ~0.5 GB
# of pixels, so larger sizes are asked for (--imagenet-cutoffs), never implied.
DEFAULT_IMAGENET_CUTOFF = 1_000
# Re-encoded codecs cost a transcode per store and round: keep (the files as they are) by default.
IMAGENET_CODECS = ("keep", "jpeg", "png")


def add_options(parser: pytest.Parser) -> None:
    if getattr(parser, "_imgstore_benchmark_options", False):
        return  # already registered by the other conftest
    parser._imgstore_benchmark_options = True  # type: ignore[attr-defined]
    group = parser.getgroup("imgstore benchmarks")
    group.addoption(
        "--cutoffs",
        default=None,  # None: the default run (DEFAULT_CUTOFFS, less what in_default_run leaves out)
        help=f"comma list of image counts, or 'all' ({','.join(map(str, ALL_CUTOFFS))}); default {DEFAULT_CUTOFFS}, "
        "leaving out at 10 000 store_single and the variant rows (name the cutoffs to run them all)",
    )
    group.addoption(
        "--op-cutoffs",
        action="append",
        default=None,
        metavar="OPERATION=N[,N...]",
        help="measure OPERATION at these image counts instead of --cutoffs (repeatable; fixed-shape dataset), "
        "e.g. --op-cutoffs=store_single=100,1000: the regression gate's matrix (.ci/gate-matrix)",
    )
    group.addoption(
        "--read-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timed rounds a cheap read row may add, at most (default 2 s, at most 50 rounds; the gate runs "
        "with less): a row still gets its operation's least rounds",
    )
    group.addoption(
        "--max-rounds",
        type=int,
        default=None,
        metavar="N",
        help="at most N least timed rounds a row (default: the operation's, 2-20 by size; the gate takes 3); "
        "a cheap read row may still add rounds within --read-budget",
    )
    group.addoption(
        "--backends", default=None, help="comma list of imgstore backends to benchmark; default every registered one"
    )
    group.addoption(
        "--cache",
        default="warm",
        choices=CACHES,
        help="page cache of the read rows that have a cold variant (read_many, read_random, epoch): warm (default), "
        "cold (each round's files evicted with posix_fadvise and checked gone with mincore: '-cold' rows) or both",
    )
    group.addoption("--ops", default=None, help=f"comma list of operations; default all: {','.join(NAMES)}")
    group.addoption(
        "--dataset",
        default=DEFAULT_DATASETS,
        help="comma list of datasets (imgstore.datasets.load_dataset): at most one fixed-shape one ("
        + ", ".join(name for name in available_datasets() if name != "imagenet-like")
        + f") and imagenet-like (JPEG files, its own cutoffs); default {DEFAULT_DATASETS}",
    )
    group.addoption(
        "--dataset-root",
        default=None,
        help="directory of the dataset's files; needed by "
        + ", ".join(name for name in available_datasets() if get_dataset(name).needs_root)
        + "; for imagenet-like, the folder that caches its files (default: pytest's cache folder)",
    )
    group.addoption("--cifar10-dir", default=None, help="deprecated alias of --dataset-root")
    group.addoption(
        "--sharded",
        action="store_true",
        help="also run the sharded rows (benchmarks/test_sharded_rows.py): reads from a local S3 server, cold and "
        "warm cache, by shard size; a few records by byte ranges and whole; convert --shards on 1 and 2 Dask "
        "workers (about 2 min; off by default)",
    )
    group.addoption(
        "--imagenet-cutoffs",
        default="auto",
        help="image counts of the imagenet-like rows (comma list), or 'none'; default 'auto': "
        f"{DEFAULT_IMAGENET_CUTOFF} when --cutoffs is left at its default or 'all'; else the --cutoffs, all of "
        f"them if --dataset is given, those below {DEFAULT_IMAGENET_CUTOFF} if not (so --cutoffs 10 runs them at "
        "10, and the gate's --cutoffs=1000 runs none)",
    )
    group.addoption(
        "--imagenet-codecs",
        default="keep",
        help=f"codecs of the imagenet-like stores (comma list of {', '.join(IMAGENET_CODECS)}): keep stores the "
        "JPEG files as they are, jpeg re-encodes them at quality 90, png losslessly; default keep",
    )
