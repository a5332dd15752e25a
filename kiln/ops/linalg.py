"""Products: matmul (and mm/bmm/mv/dot/outer/addmm/baddbmm), einsum, tensordot and linear."""

from __future__ import annotations

import functools
import numbers

import numpy as np

from kiln import dtypes, jit
from kiln.ops.elementwise import binary_operands, mul
from kiln.ops.reduce import sum as _rsum
from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor, _make

__all__ = ["matmul", "mm", "bmm", "mv", "dot", "inner", "outer", "ger", "addmm", "baddbmm",
           "addmv", "einsum", "tensordot", "linear"]

# C++ scalar names PyTorch prints in its dtype-mismatch messages.
_CNAME = {"float32": "float", "float64": "double", "float16": "c10::Half", "int64": "long int",
          "int32": "int", "int16": "short int", "int8": "signed char", "uint8": "unsigned char",
          "bool": "bool"}
# ScalarType names PyTorch prints in other messages ("Float", "Double", ...).
_SNAME = {"float32": "Float", "float64": "Double", "float16": "Half", "int64": "Long",
          "int32": "Int", "int16": "Short", "int8": "Char", "uint8": "Byte", "bool": "Bool"}


# -- the matmul primitive ------------------------------------------------------------------------
#
# ``matmul(a, b, ta, tb)`` is ``op(a) @ op(b)`` where ``op`` transposes the last two axes when its
# flag is set, as BLAS gemm's transA/transB: the gradients of a product are products with one
# operand transposed, so with the flags every VJP is a single matmul (no transpose node), and
# numpy hands the transposed view to BLAS without copying.  Operands have >= 2 dims and the same
# dtype; batch dims broadcast as in np.matmul.

_native: list = []  # kiln.jit.blas.matmul and bmm.matmul, imported on first use (llvmlite)


def _native_products():
    if not _native:
        from kiln.jit import blas, bmm

        _native.extend((blas.matmul, bmm.matmul))
    return _native


def mm2(a, b, out=None):
    """A 2-D product ``a @ b`` (into ``out`` when given): float32 ones on kiln.jit's threads when
    available (kiln/jit/blas.py), else numpy's."""
    if a.dtype == np.float32 and jit.available():
        y = (_native or _native_products())[0](a, b, out)
        if y is not None:
            return y
    return np.matmul(a, b, out=out)


def mm_batched(a, b, out=None):
    """A batched product ``np.matmul(a, b)`` (into ``out`` when given): stacks of small float32
    matrices on kiln.jit's threads when available (kiln/jit/bmm.py), else numpy's."""
    if a.dtype == np.float32 and jit.available():
        y = (_native or _native_products())[1](a, b, out)
        if y is not None:
            return y
    return np.matmul(a, b, out=out)


@primitive("matmul", traits={"linalg"}, save=(0, 1))
def _matmul(a, b, ta, tb):
    if ta:
        a = a.swapaxes(-1, -2)
    if tb:
        b = b.swapaxes(-1, -2)
    if b.ndim == 2 and a.ndim > 2 and not ta:
        # (..., M, K) @ (K, N): one gemm over all rows beats a loop of small ones
        return mm2(a.reshape(_numel(a.shape[:-1]), a.shape[-1]), b).reshape(
            a.shape[:-1] + (b.shape[1],))
    if a.ndim == 2 and b.ndim == 2:
        return mm2(a, b)
    return mm_batched(a, b)


@_matmul.def_infer
def _matmul_infer(shapes, dts, ta, tb):
    sa, sb = shapes
    m = sa[-1] if ta else sa[-2]
    n = sb[-2] if tb else sb[-1]
    batch = np.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    return tuple(batch) + (m, n), dts[0]


