"""Comparisons, boolean logic and Where."""

from __future__ import annotations

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T


def _binary(op_type, fn):
    def run(ctx, a, b):
        return fn(T(a), T(b))
    run.__name__ = op_type.lower()
    onnx_op(op_type)(run)


for _name, _fn in {
    "Equal": kiln.eq, "Less": kiln.lt, "Greater": kiln.gt, "LessOrEqual": kiln.le,
    "GreaterOrEqual": kiln.ge, "And": kiln.logical_and, "Or": kiln.logical_or,
    "Xor": kiln.logical_xor,
}.items():
    _binary(_name, _fn)


@onnx_op("Not")
def not_(ctx, x):
    return kiln.logical_not(T(x))


@onnx_op("Where")
def where(ctx, cond, a, b):
    return kiln.where(T(cond), T(a), T(b))
