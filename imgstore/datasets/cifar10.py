"""The real CIFAR-10 files, in both official versions, read without trusting pickle.

- "python version" (``cifar-10-batches-py``): dicts pickled by Python 2's cPickle (protocol 2):
  ``b"data"`` a uint8 array [10 000, 3 072], ``b"labels"`` a list of ints, ``b"batch_label"`` and
  ``b"filenames"``. A pickle is a program, so it is read in two steps, neither of which trusts it:

  1. :func:`_check_opcodes` walks the opcodes without building anything and refuses lengths not
     backed by bytes of the file (the unpickler allocates a length before reading it), opcodes
     the format does not use, objects nested deeper than :data:`_MAX_DEPTH` (hashing a deeply
     nested tuple crashes the interpreter), memo indices that would make the unpickler grow its
     memo table, and more objects than the file size can explain.
  2. :class:`_CifarUnpickler` resolves only the globals a pickled uint8 array and Python 3's
     bytes need, each replaced by a guard that checks its arguments: numpy's ``_reconstruct``
     only as numpy calls it (shape ``(0,)``), ``numpy.dtype`` only for uint8, and the array's
     state only when its shape matches the bytes it carries. So nothing allocates more than the
     data really in the file, and anything else (``os.system``, ``numpy.ndarray(shape)``, ...)
     raises :class:`DatasetError` before it can run.
- "binary version" (``cifar-10-batches-bin``): records of 1 label byte + 3 072 pixel bytes.

Both store each image as planar R, G, B planes of 32x32; we return HWC uint8 like every store.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgstore.errors import DatasetError, DatasetNotFoundError

PY_DIR, BIN_DIR = "cifar-10-batches-py", "cifar-10-batches-bin"
SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_PIXELS = 3 * 32 * 32
_MAX_IMAGES = 60_000  # per batch file; the real ones hold 10 000
# Python 3 pickles bytes at protocol 2 as latin-1 text, which UTF-8 stores in up to 2 bytes a byte.
_MAX_FILE_BYTES = _MAX_IMAGES * (2 * _PIXELS + 256) + (1 << 20)
_MAX_DEPTH = 32  # a real batch nests 7 deep (dict > array state > dtype state > ...)
_UNSET = -1

# What building the objects costs, roughly and from above, in bytes (the walk of step 1 adds it up).
_OBJECT_COST, _ATOM_COST, _ITEM_COST, _MEMO_COST, _REF_COST = 256, 64, 64, 32, 8
_COST_SLACK = 64 << 20

_ATOMS = frozenset(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES "
    "BINBYTES8 UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 NONE NEWTRUE NEWFALSE FLOAT BINFLOAT GLOBAL".split()
)
_EMPTY = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"})
_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET"})  # build a new container from the items above MARK
_FROM_TOP = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "STACK_GLOBAL": 2}  # ... from this many items
_INTO_FROM_MARK = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})  # add the items above MARK to the object below it
_INTO = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # add this many items to the object below them
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


_OPCODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_LENGTH_WIDTH = {  # how an argument of variable length gives its length: (bytes, signed)
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_INDEXED = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET", "FRAME"})


def _opcodes(data: bytes, path: Path) -> Iterator[tuple[str, int, int, int]]:
    """Each opcode up to STOP as (name, argument size in bytes, memo index or frame size, position).

    Only reads: an argument's length must be backed by bytes of the file (the unpickler would
    allocate first), and payloads are skipped, not copied or decoded.
    """
    pos, end = 0, len(data)
    while pos < end:
        op = _OPCODES.get(data[pos])
        if op is None:
            raise _not_a_batch(path, f"unknown opcode {data[pos]:#04x}", pos)
        start, pos = pos, pos + 1
        n, size, value = (op.arg.n if op.arg else 0), 0, 0
        if n >= 0:
            size = n
            if op.name in _INDEXED:
                value = int.from_bytes(data[pos : pos + n], "little")
        elif n == pickletools.UP_TO_NEWLINE:
            stop = pos
            for _ in range(2 if op.name in ("GLOBAL", "INST") else 1):  # module and name: two lines
                stop = data.find(b"\n", stop, end) + 1
                if stop == 0:
                    raise _not_a_batch(path, f"{op.name} runs past the end of the file", start)
            size = stop - pos
            if op.name in _INDEXED:
                try:
                    value = int(data[pos : stop - 1])
                except ValueError:
                    raise _not_a_batch(path, f"{op.name} has no decimal memo index", start) from None
        else:
            width, signed = _LENGTH_WIDTH[n]
            if pos + width > end:
                raise _not_a_batch(path, f"{op.name} runs past the end of the file", start)
            length = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            if length < 0:
                raise _not_a_batch(path, f"{op.name} has a negative length", start)
            size = width + length
        if pos + size > end:
            raise _not_a_batch(path, f"{op.name} runs past the end of the file", start)
        yield op.name, size, value, start
        pos += size
        if op.name == "STOP":
            return
    raise _not_a_batch(path, "no STOP: the pickle is truncated", pos)


def _not_a_batch(path: Path, what: str, pos: int) -> DatasetError:
    return DatasetError(f"{path} is not a CIFAR-10 python batch: {what} (byte {pos})")


def _check_opcodes(data: bytes, path: Path) -> None:
    """Refuse a pickle whose objects would nest too deep or cost far more memory than its size; builds nothing.

    Follows the unpickler's stack with the nesting depth of each object in place of the object.
    Depths of lists and dicts changed after they were memoized may be underestimated, which is
    harmless: only tuples and frozensets, which cannot change, are hashed recursively.
    """
    stack: list[int] = []  # nesting depth of each object on the unpickler's stack
    marks: list[int] = []  # the stack's length at each MARK
    memo: list[int] = []  # nesting depth of each memo entry, _UNSET where none was stored
    budget, spent = 2 * len(data) + _COST_SLACK, 0

    def pop(count: int, pos: int) -> list[int]:
        if count > len(stack) - (marks[-1] if marks else 0):
            raise _not_a_batch(path, "stack underflow", pos)
        items = stack[len(stack) - count :]
        del stack[len(stack) - count :]
        return items

    def pop_mark(pos: int) -> list[int]:
        if not marks:
            raise _not_a_batch(path, "no MARK to pop to", pos)
        return pop(len(stack) - marks.pop(), pos)

    for name, size, value, pos in _opcodes(data, path):
        if name in _ATOMS:
            stack.append(1)
            spent += _ATOM_COST + size
        elif name in _EMPTY:
            stack.append(1)
            spent += _OBJECT_COST
        elif name == "MARK":
            marks.append(len(stack))
        elif name in _FROM_MARK or name in _FROM_TOP:
            items = pop_mark(pos) if name in _FROM_MARK else pop(_FROM_TOP[name], pos)
            stack.append(1 + max(items, default=0))
            spent += _OBJECT_COST + _ITEM_COST * len(items)
        elif name in _INTO_FROM_MARK or name in _INTO:
            items = pop_mark(pos) if name in _INTO_FROM_MARK else pop(_INTO[name], pos)
            target = pop(1, pos)[0]
            stack.append(max([target, *(1 + depth for depth in items)]))
            spent += _ITEM_COST * len(items)
        elif name in _PUT:
            index = len(memo) if name == "MEMOIZE" else value
            # Picklers number memo entries 0, 1, 2, ... (Python 2's cPickle, which wrote the real
            # files: 1, 2, 3, ...). A larger index would make the unpickler grow its memo table to
            # that size, whatever the file holds.
            if not 0 <= index <= len(memo) + 1:
                raise _not_a_batch(path, f"memo index {index} out of sequence", pos)
            (top,) = pop(1, pos)
            stack.append(top)
            memo.extend([_UNSET] * (index + 1 - len(memo)))
            memo[index] = top
            spent += _MEMO_COST
        elif name in _GET:
            if not 0 <= value < len(memo) or memo[value] == _UNSET:
                raise _not_a_batch(path, f"memo index {value} was never stored", pos)
            stack.append(memo[value])
            spent += _REF_COST
        elif name == "DUP":
            (top,) = pop(1, pos)
            stack.extend((top, top))
            spent += _REF_COST
        elif name == "POP":
            if len(stack) > (marks[-1] if marks else 0):
                stack.pop()
            elif marks:
                marks.pop()
            else:
                raise _not_a_batch(path, "stack underflow", pos)
        elif name == "POP_MARK":
            pop_mark(pos)
        elif name == "FRAME":
            if value > len(data) - pos:
                raise _not_a_batch(path, f"a frame of {value} bytes runs past the end of the file", pos)
        elif name not in ("PROTO", "STOP"):
            raise _not_a_batch(path, f"opcode {name} is not part of the format", pos)
        if stack and stack[-1] > _MAX_DEPTH:
            raise _not_a_batch(path, f"objects nested more than {_MAX_DEPTH} deep", pos)
        if spent > budget:
            raise _not_a_batch(path, f"it would build objects far larger than its {len(data)} bytes", pos)


class _PickledDtype:
    """What ``numpy.dtype("u1", ...)`` gives while unpickling: uint8, the only dtype of the format."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        # numpy's state of dtype("u1"): (version, byte order "|" (not applicable), 5 Nones or -1s, flags).
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4) and state[1] in ("|", b"|")):
            raise DatasetError("the state of numpy.dtype('u1') is not numpy's")
        if state[2:] != (None, None, None, -1, -1, 0):
            raise DatasetError("the state of numpy.dtype('u1') is not numpy's")


