"""Native 2-d max pooling: window maxima and/or their indices in one pass, and the backward
scatter, parallel over the (N*C) planes of float32 NCHW arrays.

One kernel per shape and pool configuration (everything is a compile-time constant, so the tap
loops unroll and the interior of each plane vectorises; only the border rows and columns, whose
windows reach into the padding, test each tap).  The rule is PyTorch's CPU kernel and the numpy
path's: scan the window's real taps in row-major order, starting from -inf at the first real
tap, and take a tap when ``v > max or isnan(v)`` (first maximum on ties, the last NaN wins).
Indices are flat ``h*W + w`` within the plane (int64).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
from llvmlite import ir

from kiln.jit import engine, mathlib, parallel
from kiln.jit.engine import F32, I64, address, i64, loop

_cache: dict = {}
_P = ctypes.c_void_p
_SIG = (ctypes.c_int64, ctypes.c_int64, _P, _P, _P)



def _interior(n_out: int, L: int, k: int, s: int, p: int, d: int) -> tuple[int, int]:
    """The outputs ``[lo, hi)`` whose windows lie wholly inside ``[0, L)``."""
    lo = min(-(-p // s), n_out)
    last = L - 1 - (k - 1) * d + p  # the largest window start (plus p) that still fits
    hi = max(min(n_out, last // s + 1 if last >= 0 else 0), lo)
    return lo, hi


# the primitives' two kernels share a module (compiling one has a fixed cost of ~40 ms)
_GROUPS = {"values": ("values", "indices"), "indices": ("values", "indices"), "both": ("both",)}


def _build_pool(name, H, W, Ho, Wo, kernel, stride, padding, dilation, modes):
    """{mode: compiled kernel} for one geometry."""
    mod = engine.new_module(name)
    for mode in modes:
        _emit_pool(mod, f"{name}_{mode}", H, W, Ho, Wo, kernel, stride, padding, dilation, mode)
    fns = engine.compile_module(mod, {f"{name}_{mode}": _SIG for mode in modes})
    return {mode: fns[f"{name}_{mode}"] for mode in modes}


def _emit_pool(mod, name, H, W, Ho, Wo, kernel, stride, padding, dilation, mode):
    pf, pi = F32.as_pointer(), I64.as_pointer()
    engine.range_function(
        mod, name, (pf, pf, pi),
        lambda b, plane, x, val, idx: _pool_plane(b, plane, x, val, idx, H, W, Ho, Wo, kernel,
                                                  stride, padding, dilation, mode),
        noalias=True)


def _pool_plane(b, plane, x, val, idx, H, W, Ho, Wo, kernel, stride, padding, dilation, mode):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = b.gep(x, [b.mul(plane, i64(H * W))])
    vp = b.gep(val, [b.mul(plane, i64(Ho * Wo))])
    ip = b.gep(idx, [b.mul(plane, i64(Ho * Wo))])
    neg_inf = ir.Constant(F32, float("-inf"))

    def taps(b, o, k, s, p, d, n, checked):
        """Per tap: (position, valid or None) along one axis."""
        base = b.sub(b.mul(o, i64(s)), i64(p))
        out = []
        for t in range(k):
            pos = b.add(base, i64(t * d))
            ok = b.icmp_unsigned("<", pos, i64(n)) if checked else None
            out.append((pos, ok))
        return out

    def first_valid(b, tp):
        pos = tp[-1][0]
        for q, ok in reversed(tp):
            pos = q if ok is None else b.select(ok, q, pos)
        return pos

    def window(b, ho, wo, check_h, check_w):
        rows = taps(b, ho, kh, sh, ph, dh, H, check_h)
        cols = taps(b, wo, kw, sw, pw, dw, W, check_w)
        m = neg_inf
        k = b.add(b.mul(first_valid(b, rows), i64(W)), first_valid(b, cols))
        for h, hok in rows:
            hs = h if hok is None else b.select(hok, h, i64(0))
            row = b.mul(hs, i64(W))
            for w, wok in cols:
                ws = w if wok is None else b.select(wok, w, i64(0))
                at = b.add(row, ws)
                v = b.load(b.gep(xp, [at]))
                new = b.or_(b.fcmp_ordered(">", v, m), mathlib.is_nan(b, v))
                for ok in (hok, wok):
                    if ok is not None:
                        new = b.and_(new, ok)
                m = b.select(new, v, m)
                if mode != "values":
                    k = b.select(new, at, k)
        o = b.add(b.mul(ho, i64(Wo)), wo)
        if mode != "indices":
            b.store(m, b.gep(vp, [o]))
        if mode != "values":
            b.store(k, b.gep(ip, [o]))

    h_lo, h_hi = _interior(Ho, H, kh, sh, ph, dh)
    w_lo, w_hi = _interior(Wo, W, kw, sw, pw, dw)
    for r0, r1, ch in ((0, h_lo, True), (h_lo, h_hi, False), (h_hi, Ho, True)):
        for c0, c1, cw in ((0, w_lo, True), (w_lo, w_hi, False), (w_hi, Wo, True)):
            if r1 > r0 and c1 > c0:
                loop(b, r0, r1, lambda ho, c0=c0, c1=c1, ch=ch, cw=cw: loop(
                    b, c0, c1, lambda wo: window(b, ho, wo, ch, cw)))


def max_pool2d(x, kernel, stride, padding, dilation, Ho, Wo, mode="values"):
    """Window maxima (``mode`` 'values'), their plane indices ('indices') or both (a tuple) of
    ``x`` (float32, NCHW) for an ``(Ho, Wo)`` output; padding is symmetric, and ceil mode's
    overhang is implied by ``(Ho, Wo)``. None when the shape budget is spent."""
    N, C, H, W = x.shape
    modes = _GROUPS[mode]
    key = ("pool", H, W, Ho, Wo, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation),
           modes)
    fns = engine.shape_kernel(_cache, key, lambda: _build_pool(
        f"max_pool_{len(_cache)}", H, W, Ho, Wo, kernel, stride, padding, dilation, modes))
    if fns is None:
        return None
    fn = fns[mode]
    x = np.ascontiguousarray(x)
    val = np.empty((N, C, Ho, Wo), np.float32) if mode != "indices" else None
    idx = np.empty((N, C, Ho, Wo), np.int64) if mode != "values" else None
    if N * C and Ho * Wo:
        work = Ho * Wo * math.prod(kernel) + H * W
        parallel.run(fn, N * C, (address(x), _ptr(val), _ptr(idx)), work_per_item=work)
    if mode == "values":
        return val
    return idx if mode == "indices" else (val, idx)


def _ptr(a):
    return None if a is None else address(a)


def _build_scatter(name, HW, L):
    mod = engine.new_module(name)
    pf, pi = F32.as_pointer(), I64.as_pointer()
    engine.range_function(
        mod, name, (pf, pi, pf, pi),
        lambda b, plane, g, idx, out, bad: _scatter_plane(b, plane, g, idx, out, bad, HW, L),
        noalias=True)
    sig = (ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P)
    return engine.compile_module(mod, {name: sig})[name]


def _scatter_plane(b, plane, g, idx, out, bad, HW, L):
    op = b.gep(out, [b.mul(plane, i64(HW))])
    gp = b.gep(g, [b.mul(plane, i64(L))])
    ip = b.gep(idx, [b.mul(plane, i64(L))])
    loop(b, 0, HW, lambda i: b.store(ir.Constant(F32, 0.0), b.gep(op, [i])))

    def add(o):
        k = b.load(b.gep(ip, [o]))
        ok = b.icmp_unsigned("<", k, i64(HW))
        with b.if_else(ok) as (then, otherwise):
            with then:
                at = b.gep(op, [k])
                b.store(b.fadd(b.load(at), b.load(b.gep(gp, [o]))), at)
            with otherwise:
                b.store(i64(1), bad)

    loop(b, 0, L, add)


def pool_scatter(g, idx, in_hw):
    """``out[n, c].flat[idx[n, c, i]] += g[n, c, i]`` in order into zeros of shape
    ``(N, C) + in_hw``; None when some index is outside its plane (the caller's numpy path then
    decides what that means)."""
    if g.ndim != 4 or idx.shape != g.shape:
        return None
    N, C = g.shape[:2]
    HW, L = in_hw[0] * in_hw[1], math.prod(g.shape[2:])
    key = ("scatter", HW, L)
    fn = engine.shape_kernel(_cache, key,
                             lambda: _build_scatter(f"pool_scatter_{len(_cache)}", HW, L))
    if fn is None:
        return None
    g = np.ascontiguousarray(g)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    out = np.empty((N, C) + tuple(in_hw), np.float32)
    bad = np.zeros(1, np.int64)
    if out.size:
        parallel.run(fn, N * C, (address(g), address(idx), address(out),
                                 address(bad)), work_per_item=HW + 2 * L)
    return None if bad[0] else out


__all__ = ["max_pool2d", "pool_scatter"]
