"""Reductions: sum, mean, prod, amax/amin, max/min, argmax/argmin, var/std, logsumexp, cumsum/cumprod,
all/any, count_nonzero, norms, softmax and log_softmax."""

from __future__ import annotations

import builtins
import collections
import math
import numbers

import numpy as np

from kiln import dtypes, jit
from kiln.grad_mode import STATE
from kiln.ops.registry import primitive
from kiln.tensor import Tensor, _make, normalize_dim

__all__ = [
    "sum", "mean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std",
    "var_mean", "std_mean", "logsumexp", "cumsum", "cumprod", "all", "any", "count_nonzero",
    "norm", "softmax", "log_softmax",
]

# What max/min with a dim return, printed like torch.return_types.max.
max_result = collections.namedtuple("max", ["values", "indices"])
min_result = collections.namedtuple("min", ["values", "indices"])


def _ew():
    # elementwise imports this module (for sum_to), so it is imported where first needed
    from kiln.ops import elementwise

    return elementwise


# -- dims and shapes -----------------------------------------------------------------------------

def reduce_dims(dim, ndim: int, op: str) -> tuple:
    """Normalize ``dim`` (None, int or sequence; an empty sequence means all dims) to a sorted
    tuple of numpy axes, with PyTorch's IndexError and duplicate-dim RuntimeError."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, (tuple, list)):
        axes = [normalize_dim(d, ndim, op) for d in dim]
        if len(set(axes)) != len(axes):
            dup = next(a for a in axes if axes.count(a) > 1)
            raise RuntimeError(f"{op}: dim {dup} appears multiple times in the list of dims")
        if not axes:
            return tuple(range(ndim))
        return tuple(sorted(axes)) if ndim else ()
    axis = normalize_dim(dim, ndim, op)
    return (axis,) if ndim else ()


def _axis(dim, ndim: int, op: str):
    """A single ``dim`` as a numpy axis (``None`` for a 0-d tensor, which has no axis)."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}(): argument 'dim' must be int, not {type(dim).__name__}")
    axis = normalize_dim(dim, ndim, op)
    return axis if ndim else None


def _kept_shape(shape, axes) -> tuple:
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _reduced_shape(shape, axes, keepdims) -> tuple:
    if keepdims:
        return _kept_shape(shape, axes)
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def _count(shape, axes) -> int:
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def _kept(t: Tensor, shape, axes, keepdims) -> Tensor:
    """A reduced tensor (or its gradient) reshaped so it broadcasts against the input."""
    if keepdims or not axes:
        return t
    return t.reshape(_kept_shape(shape, axes))


def _reduce_infer(out_dtype=None):
    def infer(shapes, dts, axes, keepdims, **attrs):
        return _reduced_shape(shapes[0], axes, keepdims), out_dtype or dts[0]

    return infer


def _check_nonempty(input: Tensor, axes, dim, op: str, error=IndexError) -> None:
    """amax/max/argmax have no identity: reducing an empty dim is PyTorch's IndexError."""
    shape = input._data.shape
    if input._data.size:
        return
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        raise error(
            f"{op}(): Expected reduction dim to be specified for input.numel() == 0."
            + (" Specify the reduction dim with the 'dim' argument." if error is RuntimeError
               else "")
        )
    for a in axes:
        if shape[a] == 0:
            raise IndexError(f"{op}(): Expected reduction dim {a} to have non-zero size.")


def _dtype_name(t: Tensor) -> str:
    return t.dtype.name


def _to_int64(input: Tensor) -> Tensor:
    """Sums and products of bool and integer tensors are int64 in PyTorch."""
    if input._data.dtype.kind in "biu" and input._data.dtype != np.int64:
        return input.to(dtypes.int64)
    return input


def _all_finite(m: np.ndarray) -> bool:
    """Cheap test on a fresh (contiguous) array of row maxima: a BLAS dot is one call and, unlike
    a sum, cannot turn inf + -inf into a warning (a false alarm only takes the careful path)."""
    v = m.reshape(-1)
    return math.isfinite(np.dot(v, v))


def _extreme_along(x: np.ndarray, axes, keepdims, arg=np.argmax, ufunc=np.maximum):
    """``ufunc.reduce(x, axes)``.  numpy's max over short contiguous rows is several times
    slower than its SIMD argmax, so rows of up to 512 elements gather at the argmax instead (the
    same value, the first NaN included)."""
    nd = x.ndim
    if (len(axes) == 1 and axes[0] == nd - 1 and 0 < x.shape[-1] <= 512 and x.size
            and x.flags.c_contiguous and x.dtype.kind == "f"):
        n = x.shape[-1]
        i = arg(x, axis=-1).reshape(-1)
        i += np.arange(0, i.size * n, n)
        out = x.reshape(-1)[i]
        return out.reshape(x.shape[:-1] + (1,) if keepdims else x.shape[:-1])
    return ufunc.reduce(x, axis=axes, keepdims=keepdims)


def _const(value, dt) -> Tensor:
    return _make(np.array(value, dt))


# -- sum and mean --------------------------------------------------------------------------------

_ONES: dict = {}
_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _ones(n: int, dt) -> np.ndarray:
    o = _ONES.get((n, dt))
    if o is None:
        o = np.ones(n, dt)
        o.flags.writeable = False
        if len(_ONES) < 512:
            _ONES[n, dt] = o
    return o


def _sum_np(x, axes, keepdims):
    """``np.add.reduce``, except that a float sum over trailing (or leading) axes of a
    contiguous array is a BLAS matrix-vector product with ones: several times faster for the
    short rows of softmax, layer norm and bias gradients, and as accurate at these lengths."""
    nd, k = x.ndim, len(axes)
    if 0 < k < nd and x.dtype in _BLAS_FLOATS and x.flags.c_contiguous and x.size:
        shape = x.shape
        if axes[0] == nd - k and axes[-1] == nd - 1:
            kept = shape[:nd - k]
            n = _count(shape, axes)
            if n <= 8192:
                out = x.reshape(-1, n) @ _ones(n, x.dtype)
                return out.reshape(kept + (1,) * k if keepdims else kept)
        elif axes[0] == 0 and axes[-1] == k - 1:
            n = _count(shape, axes)
            if n <= 8192 and x.size >= 32 * n:  # tall, thin matrices are slower through BLAS
                out = _ones(n, x.dtype) @ x.reshape(n, -1)
                return out.reshape((1,) * k + shape[k:] if keepdims else shape[k:])
    # ufunc.reduce directly: np.sum's Python wrapper costs more than summing a small tensor
    return np.add.reduce(x, axis=axes, dtype=x.dtype, keepdims=keepdims)


