"""Elementwise ops: arithmetic, comparisons, math functions and activations, with broadcasting
and PyTorch's dtype promotion."""

from __future__ import annotations

import numbers

import numpy as np

from kiln import dtypes
from kiln.dispatch import apply_inplace
from kiln.grad_mode import STATE
from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor, _make

__all__ = ["add", "sub", "mul", "div", "neg", "exp", "clone"]


# -- operands ------------------------------------------------------------------------------------

def as_operand(x, dt: dtypes.dtype, op: str) -> Tensor:
    """``x`` as a tensor of dtype ``dt``: numbers become constants, tensors are cast if needed."""
    if isinstance(x, Tensor):
        return x if x._data.dtype == dt.np else cast(x, dt)
    if isinstance(x, (numbers.Number, np.generic)):
        return _make(np.array(x, dt.np))
    raise TypeError(f"{op}(): expected a Tensor or a number, got {type(x).__name__}")


def binary_operands(a, b, op: str):
    """Both operands of a binary op, promoted to their common dtype."""
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a._data.dtype == b._data.dtype:
        return a, b
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"{op}(): expected at least one Tensor argument")
    dt = dtypes.result_type(a, b)
    return as_operand(a, dt, op), as_operand(b, dt, op)


def float_operand(x: Tensor) -> Tensor:
    """Integer and bool inputs of float functions (exp, sqrt, ...) become the default float."""
    if x._data.dtype.kind == "f":
        return x
    return cast(x, dtypes.get_default_dtype())


# -- cast and clone ------------------------------------------------------------------------------

@primitive("cast", traits={"elementwise"})
def _cast(x, dtype):
    return x.astype(dtype)


@_cast.def_vjp
def _cast_vjp(g, node):
    return (g.to(node.inputs[0].dtype),)


def cast(x: Tensor, dtype) -> Tensor:
    d = dtypes.as_dtype(dtype)
    if x._data.dtype == d.np:
        return x
    return _cast(x, dtype=d.np)


def to(self: Tensor, *args, dtype=None, **kwargs) -> Tensor:
    """``t.to(dtype)`` (devices and ``copy`` are accepted; there is only the CPU)."""
    for a in args:
        if isinstance(a, Tensor):
            dtype = a.dtype
        elif a is not None and not isinstance(a, str):
            dtype = a
    out = self if dtype is None else cast(self, dtype)
    if kwargs.get("copy") and out is self:
        out = clone(self)
    return out


@primitive("clone", traits={"elementwise"})
def _clone(x):
    return np.array(x, copy=True)


@_clone.def_vjp
def _clone_vjp(g, node):
    return (g,)


def clone(input: Tensor, *, memory_format=None) -> Tensor:
    """A copy of ``input`` that autograd sees through."""
    return _clone(input)


# -- arithmetic ----------------------------------------------------------------------------------

@primitive("add", traits={"elementwise"})
def _add(a, b):
    return np.add(a, b)


@_add.def_vjp
def _add_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None, sum_to(g, b._data.shape) if nb else None)


@primitive("sub", traits={"elementwise"})
def _sub(a, b):
    return np.subtract(a, b)


@_sub.def_vjp
def _sub_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None, sum_to(-g, b._data.shape) if nb else None)


@primitive("mul", traits={"elementwise"}, save=(0, 1))
def _mul(a, b):
    return np.multiply(a, b)


@_mul.def_vjp
def _mul_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g * b, a._data.shape) if na else None,
            sum_to(g * a, b._data.shape) if nb else None)


@primitive("div", traits={"elementwise"}, save=(0, 1))
def _div(a, b):
    return np.true_divide(a, b)


@_div.def_vjp
def _div_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g / b, a._data.shape) if na else None,
            sum_to(-g * a / (b * b), b._data.shape) if nb else None)


@primitive("neg", traits={"elementwise"})
def _neg(x):
    return np.negative(x)


@_neg.def_vjp
def _neg_vjp(g, node):
    return (-g,)


