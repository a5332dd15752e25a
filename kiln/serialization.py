"""Checkpoints: ``kiln.save`` / ``kiln.load`` in the safetensors format (never pickle).

A checkpoint is one safetensors file.  Tensors are stored under their key path joined with
``"."`` (a flat ``state_dict`` keeps its keys exactly, so the file is an ordinary safetensors
state dict that ``safetensors.torch.load_file`` reads, and files written by PyTorch through
``safetensors.torch.save_file`` load here).  Anything else in the object - nested dicts with int
keys, lists, tuples, numbers, strings, None, as in an optimizer's ``state_dict()`` - is kept as a
JSON skeleton in the header's metadata (``"kiln.tree"``), so the object comes back with the same
structure.  Each tensor's CRC-32 is stored too (``"kiln.crc32"``), and one over the tensors'
names, dtypes and shapes and the skeleton (``"kiln.header_crc32"``), so a flipped byte in the data
or the header is reported instead of silently loaded.  Loading only parses JSON and copies
bytes: it never runs code.

Saving to a path is atomic: the bytes go to a temporary file in the same directory, are flushed
and fsync'ed, and only then renamed over the target with ``os.replace``; a crash at any point
leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib

import numpy as np

from kiln import dtypes
from kiln.tensor import Tensor, _make

__all__ = ["save", "load"]

_TREE = "kiln.tree"
_CRC = "kiln.crc32"
_HEADER_CRC = "kiln.header_crc32"
_SEP = "."
# safetensors dtype names Kiln reads (safetensors' numpy API covers exactly these and more).
_ST_DTYPES = {"BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "F32", "F64"}
# Valid in safetensors files but not Kiln dtypes (loading them is a TypeError, not corruption).
_ST_OTHER_DTYPES = {"BF16", "U16", "U32", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
                    "F6_E2M3", "F6_E3M2"}


# -- the object <-> (tensors, JSON skeleton) mapping ---------------------------------------------
def _flatten(obj, path: list, arrays: dict, crcs: dict):
    if isinstance(obj, (Tensor, np.ndarray)):
        arr = obj._data if isinstance(obj, Tensor) else obj
        if not isinstance(obj, Tensor):
            dtypes.from_numpy_dtype(arr.dtype)  # TypeError naming an unsupported dtype
        name = _SEP.join(path) or "tensor"
        base, k = name, 1
        while name in arrays:  # e.g. keys "a.b" and ("a", "b") in the same object
            k += 1
            name = f"{base}#{k}"
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            arr = arr.copy(order="C")
        arrays[name] = arr
        crcs[name] = zlib.crc32(arr.reshape(-1).view(np.uint8))
        return {"$tensor" if isinstance(obj, Tensor) else "$ndarray": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, dtypes.dtype):
        return {"$dtype": obj.name}
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise TypeError(f"kiln.save: dict keys must be str, int, float, bool or None, "
                                f"got {type(key).__name__} at {_where(path)}")
            items.append([key, _flatten(value, path + [str(key)], arrays, crcs)])
        return {"$dict": items}
    if isinstance(obj, tuple):
        return {"$tuple": [_flatten(v, path + [str(i)], arrays, crcs) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, path + [str(i)], arrays, crcs) for i, v in enumerate(obj)]
    raise TypeError(
        f"kiln.save: cannot save an object of type {type(obj).__name__} at {_where(path)}; "
        "checkpoints hold tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts "
        "(nothing is pickled)")


def _where(path: list) -> str:
    return repr(_SEP.join(path)) if path else "the top level"


def _unflatten(node, tensors: dict, where: str):
    if isinstance(node, list):
        return [_unflatten(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, value), = node.items()
        if tag in ("$tensor", "$ndarray"):
            if value not in tensors:
                raise _invalid(where, f"the metadata refers to a missing tensor {value!r}")
            arr = tensors[value]
            return _make(arr) if tag == "$tensor" else arr
        if tag == "$dict":
            return {k: _unflatten(v, tensors, where) for k, v in value}
        if tag == "$tuple":
            return tuple(_unflatten(v, tensors, where) for v in value)
        if tag == "$dtype":
            return dtypes.as_dtype(value)
    raise _invalid(where, f"unexpected node in the metadata: {str(node)[:80]}")


def _safetensors():
    try:
        import safetensors.numpy as stnp
        from safetensors import safe_open
    except ImportError:
        raise ImportError('kiln.save / kiln.load need the safetensors package (a dependency of '
                          'kiln): pip install "safetensors>=0.4"') from None
    return stnp, safe_open


def _header_crc(meta: dict, arrays: dict) -> int:
    """CRC-32 of what the tensor checksums do not cover: the structure, the checksums, and
    each tensor's name, dtype and shape (a flipped bit there would otherwise load silently)."""
    desc = sorted([k, a.dtype.str, list(a.shape)] for k, a in arrays.items())
    return zlib.crc32(json.dumps([meta.get(_TREE), meta.get(_CRC), desc]).encode())


def _invalid(where: str, why: str) -> RuntimeError:
    return RuntimeError(f"kiln.load: not a valid safetensors checkpoint: {where} ({why})")


