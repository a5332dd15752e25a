"""Indexing ops: getitem/setitem, gather/scatter, index_select/index_add, sort/topk, nonzero,
one_hot, embedding and multinomial, with PyTorch's semantics."""

from __future__ import annotations

import numbers
from collections import namedtuple

import numpy as np

from kiln import jit
from kiln.dispatch import apply_inplace
from kiln.grad_mode import STATE
from kiln.ops.elementwise import cast, clone, mul
from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor, _concrete, _make, normalize_dim

__all__ = ["argsort", "argwhere", "gather", "index_add", "index_fill", "index_put", "index_select",
           "masked_select", "multinomial", "nonzero", "scatter", "scatter_add", "sort", "take",
           "take_along_dim", "topk"]

# ``one_hot`` and ``embedding`` are functional ops (torch.nn.functional); ``kiln.embedding``
# is not exported because ``torch.embedding`` takes its arguments in the other order.

sort_result = namedtuple("sort", ("values", "indices"))
topk_result = namedtuple("topk", ("values", "indices"))

_I64 = np.dtype(np.int64)
_MAX = np.maximum.reduce


# -- index attributes ---------------------------------------------------------------------------

class Slice(tuple):
    """A normalized ``start:stop:step`` (concrete, step > 0) that can live in hashable attrs.

    Python 3.11's ``slice`` is unhashable, and the graph compiler keys on attrs.
    """

    __slots__ = ()

    def __new__(cls, start: int, stop: int, step: int):
        return tuple.__new__(cls, (start, stop, step))

    def __getnewargs__(self):
        return tuple(self)

    def __repr__(self) -> str:
        start, stop, step = self
        return f"{start}:{stop}" if step == 1 else f"{start}:{stop}:{step}"


_SLICES: dict = {}


def _slice(start: int, stop: int, step: int) -> Slice:
    """An interned Slice (building a tuple subclass costs more than a dict lookup)."""
    k = (start, stop, step)
    s = _SLICES.get(k)
    if s is None:
        if len(_SLICES) > 4096:
            _SLICES.clear()
        s = _SLICES[k] = Slice(start, stop, step)
    return s


_NPKEYS: dict = {}


def _npkey(index: tuple) -> tuple:
    """The numpy key of a normalized basic index.  The trailing Ellipsis makes numpy return a
    0-d view (not a scalar copy) when every dimension is indexed by an int."""
    key = _NPKEYS.get(index)
    if key is None:
        key = tuple([slice(*i) if type(i) is Slice else i for i in index]) + (Ellipsis,)
        if len(_NPKEYS) > 4096:
            _NPKEYS.clear()
        _NPKEYS[index] = key
    return key


def _adv_key(indices: np.ndarray, dims: tuple) -> tuple:
    """numpy key applying the stacked index arrays ``indices[k]`` at dimension ``dims[k]``."""
    key = [slice(None)] * (dims[-1] + 1)
    for k, d in enumerate(dims):
        key[d] = indices[k]
    return tuple(key)


def _zeros(shape, dt) -> Tensor:
    """A zero constant of ``shape`` that costs no memory (zero strides); impls copy it."""
    return _make(np.broadcast_to(np.zeros((), dt), tuple(shape)))


_NO_INDICES = np.empty((0,), np.int64)  # stand-in for index_put's indices when there are none


def _no_indices() -> Tensor:
    return _make(_NO_INDICES)


# While kiln.compile traces, an index tensor may be a graph value: everything derived from it
# must go through primitives (a numpy copy would freeze its trace-time value into the graph).
# Bounds are still checked on the trace-time values, with eager's errors.

def _wrap_neg(t: Tensor, n: int) -> Tensor:
    """Negative int64 indices counted from the end of a dimension of size ``n`` (traced)."""
    from kiln.ops.elementwise import where

    return where(t < 0, t + n, t)


def _as_row(idx: Tensor) -> Tensor:
    """A vector index as the (1, k) stacked form the index primitives take."""
    if STATE.tracer is not None:
        return idx.reshape(1, -1)
    return _make(idx._data.reshape(1, -1))


# -- primitives: basic indexing (a view), advanced indexing (a copy), index_put -----------------

@primitive("index_view", traits={"view", "index"})
def _index_view(x, index):
    return x[_npkey(index)]


@_index_view.def_vjp
def _index_view_vjp(g, node):
    index = node.attrs["index"]
    if not index:
        return (g,)
    return (_index_view_backward(g, shape=node.inputs[0]._data.shape, index=index),)


@primitive("index_view_backward", traits={"index"})
def _index_view_backward(g, shape, index):
    """The adjoint of index_view: ``g`` written into zeros of ``shape`` at ``index`` (a
    dedicated primitive: zeros plus one strided write, cheaper than a general index_put)."""
    out = np.zeros(shape, g.dtype)
    out[_npkey(index)] = g
    return out


def _index_view_grad_into(acc, g, node):
    """The index_view VJP added straight into the input's gradient: one write of the viewed
    region instead of a zero-filled full-size array and a full-size add (a split's pieces)."""
    key = _npkey(node.attrs["index"])
    if acc is None:
        acc = np.zeros(node.inputs[0]._data.shape, g.dtype)
        acc[key] = g
    else:
        acc[key] += g
    return acc


_index_view.grad_into = _index_view_grad_into


@_index_view_backward.def_infer
def _index_view_backward_infer(shapes, dts, shape, index):
    return tuple(shape), dts[0]


@_index_view_backward.def_vjp
def _index_view_backward_vjp(gg, node):
    return (_index_view(gg, index=node.attrs["index"]),)


def _take(x, indices, dims):
    if len(dims) == 1:
        return np.take(x, indices[0], axis=dims[0])
    return x[_adv_key(indices, dims)]


@primitive("index", traits={"index"}, save=(1,))
def _index(x, indices, dims):
    return _take(x, indices, dims)


@_index.def_infer
def _index_infer(shapes, dts, dims):
    return _adv_shape(shapes[0], shapes[1][1:], dims), dts[0]


@_index.def_vjp
def _index_vjp(g, node):
    x, indices = node.inputs
    if not node.needs[0]:
        return (None, None)
    zeros = _zeros(x._data.shape, g._data.dtype)
    return (_index_put(zeros, g, indices, index=(), dims=node.attrs["dims"], accumulate=True),
            None)


def _rows_add(out, rows, vals) -> None:
    """``out[rows] += vals`` with repeated rows accumulating.  A plain fancy write handles the
    first hit of each row (fast); ``np.add.at`` (slow) only the repeats."""
    if rows.size == 0 or out.size == 0:
        return
    vals = np.broadcast_to(vals, rows.shape + out.shape[1:]).reshape(
        (rows.size,) + out.shape[1:])
    rows = rows.reshape(-1)
    if out.ndim >= 2 and out.dtype == np.float32 and jit.available() and _native_rows_add(
            out, rows, vals):
        return
    uniq, first = np.unique(rows, return_index=True)
    if uniq.size == rows.size:
        out[rows] += vals
    elif out.ndim == 1 and out.dtype.kind == "f":
        out += np.bincount(rows, vals, minlength=out.shape[0]).astype(out.dtype, copy=False)
    elif uniq.size * 4 < rows.size:  # mostly repeats: splitting gains nothing
        np.add.at(out, rows, vals)
    else:
        out[uniq] += vals[first]
        rest = np.ones(rows.size, bool)
        rest[first] = False
        np.add.at(out, rows[rest], vals[rest])