def add(input, other, *, alpha=1) -> Tensor:
    """``input + alpha * other`` with broadcasting and type promotion."""
    if alpha != 1:
        other = mul(other, alpha)
    a, b = binary_operands(input, other, "add")
    return _add(a, b)


def sub(input, other, *, alpha=1) -> Tensor:
    """``input - alpha * other``."""
    if alpha != 1:
        other = mul(other, alpha)
    a, b = binary_operands(input, other, "sub")
    return _sub(a, b)


def mul(input, other) -> Tensor:
    a, b = binary_operands(input, other, "mul")
    return _mul(a, b)


def div(input, other, *, rounding_mode=None) -> Tensor:
    """True division (integers give floats), or ``rounding_mode='floor'|'trunc'``."""
    a, b = binary_operands(input, other, "div")
    if rounding_mode is None:
        if a._data.dtype.kind != "f":
            a, b = float_operand(a), float_operand(b)
        return _div(a, b)
    raise NotImplementedError("div(rounding_mode=...) is added with floor_divide")


def neg(input: Tensor) -> Tensor:
    return _neg(input)


@primitive("exp", traits={"elementwise"}, save_out=True)
def _exp(x):
    return np.exp(x)


@_exp.def_vjp
def _exp_vjp(g, node):
    return (g * node.out,)


def exp(input: Tensor) -> Tensor:
    return _exp(float_operand(input))


# -- in-place variants ---------------------------------------------------------------------------

def _inplace(prim, self: Tensor, other, op: str) -> Tensor:
    dt = dtypes.result_type(self, other)
    if dt._category > self.dtype._category:
        raise RuntimeError(
            f"{op}: result type {dt.name} can't be cast to the desired output type "
            f"{self.dtype.name}"
        )
    return apply_inplace(prim, self, (as_operand(other, self.dtype, op),), {})


def _augmented(prim, self: Tensor, other, op: str) -> Tensor:
    """``x[idx] += v`` reads a view, updates it and assigns it back; when the view is part of
    the autograd graph, update out of place and let the assignment record the write."""
    base = self._base
    if base is not None and (base._rg or self._rg) and STATE.grad_enabled:
        a, b = binary_operands(self, other, op)
        return prim(a, b)
    return _inplace(prim, self, other, op)


def add_(self, other, *, alpha=1):
    if alpha != 1:
        other = mul(other, alpha)
    return _inplace(_add, self, other, "add_")


def sub_(self, other, *, alpha=1):
    if alpha != 1:
        other = mul(other, alpha)
    return _inplace(_sub, self, other, "sub_")


def mul_(self, other):
    return _inplace(_mul, self, other, "mul_")


def div_(self, other):
    return _inplace(_div, self, other, "div_")


TENSOR_METHODS = {
    "add": add, "sub": sub, "mul": mul, "div": div, "neg": neg, "exp": exp, "clone": clone,
    "to": to, "add_": add_, "sub_": sub_, "mul_": mul_, "div_": div_,
    "__add__": add, "__radd__": lambda self, other: add(other, self),
    "__sub__": sub, "__rsub__": lambda self, other: sub(other, self),
    "__mul__": mul, "__rmul__": lambda self, other: mul(other, self),
    "__truediv__": div, "__rtruediv__": lambda self, other: div(other, self),
    "__neg__": neg,
    "__iadd__": lambda self, other: _augmented(_add, self, other, "add_"),
    "__isub__": lambda self, other: _augmented(_sub, self, other, "sub_"),
    "__imul__": lambda self, other: _augmented(_mul, self, other, "mul_"),
    "__itruediv__": lambda self, other: _augmented(_div, self, float_operand(other)
                                                   if isinstance(other, Tensor) else other,
                                                   "div_"),
    "float": lambda self: cast(self, dtypes.float32),
    "double": lambda self: cast(self, dtypes.float64),
    "half": lambda self: cast(self, dtypes.float16),
    "long": lambda self: cast(self, dtypes.int64),
    "int": lambda self: cast(self, dtypes.int32),
    "bool": lambda self: cast(self, dtypes.bool_),
    "type": lambda self, dtype=None: self.dtype if dtype is None else cast(self, dtype),
}