class _PickledArray:
    """What ``_reconstruct(numpy.ndarray, (0,), "b")`` gives while unpickling: an empty array to be set by BUILD.

    Its state must be ``(1, shape, uint8 dtype, False, data)`` with exactly ``prod(shape)`` bytes of
    data; the array is then a view of those bytes, so it costs nothing beyond what the file held.
    """

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise DatasetError("a numpy array's state is set twice")
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise DatasetError("a numpy array's state is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        c_order = type(fortran) in (bool, int) and not fortran
        if not isinstance(dtype, _PickledDtype) or not c_order or not isinstance(raw, bytes):
            raise DatasetError("a numpy array is not C-ordered uint8 bytes")
        if not (
            isinstance(shape, tuple)
            and len(shape) <= 2
            and all(type(size) is int and size >= 0 for size in shape)
            and math.prod(shape) == len(raw)  # Python ints: a forged shape cannot overflow
        ):
            raise DatasetError(f"a numpy array's shape does not match the {len(raw)} bytes of data it holds")
        self.array = np.frombuffer(raw, dtype=np.uint8).reshape(shape)


class _Guard:
    """A global the unpickler may resolve: calls ``call``, which checks its arguments; has no state to set."""

    __slots__ = ("name", "_call")

    def __init__(self, name: str, call: Callable[..., Any]) -> None:
        self.name, self._call = name, call

    def __call__(self, *args: object) -> Any:
        return self._call(*args)

    def __setstate__(self, state: object) -> None:  # BUILD on a global: never part of the format
        raise DatasetError(f"refusing to set the state of {self.name}")


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a dict holding a pickled numpy uint8 array needs; never a callable of the file's choosing.

    Each global resolves to a guard that checks its arguments against what numpy and Python write,
    so no call can allocate more than the file holds.
    """

    def __init__(self, data: bytes) -> None:
        # encoding="bytes": the files are Python 2 pickles, whose str keys and data become bytes.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._encode_budget = len(data)  # bytes made from text: no more than the file's text

    def find_class(self, module: str, name: str) -> Any:
        allowed: dict[tuple[str, str], Callable[..., Any]] = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,  # written by numpy 1.x (the real files)
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,  # written by numpy 2.x
            ("numpy", "ndarray"): self._ndarray,  # only ever an argument of _reconstruct
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,  # how Python 3 writes bytes at protocol 2
            ("__builtin__", "bytes"): self._empty_bytes,  # ... and empty bytes
        }
        call = allowed.get((module, name))
        if call is None:
            raise DatasetError(f"refusing to load {module}.{name} from a CIFAR-10 batch: not part of the format")
        return _Guard(f"{module}.{name}", call)

    @staticmethod
    def _ndarray(*args: object) -> Any:
        raise DatasetError("refusing to call numpy.ndarray(...): it allocates any shape asked, whatever the file holds")

    @staticmethod
    def _reconstruct(subtype: object, shape: object, dtype: object) -> _PickledArray:
        # numpy pickles every array as an empty (0,) array whose state (BUILD) then sets it.
        ndarray = isinstance(subtype, _Guard) and subtype.name == "numpy.ndarray"
        if not ndarray or type(shape) is not tuple or shape != (0,) or dtype not in (b"b", "b"):
            raise DatasetError(
                "refusing numpy's _reconstruct with other arguments than numpy writes: (ndarray, (0,), 'b')"
            )
        return _PickledArray()

    @staticmethod
    def _dtype(spec: object, align: object = False, copy: object = False) -> _PickledDtype:
        if spec not in (b"u1", "u1") or align not in (False, 0):
            shown = repr(spec)[:40] if isinstance(spec, (str, bytes)) else f"a {type(spec).__name__}"
            raise DatasetError(f"refusing numpy.dtype({shown}): CIFAR-10 pixels are uint8 ('u1')")
        return _PickledDtype()

    def _encode(self, text: object, encoding: object = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise DatasetError("refusing _codecs.encode other than of text to latin1, how Python 3 pickles bytes")
        self._encode_budget -= len(text)
        if self._encode_budget < 0:  # the same text encoded again and again
            raise DatasetError("the pickle makes more bytes from text than the file holds")
        return text.encode("latin-1")

    @staticmethod
    def _empty_bytes(*args: object) -> bytes:
        if args:
            raise DatasetError("refusing bytes(...) with arguments: Python pickles only bytes() this way")
        return b""


def load_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] (HWC, RGB) and labels int64 [N] of ``"train"`` (50 000) or ``"test"`` (10 000).

    ``root`` is the folder holding ``cifar-10-batches-py`` or ``cifar-10-batches-bin``, or one of those.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    for folder, reader, suffix in ((PY_DIR, _read_python_batch, ""), (BIN_DIR, _read_binary_batch, ".bin")):
        directory = root if root.name == folder else root / folder
        if directory.is_dir():
            parts = [reader(_existing(directory / f"{name}{suffix}")) for name in SPLITS[split]]
            planar = np.concatenate([rows for rows, _ in parts])
            labels = np.concatenate([part_labels for _, part_labels in parts])
            images = np.ascontiguousarray(planar.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            return images, labels
    raise DatasetNotFoundError(
        f"no CIFAR-10 files under {root} (looked for {PY_DIR}/ and {BIN_DIR}/); "
        "imgstore.datasets.download_cifar10(dest) fetches them"
    )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(f"CIFAR-10 batch file {path} is missing")
    return path


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Planar rows uint8 [N, 3072] (read-only) and labels int64 [N] of one pickled batch."""
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise DatasetError(f"{path} is {size} bytes: too large for a CIFAR-10 batch of at most {_MAX_IMAGES} images")
    data = path.read_bytes()
    _check_opcodes(data, path)
    try:
        batch = _CifarUnpickler(data).load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:  # a malformed pickle fails in many ways: truncated, bad opcodes, bad arguments
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    labels, data_entry = batch.get(b"labels"), batch.get(b"data")
    if not isinstance(labels, list) or not all(type(label) is int and 0 <= label <= 9 for label in labels):
        raise DatasetError(f"{path}: b'labels' must be a list of integers 0-9")
    if len(labels) > _MAX_IMAGES:
        raise DatasetError(f"{path}: {len(labels)} labels, more than the {_MAX_IMAGES} images a batch can hold")
    rows = data_entry.array if isinstance(data_entry, _PickledArray) else None
    if rows is None or rows.shape != (len(labels), _PIXELS):
        shape = "no array" if rows is None else f"shape {rows.shape}"
        raise DatasetError(
            f"{path}: b'data' must be a uint8 array [{len(labels)}, {_PIXELS}] (one row a label), not {shape}"
        )
    return rows, np.array(labels, dtype=np.int64)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Planar rows uint8 [N, 3072] and labels int64 [N] of one binary batch."""
    size = path.stat().st_size
    if size > _MAX_IMAGES * (_PIXELS + 1):
        raise DatasetError(f"{path} is {size} bytes: more than the {_MAX_IMAGES} records a CIFAR-10 batch can hold")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (_PIXELS + 1):
        raise DatasetError(f"{path} is {raw.size} bytes: not a whole number of CIFAR-10 records of 3 073 bytes")
    records = raw.reshape(-1, _PIXELS + 1)
    return records[:, 1:], _checked_labels(records[:, 0], path)


def _checked_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.dtype.kind not in "iu" or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: labels must be integers 0-9")
    return labels.astype(np.int64)