def _native_rows_add(out, rows, vals) -> bool:
    """_rows_add by kiln.jit's scatter loop (bitwise equal to np.add.at); False when it does
    not apply (strided out, rows out of range: numpy raises the IndexError)."""
    R = out.shape[0]
    if not out.flags.c_contiguous or rows.dtype.kind not in "iu" or np.may_share_memory(out, vals):
        return False
    lo, hi = int(rows.min()), int(rows.max())
    if lo < -R or hi >= R:
        return False
    rows = rows.astype(np.int64)
    if lo < 0:
        rows = np.where(rows < 0, rows + R, rows)
    from kiln.jit import scatter

    return scatter.rows_add(out.reshape(R, -1), rows,
                            np.ascontiguousarray(vals.reshape(rows.size, -1)))


def _index_put_impl(x, values, indices, index, dims, accumulate):
    out = np.array(x)  # also makes zero-stride constants writable
    view = out[_npkey(index)] if index else out
    if not dims:
        if accumulate:
            view += values
        else:
            view[...] = values
    elif not accumulate:
        view[_adv_key(indices, dims)] = values
    elif dims == (0,) and view.ndim >= 1:
        _rows_add(view, indices[0], values)
    else:
        np.add.at(view, _adv_key(indices, dims), values)
    return out


@primitive("index_put", traits={"index"}, save=(2,))
def _index_put(x, values, indices, index, dims, accumulate):
    return _index_put_impl(x, values, indices, index, dims, accumulate)


@_index_put.def_infer
def _index_put_infer(shapes, dts, index, dims, accumulate):
    return shapes[0], dts[0]


def _region(g: Tensor, indices: Tensor, index: tuple, dims: tuple) -> Tensor:
    """``g`` read at the positions an index_put with these attrs writes."""
    if index:
        g = _index_view(g, index=index)
    if dims:
        g = _index(g, indices, dims=dims)
    return g


@_index_put.def_vjp
def _index_put_vjp(g, node):
    _, values, indices = node.inputs
    index, dims, acc = node.attrs["index"], node.attrs["dims"], node.attrs["accumulate"]
    gx = gv = None
    if node.needs[0]:
        gx = g if acc else _index_put(g, _zeros((), g._data.dtype), indices, index=index,
                                      dims=dims, accumulate=False)
    if node.needs[1]:
        gv = sum_to(_region(g, indices, index, dims), values._data.shape)
    return (gx, gv, None)


# -- parsing an index -----------------------------------------------------------------------------

def _seq_as_tuple(seq) -> bool:
    """PyTorch's (deprecated) rule: a short list holding slices, None, Ellipsis, tensors or
    sequences indexes several dimensions, like a tuple."""
    if len(seq) >= 32:
        return False
    for s in seq:
        if s is None or s is Ellipsis or isinstance(s, (slice, Tensor, list, tuple, np.ndarray)):
            return True
    return False


_BAD_TENSOR = "tensors used as indices must be long, int, byte or bool tensors"


def _array_item(a: np.ndarray, what):
    """Classify an array index: ('int', i), ('bool', b), ('arr', int64 array), ('mask', a)."""
    kind = a.dtype.kind
    if kind == "b" or a.dtype == np.uint8:
        if a.ndim == 0:
            return ("bool", bool(a))
        return ("mask", a.astype(bool, copy=False))
    if kind in "iu" and (a.dtype.itemsize >= 4 or what is list):
        if a.ndim == 0 and what is not list:
            return ("int", int(a))
        return ("arr", a.astype(_I64, copy=False))
    if what is list and a.size == 0:
        return ("arr", a.astype(_I64))
    raise IndexError(_BAD_TENSOR)


def _classify(k):
    if k is None:
        return ("none", None)
    if k is Ellipsis:
        return ("ellipsis", None)
    if isinstance(k, (bool, np.bool_)):
        return ("bool", bool(k))
    if isinstance(k, numbers.Integral):
        return ("int", int(k))
    if isinstance(k, slice):
        return ("slice", k)
    if isinstance(k, Tensor):
        if STATE.tracer is not None:
            kind = k._data.dtype.kind
            if kind in "iu" and k._data.dtype.itemsize >= 4:
                return ("tarr", k)
            if kind == "b" or k._data.dtype == np.uint8:
                _concrete(k, "indexing with a boolean mask (the result's shape depends on the "
                             "values of the mask)")
        return _array_item(k._data, Tensor)
    if isinstance(k, np.ndarray):
        return _array_item(k, np.ndarray)
    if isinstance(k, (list, tuple)):
        if STATE.tracer is not None:
            for x in k:
                if isinstance(x, Tensor):
                    _concrete(x, "indexing with a list of tensors (the index depends on the "
                                 "values of the tensors)")
        try:
            a = np.asarray([x._data if isinstance(x, Tensor) else x for x in k])
        except ValueError:
            raise IndexError("index lists must be rectangular") from None
        return _array_item(a, list)
    raise IndexError(
        "only integers, slices (`:`), ellipsis (`...`), None and long or byte Variables are "
        f"valid indices (got {type(k).__name__})"
    )


def _bounds(arr: np.ndarray, n: int, dim: int, exc=IndexError, op: str = "") -> np.ndarray:
    """Check integer indices against a dimension of size ``n``; negatives count from the end."""
    if arr.size == 0 or _MAX(arr.view(np.uint64), axis=None) < n:  # negatives wrap to huge
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if hi >= n or lo < -n:
        bad = hi if hi >= n else lo
        raise exc(f"{op}index {bad} is out of bounds for dimension {dim} with size {n}")
    return np.where(arr < 0, arr + n, arr)


def _parse_basic(shape: tuple, key: tuple):
    """Fast path of ``_parse`` for keys of ints, slices, None and one Ellipsis (None when the
    key holds anything else: the general parser handles it and its errors)."""
    if len(key) > len(shape) + 1:
        return None
    index = []
    din = 0
    ellipsis = False
    for k in key:
        t = type(k)
        if k is Ellipsis:
            if ellipsis:
                return None
            ellipsis = True
            # every item before it is an int, slice or None, so index() meets no tensor
            rest = 0
            for k2 in key[key.index(Ellipsis) + 1:]:
                t2 = type(k2)
                if t2 is int or t2 is slice:
                    rest += 1
            fill = len(shape) - din - rest
            if fill < 0:
                return None
            for _ in range(fill):
                index.append(_slice(0, shape[din], 1))
                din += 1
            continue
        if t is slice:
            if k.step is not None and (type(k.step) is not int or k.step <= 0):
                return None
            if din == len(shape):
                return None
            index.append(_slice(*k.indices(shape[din])))
            din += 1
        elif t is int:
            if din == len(shape):
                return None
            n = shape[din]
            if k >= n or k < -n:
                raise IndexError(f"index {k} is out of bounds for dimension {din} with size {n}")
            index.append(k % n)
            din += 1
        elif k is None:
            index.append(None)
        else:
            return None
    while index and type(index[-1]) is Slice and index[-1] == (0, shape[din - 1], 1):
        index.pop()
        din -= 1
    return tuple(index)


def _parse_fast(shape: tuple, key):
    """``_parse`` for the common keys (an int, basic tuples, an int64 tensor, a list of ints);
    None for the others."""
    tk = type(key)
    if tk is tuple or tk is slice or tk is int:
        index = _parse_basic(shape, key if tk is tuple else (key,))
        return None if index is None else (index, (), None)
    if not shape:
        return None
    if tk is Tensor:
        a = key._data
        if a.dtype != _I64 or not a.ndim:
            return None
    elif tk is list and key and all(type(k) is int for k in key):
        a = np.array(key, _I64)
    else:
        return None
    checked = _bounds(a, shape[0], 0)
    if STATE.tracer is not None and tk is Tensor:
        return (), (0,), _wrap_neg(key, shape[0]).reshape((1,) + a.shape)
    indices = _make(checked[None])
    if checked is a and tk is Tensor:  # a view of the user's index: share its version counter
        indices._version = key._version
    return (), (0,), indices


