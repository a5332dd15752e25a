"""Elementwise ops: arithmetic, comparisons, math functions and activations, with broadcasting
and PyTorch's dtype promotion."""

from __future__ import annotations

import builtins
import functools
import math
import numbers
import warnings

import numpy as np

from kiln import dtypes, jit
from kiln.creation import zeros_like
from kiln.dispatch import apply_inplace, check_inplace_allowed
from kiln.grad_mode import STATE
from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor, _make

# PyTorch computes log(0) = -inf, 1/0 = inf and exp(1000) = inf without a word; numpy warns.
# Only warnings raised from Kiln's kernels (sum of inf and -inf, matmul overflow, ...) are
# silenced: the user's numpy code still warns.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"kiln\.(ops|nn)\.")

__all__ = [
    "abs", "absolute", "add", "allclose", "bitwise_and", "bitwise_not", "bitwise_or",
    "bitwise_xor", "ceil", "clamp", "clamp_max", "clamp_min", "clip", "clone", "cos", "div",
    "divide", "elu", "eq", "equal", "erf", "exp", "expm1", "floor", "floor_divide", "fmod", "ge",
    "gelu", "greater", "greater_equal", "gt", "hardtanh", "isclose", "isfinite", "isinf", "isnan",
    "le", "leaky_relu", "lerp", "addcmul", "addcdiv", "less", "less_equal", "log", "log1p", "log2", "logical_and",
    "logical_not", "logical_or", "logical_xor", "logsigmoid", "lt", "masked_fill", "maximum",
    "minimum", "mul", "multiply", "ne", "neg", "negative", "not_equal", "positive", "pow",
    "reciprocal", "relu", "relu6", "relu_", "remainder", "round", "rsqrt", "sgn", "sigmoid",
    "sign", "silu", "sin", "softplus", "sqrt", "square", "sub", "subtract", "tanh", "true_divide",
    "trunc", "where",
]

# PyTorch's names for dtypes in its error messages ("result type Float can't be cast to ... Long").
_TORCH_NAMES = {
    "bool": "Bool", "uint8": "Byte", "int8": "Char", "int16": "Short", "int32": "Int",
    "int64": "Long", "float16": "Half", "float32": "Float", "float64": "Double",
}


def _tname(d) -> str:
    """PyTorch's name of a kiln dtype, numpy dtype or tensor's dtype."""
    if isinstance(d, Tensor):
        d = d._data.dtype
    if not isinstance(d, dtypes.dtype):
        d = dtypes._FROM_NP[np.dtype(d)]
    return _TORCH_NAMES[d.name]


# -- operands ------------------------------------------------------------------------------------

_NUMBER = (numbers.Number, np.generic)


def _constant(x, npdt) -> Tensor:
    """A 0-d constant tensor holding the number ``x`` in numpy dtype ``npdt``."""
    try:
        return _make(np.array(x, npdt))
    except OverflowError:  # PyTorch wraps integers that do not fit (uint8 + 300 adds 44)
        return _make(np.array(x).astype(npdt))


def as_operand(x, dt: dtypes.dtype, op: str) -> Tensor:
    """``x`` as a tensor of dtype ``dt``: numbers become constants, tensors are cast if needed."""
    if isinstance(x, Tensor):
        return x if x._data.dtype == dt.np else cast(x, dt)
    if isinstance(x, _NUMBER):
        return _constant(x, dt.np)
    raise TypeError(f"{op}(): expected a Tensor or a number, got {type(x).__name__}")


# Category of numpy dtype kinds and of Python scalar types: bool < integer < floating.
_KIND_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2}
_SCALAR_CATEGORY = {bool: 0, int: 1, float: 2}


def _scalar_operand(t: Tensor, x):
    """The constant for Python scalar ``x`` in an op with tensor ``t``, or None when the scalar
    is of a higher category than ``t`` (the general promotion rule then decides)."""
    cat = _SCALAR_CATEGORY.get(type(x))
    if cat is None or cat > _KIND_CATEGORY[t._data.dtype.kind]:
        return None
    return _constant(x, t._data.dtype)


def binary_operands(a, b, op: str):
    """Both operands of a binary op, promoted to their common dtype."""
    if isinstance(a, Tensor):
        if isinstance(b, Tensor):
            if a._data.dtype == b._data.dtype:
                return a, b
        else:
            c = _scalar_operand(a, b)  # the common ``x * 2`` case, without the general rule
            if c is not None:
                return a, c
    elif isinstance(b, Tensor):
        c = _scalar_operand(b, a)
        if c is not None:
            return c, b
    else:
        raise TypeError(f"{op}(): expected at least one Tensor argument")
    for x in (a, b):
        if not isinstance(x, (Tensor, *_NUMBER)):
            raise TypeError(f"{op}(): expected a Tensor or a number, got {type(x).__name__}")
    dt = dtypes.result_type(a, b)
    return as_operand(a, dt, op), as_operand(b, dt, op)


def float_operand(x: Tensor) -> Tensor:
    """Integer and bool inputs of float functions (exp, sqrt, ...) become the default float."""
    if x._data.dtype.kind == "f":
        return x
    return cast(x, dtypes.get_default_dtype())


def _tensor(x, op: str, name: str = "input", pos: int = 1) -> Tensor:
    """``x`` itself if it is a tensor; PyTorch's TypeError otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{op}(): argument '{name}' (position {pos}) must be Tensor, not {type(x).__name__}"
        )
    return x


def _float_input(x, op: str) -> Tensor:
    """The input of a float function: a tensor, promoted to the default float if integral."""
    try:
        kind = x._data.dtype.kind
    except AttributeError:
        raise TypeError(
            f"{op}(): argument 'input' (position 1) must be Tensor, not {type(x).__name__}"
        ) from None
    return x if kind == "f" else cast(x, dtypes.get_default_dtype())


def _float_only(x, op: str) -> Tensor:
    """Activations that PyTorch implements for floating dtypes only."""
    _tensor(x, op)
    if x._data.dtype.kind != "f":
        raise NotImplementedError(f'"{op}" not implemented for \'{_tname(x)}\'')
    return x


def _zero(g: Tensor) -> Tensor:
    """A 0-d zero of ``g``'s dtype, for masking gradients with ``where``."""
    return _make(np.zeros((), g._data.dtype))


# -- broadcasting and shape rules ----------------------------------------------------------------

def broadcast_mismatch(shapes) -> str | None:
    """PyTorch's message for shapes that do not broadcast together, or None when they do.

    Shapes are combined left to right, as PyTorch's TensorIterator does, and the first clash
    found from the trailing dimension is reported with its index in the broadcast result.
    """
    acc = tuple(shapes[0])
    for s in shapes[1:]:
        s = tuple(s)
        n = builtins.max(len(acc), len(s))
        out = [1] * n
        for i in range(n - 1, -1, -1):
            off = n - 1 - i
            a = acc[len(acc) - 1 - off] if off < len(acc) else 1
            b = s[len(s) - 1 - off] if off < len(s) else 1
            if a != b and a != 1 and b != 1:
                return (f"The size of tensor a ({a}) must match the size of tensor b ({b}) at "
                        f"non-singleton dimension {i}")
            out[i] = b if a == 1 else a
        acc = tuple(out)
    return None


def broadcast_shape(op: str, *shapes) -> tuple:
    """The broadcast shape of ``shapes``; RuntimeError naming ``op`` when they clash."""
    first = tuple(shapes[0])
    if all(tuple(s) == first for s in shapes[1:]):
        return first
    msg = broadcast_mismatch(shapes)
    if msg is not None:
        raise RuntimeError(f"{op}: {msg}")
    return tuple(np.broadcast_shapes(*shapes))


def _elementwise(name: str, *, out=0, save=(), save_out=False):
    """Register an elementwise primitive whose output has the broadcast shape of its inputs and
    the dtype of input number ``out`` (an int) or the fixed numpy dtype ``out``."""

    def wrap(impl):
        prim = primitive(name, traits={"elementwise"}, save=save, save_out=save_out)(impl)
        if isinstance(out, int):
            def infer(shapes, dts, **attrs):
                return broadcast_shape(name, *shapes), np.dtype(dts[out])
        else:
            fixed = np.dtype(out)

            def infer(shapes, dts, **attrs):
                return broadcast_shape(name, *shapes), fixed
        prim.def_infer(infer)
        return prim

    return wrap


def _nd(impl):
    """Run a multi-step kernel on 0-d inputs as 1-element arrays (numpy turns 0-d results into
    scalars, which in-place ``out=`` steps cannot write to)."""

    @functools.wraps(impl)
    def kernel(x, **attrs):
        if x.ndim == 0:
            return impl(x.reshape(1), **attrs).reshape(())
        return impl(x, **attrs)

    return kernel


def _nd2(impl):
    """``_nd`` for backward kernels of (gradient, value) pairs, which have equal shapes."""

    @functools.wraps(impl)
    def kernel(g, x, **attrs):
        if x.ndim == 0:
            return impl(g.reshape(1), x.reshape(1), **attrs).reshape(())
        return impl(g, x, **attrs)

    return kernel


def _zero_grads(g, node):
    """VJP of piecewise-constant functions (floor, sign, ...): zeros, as PyTorch returns."""
    return tuple(zeros_like(x) if need else None for x, need in zip(node.inputs, node.needs))


# -- cast, clone and copy ------------------------------------------------------------------------

@primitive("cast", traits={"elementwise"})
def _cast(x, dtype):
    return x.astype(dtype)


@_cast.def_infer
def _cast_infer(shapes, dts, dtype):
    return shapes[0], np.dtype(dtype)


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


@_elementwise("clone")
def _clone(x):
    return np.array(x, copy=True)


@_clone.def_vjp
def _clone_vjp(g, node):
    return (g,)


def clone(input: Tensor, *, memory_format=None) -> Tensor:
    """A copy of ``input`` that autograd sees through."""
    return _clone(_tensor(input, "clone"))


@_elementwise("copy", out=1)
def _copy(dst, src):
    # The value written into dst by ``copy_``: src broadcast to dst's shape (write_into checks
    # that the broadcast shape is dst's own, with PyTorch's message).
    if src.shape == dst.shape:
        return src
    return np.broadcast_to(src, np.broadcast_shapes(dst.shape, src.shape))


