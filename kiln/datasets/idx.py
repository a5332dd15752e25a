"""A pure-NumPy reader for the IDX files of MNIST and Fashion-MNIST (gzip-compressed or not)."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

__all__ = ["read_idx", "write_idx"]

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "the IDX format")
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_TYPE_CODES = {d.newbyteorder("=").str[1:]: code for code, d in _IDX_TYPES.items()}


def _invalid(path, why: str) -> ValueError:
    return ValueError(f"not a valid IDX file: {os.fspath(path)!r} ({why})")


def read_idx(path) -> np.ndarray:
    """Read an IDX file into a native-endian numpy array of its declared type and shape.

    The file may be gzip-compressed (detected from its first bytes, not its name).  A bad magic
    number, an unknown type code, or a data size that disagrees with the declared shape raises
    ``ValueError`` naming the file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _invalid(path, f"corrupt gzip data: {e}") from None
    if len(raw) < 4:
        raise _invalid(path, f"only {len(raw)} bytes")
    if raw[0] != 0 or raw[1] != 0:
        raise _invalid(path, f"bad magic number 0x{raw[:4].hex()}: the first two bytes must be 0")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise _invalid(path, f"unknown data type code 0x{code:02x}")
    if ndim == 0:
        raise _invalid(path, "zero dimensions")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise _invalid(path, f"truncated header: {ndim} dimensions need {head} bytes, "
                             f"got {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - head
    if got != expected:
        raise _invalid(path, f"shape {shape} of {dtype.newbyteorder('=').name} needs "
                             f"{expected} data bytes, found {got}"
                             + (" (truncated)" if got < expected else " (trailing bytes)"))
    arr = np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def write_idx(path, array, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress``, or by default when the
    name ends in ``.gz``)."""
    a = np.asarray(getattr(array, "_data", array))
    key = a.dtype.str[1:]
    if key not in _TYPE_CODES:
        raise TypeError(f"write_idx: IDX cannot hold {a.dtype} (uint8, int8, int16, int32, "
                        "float32, float64 only)")
    if a.ndim == 0 or a.ndim > 255:
        raise ValueError(f"write_idx: IDX needs 1 to 255 dimensions, got {a.ndim}")
    code = _TYPE_CODES[key]
    data = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
            + a.astype(_IDX_TYPES[code]).tobytes())
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
