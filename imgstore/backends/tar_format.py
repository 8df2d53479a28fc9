"""The bytes of a tar store's shards: ustar member headers made in bulk, records laid out as WebDataset samples.

Every record is one WebDataset sample of two members under one key (its index, 9 digits or more):

    KEY.npy | .jpg | .png | .webp | ...   the image: a header block, then its data, padded to 512 bytes
    KEY.cls                               the label in decimal ASCII (what ``webdataset`` decodes as int)

A raw fixed-shape record's image is an ``.npy`` file (NumPy's format 1.0, no pickle); the pixels
are its last bytes. An encoded record's image is its bytes as stored (the extension from their
magic number); a raw record of varied shape is an ``.npy`` file too (see :func:`npy_to_raw`).

The index (``tarindex-<gen>.bin``) holds one :data:`ENTRY` per record: its shard, the offset and
length of its payload in that shard (a raw record: its pixels; else the member's whole data), and
the length of its label text, which starts 512 bytes (the ``.cls`` header) after the payload's
padded end. So a record and its label are one ``pread``: from ``offset`` to :func:`label_ends`.
Headers are made here with NumPy for a whole batch at once: ``tarfile.TarInfo.tobuf`` costs
~15 us a member, as much as writing the record.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile

import numpy as np

from imgstore.codecs.raw import MAGIC as RAW_MAGIC
from imgstore.errors import CorruptStoreError
from imgstore.manifest import MAX_IMAGE_BYTES

BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK  # two zero blocks end a tar archive
MAX_LABEL_DIGITS = 19  # an int64
INT64_MAX = (1 << 63) - 1
ENTRY = np.dtype([("shard", "<u4"), ("label_len", "<u4"), ("offset", "<u8"), ("length", "<u8")])
KEY_DIGITS = 9
_ZERO = ord("0")
_NOT_LABEL_BYTE = np.ones(256, bool)  # every byte but NUL and the ten digits
_NOT_LABEL_BYTE[[0, *range(_ZERO, _ZERO + 10)]] = False


def padded(n: int) -> int:
    """``n`` bytes rounded up to whole 512-byte blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def padded_all(n: np.ndarray) -> np.ndarray:
    return np.asarray((n + BLOCK - 1) // BLOCK * BLOCK, dtype=np.int64)


def label_ends(offset: np.ndarray, length: np.ndarray, label_len: np.ndarray) -> np.ndarray:
    """Where each record's label text ends: its payload's padded end, the ``.cls`` header, the text."""
    return padded_all(offset + length) + BLOCK + label_len.astype(np.int64)


def key_width(stop: int) -> int:
    return max(KEY_DIGITS, len(str(max(0, stop - 1))))


# ---------------------------------------------------------------------- headers


def _template(width: int, mtime: int) -> np.ndarray:
    info = tarfile.TarInfo("0" * width)
    info.mtime, info.mode, info.uname, info.gname = mtime, 0o644, "", ""
    block: np.ndarray = np.frombuffer(info.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8).copy()
    block[148:156] = ord(" ")  # the checksum field counts as spaces while the checksum is summed
    return block


def _put_digits(blocks: np.ndarray, column: int, values: np.ndarray, digits: int, base: int) -> None:
    for d in range(digits):
        blocks[:, column + d] = _ZERO + (values // base ** (digits - 1 - d)) % base


def headers(keys: np.ndarray, width: int, suffixes: np.ndarray, sizes: np.ndarray, mtime: int) -> np.ndarray:
    """ustar headers ``[n, 512]`` of regular files ``KEY<suffix>`` (``suffixes``: ``[n, 8]`` bytes, NUL padded)."""
    n = len(keys)
    blocks = np.tile(_template(width, mtime), (n, 1))
    _put_digits(blocks, 0, keys, width, 10)
    blocks[:, width : width + suffixes.shape[1]] = suffixes
    _put_digits(blocks, 124, sizes.astype(np.int64), 11, 8)  # size: 11 octal digits and a NUL
    sums = blocks.sum(axis=1, dtype=np.int64)
    _put_digits(blocks, 148, sums, 6, 8)  # checksum: 6 octal digits, a NUL, a space
    blocks[:, 154], blocks[:, 155] = 0, ord(" ")
    return blocks


def suffix_array(suffix: bytes, n: int) -> np.ndarray:
    out = np.zeros((n, 8), dtype=np.uint8)
    out[:, : len(suffix)] = np.frombuffer(suffix, dtype=np.uint8)
    return out


def label_digits(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each label's decimal text, ``[n, 19]`` NUL padded, and its length."""
    values = labels.astype(np.int64)
    lengths = np.ones(len(values), dtype=np.int64)
    for d in range(1, MAX_LABEL_DIGITS):
        lengths += values >= 10**d
    text = np.zeros((len(values), MAX_LABEL_DIGITS), dtype=np.uint8)
    for d in range(MAX_LABEL_DIGITS):
        power = np.maximum(lengths - 1 - d, 0)
        text[:, d] = np.where(d < lengths, _ZERO + (values // 10**power) % 10, 0)
    return text, lengths


def parse_label(text: bytes | bytearray, where: object) -> int:
    if not text.isdigit() or not text.isascii():
        raise CorruptStoreError(f"{where}: a label is not a decimal number")
    value = int(text)
    if value > INT64_MAX:  # 19 digits reach past int64: damage, never an OverflowError or a label outside int64
        raise CorruptStoreError(f"{where}: a label is past the int64 range")
    return value


def parse_labels(text: np.ndarray, where: object) -> np.ndarray:
    """Labels from ``[n, MAX_LABEL_DIGITS]`` bytes of decimal text, each NUL padded: ``[n]`` int64, checked.

    ``text`` may be a strided view (rows of a shard's map): each row's bytes must be contiguous."""
    # Digits and NULs only, as parse_label takes: NumPy's parse also takes " 5", "+5", "1_0" (a damaged "45"
    # read as 5 by a get, which parses its shard's labels this way). NumPy's parse then refuses a NUL
    # before a digit and an empty text. One table lookup: a third of the time of comparisons.
    if _NOT_LABEL_BYTE.take(text).any():
        raise CorruptStoreError(f"{where}: a label is not a decimal number")
    try:  # NumPy's own parse (8x faster than one in NumPy operations); a number past int64 is an OverflowError
        values: np.ndarray = text.view(f"S{MAX_LABEL_DIGITS}")[:, 0].astype(np.int64)
    except (ValueError, OverflowError):
        raise CorruptStoreError(f"{where}: a label is not a decimal number in the int64 range") from None
    return values


# ---------------------------------------------------------------------- records


def npy_header(shape: tuple[int, ...]) -> bytes:
    """NumPy's own ``.npy`` header (format 1.0) for uint8 pixels of ``shape``, C order."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def fixed_records(
    first: int, width: int, images: np.ndarray, labels: np.ndarray, prefix: bytes, mtime: int
) -> np.ndarray:
    """Raw records ``first ..`` as ``[n, stride]`` bytes: ``KEY.npy`` (``prefix``, the pixels), ``KEY.cls``."""
    n, nbytes = len(images), images[0].nbytes
    data = padded(len(prefix) + nbytes)
    stride = data + 3 * BLOCK
    out = np.zeros((n, stride), dtype=np.uint8)
    keys = np.arange(first, first + n, dtype=np.int64)
    out[:, :BLOCK] = headers(keys, width, suffix_array(b".npy", n), np.full(n, len(prefix) + nbytes), mtime)
    out[:, BLOCK : BLOCK + len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    out[:, BLOCK + len(prefix) : BLOCK + len(prefix) + nbytes] = images.reshape(n, nbytes)
    text, lengths = label_digits(labels)
    out[:, BLOCK + data : 2 * BLOCK + data] = headers(keys, width, suffix_array(b".cls", n), lengths, mtime)
    out[:, 2 * BLOCK + data : 2 * BLOCK + data + MAX_LABEL_DIGITS] = text
    return out


_MAGIC_SUFFIXES = (
    (b"\xff\xd8\xff", b".jpg"),
    (b"\x89PNG\r\n\x1a\n", b".png"),
    (b"GIF8", b".gif"),
    (b"BM", b".bmp"),
    (b"II*\x00", b".tiff"),
    (b"MM\x00*", b".tiff"),
)


def blob_suffix(blob: bytes) -> bytes:
    """The file extension WebDataset decodes a record by, from its magic number."""
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return b".webp"
    for magic, suffix in _MAGIC_SUFFIXES:
        if blob.startswith(magic):
            return suffix
    return b".bin"


def raw_to_npy(blob: bytes) -> bytes:
    """imgstore's raw blob (magic, ndim, dims, pixels) as an ``.npy`` file of the same pixels."""
    ndim = blob[len(RAW_MAGIC) + 1]
    start = len(RAW_MAGIC) + 2 + 4 * ndim
    shape = struct.unpack(f"<{ndim}I", blob[len(RAW_MAGIC) + 2 : start])
    return npy_header(shape) + blob[start:]


_NPY_HEADER = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \(([0-9, ]{1,100})\), \} *\n")


def npy_to_raw(data: bytes, where: object) -> bytes:
    """The raw blob an ``.npy`` file made by :func:`raw_to_npy` came from (its header parsed strictly, no eval)."""
    if data[:8] != b"\x93NUMPY\x01\x00" or len(data) < 10:
        raise CorruptStoreError(f"{where}: a raw record is not an .npy file")
    header_len = int.from_bytes(data[8:10], "little")
    match = _NPY_HEADER.fullmatch(data[10 : 10 + header_len])
    dims = [part.strip() for part in match.group(1).split(b",")] if match else []
    if not match or not 1 <= len(dims) <= 8 or not all(d.isdigit() for d in dims if d) or b"" in dims[:-1]:
        raise CorruptStoreError(f"{where}: a raw record's .npy header is damaged")
    shape = [int(d) for d in dims if d]
    if min(shape) < 1 or max(shape) >= 1 << 32:
        raise CorruptStoreError(f"{where}: a raw record's .npy header is damaged")
    return RAW_MAGIC + bytes((1, len(shape))) + struct.pack(f"<{len(shape)}I", *shape) + data[10 + header_len :]


def blob_records(first: int, width: int, blobs: list[bytes], labels: np.ndarray, mtime: int) -> list[bytes]:
    """Records ``first ..`` of variable-length bytes (already in their stored form), each as its bytes."""
    n = len(blobs)
    keys = np.arange(first, first + n, dtype=np.int64)
    suffixes = np.stack([suffix_array(b".npy" if b.startswith(b"\x93NUMPY") else blob_suffix(b), 1)[0] for b in blobs])
    sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=n)
    image_headers = headers(keys, width, suffixes, sizes, mtime)
    text, lengths = label_digits(labels)
    label_headers = headers(keys, width, suffix_array(b".cls", n), lengths, mtime)
    out = []
    for k, blob in enumerate(blobs):
        pad = bytes(padded(len(blob)) - len(blob))
        label = text[k].tobytes().ljust(BLOCK, b"\0")
        out.append(b"".join((image_headers[k].tobytes(), blob, pad, label_headers[k].tobytes(), label)))
    return out


def checked_index(entries: np.ndarray, sizes: list[int], count: int, nbytes: int | None, where: object) -> None:
    """Check the first ``count`` index entries against the shards' sizes: a damaged index never reads outside them.

    ``nbytes``: a raw fixed-shape store's image size (every payload has it).
    """
    if count == 0:
        return
    e = entries[:count]
    shard = e["shard"].astype(np.int64)
    if shard[0] != 0 or np.any(np.diff(shard) < 0) or np.any(np.diff(shard) > 1) or shard[-1] >= len(sizes):
        raise CorruptStoreError(f"{where}: the index names shards out of order")
    length = e["length"].astype(np.int64)
    label_len = e["label_len"].astype(np.int64)
    if length.min() < 1 or length.max() > MAX_IMAGE_BYTES or (nbytes is not None and np.any(length != nbytes)):
        raise CorruptStoreError(f"{where}: the index gives records of impossible lengths")
    if label_len.min() < 1 or label_len.max() > MAX_LABEL_DIGITS:
        raise CorruptStoreError(f"{where}: the index gives labels of impossible lengths")
    offset = e["offset"]
    if offset.max() >= 1 << 62:
        raise CorruptStoreError(f"{where}: the index gives impossible offsets")
    offset = offset.astype(np.int64)
    ends = label_ends(offset, length, label_len)
    same = shard[1:] == shard[:-1]
    if offset.min() < BLOCK or np.any(same & (offset[1:] < ends[:-1])):
        raise CorruptStoreError(f"{where}: the index gives overlapping records")
    if np.any(ends > np.asarray(sizes, dtype=np.int64)[shard]):
        raise CorruptStoreError(f"{where}: the index points past the end of a shard")
