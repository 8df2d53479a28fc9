"""The data commands of the ``imgstore`` console script: ``convert``, ``info``, ``verify`` and ``sharded-clean``.

Wired into :mod:`imgstore.cli` through :data:`DATA_COMMANDS` (imported when the parser is built),
the same ``_add_<name>`` / handler pairs as its own commands. Exit status: 0 success; 2 bad input (a bad source, option,
DEST or source file); 1 any other failure (a damaged store, an I/O error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imgstore.errors import CorruptStoreError, ImgStoreError, StoreBusyError, StoreIOError, StoreNotFoundError

if TYPE_CHECKING:
    from imgstore.convert import ConvertResult
    from imgstore.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_FAILURES = (CorruptStoreError, StoreIOError, StoreBusyError)  # not the input's fault: exit 1

CONVERT_HELP = """\
Convert images into a store, on every core, committing every --batch-images images.

SOURCE is one of:
  a folder in torchvision's ImageFolder layout (SOURCE/<class>/.../<image>, the same classes, files
      and order as torchvision.datasets.ImageFolder); default codec keep (the files as they are),
      image mode RGB (what ImageFolder's loader gives); each record keeps its path
  a store (a directory holding imgstore.json): any backend and codec to any other
  a dataset: synthetic:N, imagenet-like:N, cifar10:PATH, fashion-mnist[:PATH]
      (arrays: default codec raw; imagenet-like's JPEG files: keep, RGB)

A stopped conversion (Ctrl-C, a crash, SIGKILL) continues with --resume: DEST holds a prefix of
SOURCE, committed in order. Bad files (truncated, not images, empty, decompression bombs) stop the
conversion with exit status 2 after committing the images before them (--on-error fail), or are
skipped and listed in the summary (--on-error skip, folders only).

exit status: 0 done, 2 bad input or a bad file, 1 another failure.
"""


# ------------------------------------------------------------------------------------------ convert


def _add_convert(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an image folder, a dataset or a store into a store",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="an ImageFolder, a store, or NAME:ARG for a dataset")
    parser.add_argument("dest", metavar="DEST", help="the store to write (a directory)")
    parser.add_argument("--backend", required=True, help="the store's backend: png, lmdb, hdf5, ...")
    parser.add_argument("--codec", choices=("keep", "raw", "png", "jpeg", "webp"), help="default: the source's")
    parser.add_argument("--quality", type=int, help="jpeg/webp quality (1-100)")
    parser.add_argument(
        "--image-mode",
        choices=("RGB", "L", "none"),
        help="what the images decode to: RGB, L (PIL's convert), none (as stored); default: the source's",
    )
    parser.add_argument(
        "--shape",
        type=_shape,
        metavar="HxWxC",
        help="every image's shape, HxWxC or HxW (e.g. 32x32x3): a store of one shape, as memmap needs; "
        "a file of another shape is a bad file (default: the source's; files may vary)",
    )
    parser.add_argument(
        "--downscale",
        type=int,
        metavar="N",
        help="make every image whose shorter side is over N pixels that much smaller (torchvision's Resize(N), "
        "bilinear), so that training decodes less; needs a codec that encodes, e.g. --codec jpeg --quality 90",
    )
    parser.add_argument("--workers", type=int, help="reader/encoder threads (default: one per core; 0: none)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="on a bad file (default: fail)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped conversion into DEST")
    parser.add_argument("--overwrite", action="store_true", help="replace the store at DEST")
    parser.add_argument("--batch-images", type=int, default=1000, help="images per commit (default: 1000)")
    parser.add_argument(
        "--full-check", action="store_true", help="keep: decode every file as a check (default: headers and ends)"
    )
    parser.add_argument("--split", choices=("train", "test"), default="train", help="a dataset's split")
    parser.add_argument(
        "--shards",
        type=int,
        help="write a sharded dataset of N shards at DEST (a path or fsspec URL) from a folder or dataset SOURCE, "
        "each shard converted with the options above (imgstore.sharded.building)",
    )
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="with --shards: shards of consecutive items in SOURCE's order (default: items shuffled first, so that "
        "an ImageFolder's shards, and the batches read from them, mix its classes)",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --shards: the shuffle's seed (default 0)")
    parser.add_argument(
        "--append", action="store_true", help="with --shards: add the new shards to the sharded dataset at DEST"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="with --shards: local threads (default), or one task per shard on Dask distributed",
    )
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", help="with --engine dask: an existing cluster (default: a LocalCluster)"
    )
    parser.set_defaults(handler=_run_convert, command="convert")


def _made_as(args: argparse.Namespace) -> dict[str, Any]:
    """What a conversion makes of each item, as convert() and convert_sharded() take it."""
    mode = args.image_mode
    return dict(
        codec=args.codec,
        quality=args.quality,
        image_mode="auto" if mode is None else None if mode == "none" else mode,
        shape=args.shape,
        full_check=args.full_check,
        downscale=args.downscale,
        split=args.split,
    )


def _run_sharded(args: argparse.Namespace) -> int:
    from imgstore.sharded.building import convert_sharded
    from imgstore.sources import ConvertError

    started = time.perf_counter()
    refused = [flag for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)) if given]
    if refused:
        why = "a sharded dataset is built whole and committed once; it grows by appending shards (--append)"
        verb = "does" if len(refused) == 1 else "do"
        return _error("convert", ValueError(f"{', '.join(refused)} {verb} not go with --shards: {why}"), EXIT_USAGE)
    skipped: list[Any] = []
    try:
        manifest = convert_sharded(
            args.source,
            args.dest,
            shards=args.shards,
            backend=args.backend,
            **_made_as(args),
            shuffle=not args.keep_order,
            seed=args.seed,
            append=args.append,
            on_error=args.on_error,
            skipped=skipped,
            engine=args.engine,
            scheduler=args.scheduler,
            workers=args.workers,
        )
    except ConvertError as exc:  # bad input: a bad file, a source or options that cannot be converted
        return _error("convert", exc, EXIT_USAGE)
    except _FAILURES as exc:
        return _error("convert", exc, EXIT_FAILED)
    except KeyboardInterrupt:
        print("imgstore convert: interrupted; nothing committed (the shards written were deleted)", file=sys.stderr)
        return 130
    made = manifest.shards[-args.shards :]  # this run's: an append's follow the dataset's own
    first = made[0]
    shape = "x".join(map(str, first.shape)) if first.shape is not None else "varied shapes"
    now = f"; it now holds {manifest.count} images in {len(manifest.shards)} shards" if args.append else ""
    print(
        f"converted {sum(s.count for s in made)} images into {len(made)} {args.backend} shards ({first.codec}, "
        f"{shape}) at {args.dest} ({args.engine}) in {time.perf_counter() - started:.2f} s{now}"
    )
    if skipped:
        print(f"  skipped {len(skipped)} bad files:")
        print("\n".join(f"    {item.path}: {item.reason}" for item in sorted(skipped, key=lambda item: item.path)))
    return EXIT_OK


def _run_convert(args: argparse.Namespace) -> int:
    from imgstore.convert import BadFileError, convert

    if args.shards is not None:
        return _run_sharded(args)
    if args.engine != "local" or args.scheduler is not None or args.keep_order or args.append or args.seed:
        why = "--engine, --scheduler, --keep-order, --seed and --append go with --shards"
        return _error("convert", ValueError(why), EXIT_USAGE)
    try:
        result = convert(
            args.source,
            args.dest,
            backend=args.backend,
            **_made_as(args),
            workers=args.workers,
            on_error=args.on_error,
            resume=args.resume,
            overwrite=args.overwrite,
            batch_images=args.batch_images,
        )
    except BadFileError as exc:
        print(format_summary(exc.result))
        return _error("convert", exc, EXIT_USAGE)
    except _FAILURES as exc:
        return _error("convert", exc, EXIT_FAILED)
    except KeyboardInterrupt:
        print("imgstore convert: interrupted; DEST keeps what was committed: rerun with --resume", file=sys.stderr)
        return 130
    print(format_summary(result))
    return EXIT_OK


def _shape(text: str) -> tuple[int, ...]:
    try:  # the sizes' count and range: convert checks them
        return tuple(int(size) for size in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxWxC or HxW (e.g. 32x32x3)") from None


def format_summary(result: ConvertResult) -> str:
    """What ``imgstore convert`` prints at the end (also when a bad file stopped it)."""
    resumed = f", resumed at item {result.start}" if result.start else ""
    mb = 1e6
    lines = [
        f"converted {result.written} images{resumed}: {result.dest} ({result.backend}, {result.codec}) now holds "
        f"{result.count} of the {result.total} items of {result.source}",
        f"  read {result.bytes_read / mb:.1f} MB, stored {result.bytes_stored / mb:.1f} MB "
        f"({result.disk_bytes / mb:.1f} MB on disk) in {result.seconds:.2f} s: "
        f"{result.images_per_second:.0f} images/s, {result.mb_per_second:.1f} MB/s",
    ]
    if result.skipped_before:
        lines.append(f"  {result.skipped_before} files were skipped by the run(s) this one resumed")
    if result.skipped:
        lines.append(f"  skipped {len(result.skipped)} bad files:")
        lines += [f"    {item.path}: {item.reason}" for item in result.skipped]
    return "\n".join(lines)


def _error(command: str, exc: BaseException, code: int) -> int:
    # As imgstore.cli prints its errors: one line (a path's control characters escaped). Not imported
    # from there: this module is on the storage side, which never imports the analysis side.
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(exc))
    print(f"imgstore {command}: error: {text}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------ info


def _add_info(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a store: backend, codec, count, shapes, bytes, images per class",
        description="Describe a store. Counting images per class reads every record (labels live with images).",
    )
    parser.add_argument("store", metavar="STORE", help="a store's directory, or a sharded dataset (a path or URL)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_info, command="info")


def _sharded(text: str) -> bool:
    """``text`` names a sharded dataset (a URL, or a folder holding its manifest), not a store."""
    from imgstore.sharded.manifest import MANIFEST_NAME

    if not ("://" in text or os.path.exists(text)):
        raise StoreNotFoundError(f"no imgstore store or sharded dataset at {text}: it does not exist")
    return "://" in text or os.path.isfile(os.path.join(text, MANIFEST_NAME))


def _run_info(args: argparse.Namespace) -> int:
    from imgstore.opening import open_store

    try:
        if _sharded(args.store):
            from imgstore.sharded.describe import format_sharded_info, sharded_info

            info = sharded_info(args.store)
            print(json.dumps(info, indent=2) if args.json else format_sharded_info(info))
            return EXIT_OK
        with open_store(args.store, mode="r", verify_reads=False) as store:
            info = store_info(store)
    except _FAILURES as exc:
        return _error("info", exc, EXIT_FAILED)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return EXIT_OK


def store_info(store: Store) -> dict[str, Any]:
    """What ``imgstore info`` shows, as JSON-ready values."""
    import numpy as np

    shapes = store.image_shapes()
    count = len(store)
    totals: dict[int, int] = {}
    step = 4096
    for start in range(0, count, step):
        span = range(start, min(start + step, count))
        labels = store.get_encoded_many(span)[1] if store.varied or store.codec != "raw" else store.get_many(span)[1]
        for label, n in zip(*np.unique(labels, return_counts=True), strict=True):
            totals[int(label)] = totals.get(int(label), 0) + int(n)
    names = store.classes
    per_class = {str(label): totals[label] for label in sorted(totals)}
    if names is not None:  # every class, in label order, with the images of none too
        per_class = {name: totals.get(label, 0) for label, name in enumerate(names)}

    def spread(column: np.ndarray) -> dict[str, float] | None:
        if not len(column):
            return None
        return {"min": int(column.min()), "median": float(np.median(column)), "max": int(column.max())}

    disk = store.disk_usage()
    values, numbers = np.unique(shapes[:, 2], return_counts=True)
    return {
        "path": str(store.path),
        "backend": store.backend,
        "codec": store.codec,
        "codec_params": store.codec_params,
        "downscale": store.downscale,
        "image_mode": store.image_mode,
        "count": count,
        "shape": list(store.shape) if store.shape is not None else None,
        "varied": store.varied,
        "height": spread(shapes[:, 0]),
        "width": spread(shapes[:, 1]),
        "channels": {str(c): int(n) for c, n in zip(values.tolist(), numbers.tolist(), strict=True)},
        "disk_bytes": disk,
        "bytes_per_image": disk / count if count else None,
        "classes": names,
        "images_per_class": per_class,
    }


def format_info(info: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in info["codec_params"].items())

    def spread(name: str) -> str:
        value = info[name]
        return f"{value['min']} / {value['median']:g} / {value['max']}" if value else "-"

    per_image = f" ({info['bytes_per_image'] / 1e3:.1f} kB per image)" if info["bytes_per_image"] else ""
    lines = [
        f"store       {info['path']}",
        f"backend     {info['backend']}",
        f"codec       {info['codec']}{f' ({params})' if params else ''}",
        *([f"downscaled  to shorter side {info['downscale']} (convert --downscale)"] if info.get("downscale") else []),
        f"image mode  {info['image_mode'] or 'as stored'}",
        f"images      {info['count']}",
        f"shape       {'varied' if info['varied'] else info['shape']}",
        f"height      {spread('height')} (min / median / max)",
        f"width       {spread('width')} (min / median / max)",
        f"channels    {', '.join(f'{c}: {n} images' for c, n in info['channels'].items()) or '-'}",
        f"on disk     {info['disk_bytes'] / 1e6:.1f} MB{per_image}",
        f"classes     {len(info['classes']) if info['classes'] is not None else 'unnamed'}",
    ]
    lines += [f"  {name:<20} {n}" for name, n in info["images_per_class"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ verify


def _add_verify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check every record of a store against its checksum; exit 1 at the first damaged one",
        description="Check every record against its checksum (exit 0: 'ok: N images'; 1: the first damaged index).",
    )
    parser.add_argument("store", metavar="STORE", help="a store's directory, or a sharded dataset (a path or URL)")
    parser.add_argument("--decode", action="store_true", help="also decode every image")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="a remote sharded dataset: the shard cache its shards are fetched into (default ~/.cache/imgstore-shards)",
    )
    parser.set_defaults(handler=_run_verify, command="verify")


def _run_verify(args: argparse.Namespace) -> int:
    from imgstore.opening import open_store

    try:
        if _sharded(args.store):
            from imgstore.sharded.describe import verify_sharded

            print(verify_sharded(args.store, decode=args.decode, cache_dir=args.cache_dir))
            return EXIT_OK
        with open_store(args.store, mode="r") as store:
            count = len(store)
            decode = args.decode and (store.varied or store.codec != "raw")  # raw pixels: the checksums are all
            try:
                store.verify()
                step = 256  # decoded photos are ~0.5 MB each: a batch stays ~100 MB
                for start in range(0, count if decode else 0, step):
                    store.get_many(range(start, min(start + step, count)))
            except CorruptStoreError as exc:
                return _error("verify", _first_damage(store, exc, decode), EXIT_FAILED)
    except _FAILURES as exc:
        return _error("verify", exc, EXIT_FAILED)
    print(f"ok: {count} images{' (checksums and decoding)' if args.decode else ''}")
    return EXIT_OK


def _first_damage(store: Store, found: CorruptStoreError, decode: bool) -> ImgStoreError:
    """The damage ``found`` (by a batch check) pinned to its first record, with the record's source path."""
    encoded = store.varied or store.codec != "raw"
    step = 256

    def check(span: range) -> None:
        if encoded:
            store.get_encoded_many(span)  # the checksums
        if decode or not encoded:
            store.get_many(span)

    for start in range(0, len(store), step):
        span = range(start, min(start + step, len(store)))
        try:
            check(span)
            continue
        except CorruptStoreError:
            pass
        for index in span:
            try:
                check(range(index, index + 1))
            except CorruptStoreError as exc:
                try:
                    source = store.source_path(index)
                except ImgStoreError:
                    source = None
                where = f" (source {source})" if source else ""
                why = str(exc).removeprefix(f"{store.path}: ")  # the path is said once
                return CorruptStoreError(f"{store.path}: image {index}{where} is damaged: {why}")
    return found


# ----------------------------------------------------------------------------------- sharded-clean

SHARDED_CLEAN_HELP = """\
List the shard folders of a sharded dataset that no manifest names (what killed writers left:
shards/shard-<hex>/ never committed, shards/.shard-<hex>.tmp/ half written) and in which nothing
was written for --grace-hours; with --delete, delete them. Nothing else is touched. A running
writer's shards are young or await their commit: the grace must be longer than the longest a
writer holds shards before its commit (a whole convert --shards run). URL: a path or fsspec URL
(credentials and endpoint as fsspec and its backend read them, e.g. AWS_* variables for s3://).

exit status: 0 done (one line a folder: name, MB, age in hours), 2 bad input, 1 another failure.
"""


def _add_sharded_clean(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sharded-clean",
        help="list (or --delete) a sharded dataset's shard folders that no manifest names",
        description=SHARDED_CLEAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", metavar="URL", help="the sharded dataset: a path or fsspec URL")
    parser.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    parser.add_argument(
        "--grace-hours", type=float, default=24.0, metavar="H", help="only folders unwritten this long (default 24)"
    )
    parser.set_defaults(handler=_run_sharded_clean, command="sharded-clean")


def _run_sharded_clean(args: argparse.Namespace) -> int:
    from imgstore.sharded.cleaning import clean_shards

    if not 0 <= args.grace_hours < float("inf"):
        return _error("sharded-clean", ValueError(f"--grace-hours must be >= 0, got {args.grace_hours}"), EXIT_USAGE)
    try:
        found = clean_shards(args.url, delete=args.delete, grace=args.grace_hours * 3600)
    except _FAILURES as exc:
        return _error("sharded-clean", exc, EXIT_FAILED)
    for leftover in found:
        print(f"{leftover.name}\t{leftover.bytes / 1e6:.1f} MB\t{leftover.age / 3600:.1f} h")
    total = sum(leftover.bytes for leftover in found) / 1e6
    verb = "deleted" if args.delete else "unreferenced (dry run: --delete deletes them)"
    try:  # unreferenced but written to within the grace: a writer's, perhaps; kept, and said so
        young = len(clean_shards(args.url, grace=0)) - (0 if args.delete else len(found))
    except _FAILURES:
        young = 0
    kept = f"; {young} younger than --grace-hours kept" if young > 0 else ""
    plural = "" if len(found) == 1 else "s"
    print(f"{len(found)} shard folder{plural}, {total:.1f} MB, {verb}{kept}", file=sys.stderr)
    return EXIT_OK


DATA_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_convert,
    _add_info,
    _add_verify,
    _add_sharded_clean,
)
