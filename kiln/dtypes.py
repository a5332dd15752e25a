"""Kiln dtypes, the default dtype, and PyTorch's type-promotion rules."""

from __future__ import annotations

import numpy as np


class dtype:  # noqa: N801 - PyTorch spells it lowercase
    """A tensor element type, e.g. ``kiln.float32``; wraps a numpy dtype."""

    __slots__ = ("name", "np", "is_floating_point", "is_signed", "itemsize", "_category")

    def __init__(self, name: str, np_dtype, category: int):
        self.name = name
        self.np = np.dtype(np_dtype)
        self.is_floating_point = category == 2
        self.is_signed = self.np.kind in "if"
        self.itemsize = self.np.itemsize
        self._category = category  # 0 bool, 1 integer, 2 floating

    def __repr__(self) -> str:
        return f"kiln.{self.name}"

    def __reduce__(self):
        return (_by_name, (self.name,))


bool_ = dtype("bool", np.bool_, 0)
uint8 = dtype("uint8", np.uint8, 1)
int8 = dtype("int8", np.int8, 1)
int16 = dtype("int16", np.int16, 1)
int32 = dtype("int32", np.int32, 1)
int64 = dtype("int64", np.int64, 1)
float16 = dtype("float16", np.float16, 2)
float32 = dtype("float32", np.float32, 2)
float64 = dtype("float64", np.float64, 2)

ALL = (bool_, uint8, int8, int16, int32, int64, float16, float32, float64)
_FROM_NP = {d.np: d for d in ALL}
_NAMES = {d.name: d for d in ALL}
_NAMES.update(
    {"float": float32, "double": float64, "half": float16, "long": int64, "int": int32,
     "short": int16}
)

_default_float = float32


def _by_name(name: str) -> dtype:
    return _NAMES[name]


def get_default_dtype() -> dtype:
    """The dtype of tensors made from Python floats (``kiln.float32`` unless changed)."""
    return _default_float


def set_default_dtype(d) -> None:
    """Set the default floating dtype (``kiln.float32`` or ``kiln.float64``, as in PyTorch)."""
    global _default_float
    d = as_dtype(d)
    if not d.is_floating_point:
        raise TypeError(f"only floating-point types are supported as the default type, got {d}")
    _default_float = d


def from_numpy_dtype(npdt) -> dtype:
    """The Kiln dtype of a numpy dtype; TypeError for types Kiln does not support."""
    try:
        return _FROM_NP[np.dtype(npdt)]
    except (KeyError, TypeError):
        raise TypeError(f"numpy dtype {npdt} is not supported by kiln "
                        f"(supported: {', '.join(d.name for d in ALL)})") from None


def as_dtype(d) -> dtype:
    """Accept a Kiln dtype, a numpy dtype, a Python type (float, int, bool) or a name."""
    if isinstance(d, dtype):
        return d
    if d is float:
        return float64  # PyTorch: dtype=float means double
    if d is int:
        return int64
    if d is bool:
        return bool_
    if isinstance(d, str) and d in _NAMES:
        return _NAMES[d]
    try:
        return from_numpy_dtype(d)
    except TypeError:
        raise TypeError(f"{d!r} is not a kiln dtype") from None


def promote_types(a: dtype, b: dtype) -> dtype:
    """The smallest dtype both a and b convert to without leaving their category."""
    if a is b:
        return a
    if a._category != b._category:
        return a if a._category > b._category else b  # e.g. int64 + float16 -> float16
    return _FROM_NP[np.promote_types(a.np, b.np)]


def scalar_dtype(value) -> dtype:
    """The dtype PyTorch gives a bare Python number."""
    if isinstance(value, (bool, np.bool_)):
        return bool_
    if isinstance(value, (int, np.integer)):
        return int64
    if isinstance(value, (float, np.floating)):
        return _default_float
    raise TypeError(f"expected a tensor or a number, got {type(value).__name__}")


def result_type(*operands) -> dtype:
    """PyTorch's promotion: dimensioned tensors beat 0-d tensors beat Python numbers,
    unless the weaker operand is of a higher category (bool < integer < floating)."""
    dim = zero = wrapped = None
    for x in operands:
        d = getattr(x, "dtype", None)
        if isinstance(d, dtype):
            if x.ndim:
                dim = d if dim is None else promote_types(dim, d)
            else:
                zero = d if zero is None else promote_types(zero, d)
        else:
            s = scalar_dtype(x)
            wrapped = s if wrapped is None else promote_types(wrapped, s)
    return _combine(_combine(dim, zero), wrapped)


def _combine(higher, lower):
    if higher is None:
        return lower
    if lower is None or lower._category <= higher._category:
        return higher
    return promote_types(higher, lower)