def _parse(shape: tuple, key):
    """Split an index into a basic part (ints, slices, None: a view) and advanced parts.

    Returns ``(index, dims, arrays)``: ``index`` is the normalized basic index (hashable attrs),
    ``arrays`` the int64 index arrays (negatives resolved) applied to the basic view's
    dimensions ``dims``.  PyTorch applies ints as selections first, then the tensor indices,
    with numpy's rule for where the indexed dimensions land.
    """
    if type(key) is not tuple:
        key = tuple(key) if isinstance(key, list) and _seq_as_tuple(key) else (key,)
    items = [_classify(k) for k in key]
    if any(k in ("tarr", "arr", "mask") and np.ndim(v if k != "tarr" else v._data)
           for k, v in items):
        # a 0-d index tensor selects like an int (first), which places the other advanced
        # dimensions differently from one joint advanced index: read it as an int
        items = [("int", _concrete(v, "indexing with a 0-d index tensor together with other "
                                      "index tensors (the result's layout depends on the "
                                      "values)") or int(v._data))
                 if k == "tarr" and not v._data.ndim else (k, v) for k, v in items]
    ndim = len(shape)
    used = 0
    n_ellipsis = 0
    for kind, v in items:
        if kind in ("int", "slice", "arr", "tarr"):
            used += 1
        elif kind == "mask":
            used += v.ndim
        elif kind == "ellipsis":
            n_ellipsis += 1
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if used > ndim:
        if ndim == 0 and items and items[0][0] == "int":
            raise IndexError(
                "invalid index of a 0-dim tensor. Use `tensor.item()` in Python or "
                "`tensor.item<T>()` in C++ to convert a 0-dim tensor to a number"
            )
        raise IndexError(f"too many indices for tensor of dimension {ndim}")
    index: list = []
    adv: list = []  # (view dim, int64 array, from a True scalar)
    din = dout = 0
    for kind, v in items:
        if kind == "none":
            index.append(None)
            dout += 1
        elif kind == "bool":
            index.append(None)
            adv.append((dout, np.zeros(1 if v else 0, _I64), v))
            dout += 1
        elif kind == "int":
            n = shape[din]
            if v >= n or v < -n:
                raise IndexError(f"index {v} is out of bounds for dimension {din} with size {n}")
            index.append(v % n)
            din += 1
        elif kind == "slice":
            if v.step is not None:
                step = v.step.__index__()
                if step == 0:
                    raise ValueError("slice step cannot be zero")
                if step < 0:
                    raise ValueError("step must be greater than zero")
            index.append(_slice(*v.indices(shape[din])))
            din += 1
            dout += 1
        elif kind == "ellipsis":
            for _ in range(ndim - used):
                index.append(_slice(0, shape[din], 1))
                din += 1
                dout += 1
        elif kind == "arr":
            adv.append((dout, _bounds(v, shape[din], din), False))
            index.append(_slice(0, shape[din], 1))
            din += 1
            dout += 1
        elif kind == "tarr":  # a traced index tensor (see _wrap_neg)
            _bounds(v._data, shape[din], din)
            v = cast(v, "int64") if v._data.dtype != _I64 else v
            adv.append((dout, _wrap_neg(v, shape[din]), False))
            index.append(_slice(0, shape[din], 1))
            din += 1
            dout += 1
        else:  # mask
            if v.shape != shape[din:din + v.ndim]:
                for j, s in enumerate(v.shape):
                    if din + j >= ndim or s != shape[din + j]:
                        break
                raise IndexError(
                    f"The shape of the mask {list(v.shape)} at index {j} does not match the "
                    f"shape of the indexed tensor {list(shape[din:])} at index {din + j}"
                )
            for a in np.nonzero(v):
                adv.append((dout, a, False))
                index.append(_slice(0, shape[din], 1))
                din += 1
                dout += 1
    if adv and all(t for _, _, t in adv):  # only True scalars: a new axis, still a view
        adv = []
    while index and type(index[-1]) is Slice and index[-1] == (0, shape[din - 1], 1):
        index.pop()  # trailing full slices change nothing
        din -= 1
    return tuple(index), tuple(d for d, _, _ in adv), [a for _, a, _ in adv]


def _adv_shape(view_shape: tuple, bshape: tuple, dims: tuple) -> tuple:
    """Shape of numpy advanced indexing: the broadcast index shape replaces adjacent indexed
    dims in place, or goes first when they are separated."""
    view_shape = tuple(view_shape)
    if dims == tuple(range(dims[0], dims[0] + len(dims))):
        return view_shape[:dims[0]] + tuple(bshape) + view_shape[dims[-1] + 1:]
    return tuple(bshape) + tuple(s for i, s in enumerate(view_shape) if i not in dims)


def _stack(arrays: list) -> Tensor:
    """The index arrays broadcast together and stacked along a new first axis (one input)."""
    if any(isinstance(a, Tensor) for a in arrays):
        return _stack_traced(arrays)
    if len(arrays) == 1:
        return _make(arrays[0][None])
    try:
        b = np.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(str(list(a.shape)) for a in arrays)
        raise IndexError(
            f"shape mismatch: indexing tensors could not be broadcast together with shapes "
            f"{shapes}"
        ) from None
    return _make(np.stack(b))


def _stack_traced(arrays: list) -> Tensor:
    """``_stack`` through primitives, for traced index tensors (and constant arrays)."""
    from kiln.ops.shape import stack

    ts = [a if isinstance(a, Tensor) else _make(np.array(a)) for a in arrays]
    try:
        shape = np.broadcast_shapes(*[t._data.shape for t in ts])
    except ValueError:
        _stack([t._data for t in ts])  # raises eager's IndexError
        raise
    ts = [t if t._data.shape == shape else t.expand(*shape) for t in ts]
    return stack(ts) if len(ts) > 1 else ts[0].reshape((1,) + shape)


# -- getitem / setitem ----------------------------------------------------------------------------

def getitem(self: Tensor, key) -> Tensor:
    """``x[key]``: ints, slices (step > 0), None, Ellipsis give a view; integer or boolean
    tensors (lists, arrays) index like PyTorch's advanced indexing and copy.

    >>> import kiln
    >>> x = kiln.arange(6.).reshape(2, 3)
    >>> x[1, ::2], x[:, [2, 0]][0]
    (tensor([3., 5.]), tensor([2., 0.]))
    """
    shape = self._data.shape
    if type(key) is int and shape:
        n = shape[0]
        if key >= n or key < -n:
            raise IndexError(f"index {key} is out of bounds for dimension 0 with size {n}")
        return _index_view(self, index=(key % n,))
    parsed = _parse_fast(shape, key)
    if parsed is None:
        index, dims, arrays = _parse(shape, key)
        indices = _stack(arrays) if dims else None
    else:
        index, dims, indices = parsed
    if not dims:
        return _index_view(self, index=index)
    x = _index_view(self, index=index) if index else self
    return _index(x, indices, dims=dims)


def _dtype_name(d) -> str:
    return {"float32": "Float", "float64": "Double", "float16": "Half", "int64": "Long",
            "int32": "Int", "int16": "Short", "int8": "Char", "uint8": "Byte",
            "bool": "Bool"}[d.name]