@primitive("sum", traits={"reduce"})
def _sum(x, axes, keepdims):
    if x.dtype == np.float16:  # as PyTorch, sum halves in float
        return np.add.reduce(x, axis=axes, dtype=np.float32, keepdims=keepdims).astype(x.dtype)
    return _sum_np(x, axes, keepdims)


_sum.def_infer(_reduce_infer())


@_sum.def_vjp
def _sum_vjp(g, node):
    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    return (_kept(g, x.shape, axes, keepdims).expand(x.shape),)


def sum(input: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:  # noqa: A001
    """Sum over ``dim`` (all dims by default); bool and integer inputs sum as int64.

    >>> import kiln
    >>> kiln.tensor([[1., 2.], [3., 4.]]).sum(dim=0)
    tensor([4., 6.])
    """
    if dtype is not None:
        input = input.to(dtype)
    elif input._data.dtype.kind in "biu" and input._data.dtype != np.int64:
        input = input.to(dtypes.int64)
    axes = reduce_dims(dim, input._data.ndim, "sum")
    return _sum(input, axes=axes, keepdims=bool(keepdim))


def sum_to(g: Tensor, shape: tuple) -> Tensor:
    """Sum ``g`` down to ``shape`` (the reverse of broadcasting): gradients of broadcast inputs."""
    gshape = g._data.shape
    if gshape == tuple(shape):
        return g
    lead = len(gshape) - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and gshape[i + lead] != 1
    )
    out = _sum(g, axes=axes, keepdims=True) if axes else g
    return out.reshape(shape)


@primitive("mean", traits={"reduce"})
def _mean(x, axes, keepdims):
    return _mean_np(x, axes, keepdims)


def _mean_np(x, axes, keepdims):
    n = _count(x.shape, axes)
    if x.dtype == np.float16:  # as PyTorch, sum halves in float
        s, acc = np.add.reduce(x, axis=axes, dtype=np.float32, keepdims=keepdims), np.float32
    else:
        s, acc = _sum_np(x, axes, keepdims), x.dtype
    if not n:
        with np.errstate(invalid="ignore", divide="ignore"):  # the mean of nothing is nan
            return (s / n).astype(x.dtype)
    if type(s) is np.ndarray and acc == x.dtype:
        return np.true_divide(s, n, out=s)
    return (s / n).astype(x.dtype, copy=False)


_mean.def_infer(_reduce_infer())


@_mean.def_vjp
def _mean_vjp(g, node):
    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    n = _count(x.shape, axes)
    return ((_kept(g, x.shape, axes, keepdims) / builtins.max(n, 1)).expand(x.shape),)


