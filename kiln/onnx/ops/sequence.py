"""Sequences (Python lists of tensors) and optionals (``None`` when empty, else the value)."""

from __future__ import annotations

import numpy as np

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T, arr, axis


def _seq(x, ctx):
    if not isinstance(x, list):
        raise TypeError(f"{ctx.op_type} expects a sequence, got {type(x).__name__}")
    return x


def _position(ctx, seq, i, insert=False):
    n = len(seq)
    if i is None:
        return n if insert else n - 1
    p = int(arr(ctx.static(i)).reshape(-1)[0])
    hi = n if insert else n - 1
    if not -n <= p <= hi:
        raise IndexError(f"{ctx.op_type}: position {p} is out of range for a sequence of {n}")
    return p + n if p < 0 else p


@onnx_op("SequenceEmpty")
def sequence_empty(ctx):
    return []


@onnx_op("SequenceConstruct")
def sequence_construct(ctx, *xs):
    return list(xs)


@onnx_op("SequenceLength")
def sequence_length(ctx, seq):
    return np.array(len(_seq(seq, ctx)), np.int64)


@onnx_op("SequenceAt")
def sequence_at(ctx, seq, pos):
    seq = _seq(seq, ctx)
    return seq[_position(ctx, seq, 1)]


@onnx_op("SequenceInsert")
def sequence_insert(ctx, seq, x, pos=None):
    seq = list(_seq(seq, ctx))
    seq.insert(_position(ctx, seq, None if pos is None else 2, insert=True), x)
    return seq


@onnx_op("SequenceErase")
def sequence_erase(ctx, seq, pos=None):
    seq = list(_seq(seq, ctx))
    del seq[_position(ctx, seq, None if pos is None else 1)]
    return seq


@onnx_op("ConcatFromSequence")
def concat_from_sequence(ctx, seq):
    xs = [T(x) for x in _seq(seq, ctx)]
    if ctx.attr("new_axis", 0):
        ax = axis(ctx.attr("axis"), xs[0].ndim + 1, ctx)
        return kiln.stack(xs, ax)
    return kiln.cat(xs, axis(ctx.attr("axis"), xs[0].ndim, ctx))


@onnx_op("SplitToSequence")
def split_to_sequence(ctx, x, split=None):
    x = T(x)
    ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
    n = x.shape[ax]
    if split is None:
        parts = list(kiln.split(x, 1, ax))
        if not ctx.attr("keepdims", 1):
            parts = [kiln.squeeze(p, ax) for p in parts]
        return parts
    sizes = arr(ctx.static(1))
    if sizes.ndim == 0:
        k = int(sizes)
        sizes = [k] * (n // k) + ([n % k] if n % k else [])
    return list(kiln.split(x, [int(s) for s in sizes], ax))


@onnx_op("Optional")
def optional(ctx, x=None):
    return x


@onnx_op("OptionalHasElement")
def optional_has_element(ctx, x=None):
    return np.array(x is not None)


@onnx_op("OptionalGetElement")
def optional_get_element(ctx, x):
    if x is None:
        raise ValueError("OptionalGetElement of an empty optional")
    return x