def _value_operand(self: Tensor, value, adv: bool, single_mask: bool) -> Tensor:
    """The assigned value as a tensor of ``self``'s dtype (PyTorch's casting rules)."""
    dt = self._data.dtype
    if isinstance(value, Tensor):
        if value._data.dtype != dt:
            if adv and not (single_mask and value._data.ndim == 0):
                raise RuntimeError(
                    "Index put requires the source and destination dtypes match, got "
                    f"{_dtype_name(self.dtype)} for the destination and "
                    f"{_dtype_name(value.dtype)} for the source."
                )
            value = cast(value, self.dtype)
        return value
    tv = type(value)
    if (tv is float or tv is int) and dt.kind == "f" and -6e4 < value < 6e4:
        return _make(np.array(value, dt))  # cannot overflow, even float16
    if isinstance(value, (numbers.Number, np.generic)) and not isinstance(value, complex):
        try:
            with np.errstate(all="raise"):
                return _make(np.array(value, dt))
        except (OverflowError, FloatingPointError, ValueError):
            raise RuntimeError(
                f"value cannot be converted to type {self.dtype.name} without overflow"
            ) from None
    if isinstance(value, complex):  # PyTorch's class and message
        raise RuntimeError(  # noqa: TRY004
            f"value cannot be converted to type {self.dtype.name} without overflow"
        )
    raise TypeError(f"can't assign a {type(value).__name__} to a kiln tensor")


def _fit_value(v: Tensor, target: tuple) -> Tensor:
    """Check that ``v`` broadcasts to ``target``, dropping leading size-1 dims as PyTorch does."""
    vshape = v._data.shape
    if len(vshape) > len(target):
        extra = len(vshape) - len(target)
        if any(s != 1 for s in vshape[:extra]):
            raise RuntimeError(
                f"expand({list(vshape)}, size={list(target)}): the number of sizes provided "
                f"({len(target)}) must be greater or equal to the number of dimensions in the "
                f"tensor ({len(vshape)})"
            )
        v = v.reshape(vshape[extra:])
        vshape = v._data.shape
    for i, s in enumerate(vshape[::-1]):
        t = target[len(target) - 1 - i]
        if s != t and s != 1:
            raise RuntimeError(
                f"The expanded size of the tensor ({t}) must match the existing size ({s}) at "
                f"non-singleton dimension {len(vshape) - 1 - i}.  Target sizes: {list(target)}."
                f"  Tensor sizes: {list(vshape)}"
            )
    return v


def setitem(self: Tensor, key, value) -> None:
    """``x[key] = value``: writes in place; autograd sees an out-of-place index_put."""
    data = self._data
    shape = data.shape
    parsed = _parse_fast(shape, key)
    if parsed is not None:
        index, dims, indices = parsed
        single_mask = False
    else:
        index, dims, arrays = _parse(shape, key)
        indices = _stack(arrays) if dims else None
        single_mask = isinstance(key, (Tensor, np.ndarray)) and (
            key._data if isinstance(key, Tensor) else key).dtype == np.bool_
    v = _value_operand(self, value, bool(dims), single_mask)
    view = data[_npkey(index)]
    target = _adv_shape(view.shape, indices._data.shape[1:], dims) if dims else view.shape
    if v._data.shape and v._data.shape != target:
        v = _fit_value(v, target)
    if not (STATE.grad_enabled and (self._rg or v._rg)) and STATE.tracer is None:
        # Nothing to record: write straight into the storage (no full-size copies).
        if not data.flags.writeable:
            raise RuntimeError(
                "setitem: cannot write into this tensor: it is a read-only view (from expand "
                "or broadcasting); call .clone() first"
            )
        if dims:
            view[_adv_key(indices._data, dims)] = v._data
        else:
            view[...] = v._data
        self._version[0] += 1
        return
    apply_inplace(_index_put, self, (v, indices if dims else _no_indices()),
                  {"index": index, "dims": dims, "accumulate": False})


def _index_put_args(input: Tensor, indices, values, op: str):
    if not isinstance(indices, (tuple, list)):
        raise TypeError(f"{op}(): argument 'indices' must be tuple of Tensors, not "
                        f"{type(indices).__name__}")
    if not isinstance(values, Tensor):
        raise TypeError(f"{op}(): argument 'values' must be Tensor, not "
                        f"{type(values).__name__}")
    if values._data.dtype != input._data.dtype:
        raise RuntimeError(
            "Index put requires the source and destination dtypes match, got "
            f"{_dtype_name(input.dtype)} for the destination and {_dtype_name(values.dtype)} "
            "for the source."
        )
    index, dims, arrays = _parse(input._data.shape, tuple(indices))
    indices = _stack(arrays) if dims else _no_indices()
    view_shape = input._data[_npkey(index)].shape
    target = _adv_shape(view_shape, indices._data.shape[1:], dims) if dims else view_shape
    if values._data.shape != target:
        values = _fit_value(values, target)
    return values, indices, {"index": index, "dims": dims}


def index_put(input: Tensor, indices, values: Tensor, accumulate: bool = False) -> Tensor:
    """A copy of ``input`` with ``input[indices] = values`` (or ``+=`` when ``accumulate``,
    where repeated indices add up)."""
    values, idx, attrs = _index_put_args(input, indices, values, "index_put")
    return _index_put(input, values, idx, accumulate=bool(accumulate), **attrs)


def index_put_(self: Tensor, indices, values: Tensor, accumulate: bool = False) -> Tensor:
    values, idx, attrs = _index_put_args(self, indices, values, "index_put_")
    return apply_inplace(_index_put, self, (values, idx), {**attrs,
                                                           "accumulate": bool(accumulate)})


# -- gather / scatter -----------------------------------------------------------------------------

def _along_key(idx: np.ndarray, dim: int) -> tuple:
    """numpy key reading ``x[i0, .., idx[i0, .., ik], .., ik]`` for every position of idx."""
    nd = idx.ndim
    key = []
    for d, s in enumerate(idx.shape):
        if d == dim:
            key.append(idx)
        else:
            key.append(np.arange(s).reshape((1,) * d + (s,) + (1,) * (nd - d - 1)))
    return tuple(key)


_OFFSETS: dict = {}


def _flat(xshape: tuple, index: np.ndarray, dim: int) -> np.ndarray:
    """Flat positions in a C-contiguous array of ``xshape`` read by gather/scatter along
    ``dim``: ``index * stride[dim]`` plus the (cached) offset of every other coordinate."""
    key = (xshape, index.shape, dim)
    off = _OFFSETS.get(key)
    if off is None:
        nd = index.ndim
        strides = [1] * nd
        for d in range(nd - 2, -1, -1):
            strides[d] = strides[d + 1] * xshape[d + 1]
        off = np.zeros((1,) * nd, np.int64)
        for d, s in enumerate(index.shape):
            if d != dim:
                off = off + np.arange(0, s * strides[d], strides[d]).reshape(
                    (1,) * d + (s,) + (1,) * (nd - d - 1))
        if len(_OFFSETS) > 256:
            _OFFSETS.clear()
        _OFFSETS[key] = off = (off, strides[dim])
    off, stride = off
    return (index * stride if stride != 1 else index) + off


@primitive("gather", traits={"index"}, save=(1,))
def _gather(x, index, dim):
    if x.flags.c_contiguous:
        return np.take(x.reshape(-1), _flat(x.shape, index, dim))
    return x[_along_key(index, dim)]


@_gather.def_infer
def _gather_infer(shapes, dts, dim):
    return shapes[1], dts[0]


@_gather.def_vjp
def _gather_vjp(g, node):
    x, index = node.inputs
    if not node.needs[0]:
        return (None, None)
    return (_scatter(_zeros(x._data.shape, g._data.dtype), index, g, dim=node.attrs["dim"],
                     reduce="add"), None)


