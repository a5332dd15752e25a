"""Tensor factories: tensor, from_numpy, zeros/ones/full/empty/arange/linspace/eye and *_like."""

from __future__ import annotations

import numbers

import numpy as np

from kiln import dtypes
from kiln.tensor import Tensor, _make, install_methods

__all__ = ["tensor", "as_tensor", "from_numpy", "zeros", "ones", "full", "empty", "arange",
           "linspace", "eye", "zeros_like", "ones_like", "full_like", "empty_like", "scalar_tensor"]


def _infer_dtype(arr: np.ndarray, data) -> dtypes.dtype:
    kind = arr.dtype.kind
    if kind == "f":
        if isinstance(data, (np.ndarray, np.generic)):
            return dtypes.from_numpy_dtype(arr.dtype)
        return dtypes.get_default_dtype()
    if kind in "iu":
        if isinstance(data, np.ndarray) or isinstance(data, np.generic):
            return dtypes.from_numpy_dtype(arr.dtype)
        return dtypes.int64
    if kind == "b":
        return dtypes.bool_
    raise TypeError(f"can't convert data of numpy type {arr.dtype} to a kiln tensor")


def _to_array(data, dtype, copy: bool) -> np.ndarray:
    """numpy array for ``data`` (nested lists, numbers, arrays, tensors) in PyTorch's dtype."""
    if isinstance(data, Tensor):
        arr = data._data
        src = data
    else:
        if isinstance(data, (list, tuple)) and any(isinstance(x, Tensor) for x in _flat(data)):
            data = _unwrap(data)
        try:
            arr = np.asarray(data)
        except ValueError as e:
            raise ValueError(f"tensor(): could not build a tensor from the data: {e}") from None
        src = data
        if arr.dtype.kind in "US":  # PyTorch: a ValueError for strings
            raise ValueError(f"tensor(): strings are not numbers (got {str(data)[:40]!r})")
        if arr.dtype == object:
            raise RuntimeError(
                f"tensor(): could not infer a dtype for the data (got {type(data).__name__} "
                "holding non-numeric or ragged values)"
            )
    d = dtypes.as_dtype(dtype) if dtype is not None else (
        dtypes.from_numpy_dtype(arr.dtype) if isinstance(src, Tensor) else _infer_dtype(arr, src)
    )
    if arr.dtype != d.np:
        return arr.astype(d.np)
    return arr.copy() if copy else arr


def _flat(seq):
    for x in seq:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _unwrap(seq):
    return [(_unwrap(x) if isinstance(x, (list, tuple)) else
             (x._data if isinstance(x, Tensor) else x)) for x in seq]