@_copy.def_vjp
def _copy_vjp(g, node):
    dst, src = node.inputs
    nd, ns = node.needs
    # the overwritten value gets a zero gradient (not None), as PyTorch's CopyBackwards gives
    return (zeros_like(dst) if nd else None, sum_to(g, src._data.shape) if ns else None)


# -- arithmetic ----------------------------------------------------------------------------------

def _ufunc_inplace(ufunc):
    def write(a, b):
        ufunc(a, b, out=a)

    return write


_eager_run: list = []  # kiln.jit.eager_ops.run, imported on first use (it needs llvmlite)


def _native(op: str, *arrays):
    """The native result of a big float32 ``op`` (kiln.jit.eager_ops), or None for numpy.
    Not while kiln.compile traces: one run is not worth compiling kernels for (the graph's
    elementwise groups are fused; its other ops get their kernels when it first runs)."""
    if STATE.tracer is not None or not jit.available():
        return None
    if not _eager_run:
        from kiln.jit import eager_ops
        _eager_run.append(eager_ops.run)
    return _eager_run[0](op, arrays)


@_elementwise("add")
def _add(a, b):
    out = _native("add", a, b)
    return np.add(a, b) if out is None else out


@_add.def_vjp
def _add_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None, sum_to(g, b._data.shape) if nb else None)


@_elementwise("sub")
def _sub(a, b):
    out = _native("sub", a, b)
    return np.subtract(a, b) if out is None else out


@_sub.def_vjp
def _sub_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None, sum_to(-g, b._data.shape) if nb else None)


@_elementwise("mul", save=(0, 1))
def _mul(a, b):
    out = _native("mul", a, b)
    return np.multiply(a, b) if out is None else out


@_mul.def_vjp
def _mul_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g * b, a._data.shape) if na else None,
            sum_to(g * a, b._data.shape) if nb else None)


@_elementwise("div", save=(0, 1))
def _div(a, b):
    out = _native("div", a, b)
    return np.true_divide(a, b) if out is None else out


@_div.def_vjp
def _div_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g / b, a._data.shape) if na else None,
            sum_to(-g * a / (b * b), b._data.shape) if nb else None)


def _check_int_divisor(a, b):
    if a.dtype.kind != "f" and not np.all(b):
        raise ZeroDivisionError("ZeroDivisionError")


@_elementwise("floor_divide")
def _floor_divide(a, b):
    _check_int_divisor(a, b)
    return np.floor_divide(a, b)


_floor_divide.def_vjp(_zero_grads)


@_elementwise("trunc_divide")
def _trunc_divide(a, b):
    if a.dtype.kind == "f":
        return np.trunc(np.true_divide(a, b))
    _check_int_divisor(a, b)
    # numpy's integer division floors; truncation differs where the remainder is nonzero and
    # the signs differ (exact for all int64 values, unlike a detour through float64)
    q, r = np.divmod(a, b)
    return q + ((r != 0) & ((a < 0) != (b < 0)))


_trunc_divide.def_vjp(_zero_grads)


@_elementwise("remainder", save=(0, 1))
def _remainder(a, b):
    _check_int_divisor(a, b)
    return np.remainder(a, b)  # Python's convention: the sign of the divisor, as PyTorch


@_remainder.def_vjp
def _remainder_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None,
            sum_to(-g * _floor_divide(a, b), b._data.shape) if nb else None)


@_elementwise("fmod", save=(0, 1))
def _fmod(a, b):
    _check_int_divisor(a, b)
    return np.fmod(a, b)  # C's convention: the sign of the dividend


@_fmod.def_vjp
def _fmod_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    return (sum_to(g, a._data.shape) if na else None,
            sum_to(-g * _trunc_divide(a, b), b._data.shape) if nb else None)


@_elementwise("pow", save=(0, 1), save_out=True)
def _pow(a, b):
    if a.dtype.kind in "iu":
        neg = b < 0
        if neg.any():
            # numpy refuses negative integer exponents; PyTorch gives 1 ** -n = 1,
            # (-1) ** -n = +-1 and 0 for every other base
            r = np.power(a, np.where(neg, 0, b))
            special = np.where(a == 1, 1, np.where(a == -1, 1 - 2 * (b % 2), 0))
            return np.where(neg, special, r).astype(r.dtype)
    elif b.ndim == 0 and a.dtype.kind == "f":
        e = b.item()
        if e == 2:
            return np.square(a)  # what PyTorch computes for x ** 2, and much faster than power
        if e == 0.5:
            return np.sqrt(a)
    return np.power(a, b)


@_pow.def_vjp
def _pow_vjp(g, node):
    a, b = node.inputs
    na, nb = node.needs
    ga = gb = None
    if na:
        if b._data.ndim == 0 and not b._rg:
            e = b.item()  # a constant exponent: d/da a**e = e * a**(e-1), and 0 when e == 0
            if e == 0:
                ga = zeros_like(a)
            else:
                ga = g * e * (a if e == 2 else pow(a, e - 1))
        else:
            ga = where(b == 0, 0.0, g * b * pow(a, b - 1))
        ga = sum_to(ga, a._data.shape)
    if nb:
        # PyTorch: no gradient flows to the exponent where the base is 0 and exponent >= 0
        gb = where((a == 0) & (b >= 0), 0.0, g * node.out * log(a))
        gb = sum_to(gb, b._data.shape)
    return ga, gb


@_elementwise("neg")
def _neg(x):
    return np.negative(x)


@_neg.def_vjp
def _neg_vjp(g, node):
    return (-g,)


@_elementwise("maximum", save=(0, 1))
def _maximum(a, b):
    return np.maximum(a, b)


@_elementwise("minimum", save=(0, 1))
def _minimum(a, b):
    return np.minimum(a, b)


def _extremum_vjp(g, node, a_loses, b_loses):
    a, b = node.inputs
    na, nb = node.needs
    zero = _zero(g)
    shared = _where(eq(a, b), g / 2, g)  # ties split the gradient evenly, as in PyTorch
    return (sum_to(_where(a_loses(a, b), zero, shared), a._data.shape) if na else None,
            sum_to(_where(b_loses(a, b), zero, shared), b._data.shape) if nb else None)


_maximum.def_vjp(lambda g, node: _extremum_vjp(g, node, lt, gt))
_minimum.def_vjp(lambda g, node: _extremum_vjp(g, node, gt, lt))


@_elementwise("abs", save=(0,))
def _abs(x):
    return np.abs(x)


@_abs.def_vjp
def _abs_vjp(g, node):
    return (g * sign(node.inputs[0]),)


@_elementwise("sign")
def _sign(x):
    if x.dtype == np.bool_:
        return x.copy()
    out = np.sign(x)
    if x.dtype.kind == "f":
        nan = np.isnan(out)
        if nan.any():
            out[nan] = 0  # PyTorch's sign(nan) is 0
    return out


_sign.def_vjp(_zero_grads)


def _scaled(other, alpha):
    return other * alpha if isinstance(other, _NUMBER) else mul(other, alpha)


for _prim, _ufunc in ((_add, np.add), (_sub, np.subtract), (_mul, np.multiply),
                      (_div, np.true_divide)):
    _prim.inplace_impl = _ufunc_inplace(_ufunc)

def add(input, other, *, alpha=1) -> Tensor:
    """``input + alpha * other`` with broadcasting and type promotion.

    >>> import kiln
    >>> kiln.add(kiln.tensor([1, 2]), 0.5)
    tensor([1.5000, 2.5000])
    """
    if alpha != 1:
        other = _scaled(other, alpha)
    a, b = binary_operands(input, other, "add")
    return _add(a, b)


def sub(input, other, *, alpha=1) -> Tensor:
    """``input - alpha * other``."""
    if alpha != 1:
        other = _scaled(other, alpha)
    a, b = binary_operands(input, other, "sub")
    if a._data.dtype == np.bool_ or _is_bool(input) or _is_bool(other):
        _bool_sub_error(a)
    return _sub(a, b)


def _is_bool(x) -> bool:
    return type(x) is bool or (isinstance(x, Tensor) and x._data.dtype == np.bool_)


def _bool_sub_error(promoted: Tensor):
    if promoted._data.dtype == np.bool_:
        raise RuntimeError(
            "Subtraction, the `-` operator, with two bool tensors is not supported. Use the `^` "
            "or `logical_xor()` operator instead."
        )
    raise RuntimeError(
        "Subtraction, the `-` operator, with a bool tensor is not supported. If you are trying "
        "to invert a mask, use the `~` or `logical_not()` operator instead."
    )


def mul(input, other) -> Tensor:
    """``input * other``."""
    a, b = binary_operands(input, other, "mul")
    return _mul(a, b)


def div(input, other, *, rounding_mode=None) -> Tensor:
    """True division (integers give floats), or ``rounding_mode='floor'|'trunc'``.

    >>> import kiln
    >>> kiln.div(kiln.tensor([-7, 7]), 2, rounding_mode="trunc")
    tensor([-3,  3])
    """
    a, b = binary_operands(input, other, "div")
    if rounding_mode is None:
        if a._data.dtype.kind != "f":
            # integers divide as the default float, converted from their own values (not
            # through the common integer type, where -3 would wrap around in a uint8)
            dt = dtypes.get_default_dtype()
            a, b = as_operand(input, dt, "div"), as_operand(other, dt, "div")
        return _div(a, b)
    if rounding_mode == "floor":
        return _floor_divide(_not_bool(a, "div_floor"), b)
    if rounding_mode == "trunc":
        return _trunc_divide(_not_bool(a, "div_trunc"), b)
    raise RuntimeError(
        "div expected rounding_mode to be one of None, 'trunc', or 'floor' but found "
        f"'{rounding_mode}'"
    )


def floor_divide(input, other) -> Tensor:
    """``input // other``: division rounded toward negative infinity."""
    a, b = binary_operands(input, other, "floor_divide")
    return _floor_divide(_not_bool(a, "div_floor"), b)


def _not_bool(a: Tensor, kernel: str) -> Tensor:
    """``a``, unless it is a bool tensor, which PyTorch's ``kernel`` does not implement."""
    if a._data.dtype == np.bool_:
        raise NotImplementedError(f"\"{kernel}_cpu\" not implemented for 'Bool'")
    return a