@primitive("scatter", traits={"index"}, save=(1,))
def _scatter(x, index, src, dim, reduce):
    out = np.array(x)  # C-contiguous, even from a zero-stride constant
    if src.shape != index.shape:
        src = src[tuple(slice(0, s) for s in index.shape)]
    flat = _flat(out.shape, index, dim).reshape(-1)
    src = src.reshape(-1)
    if reduce is None:
        out.reshape(-1)[flat] = src
    elif reduce == "add":
        np.add.at(out.reshape(-1), flat, src)
    else:
        np.multiply.at(out.reshape(-1), flat, src)
    return out


@_scatter.def_infer
def _scatter_infer(shapes, dts, dim, reduce):
    return shapes[0], dts[0]


@_scatter.def_vjp
def _scatter_vjp(g, node):
    _, index, src = node.inputs
    dim, reduce = node.attrs["dim"], node.attrs["reduce"]
    if reduce == "multiply":
        raise RuntimeError("scatter: the derivative for reduce='multiply' is not implemented")
    gx = gs = None
    if node.needs[0]:
        gx = g if reduce == "add" else _scatter(g, index, _zeros(index._data.shape,
                                                                 g._data.dtype),
                                                dim=dim, reduce=None)
    if node.needs[2]:
        gs = _gather(g, index, dim=dim)
        if gs._data.shape != src._data.shape:  # only the index-shaped corner of src was used
            crop = tuple(Slice(0, s, 1) for s in index._data.shape)
            gs = _index_put(_zeros(src._data.shape, g._data.dtype), gs, _no_indices(),
                            index=crop, dims=(), accumulate=False)
    return (gx, None, gs)