def tensor(data, *, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of ``data``.

    >>> import kiln
    >>> kiln.tensor([[1, 2], [3, 4]]).dtype
    kiln.int64
    """
    t = _make(_to_array(data, dtype, copy=True))
    if requires_grad:
        t.requires_grad = True
    return t


def as_tensor(data, dtype=None, device=None) -> Tensor:
    """Like ``tensor`` but shares memory with a numpy array or tensor of the same dtype."""
    if isinstance(data, Tensor) and (dtype is None or dtypes.as_dtype(dtype) is data.dtype):
        return data
    return _make(_to_array(data, dtype, copy=False))


def scalar_tensor(value, *, dtype=None, requires_grad: bool = False) -> Tensor:
    return tensor(value, dtype=dtype or dtypes.get_default_dtype(), requires_grad=requires_grad)


def from_numpy(array: np.ndarray) -> Tensor:
    """A tensor sharing memory with ``array`` (which keeps its dtype)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected np.ndarray (got {type(array).__name__})")
    dtypes.from_numpy_dtype(array.dtype)
    return _make(array)


def _shape(size) -> tuple:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    for s in size:
        if not isinstance(s, numbers.Integral):
            raise TypeError(f"size must be a sequence of ints, got {type(s).__name__}")
        if s < 0:
            raise RuntimeError(f"Trying to create tensor with negative dimension {s}: {list(size)}")
    return tuple(int(s) for s in size)


def _factory(arr: np.ndarray, requires_grad: bool) -> Tensor:
    t = _make(arr)
    if requires_grad:
        t.requires_grad = True
    return t


def _float_or(dtype) -> np.dtype:
    return (dtypes.as_dtype(dtype) if dtype is not None else dtypes.get_default_dtype()).np


def zeros(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of zeros, e.g. ``kiln.zeros(2, 3)``."""
    return _factory(np.zeros(_shape(size), _float_or(dtype)), requires_grad)


def ones(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor of ones, e.g. ``kiln.ones(2, 3)``."""
    return _factory(np.ones(_shape(size), _float_or(dtype)), requires_grad)


def empty(*size, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """An uninitialised tensor (Kiln fills it with zeros so results never depend on garbage)."""
    return zeros(*size, dtype=dtype, requires_grad=requires_grad)


def full(size, fill_value, *, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A tensor filled with ``fill_value``; the dtype follows the value as in PyTorch."""
    d = dtypes.as_dtype(dtype) if dtype is not None else dtypes.scalar_dtype(fill_value)
    return _factory(np.full(_shape((size,)), fill_value, d.np), requires_grad)


def _like(t: Tensor, dtype):
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a Tensor, got {type(t).__name__}")
    return t._data.shape, (dtypes.as_dtype(dtype).np if dtype is not None else t._data.dtype)


def zeros_like(input: Tensor, *, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    shape, dt = _like(input, dtype)
    return _factory(np.zeros(shape, dt), requires_grad)


def ones_like(input: Tensor, *, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    shape, dt = _like(input, dtype)
    return _factory(np.ones(shape, dt), requires_grad)


def empty_like(input: Tensor, *, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return zeros_like(input, dtype=dtype, requires_grad=requires_grad)


def full_like(input: Tensor, fill_value, *, dtype=None, device=None,
              requires_grad: bool = False) -> Tensor:
    shape, dt = _like(input, dtype)
    return _factory(np.full(shape, fill_value, dt), requires_grad)


def arange(start, end=None, step=1, *, dtype=None, device=None,
           requires_grad: bool = False) -> Tensor:
    """Values from ``start`` up to (not including) ``end``; integer unless any bound is a float."""
    if end is None:
        start, end = 0, start
    if step == 0:
        raise RuntimeError("arange: step must be nonzero")
    if (end - start) * step < 0:
        raise RuntimeError(
            f"arange: upper bound and larger bound inconsistent with step sign "
            f"(start={start}, end={end}, step={step})"
        )
    vals = (start, end, step)
    if dtype is None:
        is_float = any(isinstance(v, float) or (isinstance(v, Tensor) and v.is_floating_point())
                       for v in vals)
        d = dtypes.get_default_dtype() if is_float else dtypes.int64
    else:
        d = dtypes.as_dtype(dtype)
    start, end, step = (float(v) if isinstance(v, Tensor) else v for v in vals)
    if not all(np.isfinite(v) for v in (start, end, step)):
        raise RuntimeError(f"arange: unsupported range: {start} -> {end} (step {step})")
    n = max(0, int(np.ceil((end - start) / step)))
    arr = (start + np.arange(n, dtype=np.float64) * step).astype(d.np)
    return _factory(arr, requires_grad)


def linspace(start, end, steps: int, *, dtype=None, device=None,
             requires_grad: bool = False) -> Tensor:
    """``steps`` evenly spaced values from ``start`` to ``end`` inclusive."""
    if steps < 0:
        raise RuntimeError("linspace: number of steps must be non-negative")
    return _factory(np.linspace(start, end, steps).astype(_float_or(dtype)), requires_grad)


def eye(n: int, m: int | None = None, *, dtype=None, device=None,
        requires_grad: bool = False) -> Tensor:
    """An ``n x m`` identity matrix."""
    if n < 0 or (m is not None and m < 0):
        raise RuntimeError(f"eye: n and m must be non-negative, got n={n}, m={m}")
    return _factory(np.eye(n, m, dtype=_float_or(dtype)), requires_grad)


def _new_dtype(self: Tensor, dtype) -> dtypes.dtype:
    return dtypes.as_dtype(dtype) if dtype is not None else self.dtype


def _new_tensor(self, data, *, dtype=None, device=None, requires_grad=False):
    return tensor(data, dtype=_new_dtype(self, dtype), requires_grad=requires_grad)


def _new_full(self, size, fill_value, *, dtype=None, device=None, requires_grad=False):
    return full(size, fill_value, dtype=_new_dtype(self, dtype), requires_grad=requires_grad)


def _new_zeros(self, *size, dtype=None, device=None, requires_grad=False):
    return zeros(*size, dtype=_new_dtype(self, dtype), requires_grad=requires_grad)


def _new_ones(self, *size, dtype=None, device=None, requires_grad=False):
    return ones(*size, dtype=_new_dtype(self, dtype), requires_grad=requires_grad)


# ``t.new_*`` build a tensor with ``t``'s dtype (and device), as in PyTorch.
install_methods({"new_tensor": _new_tensor, "new_full": _new_full, "new_zeros": _new_zeros,
                 "new_ones": _new_ones, "new_empty": _new_zeros})