# -- save ---------------------------------------------------------------------------------------
def save(obj, f, pickle_module=None, pickle_protocol=None, **kwargs) -> None:
    """Write ``obj`` (a state dict, an optimizer state dict, a tensor, or nested dicts, lists and
    tuples of tensors and plain values) to ``f``, a path or a writable binary file.

    The file is safetensors (see the module docstring); writing to a path is atomic.
    ``pickle_module`` and ``pickle_protocol`` are accepted for PyTorch compatibility and ignored.

    >>> import kiln, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
    >>> kiln.save({"w": kiln.ones(2, 3), "step": 7}, path)
    >>> sd = kiln.load(path)
    >>> sd["w"].shape, sd["step"]
    (kiln.Size([2, 3]), 7)
    """
    stnp, _ = _safetensors()
    arrays: dict = {}
    crcs: dict = {}
    tree = _flatten(obj, [], arrays, crcs)
    metadata = {"format": "pt", _TREE: json.dumps(tree, separators=(",", ":")),
                _CRC: json.dumps(crcs, separators=(",", ":"))}
    metadata[_HEADER_CRC] = str(_header_crc(metadata, arrays))
    if hasattr(f, "write"):
        f.write(stnp.save(arrays, metadata=metadata))
        return
    write_atomic(os.fspath(f), lambda tmp: stnp.save_file(arrays, tmp, metadata=metadata))


def read_header_bytes(path: str) -> tuple:
    """(the 8-byte length and the JSON header of a safetensors file, the file's size); only as
    many bytes as the file holds, so a truncated file is reported by ``_check_header``."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        size = os.fstat(fh.fileno()).st_size
        raw = head + (fh.read(n) if n <= size - 8 else b"")
    return raw, size


def write_atomic(path: str, write) -> None:
    """Create ``path`` with ``write(tmp_path)`` so that a crash at any moment leaves the old file
    or the new one, never a torn file: temporary file, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _file_mode(path: str) -> int:
    """Mode for the new file: the old checkpoint's, else what ``open`` would create (mkstemp
    makes 0600 files)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- load ---------------------------------------------------------------------------------------
def _check_header(raw: bytes, size: int, where: str) -> dict:
    """Parse the safetensors header ourselves first, for errors that name the problem."""
    if size < 8:
        raise _invalid(where, f"only {size} bytes")
    n = int.from_bytes(raw[:8], "little")
    if n > size - 8:
        raise _invalid(where, f"header of {n} bytes in a file of {size} bytes")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(where, f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise _invalid(where, "the header is not a JSON object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list)):
            raise _invalid(where, f"malformed header entry {name[:80]!r}")
        dt = info["dtype"]
        if dt not in _ST_DTYPES and dt not in _ST_OTHER_DTYPES:
            raise _invalid(where, f"unknown dtype {dt[:20]!r} for tensor {name[:80]!r}")
        if dt not in _ST_DTYPES:
            raise TypeError(f"kiln.load: tensor {name!r} in {where} has dtype {dt}, which kiln "
                            f"does not support (supported: {', '.join(sorted(_ST_DTYPES))})")
    return header


def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """Read a checkpoint written by ``kiln.save`` (or any safetensors file) from ``f``, a path
    or a readable binary file, and return the saved object.

    A plain safetensors file (e.g. from ``safetensors.torch.save_file``) loads as a dict of
    tensors.  A missing file raises ``FileNotFoundError``; a truncated or corrupt one raises
    ``RuntimeError("kiln.load: not a valid safetensors checkpoint: <file> (...)")``.  Loading
    never executes code.  ``map_location``, ``pickle_module``, ``weights_only`` and ``mmap``
    are accepted for PyTorch compatibility and ignored (everything is on the CPU, and only
    data is ever read).
    """
    stnp, safe_open = _safetensors()
    if hasattr(f, "read"):
        raw = f.read()
        where = repr(getattr(f, "name", "<file object>"))
        header = _check_header(raw, len(raw), where)
        try:
            arrays = stnp.load(raw)
        except Exception as e:  # the Rust parser's SafetensorError and friends
            raise _invalid(where, str(e)) from None
    else:
        path = os.fspath(f)
        where = repr(path)
        raw, size = read_header_bytes(path)
        header = _check_header(raw, size, where)
        try:
            with safe_open(path, framework="np") as st:
                arrays = {k: st.get_tensor(k) for k in st.keys()}
        except Exception as e:
            raise _invalid(where, str(e)) from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise _invalid(where, "the metadata is not a JSON object")
    # Kiln's files carry both checksums; a tensor checksum without the header one means the
    # header checksum's own key was damaged.
    if (_HEADER_CRC in meta or _CRC in meta) and \
            meta.get(_HEADER_CRC) != str(_header_crc(meta, arrays)):
        raise _invalid(where, "checksum mismatch in the header: the names, shapes, dtypes or "
                              "structure are corrupt")
    if _CRC in meta:
        try:
            crcs = json.loads(meta[_CRC])
        except ValueError as e:
            raise _invalid(where, f"unreadable checksums: {e}") from None
        for name, arr in arrays.items():
            if name in crcs and zlib.crc32(arr.reshape(-1).view(np.uint8)) != crcs[name]:
                raise _invalid(where, f"checksum mismatch in tensor {name!r}: the data is "
                                      "corrupt")
    if _TREE not in meta:
        order = sorted(arrays, key=lambda k: header[k].get("data_offsets", [0])[0])
        return {k: _make(arrays[k]) for k in order}
    try:
        tree = json.loads(meta[_TREE])
    except ValueError as e:
        raise _invalid(where, f"unreadable structure metadata: {e}") from None
    return _unflatten(tree, arrays, where)