def mean(input: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    """Arithmetic mean over ``dim`` (all dims by default); the input must be floating point.

    >>> import kiln
    >>> kiln.tensor([[1., 2.], [3., 5.]]).mean(1)
    tensor([1.5000, 4.0000])
    """
    if dtype is not None:
        d = dtypes.as_dtype(dtype)
        if not d.is_floating_point:
            raise RuntimeError("mean(): could not infer output dtype. Optional dtype must be "
                               f"either a floating point or complex dtype. Got: {d.name}")
        input = input.to(d)
    elif input._data.dtype.kind != "f":
        raise RuntimeError("mean(): could not infer output dtype. Input dtype must be either a "
                           f"floating point or complex dtype. Got: {_dtype_name(input)}")
    axes = reduce_dims(dim, input._data.ndim, "mean")
    return _mean(input, axes=axes, keepdims=bool(keepdim))


# -- cumulative sums and products ----------------------------------------------------------------

def _scan(accumulate, identity, x, axis, reverse, exclusive):
    """Inclusive or exclusive, forward or reverse scan along ``axis`` (ONNX CumSum's attributes;
    the exclusive reverse products give prod's gradient without dividing by zero)."""
    if x.ndim == 0:
        return np.full((), identity, x.dtype) if exclusive else x.copy()
    if reverse:
        x = np.flip(x, axis)
    if exclusive:
        out = np.empty(x.shape, x.dtype)
        head = [slice(None)] * x.ndim
        head[axis] = slice(0, 1)
        out[tuple(head)] = identity
        src, dst = list(head), list(head)
        src[axis], dst[axis] = slice(None, -1), slice(1, None)
        if x.shape[axis] > 1:
            accumulate(x[tuple(src)], axis=axis, dtype=x.dtype, out=out[tuple(dst)])
    else:
        out = accumulate(x, axis=axis, dtype=x.dtype)
    return np.flip(out, axis) if reverse else out


def _scan_infer(shapes, dts, **attrs):
    return shapes[0], dts[0]


@primitive("cumsum", traits={"reduce"})
def _cumsum(x, axis, reverse, exclusive):
    return _scan(np.add.accumulate, 0, x, axis, reverse, exclusive)


_cumsum.def_infer(_scan_infer)


@_cumsum.def_vjp
def _cumsum_vjp(g, node):
    a = node.attrs
    return (_cumsum(g, axis=a["axis"], reverse=not a["reverse"], exclusive=a["exclusive"]),)


@primitive("cumprod", traits={"reduce"}, save=(0,))
def _cumprod(x, axis, reverse, exclusive):
    return _scan(np.multiply.accumulate, 1, x, axis, reverse, exclusive)


_cumprod.def_infer(_scan_infer)


@_cumprod.def_vjp
def _cumprod_vjp(g, node):
    x = node.inputs[0]
    a = node.attrs
    axis, reverse, exclusive = a["axis"], a["reverse"], a["exclusive"]
    if STATE.grad_enabled and x.ndim:  # create_graph: this gradient is differentiated again
        return (_cumprod_grad_polynomial(g, x, axis, reverse, exclusive),)
    # d out_i / d x_k = prod_{j in scan(i), j != k} x_j.  With y = x where x != 0 else 1 and
    # Z = the running count of zeros, that product is scan(y)_i / y_k when the only zero in
    # scan(i) (if any) is x_k, else 0: two masked reverse scans, O(n), exact with zeros and
    # branch-free.  (Its own derivative ignores the masks, hence the form above.)
    ew = _ew()
    dt = x.dtype
    zero = ew.eq(x, _const(0, dt.np))
    y = ew.where(zero, _const(1, dt.np), x)
    zeros_seen = _cumsum(zero.to(dt), axis=axis, reverse=reverse, exclusive=exclusive)
    gy = g * _cumprod(y, axis=axis, reverse=reverse, exclusive=exclusive)
    back = {"axis": axis, "reverse": not reverse, "exclusive": exclusive}
    if_nonzero = _cumsum(gy * ew.eq(zeros_seen, _const(0, dt.np)).to(dt), **back)
    if_zero = _cumsum(gy * ew.eq(zeros_seen, _const(1, dt.np)).to(dt), **back)
    return (ew.where(zero, if_zero, if_nonzero) / y,)


def _cumprod_grad_polynomial(g, x, axis, reverse, exclusive):
    """The same gradient as a polynomial in x, O(n^2) along ``axis``: P[k, i] = scan of x with
    x_k replaced by 1, so grad_k = sum_i g_i P[k, i] [k in scan(i)].  Its derivatives are
    exact at zeros too (PyTorch also switches to an O(n^2) form under create_graph)."""
    ew = _ew()
    dt = x.dtype.np
    shape, n = x.shape, x.shape[axis]
    lead, rest = tuple(shape[:axis]), tuple(shape[axis + 1:])
    pair = (1,) * len(lead) + (n, n) + (1,) * len(rest)
    eye = _make(np.eye(n, dtype=bool).reshape(pair))
    m = ew.where(eye, _const(1, dt), x.reshape(lead + (1, n) + rest))
    p = _cumprod(m, axis=axis + 1, reverse=reverse, exclusive=exclusive)
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    if reverse:
        inside = k > i if exclusive else k >= i
    else:
        inside = k < i if exclusive else k <= i
    u = _make(inside.astype(dt).reshape(pair))
    return _sum(g.reshape(lead + (1, n) + rest) * p * u, axes=(axis + 1,), keepdims=False)


def _scan_op(prim, input, dim, dtype, op):
    if dtype is not None:
        input = input.to(dtype)
    else:
        input = _to_int64(input)
    axis = _axis(dim, input._data.ndim, op)
    return prim(input, axis=axis if axis is not None else 0, reverse=False, exclusive=False)


def cumsum(input: Tensor, dim: int, *, dtype=None) -> Tensor:
    """Running sum along ``dim``; bool and integer inputs give int64.

    >>> import kiln
    >>> kiln.tensor([1, 2, 3]).cumsum(0)
    tensor([1, 3, 6])
    """
    return _scan_op(_cumsum, input, dim, dtype, "cumsum")


def cumprod(input: Tensor, dim: int, *, dtype=None) -> Tensor:
    """Running product along ``dim`` (gradient exact with zeros in the input)."""
    return _scan_op(_cumprod, input, dim, dtype, "cumprod")


# -- prod ----------------------------------------------------------------------------------------

@primitive("prod", traits={"reduce"}, save=(0,))
def _prod(x, axis, keepdims):
    return np.multiply.reduce(x, axis=axis, dtype=x.dtype, keepdims=keepdims)


@_prod.def_infer
def _prod_infer(shapes, dts, axis, keepdims):
    axes = tuple(range(len(shapes[0]))) if axis is None else (axis,)
    return _reduced_shape(shapes[0], axes, keepdims), dts[0]


@_prod.def_vjp
def _prod_vjp(g, node):
    # d prod / d x_i = (product of the x_j before i) * (product of those after): no division,
    # so zeros in the input get PyTorch's gradient.
    x = node.inputs[0]
    axis, keepdims = node.attrs["axis"], node.attrs["keepdims"]
    if x.ndim == 0:
        return (g,)
    if axis is None:
        flat = x.reshape(-1)
        return (g * _products_of_others(flat, 0).reshape(x.shape),)
    return (_kept(g, x.shape, (axis,), keepdims) * _products_of_others(x, axis),)


def _products_of_others(x: Tensor, axis: int) -> Tensor:
    return (_cumprod(x, axis=axis, reverse=False, exclusive=True)
            * _cumprod(x, axis=axis, reverse=True, exclusive=True))


def prod(input: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    """Product of all elements, or along one ``dim``; bool and integer inputs give int64.

    >>> import kiln
    >>> kiln.tensor([[1., 2.], [3., 4.]]).prod(1)
    tensor([ 2., 12.])
    """
    if dtype is not None:
        input = input.to(dtype)
    else:
        input = _to_int64(input)
    if dim is None:
        return _prod(input, axis=None, keepdims=False)
    axis = _axis(dim, input._data.ndim, "prod")
    return _prod(input, axis=axis, keepdims=bool(keepdim) and axis is not None)


# -- amax, amin, max, min ------------------------------------------------------------------------

@primitive("amax", traits={"reduce"}, save=(0,), save_out=True)
def _amax(x, axes, keepdims):
    return _extreme_along(x, axes, keepdims)


@primitive("amin", traits={"reduce"}, save=(0,), save_out=True)
def _amin(x, axes, keepdims):
    return _extreme_along(x, axes, keepdims, np.argmin, np.minimum)


_amax.def_infer(_reduce_infer())
_amin.def_infer(_reduce_infer())


def _extremum_vjp(g, node):
    # PyTorch splits the gradient evenly among the elements equal to the extremum
    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    out = _kept(node.out, x.shape, axes, keepdims)
    mask = _ew().eq(x, out).to(x.dtype)
    count = _sum(mask, axes=axes, keepdims=True)
    return (_kept(g, x.shape, axes, keepdims) / count * mask,)


_amax.def_vjp(_extremum_vjp)
_amin.def_vjp(_extremum_vjp)


def amax(input: Tensor, dim=(), keepdim: bool = False) -> Tensor:
    """Maximum over ``dim`` (all dims by default); ties share the gradient evenly.

    >>> import kiln
    >>> kiln.tensor([[1., 5.], [3., 4.]]).amax(0)
    tensor([3., 5.])
    """
    return _extremum(_amax, input, dim, keepdim, "amax")


def amin(input: Tensor, dim=(), keepdim: bool = False) -> Tensor:
    """Minimum over ``dim`` (all dims by default); ties share the gradient evenly."""
    return _extremum(_amin, input, dim, keepdim, "amin")


def _extremum(prim, input, dim, keepdim, op):
    axes = reduce_dims(dim, input._data.ndim, op)
    if not input._data.size:
        _check_nonempty(input, axes, dim, op, RuntimeError)
    return prim(input, axes=axes, keepdims=bool(keepdim))


@primitive("argmax", traits={"reduce"})
def _argmax(x, axis, keepdims):
    return np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


@primitive("argmin", traits={"reduce"})
def _argmin(x, axis, keepdims):
    return np.argmin(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


_argmax.mark_not_differentiable("integer output")
_argmin.mark_not_differentiable("integer output")


def _arg_infer(shapes, dts, axis, keepdims):
    axes = tuple(range(len(shapes[0]))) if axis is None else (axis,)
    return _reduced_shape(shapes[0], axes, keepdims), np.dtype(np.int64)


_argmax.def_infer(_arg_infer)
_argmin.def_infer(_arg_infer)


def _arg(prim, input, dim, keepdim, op):
    if dim is None:
        axis = None
    else:
        axis = _axis(dim, input._data.ndim, op)
    if not input._data.size:
        _check_nonempty(input, (axis,) if axis is not None else (), dim, op)
    return prim(input, axis=axis, keepdims=bool(keepdim))


def argmax(input: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Index of the (first) maximum, in the flattened input when ``dim`` is None.

    >>> import kiln
    >>> kiln.tensor([[1., 5.], [3., 4.]]).argmax(1)
    tensor([1, 1])
    """
    return _arg(_argmax, input, dim, keepdim, "argmax")


def argmin(input: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Index of the (first) minimum, in the flattened input when ``dim`` is None."""
    return _arg(_argmin, input, dim, keepdim, "argmin")


@primitive("pick_along", traits={"index"}, save=(1,))
def _pick_along(x, index, axis, keepdims):
    """``x``'s values at ``index`` (one per slice along ``axis``): max/min values with a dim."""
    if axis == x.ndim - 1 and x.flags.c_contiguous and x.size:  # a flat gather is faster
        n = x.shape[-1]
        flat = index.reshape(-1) + np.arange(0, index.size * n, n)
        return x.reshape(-1)[flat].reshape(index.shape)
    if not keepdims:
        index = np.expand_dims(index, axis)
    out = np.take_along_axis(x, index, axis)
    return out if keepdims else np.squeeze(out, axis)


@_pick_along.def_infer
def _pick_along_infer(shapes, dts, axis, keepdims):
    return shapes[1], dts[0]


@_pick_along.def_vjp
def _pick_along_vjp(g, node):
    x, index = node.inputs
    a = node.attrs
    return (_put_along(g, index, axis=a["axis"], keepdims=a["keepdims"], shape=x.shape), None)


@primitive("put_along", traits={"index"}, save=(1,))
def _put_along(g, index, axis, keepdims, shape):
    """Zeros of ``shape`` with ``g`` at ``index`` along ``axis``: the adjoint of pick_along."""
    out = np.zeros(shape, g.dtype)
    if not keepdims:
        index, g = np.expand_dims(index, axis), np.expand_dims(g, axis)
    np.put_along_axis(out, index, g, axis)
    return out


@_put_along.def_infer
def _put_along_infer(shapes, dts, axis, keepdims, shape):
    return tuple(shape), dts[0]


@_put_along.def_vjp
def _put_along_vjp(g, node):
    a = node.attrs
    return (_pick_along(g, node.inputs[1], axis=a["axis"], keepdims=a["keepdims"]), None)


def _max_min(input, dim, keepdim, other, op):
    if isinstance(dim, Tensor) or other is not None:
        if other is None:
            other, dim = dim, None
        if dim is not None or keepdim is not None:
            raise TypeError(f"{op}(): the elementwise form takes (input, other) only")
        ew = _ew()
        return ew.maximum(input, other) if op == "max" else ew.minimum(input, other)
    if dim is None:
        if keepdim is not None:
            raise TypeError(f"{op}(): keepdim needs a dim")
        if not input._data.size:
            _check_nonempty(input, (), None, op, RuntimeError)
        return (_amax if op == "max" else _amin)(input, axes=tuple(range(input._data.ndim)),
                                                  keepdims=False)
    axis = _axis(dim, input._data.ndim, op)
    keepdim = bool(keepdim)
    if axis is None:  # a 0-d input: its only element, at index 0
        input, axis, keepdim = input.reshape(1), 0, False
    elif not input._data.size:
        _check_nonempty(input, (axis,), dim, op)
    index = (_argmax if op == "max" else _argmin)(input, axis=axis, keepdims=keepdim)
    values = _pick_along(input, index, axis=axis, keepdims=keepdim)
    return (max_result if op == "max" else min_result)(values, index)


def max(input: Tensor, dim=None, keepdim=None, *, other=None):  # noqa: A001
    """``max(x)``: the largest element; ``max(x, dim, keepdim=False)``: ``(values, indices)``
    along ``dim`` (the first index on ties, which alone receives the gradient);
    ``max(x, y)``: the elementwise maximum.

    >>> import kiln
    >>> kiln.tensor([[1., 5.], [3., 4.]]).max(1).indices
    tensor([1, 1])
    """
    return _max_min(input, dim, keepdim, other, "max")


def min(input: Tensor, dim=None, keepdim=None, *, other=None):  # noqa: A001
    """``min(x)``, ``min(x, dim, keepdim=False)`` -> ``(values, indices)``, or ``min(x, y)``."""
    return _max_min(input, dim, keepdim, other, "min")


# -- var and std ---------------------------------------------------------------------------------

def _var_np(x, axes, correction, keepdims):
    if x.ndim == 0:  # ufuncs give numpy scalars for 0-d arrays; work on one element instead
        return _var_np(x.reshape(1), (0,), correction, False).reshape(())
    if x.dtype == np.float16:  # as PyTorch, accumulate halves in float
        return _var_np(x.astype(np.float32), axes, correction, keepdims).astype(np.float16)
    dof = _count(x.shape, axes) - correction
    if dof > 0:
        return _squared_deviations(x, axes, keepdims) / x.dtype.type(dof)
    with np.errstate(divide="ignore", invalid="ignore"):  # PyTorch divides by 0, not by dof < 0
        return _squared_deviations(x, axes, keepdims) / x.dtype.type(0)


def _squared_deviations(x, axes, keepdims):
    """Sum of squared deviations from the mean: the two-pass algorithm, as np.var."""
    if not x.size:
        return np.add.reduce(x, axis=axes, keepdims=keepdims)
    d = x - _mean_np(x, axes, True)
    if len(axes) == x.ndim:  # everything: one dot product
        v = d.reshape(-1)
        out = np.dot(v, v)
        return out.reshape((1,) * x.ndim) if keepdims else out
    np.multiply(d, d, out=d)
    return _sum_np(d, axes, keepdims)


@primitive("var", traits={"reduce"}, save=(0,))
def _var(x, axes, correction, keepdims):
    return _var_np(x, axes, correction, keepdims)


@primitive("std", traits={"reduce"}, save=(0,), save_out=True)
def _std(x, axes, correction, keepdims):
    return np.sqrt(_var_np(x, axes, correction, keepdims))


_var.def_infer(_reduce_infer())
_std.def_infer(_reduce_infer())


def _var_backward(g, x, axes, correction):
    """PyTorch's var_backward; ``g`` already broadcasts against ``x``."""
    n = _count(x.shape, axes)
    dof = n - correction
    centered = x - _mean(x, axes=axes, keepdims=True)
    if dof <= 0 and len(axes) == x.ndim:
        # 2 / 0 is inf; inf * 0 where x equals the mean is nan, as in PyTorch
        ew = _ew()
        dt = x.dtype.np
        return g * ew.where(ew.eq(centered, _const(0, dt)), _const(math.nan, dt),
                            _const(math.inf, dt))
    scale = 2.0 / dof if dof else math.inf
    return scale * g * centered


@_var.def_vjp
def _var_vjp(g, node):
    x = node.inputs[0]
    a = node.attrs
    return (_var_backward(_kept(g, x.shape, a["axes"], a["keepdims"]), x, a["axes"],
                          a["correction"]),)


@_std.def_vjp
def _std_vjp(g, node):
    # d std = d var / (2 std), taken as 0 where std is 0 (PyTorch's choice for constant input)
    x = node.inputs[0]
    a = node.attrs
    out = _kept(node.out, x.shape, a["axes"], a["keepdims"])
    g = _kept(g, x.shape, a["axes"], a["keepdims"])
    g_var = _masked_div(g, out * 2, out)
    return (_var_backward(g_var, x, a["axes"], a["correction"]),)


def _masked_div(num: Tensor, den: Tensor, test: Tensor) -> Tensor:
    """``num / den``, and 0 where ``test`` is 0 (PyTorch's masked_fill_ of a subgradient).  The
    masked denominators become 1 first, so no inf * 0 appears, now or in double backward."""
    ew = _ew()
    dt = num.dtype.np
    zero = ew.eq(test, _const(0, dt))
    return ew.where(zero, _const(0, dt), num / ew.where(zero, _const(1, dt), den))


def _var_args(input, dim, unbiased, keepdim, correction, op):
    if isinstance(dim, bool):  # var(x, unbiased)
        dim, unbiased = None, dim
    if unbiased is not None and correction is not None:
        raise TypeError(f"{op}(): pass either unbiased or correction, not both")
    if correction is None:
        correction = 0 if unbiased is False else 1
    elif not isinstance(correction, numbers.Real):
        raise TypeError(f"{op}(): correction must be a number, got {type(correction).__name__}")
    if input._data.dtype.kind != "f":
        raise RuntimeError(f"{op}(): std and var only support floating point and complex dtypes "
                           f"(got {_dtype_name(input)})")
    axes = reduce_dims(dim, input._data.ndim, op)
    return {"axes": axes, "correction": float(correction), "keepdims": bool(keepdim)}


def var(input: Tensor, dim=None, unbiased=None, keepdim: bool = False, *,
        correction=None) -> Tensor:
    """Variance over ``dim`` with ``correction`` (1, Bessel's, by default; or ``unbiased=``).

    >>> import kiln
    >>> kiln.tensor([1., 2., 3., 4.]).var()
    tensor(1.6667)
    """
    return _var(input, **_var_args(input, dim, unbiased, keepdim, correction, "var"))


def std(input: Tensor, dim=None, unbiased=None, keepdim: bool = False, *,
        correction=None) -> Tensor:
    """Standard deviation: the square root of ``var`` (same arguments)."""
    return _std(input, **_var_args(input, dim, unbiased, keepdim, correction, "std"))


def var_mean(input: Tensor, dim=None, unbiased=None, keepdim: bool = False, *,
             correction=None):
    """``(var(input, ...), mean(input, ...))``."""
    a = _var_args(input, dim, unbiased, keepdim, correction, "var_mean")
    return _var(input, **a), _mean(input, axes=a["axes"], keepdims=a["keepdims"])


def std_mean(input: Tensor, dim=None, unbiased=None, keepdim: bool = False, *,
             correction=None):
    """``(std(input, ...), mean(input, ...))``."""
    a = _var_args(input, dim, unbiased, keepdim, correction, "std_mean")
    return _std(input, **a), _mean(input, axes=a["axes"], keepdims=a["keepdims"])


# -- logsumexp -----------------------------------------------------------------------------------

@primitive("logsumexp", traits={"reduce"}, save=(0,), save_out=True)
def _logsumexp(x, axes, keepdims):
    return _logsumexp_np(x, axes, keepdims)


def _logsumexp_np(x, axes, keepdims):
    if x.ndim == 0:
        return _logsumexp_np(x.reshape(1), (0,), False).reshape(())
    if not x.size:
        with np.errstate(divide="ignore"):
            return np.log(np.add.reduce(np.exp(x), axis=axes, keepdims=keepdims))
    m = _extreme_along(x, axes, True)
    if not _all_finite(m):
        # infinite maxima are replaced by 0, so rows of -inf give -inf (not nan) and a +inf
        # gives +inf, as in PyTorch; each row's sum of exps is otherwise >= 1 (no log(0))
        m[np.isinf(m)] = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            return _logsumexp_shifted(x, m, axes, keepdims)
    return _logsumexp_shifted(x, m, axes, keepdims)


def _logsumexp_shifted(x, m, axes, keepdims):
    e = np.subtract(x, m)
    np.exp(e, out=e)
    s = _sum_np(e, axes, True)
    np.log(s, out=s)
    s += m
    return s if keepdims else s.reshape(_reduced_shape(x.shape, axes, False))


_logsumexp.def_infer(_reduce_infer())


@_logsumexp.def_vjp
def _logsumexp_vjp(g, node):
    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    out = _kept(node.out, x.shape, axes, keepdims)
    return (_kept(g, x.shape, axes, keepdims) * (x - out).exp(),)


def logsumexp(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    """``log(sum(exp(input), dim))`` computed without overflow (integers become float).

    >>> import kiln
    >>> kiln.tensor([1000., 1000.]).logsumexp(0)
    tensor(1000.6932)
    """
    if input._data.dtype.kind != "f":
        input = input.to(dtypes.get_default_dtype())
    axes = reduce_dims(dim, input._data.ndim, "logsumexp")
    return _logsumexp(input, axes=axes, keepdims=bool(keepdim))


# -- all, any, count_nonzero ---------------------------------------------------------------------

@primitive("all", traits={"reduce"})
def _all(x, axes, keepdims):
    out = np.logical_and.reduce(x, axis=axes, dtype=np.bool_, keepdims=keepdims)
    return out.astype(np.uint8) if x.dtype == np.uint8 else out  # PyTorch keeps uint8


@primitive("any", traits={"reduce"})
def _any(x, axes, keepdims):
    out = np.logical_or.reduce(x, axis=axes, dtype=np.bool_, keepdims=keepdims)
    return out.astype(np.uint8) if x.dtype == np.uint8 else out


def _logical_infer(shapes, dts, axes, keepdims):
    dt = np.dtype(np.uint8) if dts[0] == np.uint8 else np.dtype(np.bool_)
    return _reduced_shape(shapes[0], axes, keepdims), dt


_all.def_infer(_logical_infer)
_any.def_infer(_logical_infer)
_all.mark_not_differentiable("boolean output")
_any.mark_not_differentiable("boolean output")


def _logical_dims(dim, input, op):
    if isinstance(dim, (tuple, list)) and not dim:
        return ()  # all/any with dim=[] reduce nothing, unlike sum (PyTorch)
    return reduce_dims(dim, input._data.ndim, op)


def all(input: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Whether every element (over ``dim``) is nonzero.

    >>> import kiln
    >>> kiln.tensor([[1, 0], [2, 3]]).all(1)
    tensor([False,  True])
    """
    return _all(input, axes=_logical_dims(dim, input, "all"), keepdims=bool(keepdim))


def any(input: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """Whether some element (over ``dim``) is nonzero."""
    return _any(input, axes=_logical_dims(dim, input, "any"), keepdims=bool(keepdim))


@primitive("count_nonzero", traits={"reduce"})
def _count_nonzero(x, axes):
    if not axes:
        return (x != 0).astype(np.int64)
    return np.asarray(np.count_nonzero(x, axis=axes), dtype=np.int64)


@_count_nonzero.def_infer
def _count_nonzero_infer(shapes, dts, axes):
    return _reduced_shape(shapes[0], axes, False), np.dtype(np.int64)


_count_nonzero.mark_not_differentiable("integer output")


def count_nonzero(input: Tensor, dim=None) -> Tensor:
    """Number of nonzero elements (over ``dim``), as int64."""
    return _count_nonzero(input, axes=reduce_dims(dim, input._data.ndim, "count_nonzero"))


# -- norms ---------------------------------------------------------------------------------------

@primitive("norm", traits={"reduce"}, save=(0,), save_out=True)
def _norm(x, ord, axes, keepdims):
    if ord == 2:
        if len(axes) == x.ndim and x.flags.c_contiguous:  # the whole tensor: one BLAS dot
            v = x.reshape(-1)
            out = np.sqrt(np.dot(v, v))
            return out.reshape((1,) * x.ndim) if keepdims else out
        return np.sqrt(_sum_np(np.square(x), axes, keepdims))
    if x.ndim == 0:
        return _norm.impl(x.reshape(1), ord, (0,), False).reshape(())
    a = np.abs(x)
    if ord == 1:
        return _sum_np(a, axes, keepdims)
    if ord == math.inf:
        return np.amax(a, axis=axes, keepdims=keepdims)
    if ord == -math.inf:
        return np.amin(a, axis=axes, keepdims=keepdims)
    if ord == 0:
        return np.sum(a != 0, axis=axes, keepdims=keepdims, dtype=x.dtype)
    with np.errstate(divide="ignore"):
        return np.power(_sum_np(np.power(a, ord), axes, keepdims), 1.0 / ord)


@_norm.def_infer
def _norm_infer(shapes, dts, ord, axes, keepdims):
    return _reduced_shape(shapes[0], axes, keepdims), dts[0]


@_norm.def_vjp
def _norm_vjp(g, node):
    # PyTorch's norm_backward, case by case (subgradient 0 at the zero vector)
    x = node.inputs[0]
    a = node.attrs
    p, axes = a["ord"], a["axes"]
    g = _kept(g, x.shape, axes, a["keepdims"])
    out = _kept(node.out, x.shape, axes, a["keepdims"])
    ew = _ew()
    dt = x.dtype.np
    zero = _const(0, dt)
    if p == 0:
        return (g * zero.expand(x.shape),)
    if p == 1:
        return (ew.sign(x) * g,)
    if p == 2:
        return (x * _masked_div(g, out, out),)
    if math.isinf(p):
        ax = ew.abs(x)
        mask = ew.eq(ax, out).to(x.dtype) + ew.isnan(ax).to(x.dtype)
        return (ew.sign(x) * (g / _sum(mask, axes=axes, keepdims=True) * mask),)
    if p < 1:  # |x|^(p-1) is infinite at 0, where PyTorch takes 0
        x_zero = ew.eq(x, zero)
        safe = ew.where(x_zero, _const(1, dt), ew.abs(x))
        scaled = ew.sign(x) * ew.where(x_zero, zero, ew.pow(safe, p - 1))
        return (scaled * g * ew.pow(out, 1 - p),)
    if p < 2:
        scaled = ew.sign(x) * ew.pow(ew.abs(x), p - 1)
    else:
        scaled = x * ew.pow(ew.abs(x), p - 2)
    return (scaled * _masked_div(g, ew.pow(out, p - 1), out),)


def vector_norm(x: Tensor, ord=2, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    """``torch.linalg.vector_norm``: the ``ord``-norm of ``x`` over ``dim`` (all by default).

    >>> import kiln
    >>> from kiln.ops.reduce import vector_norm
    >>> vector_norm(kiln.tensor([3., 4.]))
    tensor(5.)
    """
    if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
        raise TypeError(f"linalg.vector_norm(): argument 'ord' must be a number, not "
                        f"{type(ord).__name__}")
    if x._data.dtype.kind != "f":
        raise RuntimeError("linalg.vector_norm: Expected a floating point or complex tensor as "
                           f"input. Got {_dtype_name(x)}")
    if dtype is not None:
        d = dtypes.as_dtype(dtype)
        if not d.is_floating_point:
            raise RuntimeError("linalg.vector_norm: dtype should be floating point or complex, "
                               f"but got {d.name}")
        if d.itemsize < x._data.dtype.itemsize:
            raise RuntimeError(f"linalg.vector_norm: the dtype of the input ({_dtype_name(x)}) "
                               f"should be convertible without narrowing to the specified "
                               f"dtype ({d.name})")
        x = x.to(d)
    ord = float(ord)
    axes = reduce_dims(dim, x._data.ndim, "linalg.vector_norm")
    if (ord < 0 or ord == math.inf) and not x._data.size:
        shape = x._data.shape
        for ax in axes if dim is not None else range(len(shape)):
            if shape[ax] == 0:
                raise RuntimeError(
                    f"linalg.vector_norm cannot compute the {ord:g} norm on the dimension {ax} "
                    "because this dimension is empty and the operation does not have an identity"
                )
    return _norm(x, ord=ord, axes=axes, keepdims=bool(keepdim))


def norm(input: Tensor, p="fro", dim=None, keepdim: bool = False, dtype=None) -> Tensor:
    """``torch.norm``: a vector norm (``p`` a number; ``'fro'``, the default, is the 2-norm)
    over ``dim``, all elements by default.

    >>> import kiln
    >>> kiln.tensor([[3., 4.], [0., 0.]]).norm(dim=1)
    tensor([5., 0.])
    """
    if p is None or isinstance(p, str):
        if p not in (None, "fro"):
            if p == "nuc":
                raise NotImplementedError("norm: the nuclear norm (p='nuc') is not implemented "
                                          "in kiln")
            raise RuntimeError(f"linalg.matrix_norm: Order {p} not supported.")
        if isinstance(dim, (tuple, list)) and len(dim) > 2:
            raise RuntimeError(f"linalg.matrix_norm: dim must be a 2-tuple. Got "
                               f"{' '.join(str(d) for d in dim)}")
        p = 2
    return vector_norm(input, p, dim, keepdim, dtype=dtype)


# -- softmax and log_softmax ---------------------------------------------------------------------

# Over the last axis of a contiguous float array, softmax shifts by the global maximum M (one
# fast reduction) instead of each row's max: numpy's max over short rows is slow (the 4096
# rows of 64 of gpt attention: 12x the global max) and subtracting a scalar beats subtracting a
# broadcast column.  Rounding x - M = log(y s) (y the output, s the row's sum of exp(x - M))
# costs y a relative error of up to ulp(|log y| + |log s|) / 2, so rows keep the result only
# when s >= exp(-_SOFTMAX_SPREAD): then outputs above 1e-3 are within 4.8e-7 (float32)
# relative, about float32 exp's own error.  The other rows (far below the global max, or all
# -inf) are redone with their own max.
_SOFTMAX_SPREAD = 8.0
_SOFTMAX_MIN_SUM = math.exp(-_SOFTMAX_SPREAD)
_FAST_SOFTMAX = (np.dtype(np.float32), np.dtype(np.float64))


def _softmax_last(x: np.ndarray):
    """Softmax over the last axis through the global max (float32: kiln.jit's row kernel when
    available), or None when it does not apply."""
    if x.dtype == np.float32 and jit.available():
        from kiln.jit import rows
        y = rows.softmax(np.ascontiguousarray(x))
        if y is not None:
            return y
    if x.dtype not in _FAST_SOFTMAX or not x.flags.c_contiguous or x.shape[-1] > 8192:
        return None
    m = np.maximum.reduce(x, axis=None)
    if not math.isfinite(m):  # +inf or NaN somewhere, or everything -inf
        return None
    n = x.shape[-1]
    e = np.subtract(x, m)
    np.exp(e, out=e)
    s = _sum_np(e, (x.ndim - 1,), True)
    far = s < _SOFTMAX_MIN_SUM
    with np.errstate(divide="ignore", invalid="ignore"):
        e *= np.reciprocal(s, out=s)
    if far.any():
        rows = np.flatnonzero(far)
        e2 = e.reshape(-1, n)
        e2[rows] = _softmax_rowwise(x.reshape(-1, n)[rows], 1)
    return e


@primitive("softmax", traits={"reduce"}, save_out=True)
def _softmax(x, axis):
    if x.ndim == 0 or not x.size:
        with np.errstate(invalid="ignore"):
            return _softmax_edge(x, np.exp(np.subtract(x, x)))
    if axis == x.ndim - 1:
        y = _softmax_last(x)
        if y is not None:
            return y
    return _softmax_rowwise(x, axis)


def _softmax_rowwise(x, axis):
    m = _extreme_along(x, (axis,), True)
    if not _all_finite(m):
        with np.errstate(invalid="ignore"):  # a row of -inf, or a +inf: nan, as in PyTorch
            return _softmax_shifted(x, m, axis)
    return _softmax_shifted(x, m, axis)


def _softmax_shifted(x, m, axis):
    # one max, one exp and one sum, in place on the only temporary
    e = np.subtract(x, m)
    np.exp(e, out=e)
    s = _sum_np(e, (axis,), True)
    e *= np.reciprocal(s, out=s)  # one division per row, as PyTorch's kernel does
    return e


@primitive("log_softmax", traits={"reduce"}, save_out=True)
def _log_softmax(x, axis):
    if x.ndim == 0 or not x.size:
        with np.errstate(invalid="ignore"):
            return _softmax_edge(x, np.subtract(x, x))
    if axis == x.ndim - 1 and x.dtype == np.float32 and jit.available():
        from kiln.jit import rows
        y = rows.softmax(np.ascontiguousarray(x), log=True)
        if y is not None:
            return y
    m = _extreme_along(x, (axis,), True)
    if not _all_finite(m):
        with np.errstate(invalid="ignore"):
            return _log_softmax_shifted(x, m, axis)
    return _log_softmax_shifted(x, m, axis)


def _log_softmax_shifted(x, m, axis):
    shifted = np.subtract(x, m)
    s = _sum_np(np.exp(shifted), (axis,), True)
    np.log(s, out=s)  # s >= 1: the row maximum contributes exp(0)
    shifted -= s
    return shifted


def _softmax_edge(x, out):
    """Empty and 0-d inputs: softmax 1 and log_softmax 0 (nan for a nan or infinite x)."""
    return np.asarray(out, dtype=x.dtype).reshape(x.shape)


_softmax.def_infer(_scan_infer)
_log_softmax.def_infer(_scan_infer)


def _axes_of(t: Tensor, axis) -> tuple:
    return (axis,) if t.ndim else ()


@_softmax.def_vjp
def _softmax_vjp(g, node):
    return (_softmax_backward(g, node.out, axis=node.attrs["axis"]),)


@_log_softmax.def_vjp
def _log_softmax_vjp(g, node):
    y = node.out
    axes = _axes_of(y, node.attrs["axis"])
    return (g - y.exp() * _sum(g, axes=axes, keepdims=True),)


# softmax's gradient as one primitive: four numpy passes (the composition the VJP used to
# dispatch, with the same values), or one native pass over each row of float32 last-axis rows.

@primitive("softmax_backward", save=(0, 1))
def _softmax_backward(g, y, axis):
    """``y * (g - sum(g * y, axis))``: softmax's gradient from its output ``y``."""
    if axis == y.ndim - 1 and y.dtype == np.float32 and jit.available():
        from kiln.jit import rows
        out = rows.softmax_backward(g, y)
        if out is not None:
            return out
    gy = np.asarray(np.multiply(g, y))  # 0-d: an array, not a numpy scalar
    s = _sum.impl(gy, axes=(axis,) if y.ndim else (), keepdims=True)
    np.subtract(g, s, out=gy)
    gy *= y
    return gy


_softmax_backward.def_infer(_scan_infer)


@_softmax_backward.def_vjp
def _softmax_backward_vjp(h, node):
    # out = y (g - s), s = sum(g y): d/dg is softmax_backward(h, y) (the Jacobian is
    # symmetric); d/dy = h (g - s) - g sum(h y)
    g, y = node.inputs
    axis = node.attrs["axis"]
    axes = _axes_of(y, axis)
    n_g, n_y = node.needs
    gg = _softmax_backward(h, y, axis=axis) if n_g else None
    gy = None
    if n_y:
        gy = (h * (g - _sum(g * y, axes=axes, keepdims=True))
              - g * _sum(h * y, axes=axes, keepdims=True))
    return gg, gy


def _softmax_op(prim, input, dim, dtype, op):
    if dtype is not None:
        input = input.to(dtype)
    if input._data.dtype.kind != "f":
        raise NotImplementedError(f"{op}(): not implemented for {_dtype_name(input)} "
                                  "(pass a floating dtype, or dtype=kiln.float32)")
    axis = _axis(dim, input._data.ndim, op)
    return prim(input, axis=axis if axis is not None else 0)


def softmax(input: Tensor, dim: int, dtype=None) -> Tensor:
    """``exp(x) / sum(exp(x), dim)``, stable for large logits; ``-inf`` entries get 0.

    >>> import kiln
    >>> kiln.tensor([0., 0., float("-inf")]).softmax(0)
    tensor([0.5000, 0.5000, 0.0000])
    """
    return _softmax_op(_softmax, input, dim, dtype, "softmax")


def log_softmax(input: Tensor, dim: int, dtype=None) -> Tensor:
    """``x - logsumexp(x, dim)``, computed stably in one pass."""
    return _softmax_op(_log_softmax, input, dim, dtype, "log_softmax")


TENSOR_METHODS = {
    "sum": sum, "mean": mean, "prod": prod, "amax": amax, "amin": amin, "max": max, "min": min,
    "argmax": argmax, "argmin": argmin, "var": var, "std": std, "logsumexp": logsumexp,
    "cumsum": cumsum, "cumprod": cumprod, "all": all, "any": any,
    "count_nonzero": count_nonzero, "norm": norm, "softmax": softmax,
    "log_softmax": log_softmax,
}