@_matmul.def_vjp
def _matmul_vjp(g, node):
    a, b = node.inputs
    ta, tb = node.attrs["ta"], node.attrs["tb"]
    na, nb = node.needs
    ga = gb = None
    if na:
        # C = op(A) op(B):  dop(A) = g op(B)^T, and dA is that or its transpose
        ga = _matmul(g, b, ta=False, tb=not tb) if not ta else _matmul(b, g, ta=tb, tb=True)
        ga = sum_to(ga, a._data.shape)
    if nb:
        if b.ndim == 2 and a.ndim > 2 and not ta:
            # sum over the batch inside one gemm: (rows, K)^T @ (rows, N)
            rows = _numel(a._data.shape[:-1])
            a2 = a.reshape(rows, a._data.shape[-1])
            g2 = g.reshape(rows, g._data.shape[-1])
            gb = _matmul(a2, g2, ta=True, tb=False) if not tb else _matmul(g2, a2, ta=True,
                                                                           tb=False)
        else:
            gb = _matmul(a, g, ta=not ta, tb=False) if not tb else _matmul(g, a, ta=True, tb=ta)
            gb = sum_to(gb, b._data.shape)
    return ga, gb


# -- checks shared by the public products --------------------------------------------------------

def _tensor_arg(x, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(x).__name__}")
    return x


def _same_dtype(a: Tensor, b: Tensor) -> None:
    """PyTorch does not promote in matrix products: mixed dtypes are an error."""
    da, db = a._data.dtype, b._data.dtype
    if da != db:
        na, nb = dtypes._FROM_NP[da].name, dtypes._FROM_NP[db].name
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: "
                           f"{_CNAME[na]} != {_CNAME[nb]}")
    if da == np.bool_:
        raise NotImplementedError("\"addmm_impl_cpu_\" not implemented for 'Bool'")


def _mat_error(sa, sb) -> RuntimeError:
    return RuntimeError(f"mat1 and mat2 shapes cannot be multiplied "
                        f"({sa[0]}x{sa[1]} and {sb[0]}x{sb[1]})")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- public products -----------------------------------------------------------------------------

def matmul(input: Tensor, other: Tensor) -> Tensor:
    """Matrix product with torch.matmul's rules: 1-D operands are vectors, batch dims broadcast.

    >>> import kiln
    >>> (kiln.ones(2, 3) @ kiln.ones(3)).tolist()
    [3.0, 3.0]
    """
    a = _tensor_arg(input, "matmul", "input")
    b = _tensor_arg(other, "matmul", "other")
    sa, sb = a._data.shape, b._data.shape
    da, db = len(sa), len(sb)
    if a._data.dtype != b._data.dtype or a._data.dtype == np.bool_:
        _same_dtype(a, b)
    if da == 2 and db == 2:  # the hot path
        if sa[1] != sb[0]:
            raise _mat_error(sa, sb)
        return _matmul(a, b, ta=False, tb=False)
    if da == 0 or db == 0:
        raise RuntimeError(f"both arguments to matmul need to be at least 1D, but they are "
                           f"{da}D and {db}D")
    if db == 1:
        k = sa[-1]
        if sb[0] != k:
            if da == 1:
                raise RuntimeError(
                    f"inconsistent tensor size, expected tensor [{k}] and src [{sb[0]}] to have "
                    f"the same number of elements, but got {k} and {sb[0]} elements respectively")
            rows = _numel(sa[:-1])
            raise RuntimeError(f"size mismatch, got input ({rows}), mat ({rows}x{k}), "
                               f"vec ({sb[0]})")
        a2 = a.reshape(1, k) if da == 1 else a
        return _matmul(a2, b.reshape(k, 1), ta=False, tb=False).reshape(sa[:-1])
    k = sb[-2]
    if da == 1:
        if sa[0] != k:
            if db == 2:
                raise _mat_error((1, sa[0]), sb)
            raise _batch_error(sb[:-2], (1, sa[0]), sb)
        out = _matmul(a.reshape(1, k), b, ta=False, tb=False)
        return out.reshape(sb[:-2] + (sb[-1],))
    if sa[-1] != k:
        if db == 2:
            raise _mat_error((_numel(sa[:-1]), sa[-1]), sb)
        batch = _broadcast_batch(sa[:-2], sb[:-2])
        raise _batch_error(batch, sa[-2:], sb)
    _broadcast_batch(sa[:-2], sb[:-2])
    return _matmul(a, b, ta=False, tb=False)