def remainder(input, other) -> Tensor:
    """``input % other`` with Python's sign convention (the result has the divisor's sign).

    >>> import kiln
    >>> kiln.remainder(kiln.tensor([-3, 3]), 2)
    tensor([1, 1])
    """
    a, b = binary_operands(input, other, "remainder")
    return _remainder(_not_bool(a, "remainder"), b)


def fmod(input, other) -> Tensor:
    """C's remainder: the result has the dividend's sign."""
    a, b = binary_operands(_tensor(input, "fmod"), other, "fmod")
    return _fmod(_not_bool(a, "fmod"), b)


def pow(input, exponent) -> Tensor:
    """``input ** exponent``; either may be a number.

    >>> import kiln
    >>> kiln.tensor([1, 2, 3]) ** 2
    tensor([1, 4, 9])
    """
    if (isinstance(input, Tensor) and input._data.dtype.kind in "biu"
            and isinstance(exponent, numbers.Integral) and exponent < 0):
        raise RuntimeError("Integers to negative integer powers are not allowed.")
    a, b = binary_operands(input, exponent, "pow")
    if a._data.dtype == np.bool_:
        raise NotImplementedError("\"pow\" not implemented for 'Bool'")
    return _pow(a, b)


def neg(input: Tensor) -> Tensor:
    """``-input``."""
    if _tensor(input, "neg")._data.dtype == np.bool_:
        raise RuntimeError(
            "Negation, the `-` operator, on a bool tensor is not supported. If you are trying to "
            "invert a mask, use the `~` or `logical_not()` operator instead."
        )
    return _neg(input)


def positive(input: Tensor) -> Tensor:
    """``+input``: the input itself."""
    if _tensor(input, "positive")._data.dtype == np.bool_:
        raise RuntimeError("The `+` operator, on a bool tensor is not supported.")
    return input


def reciprocal(input: Tensor) -> Tensor:
    """``1 / input`` (integers give floats)."""
    x = _float_input(input, "reciprocal")
    return _div(_make(np.ones((), x._data.dtype)), x)


def square(input: Tensor) -> Tensor:
    """``input * input``."""
    return pow(_tensor(input, "square"), 2)


def maximum(input: Tensor, other: Tensor) -> Tensor:
    """Elementwise maximum (NaN propagates); ties share the gradient equally."""
    a, b = binary_operands(_tensor(input, "maximum"), _tensor(other, "maximum", "other", 2),
                           "maximum")
    return _maximum(a, b)


def minimum(input: Tensor, other: Tensor) -> Tensor:
    """Elementwise minimum (NaN propagates); ties share the gradient equally."""
    a, b = binary_operands(_tensor(input, "minimum"), _tensor(other, "minimum", "other", 2),
                           "minimum")
    return _minimum(a, b)


def abs(input: Tensor) -> Tensor:
    """``|input|``; the gradient at 0 is 0."""
    if _tensor(input, "abs")._data.dtype == np.bool_:
        raise NotImplementedError("\"abs_cpu\" not implemented for 'Bool'")
    return _abs(input)


def sign(input: Tensor) -> Tensor:
    """-1, 0 or 1 by the sign of each element (0 for NaN)."""
    return _sign(_tensor(input, "sign"))


def lerp(input: Tensor, end: Tensor, weight) -> Tensor:
    """``input + weight * (end - input)``."""
    if _tensor(input, "lerp")._data.dtype.kind != "f":
        raise NotImplementedError(f"\"lerp_kernel_scalar\" not implemented for '{_tname(input)}'")
    _tensor(end, "lerp", "end", 2)
    if end._data.dtype != input._data.dtype:
        raise RuntimeError(
            f"expected dtype {_tname(input).lower()} for `end` but got dtype "
            f"{_tname(end).lower()}"
        )
    if isinstance(weight, Tensor):
        if weight._data.dtype != input._data.dtype:
            raise RuntimeError(
                f"expected dtype {_tname(input).lower()} for `weight` but got dtype "
                f"{_tname(weight).lower()}"
            )
        shapes = (input._data.shape, end._data.shape, weight._data.shape)
    else:
        shapes = (input._data.shape, end._data.shape)
    broadcast_shape("lerp", *shapes)
    return input + weight * (end - input)


# -- comparisons, logic, bitwise -----------------------------------------------------------------

def _predicate(name, fn):
    prim = _elementwise(name, out=np.bool_)(fn)
    prim.mark_not_differentiable("its output is boolean")
    return prim


_eq = _predicate("eq", np.equal)
_ne = _predicate("ne", np.not_equal)
_lt = _predicate("lt", np.less)
_le = _predicate("le", np.less_equal)
_gt = _predicate("gt", np.greater)
_ge = _predicate("ge", np.greater_equal)
_logical_not = _predicate("logical_not", np.logical_not)
_logical_and = _predicate("logical_and", np.logical_and)
_logical_or = _predicate("logical_or", np.logical_or)
_logical_xor = _predicate("logical_xor", np.logical_xor)
_isnan = _predicate("isnan", np.isnan)
_isinf = _predicate("isinf", np.isinf)
_isfinite = _predicate("isfinite", np.isfinite)


def _bitwise(name, fn):
    prim = _elementwise(name)(fn)
    prim.mark_not_differentiable("it is defined on integer and bool tensors only")
    return prim


_bitwise_not = _bitwise("bitwise_not", np.invert)
_bitwise_and = _bitwise("bitwise_and", np.bitwise_and)
_bitwise_or = _bitwise("bitwise_or", np.bitwise_or)
_bitwise_xor = _bitwise("bitwise_xor", np.bitwise_xor)


def _compare(prim, op):
    def compare(input, other) -> Tensor:
        a, b = binary_operands(input, other, op)
        return prim(a, b)

    compare.__name__ = compare.__qualname__ = op
    compare.__doc__ = f"Elementwise ``{op}`` comparison after type promotion; a bool tensor."
    return compare


eq = _compare(_eq, "eq")
ne = _compare(_ne, "ne")
lt = _compare(_lt, "lt")
le = _compare(_le, "le")
gt = _compare(_gt, "gt")
ge = _compare(_ge, "ge")
not_equal, less, less_equal, greater, greater_equal = ne, lt, le, gt, ge


def _as_bool(x: Tensor) -> Tensor:
    return x if x._data.dtype == np.bool_ else cast(x, dtypes.bool_)


def logical_not(input: Tensor) -> Tensor:
    """True where ``input`` is zero (False)."""
    return _logical_not(_as_bool(_tensor(input, "logical_not")))


def _logical(prim, op):
    def logical(input: Tensor, other: Tensor) -> Tensor:
        a = _as_bool(_tensor(input, op))
        b = _as_bool(_tensor(other, op, "other", 2))
        return prim(a, b)

    logical.__name__ = logical.__qualname__ = op
    logical.__doc__ = f"Elementwise ``{op}`` of the truth values of two tensors (any dtype)."
    return logical


logical_and = _logical(_logical_and, "logical_and")
logical_or = _logical(_logical_or, "logical_or")
logical_xor = _logical(_logical_xor, "logical_xor")


def _integral(x: Tensor, op: str) -> None:
    if x._data.dtype.kind == "f":
        raise NotImplementedError(f'"{op}_cpu" not implemented for \'{_tname(x)}\'')


def bitwise_not(input: Tensor) -> Tensor:
    """``~input``: bitwise NOT of integers, logical NOT of bools."""
    _integral(_tensor(input, "bitwise_not"), "bitwise_not")
    return _bitwise_not(input)


def _bitwise_binary(prim, op):
    def bitwise(input, other) -> Tensor:
        a, b = binary_operands(input, other, op)
        _integral(a, op)
        return prim(a, b)

    bitwise.__name__ = bitwise.__qualname__ = op
    bitwise.__doc__ = f"Elementwise ``{op}`` of integer or bool tensors."
    return bitwise


bitwise_and = _bitwise_binary(_bitwise_and, "bitwise_and")
bitwise_or = _bitwise_binary(_bitwise_or, "bitwise_or")
bitwise_xor = _bitwise_binary(_bitwise_xor, "bitwise_xor")


def _invert(self: Tensor) -> Tensor:
    if self._data.dtype.kind == "f":
        raise TypeError("~ (operator.invert) is only implemented on integer and Boolean-type "
                        "tensors")
    return _bitwise_not(self)


def isnan(input: Tensor) -> Tensor:
    """True where ``input`` is NaN."""
    return _isnan(_tensor(input, "isnan"))


def isinf(input: Tensor) -> Tensor:
    """True where ``input`` is +-inf."""
    return _isinf(_tensor(input, "isinf"))


def isfinite(input: Tensor) -> Tensor:
    """True where ``input`` is neither NaN nor infinite."""
    return _isfinite(_tensor(input, "isfinite"))


def equal(input: Tensor, other: Tensor) -> bool:
    """True when both tensors have the same shape and the same values.

    >>> import kiln
    >>> kiln.equal(kiln.tensor([1, 2]), kiln.tensor([1.0, 2.0]))
    True
    """
    a = _tensor(input, "equal")._data
    b = _tensor(other, "equal", "other", 2)._data
    return a.shape == b.shape and bool(np.array_equal(a, b))


def isclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08,
            equal_nan: bool = False) -> Tensor:
    """``|input - other| <= atol + rtol * |other|`` elementwise (and exact equality, which
    covers infinities)."""
    _tensor(input, "isclose")
    _tensor(other, "isclose", "other", 2)
    if input._data.dtype != other._data.dtype:
        raise RuntimeError(f"isclose: {_tname(input)} did not match {_tname(other)}")
    if rtol < 0:
        raise RuntimeError(f"isclose: rtol must be greater than or equal to zero, but got {rtol}")
    if atol < 0:
        raise RuntimeError(f"isclose: atol must be greater than or equal to zero, but got {atol}")
    a, b = input.detach(), other.detach()
    close = _eq(a, b)
    if equal_nan and a._data.dtype.kind == "f":
        close = _logical_or(close, _logical_and(_isnan(a), _isnan(b)))
    if rtol == 0 and atol == 0:
        return close
    if a._data.dtype == np.bool_:
        a, b = float_operand(a), float_operand(b)
    allowed = add(abs(mul(b, rtol)), atol)  # the same steps as PyTorch, in its dtypes
    actual = abs(sub(a, b))
    return _logical_or(close, _logical_and(_isfinite(actual), le(actual, allowed)))


def allclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08,
             equal_nan: bool = False) -> bool:
    """True when ``isclose`` holds everywhere.

    >>> import kiln
    >>> kiln.allclose(kiln.tensor([1.0, 2.0]), kiln.tensor([1.0, 2.0 + 1e-9]))
    True
    """
    return bool(isclose(input, other, rtol, atol, equal_nan)._data.all())


# -- math functions ------------------------------------------------------------------------------

def _unary_infer(shapes, dts, **attrs):
    return shapes[0], np.dtype(dts[0])


def _unary(name, *, save=(), save_out=False):
    def wrap(impl):
        prim = primitive(name, traits={"elementwise"}, save=save, save_out=save_out)(impl)
        prim.def_infer(_unary_infer)
        return prim

    return wrap


@_unary("exp", save_out=True)
def _exp(x):
    return np.exp(x)


@_exp.def_vjp
def _exp_vjp(g, node):
    return (g * node.out,)


@_unary("expm1", save_out=True)
def _expm1(x):
    return np.expm1(x)


@_expm1.def_vjp
def _expm1_vjp(g, node):
    return (g * (node.out + 1),)


@_unary("log", save=(0,))
def _log(x):
    return np.log(x)


@_log.def_vjp
def _log_vjp(g, node):
    return (g / node.inputs[0],)


@_unary("log1p", save=(0,))
def _log1p(x):
    return np.log1p(x)


@_log1p.def_vjp
def _log1p_vjp(g, node):
    return (g / (node.inputs[0] + 1),)


@_unary("log2", save=(0,))
def _log2(x):
    return np.log2(x)


@_log2.def_vjp
def _log2_vjp(g, node):
    return (g / (node.inputs[0] * math.log(2.0)),)


@_unary("sqrt", save_out=True)
def _sqrt(x):
    return np.sqrt(x)


@_sqrt.def_vjp
def _sqrt_vjp(g, node):
    return (g / (node.out * 2),)


@_unary("sin", save=(0,))
def _sin(x):
    return np.sin(x)


@_sin.def_vjp
def _sin_vjp(g, node):
    return (g * cos(node.inputs[0]),)


@_unary("cos", save=(0,))
def _cos(x):
    return np.cos(x)


@_cos.def_vjp
def _cos_vjp(g, node):
    return (g * -sin(node.inputs[0]),)


@_unary("tanh", save_out=True)
def _tanh(x):
    return np.tanh(x)


@_tanh.def_vjp
def _tanh_vjp(g, node):
    return (_tanh_backward(g, node.out),)


# Backward primitives of the hot activations: one numpy pass instead of 3-12 dispatched ops in
# every backward step (PyTorch has the same kernels: tanh_backward, sigmoid_backward,
# threshold_backward, gelu_backward).  Their own VJPs are compositions, for double backward.

@primitive("tanh_backward", traits={"elementwise"}, save=(0, 1))
@_nd2
def _tanh_backward(g, y):
    out = y * y
    np.subtract(1, out, out=out)
    out *= g
    return out


@_tanh_backward.def_vjp
def _tanh_backward_vjp(gg, node):
    g, y = node.inputs
    n_g, n_y = node.needs
    return (_tanh_backward(gg, y) if n_g else None,
            gg * g * y * -2 if n_y else None)


@_unary("sigmoid", save_out=True)
@_nd
def _sigmoid(x):
    # 1 / (1 + exp(-x)), as PyTorch computes it: exp overflows to inf for x < -88 (float32) and
    # the result is the correct 0; every step writes into one buffer
    t = np.negative(x)
    np.exp(t, out=t)
    t += 1
    return np.reciprocal(t, out=t)


@_sigmoid.def_vjp
def _sigmoid_vjp(g, node):
    return (_sigmoid_backward(g, node.out),)


@primitive("sigmoid_backward", traits={"elementwise"}, save=(0, 1))
def _sigmoid_backward(g, y):
    out = np.subtract(1, y)
    out *= y
    out *= g
    return out


@_sigmoid_backward.def_vjp
def _sigmoid_backward_vjp(gg, node):
    g, y = node.inputs
    n_g, n_y = node.needs
    return (_sigmoid_backward(gg, y) if n_g else None,
            gg * g * (1 - y * 2) if n_y else None)


# erf: numpy has none, so polynomial approximations evaluated in place, in cache-sized chunks
# (memory traffic, not arithmetic, dominates numpy kernels on large arrays).
# float32/float16: erf(x) = tanh(x Q(x^2)), Q of degree 6 fitted (weighted minimax) to
# atanh(erf(x)) / x on [0, 4]: 16 numpy passes (Eigen's rational x P(x^2) / Q(x^2) took 24) and
# a relative error under 3e-7 against math.erf, tanh's included.  x^2 is capped at 16, where
# x Q(x^2) > 9 and tanh rounds to 1, so large and infinite x saturate instead of running off
# the fitted range.  Lowest power first.
_ERF32_Q = (1.1283792743059222, 0.10276905580006872, -1.918308294696329e-04,
            -6.197846273630275e-04, 8.763731274783992e-05, -5.668472825072985e-06,
            1.4185204451342274e-07)
_ERF32_HI = _ERF32_Q[::-1]
_ERF32_Z_MAX = 16.0
_F32_CHUNK = 32768  # measured best for these float32 kernels (8192 and 65536 were slower)
# float64: Cephes' ndtr.c (S. Moshier): erf(x) = x T(x^2) / U(x^2) for |x| <= 1, and
# 1 - exp(-x^2) P(|x|) / Q(|x|) above (U and Q are monic; erf(x) rounds to 1 beyond |x| = 6)
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)
_ERF_CHUNK = 16384
_ERF_SMALL = 32


def _horner(x, coefs, out, monic=False):
    """Evaluate the polynomial (highest power first; ``monic``: a leading 1 not listed) into
    ``out``, in place."""
    if monic:
        np.add(x, coefs[0], out=out)
        rest = coefs[1:]
    else:
        np.multiply(x, coefs[0], out=out)
        out += coefs[1]
        rest = coefs[2:]
    for c in rest:
        out *= x
        out += c
    return out


def _erf32(x: np.ndarray) -> np.ndarray:
    """erf of a float32 array (float16 goes through float32), ``tanh(x Q(min(x^2, 16)))``."""
    if x.dtype != np.float32:
        return _erf32(x.astype(np.float32)).astype(x.dtype)
    flat = x.reshape(-1)
    n = flat.size
    out = np.empty(n, np.float32)
    m = builtins.min(n, _F32_CHUNK)
    z, p = np.empty(m, np.float32), np.empty(m, np.float32)
    with np.errstate(all="ignore"):  # x^2 of huge x is inf, capped right after
        for s in range(0, n, _F32_CHUNK):
            k = builtins.min(_F32_CHUNK, n - s)
            xs, zk, pk = flat[s:s + k], z[:k], p[:k]
            np.multiply(xs, xs, out=zk)
            np.minimum(zk, _ERF32_Z_MAX, out=zk)  # keeps NaN
            _horner(zk, _ERF32_HI, pk)
            pk *= xs
            np.tanh(pk, out=out[s:s + k])
    return out.reshape(x.shape)


def _erf_np(x: np.ndarray) -> np.ndarray:
    """erf of a float array, in its dtype."""
    flat = x.reshape(-1)
    n = flat.size
    if n <= _ERF_SMALL:  # a couple of dozen numpy calls cost more than the C library's erf
        return np.array([math.erf(v) for v in flat.tolist()], x.dtype).reshape(x.shape)
    if x.dtype != np.float64:
        return _erf32(x)
    out = np.empty(n, x.dtype)
    m = builtins.min(n, _ERF_CHUNK)
    a, z, p, q = (np.empty(m, np.float64) for _ in range(4))
    for s in range(0, n, _ERF_CHUNK):
        k = builtins.min(_ERF_CHUNK, n - s)
        xs, o = flat[s:s + k], out[s:s + k]
        ak, zk, pk, qk = a[:k], z[:k], p[:k], q[:k]
        np.abs(xs, out=ak)
        small = ak <= 1.0  # NaN goes to the large branch, which keeps it NaN
        nsmall = np.count_nonzero(small)
        if nsmall:
            np.multiply(xs, xs, out=zk)
            _horner(zk, _ERF_T, pk)
            _horner(zk, _ERF_U, qk, monic=True)
            pk *= xs
            np.divide(pk, qk, out=o)
        if nsmall < k:
            np.minimum(ak, 6.0, out=ak)
            np.multiply(ak, ak, out=zk)
            np.negative(zk, out=zk)
            np.exp(zk, out=zk)
            _horner(ak, _ERFC_P, pk)
            _horner(ak, _ERFC_Q, qk, monic=True)
            pk *= zk
            pk /= qk
            np.subtract(1.0, pk, out=pk)
            np.copysign(pk, xs, out=pk)
            np.copyto(o, pk, where=~small)
    return out.reshape(x.shape)


@_unary("erf", save=(0,))
def _erf(x):
    return _erf_np(x)


_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


@_erf.def_vjp
def _erf_vjp(g, node):
    x = node.inputs[0]
    return (g * (exp(-(x * x)) * _TWO_OVER_SQRT_PI),)


def _rounding(name, fn):
    prim = _unary(name)(fn)
    prim.def_vjp(_zero_grads)
    return prim


_floor = _rounding("floor", np.floor)
_ceil = _rounding("ceil", np.ceil)
_trunc = _rounding("trunc", np.trunc)


@_unary("round")
def _round(x, decimals):
    # round half to even; with decimals, rint(x * 10**d) / 10**d (or its mirror for d < 0),
    # which is PyTorch's formula too
    return np.rint(x) if decimals == 0 else np.round(x, decimals)


_round.def_vjp(_zero_grads)


def _float_fn(prim, op, doc):
    def fn(input: Tensor) -> Tensor:
        return prim(_float_input(input, op))

    fn.__name__ = fn.__qualname__ = op
    fn.__doc__ = doc
    return fn


