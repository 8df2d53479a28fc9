"""TileDB backend: one dense TileDB array, dimension ``index``, attributes ``image`` and ``label``.

Raw stores of one shape keep each image as one fixed-size cell (``image``: ``nbytes`` uint8 values, the
pixels in C order; ``A.meta["image_shape"]`` holds the shape) and its ``label`` (int64), tiled
along ``index`` in tiles of about ``tile_bytes``. Encoded stores (and raw ones of varied shapes)
keep each record's bytes in a variable-length ``image`` attribute (uint8). So
``tiledb.open(path)[0:10]`` gives images and labels.

Stores written before imgstore 2026-11 keep an ``S<nbytes>`` (TileDB ``CHAR``) ``image`` attribute, for
which TileDB keeps every tile's smallest and largest cell in the fragment metadata; TileDB 2.30
compresses that metadata with GZip into a buffer a few bytes too small for incompressible data
(``GZip::overhead`` in ``tiledb/sm/compressors/gzip_compressor.cc`` divides by 16834 for 16384,
fixed upstream in TileDB #5775), so a write of random-looking pixels could fail. A uint8 attribute of
``nbytes`` values per cell has no min/max metadata (``TileMetadataGenerator::has_min_max_metadata``:
only single-value cells and strings do). The ``label`` attribute (int64) still has it, so a write
TileDB refuses this way is split at a tile boundary and written as two fragments (both layouts).

Every ``put_many`` is one TileDB fragment, written with a timestamp later than every fragment
before it, so a write over a crashed write's leftovers (records past the committed count) wins.
TileDB ignores a fragment without its commit file (a killed write); imgstore's manifest commits
records. Once there are ``consolidate_every`` fragments the newest small ones are rewritten as one
and deleted (inside the array only), so ``tiledb.open`` readers do not slow down with commits.

Reads of raw stores bypass TileDB's query engine: each fragment's attribute files hold whole
tiles, uncompressed, each one filter chunk, so an image is one ``pread`` at an offset computed
from the fragment list (:mod:`imgstore.backends.tiledb_direct`); that path checks every header it
relies on and falls back to TileDB queries for anything else.

TileDB contexts hold thread pools, which a forked child cannot use: every process makes its own
context, and a child never touches what it inherited.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiledb

from imgstore.backends import tiledb_direct
from imgstore.errors import CorruptStoreError
from imgstore.options import Option
from imgstore.store import Store

_DOMAIN_HIGH = 2**62 - 1  # dense domains are fixed at creation: this bound is never reached
_TIMESTAMP_LIMIT = 2**63 - 1  # a fragment's timestamp is below it, and so is the next one imgstore gives
_CLOCK_SLACK_MS = 60_000  # a fragment dated further ahead than this is damage (clocks of writers may differ a little)
_GZIP_BOUND = "Cannot compress with GZIP; output buffer too small"  # TileDB #5775 (module docstring)
_context: tuple[int, tiledb.Ctx] | None = None
_inherited: list[Any] = []  # a forked child's copies of the parent's TileDB objects: never freed
_publishing = threading.Lock()  # a handle's array or index made by one of the threads that raced to make it


def _new_lock() -> None:
    global _publishing
    _publishing = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_new_lock)


def context() -> tiledb.Ctx:
    """This process's TileDB context (a forked child makes its own: the parent's thread pools are gone)."""
    global _context
    if _context is None or _context[0] != os.getpid():
        if _context is not None:
            _inherited.append(_context[1])
        # tiledb-py's first context replaces os.fork, for the whole process, with one that warns on
        # every fork (a DataLoader's workers, any library's children). imgstore's handles never use a
        # parent's TileDB objects in a child (it makes its own context: the DataLoader tests fork,
        # spawn and forkserver), so the warning would only be noise in the user's other forks.
        tiledb_ctx = getattr(tiledb, "ctx", None)
        if getattr(tiledb_ctx, "_needs_fork_wrapper", None) is True:
            tiledb_ctx._needs_fork_wrapper = False  # type: ignore[union-attr]
        _context = (os.getpid(), tiledb.Ctx())
    return _context[1]


def _os_error(exc: tiledb.TileDBError) -> OSError:
    """TileDB reports a failed write as text: keep the errno it names (a full disk is StoreFullError)."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
        if os.strerror(code) in text:
            return OSError(code, text)
    return OSError(errno.EIO, text)


