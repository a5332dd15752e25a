"""Eager arithmetic on big float32 arrays (add, sub, mul, div, relu and its gradient, where) as
one native pass split over the machine's cores.

numpy runs each of these on one core. The kernels compute the same IEEE operations (add, sub,
mul, div, compare, select), so results are bitwise numpy's, infinities, NaN and signed zeros
included: ``relu`` is ``np.maximum(x, 0)`` (NaN kept, -0.0 -> +0.0) and its gradient is
``np.where(y > 0, g, 0)``. (When both operands of an arithmetic op are NaN, the result is NaN with
either one's payload: the hardware returns its first operand's, and neither numpy's loops nor
LLVM fix the operand order.) ``run`` returns None (the caller keeps numpy) for small arrays,
other dtypes, broadcasts that ``expr.layout`` cannot describe, and non-contiguous full-size
inputs (a copy would cost the pass the kernel saves).
"""

from __future__ import annotations

import math

import numpy as np

from kiln.jit import expr as X
from kiln.jit import parallel

# Below this many elements (of the largest input) numpy is as fast: a native call costs ~5 us
# of Python and ctypes. Above it one native thread beats numpy where numpy's loop is slow or
# takes several passes (where, relu and its gradient, adds of a bias or per-row value: 1.1-4x),
# and parallel.run adds the second core. Plain same-shape or scalar arithmetic is as fast in
# numpy on one core: it runs natively only from PLAIN_SIZE elements on two or more threads.
# Re-measure (numpy vs run() over sizes, 1 and 2 threads) when parallel.run's handoff changes.
MIN_SIZE = 1 << 16
PLAIN_SIZE = 4 * MIN_SIZE

_ndarray = np.ndarray
_F32 = np.dtype(np.float32)
_BOOL = np.dtype(np.bool_)

# op -> (expression over inputs, dtype letter per input)
_OPS = {
    "add": (lambda a, b: a + b, "ff"),
    "sub": (lambda a, b: a - b, "ff"),
    "mul": (lambda a, b: a * b, "ff"),
    "div": (lambda a, b: a / b, "ff"),
    "relu": (lambda x: X.maximum(x, 0.0), "f"),
    "relu_backward": (lambda g, y: X.where(y > 0.0, g, 0.0), "ff"),
    "where": (lambda c, x, y: X.where(c, x, y), "bff"),
}
_DTYPE = {"f": _F32, "b": _BOOL}

# (op, shapes, dtypes) -> (kernel, kinds, output shape, row length, size if plain else 0)
# or None
_plans: dict = {}
_MAX_PLANS = 4096


def _plan(op: str, arrays):
    build, letters = _OPS[op]
    if any(a.dtype != _DTYPE[c] for a, c in zip(arrays, letters)):
        return None
    shapes = [a.shape for a in arrays]
    try:
        out_shape = np.broadcast_shapes(*shapes)
    except ValueError:  # numpy raises its own message
        return None
    lay = X.layout(shapes, out_shape)
    if lay is None:
        return None
    k, kinds = lay
    kern = X.kernel(f"eager_{op}", len(arrays), build, in_kinds=kinds, in_dtypes=letters,
                    noalias=True)
    plain = op in ("add", "sub", "mul", "div") and set(kinds) <= {"full", "scalar"}
    size = math.prod(out_shape)
    return kern, tuple(kinds), out_shape, max(math.prod(out_shape[k:]), 1), size * plain


def run(op: str, arrays: tuple, out: np.ndarray | None = None) -> np.ndarray | None:
    """``op`` over ``arrays`` (numpy broadcasting) in a fresh float32 array, or into ``out``
    (C-contiguous float32 of the result's shape, overlapping no input unless it is that input
    exactly); None (nothing written) when the numpy implementation should run instead."""
    for a in arrays:
        if type(a) is _ndarray and a.size >= MIN_SIZE:
            break
    else:
        return None
    for a in arrays:
        if type(a) is not _ndarray:
            return None
    key = (op,) + tuple((a.shape, a.dtype) for a in arrays)
    plan = _plans.get(key, False)
    if plan is False:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = _plan(op, arrays)
    if plan is None:
        return None
    kern, kinds, out_shape, cols, plain_size = plan
    if plain_size and (plain_size < PLAIN_SIZE or parallel.num_threads() < 2):
        return None
    if out is not None and (out.dtype != _F32 or out.shape != out_shape
                            or not out.flags.c_contiguous or any(
                                a is not out and np.may_share_memory(a, out) for a in arrays)):
        return None
    ins = []  # holds the contiguous copies alive during the call
    for a, kind in zip(arrays, kinds):
        if not a.flags.c_contiguous:
            if kind == "full":
                return None
            a = np.ascontiguousarray(a)
        ins.append(a)
    if out is None:
        out = np.empty(out_shape, _F32)
    kern([out], ins, cols)  # the row length kept in the plan: ~3 us less than working it out
    return out