exp = _float_fn(_exp, "exp", "``e ** input`` (integers give floats).")
expm1 = _float_fn(_expm1, "expm1", "``exp(input) - 1``, accurate near 0.")
log = _float_fn(_log, "log", "Natural logarithm (-inf at 0, NaN below).")
log1p = _float_fn(_log1p, "log1p", "``log(1 + input)``, accurate near 0.")
log2 = _float_fn(_log2, "log2", "Base-2 logarithm.")
sqrt = _float_fn(_sqrt, "sqrt", "Square root (its gradient at 0 is inf).")
sin = _float_fn(_sin, "sin", "Sine.")
cos = _float_fn(_cos, "cos", "Cosine.")
tanh = _float_fn(_tanh, "tanh", "Hyperbolic tangent.")
sigmoid = _float_fn(_sigmoid, "sigmoid", "``1 / (1 + exp(-input))``.")
erf = _float_fn(_erf, "erf", "The error function ``2/sqrt(pi) * integral_0^x exp(-t^2) dt``.")


def rsqrt(input: Tensor) -> Tensor:
    """``1 / sqrt(input)``."""
    return reciprocal(sqrt(input))


def _rounding_fn(prim, op, doc):
    def fn(input: Tensor) -> Tensor:
        kind = _tensor(input, op)._data.dtype.kind
        if kind == "f":
            return prim(input)
        if kind == "b":
            raise NotImplementedError(f"\"{op}_vml_cpu\" not implemented for 'Bool'")
        return clone(input)  # integers are already whole

    fn.__name__ = fn.__qualname__ = op
    fn.__doc__ = doc
    return fn


floor = _rounding_fn(_floor, "floor", "The largest integer not above each element.")
ceil = _rounding_fn(_ceil, "ceil", "The smallest integer not below each element.")
trunc = _rounding_fn(_trunc, "trunc", "Each element rounded toward zero.")


def round(input: Tensor, *, decimals: int = 0) -> Tensor:
    """Round half to even, to ``decimals`` decimal places.

    >>> import kiln
    >>> kiln.round(kiln.tensor([0.5, 1.5, 2.5, 1.2345]))
    tensor([0., 2., 2., 1.])
    """
    kind = _tensor(input, "round")._data.dtype.kind
    if kind == "f":
        return _round(input, decimals=int(decimals))
    if kind == "b" or decimals:
        raise NotImplementedError(f"\"round_cpu\" not implemented for '{_tname(input)}'")
    return clone(input)


# -- activations ---------------------------------------------------------------------------------

@_unary("relu", save_out=True)
def _relu(x):
    out = _native("relu", x)
    return np.maximum(x, 0) if out is None else out  # keeps NaN, like PyTorch


@_relu.def_vjp
def _relu_vjp(g, node):
    return (_relu_backward(g, node.out),)


@primitive("relu_backward", traits={"elementwise"}, save=(1,))
def _relu_backward(g, y):
    # the gradient at exactly 0 is 0 (PyTorch's threshold_backward on the result)
    out = _native("relu_backward", g, y)
    if out is not None:
        return out
    bits = _SAME_SIZE_INT.get(g.dtype)
    if bits is None or g.shape != y.shape:
        return np.where(y > 0, g, np.zeros((), g.dtype))
    # g's bits AND an all-ones/all-zeros mask: +0.0 where y <= 0 (even for inf/nan in g),
    # bitwise what np.where gives, in SIMD passes (np.where on floats is ~5x slower)
    mask = np.negative((y > 0).view(np.int8), dtype=bits)
    out = np.empty_like(g)
    np.bitwise_and(g.view(bits), mask, out=out.view(bits))
    return out


_SAME_SIZE_INT = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64,
                  np.dtype(np.float16): np.int16}


@_relu_backward.def_vjp
def _relu_backward_vjp(gg, node):
    # linear in g; piecewise constant in y (zero gradient almost everywhere)
    return (_relu_backward(gg, node.inputs[1]) if node.needs[0] else None, None)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """``max(input, 0)``; the gradient at 0 is 0.

    >>> import kiln
    >>> kiln.relu(kiln.tensor([-1.0, 0.0, 2.0]))
    tensor([0., 0., 2.])
    """
    if _tensor(input, "relu")._data.dtype == np.bool_:
        raise RuntimeError("Boolean inputs not supported for relu")
    if inplace:
        return apply_inplace(_relu, input, (), {})
    return _relu(input)


def relu_(input: Tensor) -> Tensor:
    """In-place ``relu``."""
    return relu(input, inplace=True)


_SQRT1_2 = math.sqrt(0.5)
_GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
_GELU_TANH_KAPPA = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Exact GELU in float32 (float16 goes through float32): Phi(x) = sigmoid(x Q(x^2)), Q of degree
# 6 fitted (weighted minimax) to logit(Phi(x)) / x on [0, 5.5]; the error in Phi is under 1e-7
# (float32 rounding) and below 3e-7 relative to |x| on gelu itself, against float64.  Then
# gelu(x) = x / (1 + exp(-x Q(x^2))): 18 numpy passes instead of 28 through erf.  x^2 is capped
# at 5.5^2, past which Phi rounds to 0 or 1 and x Q stays monotonic; exp overflowing to inf
# gives -0 for very negative x.  Coefficients negated (exp takes -x Q), highest power first.
_GELU32_NEG_Q = tuple(-c for c in (
    1.5957698829196147, 0.0726661691536551, -6.518995835344344e-05, -1.1061238403947785e-04,
    7.929488146750926e-06, -2.6452661852343784e-07, 3.5123396230351724e-09)[::-1])
_GELU32_Z_MAX = 5.5 ** 2


def _gelu_neg_logit(xs, zk, out):
    """``out = -x Q(x^2)`` (so that Phi(x) = 1 / (1 + exp(out))), with ``zk`` holding x^2."""
    np.minimum(zk, _GELU32_Z_MAX, out=zk)  # keeps NaN
    _horner(zk, _GELU32_NEG_Q, out)
    out *= xs
    return out


def _gelu32(x: np.ndarray) -> np.ndarray:
    """Exact GELU of a float32 (or float16) array, in chunks; see _GELU32_NEG_Q."""
    if x.dtype != np.float32:
        return _gelu32(x.astype(np.float32)).astype(x.dtype)
    if jit.available():
        from kiln.jit import hot_ops

        return hot_ops.gelu(x)
    flat = x.reshape(-1)
    n = flat.size
    out = np.empty(n, np.float32)
    z = np.empty(builtins.min(n, _F32_CHUNK), np.float32)
    with np.errstate(all="ignore"):  # exp overflow is the intended -0 tail; -inf / inf is NaN
        for s in range(0, n, _F32_CHUNK):
            k = builtins.min(_F32_CHUNK, n - s)
            xs, zk, o = flat[s:s + k], z[:k], out[s:s + k]
            np.multiply(xs, xs, out=zk)
            _gelu_neg_logit(xs, zk, o)
            np.exp(o, out=o)
            o += 1
            np.divide(xs, o, out=o)
    return out.reshape(x.shape)


