"""Helpers shared by the operator modules: tensors from static values, axes, dtypes."""

from __future__ import annotations

import numpy as np

from kiln.tensor import Tensor, _make


def T(x) -> Tensor:
    """``x`` as a Kiln tensor (a static NumPy value becomes a constant tensor)."""
    if x is None or isinstance(x, Tensor):
        return x
    return _make(np.array(x))


def arr(x) -> np.ndarray:
    """The value of a static input (a NumPy array or a constant tensor) as a NumPy array."""
    if isinstance(x, Tensor):
        return x._data
    return np.asarray(x)


def is_static(x) -> bool:
    return isinstance(x, np.ndarray)


def axis(a: int, ndim: int, ctx=None) -> int:
    """A normalized axis, with an error naming the node when out of range."""
    a = int(a)
    if not -ndim <= a < max(ndim, 1):
        where = f"ONNX node {ctx.name!r} ({ctx.op_type}): " if ctx is not None else ""
        raise ValueError(f"{where}axis {a} is out of range for a {ndim}-d input")
    return a + ndim if a < 0 else a


def ints(x) -> list:
    """A static input or attribute as a list of Python ints."""
    return [int(v) for v in np.asarray(arr(x)).reshape(-1)]