class TileDBStore(Store):
    name = "tiledb"
    # tile_bytes: how many bytes of images one tile holds (a tile is TileDB's unit of I/O).
    option_specs = {
        "tile_bytes": Option(1 << 16, 1, 1 << 30, fixed=True),
        "consolidate_every": Option(8, 2, 1 << 20),
    }
    damage_errors = (tiledb.TileDBError, OSError, ValueError, KeyError, IndexError)
    # A verified scan copies pieces out of the map: per piece ~25 µs of NumPy set-up (measured 100 000
    # CIFAR images, against the limit's np.fromfile: 256 KiB pieces 2.2x, 1 MiB 1.42x, 4 MiB 1.29x).
    scan_piece_bytes = 1 << 22
    files = ("tiledb",)
    readers = ("tiledb-py: tiledb.open(path)[0:count] (attributes image, label)",)
    caveats = ("tiledb.open sees a killed write's records (read [0:count])",)

    def _open(self, create: bool) -> None:
        # Absolute: TileDB resolves a relative URI against the working directory of its first use in
        # the process, so after a chdir it would write into another directory.
        self._uri = os.path.abspath(self.file("tiledb"))
        self._array: Any = None
        # The direct-read index (built on first read); False: the fragments need TileDB's queries.
        self._direct: tiledb_direct.DirectIndex | bool | None = None
        if create:
            self.file("tiledb").mkdir()
        elif len(self):
            try:
                tiledb.ArraySchema.load(self._uri, ctx=context())  # a damaged store fails at open
            except tiledb.TileDBError as exc:
                raise CorruptStoreError(f"{self._uri} cannot be opened as a TileDB array: {exc}") from exc

    def _forget(self) -> None:
        array, direct = self._array, self._direct
        self._array, self._direct = None, None
        if array is not None:
            array.close()
        if isinstance(direct, tiledb_direct.DirectIndex):
            direct.close()

    def _close(self) -> None:
        self._forget()

    def _reopen_after_fork(self) -> None:
        if isinstance(self._direct, tiledb_direct.DirectIndex):
            self._direct.close()  # this process's copies of the descriptors
        _inherited.append(self._array)  # the parent's TileDB object: never touched (nor freed) here
        self._array, self._direct = None, None

    def _refresh(self, old_count: int) -> None:
        self._forget()

    def _opened(self) -> Any:
        if self._array is None:
            refreshes = self._refreshes.count
            array = tiledb.open(self._uri, "r", ctx=context())
            if not self._refreshes.unchanged_since(refreshes):  # a refresh in another thread: this read only
                return array
            with _publishing:  # threads opening it at once: one kept, the others closed (never left open)
                kept = self._array = array if self._array is None else self._array
            if kept is not array:
                array.close()
            return kept
        return self._array

    # -------------------------------------------------------------- writing

    def _tile(self, cell_bytes: int) -> int:
        tile_bytes: int = self.options["tile_bytes"]
        return max(1, tile_bytes // max(1, cell_bytes))

    def _create_array(self, image_attr: tiledb.Attr, tile: int, shape: tuple[int, ...] | None) -> None:
        # Attributes are stored as they are, each tile one filter chunk (read directly: tiledb_direct).
        """Make the array anew (only while nothing is committed: whatever is in its folder is a leftover)."""
        self._forget()
        folder = self.file("tiledb")
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        ctx = context()
        dim = tiledb.Dim("index", domain=(0, _DOMAIN_HIGH), tile=tile, dtype=np.int64, ctx=ctx)
        label = tiledb.Attr(
            "label", dtype=np.int64, filters=tiledb.FilterList([], chunksize=tile * 8, ctx=ctx), ctx=ctx
        )
        schema = tiledb.ArraySchema(
            domain=tiledb.Domain(dim, ctx=ctx),
            sparse=False,
            attrs=[image_attr, label],
            offsets_filters=tiledb.FilterList([], chunksize=tile * 8, ctx=ctx),
            ctx=ctx,
        )
        tiledb.Array.create(self._uri, schema, ctx=ctx)
        self._tile_extent = tile
        if shape is not None:
            with tiledb.open(self._uri, "w", timestamp=self._next_timestamp(), ctx=ctx) as array:
                array.meta["image_shape"] = tuple(int(n) for n in shape)

    def _next_timestamp(self) -> int:
        """Later than every fragment's and metadata's (TileDB's order of fragments is by timestamp)."""
        return max(int(time.time() * 1000), self._newest_timestamp() + 1)

    def _newest_timestamp(self) -> int:
        """The latest date (ms) in the array's fragment, commit and metadata names; damage if in the future.

        TileDB reads the fragments dated up to the present, and a write after one dated later would
        be dated later still: a forged date (or a clock set back by more than ``_CLOCK_SLACK_MS``)
        would hide every later write, so writing is refused (a read of what it hides fails: no fragment).
        """
        newest, newest_name, now = 0, "", int(time.time() * 1000)
        for sub in ("__commits", "__fragments", "__meta"):
            try:
                names = os.listdir(os.path.join(self._uri, sub))
            except FileNotFoundError:
                continue
            for name in names:
                parts = name.split("_")  # "__<t1>_<t2>_<uuid>..."
                for part in parts[2:4] if len(parts) > 3 else ():
                    if not part.isdigit():
                        continue
                    if not part.isascii() or int(part) >= _TIMESTAMP_LIMIT:
                        # TileDB's timestamps are uint64; one past this could make no later timestamp.
                        where = os.path.join(self._uri, sub, name)
                        raise CorruptStoreError(f"{where}: an impossible timestamp (2**63 - 1 or more) in a file name")
                    if int(part) > newest:
                        newest, newest_name = int(part), os.path.join(self._uri, sub, name)
        if newest > now + _CLOCK_SLACK_MS:
            raise CorruptStoreError(
                f"{newest_name} is dated {(newest - now) / 86_400_000:.1f} days in the future: TileDB would not "
                "read it, nor any write after it, before then (a forged name, or a clock set back)"
            )
        return newest

    def _put(self, start: int, images: np.ndarray, labels: np.ndarray, split: bool = True) -> None:
        """Write records ``start ..``: ``images`` uint8 ``[N, nbytes]`` (raw) or an object array of uint8 arrays.

        ``split``: a write TileDB refuses for its GZip bound (module docstring) is written as two
        fragments, split at a tile boundary; without it that is :class:`_GZipBound`.
        """
        before = set(_listdir(Path(self._uri) / "__commits"))
        try:
            self._put_fragments(start, images, labels, split)
        finally:
            self._forget()
        if self.sync:
            self._sync_new(before)

    def _put_fragments(self, start: int, images: np.ndarray, labels: np.ndarray, split: bool) -> None:
        stop = start + len(images)
        try:
            with tiledb.open(self._uri, "w", timestamp=self._next_timestamp(), ctx=context()) as array:
                if images.dtype != object:  # this array's cell dtype: uint8 values, or S<nbytes> in older stores
                    images = images.view(array.schema.attr("image").dtype).reshape(len(images))
                array[start:stop] = {"image": images, "label": labels}
        except tiledb.TileDBError as exc:
            if _GZIP_BOUND not in str(exc):
                raise _os_error(exc) from exc
            tile = self._stored_tile()
            middle = (start + stop) // 2 // tile * tile
            middle = middle if middle > start else (start // tile + 1) * tile
            if not split or middle >= stop:  # within one tile the metadata is a few dozen bytes: never seen
                raise _GZipBound(
                    f"TileDB could not write records {start} .. {stop - 1} of {self._uri} (its GZip bound, "
                    f"TileDB #5775): {exc}. Copy the store into a new one: python -m imgstore.cli convert "
                    "SOURCE DEST --backend tiledb"
                ) from exc
            self._put_fragments(start, images[: middle - start], labels[: middle - start], split)
            self._put_fragments(middle, images[middle - start :], labels[middle - start :], split)

    def _sync_new(self, before: set[str]) -> None:
        """fsync the new fragment's files, its commit file and the folders naming them."""
        root = Path(self._uri)
        for name in set(_listdir(root / "__commits")) - before:
            fragment = root / "__fragments" / name.rsplit(".", 1)[0]
            for path in [*fragment.iterdir(), fragment, root / "__fragments", root / "__commits" / name]:
                _fsync(path)
        _fsync(root / "__commits")

    def _merge(self, stop: int) -> None:
        """Many fragments slow TileDB's readers: rewrite the newest small ones as one (records ``.. stop``).

        TileDB's own consolidation takes seconds for a few tiny fragments of this array, so the
        records are read directly and written again as one fragment, newer than all; then the
        fragments it replaces are deleted (commit file first: a crash leaves them older, unused).
        Like a binary counter: a fragment is merged with the newer ones when it is not bigger than
        them together, so records are rewritten O(log n) times and fragments stay few.
        """
        try:
            info = tiledb.FragmentInfoList(self._uri, ctx=context())
        except tiledb.TileDBError as exc:
            raise _os_error(exc) from exc
        fragments = sorted(
            ((f.timestamp_range[1], *(int(n) for n in f.nonempty_domain[0]), f.uri) for f in info),
            key=lambda f: f[0],
        )
        fragments = [f for f in fragments if f[2] < stop]  # a crashed write's leftovers past stop stay
        if len(fragments) < self.options["consolidate_every"]:
            return
        merged, cells = [fragments.pop()], 0
        cells = merged[0][2] - merged[0][1] + 1
        while fragments and (len(merged) < 2 or fragments[-1][2] - fragments[-1][1] + 1 <= cells):
            merged.append(fragments.pop())
            cells += merged[-1][2] - merged[-1][1] + 1
        low = min(f[1] for f in merged)
        cell = None if self._manifest.encoded else int(np.prod(self.image_shape))
        try:
            index = tiledb_direct.build(self._uri, context(), stop, self._stored_tile(), cell)
        except tiledb_direct.Unreadable:
            return  # not laid out as expected: leave the fragments to TileDB
        try:
            if cell is None:
                blobs, labels = index.read_blobs(np.arange(low, stop, dtype=np.int64))
                images = _cells(blobs)
            else:
                images = np.empty((stop - low, cell), np.uint8)
                labels = np.empty(stop - low, np.int64)
                index.read_range_into(low, stop, images, labels)
        finally:
            index.close()
        try:
            self._put(low, images, labels, split=False)
        except _GZipBound:
            return  # a merge is only an optimisation: the fragments stay as they are (the next merge differs)
        root = Path(self._uri)
        for _, _, _, uri in merged:
            name = os.path.basename(tiledb_direct._path(uri).rstrip("/"))
            (root / "__commits" / f"{name}.wrt").unlink(missing_ok=True)
        for _, _, _, uri in merged:
            shutil.rmtree(tiledb_direct._path(uri), ignore_errors=True)

    def _write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        nbytes = images[0].nbytes
        if start == 0:
            tile = self._tile(nbytes)
            chunk = tiledb.FilterList([], chunksize=tile * nbytes, ctx=context())  # one chunk per tile
            # nbytes uint8 values a cell (tiledb-py: a record dtype of nbytes uint8 fields): no min/max
            # metadata, unlike S<nbytes> (module docstring).
            values = np.dtype([("", np.uint8)] * nbytes)
            attr = tiledb.Attr("image", dtype=values, filters=chunk, ctx=context())
            self._create_array(attr, tile, images.shape[1:])
        self._put(start, images.reshape(len(images), nbytes), labels)
        self._merge(start + len(images))

    def _write_blobs(self, start: int, blobs: Sequence[bytes], labels: np.ndarray) -> None:
        if start == 0:
            ctx = context()
            whole = tiledb.FilterList([], chunksize=(1 << 32) - 1, ctx=ctx)  # a tile is one chunk
            attr = tiledb.Attr("image", dtype=np.uint8, var=True, filters=whole, ctx=ctx)
            self._create_array(attr, self._tile(1 << 14), None)
        self._put(start, _cells(blobs), labels)
        self._merge(start + len(blobs))

    # -------------------------------------------------------------- reading

    def _query(self, ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Cells of the inclusive ranges, in the order given (one TileDB query)."""
        query = self._opened().query(attrs=["image", "label"])
        result: dict[str, np.ndarray] = query.multi_index[[slice(lo, hi) for lo, hi in ranges]]
        return result

    def _gather(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The cells of the distinct indices in runs, and where each of ``indices`` is among them."""
        unique, where = np.unique(indices, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        starts, ends = np.split(unique, breaks), None
        ranges = [(int(run[0]), int(run[-1])) for run in starts]
        del ends
        return self._query(ranges), where

    def _check_count(self, got: np.ndarray, want: int) -> None:
        if len(got) != want:
            raise CorruptStoreError(f"{self._uri}: TileDB returned {len(got)} of {want} records")

    def _direct_index(self) -> tiledb_direct.DirectIndex | None:
        if self._direct is None:
            # Kept only if no refresh() ran in another thread meanwhile (it may have read the old count).
            refreshes = self._refreshes.count
            shape = self._manifest.shape
            cell = None if self._manifest.encoded or shape is None else int(np.prod(shape))
            tile = self._stored_tile()
            for attempt in range(3):
                try:
                    direct: tiledb_direct.DirectIndex | bool = tiledb_direct.build(
                        self._uri, context(), len(self), tile, cell
                    )
                except tiledb_direct.Unreadable:
                    direct = False
                except (FileNotFoundError, tiledb.TileDBError):  # a writer merged fragments meanwhile: again
                    if attempt == 2:
                        raise
                    continue
                if not self._refreshes.unchanged_since(refreshes):
                    return direct if isinstance(direct, tiledb_direct.DirectIndex) else None
                with _publishing:  # threads building it at once: one kept, the others closed
                    kept = self._direct = direct if self._direct is None else self._direct
                if kept is not direct and isinstance(direct, tiledb_direct.DirectIndex):
                    direct.close()
                return kept if isinstance(kept, tiledb_direct.DirectIndex) else None
        return self._direct if isinstance(self._direct, tiledb_direct.DirectIndex) else None

    def _stored_tile(self) -> int:
        """The array's tile extent, as its schema gives it."""
        if self._tile_extent is None:
            schema = tiledb.ArraySchema.load(self._uri, ctx=context())
            self._tile_extent = int(schema.domain.dim(0).tile)
        return self._tile_extent

    _tile_extent: int | None = None

    def _read_into(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        direct = self._direct_index()
        if direct is not None:
            direct.read_into(indices, images, labels)
            return
        cells, where = self._gather(indices)
        self._check_count(cells["label"], int(where.max()) + 1)
        images.reshape(len(images), -1)[:] = _pixels(cells["image"])[where]
        labels[:] = cells["label"][where]

    def _read_range_into(self, start: int, stop: int, images: np.ndarray, labels: np.ndarray) -> None:
        direct = self._direct_index()
        if direct is not None:
            direct.read_range_into(start, stop, images, labels)
            return
        cells = self._query([(start, stop - 1)])
        self._check_count(cells["label"], stop - start)
        images.reshape(len(images), -1)[:] = _pixels(cells["image"])
        labels[:] = cells["label"]

    def _read_one(self, index: int) -> tuple[np.ndarray, int]:
        image = np.empty(self.image_shape, dtype=np.uint8)
        direct = self._direct_index()
        if direct is not None:  # a shuffled get: one pread, no numpy slicing (which costs more than the read)
            return image, direct.read_one(index, image)
        label = np.empty(1, dtype=np.int64)
        self._read_range_into(index, index + 1, image[np.newaxis], label)
        return image, int(label[0])

    def _read_blobs(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        direct = self._direct_index()
        if direct is not None:
            return direct.read_blobs(indices)
        cells, where = self._gather(indices)
        self._check_count(cells["label"], int(where.max()) + 1)
        return [bytes(cells["image"][k]) for k in where.tolist()], cells["label"][where].astype(np.int64)

    def _read_blob_range(self, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
        if self._direct_index() is not None:
            return self._read_blobs(np.arange(start, stop, dtype=np.int64))
        cells = self._query([(start, stop - 1)])
        self._check_count(cells["label"], stop - start)
        return [bytes(cell) for cell in cells["image"]], cells["label"].astype(np.int64)


class _GZipBound(OSError):
    """TileDB refused a write for its GZip bound (module docstring) and it was not to be split."""


def _pixels(cells: np.ndarray) -> np.ndarray:
    """Fixed-size ``image`` cells as uint8 rows: a byte view, whatever the dtype (uint8 values or S<nbytes>).

    (Assigning record arrays copies field by field: 1 s for 50 images of 224x224x3.)
    """
    return np.ascontiguousarray(cells).view(np.uint8).reshape(len(cells), -1)


def _cells(blobs: Sequence[bytes]) -> np.ndarray:
    """Variable-length cells for TileDB: an object array of uint8 arrays."""
    cells = np.empty(len(blobs), dtype=object)
    for k, blob in enumerate(blobs):
        cells[k] = np.frombuffer(blob, dtype=np.uint8)
    return cells


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