def _gelu_backward32(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``g * (Phi(x) + x phi(x))`` for float32 (or float16) arrays of equal shape, in chunks."""
    if x.dtype != np.float32:
        return _gelu_backward32(g.astype(np.float32), x.astype(np.float32)).astype(x.dtype)
    if jit.available():
        from kiln.jit import hot_ops

        out = hot_ops.gelu_backward(g, x)
        if out is not None:
            return out
    flat, gf = x.reshape(-1), g.reshape(-1)
    n = flat.size
    out = np.empty(n, np.float32)
    m = builtins.min(n, _F32_CHUNK)
    z, e = np.empty(m, np.float32), np.empty(m, np.float32)
    with np.errstate(all="ignore"):
        for s in range(0, n, _F32_CHUNK):
            k = builtins.min(_F32_CHUNK, n - s)
            xs, zk, ek, o = flat[s:s + k], z[:k], e[:k], out[s:s + k]
            np.multiply(xs, xs, out=zk)
            np.multiply(zk, -0.5, out=ek)
            np.exp(ek, out=ek)
            ek *= xs
            ek *= _INV_SQRT_2PI  # x phi(x)
            _gelu_neg_logit(xs, zk, o)
            np.exp(o, out=o)
            o += 1
            np.divide(1.0, o, out=o)  # Phi(x)
            o += ek
            o *= gf[s:s + k]
    return out.reshape(x.shape)


@_unary("gelu", save=(0,))
@_nd
def _gelu(x, approximate):
    if approximate != "tanh" and x.dtype != np.float64:
        return _gelu32(x)
    if approximate == "tanh" and x.dtype == np.float32 and jit.available():
        from kiln.jit import hot_ops

        return hot_ops.gelu(x, "tanh")
    if approximate == "tanh":
        inner = x * x
        inner *= x
        inner *= _GELU_TANH_KAPPA
        inner += x
        inner *= _GELU_TANH_BETA
        np.tanh(inner, out=inner)
    else:
        inner = _erf_np(x * _SQRT1_2)
    inner += 1
    inner *= x
    inner *= 0.5
    return inner


@_gelu.def_vjp
def _gelu_vjp(g, node):
    return (_gelu_backward(g, node.inputs[0], approximate=node.attrs["approximate"]),)


@primitive("gelu_backward", traits={"elementwise"}, save=(0, 1))
@_nd2
def _gelu_backward(g, x, approximate):
    """``g * gelu'(x)`` in one pass over float64-free temporaries."""
    if approximate != "tanh" and x.dtype != np.float64:
        return _gelu_backward32(g, x)
    if approximate == "tanh" and x.dtype == np.float32 and jit.available():
        from kiln.jit import hot_ops

        out = hot_ops.gelu_backward(g, x, "tanh")
        if out is not None:
            return out
    if approximate == "tanh":
        x_sq = x * x
        t = x_sq * _GELU_TANH_KAPPA
        t += 1
        t *= x
        t *= _GELU_TANH_BETA
        np.tanh(t, out=t)  # t = tanh(u)
        d_inner = x_sq
        d_inner *= 3 * _GELU_TANH_KAPPA
        d_inner += 1
        d_inner *= _GELU_TANH_BETA  # u'
        left = 1 - t * t
        left *= d_inner
        left *= x
        left *= 0.5
        t += 1
        t *= 0.5
        t += left
        t *= g
        return t
    pdf = x * x
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    pdf *= x
    cdf = _erf_np(x * _SQRT1_2)
    cdf += 1
    cdf *= 0.5
    cdf += pdf
    cdf *= g
    return cdf


@_gelu_backward.def_vjp
def _gelu_backward_vjp(gg, node):
    g, x = node.inputs
    n_g, n_x = node.needs
    approximate = node.attrs["approximate"]
    dg = _gelu_backward(gg, x, approximate=approximate) if n_g else None
    if not n_x:
        return dg, None
    if approximate == "tanh":
        x_sq = x * x
        t = tanh((x + x_sq * x * _GELU_TANH_KAPPA) * _GELU_TANH_BETA)
        sech2 = 1 - t * t
        du = (x_sq * (3 * _GELU_TANH_KAPPA) + 1) * _GELU_TANH_BETA
        d2u = x * (6 * _GELU_TANH_BETA * _GELU_TANH_KAPPA)
        second = sech2 * du + x * 0.5 * sech2 * (d2u - t * du * du * 2)
    else:
        second = exp(x * x * -0.5) * _INV_SQRT_2PI * (2 - x * x)
    return dg, gg * g * second


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """``x * Phi(x)`` (Phi the normal CDF), or its tanh approximation.

    >>> import kiln
    >>> kiln.gelu(kiln.tensor([0.0, 1.0]))
    tensor([0.0000, 0.8413])
    """
    if approximate not in ("none", "tanh"):
        raise RuntimeError("approximate argument must be either none or tanh.")
    return _gelu(_float_only(input, "GeluKernelImpl"), approximate=approximate)


@_unary("softplus", save=(0,))
@_nd
def _softplus(x, beta, threshold):
    bx = x * beta if beta != 1 else x
    if bx.size <= 1024:
        out = np.logaddexp(0, bx)  # log(1 + exp(bx)) without overflow, in one call
    else:
        # the same as max(bx, 0) + log1p(exp(-|bx|)), ten times faster than np.logaddexp
        out = np.abs(bx)
        np.negative(out, out=out)
        np.exp(out, out=out)
        np.log1p(out, out=out)
        out += np.maximum(bx, 0)
    if beta != 1:
        out /= beta
    if threshold != math.inf:
        linear = bx > threshold
        if linear.any():
            np.copyto(out, x, where=linear)
    return out


@_softplus.def_vjp
def _softplus_vjp(g, node):
    x = node.inputs[0]
    beta, threshold = node.attrs["beta"], node.attrs["threshold"]
    bx = x * beta if beta != 1 else x
    gs = g * sigmoid(bx)  # exp(bx) / (1 + exp(bx)), stable for large bx
    if threshold == math.inf:
        return (gs,)
    return (_where(bx > threshold, g, gs),)


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``log(1 + exp(beta * x)) / beta``, and ``x`` itself where ``beta * x > threshold``."""
    return _softplus(_float_only(input, "softplus"), beta=beta, threshold=threshold)


def logsigmoid(input: Tensor) -> Tensor:
    """``log(sigmoid(x))``, computed as ``-softplus(-x)`` so that it never overflows."""
    x = _float_only(input, "log_sigmoid_forward")
    return _neg(_softplus(_neg(x), beta=1.0, threshold=math.inf))


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """``x * sigmoid(x)``."""
    x = _float_only(input, "silu")
    if inplace:
        return _assign_from(x, lambda s: s * sigmoid(s), "silu_")
    return x * sigmoid(x)


@_unary("leaky_relu", save=(0,))
def _leaky_relu(x, negative_slope):
    # max(x, s x) for s <= 1 (min for s > 1) is exactly x or s x, and much faster than where
    scaled = x * negative_slope
    return np.maximum(x, scaled) if negative_slope <= 1 else np.minimum(x, scaled)


@_leaky_relu.def_vjp
def _leaky_relu_vjp(g, node):
    return (_where(node.inputs[0] > 0, g, g * node.attrs["negative_slope"]),)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """``x`` where ``x > 0``, else ``negative_slope * x`` (the slope applies at 0 too)."""
    x = _float_only(input, "leaky_relu")
    if inplace:
        return apply_inplace(_leaky_relu, x, (), {"negative_slope": negative_slope})
    return _leaky_relu(x, negative_slope=negative_slope)


@_unary("elu", save=(0,))
@_nd
def _elu(x, alpha):
    # max(x, 0) + alpha * expm1(min(x, 0)): exactly x or alpha * expm1(x), without np.where
    # (slow on mixed signs) and without exp of the positive part, which could overflow
    neg = np.minimum(x, 0)
    np.expm1(neg, out=neg)
    neg *= alpha
    neg += np.maximum(x, 0)
    return neg


@_elu.def_vjp
def _elu_vjp(g, node):
    x = node.inputs[0]
    # alpha * exp(x) on the negative side; the clamp keeps exp finite where the branch is not
    # taken, whose gradient (0 * inf) would otherwise be NaN in double backward
    return (_where(x > 0, g, g * exp(clamp_max(x, 0)) * node.attrs["alpha"]),)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``."""
    x = _float_only(input, "elu")
    if inplace:
        return apply_inplace(_elu, x, (), {"alpha": alpha})
    return _elu(x, alpha=alpha)


@_unary("hardtanh", save=(0,))
def _hardtanh(x, min_val, max_val):
    t = x.dtype.type
    return _clip(x, t(min_val), t(max_val))


def _clip(x, lo, hi):
    """min(max(x, lo), hi), NaN propagating: np.clip is one pass over large arrays, but its
    call costs several microseconds, more than the two ufuncs on small ones."""
    if x.size > 16384:
        return np.clip(x, lo, hi)
    return np.minimum(np.maximum(x, lo), hi)


@_hardtanh.def_vjp
def _hardtanh_vjp(g, node):
    x = node.inputs[0]
    lo, hi = node.attrs["min_val"], node.attrs["max_val"]
    # unlike clamp, no gradient at the boundaries themselves (PyTorch's hardtanh_backward)
    return (_where((x <= lo) | (x >= hi), _zero(g), g),)


def hardtanh(input: Tensor, min_val: float = -1.0, max_val: float = 1.0,
             inplace: bool = False) -> Tensor:
    """``input`` clamped to ``[min_val, max_val]``; zero gradient at and beyond the bounds."""
    if _tensor(input, "hardtanh")._data.dtype == np.bool_:
        raise RuntimeError("Bool inputs not supported for hardtanh")
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    if inplace:
        return apply_inplace(_hardtanh, input, (), {"min_val": min_val, "max_val": max_val})
    return _hardtanh(input, min_val=min_val, max_val=max_val)


def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    """``min(max(x, 0), 6)`` (hardtanh on [0, 6])."""
    return hardtanh(input, 0.0, 6.0, inplace)


# -- clamp, where, masked_fill -------------------------------------------------------------------

@primitive("clamp", traits={"elementwise"}, save=(0, 1, 2))
def _clamp(x, lo, hi, has_min, has_max):
    # a missing bound is passed as a 0-d placeholder (so inputs and saved positions stay fixed);
    # min(max(x, lo), hi) as PyTorch: hi wins where lo > hi, and NaN propagates
    if has_min:
        return _clip(x, lo, hi) if has_max else np.maximum(x, lo)
    return np.minimum(x, hi)


@_clamp.def_infer
def _clamp_infer(shapes, dts, has_min, has_max):
    used = [shapes[0]] + ([shapes[1]] if has_min else []) + ([shapes[2]] if has_max else [])
    return broadcast_shape("clamp", *used), np.dtype(dts[0])


@_clamp.def_vjp
def _clamp_vjp(g, node):
    # PyTorch's clamp_backward and clamp_backward_min_max, mask for mask
    x, lo, hi = node.inputs
    nx, nlo, nhi = node.needs
    has_min, has_max = node.attrs["has_min"], node.attrs["has_max"]
    zero = _zero(g)
    gx = glo = ghi = None
    if nx:
        if has_min and has_max:
            mask = (x >= lo) & (x <= hi)
        else:
            mask = x >= lo if has_min else x <= hi
        gx = sum_to(_where(mask, g, zero), x._data.shape)
    if nlo and has_min:
        mask = (x < lo) & (lo < hi) if has_max else x < lo
        glo = sum_to(_where(mask, g, zero), lo._data.shape)
    if nhi and has_max:
        mask = (x > hi) | (hi < lo) if has_min else x > hi
        ghi = sum_to(_where(mask, g, zero), hi._data.shape)
    return gx, glo, ghi


def _clamp_operands(input, min, max, op):
    """The result dtype and both bounds as tensors of it (a placeholder for a missing one)."""
    _tensor(input, op)
    if min is None and max is None:
        raise RuntimeError(f"kiln.{op}: At least one of 'min' or 'max' must not be None")
    npdt = input._data.dtype
    lo = _placeholder(npdt) if min is None else _scalar_operand(input, min)
    hi = _placeholder(npdt) if max is None else _scalar_operand(input, max)
    if lo is not None and hi is not None:  # number bounds that keep the input's dtype
        return input.dtype, lo, hi
    bounds = [b for b in (min, max) if b is not None]
    for b in bounds:
        if not isinstance(b, (Tensor, *_NUMBER)):
            raise TypeError(f"{op}(): min and max must be Tensors or numbers, got "
                            f"{type(b).__name__}")
    dt = dtypes.result_type(input, *bounds)
    lo, hi = (_placeholder(dt.np) if b is None else as_operand(b, dt, op) for b in (min, max))
    return dt, lo, hi


_PLACEHOLDERS: dict = {}


def _placeholder(npdt) -> Tensor:
    """The stand-in for a missing clamp bound (one shared constant per dtype)."""
    t = _PLACEHOLDERS.get(npdt)
    if t is None:
        t = _PLACEHOLDERS[npdt] = _make(np.zeros((), npdt))
    return t


def clamp(input: Tensor, min=None, max=None) -> Tensor:
    """``input`` limited to ``[min, max]`` (numbers or tensors; either may be None).

    The gradient flows to ``input`` where ``min <= input <= max`` (boundaries included) and to
    the bound that was taken elsewhere.

    >>> import kiln
    >>> kiln.tensor([-2.0, 0.5, 3.0]).clamp(min=0, max=1)
    tensor([0.0000, 0.5000, 1.0000])
    """
    dt, lo, hi = _clamp_operands(input, min, max, "clamp")
    x = input if input._data.dtype == dt.np else cast(input, dt)
    return _clamp(x, lo, hi, has_min=min is not None, has_max=max is not None)


clip = clamp


def clamp_min(input: Tensor, min) -> Tensor:
    """``clamp(input, min=min)``."""
    return clamp(input, min, None)


def clamp_max(input: Tensor, max) -> Tensor:
    """``clamp(input, max=max)``."""
    return clamp(input, None, max)


@primitive("where", traits={"elementwise"}, save=(0,))
def _where(cond, x, y):
    out = _native("where", cond, x, y)
    return np.where(cond, x, y) if out is None else out


@_where.def_infer
def _where_infer(shapes, dts):
    return broadcast_shape("where", *shapes), np.dtype(dts[1])


@_where.def_vjp
def _where_vjp(g, node):
    c, x, y = node.inputs
    _, nx, ny = node.needs
    zero = _zero(g)
    return (None,
            sum_to(_where(c, g, zero), x._data.shape) if nx else None,
            sum_to(_where(c, zero, g), y._data.shape) if ny else None)


def _check_mask(mask, op: str, what: str = "masks") -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}(): argument 'mask' must be Tensor, not {type(mask).__name__}")
    if mask._data.dtype != np.bool_:
        raise RuntimeError(f"{op} only supports boolean {what}, but got mask with dtype "
                           f"{mask.dtype.name}")