def _index_tensor(index, op: str, exc=RuntimeError, what="int32/int64") -> Tensor:
    """An int32/int64 index tensor as int64 (the one index dtype primitives see)."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{op}(): argument 'index' must be Tensor, not {type(index).__name__}")
    dt = index._data.dtype
    if dt == _I64:
        return index
    if dt == np.int32:
        if STATE.tracer is not None:
            return cast(index, "int64")
        return _make(index._data.astype(_I64))
    raise exc(f"{op}(): Expected dtype {what} for index, got {index.dtype.name}")


def _check_gather_shapes(x: Tensor, idx: Tensor, dim: int, op: str, src: Tensor | None = None):
    xs, ish = x._data.shape, idx._data.shape
    if len(ish) != len(xs):
        raise RuntimeError(
            f"{op}(): Index tensor must have the same number of dimensions as "
            f"{'self' if src is not None else 'input'} tensor"
        )
    for d, (a, b) in enumerate(zip(ish, xs)):
        if d != dim and a > b:
            raise RuntimeError(
                f"{op}(): Size does not match at dimension {d} expected index {list(ish)} to be "
                f"no larger than self {list(xs)} apart from dimension {dim}"
            )
    if src is not None:
        ss = src._data.shape
        if len(ss) != len(ish) or any(a > b for a, b in zip(ish, ss)):
            raise RuntimeError(
                f"{op}(): Expected index {list(ish)} to be no larger than self {list(xs)} apart "
                f"from dimension {dim} and to be no larger size than src {list(ss)}"
            )


def _bounds_nonneg(idx: Tensor, n: int, dim: int, op: str, exc=RuntimeError) -> None:
    a = idx._data
    if a.size and _MAX(a.view(np.uint64), axis=None) >= n:  # negatives wrap to huge
        lo, hi = a.min(), a.max()
        bad = int(lo if lo < 0 else hi)
        raise exc(f"{op}(): index {bad} is out of bounds for dimension {dim} with size {n}")


def gather(input: Tensor, dim: int, index: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """``out[i][j] = input[i][index[i][j]]`` (for dim=1): values picked along ``dim``.

    >>> import kiln
    >>> kiln.gather(kiln.tensor([[1., 2.], [3., 4.]]), 1, kiln.tensor([[1], [0]]))
    tensor([[2.],
            [3.]])
    """
    idx = _index_tensor(index, "gather")
    d = normalize_dim(dim, input._data.ndim, "gather")
    x = input
    if x._data.ndim == 0 or idx._data.ndim == 0:
        out_shape = idx._data.shape
        x, idx = x.reshape(-1), idx.reshape(-1) if idx._data.ndim == 0 else idx
        _check_gather_shapes(x, idx, 0, "gather")
        _bounds_nonneg(idx, x._data.shape[0], d, "gather")
        return _gather(x, idx, dim=0).reshape(out_shape)
    _check_gather_shapes(x, idx, d, "gather")
    _bounds_nonneg(idx, x._data.shape[d], d, "gather")
    return _gather(x, idx, dim=d)


def _scatter_args(input, dim, index, src, value, op):
    idx = _index_tensor(index, op)
    d = normalize_dim(dim, input._data.ndim, op)
    if src is None:
        src = value
    if isinstance(src, Tensor):
        if src._data.dtype != input._data.dtype:
            raise RuntimeError(f"{op}(): Expected self.dtype to be equal to src.dtype")
        if input._data.ndim == 0 and src._data.ndim == 0:
            src = src.reshape(1)
        _check_gather_shapes(input if input._data.ndim else input.reshape(-1),
                             idx if idx._data.ndim else idx.reshape(-1), d, op,
                             src if src._data.ndim else src.reshape(-1))
    elif isinstance(src, (numbers.Number, np.generic)):
        _check_gather_shapes(input if input._data.ndim else input.reshape(-1),
                             idx if idx._data.ndim else idx.reshape(-1), d, op)
        src = _make(np.full(idx._data.shape, src, input._data.dtype))
    else:
        raise TypeError(f"{op}(): argument 'src' must be Tensor or a number, "
                        f"not {type(src).__name__}")
    _bounds_nonneg(idx, input._data.shape[d] if input._data.ndim else 1, d, op)
    return idx, d, src


def _scatter_apply(input, idx, d, src, reduce, inplace):
    if input._data.ndim == 0:  # work on 1-element vectors
        if inplace:
            raise RuntimeError("in-place scatter into a 0-d tensor is not supported by kiln")
        out = _scatter(input.reshape(1), idx.reshape(-1), src.reshape(-1), dim=0, reduce=reduce)
        return out.reshape(())
    if inplace:
        return apply_inplace(_scatter, input, (idx, src), {"dim": d, "reduce": reduce})
    return _scatter(input, idx, src, dim=d, reduce=reduce)


def _reduce_arg(reduce, op):
    if reduce is None:
        return None
    if reduce not in ("add", "multiply"):
        raise RuntimeError(f"{op}(): reduce argument must be either add or multiply.")
    return reduce


def scatter(input: Tensor, dim: int, index: Tensor, src=None, *, value=None,
            reduce=None) -> Tensor:
    """A copy of ``input`` with ``src`` (a tensor or a number) written at ``index`` along
    ``dim``; ``reduce='add'|'multiply'`` combines instead of overwriting."""
    idx, d, src = _scatter_args(input, dim, index, src, value, "scatter")
    return _scatter_apply(input, idx, d, src, _reduce_arg(reduce, "scatter"), False)


def scatter_(self: Tensor, dim: int, index: Tensor, src=None, *, value=None,
             reduce=None) -> Tensor:
    idx, d, src = _scatter_args(self, dim, index, src, value, "scatter_")
    return _scatter_apply(self, idx, d, src, _reduce_arg(reduce, "scatter_"), True)


def scatter_add(input: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """A copy of ``input`` with ``src`` added at ``index`` along ``dim`` (repeats accumulate).

    >>> import kiln
    >>> kiln.zeros(3).scatter_add(0, kiln.tensor([0, 0, 2]), kiln.tensor([1., 2., 3.]))
    tensor([3., 0., 3.])
    """
    if not isinstance(src, Tensor):
        raise TypeError(f"scatter_add(): argument 'src' must be Tensor, not "
                        f"{type(src).__name__}")
    idx, d, src = _scatter_args(input, dim, index, src, None, "scatter_add")
    return _scatter_apply(input, idx, d, src, "add", False)


def scatter_add_(self: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    if not isinstance(src, Tensor):
        raise TypeError(f"scatter_add_(): argument 'src' must be Tensor, not "
                        f"{type(src).__name__}")
    idx, d, src = _scatter_args(self, dim, index, src, None, "scatter_add_")
    return _scatter_apply(self, idx, d, src, "add", True)


# -- index_select / index_add / index_fill / masked_select / take ----------------------------------

def _vector_index(index, op: str, n: int, dim: int, exc=RuntimeError,
                  negative: bool = False) -> Tensor:
    """A 0-d or 1-d int index as an int64 vector, checked against size ``n`` (``negative``:
    count negative entries from the end, as index_fill does)."""
    idx = _index_tensor(index, op, what="int32 or int64")
    if idx._data.ndim > 1:
        raise IndexError(f"{op}(): Index is supposed to be a vector")
    traced = STATE.tracer is not None
    if idx._data.ndim == 0:
        idx = idx.reshape(1) if traced else _make(idx._data.reshape(1))
    if negative:
        checked = _bounds(idx._data, n, dim, exc, f"{op}(): ")
        return _wrap_neg(idx, n) if traced else _make(checked)
    _bounds_nonneg(idx, n, dim, op, exc)
    return idx


def index_select(input: Tensor, dim: int, index: Tensor) -> Tensor:
    """The slices of ``input`` at positions ``index`` (a vector) along ``dim``.

    >>> import kiln
    >>> kiln.arange(6.).reshape(2, 3).index_select(1, kiln.tensor([2, 0]))
    tensor([[2., 0.],
            [5., 3.]])
    """
    d = normalize_dim(dim, input._data.ndim, "index_select")
    if input._data.ndim == 0:
        idx = _vector_index(index, "index_select", 1, d)
        if idx._data.size != 1:
            raise RuntimeError(f"index_select(): Index to scalar can have only 1 value, got "
                               f"{idx._data.size} value(s)")
        return _index_view(input, index=())
    idx = _vector_index(index, "index_select", input._data.shape[d], d)
    return _index(input, _as_row(idx), dims=(d,))


def _index_add_args(input, dim, index, source, op):
    d = normalize_dim(dim, input._data.ndim, op)
    nd = max(input._data.ndim, 1)
    idx = _vector_index(index, op, input._data.shape[d] if input._data.ndim else 1, d,
                        IndexError)
    if not isinstance(source, Tensor):
        raise TypeError(f"{op}(): argument 'source' must be Tensor, not {type(source).__name__}")
    if source._data.dtype != input._data.dtype:
        raise RuntimeError(f"{op}(): self ({input.dtype.name}) and source "
                           f"({source.dtype.name}) must have the same scalar type")
    expect = list(input._data.shape) if input._data.ndim else [1]
    expect[d] = idx._data.shape[0]
    sshape = list(source._data.shape) if source._data.ndim else [1]
    if sshape != expect or len(sshape) != nd:
        raise RuntimeError(
            f"{op}(): Number of indices ({idx._data.shape[0]}) should be equal to "
            f"source.size(dim): ({sshape[d] if d < len(sshape) else 1}), for dim: {d}"
            if len(sshape) == nd and sshape[d] != expect[d] else
            f"{op}(): source {sshape} and self {list(input._data.shape)} must match in every "
            f"dimension but {d}"
        )
    return d, idx


def index_add(input: Tensor, dim: int, index: Tensor, source: Tensor, *, alpha=1) -> Tensor:
    """A copy of ``input`` with ``alpha * source`` added at rows ``index`` along ``dim``."""
    d, idx = _index_add_args(input, dim, index, source, "index_add")
    if alpha != 1:
        source = mul(source, alpha)
    if input._data.ndim == 0:
        return _index_put(input, source.reshape(()), _no_indices(), index=(), dims=(),
                          accumulate=True) if idx._data.size else input.clone()
    return _index_put(input, source, _as_row(idx), index=(), dims=(d,), accumulate=True)


def index_add_(self: Tensor, dim: int, index: Tensor, source: Tensor, *, alpha=1) -> Tensor:
    d, idx = _index_add_args(self, dim, index, source, "index_add_")
    if alpha != 1:
        source = mul(source, alpha)
    if self._data.ndim == 0:
        raise RuntimeError("in-place index_add_ into a 0-d tensor is not supported by kiln")
    return apply_inplace(_index_put, self, (source, _as_row(idx)),
                         {"index": (), "dims": (d,), "accumulate": True})


def _fill_args(input, dim, index, value, op):
    d = normalize_dim(dim, input._data.ndim, op)
    idx = _vector_index(index, op, input._data.shape[d] if input._data.ndim else 1, d,
                        IndexError, negative=True)
    # Filling twice changes nothing, but a tensor value's gradient counts each slice once.
    if STATE.tracer is None:
        idx = _make(np.unique(idx._data))
    elif isinstance(value, Tensor) and value._rg:
        _concrete(idx, f"{op}() with a value that requires grad (its gradient depends on the "
                       "values of the index: repeated entries count once)")
        idx = _make(np.unique(idx._data))
    if isinstance(value, Tensor):
        if value._data.ndim != 0:
            raise RuntimeError(f"{op}(): only supports a 0-dimensional value tensor, but got "
                               f"tensor with {value._data.ndim} dimension(s).")
        value = cast(value, input.dtype)
    else:
        value = _value_operand(input, value, False, False)
    return d, idx, value


def index_fill(input: Tensor, dim: int, index: Tensor, value) -> Tensor:
    """A copy of ``input`` with the slices at ``index`` along ``dim`` set to ``value``."""
    d, idx, value = _fill_args(input, dim, index, value, "index_fill")
    if input._data.ndim == 0:
        return _index_put(input, value, _no_indices(), index=(), dims=(),
                          accumulate=False) if idx._data.size else input.clone()
    return _index_put(input, value, _as_row(idx), index=(), dims=(d,), accumulate=False)


def index_fill_(self: Tensor, dim: int, index: Tensor, value) -> Tensor:
    d, idx, value = _fill_args(self, dim, index, value, "index_fill_")
    if self._data.ndim == 0:
        raise RuntimeError("in-place index_fill_ into a 0-d tensor is not supported by kiln")
    return apply_inplace(_index_put, self, (value, _as_row(idx)),
                         {"index": (), "dims": (d,), "accumulate": False})


def masked_select(input: Tensor, mask: Tensor) -> Tensor:
    """The elements of ``input`` where ``mask`` (broadcast together) is True, as a vector."""
    if not isinstance(mask, Tensor) or mask._data.dtype != np.bool_:
        raise RuntimeError("masked_select: expected BoolTensor for mask")
    try:
        shape = np.broadcast_shapes(input._data.shape, mask._data.shape)
    except ValueError:
        raise RuntimeError(
            f"masked_select: the size of input {list(input._data.shape)} must match the size "
            f"of mask {list(mask._data.shape)} (broadcastable)"
        ) from None
    _concrete(mask, "masked_select() (its output shape depends on the values of the mask)")
    x = input.expand(*shape) if input._data.shape != shape else input
    m = np.broadcast_to(mask._data, shape)
    if not shape:
        x, m = x.reshape(1), m.reshape(1)
    arrays = list(np.nonzero(m))
    return _index(x, _stack(arrays), dims=tuple(range(len(arrays))))


def take(input: Tensor, index: Tensor) -> Tensor:
    """``input`` read as a flat vector at ``index`` (output shaped like ``index``)."""
    idx = _index_tensor(index, "take", what="int64")
    flat = input.reshape(-1)
    a, n = idx._data, flat._data.shape[0]
    if a.size and _MAX(a.view(np.uint64), axis=None) >= n:
        lo, hi = int(a.min()), int(a.max())
        if hi >= n or lo < -n:
            raise IndexError(f"take(): out of range: tried to access index "
                             f"{hi if hi >= n else lo} on a tensor of {n} elements.")
        a = np.where(a < 0, a + n, a)
    if STATE.tracer is not None:
        return _index(flat, _wrap_neg(idx, n).reshape((1,) + a.shape), dims=(0,))
    return _index(flat, _make(a[None]), dims=(0,))


def take_along_dim(input: Tensor, indices: Tensor, dim=None) -> Tensor:
    """``gather`` with the index broadcast against ``input`` (flattened when dim is None)."""
    idx = _index_tensor(indices, "take_along_dim", what="int64")
    if dim is None:
        return gather(input.reshape(-1), 0, idx.reshape(-1))
    d = normalize_dim(dim, input._data.ndim, "take_along_dim")
    if input._data.ndim != idx._data.ndim:
        raise RuntimeError("take_along_dim(): input and indices should have the same number of "
                           "dimensions")
    xs, is_ = list(input._data.shape), list(idx._data.shape)
    try:
        xb = list(np.broadcast_shapes(tuple(xs[:d] + [1] + xs[d + 1:]),
                                      tuple(is_[:d] + [1] + is_[d + 1:])))
    except ValueError:
        raise RuntimeError(f"take_along_dim(): shapes {xs} and {is_} are not broadcastable "
                           f"apart from dimension {d}") from None
    xshape, ishape = xb[:d] + [xs[d]] + xb[d + 1:], xb[:d] + [is_[d]] + xb[d + 1:]
    x = input.expand(*xshape) if xshape != xs else input
    if ishape == is_:
        i = idx
    else:
        i = idx.expand(*ishape) if STATE.tracer is not None else _make(
            np.broadcast_to(idx._data, ishape))
    return gather(x, d, i)


# -- nonzero ----------------------------------------------------------------------------------------

def nonzero(input: Tensor, *, as_tuple: bool = False):
    """Indices of the non-zero elements: an (n, ndim) int64 tensor, or one vector per dim.

    Not a primitive: its output shape depends on the values, so it has no shape rule (graph
    capture must treat it as data-dependent).

    >>> import kiln
    >>> kiln.tensor([[0, 1], [2, 0]]).nonzero()
    tensor([[0, 1],
            [1, 0]])
    """
    _concrete(input, "nonzero() (its output shape depends on the values)")
    a = input._data
    if as_tuple:
        if a.ndim == 0:
            return (_make(np.zeros(1 if a != 0 else 0, _I64)),)
        return tuple(_make(i.astype(_I64, copy=False)) for i in np.nonzero(a))
    return _make(np.argwhere(a).astype(_I64, copy=False))


def argwhere(input: Tensor) -> Tensor:
    """Same as ``nonzero(input)``."""
    return nonzero(input)


# -- sort / topk --------------------------------------------------------------------------------------

def _argsort_impl(x, axis, descending, stable):
    kind = "stable" if stable else None
    if not descending:
        return np.argsort(x, axis=axis, kind=kind)
    # Stable descending, NaN first (PyTorch treats NaN as the largest): sort the reversed
    # array ascending and reverse the answer back.
    n = x.shape[axis]
    rev = np.flip(x, axis)
    return (n - 1) - np.flip(np.argsort(rev, axis=axis, kind="stable"), axis)


@primitive("argsort", traits={"index"})
def _argsort(x, dim, descending, stable):
    return _argsort_impl(x, dim, descending, stable)


_argsort.mark_not_differentiable("integer output (sort's values are a gather at these indices)")


@primitive("argtopk", traits={"index"})
def _argtopk(x, k, dim, largest):
    n = x.shape[dim]
    lead = (slice(None),) * dim
    if k == 0:
        return np.zeros(x.shape[:dim] + (0,) + x.shape[dim + 1:], np.int64)
    if k * 8 > n:  # argpartition buys little when k is a large fraction of n
        return _argsort_impl(x, dim, largest, True)[lead + (slice(0, k),)]
    if largest:
        part = np.argpartition(x, n - k, axis=dim)[lead + (slice(n - k, n),)]
    else:
        part = np.argpartition(x, k - 1, axis=dim)[lead + (slice(0, k),)]
    order = _argsort_impl(np.take_along_axis(x, part, axis=dim), dim, largest, True)
    return np.take_along_axis(part, order, axis=dim)


_argtopk.mark_not_differentiable("integer output (topk's values are a gather at these indices)")


def sort(input: Tensor, dim: int = -1, descending: bool = False, stable: bool = False):
    """``(values, indices)`` sorted along ``dim``; NaN sorts as the largest value.

    >>> import kiln
    >>> kiln.sort(kiln.tensor([3., 1., 2.])).indices
    tensor([1, 2, 0])
    """
    d = normalize_dim(dim, input._data.ndim, "sort")
    if input._data.ndim == 0:
        return sort_result(clone(input), _make(np.zeros((), _I64)))
    idx = _argsort(input, dim=d, descending=bool(descending), stable=bool(stable))
    return sort_result(_gather(input, idx, dim=d), idx)


def argsort(input: Tensor, dim: int = -1, descending: bool = False, stable: bool = False):
    """The indices that sort ``input`` along ``dim``."""
    d = normalize_dim(dim, input._data.ndim, "argsort")
    if input._data.ndim == 0:
        return _make(np.zeros((), _I64))
    return _argsort(input, dim=d, descending=bool(descending), stable=bool(stable))


def topk(input: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """The ``k`` largest (or smallest) elements along ``dim`` and their indices, in order.

    >>> import kiln
    >>> kiln.topk(kiln.tensor([1., 5., 3.]), 2)
    topk(values=tensor([5., 3.]), indices=tensor([1, 2]))
    """
    d = normalize_dim(dim, input._data.ndim, "topk")
    n = input._data.shape[d] if input._data.ndim else 1
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"topk(): argument 'k' must be int, not {type(k).__name__}")
    if k < 0 or k > n:
        raise RuntimeError(f"topk(): selected index k out of range (k={k}, size {n} along "
                           f"dimension {d})")
    if input._data.dtype == np.bool_:
        raise RuntimeError("topk(): does not support bool dtypes")
    if input._data.ndim == 0:
        return topk_result(clone(input), _make(np.zeros((), _I64)))
    idx = _argtopk(input, k=int(k), dim=d, largest=bool(largest))
    return topk_result(_gather(input, idx, dim=d), idx)


# -- one_hot / embedding ----------------------------------------------------------------------------

@primitive("one_hot", traits={"index"})
def _one_hot(x, num_classes):
    out = np.zeros(x.shape + (num_classes,), np.int64)
    np.put_along_axis(out, x[..., None], 1, axis=-1)
    return out


_one_hot.mark_not_differentiable("integer output")


def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """int64 one-hot encoding with a new last dimension (``torch.nn.functional.one_hot``).

    >>> import kiln
    >>> one_hot(kiln.tensor([0, 2]), 3)
    tensor([[1, 0, 0],
            [0, 0, 1]])
    """
    a = tensor._data
    if a.dtype != _I64:
        raise RuntimeError("one_hot is only applicable to index tensor of type LongTensor.")
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool):
        raise TypeError(f"one_hot(): argument 'num_classes' (position 2) must be int, not "
                        f"{type(num_classes).__name__}")
    if num_classes == -1:
        _concrete(tensor, "one_hot(num_classes=-1) (its output shape depends on the values)")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            raise RuntimeError("one_hot: Class values must be non-negative.")
        if num_classes == -1:
            num_classes = hi + 1
        elif hi >= num_classes:
            raise RuntimeError("one_hot: Class values must be smaller than num_classes.")
    elif num_classes == -1:
        raise RuntimeError("one_hot: Can not infer total number of classes from empty tensor.")
    if num_classes < 0:
        raise RuntimeError(f"one_hot: num_classes should be positive or -1, got {num_classes}")
    return _one_hot(tensor, num_classes=int(num_classes))


@primitive("embedding", traits={"index"}, save=(1,))
def _embedding(weight, indices, padding_idx):
    return np.take(weight, indices, axis=0)


@_embedding.def_infer
def _embedding_infer(shapes, dts, padding_idx):
    return tuple(shapes[1]) + tuple(shapes[0][1:]), dts[0]


@_embedding.def_vjp
def _embedding_vjp(g, node):
    weight, indices = node.inputs
    if not node.needs[0]:
        return (None, None)
    return (_embedding_backward(g, indices, num_weights=weight._data.shape[0],
                                padding_idx=node.attrs["padding_idx"]), None)


@primitive("embedding_backward", traits={"index"}, save=(1,))
def _embedding_backward(g, indices, num_weights, padding_idx):
    out = np.zeros((num_weights,) + g.shape[indices.ndim:], g.dtype)
    _rows_add(out, indices, g)
    if padding_idx is not None:
        out[padding_idx] = 0
    return out


@_embedding_backward.def_infer
def _embedding_backward_infer(shapes, dts, num_weights, padding_idx):
    return (num_weights,) + tuple(shapes[0][len(shapes[1]):]), dts[0]


@_embedding_backward.def_vjp
def _embedding_backward_vjp(gg, node):
    indices = node.inputs[1]
    p = node.attrs["padding_idx"]
    if not node.needs[0]:
        return (None, None)
    if p is not None:  # the padding row of the gradient was zeroed: it reads as zero
        gg = _index_put(gg, _zeros((), gg._data.dtype), _no_indices(), index=(p,), dims=(),
                        accumulate=False)
    return (_embedding(gg, indices, padding_idx=p), None)


def embedding(input: Tensor, weight: Tensor, padding_idx=None, max_norm=None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> Tensor:
    """Rows of ``weight`` at ``input`` (``torch.nn.functional.embedding``); row ``padding_idx``
    gets no gradient, repeated indices accumulate theirs."""
    idx = _index_tensor(input, "embedding", what="Long or Int")
    if weight._data.ndim != 2:
        raise RuntimeError("embedding(): 'weight' must be 2-D")
    n = weight._data.shape[0]
    if padding_idx is not None:
        if not -n <= padding_idx < n:
            raise AssertionError("Padding_idx must be within num_embeddings")
        padding_idx = int(padding_idx) % n
    a = idx._data
    if a.size and _MAX(a.view(np.uint64), axis=None) >= n:
        raise IndexError("embedding(): index out of range in self")
    if scale_grad_by_freq or sparse:
        raise NotImplementedError("embedding(): scale_grad_by_freq and sparse are not supported "
                                  "by kiln")
    if max_norm is not None and a.size:
        # PyTorch renormalizes the looked-up rows of weight in place, outside autograd.
        if STATE.tracer is not None:
            STATE.tracer.unsupported(
                "embedding(max_norm=...) renormalizes the rows of weight it looks up, which "
                "depends on the values of the indices and is done outside the primitives; "
                "renormalize the weight outside the compiled function instead")
        w = weight._data
        rows = np.unique(a)
        norms = np.linalg.norm(w[rows].astype(np.float64), ord=norm_type, axis=1)
        scale = np.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0)
        w[rows] *= scale[:, None].astype(w.dtype)
        weight._version[0] += 1
    return _embedding(weight, idx, padding_idx=padding_idx)


# -- multinomial ------------------------------------------------------------------------------------

@primitive("multinomial", traits={"random", "index"})
def _multinomial(p, num_samples, replacement, generator):
    from kiln.random import _rng

    rng = _rng(generator)
    p2 = p.reshape(-1, p.shape[-1]).astype(np.float64)
    rows, n = p2.shape
    if replacement:
        cdf = np.cumsum(p2, axis=1)
        cdf /= cdf[:, -1:]  # the last entry becomes exactly 1
        # One search over all rows: row r's CDF is shifted into (r, r + 1].  A zero-probability
        # category repeats its predecessor's CDF value, so it is never the first one above u.
        shift = np.arange(rows, dtype=np.float64)[:, None]
        u = rng.random((rows, num_samples)) + shift
        pos = np.searchsorted((cdf + shift).ravel(), u.ravel(), side="right")
        out = pos.reshape(rows, num_samples) - (shift * n).astype(np.int64)
        # Rounding can push u past a row's end: clamp to its last possible category.
        last = n - 1 - np.argmax(p2[:, ::-1] > 0, axis=1)
        np.minimum(out, last[:, None], out=out)
    else:
        # PyTorch's method: the top num_samples of p / Exp(1) draws (Efraimidis-Spirakis).
        keys = p2 / rng.standard_exponential((rows, n))
        out = np.argsort(-keys, axis=1, kind="stable")[:, :num_samples]
    return out.reshape(p.shape[:-1] + (num_samples,))


@_multinomial.def_infer
def _multinomial_infer(shapes, dts, num_samples, replacement, generator):
    return tuple(shapes[0][:-1]) + (num_samples,), np.dtype(np.int64)


_multinomial.mark_not_differentiable("random integer output")


def multinomial(input: Tensor, num_samples: int, replacement: bool = False, *,
                generator=None) -> Tensor:
    """Category indices drawn with probabilities proportional to the rows of ``input``."""
    a = input._data
    if a.dtype.kind != "f":
        raise RuntimeError(f"multinomial only supports floating-point dtypes for input, got: "
                           f"{_dtype_name(input.dtype)}")
    if a.ndim not in (1, 2):
        raise RuntimeError("multinomial(): prob_dist must be 1 or 2 dim")
    if num_samples <= 0:
        raise RuntimeError("multinomial(): cannot sample n_sample <= 0 samples")
    n = a.shape[-1]
    if not replacement and num_samples > n:
        raise RuntimeError("multinomial(): cannot sample n_sample > prob_dist.size(-1) samples "
                           "without replacement")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise RuntimeError("multinomial(): probability tensor contains either `inf`, `nan` or "
                           "element < 0")
    if a.size == 0 or np.any(a.sum(-1) <= 0):
        raise RuntimeError("multinomial(): invalid multinomial distribution (sum of "
                           "probabilities <= 0)")
    return _multinomial(input, num_samples=int(num_samples), replacement=bool(replacement),
                        generator=generator)


TENSOR_METHODS = {
    "__getitem__": getitem, "__setitem__": setitem,
    "gather": gather, "scatter": scatter, "scatter_": scatter_, "scatter_add": scatter_add,
    "scatter_add_": scatter_add_, "index_select": index_select, "index_add": index_add,
    "index_add_": index_add_, "index_fill": index_fill, "index_fill_": index_fill_,
    "index_put": index_put, "index_put_": index_put_,
    "masked_select": masked_select, "take": take, "take_along_dim": take_along_dim,
    "nonzero": nonzero, "argwhere": argwhere, "sort": sort, "argsort": argsort, "topk": topk,
    "multinomial": multinomial,
}
