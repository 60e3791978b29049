"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al., http://yann.lecun.com/exdb/mnist/).

An IDX file is a 4-byte magic number, ``ndim`` big-endian uint32 dimension sizes, then the array in
C order, big-endian::

    byte 0-1   0x00 0x00
    byte 2     dtype code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte 3     ndim
    then       ndim x uint32 (big-endian) sizes, e.g. 60000, 28, 28
    then       prod(sizes) items of the dtype, big-endian

Files may be gzip-compressed (detected by the gzip magic ``1f 8b``, not by the file name).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from weightsmith.errors import DataError

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}


def read_idx_bytes(path: str | Path) -> bytes:
    """The raw IDX bytes of ``path``, gunzipped if the file starts with the gzip magic.

    Raises:
        DataError: the file is missing or is a corrupt or truncated gzip stream.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"IDX file {path} is not a valid gzip stream (truncated or corrupt: {e})") from None
    return data


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-endian array of the stored dtype and shape.

    Raises:
        DataError: naming ``name`` and what is wrong (bad magic, unknown dtype code, size mismatch).
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"IDX file {name}: bad magic {data[:4].hex(' ') or '(empty)'}; expected 00 00 <dtype> <ndim>")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(f"IDX file {name}: unknown dtype code 0x{code:02x}; known: "
                        + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES))
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {name}: truncated header ({len(data)} bytes; {ndim} dimensions need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != want:
        raise DataError(f"IDX file {name}: size mismatch: header says shape {shape} = {want:,} bytes of data, "
                        f"file has {len(data) - header:,}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a raw or gzip-compressed IDX file -> array of its stored shape and dtype (native endian).

    Raises:
        DataError: naming the file and what is wrong (unreadable, bad gzip, bad magic, size mismatch).
    """
    return parse_idx(read_idx_bytes(path), str(path))


def write_idx(path: str | Path, arr: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``arr`` as IDX; gzip-compressed when ``compress`` (default: the name ends in ``.gz``)."""
    path = Path(path)
    arr = np.asarray(arr)
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"cannot write {arr.dtype} as IDX; supported: "
                        + ", ".join(str(np.dtype(v).newbyteorder("=")) for v in IDX_DTYPES.values()))
    data = (bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
            + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes())
    if compress if compress is not None else path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