def where(condition: Tensor, input=None, other=None):
    """``input`` where ``condition`` holds, else ``other`` (numbers allowed, promoted).

    With only ``condition``, the indices of its True elements (``nonzero(as_tuple=True)``).

    >>> import kiln
    >>> x = kiln.tensor([-1.0, 2.0])
    >>> kiln.where(x > 0, x, 0.0)
    tensor([0., 2.])
    """
    if not isinstance(condition, Tensor):
        raise TypeError(f"where(): argument 'condition' (position 1) must be Tensor, not "
                        f"{type(condition).__name__}")
    if input is None and other is None:
        return tuple(_make(i.astype(np.int64)) for i in np.nonzero(condition._data))
    if condition._data.dtype != np.bool_:
        raise RuntimeError("where expected condition to be a boolean tensor, but got a tensor "
                           f"with dtype {_tname(condition)}")
    if isinstance(input, Tensor):
        if isinstance(other, Tensor):
            if input._data.dtype == other._data.dtype:
                return _where(condition, input, other)
        else:
            c = _scalar_operand(input, other)
            if c is not None:
                return _where(condition, input, c)
    elif isinstance(other, Tensor):
        c = _scalar_operand(other, input)
        if c is not None:
            return _where(condition, c, other)
    for v in (input, other):
        if not isinstance(v, (Tensor, *_NUMBER)):
            raise TypeError(f"where(): expected a Tensor or a number, got {type(v).__name__}")
    dt = dtypes.result_type(input, other)
    return _where(condition, as_operand(input, dt, "where"), as_operand(other, dt, "where"))


def _fill_value(value, self: Tensor, op: str) -> Tensor:
    """``value`` (a number or a 0-d tensor) as a 0-d tensor of ``self``'s dtype."""
    if isinstance(value, Tensor):
        if value._data.ndim:
            raise RuntimeError(f"{op} only supports a 0-dimensional value tensor, but got tensor "
                               f"with {value._data.ndim} dimension(s).")
        return value if value._data.dtype == self._data.dtype else cast(value, self.dtype)
    if isinstance(value, _NUMBER):
        return _make(np.array(value).astype(self._data.dtype))
    raise TypeError(f"{op}(): argument 'value' must be a number or a Tensor, got "
                    f"{type(value).__name__}")


def masked_fill(input: Tensor, mask: Tensor, value) -> Tensor:
    """``input`` with ``value`` where ``mask`` is True; the result keeps ``input``'s dtype.

    >>> import kiln
    >>> kiln.zeros(3).masked_fill(kiln.tensor([True, False, True]), 5.0)
    tensor([5., 0., 5.])
    """
    _tensor(input, "masked_fill")
    _check_mask(mask, "masked_fill")
    if mask._data.shape != input._data.shape:
        broadcast_shape("masked_fill", input._data.shape, mask._data.shape)
    return _where(mask, _fill_value(value, input, "masked_fill"), input)


# -- in-place variants ---------------------------------------------------------------------------

def _cast_error(op: str, result, target: Tensor) -> RuntimeError:
    return RuntimeError(f"{op}: result type {_tname(result)} can't be cast to the desired output "
                        f"type {_tname(target)}")


def _assign(self: Tensor, result: Tensor, op: str) -> Tensor:
    """Write ``result`` (computed out of place) into ``self``: autograd records a copy whose
    gradient flows to ``result``, not to ``self``'s old value."""
    if result.dtype._category > self.dtype._category:
        raise _cast_error(op, result, self)
    if result._data.dtype != self._data.dtype:
        result = cast(result, self.dtype)
    return apply_inplace(_copy, self, (result,), {})


def _assign_from(self: Tensor, fn, op: str) -> Tensor:
    """``self`` overwritten by ``fn(self)``, for in-place versions of composite ops.  When
    autograd records, ``fn`` reads a clone so that values it saves are not overwritten."""
    if STATE.grad_enabled and self._rg:
        check_inplace_allowed(self)
        return _assign(self, fn(clone(self)), op)
    return _assign(self, fn(self), op)


def _inplace(prim, self: Tensor, other, op: str, bool_kernel: str | None = None) -> Tensor:
    """``self.op_(other)`` for a binary primitive, with PyTorch's casting rule (and, after it,
    the error of PyTorch's ``bool_kernel`` when self is a bool tensor)."""
    if isinstance(other, Tensor):
        operand = other if other._data.dtype == self._data.dtype else None
    else:
        operand = _scalar_operand(self, other)
    if operand is None:
        dt = dtypes.result_type(self, other)
        if dt._category > self.dtype._category:
            raise _cast_error(op, dt, self)
        operand = as_operand(other, self.dtype, op)
    if bool_kernel is not None:
        _not_bool(self, bool_kernel)
    return apply_inplace(prim, self, (operand,), {})


def _unary_inplace(prim, self: Tensor, op: str, floating: bool = True, **attrs) -> Tensor:
    if floating and _tensor(self, op)._data.dtype.kind != "f":
        raise _cast_error(op, dtypes.get_default_dtype(), self)
    return apply_inplace(prim, self, (), attrs)


def add_(self, other, *, alpha=1):
    if alpha != 1:
        other = _scaled(other, alpha)
    return _inplace(_add, self, other, "add_")


def sub_(self, other, *, alpha=1):
    if alpha != 1:
        other = _scaled(other, alpha)
    if _is_bool(self) or _is_bool(other):
        sub(self, other)  # PyTorch's error for bools
    return _inplace(_sub, self, other, "sub_")


def mul_(self, other):
    return _inplace(_mul, self, other, "mul_")


def div_(self, other, *, rounding_mode=None):
    if rounding_mode is None:
        if self._data.dtype.kind != "f":
            raise _cast_error("div_", dtypes.get_default_dtype(), self)
        return _inplace(_div, self, other, "div_")
    if rounding_mode not in ("floor", "trunc"):
        div(self, other, rounding_mode=rounding_mode)  # PyTorch's error
    return _inplace(_floor_divide if rounding_mode == "floor" else _trunc_divide, self, other,
                    "div_")


def pow_(self, exponent):
    if (self._data.dtype.kind in "biu" and isinstance(exponent, numbers.Integral)
            and exponent < 0):
        raise RuntimeError("Integers to negative integer powers are not allowed.")
    return _inplace(_pow, self, exponent, "pow_", "pow")


def floor_divide_(self, other):
    return _inplace(_floor_divide, self, other, "floor_divide_", "div_floor")


def remainder_(self, other):
    return _inplace(_remainder, self, other, "remainder_", "remainder")


def fmod_(self, other):
    return _inplace(_fmod, self, other, "fmod_", "fmod")


def neg_(self):
    if _tensor(self, "neg_")._data.dtype == np.bool_:
        neg(self)  # PyTorch's error for bools
    return apply_inplace(_neg, self, (), {})


def abs_(self):
    if _tensor(self, "abs_")._data.dtype == np.bool_:
        raise NotImplementedError("\"abs_cpu\" not implemented for 'Bool'")
    return apply_inplace(_abs, self, (), {})


def sign_(self):
    return apply_inplace(_sign, self, (), {})


def _rounding_inplace(prim, op):
    def fn(self):
        kind = _tensor(self, op)._data.dtype.kind
        if kind == "b":
            raise NotImplementedError(f"\"{op[:-1]}_vml_cpu\" not implemented for 'Bool'")
        return apply_inplace(prim, self, (), {}) if kind == "f" else self

    return fn


def round_(self, *, decimals=0):
    if self._data.dtype.kind != "f":
        round(self, decimals=decimals)  # PyTorch's error for bools and decimals on integers
        return self
    return apply_inplace(_round, self, (), {"decimals": int(decimals)})


def clamp_(self, min=None, max=None):
    dt, lo, hi = _clamp_operands(self, min, max, "clamp_")
    if dt.np != self._data.dtype:
        if dt._category > self.dtype._category:
            raise _cast_error("clamp_", dt, self)
        lo, hi = cast(lo, self.dtype), cast(hi, self.dtype)
    return apply_inplace(_clamp, self, (lo, hi),
                          {"has_min": min is not None, "has_max": max is not None})


def masked_fill_(self, mask, value):
    _tensor(self, "masked_fill_")
    _check_mask(mask, "masked_fill_")
    v = _fill_value(value, self, "masked_fill_")
    # where saves only the mask, so no clone of self is needed
    return _assign(self, _where(mask, v, self), "masked_fill_")


def lerp_(self, end, weight):
    dt = self._data.dtype
    plain = (dt.kind == "f" and isinstance(end, Tensor) and end._data.dtype == dt
             and (isinstance(weight, _NUMBER) or getattr(weight, "dtype", None) == self.dtype)
             and not (STATE.grad_enabled and (self._rg or end._rg or getattr(weight, "_rg", 0))))
    if plain:  # the optimizers' case: two temporaries, then one add into self
        return add_(self, mul(sub(end, self), weight))
    return _assign_from(self, lambda s: lerp(s, end, weight), "lerp_")


