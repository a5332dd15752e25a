"""Native im2col pieces of kiln.ops.conv's channels-last paths, parallel over images: the padded
NHWC copy of the input (``nhwc_padded``), the window gather (``gather_rows``: the full im2col
and ``_corr_rows``' row unfold) and ``_corr_rows``' shifted row sums written NCHW
(``corr_rows_sum``).

Each function fills exactly the array the numpy path fills (a copy, or the same float32 adds in
the same order), so results are bitwise equal.  One kernel per geometry: every size and stride
is a compile-time constant, so the copy loops unroll and vectorise.  Inputs are float32 and
C-contiguous; the callers in kiln.ops.conv check that and pad the input first.
"""

from __future__ import annotations

import ctypes

import numpy as np

from llvmlite import ir

from kiln.jit import engine, parallel
from kiln.jit.engine import F32, address, i64, loop

_cache: dict = {}
_P = ctypes.c_void_p
_PF = F32.as_pointer()



def _at(b, base, *terms):
    """``base + sum(index * stride)`` for (index value, constant stride) pairs."""
    off = base
    for v, s in terms:
        off = b.add(off, b.mul(v, i64(s)))
    return off


def _copy(b, dst, src, d0, s0, n: int, sstep: int) -> None:
    """``dst[d0 + t] = src[s0 + t * sstep]`` for t in range(n)."""
    loop(b, 0, n, lambda t: b.store(b.load(b.gep(src, [_at(b, s0, (t, sstep))])),
                                 b.gep(dst, [b.add(d0, t)])))


def _compiled(key, name, emit, n_ptrs: int):
    """The cached kernel ``name(start, stop, *pointers)`` whose per-image body ``emit`` builds,
    or None when the shape budget is spent (engine.SHAPE_KERNELS)."""
    return engine.shape_kernel(_cache, key, lambda: _build(name, emit, n_ptrs))


def _build(name, emit, n_ptrs: int):
    mod = engine.new_module(name)
    engine.range_function(mod, name, [_PF] * n_ptrs, emit)
    sig = (ctypes.c_int64, ctypes.c_int64) + (_P,) * n_ptrs
    return engine.compile_module(mod, {name: sig})[name]


def gather_rows(cols, xp, kh, kw, stride, dilation, Ho, Wo) -> bool:
    """``cols[(n, ho, wo), (i, j, c)] = xp[n, ho*s0 + i*d0, wo*s1 + j*d1, c]`` for the first
    kh*kw*C columns of ``cols`` (N*Ho*Wo rows, unit column stride); ``xp`` is the padded NHWC
    input (contiguous)."""
    N, Hp, Wp, C = xp.shape
    (s0, s1), (d0, d1) = stride, dilation
    r = cols.strides[0] // 4
    run, nj = (kw * C, 1) if d1 == 1 else (C, kw)  # contiguous source run, runs per window row
    key = ("rows", Hp, Wp, C, kh, kw, s0, s1, d0, d1, Ho, Wo, r)

    def emit(b, n, dst, src):
        sb = b.mul(n, i64(Hp * Wp * C))
        db = b.mul(n, i64(Ho * Wo * r))
        loop(b, 0, Ho, lambda ho: loop(b, 0, Wo, lambda wo: loop(b, 0, kh, lambda i: loop(
            b, 0, nj, lambda j: _copy(
                b, dst, src, _at(b, db, (ho, Wo * r), (wo, r), (i, kw * C), (j, C)),
                _at(b, sb, (ho, s0 * Wp * C), (i, d0 * Wp * C), (wo, s1 * C), (j, d1 * C)),
                run, 1)))))

    fn = _compiled(key, f"im2col_rows_{len(_cache)}", emit, 2)
    if fn is None:
        return False
    if N and Ho * Wo:
        parallel.run(fn, N, (address(cols), address(xp)),
                     work_per_item=Ho * Wo * kh * kw * C)
    return True


def corr_rows_sum(out, Y, bias, d0: int) -> bool:
    """``out[n, o, ho, wo] = (Y[n, ho, wo, 0, o] + bias[o]) + Y[n, ho + d0, wo, 1, o] + ...``
    summed left to right (no bias term when ``bias`` is None): the shifted row sums of
    ``_corr_rows``, written NCHW.  ``Y`` is (N, Hp, Wo, kh, O), ``out`` (N, O, Ho, Wo), both
    contiguous."""
    N, Hp, Wo, kh, O = Y.shape
    Ho = out.shape[2]
    has_bias = bias is not None
    key = ("corr_sum", Hp, Wo, kh, O, Ho, d0, has_bias)
    ys = Wo * kh * O  # one Y row (ho) of an image

    def emit(b, n, dst, src, bp):
        yb = b.mul(n, i64(Hp * ys))
        ob = b.mul(n, i64(O * Ho * Wo))

        def one(ho, wo, o):
            at = _at(b, yb, (ho, ys), (wo, kh * O), (o, 1))
            v = b.load(b.gep(src, [at]))
            if has_bias:
                v = b.fadd(v, b.load(b.gep(bp, [o])))
            for i in range(1, kh):
                v = b.fadd(v, b.load(b.gep(src, [b.add(at, i64(i * d0 * ys + i * O))])))
            b.store(v, b.gep(dst, [_at(b, ob, (o, Ho * Wo), (ho, Wo), (wo, 1))]))

        loop(b, 0, Ho, lambda ho: loop(b, 0, Wo, lambda wo: loop(
            b, 0, O, lambda o: one(ho, wo, o))))

    fn = _compiled(key, f"corr_rows_sum_{len(_cache)}", emit, 3)
    if fn is None:
        return False
    if bias is not None:
        bias = np.ascontiguousarray(bias)  # the kernel reads O consecutive floats
    if N and out.size:
        parallel.run(fn, N, (address(out), address(Y),
                             None if bias is None else address(bias)),
                     work_per_item=Ho * Wo * O * kh)
    return True


def nhwc_padded(xp, x, pads) -> bool:
    """``xp[n, pt + h, pl + w, c] = x[n, c, h, w]``, zero elsewhere: the padded channels-last
    copy of a contiguous NCHW ``x`` into ``xp`` (N, H + pt + pb, W + pl + pr, C); pads >= 0."""
    N, C, H, W = x.shape
    pt, pb, pl, pr = pads
    Hp, Wp = xp.shape[1:3]
    key = ("nhwc", C, H, W, pt, pb, pl, pr)
    zero = ir.Constant(F32, 0.0)

    def fill(b, dst, at, n):
        loop(b, 0, n, lambda t: b.store(zero, b.gep(dst, [b.add(at, t)])))

    def emit(b, n, dst, src):
        db = b.mul(n, i64(Hp * Wp * C))
        sb = b.mul(n, i64(C * H * W))
        fill(b, dst, db, pt * Wp * C)
        fill(b, dst, b.add(db, i64((pt + H) * Wp * C)), pb * Wp * C)

        def row(h):
            rb = _at(b, db, (h, Wp * C), (i64(1), pt * Wp * C))
            fill(b, dst, rb, pl * C)
            fill(b, dst, b.add(rb, i64((pl + W) * C)), pr * C)
            loop(b, 0, W, lambda w: _copy(b, dst, src, _at(b, rb, (w, C), (i64(1), pl * C)),
                                       _at(b, sb, (h, W), (w, 1)), C, H * W))

        loop(b, 0, H, row)

    fn = _compiled(key, f"nhwc_{len(_cache)}", emit, 2)
    if fn is None:
        return False
    if N and xp.size:
        parallel.run(fn, N, (address(xp), address(x)), work_per_item=Hp * Wp * C)
    return True
