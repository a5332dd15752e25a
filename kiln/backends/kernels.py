"""Out-kernels: primitives that write their result into a preallocated array, bitwise as impl.

``OUT_KERNELS[name](out, *arrays, **attrs)`` computes exactly what
``REGISTRY[name].impl(*arrays, **attrs)`` computes, writes it into ``out`` and returns ``out``.
Every entry is proven bitwise equal to its impl by tests/backends/test_codegen.py.

Metadata read by the code generator:

- ``UFUNCS[name] = (ufunc, extra)``: the kernel is the single call ``ufunc(*arrays, *extra,
  out=out)``; generated code calls the ufunc directly (no Python frame in between).
- ``UNSAFE[name]``: input positions that must not share memory with ``out`` (multi-step
  kernels that read an input after writing ``out``).  Ufuncs and ``np.copyto`` handle overlap
  themselves (NumPy >= 1.13), so their entries have none.
- ``FRESH``: kernels faster than their impls, called on ``np.empty`` when a node has no buffer.
- ``writes_out(node)``: whether the executor will write ``node``'s result into a buffer.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np

from kiln import jit
from kiln.graph.ir import Node
from kiln.ops.conv import _conv2d_into
from kiln.ops.linalg import mm2, mm_batched
from kiln.ops.reduce import _BLAS_FLOATS, _count, _ones

# As in eager mode (kiln/ops/elementwise.py): inf and nan results are silent, as in PyTorch.
# Generated code runs with module name kiln.backends.generated, so this covers it too.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"kiln\.backends\.")

OUT_KERNELS: dict[str, Callable] = {}
# kernels faster than their impls: the executor calls them on a fresh array when the node has
# no planned buffer (a graph output such as a gradient)
FRESH: set[str] = set()
UFUNCS: dict[str, tuple] = {}
UNSAFE: dict[str, frozenset] = {}
_ACCEPTS: dict[str, Callable[[Node], bool]] = {}

_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


# -- conditions on the node (checked once, when the code is generated) ---------------------------

def _broadcast_ok(n: Node) -> bool:
    """The node's shape is the broadcast of its inputs' shapes, so ``out=`` cannot hide a
    different result shape (dims compared as given; a Sym only matches an equal Sym)."""
    nd = len(n.shape)
    for i in n.inputs:
        if len(i.shape) > nd:
            return False
    for k in range(1, nd + 1):
        d = n.shape[-k]
        dims = [i.shape[-k] for i in n.inputs if len(i.shape) >= k]
        if not any(x == d for x in dims) and not (d == 1 and all(x == 1 for x in dims)):
            return False
        if any(x != d and x != 1 for x in dims):
            return False
    return True


def _same_dtype(n: Node) -> bool:
    return all(i.dtype == n.dtype for i in n.inputs) and _broadcast_ok(n)


def _same_float(n: Node) -> bool:
    return n.dtype in _FLOATS and _same_dtype(n)


def _same_numeric(n: Node) -> bool:
    return n.dtype.kind in "fiu" and _same_dtype(n)


def _compare(n: Node) -> bool:
    return (n.dtype == np.bool_ and len({i.dtype for i in n.inputs}) == 1
            and _broadcast_ok(n))


def _logical(n: Node) -> bool:
    return n.dtype == np.bool_ and all(i.dtype == np.bool_ for i in n.inputs) and _broadcast_ok(n)


def _equal_shapes(n: Node) -> bool:
    return all(i.shape == n.shape for i in n.inputs) and _same_float(n)


def _where(n: Node) -> bool:
    cond, x, y = n.inputs
    return (cond.dtype == np.bool_ and x.dtype == y.dtype == n.dtype and _broadcast_ok(n))


def _cast(n: Node) -> bool:
    return np.dtype(n.attrs["dtype"]) == n.dtype and n.inputs[0].shape == n.shape


def _matmul_ok(n: Node) -> bool:
    return (n.dtype in _BLAS_FLOATS and all(i.dtype == n.dtype for i in n.inputs)
            and all(len(i.shape) >= 2 for i in n.inputs))


def _linear_ok(n: Node) -> bool:
    x, w = n.inputs[0], n.inputs[1]
    if n.dtype not in _BLAS_FLOATS or any(i.dtype != n.dtype for i in n.inputs):
        return False
    if len(x.shape) < 2 or len(w.shape) != 2:
        return False
    # the bias is added in place into the product, which must already have the full shape
    return len(n.inputs) == 2 or len(n.inputs[2].shape) <= 1


def _sum_ok(n: Node) -> bool:
    return n.dtype in _BLAS_FLOATS and n.inputs[0].dtype == n.dtype


# -- kiln.jit's eager kernels as out-kernels -----------------------------------------------------

_NATIVE_OPS = frozenset({"add", "sub", "mul", "div", "relu", "relu_backward", "where"})
_native_kernels: dict[str, Callable] = {}


def native_kernel(n: Node) -> Callable | None:
    """For a big float32 add/sub/mul/div (a bias or per-row operand), relu, relu's gradient or
    where: an out-kernel that runs kiln.jit's one-pass eager kernel (kiln/jit/eager_ops.py,
    bitwise numpy's) on both threads and otherwise the node's own out-kernel; else None."""
    if n.op not in _NATIVE_OPS or n.dtype != np.float32 or not jit.available():
        return None
    from kiln.jit.eager_ops import MIN_SIZE, run

    if all(isinstance(d, int) for d in n.shape) and math.prod(n.shape) < MIN_SIZE:
        return None  # a dynamic size is checked at run time
    k = _native_kernels.get(n.op)
    if k is None:
        op, plain = n.op, OUT_KERNELS[n.op]

        def k(out, *arrays):
            if run(op, arrays, out) is None:
                plain(out, *arrays)
            return out

        k.__name__ = f"k_native_{op}"
        _native_kernels[op] = k
    return k


# -- registration --------------------------------------------------------------------------------

def _ufunc(name: str, ufunc, accepts, extra=()) -> None:
    def kernel(out, *arrays):
        return ufunc(*arrays, *extra, out=out)

    kernel.__name__ = f"k_{name}"
    OUT_KERNELS[name] = kernel
    UFUNCS[name] = (ufunc, tuple(extra))
    UNSAFE[name] = frozenset()
    _ACCEPTS[name] = accepts


def _kernel(name: str, accepts, unsafe=()):
    def wrap(fn):
        fn.__name__ = f"k_{name}"
        OUT_KERNELS[name] = fn
        UNSAFE[name] = unsafe if isinstance(unsafe, frozenset) else frozenset(unsafe)
        _ACCEPTS[name] = accepts
        return fn

    return wrap


for _name, _uf in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("maximum", np.maximum), ("minimum", np.minimum)):
    _ufunc(_name, _uf, _same_numeric)
_ufunc("div", np.true_divide, _same_float)
_ufunc("neg", np.negative, _same_numeric)
_ufunc("abs", np.abs, _same_numeric)
for _name, _uf in (("exp", np.exp), ("expm1", np.expm1), ("log", np.log), ("log1p", np.log1p),
                   ("log2", np.log2), ("sqrt", np.sqrt), ("sin", np.sin), ("cos", np.cos),
                   ("tanh", np.tanh), ("floor", np.floor), ("ceil", np.ceil),
                   ("trunc", np.trunc)):
    _ufunc(_name, _uf, _same_float)
_ufunc("relu", np.maximum, _same_numeric, extra=(0,))
for _name, _uf in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                   ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)):
    _ufunc(_name, _uf, _compare)
for _name, _uf in (("logical_not", np.logical_not), ("logical_and", np.logical_and),
                   ("logical_or", np.logical_or), ("logical_xor", np.logical_xor)):
    _ufunc(_name, _uf, _logical)


@_kernel("cast", _cast)
def _k_cast(out, x, dtype):
    np.copyto(out, x, casting="unsafe")  # what astype does, into out
    return out


@_kernel("where", _where, unsafe=(0, 1))
def _k_where(out, cond, x, y):
    if cond.shape == out.shape and not np.may_share_memory(out, y):
        # an unpredictable full-size mask: y + (x - y) * cond in wrapping unsigned integers is
        # x's bits where cond holds and y's elsewhere, in SIMD passes (~5x faster than the
        # masked copy below, which stays for broadcast masks and for out aliasing y)
        bits = np.dtype(f"u{out.dtype.itemsize}")
        yb = np.asarray(y).view(bits)
        ob = out.view(bits)
        np.subtract(np.asarray(x).view(bits), yb, out=ob)
        np.multiply(ob, cond, out=ob)
        np.add(ob, yb, out=ob)
        return out
    np.copyto(out, y)
    np.copyto(out, x, where=cond)
    return out


# Same-size unsigned integer views of the float dtypes: the bit patterns kernels copy exactly.
_BITS = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32,
         np.dtype(np.float64): np.uint64}


@_kernel("relu_backward", _same_float, unsafe=())
def _k_relu_backward(out, g, y):
    # np.where(y > 0, g, 0) as integers: g's bits times 1 where y > 0 and times 0 elsewhere give
    # exactly g (NaN payloads, -0.0) or +0.0; one SIMD multiply instead of a masked copy (~7x).
    keep = np.greater(y, 0)  # computed first, so out may alias y or g
    bits = _BITS[out.dtype]
    np.multiply(np.asarray(g).view(bits), keep, out=out.view(bits))
    return out


# ~1.5x faster than the impl's three passes; used fresh where the result has no planned buffer
# (a gradient that is a graph output)
FRESH.add("relu_backward")


@_kernel("pow", _same_float, unsafe=())
def _k_pow(out, a, b):
    # the impl's float branches: x ** 2 is a square and x ** 0.5 a sqrt (one ufunc call each)
    if b.ndim == 0:
        e = b.item()
        if e == 2:
            return np.square(a, out=out)
        if e == 0.5:
            return np.sqrt(a, out=out)
    return np.power(a, b, out=out)


class _Every(frozenset):
    """``UNSAFE`` for kernels of any arity that write ``out`` before reading all inputs."""

    def __contains__(self, position) -> bool:
        return True


def _cat_ok(n: Node) -> bool:
    # the impl's fallback (legacy 1-D empty inputs of another rank) stays with the impl
    return all(i.dtype == n.dtype and len(i.shape) == len(n.shape) for i in n.inputs)


@_kernel("cat", _cat_ok, unsafe=_Every())
def _k_cat(out, *xs, dim):
    return np.concatenate(xs, axis=dim, out=out)


def _index_put_ok(n: Node) -> bool:
    x, values, indices = n.inputs
    return (n.attrs["accumulate"] and n.attrs["dims"] == (0,) and not n.attrs["index"]
            and len(n.shape) >= 2 and n.dtype.kind == "f" and x.dtype == values.dtype == n.dtype
            and indices.dtype.kind in "iu")


def _occurrence_levels(rows: np.ndarray):
    """[positions of the first occurrence of each row, of the second, ...], or None when the
    levels would not pay (many repeats of one row) or a row is negative."""
    if rows.size == 0:
        return []
    if rows.min() < 0:
        return None
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    new = np.empty(rows.size, bool)
    new[0] = True
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, rows.size))
    top = int(counts.max())
    if top > 1 and top * 8 > rows.size:
        return None
    rank = np.arange(rows.size) - np.repeat(starts, counts)
    return [order[rank == r] for r in range(top)]


@_kernel("index_put", _index_put_ok, unsafe=_Every())
def _k_index_put(out, x, values, indices, index, dims, accumulate):
    # The embedding backward: np.add.at adds row by row in order of occurrence (~1.7 us a row).
    # The same additions in the same order per row, as one fancy add per occurrence level
    # (the rows within a level are distinct), are bitwise equal and ~4x faster.
    # kiln.jit's scatter loop, which the impl's _rows_add runs for float32, does them natively
    # (35 us for the gpt's, not 0.6 ms).
    from kiln.ops.index import _rows_add

    np.copyto(out, x)
    rows = indices[0].reshape(-1)
    levels = None if out.dtype == np.float32 and jit.available() else _occurrence_levels(rows)
    if levels is None:
        _rows_add(out, indices[0], values)  # what the impl does, into out
        return out
    vals = np.broadcast_to(values, indices[0].shape + out.shape[1:]).reshape(
        (rows.size,) + out.shape[1:])
    for sel in levels:
        out[rows[sel]] += vals[sel]
    return out


FRESH.add("index_put")


@_kernel("tanh_backward", _equal_shapes, unsafe=(0,))
def _k_tanh_backward(out, g, y):
    np.multiply(y, y, out=out)
    np.subtract(1, out, out=out)
    np.multiply(out, g, out=out)
    return out


@_kernel("sigmoid_backward", _equal_shapes, unsafe=(0, 1))
def _k_sigmoid_backward(out, g, y):
    np.subtract(1, y, out=out)
    np.multiply(out, y, out=out)
    np.multiply(out, g, out=out)
    return out


@_kernel("sigmoid", _same_float, unsafe=())
def _k_sigmoid(out, x):
    np.negative(x, out=out)  # x is not read again, so out may alias it
    np.exp(out, out=out)
    np.add(out, 1, out=out)
    return np.reciprocal(out, out=out)


@_kernel("matmul", _matmul_ok, unsafe=(0, 1))
def _k_matmul(out, a, b, ta, tb):
    if ta:
        a = a.swapaxes(-1, -2)
    if tb:
        b = b.swapaxes(-1, -2)
    if b.ndim == 2 and a.ndim > 2 and not ta:
        rows = _count(a.shape, range(a.ndim - 1))
        a2 = a.reshape(rows, a.shape[-1])
        if out.flags.c_contiguous:
            mm2(a2, b, out=out.reshape(rows, b.shape[1]))
        else:
            np.copyto(out, mm2(a2, b).reshape(out.shape))
        return out
    if a.ndim == 2 and b.ndim == 2:
        return mm2(a, b, out=out)
    return mm_batched(a, b, out=out)


@_kernel("linear", _linear_ok, unsafe=(0, 1, 2))
def _k_linear(out, x, w, *bias):
    if x.ndim > 2:
        rows = _count(x.shape, range(x.ndim - 1))
        x2 = x.reshape(rows, x.shape[-1])
        if out.flags.c_contiguous:
            mm2(x2, w.T, out=out.reshape(rows, w.shape[0]))
        else:
            np.copyto(out, mm2(x2, w.T).reshape(out.shape))
    else:
        mm2(x, w.T, out=out)
    if bias:
        np.add(out, bias[0], out=out)
    return out


@_kernel("sum", _sum_ok, unsafe=(0,))
def _k_sum(out, x, axes, keepdims):
    # the same branches as kiln.ops.reduce._sum_np (float32/float64 only)
    nd, k = x.ndim, len(axes)
    if 0 < k < nd and x.flags.c_contiguous and x.size and out.flags.c_contiguous:
        shape = x.shape
        if axes[0] == nd - k and axes[-1] == nd - 1:
            n = _count(shape, axes)
            if n <= 8192:
                np.matmul(x.reshape(-1, n), _ones(n, x.dtype), out=out.reshape(-1))
                return out
        elif axes[0] == 0 and axes[-1] == k - 1:
            n = _count(shape, axes)
            if n <= 8192 and x.size >= 32 * n:
                np.matmul(_ones(n, x.dtype), x.reshape(n, -1), out=out.reshape(-1))
                return out
    elif 0 < k < nd and x.flags.c_contiguous and x.size:
        # out is not contiguous (an in-place target): let the impl decide, then copy
        from kiln.ops.reduce import _sum_np

        np.copyto(out, _sum_np(x, axes, keepdims))
        return out
    np.add.reduce(x, axis=axes, dtype=x.dtype, keepdims=keepdims, out=out)
    return out


def _conv2d_ok(n: Node) -> bool:
    return (n.dtype in _BLAS_FLOATS and all(i.dtype == n.dtype for i in n.inputs)
            and len(n.shape) == 4)


@_kernel("conv2d", _conv2d_ok, unsafe=_Every())
def _k_conv2d(out, x, w, *bias, stride, padding, dilation, groups):
    # the impl is this same function on np.empty: chunked im2col, each chunk's gemm result
    # copied (NCHW) straight into out, so a planned buffer saves the output's allocation
    return _conv2d_into(out, x, w, bias[0] if bias else None, stride, padding, dilation, groups)


FRESH.add("conv2d")


def kernel_accepts(node: Node) -> bool:
    """True if ``node`` (a primitive node) has an out-kernel valid for its shapes and dtypes."""
    ok = _ACCEPTS.get(node.op)
    return ok is not None and ok(node)


def writes_out(node: Node) -> bool:
    """True if the executor writes ``node``'s result into a preallocated buffer: a primitive
    with an out-kernel that accepts it, or a fused node whose body is made of such primitives."""
    if node.op == "fused":
        body = node.attrs["body"]
        return all(n.op == "const" or kernel_accepts(n) for n in body.nodes)
    return kernel_accepts(node)