def addcmul(input: Tensor, tensor1: Tensor, tensor2: Tensor, *, value=1) -> Tensor:
    """``input + value * tensor1 * tensor2`` (PyTorch's evaluation order)."""
    return add(input, mul(mul(tensor1, value), tensor2) if value != 1 else mul(tensor1, tensor2))


def addcdiv(input: Tensor, tensor1: Tensor, tensor2: Tensor, *, value=1) -> Tensor:
    """``input + value * tensor1 / tensor2`` (PyTorch's evaluation order)."""
    return add(input, div(mul(tensor1, value), tensor2) if value != 1 else div(tensor1, tensor2))


def addcmul_(self, tensor1: Tensor, tensor2: Tensor, *, value=1) -> Tensor:
    """In-place ``addcmul``; outside autograd the sum is written straight into ``self``."""
    return add_(self, mul(mul(tensor1, value), tensor2) if value != 1 else mul(tensor1, tensor2))


def addcdiv_(self, tensor1: Tensor, tensor2: Tensor, *, value=1) -> Tensor:
    """In-place ``addcdiv``."""
    return add_(self, div(mul(tensor1, value), tensor2) if value != 1 else div(tensor1, tensor2))


def copy_(self, src, non_blocking=False):
    """Overwrite ``self`` with ``src`` broadcast to its shape and cast to its dtype; the
    gradient flows to ``src``."""
    _tensor(src, "copy_", "src")
    if (not (STATE.grad_enabled and (self._rg or src._rg)) and self._data.flags.writeable
            and STATE.tracer is None):
        try:
            np.copyto(self._data, src._data, casting="unsafe")
        except ValueError:
            pass  # shapes that do not broadcast: the general path raises PyTorch's error
        else:
            self._version[0] += 1
            return self
    if src._data.dtype != self._data.dtype:
        src = cast(src, self.dtype)
    return apply_inplace(_copy, self, (src,), {})


def fill_(self, value):
    """Overwrite every element with ``value`` (a number or a 0-d tensor)."""
    if isinstance(value, Tensor) and value._data.ndim:
        raise RuntimeError("fill_ only supports 0-dimension value tensor but got tensor with "
                           f"{value._data.ndim} dimensions.")
    return _fill(self, _fill_value(value, self, "fill_"))


def zero_(self):
    """Overwrite every element with 0."""
    return _fill(self, _placeholder(self._data.dtype))


def _fill(self: Tensor, value: Tensor) -> Tensor:
    """Overwrite ``self`` with the 0-d ``value`` of its dtype; without autograd, directly."""
    if ((STATE.grad_enabled and (self._rg or value._rg)) or not self._data.flags.writeable
            or STATE.tracer is not None):
        return apply_inplace(_copy, self, (value,), {})
    self._data[...] = value._data
    self._version[0] += 1
    return self


def _augmented(inplace, outplace):
    """``x op= y``.  ``x[idx] op= v`` reads a view, updates it and assigns it back; when the
    view is part of the autograd graph, update out of place and let the assignment record the
    write."""

    def method(self, other):
        base = self._base
        if base is not None and (base._rg or self._rg) and STATE.grad_enabled:
            # a clone: the write-back bumps the view's version, which the op may have saved
            return outplace(clone(self), other)
        return inplace(self, other)

    return method


def _reflected(fn):
    def method(self, other):
        return fn(other, self)

    return method


def _comparison(fn):
    """``==`` and ``!=`` with anything that is not a tensor or a number fall back to Python's
    identity comparison (``t == None`` is False), as in PyTorch."""

    def method(self, other):
        if not isinstance(other, (Tensor, *_NUMBER)):
            return NotImplemented
        return fn(self, other)

    return method


subtract, multiply, divide, true_divide, negative = sub, mul, div, div, neg
absolute, sgn = abs, sign


def _bitwise_inplace(prim, op):
    def inplace(self, other):
        _integral(self, op)
        return _inplace(prim, self, other, op + "_")

    return inplace


def _float_inplace(prim, op):
    return lambda self: _unary_inplace(prim, self, op)


TENSOR_METHODS = {
    # conversions
    "clone": clone, "to": to,
    "float": lambda self: cast(self, dtypes.float32),
    "double": lambda self: cast(self, dtypes.float64),
    "half": lambda self: cast(self, dtypes.float16),
    "long": lambda self: cast(self, dtypes.int64),
    "int": lambda self: cast(self, dtypes.int32),
    "bool": lambda self: cast(self, dtypes.bool_),
    "type": lambda self, dtype=None: self.dtype if dtype is None else cast(self, dtype),
    # arithmetic
    "add": add, "sub": sub, "subtract": sub, "mul": mul, "multiply": mul, "div": div,
    "divide": div, "true_divide": div, "floor_divide": floor_divide, "remainder": remainder,
    "fmod": fmod, "pow": pow, "neg": neg, "negative": neg, "positive": positive,
    "reciprocal": reciprocal, "square": square, "maximum": maximum, "minimum": minimum,
    "abs": abs, "absolute": abs, "sign": sign, "sgn": sign, "lerp": lerp,
    # comparisons and logic
    "eq": eq, "ne": ne, "not_equal": ne, "lt": lt, "less": lt, "le": le, "less_equal": le,
    "gt": gt, "greater": gt, "ge": ge, "greater_equal": ge,
    "logical_not": logical_not, "logical_and": logical_and, "logical_or": logical_or,
    "logical_xor": logical_xor, "bitwise_not": bitwise_not, "bitwise_and": bitwise_and,
    "bitwise_or": bitwise_or, "bitwise_xor": bitwise_xor, "isnan": isnan, "isinf": isinf,
    "isfinite": isfinite, "equal": equal, "allclose": allclose, "isclose": isclose,
    # math
    "exp": exp, "expm1": expm1, "log": log, "log1p": log1p, "log2": log2, "sqrt": sqrt,
    "rsqrt": rsqrt, "sin": sin, "cos": cos, "tanh": tanh, "sigmoid": sigmoid, "floor": floor,
    "ceil": ceil, "round": round, "trunc": trunc, "erf": erf, "relu": relu,
    # selection
    "clamp": clamp, "clip": clamp, "clamp_min": clamp_min, "clamp_max": clamp_max,
    "where": lambda self, condition, other: where(condition, self, other),
    "masked_fill": masked_fill,
    # in place
    "add_": add_, "sub_": sub_, "subtract_": sub_, "mul_": mul_, "multiply_": mul_, "div_": div_,
    "divide_": div_, "pow_": pow_, "floor_divide_": floor_divide_, "remainder_": remainder_,
    "fmod_": fmod_, "neg_": neg_, "negative_": neg_, "abs_": abs_, "absolute_": abs_,
    "sign_": sign_, "relu_": relu_, "clamp_": clamp_, "clip_": clamp_,
    "clamp_min_": lambda self, min: clamp_(self, min, None),
    "clamp_max_": lambda self, max: clamp_(self, None, max),
    "exp_": _float_inplace(_exp, "exp_"), "expm1_": _float_inplace(_expm1, "expm1_"),
    "log_": _float_inplace(_log, "log_"), "log1p_": _float_inplace(_log1p, "log1p_"),
    "log2_": _float_inplace(_log2, "log2_"), "sqrt_": _float_inplace(_sqrt, "sqrt_"),
    "sin_": _float_inplace(_sin, "sin_"), "cos_": _float_inplace(_cos, "cos_"),
    "tanh_": _float_inplace(_tanh, "tanh_"), "sigmoid_": _float_inplace(_sigmoid, "sigmoid_"),
    "erf_": _float_inplace(_erf, "erf_"),
    "reciprocal_": lambda self: _assign_from(self, reciprocal, "reciprocal_"),
    "rsqrt_": lambda self: _assign_from(self, rsqrt, "rsqrt_"),
    "floor_": _rounding_inplace(_floor, "floor_"), "ceil_": _rounding_inplace(_ceil, "ceil_"),
    "trunc_": _rounding_inplace(_trunc, "trunc_"), "round_": round_,
    "masked_fill_": masked_fill_, "lerp_": lerp_, "addcmul": addcmul, "addcdiv": addcdiv,
    "addcmul_": addcmul_, "addcdiv_": addcdiv_, "copy_": copy_, "fill_": fill_,
    "zero_": zero_,
    # operators
    "__add__": add, "__radd__": _reflected(add),
    "__sub__": sub, "__rsub__": _reflected(sub),
    "__mul__": mul, "__rmul__": _reflected(mul),
    "__truediv__": div, "__rtruediv__": _reflected(div),
    "__floordiv__": floor_divide, "__rfloordiv__": _reflected(floor_divide),
    "__mod__": remainder, "__rmod__": _reflected(remainder),
    "__pow__": pow, "__rpow__": _reflected(pow),
    "__neg__": neg, "__pos__": positive, "__abs__": abs, "__invert__": _invert,
    "__and__": bitwise_and, "__rand__": _reflected(bitwise_and),
    "__or__": bitwise_or, "__ror__": _reflected(bitwise_or),
    "__xor__": bitwise_xor, "__rxor__": _reflected(bitwise_xor),
    "__eq__": _comparison(eq), "__ne__": _comparison(ne),
    "__lt__": lt, "__le__": le, "__gt__": gt, "__ge__": ge,
    "__iadd__": _augmented(add_, add), "__isub__": _augmented(sub_, sub),
    "__imul__": _augmented(mul_, mul), "__itruediv__": _augmented(div_, div),
    "__ifloordiv__": _augmented(floor_divide_, floor_divide),
    "__imod__": _augmented(remainder_, remainder), "__ipow__": _augmented(pow_, pow),
    "__iand__": _augmented(_bitwise_inplace(_bitwise_and, "bitwise_and"), bitwise_and),
    "__ior__": _augmented(_bitwise_inplace(_bitwise_or, "bitwise_or"), bitwise_or),
    "__ixor__": _augmented(_bitwise_inplace(_bitwise_xor, "bitwise_xor"), bitwise_xor),
}
