"""Direct 2-d convolution kernels (stride 1, dilation 1, groups 1, float32), parallel over
images, as oneDNN's jit convolutions do it: output channels in <16 x float> vectors, a block of
output pixels (or of weight taps) held in registers as independent accumulators, one broadcast
input value times one weight vector per FMA.  No im2col matrix, no gemm.

- ``conv2d``: ``out[n, o, h, w] = b[o] + sum_{c, i, j} xp[n, h + i, w + j, c] * w[o, c, i, j]``
  from the padded NHWC copy ``xp``; weights as (kh, kw*C, O) so a tap's weights are contiguous
  vectors.  The input gradient of a stride-1 convolution is the same kernel on the padded
  output gradient with the flipped, transposed weight (``conv_transpose2d``).
- ``conv2d_weight``: ``dw[o, c, i, j] = sum_{n, h, w} gy[n, o, h, w] * xp[n, h + i, w + j, c]``,
  a block of weight taps in registers per pass over an image (its gy transposed channels last
  in 16x16 register tiles), one partial sum per thread, added at the end.

Sums run in a different order than the gemm path's: results agree with it to float32 rounding
of sums of C*kh*kw (or N*Ho*Wo) products, not bitwise.  Each function returns False when it
does not apply (the caller keeps its numpy path).
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir

from kiln.jit import engine, parallel
from kiln.jit.engine import F32, I32, I64, address, i64

_cache: dict = {}
_P = ctypes.c_void_p
_PF = F32.as_pointer()
VW = 16  # floats per vector (one AVX-512 register)
_VEC = ir.VectorType(F32, VW)
_ACC = 28  # accumulator registers per block (of 32; the rest hold weights or inputs)
ENABLED = True  # False: every function declines (tests of the im2col paths turn it off)
# conv2d and conv_transpose2d: measured faster than the gemm paths (1 thread) for reductions
# of up to 1152 (= 128*3*3) products per output; at 2304 (256 channels, 3x3) the gemm wins
# (conv2d_weight won on every shape tried).  Below MIN_WORK multiply-adds a call is too small
# to repay a kernel's compilation (~0.1-0.3 s).
MAX_REDUCTION = 1152
MIN_WORK = 1 << 20
_HAS_AVX512: bool | None = None


def _loop(b: ir.IRBuilder, n, init: list, body) -> list:
    """``vals = init; for i in range(n): vals = body(i, vals)``; returns the final ``vals``."""
    return engine.loop(b, 0, n, body, init)


def _at(b, base, *terms):
    """``base + sum(index * stride)`` for (index value, constant stride) pairs."""
    off = base
    for v, s in terms:
        off = b.add(off, b.mul(v, i64(s)) if s != 1 else v)
    return off


def _vload(b, ptr, off):
    return b.load(b.bitcast(b.gep(ptr, [off]), _VEC.as_pointer()), align=4)


def _vstore(b, v, ptr, off):
    b.store(v, b.bitcast(b.gep(ptr, [off]), _VEC.as_pointer()), align=4)


def _store_first(b, v, k: int, ptr, off) -> None:
    """``ptr[off:off + k] = v[:k]`` in power-of-two pieces (no masked stores)."""
    done = 0
    for size in (16, 8, 4, 2, 1):
        if k - done < size:
            continue
        at = b.gep(ptr, [b.add(off, i64(done))])
        if size == 1:
            b.store(b.extract_element(v, ir.Constant(I32, done)), at)
        else:
            part = v if size == VW else b.shuffle_vector(
                v, v, ir.Constant(ir.VectorType(I32, size), list(range(done, done + size))))
            b.store(part, b.bitcast(at, ir.VectorType(F32, size).as_pointer()), align=4)
        done += size


def _build(name, emit, ptr_types: list):
    mod = engine.new_module(name)
    fma = engine.intrinsic(mod, "llvm.fma.v16f32", _VEC, [_VEC] * 3)
    engine.range_function(mod, name, ptr_types, lambda b, n, *p: emit(b, fma, n, *p))
    sig = (ctypes.c_int64, ctypes.c_int64) + (_P,) * len(ptr_types)
    return engine.compile_module(mod, {name: sig})[name]


def _co_block(nv: int) -> int:
    """Output-channel vectors per block: all of them up to 3, else 2 (or 1), so that a block's
    weights stay in cache and several pixels share each broadcast."""
    return nv if nv <= 3 else 2 if nv % 2 == 0 else 1


def _fwd_kernel(Hp, Wp, C, O, kh, kw, Ho, Wo, has_bias, pix):
    """``name(start, stop, out, xp, wt, bias)`` over images; see ``conv2d``."""
    nv = _co_block(O // VW)
    K = kw * C  # the taps of one kernel row are contiguous in xp: (w + j) * C + c
    # two output rows per block when there is one channel vector: each input row's broadcasts
    # then feed both (rows h and h + 1).  Not for short tap rows (C = 1: measured slower).
    R = 2 if nv == 1 and Ho >= 2 and K >= 16 else 1
    pix = max(1, min(pix, _ACC // (nv * R)))
    pw = -(-Wo // -(-Wo // pix))  # the widest of nearly equal blocks of at most pix pixels

    def emit(b, fma, n, out, xp, wt, bias):
        xb = b.mul(n, i64(Hp * Wp * C))
        ob = b.mul(n, i64(O * Ho * Wo))
        zero = ir.Constant(_VEC, None)

        def taps(acc, h, w0, pw, co, r, uses):
            """FMAs of input row h + r (a runtime or constant offset) into the block rows
            ``uses`` [(block row, kernel row i)]."""
            rb = _at(b, xb, (h, Wp * C), (r, Wp * C), (w0, C))

            def tap(j, acc):
                acc = list(acc)
                wv = {(i, v): _vload(b, wt, _at(b, co, (i, K * O), (j, O), (i64(v * VW), 1)))
                      for _, i in uses for v in range(nv)}
                for p in range(pw):
                    s = engine.splat(b, b.load(b.gep(xp, [_at(b, rb, (j, 1), (i64(p), C))])), VW)
                    for rr, i in uses:
                        for v in range(nv):
                            a = (rr * pw + p) * nv + v
                            acc[a] = b.call(fma, [s, wv[i, v], acc[a]])
                return acc

            return _loop(b, K, acc, tap)

        def block(h, rows, w0, pw, cb):
            co = b.mul(cb, i64(nv * VW))  # the block's first output channel
            init = [_vload(b, bias, b.add(co, i64(v * VW))) if has_bias else zero
                    for v in range(nv)]
            acc = [init[v] for _ in range(rows * pw) for v in range(nv)]
            if rows == 1:
                acc = _loop(b, kh, acc, lambda i, acc: taps(acc, h, w0, pw, co, i, [(0, i)]))
            else:
                for r in range(kh + rows - 1):
                    uses = [(rr, i64(r - rr)) for rr in range(rows) if 0 <= r - rr < kh]
                    acc = taps(acc, h, w0, pw, co, i64(r), uses)
            for rr in range(rows):
                for p0 in range(0, pw, VW):  # pixels back to NCHW rows, 16 at a time
                    k = min(VW, pw - p0)
                    for v in range(nv):
                        rs = [acc[(rr * pw + p0 + p) * nv + v] for p in range(k)]
                        for o, t in enumerate(engine.transpose(b, rs + [zero] * (VW - k))):
                            at = _at(b, ob, (i64((v * VW + o) * Ho * Wo + rr * Wo + p0), 1),
                                     (w0, 1), (h, Wo), (co, Ho * Wo))
                            _store_first(b, t, k, out, at)
            return []

        def row_block(h, rows):
            def span(w0, pw):
                _loop(b, O // (nv * VW), [], lambda cb, _: block(h, rows, w0, pw, cb))
                return []

            # equal blocks of pw pixels in a loop (one copy of the code), then the rest
            _loop(b, Wo // pw, [], lambda wb, _: span(b.mul(wb, i64(pw)), pw))
            if Wo % pw:
                span(i64(Wo - Wo % pw), Wo % pw)
            return []

        _loop(b, Ho // R, [], lambda hb, _: row_block(b.mul(hb, i64(R)), R))
        if Ho % R:
            row_block(i64(Ho - Ho % R), Ho % R)

    return emit


def _nhwc(x, pads):
    """The padded NHWC copy of float32 NCHW ``x`` (pads >= 0), or None."""
    from kiln.jit import im2col

    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    pt, pb, pl, pr = pads
    xp = np.empty((N, H + pt + pb, W + pl + pr, C), np.float32)
    return xp if im2col.nhwc_padded(xp, x, pads) else None


def _avx512() -> bool:
    """Whether the host has AVX-512: the register blocking assumes 32 registers of 16 floats
    (with AVX2's 16 of 8 the accumulators would spill; the gemm paths stay).  ``_HAS_AVX512``
    overrides the detection (tests)."""
    return engine.has_avx512() if _HAS_AVX512 is None else _HAS_AVX512


def _applies(x, w, pads, channels: int, work: int) -> bool:
    return (ENABLED and _avx512() and x.dtype == np.float32 and w.dtype == np.float32
            and channels % VW == 0 and min(pads) >= 0 and x.shape[0] > 0 and work >= MIN_WORK)


def conv2d(out, x, w, bias, pads, pix: int = 14) -> bool:
    """``out`` (N, O, Ho, Wo, contiguous float32) = the stride-1 convolution of NCHW ``x`` with
    OIHW ``w`` (O a multiple of 16) and ``bias`` (None or (O,)), padding (top, bottom, left,
    right) >= 0.  False (nothing written) when the shape does not apply."""
    return _forward(out, x, w, bias, pads, pix)


def _forward(out, x, w, bias, pads, pix):
    O, C, kh, kw = w.shape
    if not (_applies(x, w, pads, O, out.size * C * kh * kw) and C * kh * kw <= MAX_REDUCTION
            and out.flags.c_contiguous and out.dtype == np.float32
            and (bias is None or bias.dtype == np.float32)):
        return False
    N, _, H, W = x.shape
    Ho, Wo = out.shape[2:]
    Hp, Wp = H + pads[0] + pads[1], W + pads[2] + pads[3]
    if (Ho, Wo) != (Hp - kh + 1, Wp - kw + 1) or not Ho * Wo:
        return False
    key = ("fwd", Hp, Wp, C, O, kh, kw, bias is not None, pix)
    fn = engine.shape_kernel(_cache, key, lambda: _build(
        f"conv_fwd_{len(_cache)}", _fwd_kernel(Hp, Wp, C, O, kh, kw, Ho, Wo, bias is not None,
                                               pix), [_PF] * 4))
    if fn is None:
        return False
    xp = _nhwc(x, pads)
    if xp is None:
        return False
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (kh, kw, C, O)
    bias = None if bias is None else np.ascontiguousarray(bias)
    parallel.run(fn, N, (address(out), address(xp), address(wt),
                         None if bias is None else address(bias)),
                 work_per_item=Ho * Wo * O * C * kh * kw)
    return True


def conv_transpose2d(g, w, pads):
    """The input gradient (N, C, H, W) of a stride-1 convolution with OIHW ``w`` whose output
    gradient is ``g`` (N, O, Ho, Wo) and whose padding was ``pads``; None when the direct kernel
    does not apply (C a multiple of 16, pads at most kernel size - 1)."""
    O, C, kh, kw = w.shape
    fp = (kh - 1 - pads[0], kh - 1 - pads[1], kw - 1 - pads[2], kw - 1 - pads[3])
    flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    if not _applies(g, flipped, fp, C, g.size * C * kh * kw):
        return None
    N, _, Ho, Wo = g.shape
    out = np.empty((N, C, Ho + fp[0] + fp[1] - kh + 1, Wo + fp[2] + fp[3] - kw + 1), np.float32)
    return out if _forward(out, g, flipped, None, fp, 14) else None


def _tap_grid(kh: int, K: int, nv: int) -> tuple:
    """(bi, bj): the tap block (bi kernel rows by bj of the K = kw*C taps in a row) that the
    weight-gradient kernel keeps in registers; divisors of kh and K, at most ~24 vectors."""
    most = 25 // nv
    return max(((bi, bj) for bi in range(1, kh + 1) if kh % bi == 0
                for bj in range(1, K + 1) if K % bj == 0 and bi * bj <= most),
               key=lambda t: (t[0] * t[1], t[1]))


def _channels_last(b, dst, src, base, O: int, HW: int) -> None:
    """``dst[p * O + o] = src[base + o * HW + p]``: one image's (O, HW) plane stack
    transposed, in 16x16 register tiles (O a multiple of 16), the last HW % 16 pixels one by
    one."""
    full = HW // VW

    def tile(t, _):
        p0 = b.mul(t, i64(VW))
        for ob in range(O // VW):
            rows = [_vload(b, src, _at(b, base, (p0, 1), (i64((ob * VW + o) * HW), 1)))
                    for o in range(VW)]
            for p, v in enumerate(engine.transpose(b, rows)):
                _vstore(b, v, dst, _at(b, i64(p * O + ob * VW), (p0, O)))
        return []

    _loop(b, full, [], tile)

    def pixel(p, _):
        p = b.add(p, i64(full * VW))

        def ch(o, _):
            v = b.load(b.gep(src, [_at(b, base, (o, HW), (p, 1))]))
            b.store(v, b.gep(dst, [_at(b, o, (p, O))]))
            return []
        return _loop(b, O, [], ch)

    _loop(b, HW - full * VW, [], pixel)


def _wgrad_kernel(Hp, Wp, C, O, kh, kw, Ho, Wo):
    """``name(start, stop, parts, xp, gy, scratch, bounds)`` over parts: part ``i`` adds the
    products of images ``bounds[i]:bounds[i + 1]`` into ``parts[i]`` (kh, kw, C, O), using
    ``scratch[i]`` (Ho*Wo*O floats); see ``conv2d_weight``."""
    nv = _co_block(O // VW)
    K = kw * C
    HW = Ho * Wo
    bi, bj = _tap_grid(kh, K, nv)

    def emit(b, fma, item, parts, xp, gy, scratch, bounds):
        gt = b.gep(scratch, [b.mul(item, i64(HW * O))])  # one image's gy, channels last
        pb = b.mul(item, i64(kh * K * O))
        lo = b.load(b.gep(bounds, [item]))
        hi = b.load(b.gep(bounds, [b.add(item, i64(1))]))

        def image(k, _):
            n = b.add(lo, k)
            gb = b.mul(n, i64(O * HW))
            xb = b.mul(n, i64(Hp * Wp * C))

            _channels_last(b, gt, gy, gb, O, HW)

            def block(ib, jb, cb):
                co = b.mul(cb, i64(nv * VW))  # the block's first output channel
                xo = _at(b, xb, (ib, bi * Wp * C), (jb, bj))  # the block's first tap
                po = _at(b, pb, (ib, bi * K * O), (jb, bj * O), (co, 1))
                offs = [r * Wp * C + c for r in range(bi) for c in range(bj)]
                acc = [ir.Constant(_VEC, None)] * (len(offs) * nv)  # per image: short sums

                def hrow(h, acc):
                    def pix(w, acc):
                        gv = [_vload(b, gt, _at(b, co, (i64(v * VW), 1), (h, Wo * O), (w, O)))
                              for v in range(nv)]
                        xw = _at(b, xo, (h, Wp * C), (w, C))
                        acc = list(acc)
                        for t, off in enumerate(offs):
                            s = engine.splat(b, b.load(b.gep(xp, [b.add(xw, i64(off))])), VW)
                            for v in range(nv):
                                acc[t * nv + v] = b.call(fma, [s, gv[v], acc[t * nv + v]])
                        return acc
                    return _loop(b, Wo, acc, pix)

                acc = _loop(b, Ho, acc, hrow)
                for t in range(len(offs)):
                    r, c = divmod(t, bj)
                    for v in range(nv):
                        at = b.add(po, i64((r * K + c) * O + v * VW))
                        _vstore(b, b.fadd(_vload(b, parts, at), acc[t * nv + v]), parts, at)
                return []

            _loop(b, kh // bi, [], lambda ib, _: _loop(b, K // bj, [], lambda jb, _: _loop(
                b, O // (nv * VW), [], lambda cb, _: block(ib, jb, cb))))
            return []

        _loop(b, b.sub(hi, lo), [], image)

    return emit


def conv2d_weight(x, g, pads, kernel):
    """The weight gradient (O, C, kh, kw) of a stride-1 convolution of NCHW ``x`` whose output
    gradient is ``g`` (N, O, Ho, Wo, O a multiple of 16); None when the kernel does not
    apply."""
    if not _applies(x, g, pads, g.shape[1], g.size * x.shape[1] * kernel[0] * kernel[1]):
        return None
    N, C, H, W = x.shape
    _, O, Ho, Wo = g.shape
    kh, kw = kernel
    Hp, Wp = H + pads[0] + pads[1], W + pads[2] + pads[3]
    if (Ho, Wo) != (Hp - kh + 1, Wp - kw + 1) or not Ho * Wo:
        return None
    key = ("wgrad", Hp, Wp, C, O, kh, kw)
    fn = engine.shape_kernel(_cache, key, lambda: _build(
        f"conv_wgrad_{len(_cache)}", _wgrad_kernel(Hp, Wp, C, O, kh, kw, Ho, Wo),
        [_PF] * 4 + [I64.as_pointer()]))
    if fn is None:
        return None
    xp = _nhwc(x, pads)
    if xp is None:
        return None
    g = np.ascontiguousarray(g)
    P = max(1, min(parallel.num_threads(), N))
    bounds = np.array([N * i // P for i in range(P + 1)], np.int64)
    parts = np.zeros((P, kh, kw, C, O), np.float32)
    scratch = np.empty((P, Ho * Wo * O), np.float32)
    parallel.run(fn, P, (address(parts), address(xp), address(g), address(scratch),
                         address(bounds)), work_per_item=1 << 30)
    dw = parts[0] if P == 1 else parts.sum(axis=0)
    return np.ascontiguousarray(dw.transpose(3, 2, 0, 1))