def _batch_error(batch, sa2, sb) -> RuntimeError:
    n = _numel(batch)
    return RuntimeError(f"Expected size for first two dimensions of batch2 tensor to be: "
                        f"[{n}, {sa2[1]}] but got: [{n}, {sb[-2]}].")


def _broadcast_batch(ba, bb) -> tuple:
    try:
        return np.broadcast_shapes(tuple(ba), tuple(bb))
    except ValueError:
        pass
    ba, bb = tuple(ba), tuple(bb)
    n = max(len(ba), len(bb))
    ba, bb = (1,) * (n - len(ba)) + ba, (1,) * (n - len(bb)) + bb
    i = next(i for i in range(n) if ba[i] != bb[i] and ba[i] != 1 and bb[i] != 1)
    raise RuntimeError(f"The size of tensor a ({ba[i]}) must match the size of tensor b "
                       f"({bb[i]}) at non-singleton dimension {i}")


def mm(input: Tensor, mat2: Tensor) -> Tensor:
    """Product of two matrices (no broadcasting)."""
    a = _tensor_arg(input, "mm", "input")
    b = _tensor_arg(mat2, "mm", "mat2")
    if a.ndim != 2:
        raise RuntimeError("self must be a matrix")
    if b.ndim != 2:
        raise RuntimeError("mat2 must be a matrix")
    _same_dtype(a, b)
    if a._data.shape[1] != b._data.shape[0]:
        raise _mat_error(a._data.shape, b._data.shape)
    return _matmul(a, b, ta=False, tb=False)


def bmm(input: Tensor, mat2: Tensor) -> Tensor:
    """Batched product of (B, n, m) and (B, m, p) tensors (no broadcasting)."""
    a = _tensor_arg(input, "bmm", "input")
    b = _tensor_arg(mat2, "bmm", "mat2")
    if a.ndim != 3:
        raise RuntimeError("batch1 must be a 3D tensor")
    if b.ndim != 3:
        raise RuntimeError("batch2 must be a 3D tensor")
    _same_dtype(a, b)
    sa, sb = a._data.shape, b._data.shape
    if sb[0] != sa[0] or sb[1] != sa[2]:
        raise RuntimeError(f"Expected size for first two dimensions of batch2 tensor to be: "
                           f"[{sa[0]}, {sa[2]}] but got: [{sb[0]}, {sb[1]}].")
    return _matmul(a, b, ta=False, tb=False)


def mv(input: Tensor, vec: Tensor) -> Tensor:
    """Matrix-vector product."""
    a = _tensor_arg(input, "mv", "input")
    v = _tensor_arg(vec, "mv", "vec")
    if a.ndim != 2 or v.ndim != 1:
        raise RuntimeError(f"vector + matrix @ vector expected, got 1, {a.ndim}, {v.ndim}")
    _same_dtype(a, v)
    return matmul(a, v)


def dot(input: Tensor, tensor: Tensor) -> Tensor:
    """Inner product of two 1-D tensors."""
    a = _tensor_arg(input, "dot", "input")
    b = _tensor_arg(tensor, "dot", "tensor")
    if a.ndim != 1 or b.ndim != 1:
        raise RuntimeError(f"1D tensors expected, but got {a.ndim}D and {b.ndim}D tensors")
    if a._data.dtype != b._data.dtype:
        raise RuntimeError(f"dot : expected both vectors to have same dtype, but found "
                           f"{_SNAME[a.dtype.name]} and {_SNAME[b.dtype.name]}")
    return matmul(a, b)


def inner(input: Tensor, other: Tensor) -> Tensor:
    """Sum product over the last dims (scalars multiply)."""
    a = _tensor_arg(input, "inner", "input")
    b = _tensor_arg(other, "inner", "other")
    if a.ndim == 0 or b.ndim == 0:
        return mul(a, b)
    if a._data.shape[-1] != b._data.shape[-1]:
        raise RuntimeError(f"inner() the last dimension must match on both input tensors but "
                           f"got shapes {list(a.shape)} and {list(b.shape)}")
    a, b = binary_operands(a, b, "inner")
    return tensordot(a, b, dims=([a.ndim - 1], [b.ndim - 1]))


