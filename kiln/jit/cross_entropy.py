"""Softmax cross-entropy of (N, C) float32 logits against int64 class indices, and its
gradient, each one pass over the rows in one native call.

The numpy path takes about fifteen small array operations (max, subtract, exp, row sums, log,
a gather, the ignore_index mask, the mean); at a classifier's sizes (64 x 10) each costs a few
microseconds of call overhead, ~50 us a step in all.  Here one kernel computes exp(x - max)
over the whole array (short rows make poor vector loops), then per row
``loss = log(sum(exp(x - shift))) + shift - x[t]`` with the global max as the shift (a row
whose sum underflows is redone with its own max, as the numpy path does).  Rows whose target
is ``ignore_index`` count for nothing, and the kernel reports how many rows counted and
whether any target was out of range (the caller's numpy path then raises PyTorch's error).
The sum over rows is a float32 sum in row order; exp is kiln/jit/mathlib.py's (a few ulp from
numpy's).  Single-threaded: a whole batch takes microseconds.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir

from kiln.jit import engine, mathlib
from kiln.jit.engine import F32, I64, address, i64

_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)
_P = ctypes.c_void_p
_L = ctypes.c_int64
_kernels: dict = {}
NONE, SUM, MEAN = 0, 1, 2  # the kernels' reduction codes
# a row whose sum of exp(x - global max) is above this kept its largest terms in the normal
# range, so the global max is a safe shift (as kiln/nn/loss.py's numpy path)
_SAFE_SUM = 1e-30
_CODES = {"none": NONE, "sum": SUM, "mean": MEAN}


def _max(b, x, n):
    """The max of the n floats at ``x`` (NaN ignored, as maxnum)."""
    return engine.loop(b, i64(0), n, lambda j, a: [mathlib.fmax(b, a[0], b.load(b.gep(x, [j])))],
                       [ir.Constant(F32, float("-inf"))])[0]


def _row_stats(b, x, c):
    """(max, sum of exp(x - max)) of the row at float* ``x`` of ``c`` elements (i64)."""
    mx = _max(b, x, c)
    return mx, engine.fsum(b, i64(0), c, lambda j: mathlib.exp(b, b.fsub(b.load(b.gep(
        x, [j])), mx)))


def _exps(b, x, e, size):
    """e = exp(x - max(x)) over the whole array (two loops LLVM vectorizes; short rows make
    poor vector loops), and that max (the caller checks that it is finite)."""
    mx = _max(b, x, size)

    def ex(j, _):
        b.store(mathlib.exp(b, b.fsub(b.load(b.gep(x, [j])), mx)), b.gep(e, [j]))
        return []

    engine.loop(b, i64(0), size, ex, [])
    return mx


def _shift_and_sum(b, x, e, c, gmax):
    """(shift, sum of exp(x - shift)) for the row at ``x`` whose exp(x - gmax) are at ``e``:
    the global max when the row's sum stays well within float range, else the row's max
    (recomputed)."""
    s = engine.fsum(b, i64(0), c, lambda j: b.load(b.gep(e, [j])))
    ok = b.and_(b.fcmp_ordered(">", s, ir.Constant(F32, _SAFE_SUM)),
                b.fcmp_ordered("<", mathlib.fabs(b, gmax), ir.Constant(F32, float("inf"))))
    entry = b.block
    slow = b.append_basic_block("row_max")
    join = b.append_basic_block("row_done")
    b.cbranch(ok, join, slow)
    b.position_at_end(slow)
    rmx, rs = _row_stats(b, x, c)
    slow_end = b.block
    b.branch(join)
    b.position_at_end(join)
    shift, total = b.phi(F32), b.phi(F32)
    shift.add_incoming(gmax, entry)
    shift.add_incoming(rmx, slow_end)
    total.add_incoming(s, entry)
    total.add_incoming(rs, slow_end)
    return shift, total


def _signature(mod, name, n_int, n_ptr):
    i8p = ir.IntType(8).as_pointer()
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64] * n_int + [i8p] * n_ptr), name)
    for a in fn.args[n_int:]:
        a.add_attribute("noalias")
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _build_forward(mod, name):
    """``name(n, c, ignore, reduction, x, t, work)``: work = [the reduced loss, rows that
    count, targets out of range, the loss per row (0 where ignored)..., n * c scratch]."""
    fn, b = _signature(mod, name, 4, 3)
    n, c, ignore, reduction = fn.args[:4]
    x, work = (b.bitcast(fn.args[k], F32.as_pointer()) for k in (4, 6))
    t = b.bitcast(fn.args[5], I64.as_pointer())
    loss = b.gep(work, [i64(3)])
    e = b.gep(loss, [n])
    gmax = _exps(b, x, e, b.mul(n, c))

    def row(r, acc):
        valid, bad, total = acc
        tr = b.load(b.gep(t, [r]))
        at = b.mul(r, c)
        xr = b.gep(x, [at])
        ignored = b.icmp_signed("==", tr, ignore)
        out_of_range = b.and_(b.not_(ignored), b.or_(b.icmp_signed("<", tr, i64(0)),
                                                     b.icmp_signed(">=", tr, c)))
        skip = b.or_(ignored, out_of_range)
        shift, s = _shift_and_sum(b, xr, b.gep(e, [at]), c, gmax)
        value = b.fsub(b.fadd(mathlib.log(b, s), shift),
                       b.load(b.gep(xr, [b.select(skip, i64(0), tr)])))
        value = b.select(skip, ir.Constant(F32, 0.0), value)
        b.store(value, b.gep(loss, [r]))
        return [b.add(valid, b.zext(b.not_(skip), I64)), b.add(bad, b.zext(out_of_range, I64)),
                b.fadd(total, value)]

    valid, bad, total = engine.loop(b, i64(0), n, row, [i64(0), i64(0),
                                                      ir.Constant(F32, 0.0)])
    count = b.sitofp(valid, F32)
    mean = b.icmp_signed("==", reduction, i64(MEAN))
    b.store(b.select(mean, b.fdiv(total, count), total), work)  # 0 rows counted: nan
    b.store(count, b.gep(work, [i64(1)]))
    b.store(b.sitofp(bad, F32), b.gep(work, [i64(2)]))
    b.ret_void()


def _build_backward(mod, name):
    """``name(n, c, ignore, reduction, x, t, g, grad)``: grad[r] = (softmax(x[r]) -
    onehot(t[r])) * scale, scale = g[r] (NONE), g (SUM) or g / rows that count (MEAN); zero
    rows where ignored."""
    fn, b = _signature(mod, name, 4, 4)
    n, c, ignore, reduction = fn.args[:4]
    x, g, grad = (b.bitcast(fn.args[k], F32.as_pointer()) for k in (4, 6, 7))
    t = b.bitcast(fn.args[5], I64.as_pointer())
    valid = engine.loop(b, i64(0), n, lambda r, a: [b.add(a[0], b.zext(b.icmp_signed(
        "!=", b.load(b.gep(t, [r])), ignore), I64))], [i64(0)])[0]
    g0 = b.load(g)
    mean = b.fdiv(g0, b.sitofp(valid, F32))
    shared = b.select(b.icmp_signed("==", reduction, i64(MEAN)), mean, g0)
    per_row = b.icmp_signed("==", reduction, i64(NONE))
    gmax = _exps(b, x, grad, b.mul(n, c))  # grad holds exp(x - gmax) until scaled

    def row(r, _):
        tr = b.load(b.gep(t, [r]))
        at = b.mul(r, c)
        xr, gr = b.gep(x, [at]), b.gep(grad, [at])
        ignored = b.icmp_signed("==", tr, ignore)
        shift, total = _shift_and_sum(b, xr, gr, c, gmax)
        sc = b.select(per_row, b.load(b.gep(g, [b.select(per_row, r, i64(0))])), shared)
        sc = b.select(ignored, ir.Constant(F32, 0.0), sc)
        k = b.fdiv(sc, total)
        own = b.fcmp_unordered("!=", shift, gmax)  # a row shifted by its own max

        def elems(exp_of):
            def elem(j, _):
                p = b.fmul(exp_of(j), k)
                hit = b.and_(b.icmp_signed("==", j, tr), b.not_(ignored))
                b.store(b.select(hit, b.fsub(p, sc), p), b.gep(gr, [j]))
                return []
            engine.loop(b, i64(0), c, elem, [])

        with b.if_else(own) as (recompute, stored):
            with recompute:
                elems(lambda j: mathlib.exp(b, b.fsub(b.load(b.gep(xr, [j])), shift)))
            with stored:
                elems(lambda j: b.load(b.gep(gr, [j])))
        return []

    engine.loop(b, i64(0), n, row, [])
    b.ret_void()


def _kernel(kind):
    fn = _kernels.get(kind)
    if fn is None:
        name = f"cross_entropy_{kind}"
        mod = engine.new_module(name)
        (_build_forward if kind == "fwd" else _build_backward)(mod, name)
        ptrs = 3 if kind == "fwd" else 4
        fn = _kernels[kind] = engine.compile_module(mod, {name: (_L,) * 4 + (_P,) * ptrs})[
            name]
    return fn


def _fits(x: np.ndarray, t: np.ndarray) -> bool:
    return (x.dtype == _F32 and x.ndim == 2 and x.shape[0] > 0 and x.shape[1] > 0
            and x.flags.c_contiguous and t.dtype == _I64 and t.shape == x.shape[:1]
            and t.flags.c_contiguous)


def forward(x: np.ndarray, t: np.ndarray, reduction: str, ignore_index: int):
    """The loss ("sum" and "mean": 0-d, "none": per row), or None when the arrays do not fit or
    a target is out of range (the numpy path raises)."""
    if not _fits(x, t):
        return None
    n, c = x.shape
    work = np.empty(3 + n + n * c, _F32)
    _kernel("fwd")(n, c, int(ignore_index), _CODES[reduction], address(x), address(t),
                   address(work))
    if work[2]:
        return None
    return work[3:3 + n] if reduction == "none" else work[0:1].reshape(())


def backward(x: np.ndarray, t: np.ndarray, g: np.ndarray, reduction: str, ignore_index: int):
    """The logits' gradient for the loss's gradient ``g`` (0-d, or per row for "none"), or
    None when the arrays do not fit."""
    if not _fits(x, t):
        return None
    reduction = _CODES[reduction]
    g = np.asarray(g, dtype=_F32)
    if not g.flags.c_contiguous:
        g = np.ascontiguousarray(g)
    if g.shape != ((x.shape[0],) if reduction == NONE else ()):
        return None
    n, c = x.shape
    grad = np.empty((n, c), _F32)
    _kernel("bwd")(n, c, int(ignore_index), reduction, address(x), address(t),
                   address(g), address(grad))
    return grad
