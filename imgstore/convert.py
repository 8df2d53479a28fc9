"""Convert a folder of images, a dataset or another store into a store: :func:`convert`, behind ``imgstore convert``.

A pool of workers (threads by default: see :data:`EXECUTORS`) reads the source's items in chunks
and makes each into a record (:func:`imgstore.sources.prepare_batch`); this process only writes,
in the source's order, one ``put_*`` call, so one all-or-nothing commit, every ``batch_images``
images or ``batch_bytes`` bytes.

Resuming (``resume=True``) after a conversion was stopped, however (SIGKILL included): the store
holds a prefix of the source's items, less the files a run skipped, because records are committed
in order and each commit is atomic. A folder converted to an encoded store keeps each record's
source path, so the run continues after the file of the last record (files skipped before it stay
skipped: they are counted in the summary); a dataset, a store, or a folder converted to raw pixels
(which keep no paths) continues at the store's count, so ``on_error="skip"`` is refused there. In
every case the last record must be what this run makes of its item, and the store's backend,
codec, image mode and classes must be this run's, else the run is refused before writing.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgstore import sources
from imgstore.codecs import decode
from imgstore.encoded import PreparedRecord
from imgstore.errors import InvalidImageError, StoreNotFoundError
from imgstore.manifest import read_manifest
from imgstore.opening import open_store
from imgstore.sources import ConvertError, Source, Target
from imgstore.store import Store

__all__ = [
    "EXECUTORS", "BadFileError", "ConvertError", "ConvertResult", "OnError", "Skipped", "convert", "fill_store",
    "store_layout",
]  # fmt: skip

#: What runs the workers. "auto": processes where they re-encode (png, jpeg, webp), else threads.
#: Measured on 500x375 photos, 2 cores: keep 0.97 s (threads) vs 1.41 s (processes) for 2 000 files,
#: raw 1.7 vs 3.2 s for 500 (records are big: threads hand them over without pickling), jpeg 2.3 vs
#: 1.7 s for 500 (small records, and the per-image Python work of decoding and encoding contends
#: for the GIL with the writer); png and webp tie (zlib and libwebp release the GIL).
EXECUTORS = ("auto", "thread", "process")
OnError = Literal["fail", "skip"]
_MB = 1e6


@dataclass(frozen=True)
class Skipped:
    path: str  # the file (relative to the folder), or "index N" / "item N"
    reason: str


@dataclass
class ConvertResult:
    """What one conversion did (``imgstore convert`` prints it: :func:`imgstore.data_commands.format_summary`)."""

    source: str
    dest: str
    backend: str
    codec: str
    start: int  # the source position this run began at (0 unless resumed)
    total: int  # items in the source
    written: int = 0  # records this run committed
    count: int = 0  # records in the store at the end
    bytes_read: int = 0
    bytes_stored: int = 0  # record bytes this run committed
    disk_bytes: int = 0  # the store on disk at the end
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)
    skipped_before: int = 0  # files skipped by the runs this one resumed

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / _MB / self.seconds if self.seconds > 0 else 0.0


class BadFileError(ConvertError):
    """A bad source file with ``on_error="fail"``: the records before it are committed (``result``)."""

    def __init__(self, message: str, path: str, reason: str, result: ConvertResult) -> None:
        super().__init__(message)
        self.path, self.reason, self.result = path, reason, result


@dataclass(frozen=True)
class _Options:
    on_error: OnError
    batch_images: int
    batch_bytes: int
    progress: bool | None
    resume: bool
    overwrite: bool
    sync: bool


def convert(
    source: str | os.PathLike[str] | Source,
    dest: str | os.PathLike[str],
    *,
    backend: str,
    codec: str | None = None,
    quality: int | None = None,
    image_mode: str | None = "auto",
    shape: tuple[int, ...] | None = None,
    downscale: int | None = None,
    workers: int | None = None,
    on_error: OnError = "fail",
    resume: bool = False,
    overwrite: bool = False,
    batch_images: int = 1000,
    batch_bytes: int = 256 << 20,
    full_check: bool = False,
    progress: bool | None = None,
    executor: str = "auto",
    split: str = "train",
    sync: bool = True,
    **backend_options: Any,
) -> ConvertResult:
    """Convert ``source`` (see :func:`imgstore.sources.open_source`) into the store ``dest``.

    ``codec``: None is the source's default (a folder or an encoded dataset: ``keep``, arrays: ``raw``,
    a store: its own); ``image_mode``: ``"auto"`` (the source's: ``"RGB"`` for a folder, as
    torchvision's loader), ``"RGB"``, ``"L"`` or None (as stored). ``shape``: ``(H, W)`` or ``(H, W, C)``,
    the one shape of every image (a store of one shape; another shape is a bad file), None: the
    source's (files decoded one by one may vary: a raw store of varied shapes). ``downscale``: N makes
    every image whose shorter side is over N pixels that much smaller, as torchvision's ``Resize(N)``
    (:mod:`imgstore.codecs.downscale`; needs a codec that encodes, not ``keep``). ``workers``: the pool's size
    (default: every core; 0 works in this thread). ``on_error``: ``"fail"`` raises
    :class:`BadFileError` at the first bad file, after committing the records before it; ``"skip"``
    goes on and lists it in ``ConvertResult.skipped``. ``resume``: continue into a store a stopped
    conversion left (module docstring); without it a store that holds images is refused, and
    ``overwrite=True`` replaces it. ``full_check``: with ``keep``, decode every file as a check
    (else: the header, and a full decode of files that do not end as their format says).
    ``progress``: a tqdm bar on stderr (None: when stderr is a terminal). ``executor``: see :data:`EXECUTORS`.
    """
    started = time.perf_counter()
    _check_arguments(on_error, resume, overwrite, batch_images, batch_bytes, executor, workers)
    options = _Options(on_error, batch_images, batch_bytes, progress, resume, overwrite, sync)
    src = source if isinstance(source, Source) else sources.open_source(source, split=split)
    try:
        target = sources.make_target(src, codec, quality, image_mode, full_check, shape, downscale)
        check_backend_holds(backend, target)
        if on_error == "skip" and (src.origin != "folder" or not target.keeps_paths):
            raise ConvertError(
                "--on-error skip needs a folder converted to an encoded codec: a dataset, a store or raw pixels "
                "keep no source paths, and resuming them by count cannot leave gaps"
            )
        src.check_outside(Path(dest))
        store = _open_dest(Path(dest), backend, target, options, backend_options)
        with store:
            start, skipped_before = _resume_point(store, src, target)
            result = ConvertResult(src.description, str(dest), store.backend, store.codec, start, src.total)
            result.skipped_before = skipped_before
            try:
                _run(src, store, target, result, options, _pool(executor, workers, target.codec))
            finally:
                result.count, result.disk_bytes = len(store), store.disk_usage()
                result.seconds = time.perf_counter() - started
        return result
    finally:
        if src is not source:
            src.close()


def _check_arguments(
    on_error: str, resume: bool, overwrite: bool, batch_images: int, batch_bytes: int, executor: str, workers: Any
) -> None:
    if on_error not in ("fail", "skip"):
        raise ConvertError(f"on_error takes 'fail' or 'skip', not {on_error!r}")
    if resume and overwrite:
        raise ConvertError("--resume continues DEST and --overwrite replaces it: pass one of them")
    if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
        raise ConvertError(f"batch_images must be an integer >= 1, not {batch_images!r}")
    if isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int) or batch_bytes < 1:
        raise ConvertError(f"batch_bytes must be an integer >= 1, not {batch_bytes!r}")
    if executor not in EXECUTORS:
        raise ConvertError(f"executor takes one of {', '.join(EXECUTORS)}, not {executor!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConvertError(f"workers must be an integer >= 0 (0: in this thread), not {workers!r}")


def check_backend_holds(backend: str, target: Target) -> None:
    """A backend of raw pixels of one shape (memmap) and a target it cannot hold: say what to pass, in CLI terms."""
    from imgstore.registry import get_backend

    if target.encoded and not get_backend(backend).has_encoded_primitives():
        raise ConvertError(
            f"the {backend} backend holds raw pixels of one shape, and files decoded one by one may vary in shape: "
            "convert with --codec raw --shape HxWxC (or HxW), e.g. --shape 32x32x3 (convert(codec='raw', "
            "shape=(32, 32, 3))); a file of another shape is then a bad file"
        )


def store_layout(target: Target, sync: bool = True) -> dict[str, Any]:
    """The :func:`imgstore.open_store` options of a new store that ``target`` is written into."""
    layout: dict[str, Any] = dict(
        codec=target.codec, codec_params=target.params, classes=target.classes, shape=target.shape, sync=sync
    )
    if target.plan.downscale is not None:
        layout["downscale"] = target.plan.downscale
    if target.codec != "raw":
        layout["image_mode"] = target.image_mode
    return layout


def fill_store(
    src: Source, store: Store, target: Target, *, on_error: OnError = "fail", workers: int | None = 0
) -> ConvertResult:
    """Write every item of ``src`` into the new, empty ``store`` (opened with :func:`store_layout`), failing
    at the first bad file (:class:`ConvertError`), or skipping bad files (``on_error="skip"``: listed in
    the result's ``skipped``): what a sharded build's task does for its shard."""
    check_backend_holds(store.backend, target)
    options = _Options(on_error, 1000, 256 << 20, False, False, False, store.sync)
    result = ConvertResult(src.description, str(store.path), store.backend, store.codec, 0, src.total)
    try:
        _run(src, store, target, result, options, _pool("auto", workers, target.codec))
    except BadFileError as exc:  # its message speaks of resuming DEST, which a shard cannot
        where = os.path.join(src.root, exc.path) if src.root is not None else exc.path
        raise ConvertError(f"{where}: {exc.reason}: nothing committed; fix or remove it and convert again") from None
    result.count = len(store)
    return result


def _open_dest(path: Path, backend: str, target: Target, options: _Options, backend_options: dict[str, Any]) -> Store:
    layout = store_layout(target, options.sync)
    if options.overwrite:
        return open_store(path, backend, "w", **layout, **backend_options)
    try:
        manifest = read_manifest(path)
    except StoreNotFoundError:
        manifest = None
    if manifest is None or manifest.creating:  # nothing committed: make it (open_store refuses a non-store folder)
        return open_store(path, backend, "a", **layout, **backend_options)
    store = open_store(path, None, "a", sync=options.sync, **backend_options)
    try:
        differences = _differences(store, backend, target, manifest.downscale)
        if differences:
            how = "rerun with the options it was made with" if options.resume else "convert into another DEST"
            raise ConvertError(
                f"{path} is a store made with other options than this run's: {'; '.join(differences)}; {how}, "
                "or delete it (or pass --overwrite to replace it)"
            )
        if len(store) and not options.resume:
            raise ConvertError(
                f"{path} already holds {len(store)} images: pass --resume to continue the conversion that made "
                "them, or delete it (or pass --overwrite to replace it)"
            )
    except BaseException:
        store.close()
        raise
    return store


def _differences(store: Store, backend: str, target: Target, downscale: int | None) -> list[str]:
    fixed = None if target.shape == "auto" else target.shape
    pairs: list[tuple[str, Any, Any]] = [
        ("backend", store.backend, backend),
        ("codec", store.codec, target.codec),
        ("codec parameters", store.codec_params, target.params),
        ("image mode", store.image_mode, target.image_mode),
        ("classes", store.classes, target.classes),
        ("varied shapes", store.varied, target.encoded and fixed is None),
        ("downscale", downscale, target.plan.downscale),
    ]
    if fixed is not None and store.shape is not None:
        pairs.append(("shape", tuple(store.shape), tuple(fixed)))
    return [f"{what} {have!r} (this run: {want!r})" for what, have, want in pairs if have != want]


def _resume_point(store: Store, src: Source, target: Target) -> tuple[int, int]:
    """(the source position to continue at, how many files earlier runs skipped before it)."""
    count = len(store)
    if count == 0:
        return 0, 0
    start = src.resume_position(store, by_path=target.keeps_paths)
    _check_last(store, src, target, start - 1)
    return start, start - count


def _check_last(store: Store, src: Source, target: Target, position: int) -> None:
    """The store's last record must be what this run makes of the source's item ``position``."""
    index = len(store) - 1
    batch = src.batch(position, position + 1)
    made = sources.prepare_batch(batch.kind, batch.inputs, target.plan)[0]
    held: Any
    if target.keeps_paths:
        held, label = store.get_encoded(index)
        same = made.record == held or (
            made.record is not None and np.array_equal(decode(held), decode(made.record))  # type: ignore[arg-type]
        )
    else:
        held, label = store.get(index)
        same = made.record is not None and np.array_equal(np.asarray(made.record), held)
    if not same or label != int(batch.labels[0]):
        what = batch.paths[0] if batch.paths else f"item {position}"
        raise ConvertError(
            f"{store.path}: its last image (index {index}) is not what this run makes of SOURCE's {what}: DEST was "
            "converted from another source or with other options; delete DEST (or pass --overwrite) to convert anew"
        )


# ---------------------------------------------------------------------- the conversion loop


def _pool(executor: str, workers: int | None, codec: str) -> Executor | None:
    from imgstore.parallel import _die_with, can_fork

    count = os.cpu_count() or 1 if workers is None else workers
    if count == 0:
        return None
    if executor == "auto":
        executor = "process" if codec in ("png", "jpeg", "webp") and can_fork() else "thread"
    if executor == "thread":
        return ThreadPoolExecutor(count, thread_name_prefix="imgstore-convert")

    # Fork: the workers get the plan's code without re-importing __main__; they die with this process.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(count, mp_context=context, initializer=_die_with, initargs=(os.getpid(),))
    pool.submit(int).result()  # fork them now, before the progress bar starts its monitor thread
    return pool


class _Writer:
    """The records made and not yet committed, in order, and their commits: one ``put_*`` call each."""

    def __init__(self, store: Store, src: Source, target: Target, options: _Options, result: ConvertResult) -> None:
        self.store, self.src, self.target, self.options, self.result = store, src, target, options, result
        self.records: list[bytes | np.ndarray | PreparedRecord] = []
        self.labels: list[int] = []
        self.paths: list[str] = []  # kept in the store ("" for none)
        self.names: list[str] = []  # for messages
        self.nbytes = 0

    def add(self, record: bytes | np.ndarray | PreparedRecord, label: int, path: str | None, name: str) -> None:
        self.records.append(record)
        self.labels.append(label)
        self.paths.append(path or "")
        self.names.append(name)
        self.nbytes += sources.record_size(record)
        while len(self.records) >= self.options.batch_images or (
            self.records and self.nbytes >= self.options.batch_bytes
        ):
            self.commit(self.options.batch_images)

    def bad(self, name: str, reason: str) -> None:
        """The next item is bad: skip it, or (on_error="fail") commit the records before it and stop."""
        if self.options.on_error == "skip":
            self.result.skipped.append(Skipped(name, reason))
            return
        self.commit(len(self.records))
        raise self._failure(name, reason)

    def _failure(self, name: str, reason: str) -> BadFileError:
        path = os.path.join(self.src.root, name) if self.src.root is not None else name
        return BadFileError(
            f"{path}: {reason} (DEST holds the {len(self.store)} images before it: fix or remove the file and rerun "
            "with --resume, or rerun with --resume --on-error skip)",
            name, reason, self.result,
        )  # fmt: skip

    def commit(self, most: int) -> None:
        """Commit the first ``most`` records (or all there are) in one call."""
        n = min(most, len(self.records))
        if n == 0:
            return
        records, labels, paths = self.records[:n], self.labels[:n], self.paths[:n]
        try:
            if not self.target.encoded:
                self.store.put_many(np.stack(records), labels)  # type: ignore[arg-type]
            elif self.target.codec == "raw":
                self.store.put_many(records, labels)  # type: ignore[arg-type]
            elif records and isinstance(records[0], PreparedRecord):
                self.store.put_prepared(records)  # type: ignore[arg-type]
            else:
                self.store.put_encoded_many(records, labels, paths=paths if any(paths) else None)  # type: ignore[arg-type]
        except InvalidImageError:
            # The store's own header check (a decompression bomb, a header Pillow refuses: the workers
            # check files' ends, not their headers, which the store probes anyway). Which record?
            k, reason = sources.first_refused(records)
            if k is None:
                raise
            name = self.names[k]
            for column in (self.records, self.labels, self.paths, self.names):
                del column[k]
            self.nbytes -= sources.record_size(records[k])
            self.commit(k)  # the good records before it
            if self.options.on_error == "fail":
                raise self._failure(name, reason) from None
            self.result.skipped.append(Skipped(name, reason))
            return self.commit(n - k - 1)
        stored = sum(sources.record_size(r) for r in records)
        for column in (self.records, self.labels, self.paths, self.names):
            del column[:n]
        self.nbytes -= stored
        self.result.written += n
        self.result.bytes_stored += stored


def _prepare(store: Store | None, batch: sources.Batch, target: Target) -> list[sources.Prepared]:
    """A batch made into records; for an encoded store, on a thread, also checked and hashed by it
    (``prepare_encoded``), so the thread that commits only writes: it was the slower half of a run."""
    made = sources.prepare_batch(batch.kind, batch.inputs, target.plan)
    if store is None or not target.encoded or target.codec == "raw":
        return made
    for k, item in enumerate(made):
        if isinstance(item.record, bytes):
            path = batch.paths[k] if batch.paths else None
            try:
                made[k] = item._replace(record=store.prepare_encoded(item.record, int(batch.labels[k]), path=path))
            except InvalidImageError as exc:  # named by its path in the summary already: the reason alone
                reason = str(exc).removeprefix(f"{path!r}: ") if path else str(exc)
                made[k] = item._replace(record=None, error=reason)
    return made


def _run(
    src: Source, store: Store, target: Target, result: ConvertResult, options: _Options, pool: Executor | None
) -> None:
    chunk = 256 if src.kind == "array" else 16  # items per task: small enough to balance images of any size
    window = max(options.batch_images, 64)  # items in flight: the next commit's, made while this one writes
    queue: deque[tuple[int, sources.Batch, Future[list[sources.Prepared]] | list[sources.Prepared]]] = deque()
    writer = _Writer(store, src, target, options, result)
    position = result.start
    bar = None
    if sys.stderr.isatty() if options.progress is None else options.progress:  # as tqdm's disable=None
        from tqdm import tqdm  # only then: it costs 40 ms of a start of 300

        bar = tqdm(
            total=src.total, initial=result.start, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.05
        )
    clock = time.perf_counter()
    try:
        while True:
            while position < src.total and (len(queue) * chunk < window or not queue):
                batch = src.batch(position, min(position + chunk, src.total))
                work = (
                    _prepare(store, batch, target)
                    if pool is None
                    else pool.submit(_prepare, store if isinstance(pool, ThreadPoolExecutor) else None, batch, target)
                )
                queue.append((position, batch, work))
                position += len(batch.labels)
            if not queue:
                break
            lo, batch, work = queue.popleft()
            made = work if isinstance(work, list) else work.result()
            for k, item in enumerate(made):
                result.bytes_read += item.read
                path = batch.paths[k] if batch.paths else None
                name = path or f"{'index' if src.origin == 'store' else 'item'} {src.number(lo + k)}"
                if item.record is None:
                    writer.bad(name, item.error or "unknown error")
                else:
                    writer.add(item.record, int(batch.labels[k]), path, name)
            if bar is not None:
                bar.update(len(made))
                elapsed = time.perf_counter() - clock
                bar.set_postfix_str(f"{result.bytes_read / _MB / max(elapsed, 1e-9):.1f} MB/s", refresh=False)
        writer.commit(len(writer.records))
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