def outer(input: Tensor, vec2: Tensor) -> Tensor:
    """Outer product of two vectors (dtypes promote, as in PyTorch)."""
    a = _tensor_arg(input, "outer", "input")
    b = _tensor_arg(vec2, "outer", "vec2")
    if a.ndim != 1:
        raise RuntimeError(f"outer: Expected 1-D argument self, but got {a.ndim}-D")
    if b.ndim != 1:
        raise RuntimeError(f"outer: Expected 1-D argument vec2, but got {b.ndim}-D")
    return mul(a.reshape(-1, 1), b)


ger = outer


def _scaled(x: Tensor, s) -> Tensor:
    return x if s == 1 else mul(x, s)


def addmm(input: Tensor, mat1: Tensor, mat2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * (mat1 @ mat2)``; with beta=0 ``input`` is ignored (NaNs too)."""
    prod = _scaled(mm(mat1, mat2), alpha)
    return prod if beta == 0 else _scaled(input, beta) + prod


def addmv(input: Tensor, mat: Tensor, vec: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * (mat @ vec)``."""
    prod = _scaled(mv(mat, vec), alpha)
    return prod if beta == 0 else _scaled(input, beta) + prod


def baddbmm(input: Tensor, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> Tensor:
    """``beta * input + alpha * bmm(batch1, batch2)``."""
    prod = _scaled(bmm(batch1, batch2), alpha)
    return prod if beta == 0 else _scaled(input, beta) + prod


# -- linear --------------------------------------------------------------------------------------
#
# A primitive of its own rather than matmul + add: measured on the MLP's shapes (numpy with one
# BLAS thread), the fused forward is 6 us instead of 9-13 us for a 64x128 -> 10 layer and
# forward+backward 33 us instead of 49 us (one dispatch and one temporary fewer, the bias added
# in place); for large layers the two are equal.  It also lowers directly to ONNX Gemm.  The
# weight stays (out, in): the gemm reads its transposed view without copying.

@primitive("linear", traits={"linalg"}, save=(0, 1))
def _linear(x, w, *bias):
    if x.ndim > 2:
        y = mm2(x.reshape(_numel(x.shape[:-1]), x.shape[-1]), w.T).reshape(
            x.shape[:-1] + (w.shape[0],))
    else:
        y = mm2(x, w.T)
    if bias:
        y += bias[0]
    return y


@_linear.def_infer
def _linear_infer(shapes, dts):
    return tuple(shapes[0][:-1]) + (shapes[1][0],), dts[0]


@_linear.def_vjp
def _linear_vjp(g, node):
    inputs, needs = node.inputs, node.needs
    x, w = inputs[0], inputs[1]
    gx = _matmul(g, w, ta=False, tb=False) if needs[0] else None
    gw = None
    if needs[1]:
        xs = x._data.shape
        if len(xs) > 2:  # sum over all rows inside one gemm
            rows = _numel(xs[:-1])
            gw = _matmul(g.reshape(rows, g._data.shape[-1]), x.reshape(rows, xs[-1]), ta=True,
                         tb=False)
        else:
            gw = _matmul(g, x, ta=True, tb=False)
    if len(needs) == 2:
        return gx, gw
    gb = None
    if needs[2]:
        bshape, gshape = inputs[2]._data.shape, g._data.shape
        gb = _rsum(g, 0) if len(gshape) == 2 and bshape == gshape[1:] else sum_to(g, bshape)
    return gx, gw, gb


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T + bias`` with ``weight`` stored (out_features, in_features).

    >>> import kiln
    >>> kiln.linear(kiln.ones(2, 3), kiln.ones(4, 3), kiln.zeros(4)).shape
    kiln.Size([2, 4])
    """
    if isinstance(input, Tensor) and isinstance(weight, Tensor):
        xd, wd = input._data, weight._data
        sx, sw = xd.shape, wd.shape
        if (len(sw) == 2 and len(sx) >= 2 and sx[-1] == sw[1] and xd.dtype == wd.dtype
                and xd.dtype != np.bool_):  # the hot path: checks that cost nothing
            if bias is None:
                return _linear(input, weight)
            if (isinstance(bias, Tensor) and bias._data.shape == sw[:1]
                    and bias._data.dtype == xd.dtype):
                return _linear(input, weight, bias)
    x = _tensor_arg(input, "linear", "input")
    w = _tensor_arg(weight, "linear", "weight")
    sx, sw = x._data.shape, w._data.shape
    if x._data.dtype != w._data.dtype or x._data.dtype == np.bool_:
        _same_dtype(x, w)
    if len(sw) == 1 and len(sx) >= 1 and sx[-1] == sw[0] and bias is None:
        return matmul(x, w)  # a vector weight: PyTorch computes a matmul (and no bias)
    if len(sw) != 2 or len(sx) == 0:
        raise RuntimeError(f"linear(): weight must be 2-D and input at least 1-D, got "
                           f"input {list(sx)} and weight {list(sw)}")
    if sx[-1] != sw[1]:
        raise _mat_error((_numel(sx[:-1]), sx[-1]), (sw[1], sw[0]))
    if len(sx) == 1:  # a vector input: PyTorch's matmul + add
        out = _linear(x.reshape(1, sx[0]), w).reshape(sw[0])
        return out if bias is None else out + bias
    if bias is None:
        return _linear(x, w)
    b = _tensor_arg(bias, "linear", "bias")
    if b._data.dtype != x._data.dtype:
        _same_dtype(x, b)
    bs, os_ = b._data.shape, sx[:-1] + (sw[0],)
    if len(bs) > len(os_) or any(s not in (1, o) for s, o in zip(bs[::-1], os_[::-1])):
        raise RuntimeError(
            f"The expanded size of the tensor ({os_[-1]}) must match the existing size "
            f"({bs[-1] if bs else 1}) at non-singleton dimension {len(os_) - 1}.  "
            f"Target sizes: {list(os_)}.  Tensor sizes: {list(bs)}")
    return _linear(x, w, b)


# -- einsum --------------------------------------------------------------------------------------
#
# The public op parses and normalises the equation (ellipses become fresh letters, implicit
# outputs become explicit, size-1 dims that broadcast are expanded, a subscript repeated within
# one operand becomes a product with a constant identity), then contracts the operands pairwise
# in the order np.einsum_path chooses.  So there are two primitives, over distinct letters with
# consistent sizes: ``einsum`` for one operand (transpose / sum) and ``einsum2`` for two, which
# runs as one (batched) BLAS matmul after transposing each operand to (batch, kept, summed),
# the way torch does it; np.einsum would loop in C for batched contractions, and even with
# optimize=True pays ~40 us of path search per call.  The gradient for an operand is another
# einsum: the output gradient contracted with the other operand onto this operand's
# subscripts, broadcast over the subscripts only this operand had (they were summed).

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _einsum_out_shape(equation: str, shapes) -> tuple:
    lhs, out = equation.split("->")
    size = {}
    for term, s in zip(lhs.split(","), shapes):
        size.update(zip(term, s))
    return tuple(size[c] for c in out)


@primitive("einsum", traits={"linalg"})
def _einsum(x, equation):
    out = np.einsum(equation, x)
    if np.may_share_memory(out, x):  # a pure transpose comes back as a view: own the result
        out = out.copy()
    return out


@_einsum.def_infer
def _einsum_infer(shapes, dts, equation):
    return _einsum_out_shape(equation, shapes), dts[0]


@_einsum.def_vjp
def _einsum_vjp(g, node):
    (term,), out = _einsum_terms(node.attrs["equation"])
    return (_einsum_grad(g, out, term, node.inputs[0], None, None),)


@primitive("einsum2", traits={"linalg"}, save=(0, 1))
def _einsum2(a, b, equation):
    (ta, tb), to = _einsum_terms(equation)
    return _contract(a, b, ta, tb, to)


@_einsum2.def_infer
def _einsum2_infer(shapes, dts, equation):
    return _einsum_out_shape(equation, shapes), dts[0]


@_einsum2.def_vjp
def _einsum2_vjp(g, node):
    (ta, tb), out = _einsum_terms(node.attrs["equation"])
    a, b = node.inputs
    na, nb = node.needs
    return (_einsum_grad(g, out, ta, a, tb, b) if na else None,
            _einsum_grad(g, out, tb, b, ta, a) if nb else None)


@functools.lru_cache(maxsize=1024)
def _einsum_terms(equation: str):
    lhs, out = equation.split("->")
    return tuple(lhs.split(",")), out


def _einsum_grad(g, out, term, x, other_term, other):
    """Gradient of an einsum with respect to operand ``x`` (subscripts ``term``)."""
    avail = set(out) if other is None else set(out) | set(other_term)
    keep = "".join(c for c in term if c in avail)
    if other is None:
        gx = _einsum(g, equation=f"{out}->{keep}")
    else:
        gx = _einsum2(g, other, equation=f"{out},{other_term}->{keep}")
    if keep != term:  # subscripts only x had were summed: its gradient is broadcast over them
        shape = x._data.shape
        gx = gx.reshape(tuple(s if c in avail else 1 for c, s in zip(term, shape)))
        gx = gx.expand(shape)
    return gx


def _contract(a, b, ta: str, tb: str, to: str) -> np.ndarray:
    """np.einsum(f"{ta},{tb}->{to}", a, b) over distinct letters, as one matmul."""
    lone_a = tuple(i for i, c in enumerate(ta) if c not in tb and c not in to)
    if lone_a:
        a = a.sum(axis=lone_a)
        ta = "".join(c for c in ta if c in tb or c in to)
    lone_b = tuple(i for i, c in enumerate(tb) if c not in ta and c not in to)
    if lone_b:
        b = b.sum(axis=lone_b)
        tb = "".join(c for c in tb if c in ta or c in to)
    batch = [c for c in ta if c in tb and c in to]
    summed = [c for c in ta if c in tb and c not in to]
    keep_a = [c for c in ta if c not in tb]
    keep_b = [c for c in tb if c not in ta]
    size = dict(zip(ta, a.shape))
    size.update(zip(tb, b.shape))
    nbatch, nsum = _prod(size, batch), _prod(size, summed)
    na, nb = _prod(size, keep_a), _prod(size, keep_b)
    a = a.transpose([ta.index(c) for c in batch + keep_a + summed]).reshape(nbatch, na, nsum)
    b = b.transpose([tb.index(c) for c in batch + summed + keep_b]).reshape(nbatch, nsum, nb)
    res = np.matmul(a, b) if nbatch != 1 else (a[0] @ b[0])[None]
    res = res.reshape(tuple(size[c] for c in batch + keep_a + keep_b))
    order = batch + keep_a + keep_b
    perm = [order.index(c) for c in to]
    return res if perm == sorted(perm) else res.transpose(perm)


def _prod(size: dict, letters) -> int:
    n = 1
    for c in letters:
        n *= size[c]
    return n


@functools.lru_cache(maxsize=512)
def _einsum_plan(terms: tuple, out: str, shapes: tuple) -> tuple:
    """Pairwise contraction order for three or more operands: ((i, j, equation), ...) where
    operands i and j are removed from the list and the result appended, as np.einsum_path."""
    fakes = [np.broadcast_to(np.zeros((), np.float32), s) for s in shapes]
    path = np.einsum_path(",".join(terms) + "->" + out, *fakes, optimize="greedy")[0][1:]
    current = list(terms)
    steps = []
    for pair in path:
        pair = sorted(pair, reverse=True)
        picked = [current.pop(k) for k in pair]
        rest = "".join(current)
        if not current:
            res = out
        else:
            res = "".join(dict.fromkeys(c for c in "".join(picked) if c in out or c in rest))
        eq = ",".join(picked) + "->" + res
        steps.append((tuple(pair), eq))
        current.append(res)
    return tuple(steps)


def _einsum_parse(equation: str, ops: tuple) -> tuple:
    """Normalise ``equation`` for ``ops``: returns (terms, out) as lists of explicit letters."""
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->", 1)
        explicit = True
    else:
        lhs, out, explicit = eq, "", False
    for pos, c in enumerate(eq):
        if not (c.isascii() and c.isalpha()) and c not in ",.->":
            raise RuntimeError(f"einsum(): invalid subscript given at index {pos} in the equation "
                               "string, subscripts must be in [a-zA-Z]")
    raw = lhs.split(",")
    if len(raw) > len(ops):
        raise RuntimeError("einsum(): fewer operands were provided than specified in the equation")
    if len(raw) < len(ops):
        raise RuntimeError("einsum(): more operands were provided than specified in the equation")
    used = set(eq)
    fresh = [c for c in _LETTERS if c not in used]
    ell_dims = 0
    parsed = []
    for i, (term, x) in enumerate(zip(raw, ops)):
        if term.count("...") > 1 or term.replace("...", "").count(".") or (
                "." in term and "..." not in term):
            raise RuntimeError(f"einsum(): found '.' for operand {i} that is not part of any "
                               "ellipsis")
        letters = term.replace("...", "")
        if "..." in term:
            if len(letters) > x.ndim:
                raise RuntimeError(
                    f"einsum(): the number of subscripts in the equation ({len(letters)}) is more "
                    f"than the number of dimensions ({x.ndim}) for operand {i}")
            ell_dims = max(ell_dims, x.ndim - len(letters))
        elif len(letters) != x.ndim:
            raise RuntimeError(
                f"einsum(): the number of subscripts in the equation ({len(letters)}) does not "
                f"match the number of dimensions ({x.ndim}) for operand {i} and no ellipsis was "
                "given")
        parsed.append((term, letters, x.ndim - len(letters)))
    if ell_dims > len(fresh):
        raise RuntimeError("einsum(): too many dimensions")
    ell = "".join(fresh[:ell_dims])
    terms = []
    for term, letters, n_ell in parsed:
        if "..." in term:
            terms.append(term.replace("...", ell[ell_dims - n_ell:]))
        else:
            terms.append(term)
    if explicit:
        if out.count("...") > 1 or out.replace("...", "").count("."):
            raise RuntimeError("einsum(): found '.' for output that is not part of any ellipsis")
        seen = set()
        for c in out.replace("...", ""):
            if c in seen:
                raise RuntimeError(f"einsum(): output subscript {c} appears more than once in "
                                   "the output")
            seen.add(c)
            if not any(c in t for t in raw):
                raise RuntimeError(f"einsum(): output subscript {c} does not appear in the "
                                   "equation for any input operand")
        out = out.replace("...", ell)
    else:
        counts: dict = {}
        for t in raw:
            for c in t.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1))
    return terms, out


def einsum(equation: str, *operands) -> Tensor:
    """Einstein summation, as torch.einsum (ellipsis, implicit output, broadcasting, diagonals).

    >>> import kiln
    >>> kiln.einsum("ij,jk->ik", kiln.ones(2, 3), kiln.ones(3, 4)).shape
    kiln.Size([2, 4])
    """
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        raise TypeError(f"einsum(): argument 'equation' must be str, not "
                        f"{type(equation).__name__}")
    for i, x in enumerate(operands):
        _tensor_arg(x, "einsum", f"operands[{i}]")
    if not operands:
        raise RuntimeError("einsum(): must provide at least one operand")
    dt = operands[0]._data.dtype
    for x in operands[1:]:
        if x._data.dtype != dt:
            raise RuntimeError(f"expected scalar type {_SNAME[operands[0].dtype.name]} but found "
                               f"{_SNAME[x.dtype.name]}")
    terms, out = _einsum_parse(equation, operands)
    size: dict = {}
    for i, (term, x) in enumerate(zip(terms, operands)):
        for c, s in zip(term, x._data.shape):
            prev = size.get(c)
            if prev is None or prev == 1:
                size[c] = s
            elif s != prev and s != 1:
                raise RuntimeError(f"einsum(): subscript {c} has size {s} for operand {i} which "
                                   f"does not broadcast with previously seen size {prev}")
    ops = []
    for term, x in zip(terms, operands):
        full = tuple(size[c] for c in term)
        ops.append(x if x._data.shape == full else x.expand(full))
    terms, ops = _split_diagonals(terms, ops, size)
    if len(ops) == 1:
        return _einsum(ops[0], equation=f"{terms[0]}->{out}")
    if len(ops) == 2:
        return _einsum2(ops[0], ops[1], equation=f"{terms[0]},{terms[1]}->{out}")
    plan = _einsum_plan(tuple(terms), out, tuple(x._data.shape for x in ops))
    ops = list(ops)
    for pair, eq in plan:
        picked = [ops.pop(k) for k in pair]
        if len(picked) == 1:
            ops.append(_einsum(picked[0], equation=eq))
        else:
            ops.append(_einsum2(picked[0], picked[1], equation=eq))
    return ops[0]


def _split_diagonals(terms, ops, size):
    """A subscript repeated within one operand (``ii->i``) reads a diagonal: rename the repeat
    and multiply by a constant identity over the two names, so that the primitive (and its
    gradient) only see distinct subscripts."""
    if all(len(set(t)) == len(t) for t in terms):
        return terms, ops
    used = set("".join(terms))
    fresh = iter(c for c in _LETTERS if c not in used)
    new_terms, new_ops, eyes = [], [], []
    for term, x in zip(terms, ops):
        seen = ""
        for c in term:
            if c in seen:
                d = next(fresh, None)
                if d is None:
                    raise NotImplementedError("einsum(): too many repeated subscripts")
                eyes.append((c + d, size[c]))
                c = d
            seen += c
        new_terms.append(seen)
        new_ops.append(x)
    dt = ops[0]._data.dtype
    for term, n in eyes:
        new_terms.append(term)
        new_ops.append(_make(np.eye(n, dtype=dt)))
    return new_terms, new_ops


def tensordot(a: Tensor, b: Tensor, dims=2) -> Tensor:
    """Contract ``dims`` (an int: the last dims of a with the first of b; or two lists)."""
    a = _tensor_arg(a, "tensordot", "a")
    b = _tensor_arg(b, "tensordot", "b")
    if isinstance(dims, Tensor):
        dims = dims.tolist()
    if isinstance(dims, numbers.Integral):
        if dims < 0:
            raise RuntimeError(f"tensordot expects dims >= 0, but got dims={dims}")
        if dims > min(a.ndim, b.ndim):
            raise RuntimeError(f"tensordot expects dims < ndim_a or ndim_b, but got dims={dims}")
        da, db = list(range(a.ndim - dims, a.ndim)), list(range(dims))
    else:
        da, db = dims
        if isinstance(da, numbers.Integral) or isinstance(db, numbers.Integral):
            raise TypeError("tensordot(): dims must be an int or a pair of lists of dims, got "
                            f"{dims!r}")
        da, db = list(da), list(db)
        if len(da) != len(db):
            raise RuntimeError("both dimension lists should have same length")
    from kiln.tensor import normalize_dim

    da = [normalize_dim(d, a.ndim, "tensordot") for d in da]
    db = [normalize_dim(d, b.ndim, "tensordot") for d in db]
    ta, tb = list(_LETTERS[: a.ndim]), list(_LETTERS[a.ndim: a.ndim + b.ndim])
    for i, j in zip(da, db):
        if a._data.shape[i] != b._data.shape[j]:
            raise RuntimeError(f"contracted dimensions need to match, but first has size "
                               f"{a._data.shape[i]} in dim {i} and second has size "
                               f"{b._data.shape[j]} in dim {j}")
        tb[j] = ta[i]
    out = [c for k, c in enumerate(ta) if k not in da] + [c for k, c in enumerate(tb)
                                                          if k not in db]
    if a._data.dtype != b._data.dtype:
        raise RuntimeError(f"expected scalar type {_SNAME[a.dtype.name]} but found "
                           f"{_SNAME[b.dtype.name]}")
    return _einsum2(a, b, equation="".join(ta) + "," + "".join(tb) + "->" + "".join(out))


def _rmatmul(self, other):
    return matmul(other, self)


TENSOR_METHODS = {
    "matmul": matmul, "__matmul__": matmul, "__rmatmul__": _rmatmul, "mm": mm, "bmm": bmm,
    "mv": mv, "dot": dot, "inner": inner, "outer": outer, "ger": outer, "addmm": addmm,
    "addmv": addmv, "baddbmm": baddbmm,
}
