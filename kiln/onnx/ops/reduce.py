"""Reductions, ArgMax/ArgMin, CumSum and TopK."""

from __future__ import annotations

import numpy as np

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T, axis, ints

# the opset from which each reduction takes ``axes`` as an input instead of an attribute
_AXES_INPUT_FROM = {"ReduceSum": 13}
_EMPTY = {"ReduceSum": 0, "ReduceProd": 1, "ReduceMax": -np.inf, "ReduceMin": np.inf,
          "ReduceL1": 0, "ReduceL2": 0, "ReduceLogSum": -np.inf, "ReduceLogSumExp": -np.inf,
          "ReduceSumSquare": 0, "ReduceMean": np.nan}


def _axes(ctx, x, axes_input):
    if ctx.opset >= _AXES_INPUT_FROM.get(ctx.op_type, 18):
        axes = None if axes_input is None else ints(ctx.static(1))
    else:
        axes = ctx.attr("axes")
    if not axes:  # None or empty
        if ctx.attr("noop_with_empty_axes", 0):
            return None
        return list(range(x.ndim))
    return sorted({axis(a, x.ndim, ctx) for a in axes})


def _empty(ctx, x, axes, keep):
    """A reduction over a zero-size axis: the identity of the reduction."""
    shape = [1 if i in axes else n for i, n in enumerate(x.shape) if keep or i not in axes]
    value = _EMPTY[ctx.op_type]
    if x.dtype is kiln.bool:
        value = value > 0
    elif not x.dtype.is_floating_point and not np.isfinite(value):
        info = np.iinfo(x.dtype.np)
        value = info.min if value < 0 else info.max
    return kiln.full(tuple(shape), value, dtype=x.dtype)


def _reduce(fn):
    def run(ctx, x, axes=None):
        x = T(x)
        dims = _axes(ctx, x, axes)
        if dims is None:
            return kiln.clone(x) if ctx.op_type not in _POST else _POST[ctx.op_type](x)
        keep = bool(ctx.attr("keepdims", 1))
        if any(x.shape[d] == 0 for d in dims):
            return _empty(ctx, x, dims, keep)
        if not dims:
            return kiln.clone(x)
        return fn(x, tuple(dims), keep)
    return run


def _prod(x, dims, keep):
    for d in reversed(dims):
        x = kiln.prod(x, d, keepdim=keep) if keep else kiln.prod(x, d)
    return x


def _maxmin(fn):
    def run(x, dims, keep):
        if x.dtype is kiln.bool:
            return fn(x.to(kiln.uint8), dims, keep).to(kiln.bool)
        return fn(x, dims, keep)
    return run


_POST = {"ReduceL1": kiln.abs, "ReduceL2": lambda x: kiln.sqrt(x * x),
         "ReduceSumSquare": lambda x: x * x, "ReduceLogSum": kiln.log,
         "ReduceLogSumExp": lambda x: kiln.log(kiln.exp(x))}

for _name, _fn in {
    "ReduceSum": lambda x, d, k: kiln.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: kiln.mean(x, d, keepdim=k),
    "ReduceMax": _maxmin(lambda x, d, k: kiln.amax(x, d, keepdim=k)),
    "ReduceMin": _maxmin(lambda x, d, k: kiln.amin(x, d, keepdim=k)),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: kiln.sum(kiln.abs(x), d, keepdim=k),
    "ReduceL2": lambda x, d, k: kiln.sqrt(kiln.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: kiln.sum(x * x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: kiln.log(kiln.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: kiln.logsumexp(x, d, keepdim=k),
}.items():
    onnx_op(_name)(_reduce(_fn))


def _arg(fn):
    def run(ctx, x):
        x = T(x)
        ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            n = x.shape[ax]
            return (n - 1) - fn(kiln.flip(x, (ax,)), dim=ax, keepdim=keep)
        return fn(x, dim=ax, keepdim=keep)
    return run


onnx_op("ArgMax")(_arg(kiln.argmax))
onnx_op("ArgMin")(_arg(kiln.argmin))


@onnx_op("CumSum")
def cumsum(ctx, x, ax):
    x = T(x)
    ax = axis(ints(ctx.static(1))[0], x.ndim, ctx)
    if ctx.attr("reverse", 0):
        x = kiln.flip(x, (ax,))
    y = kiln.cumsum(x, ax).to(x.dtype)
    if ctx.attr("exclusive", 0):
        y = y - x
    if ctx.attr("reverse", 0):
        y = kiln.flip(y, (ax,))
    return y


@onnx_op("CumProd")
def cumprod(ctx, x, ax):
    x = T(x)
    ax = axis(ints(ctx.static(1))[0], x.ndim, ctx)
    if ctx.attr("reverse", 0):
        x = kiln.flip(x, (ax,))
    if ctx.attr("exclusive", 0):  # shift by one: the product of the elements before
        n = x.shape[ax]
        ones = kiln.ones_like(kiln.narrow(x, ax, 0, 1))
        x = kiln.cat([ones, kiln.narrow(x, ax, 0, n - 1)], ax) if n else x
    y = kiln.cumprod(x, ax).to(x.dtype)
    if ctx.attr("reverse", 0):
        y = kiln.flip(y, (ax,))
    return y


@onnx_op("TopK")
def topk(ctx, x, k=None):
    x = T(x)
    k = ctx.attr("k") if ctx.opset < 10 else ints(ctx.static(1))[0]
    ax = axis(ctx.attr("axis", -1), x.ndim, ctx)
    largest = bool(ctx.attr("largest", 1))
    values, indices = kiln.topk(x, int(k), dim=ax, largest=largest, sorted=True)
    return values, indices
