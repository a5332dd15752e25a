"""Row-wise native kernels: layer_norm forward and backward, softmax, log_softmax and softmax's
backward.

Each works on a C-contiguous float32 array viewed as (rows, D) and makes a few passes over one
row while it sits in L1 cache (max or mean, then a sum, then the output), instead of numpy's
passes over the whole array; rows are split across threads.  layer_norm's rows of up to 512
elements (a multiple of 16) are loaded once into vector registers by kernels compiled for that
length.  Row sums are float32 with several vector accumulators (reassociated, like numpy's
pairwise sums); the statistics are two-pass (mean, then centred sums), as in PyTorch.  The
column sums of the layer_norm weight and bias gradients are accumulated in float64, per chunk
of rows (in float32 over at most 16 rows first, in the kernels for one row length).

The public functions return None (False) when their inputs do not fit (dtype, layout, empty),
and the caller keeps its numpy path.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir

from kiln.jit import engine, mathlib, parallel
from kiln.jit.engine import F32, F64, I64, i64
from kiln.jit.engine import address as _addr

_F32 = np.dtype(np.float32)
_REASSOC = ("reassoc",)
_P = ctypes.c_void_p
_L = ctypes.c_int64
_cache: dict = {}
_CHUNKS = 16  # layer_norm_backward's row chunks
# work_per_item for parallel.run is in its units (a float32 add of two arrays: 1 per element),
# measured single-threaded on the gpt shapes: layer_norm ~1.5 (rows held in registers; ~3 in
# the generic kernel), its backward ~3 (~5), softmax ~5, softmax_backward ~1.5


# -- IR helpers ---------------------------------------------------------------------------------


def _for(b: ir.IRBuilder, lo, hi, init, body):
    """``for i in [lo, hi): carried = body(i, carried)``; returns the final carried values."""
    return engine.loop(b, lo, hi, body, init)


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
        b.store(b.fdiv(engine.fsum(b, base, end, lambda j: _load(b, x, j)), df), b.gep(means, [k]))

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
    key = ("lnf", d, weight is not None, bias is not None)
    fn, held = _ln_kernel(key, _build_ln_forward_held, _build_ln_forward,
                          (_L, _L, _L, ctypes.c_float) + (_P,) * 4)
    out = np.empty_like(x2)
    ptr = [_addr(p) if p is not None else None for p in (weight, bias)]
    parallel.run(fn, m, (d, ctypes.c_float(eps), _addr(x2), ptr[0], ptr[1],
                         _addr(out)), work_per_item=(3 if held else 6) * d // 2)
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
            mg = b.fdiv(engine.fsum(b, base, end, lambda j: gh(j, base)), df)
            cg = b.fdiv(engine.fsum(b, base, end, lambda j: b.fmul(
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
    key = ("lnb", d, weight is not None, want_x, want_wb)
    fn, held = _ln_kernel(key, _build_ln_backward_held, _build_ln_backward,
                          (_L,) * 5 + (ctypes.c_float,) + (_P,) * 6)
    # chunks of rows (the units parallel.run splits, independent of the thread count): the
    # column sums of each chunk go to its own float64 slot, added up here
    chunks = min(m, _CHUNKS)
    rows = -(-m // chunks)
    chunks = -(-m // rows)
    part = np.zeros((2, chunks, d)) if want_wb else None
    dx = out.reshape(-1)[:m * d] if want_x else None
    arrays = (x2, g2, weight, dx) + ((part[0], part[1]) if want_wb else (None, None))
    ptrs = tuple(_addr(a) if a is not None else None for a in arrays)
    parallel.run(fn, chunks, (rows, m, d, ctypes.c_float(eps)) + ptrs,
                 work_per_item=rows * d * (3 if held else 5))
    if want_wb:
        sums = part.sum(1).astype(np.float32)
        flat = out.reshape(-1)
        at = m * d if want_x else 0
        for p, s in (("w", sums[0]), ("b", sums[1])):
            if p in parts:
                flat[at:at + d] = s
                at += d
    return True


# -- layer_norm over rows held in registers -----------------------------------------------------
# Rows whose length d is a multiple of _LANES, up to _MAX_HELD, get kernels compiled for that d:
# a row is loaded once as d / _LANES vectors and every pass (the mean, the centred moments, the
# output; in backward also the gradient sums and the terms of the weight and bias column sums)
# runs on those registers, fully unrolled, with tree-shaped sums.  The generic kernels above
# re-read the row from cache in each pass, with a loop, a vector epilogue and a horizontal sum
# per pass.  (On the gpt shape (1024, 128), one thread: forward ~= the generic kernel's time,
# which is bound by the row's dependent chain; backward ~0.6x.)

_LANES = 16
_VEC = ir.VectorType(F32, _LANES)
_VEC64 = ir.VectorType(F64, _LANES)
_MAX_HELD = 512
_FLUSH = 16  # backward: weight and bias column sums add float32 rows, flushed to float64 per 16
_held: dict = {}


def _held_fits(d: int) -> bool:
    return d % _LANES == 0 and 0 < d <= _MAX_HELD


def _vload(b, ptr, at):
    return b.load(b.bitcast(b.gep(ptr, [at]), _VEC.as_pointer()), align=4)


def _vstore(b, v, ptr, at):
    b.store(v, b.bitcast(b.gep(ptr, [at]), _VEC.as_pointer()), align=4)


def _held_stats(b, xs, d, eps):
    """A held row's (mean, 1 / sqrt(var + eps), mean - m0, the values centred on m0) with m0
    the first mean (the corrected two-pass algorithm, as in _stats_passes)."""
    df = ir.Constant(F32, float(d))
    m0 = b.fdiv(engine.hsum(b, xs), df)
    cs = [b.fsub(v, engine.splat(b, m0, _LANES)) for v in xs]
    shift = b.fdiv(engine.hsum(b, cs), df)
    var = b.fsub(b.fdiv(engine.hsum(b, [b.fmul(c, c) for c in cs]), df), b.fmul(shift, shift))
    rstd = b.fdiv(ir.Constant(F32, 1.0), mathlib.sqrt(b, b.fadd(var, eps)))
    return b.fadd(m0, shift), rstd, shift, cs


def _build_ln_forward_held(d, has_w, has_b):
    def build(mod, name):
        fn, b = _function(mod, name, 1, 1, 4)
        start, stop, _, eps = fn.args[:4]
        x, w, bias, out = (_cast(b, p, F32) for p in fn.args[4:])
        offs = [i64(i) for i in range(0, d, _LANES)]

        def row(r, _):
            base = b.mul(r, i64(d))
            ats = [b.add(base, o) for o in offs]
            xs = [_vload(b, x, at) for at in ats]
            mean, rstd, _, _ = _held_stats(b, xs, d, eps)
            vm, vr = engine.splat(b, mean, _LANES), engine.splat(b, rstd, _LANES)
            for v, at, o in zip(xs, ats, offs):
                y = b.fmul(b.fsub(v, vm), vr)
                if has_w:
                    y = b.fmul(y, _vload(b, w, o))
                if has_b:
                    y = b.fadd(y, _vload(b, bias, o))
                _vstore(b, y, out, at)
            return []

        _for(b, start, stop, [], row)
        b.ret_void()
    return build


def _build_ln_backward_held(d, has_w, want_x, want_wb):
    def build(mod, name):
        fn, b = _function(mod, name, 3, 1, 6)
        start, stop, rows, m, _, eps = fn.args[:6]
        x, g, w, dx = (_cast(b, p, F32) for p in fn.args[6:10])
        sum_w, sum_b = (_cast(b, p, F64) for p in fn.args[10:])
        df = ir.Constant(F32, float(d))
        offs = [i64(i) for i in range(0, d, _LANES)]
        n = len(offs)
        # float32 column sums of up to _FLUSH rows, in memory: held in registers next to the
        # row they would not fit.  An empty asm statement that may read the scratch and write
        # any memory keeps LLVM from promoting them (or the weights, or the float64 sums) to
        # registers across rows.
        acc = b.alloca(_VEC, 2 * n)
        barrier = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [acc.type]), "", "r,~{memory}",
                               True)
        slots = [b.gep(acc, [i64(i)]) for i in range(2 * n)]
        zero = ir.Constant(_VEC, [0.0] * _LANES)

        def row(r, _):
            b.call(barrier, [acc])
            base = b.mul(r, i64(d))
            ats = [b.add(base, o) for o in offs]
            xs = [_vload(b, x, at) for at in ats]
            gs = [_vload(b, g, at) for at in ats]
            mean, rstd, shift, cs = _held_stats(b, xs, d, eps)
            vm, vr = engine.splat(b, mean, _LANES), engine.splat(b, rstd, _LANES)
            xcs = [b.fsub(v, vm) for v in xs]
            if want_x:
                ghs = [b.fmul(v, _vload(b, w, o)) for v, o in zip(gs, offs)] if has_w else gs
                sg = engine.hsum(b, ghs)
                # sum(gh * (x - mean)) from the values centred on the first mean
                sgc = b.fsub(engine.hsum(b, [b.fmul(gv, c) for gv, c in zip(ghs, cs)]),
                             b.fmul(shift, sg))
                vs = engine.splat(b, b.fmul(rstd, b.fdiv(sg, df)), _LANES)
                r3 = b.fmul(b.fmul(rstd, rstd), rstd)
                vk = engine.splat(b, b.fmul(b.fdiv(sgc, df), r3), _LANES)
                for gh, xc, at in zip(ghs, xcs, ats):
                    v = b.fsub(b.fmul(gh, vr), vs)
                    _vstore(b, b.fsub(v, b.fmul(xc, vk)), dx, at)
            if want_wb:
                terms = [b.fmul(gv, b.fmul(xc, vr)) for gv, xc in zip(gs, xcs)] + gs
                for p, t in zip(slots, terms):
                    b.store(b.fadd(b.load(p), t), p)
            return []

        def block(s0, s1, c):
            for p in slots:
                b.store(zero, p)
            _for(b, s0, s1, [], row)
            b.call(barrier, [acc])
            for k, p in enumerate(slots):
                sums, o = (sum_w, offs[k]) if k < n else (sum_b, offs[k - n])
                q = b.bitcast(b.gep(sums, [b.add(b.mul(c, i64(d)), o)]), _VEC64.as_pointer())
                b.store(b.fadd(b.load(q, align=8), b.fpext(b.load(p), _VEC64)), q, align=8)

        def chunk(c, _):
            r0 = b.mul(c, rows)
            r1 = b.add(r0, rows)
            r1 = b.select(b.icmp_signed("<", r1, m), r1, m)
            if not want_wb:
                _for(b, r0, r1, [], row)
                return []
            blocks = b.sdiv(b.add(b.sub(r1, r0), i64(_FLUSH - 1)), i64(_FLUSH))

            def each(i, _):
                s0 = b.add(r0, b.mul(i, i64(_FLUSH)))
                s1 = b.add(s0, i64(_FLUSH))
                block(s0, b.select(b.icmp_signed("<", s1, r1), s1, r1), c)
                return []

            _for(b, i64(0), blocks, [], each)
            return []

        _for(b, start, stop, [], chunk)
        b.ret_void()
    return build


def _ln_kernel(key, held, generic, argtypes):
    """(kernel, True) for ``key``, compiled for the row length ``d`` (key[1]) when it fits
    _held_fits and the per-shape budget allows; else (the generic kernel, False)."""
    d = key[1]
    if _held_fits(d):
        fn = engine.shape_kernel(_held, key, lambda: _compile(key, held(*key[1:]), argtypes))
        if fn is not None:
            return fn, True
    return _compile(key[:1] + key[2:], generic(*key[2:]), argtypes), False


# -- softmax and log_softmax --------------------------------------------------------------------

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
                s = engine.fsum(b, base, end, lambda j: mathlib.exp(b, b.fsub(_load(b, x, j), mx)))
                b.store(mathlib.log(b, s), b.gep(sums, [k]))
                return

            def ex(j):
                e = mathlib.exp(b, b.fsub(_load(b, x, j), mx))
                b.store(e, b.gep(out, [j]))
                return e

            b.store(b.fdiv(ir.Constant(F32, 1.0), engine.fsum(b, base, end, ex)), b.gep(sums, [k]))

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
    parallel.run(fn, x.size // n, (n, _addr(x), _addr(out)), work_per_item=5 * n)
    return out


# -- softmax_backward ----------------------------------------------------------------------------

def _build_softmax_backward(mod, name):
    fn, b = _function(mod, name, 1, 0, 3)
    start, stop, n = fn.args[:3]
    g, y, out = (_cast(b, p, F32) for p in fn.args[3:])
    sums = b.alloca(F32, _BLOCK)

    def row_sum(base, end, k):
        s = engine.fsum(b, base, end, lambda j: b.fmul(_load(b, g, j), _load(b, y, j)))
        b.store(s, b.gep(sums, [k]))

    def row_out(base, end, k):
        s = _load(b, sums, k)

        def elem(j, _):
            v = b.fmul(_load(b, y, j), b.fsub(_load(b, g, j), s))
            b.store(v, b.gep(out, [j]))
            return []

        _for(b, base, end, [], elem)

    _row_blocks(b, start, stop, n, (row_sum, row_out))
    b.ret_void()


def softmax_backward(g: np.ndarray, y: np.ndarray):
    """softmax's gradient ``y * (g - sum(g * y))`` over the last axis, one pass per row (the
    row's sum while it is in L1 cache, then the output); None when ``g`` and ``y`` do not fit
    (float32, the same shape, at least 1-d, non-empty, ``y`` C-contiguous; ``g`` is copied to
    contiguous rows when it is not)."""
    if y.ndim == 0 or not y.size or g.shape != y.shape or g.dtype != _F32 or not _fits(y):
        return None
    g = np.ascontiguousarray(g)
    n = y.shape[-1]
    fn = _compile(("smb",), _build_softmax_backward, (_L, _L, _L, _P, _P, _P))
    out = np.empty_like(y)
    parallel.run(fn, y.size // n, (n, _addr(g), _addr(y), _addr(out)),
                 work_per_item=3 * n // 2)
    return out
