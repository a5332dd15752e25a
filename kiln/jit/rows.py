"""Row-wise native kernels: layer_norm forward and backward, softmax and log_softmax.

Each works on a C-contiguous float32 array viewed as (rows, D) and makes a few passes over one
row while it sits in L1 cache (max or mean, then a sum, then the output), instead of numpy's
passes over the whole array; rows are split across threads.  Row sums are float32 with several
vector accumulators (reassociated, like numpy's pairwise sums); the statistics are two-pass
(mean, then centred sums), as in PyTorch.  The column sums of the layer_norm weight and bias
gradients are accumulated in float64, per chunk of rows.

The public functions return None (False) when their inputs do not fit (dtype, layout, empty),
and the caller keeps its numpy path.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir

from kiln.jit import engine, mathlib, parallel
from kiln.jit.engine import F32, F64, I64, i64

_F32 = np.dtype(np.float32)
_REASSOC = ("reassoc",)
_P = ctypes.c_void_p
_L = ctypes.c_int64
_cache: dict = {}
# work_per_item for parallel.run is in its units (a float32 add of two arrays: 1 per element),
# measured single-threaded on the gpt shapes: layer_norm ~3, its backward ~5, softmax ~5


# -- IR helpers ---------------------------------------------------------------------------------


def _for(b: ir.IRBuilder, lo, hi, init, body):
    """``for i in [lo, hi): carried = body(i, carried)``; returns the final carried values."""
    fn = b.function
    pre = b.block
    loop = fn.append_basic_block("loop")
    after = fn.append_basic_block("after")
    b.cbranch(b.icmp_signed("<", lo, hi), loop, after)
    b.position_at_end(loop)
    i = b.phi(I64, "i")
    i.add_incoming(lo, pre)
    phis = []
    for v in init:
        p = b.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    new = body(i, phis)
    end = b.block
    i_next = b.add(i, i64(1))
    i.add_incoming(i_next, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    b.cbranch(b.icmp_signed("<", i_next, hi), loop, after)
    b.position_at_end(after)
    out = []
    for v0, v in zip(init, new):
        p = b.phi(v0.type)
        p.add_incoming(v0, pre)
        p.add_incoming(v, end)
        out.append(p)
    return out


def _function(mod, name, n_int, n_float, n_ptr):
    """``void name(i64 start, i64 stop, i64 x n_int, float x n_float, ptr x n_ptr)``, pointer
    arguments marked noalias (callers pass distinct arrays)."""
    ptypes = [I64, I64] + [I64] * n_int + [F32] * n_float + [ir.IntType(8).as_pointer()] * n_ptr
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), ptypes), name)
    for a in fn.args[2 + n_int + n_float:]:
        a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b


def _cast(b, ptr, ty):
    return b.bitcast(ptr, ty.as_pointer())


def _load(b, ptr, i):
    return b.load(b.gep(ptr, [i]))


def _sum(b, lo, hi, term):
    """The float32 sum of ``term(j)`` over [lo, hi) (reassociated: vectorized)."""
    zero = ir.Constant(F32, 0.0)
    return _for(b, lo, hi, [zero], lambda j, acc: [b.fadd(acc[0], term(j), flags=_REASSOC)])[0]


# Rows are processed in blocks: each pass over a block's rows before the next pass, so that
# the CPU overlaps the rows' reduction latencies (a short row is one dependent chain: max,
# horizontal reduction, exp, sum, division).
_BLOCK = 8


def _row_blocks(b, start, stop, d, passes):
    """For each block of up to _BLOCK rows in [start, stop): ``p(base, end, k)`` for each pass
    ``p`` over the block's rows (``base:end`` the row's elements, ``k`` its slot)."""
    blocks = b.sdiv(b.add(b.sub(stop, start), i64(_BLOCK - 1)), i64(_BLOCK))

    def block(i, _):
        r0 = b.add(start, b.mul(i, i64(_BLOCK)))
        r1 = b.add(r0, i64(_BLOCK))
        r1 = b.select(b.icmp_signed("<", r1, stop), r1, stop)
        for p in passes:
            def row(r, _, p=p):
                base = b.mul(r, d)
                p(base, b.add(base, d), b.sub(r, r0))
                return []
            _for(b, r0, r1, [], row)
        return []

    _for(b, i64(0), blocks, [], block)


def _compile(key, build, argtypes):
    fn = _cache.get(key)
    if fn is None:
        name = "rows_" + "_".join(str(k) for k in key)
        mod = engine.new_module(name)
        build(mod, name)
        fn = _cache[key] = engine.compile_module(mod, {name: argtypes})[name]
    return fn


def _stats_passes(b, x, d, eps, means, rstds):
    """Two row passes leaving each row's mean and 1 / sqrt(var + eps) in slot k of ``means``
    and ``rstds``: a first mean m0, then the sums of x - m0 and its square, which correct the
    mean (the corrected two-pass algorithm: rows with a large mean keep their bits)."""
    df = b.sitofp(d, F32)

    def first(base, end, k):
        b.store(b.fdiv(_sum(b, base, end, lambda j: _load(b, x, j)), df), b.gep(means, [k]))

    def second(base, end, k):
        m0 = _load(b, means, k)

        def moments(j, acc):
            c = b.fsub(_load(b, x, j), m0)
            return [b.fadd(acc[0], c, flags=_REASSOC),
                    b.fadd(acc[1], b.fmul(c, c), flags=_REASSOC)]

        zero = ir.Constant(F32, 0.0)
        s1, s2 = _for(b, base, end, [zero, zero], moments)
        shift = b.fdiv(s1, df)
        var = b.fsub(b.fdiv(s2, df), b.fmul(shift, shift))
        b.store(b.fadd(m0, shift), b.gep(means, [k]))
        rstd = b.fdiv(ir.Constant(F32, 1.0), mathlib.sqrt(b, b.fadd(var, eps)))
        b.store(rstd, b.gep(rstds, [k]))

    return first, second


# -- layer_norm ---------------------------------------------------------------------------------

def _build_ln_forward(has_w, has_b):
    def build(mod, name):
        fn, b = _function(mod, name, 1, 1, 4)
        start, stop, d, eps = fn.args[:4]
        x, w, bias, out = (_cast(b, p, F32) for p in fn.args[4:])
        means, rstds = b.alloca(F32, _BLOCK), b.alloca(F32, _BLOCK)

        def output(base, end, k):
            mean, rstd = _load(b, means, k), _load(b, rstds, k)

            def elem(j, _):
                y = b.fmul(b.fsub(_load(b, x, j), mean), rstd)
                i = b.sub(j, base)
                if has_w:
                    y = b.fmul(y, _load(b, w, i))
                if has_b:
                    y = b.fadd(y, _load(b, bias, i))
                b.store(y, b.gep(out, [j]))
                return []

            _for(b, base, end, [], elem)

        passes = _stats_passes(b, x, d, eps, means, rstds) + (output,)
        _row_blocks(b, start, stop, d, passes)
        b.ret_void()
    return build


def _fits(*arrays) -> bool:
    return all(a.dtype == _F32 and a.flags.c_contiguous for a in arrays)


def layer_norm(x2: np.ndarray, weight, bias, eps: float):
    """``(x - mean) * rstd * weight + bias`` per row of (M, D) ``x2``; weight and bias are (D,)
    arrays or None.  None when the inputs do not fit (float32, C-contiguous, non-empty)."""
    m, d = x2.shape
    params = [p for p in (weight, bias) if p is not None]
    if not m or not d or not _fits(x2, *params) or any(p.size != d for p in params):
        return None
    key = ("lnf", weight is not None, bias is not None)
    fn = _compile(key, _build_ln_forward(*key[1:]), (_L, _L, _L, ctypes.c_float) + (_P,) * 4)
    out = np.empty_like(x2)
    ptr = [p.ctypes.data if p is not None else None for p in (weight, bias)]
    parallel.run(fn, m, (d, ctypes.c_float(eps), x2.ctypes.data, ptr[0], ptr[1],
                         out.ctypes.data), work_per_item=3 * d)
    return out


def _build_ln_backward(has_w, want_x, want_wb):
    def build(mod, name):
        fn, b = _function(mod, name, 3, 1, 6)
        start, stop, rows, m, d, eps = fn.args[:6]
        x, g, w, dx = (_cast(b, p, F32) for p in fn.args[6:10])
        sum_w, sum_b = (_cast(b, p, F64) for p in fn.args[10:])
        df = b.sitofp(d, F32)
        means, rstds, shifts, scales = (b.alloca(F32, _BLOCK) for _ in range(4))
        at = []  # the current chunk's offset in sum_w and sum_b

        def gh(j, base):
            v = _load(b, g, j)
            return b.fmul(v, _load(b, w, b.sub(j, base))) if has_w else v

        def coefficients(base, end, k):
            mean, rstd = _load(b, means, k), _load(b, rstds, k)
            mg = b.fdiv(_sum(b, base, end, lambda j: gh(j, base)), df)
            cg = b.fdiv(_sum(b, base, end, lambda j: b.fmul(
                gh(j, base), b.fsub(_load(b, x, j), mean))), df)
            b.store(b.fmul(rstd, mg), b.gep(shifts, [k]))
            b.store(b.fmul(b.fmul(b.fmul(cg, rstd), rstd), rstd), b.gep(scales, [k]))

        def grad_x(base, end, k):
            mean, rstd = _load(b, means, k), _load(b, rstds, k)
            shift, scale = _load(b, shifts, k), _load(b, scales, k)

            def elem(j, _):
                xc = b.fsub(_load(b, x, j), mean)
                v = b.fsub(b.fmul(gh(j, base), rstd), shift)
                b.store(b.fsub(v, b.fmul(xc, scale)), b.gep(dx, [j]))
                return []

            _for(b, base, end, [], elem)

        def columns(base, end, k):
            mean, rstd = _load(b, means, k), _load(b, rstds, k)

            def col(j, _):
                gv = _load(b, g, j)
                xh = b.fmul(b.fsub(_load(b, x, j), mean), rstd)
                i = b.add(at[0], b.sub(j, base))
                for acc, v in ((sum_w, b.fmul(gv, xh)), (sum_b, gv)):
                    p = b.gep(acc, [i])
                    b.store(b.fadd(b.load(p), b.fpext(v, F64)), p)
                return []

            _for(b, base, end, [], col)

        passes = _stats_passes(b, x, d, eps, means, rstds)
        passes += (coefficients, grad_x) * want_x + (columns,) * want_wb

        def chunk(c, _):
            r0 = b.mul(c, rows)
            r1 = b.add(r0, rows)
            r1 = b.select(b.icmp_signed("<", r1, m), r1, m)
            at[:] = [b.mul(c, d)]
            _row_blocks(b, r0, r1, d, passes)
            return []

        _for(b, start, stop, [], chunk)
        b.ret_void()
    return build


def layer_norm_backward(x2: np.ndarray, g2: np.ndarray, weight, eps: float, parts, out):
    """layer_norm_backward for (M, D) ``x2`` and ``g2`` into ``out`` laid out as the primitive's
    (x's gradient, then weight's and bias's, for those in ``parts``); False when the inputs do
    not fit."""
    m, d = x2.shape
    params = [weight] if weight is not None else []
    if (not m or not d or g2.shape != x2.shape or not _fits(x2, g2, out, *params)
            or any(p.size != d for p in params)):
        return False
    want_x = "x" in parts
    want_wb = "w" in parts or "b" in parts
    key = ("lnb", weight is not None, want_x, want_wb)
    fn = _compile(key, _build_ln_backward(*key[1:]), (_L,) * 5 + (ctypes.c_float,) + (_P,) * 6)
    # chunks of rows: the column sums of each chunk go to its own float64 slot
    chunks = min(m, 64)
    rows = -(-m // chunks)
    chunks = -(-m // rows)
    part = np.zeros((2, chunks, d)) if want_wb else None
    dx = out.reshape(-1)[:m * d] if want_x else None
    arrays = (x2, g2, weight, dx) + ((part[0], part[1]) if want_wb else (None, None))
    ptrs = tuple(a.ctypes.data if a is not None else None for a in arrays)
    parallel.run(fn, chunks, (rows, m, d, ctypes.c_float(eps)) + ptrs,
                 work_per_item=rows * d * 5)
    if want_wb:
        sums = part.sum(1).astype(np.float32)
        flat = out.reshape(-1)
        at = m * d if want_x else 0
        for p, s in (("w", sums[0]), ("b", sums[1])):
            if p in parts:
                flat[at:at + d] = s
                at += d
    return True


# -- softmax and log_softmax --------------------------------------------------------------------

def _exp(b, v):
    """mathlib.exp, except that inputs below its range (masked entries) are computed as
    exp(0) before being replaced by 0: exp's clamped input yields a subnormal intermediate
    there, which the CPU computes in microcode (twice the time of a causally masked softmax)."""
    low = b.fcmp_ordered("<", v, mathlib.const(mathlib.EXP_LO))
    e = mathlib.exp(b, b.select(low, mathlib.const(0.0), v))
    return b.select(low, mathlib.const(0.0), e)



def _build_softmax(log):
    def build(mod, name):
        fn, b = _function(mod, name, 1, 0, 2)
        start, stop, n = fn.args[:3]
        x, out = (_cast(b, p, F32) for p in fn.args[3:])
        maxes, sums = b.alloca(F32, _BLOCK), b.alloca(F32, _BLOCK)

        def row_max(base, end, k):
            ninf = ir.Constant(F32, float("-inf"))
            mx = _for(b, base, end, [ninf],
                      lambda j, acc: [mathlib.fmax(b, acc[0], _load(b, x, j))])[0]
            b.store(mx, b.gep(maxes, [k]))

        def row_sum(base, end, k):
            mx = _load(b, maxes, k)
            if log:
                s = _sum(b, base, end, lambda j: _exp(b, b.fsub(_load(b, x, j), mx)))
                b.store(mathlib.log(b, s), b.gep(sums, [k]))
                return

            def ex(j):
                e = _exp(b, b.fsub(_load(b, x, j), mx))
                b.store(e, b.gep(out, [j]))
                return e

            b.store(b.fdiv(ir.Constant(F32, 1.0), _sum(b, base, end, ex)), b.gep(sums, [k]))

        def row_out(base, end, k):
            s = _load(b, sums, k)
            if log:
                mx = _load(b, maxes, k)

                def elem(j, _):
                    b.store(b.fsub(b.fsub(_load(b, x, j), mx), s), b.gep(out, [j]))
                    return []
            else:
                def elem(j, _):
                    p = b.gep(out, [j])
                    b.store(b.fmul(b.load(p), s), p)
                    return []

            _for(b, base, end, [], elem)

        _row_blocks(b, start, stop, n, (row_max, row_sum, row_out))
        b.ret_void()
    return build


# The vectorized loops step by up to 64 elements (16 lanes x 4 accumulators); the rest of a row
# runs in narrower vectors and scalar code, where exp costs ~10x more per element: rows whose
# remainder is over 1/8 of the row (short rows, 63, 100) are faster in numpy.
_VECTOR_STEP = 64


def softmax(x: np.ndarray, log: bool = False):
    """softmax (or log_softmax) over the last axis of ``x``, each row shifted by its own max;
    None when ``x`` does not fit (float32, C-contiguous, at least 1-d, non-empty, rows that
    vectorize: see _VECTOR_STEP)."""
    if x.ndim == 0 or not x.size or not _fits(x):
        return None
    n = x.shape[-1]
    if n % _VECTOR_STEP > n // 8:
        return None
    fn = _compile(("lsm" if log else "sm",), _build_softmax(log), (_L, _L, _L, _P, _P))
    out = np.empty_like(x)
    parallel.run(fn, x.size // n, (n, x.ctypes.data, out.ctypes.data), work_per_item=5 * n)
    return out
