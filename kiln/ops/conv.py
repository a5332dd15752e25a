"""Convolutions (conv1d/2d, transposed), pooling (max, average, adaptive) and dropout, NCHW.

Convolution is im2col + one BLAS matmul.  Three primitives, each the adjoint of the others in
one argument, so every gradient (and gradient of gradient) is again one of them:

    conv2d(x, w)            -> y    the forward convolution
    conv_transpose2d(g, w)  -> x    its input gradient (transposed convolution)
    conv2d_weight(x, g)     -> w    its weight gradient

Two im2col layouts, chosen per call by which gathers the longer contiguous runs:
- "rows" (channels last): a (N*Ho*Wo, kh*kw*C) matrix gathered from an NHWC copy of the padded
  input (runs of kw*C values), multiplied in one large gemm; best when channels are many and
  images small (the second conv layer of a LeNet: 16 channels, 14x14).
- "planes" (per sample): a (N, C*kh*kw, Ho*Wo) stack gathered from NCHW (runs of Wo values) and
  multiplied by a batched matmul that writes NCHW directly; best for few channels on large
  images (a first conv layer on 1 or 3 channels), and used for grouped convolutions.
Where "rows" is chosen and the stride along H is 1, conv2d skips the full im2col: it unfolds
along W only (kh times less memory), multiplies once by all row taps side by side and sums the
kh shifted row blocks (``_corr_rows``); conv_transpose2d with stride 1 is then the same full
correlation with the flipped kernel instead of a gemm followed by a col2im scatter-add.
Padding is (top, bottom, left, right); a negative amount crops, which expresses transposed
convolutions' output_padding and the floor in the output-size formula exactly.
With kiln.jit on an AVX-512 CPU, float32 stride-1 convolutions whose output channels are a
multiple of 16 run kiln.jit.conv_direct's direct kernels instead (no im2col, no gemm; ``_direct``).
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.lib.stride_tricks import as_strided

from kiln.ops.elementwise import mul
from kiln.ops.reduce import sum as _rsum
from kiln.ops.registry import primitive
from kiln.random import _rng
from kiln.tensor import Tensor, _make

__all__ = ["conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "max_pool1d",
           "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "dropout", "dropout1d", "dropout2d", "dropout3d"]

_SNAME = {"float32": "Float", "float64": "Double", "float16": "Half", "int64": "Long",
          "int32": "Int", "int16": "Short", "int8": "Char", "uint8": "Byte", "bool": "Bool"}


# -- numpy helpers -------------------------------------------------------------------------------

def _pad_hw(x, pads, axes=(2, 3), fill=0):
    """``x`` padded by (top, bottom, left, right) on ``axes``; negative amounts crop."""
    pt, pb, pl, pr = pads
    if not (pt or pb or pl or pr):
        return x
    ah, aw = axes
    H, W = x.shape[ah], x.shape[aw]
    if pt < 0 or pb < 0 or pl < 0 or pr < 0:
        idx = [slice(None)] * x.ndim
        idx[ah] = slice(max(-pt, 0), H - max(-pb, 0))
        idx[aw] = slice(max(-pl, 0), W - max(-pr, 0))
        x = x[tuple(idx)]
        pt, pb, pl, pr = max(pt, 0), max(pb, 0), max(pl, 0), max(pr, 0)
        H, W = x.shape[ah], x.shape[aw]
        if not (pt or pb or pl or pr):
            return x
    shape = list(x.shape)
    shape[ah] += pt + pb
    shape[aw] += pl + pr
    out = np.zeros(shape, x.dtype) if fill == 0 else np.full(shape, fill, x.dtype)
    idx = [slice(None)] * x.ndim
    idx[ah] = slice(pt, pt + H)
    idx[aw] = slice(pl, pl + W)
    out[tuple(idx)] = x
    return out


def _rows_layout(C: int, kw: int, Wo: int, groups: int) -> bool:
    return groups == 1 and C * kw >= Wo


def _native_gather(*arrays) -> bool:
    """Whether kiln.jit's im2col kernels run: JIT on and every array float32."""
    from kiln import jit

    return jit.available() and all(a.dtype == np.float32 for a in arrays)


def _direct(stride, dilation, groups, *arrays):
    """kiln.jit.conv_direct when its kernels may run (JIT on, float32, stride 1, no dilation or
    groups), else None; its functions return False/None for shapes they do not take."""
    if stride == (1, 1) and dilation == (1, 1) and groups == 1 and _native_gather(*arrays):
        from kiln.jit import conv_direct

        return conv_direct
    return None


def _nhwc_padded(x, pads):
    """A contiguous NHWC copy of ``x`` with padding, written in one pass."""
    pt, pb, pl, pr = pads
    if pt < 0 or pb < 0 or pl < 0 or pr < 0:
        x = _pad_hw(x, (min(pt, 0), min(pb, 0), min(pl, 0), min(pr, 0)))
        pt, pb, pl, pr = max(pt, 0), max(pb, 0), max(pl, 0), max(pr, 0)
    N, C, H, W = x.shape
    if _native_gather(x) and x.flags.c_contiguous:
        from kiln.jit import im2col

        xp = np.empty((N, H + pt + pb, W + pl + pr, C), x.dtype)
        if im2col.nhwc_padded(xp, x, (pt, pb, pl, pr)):
            return xp
    if not (pt or pb or pl or pr):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    xp = np.zeros((N, H + pt + pb, W + pl + pr, C), x.dtype)
    xp[:, pt:pt + H, pl:pl + W, :] = x.transpose(0, 2, 3, 1)
    return xp


def _row_windows(x, kh, kw, stride, pads, dilation, Ho, Wo):
    """The (N, Ho, Wo, kh, kw, C) read-only view of the padded channels-last input's windows."""
    N, C = x.shape[:2]
    xp = _nhwc_padded(x, pads)
    s0, s1, s2, s3 = xp.strides
    return as_strided(xp, (N, Ho, Wo, kh, kw, C),
                      (s0, s1 * stride[0], s2 * stride[1], s1 * dilation[0], s2 * dilation[1],
                       s3), writeable=False)


def _cols_rows(x, kh, kw, stride, pads, dilation, Ho, Wo, ones=False):
    """im2col, channels last: (N*Ho*Wo, kh*kw*C), plus a column of ones with ``ones`` (the
    bias then rides along in the gemm instead of costing a pass over the output)."""
    N, C = x.shape[:2]
    K = kh * kw * C
    if not ones and not _native_gather(x):
        return _row_windows(x, kh, kw, stride, pads, dilation, Ho, Wo).reshape(N * Ho * Wo, K)
    cols = np.empty((N * Ho * Wo, K + ones), x.dtype)
    _cols_rows_into(cols, x, kh, kw, stride, pads, dilation, Ho, Wo)
    if ones:
        cols[:, K] = 1
    return cols


def _plane_windows(x, kh, kw, stride, pads, dilation, Ho, Wo, groups):
    """The (N, G, C/G, kh, kw, Ho, Wo) read-only view of the padded input's windows."""
    N, C = x.shape[:2]
    xp = _pad_hw(x, pads)
    s0, s1, s2, s3 = xp.strides
    cg = C // groups
    return as_strided(xp, (N, groups, cg, kh, kw, Ho, Wo),
                      (s0, s1 * cg, s1, s2 * dilation[0], s3 * dilation[1], s2 * stride[0],
                       s3 * stride[1]), writeable=False)


def _cols_planes(x, kh, kw, stride, pads, dilation, Ho, Wo, groups, ones=False):
    """im2col, per sample and group: (N, G, C/G*kh*kw, Ho*Wo), plus a row of ones."""
    N, C = x.shape[:2]
    K = C // groups * kh * kw
    if not ones:
        win = _plane_windows(x, kh, kw, stride, pads, dilation, Ho, Wo, groups)
        return win.reshape(N, groups, K, Ho * Wo)
    cols = np.empty((N, groups, K + 1, Ho * Wo), x.dtype)
    _cols_planes_into(cols, x, kh, kw, stride, pads, dilation, Ho, Wo, groups)
    cols[:, :, K] = 1
    return cols


def _cols_rows_into(cols, x, kh, kw, stride, pads, dilation, Ho, Wo):
    """``_cols_rows`` gathered into the first kh*kw*C columns of ``cols`` (N*Ho*Wo, >= K)."""
    C = x.shape[1]
    if _native_gather(x, cols) and cols.strides[1] == 4 and cols.strides[0] % 4 == 0:
        from kiln.jit import im2col

        if im2col.gather_rows(cols, _nhwc_padded(x, pads), kh, kw, stride, dilation, Ho, Wo):
            return
    win = _row_windows(x, kh, kw, stride, pads, dilation, Ho, Wo)
    it, r = cols.itemsize, cols.strides[0]
    np.copyto(as_strided(cols, win.shape, (Ho * Wo * r, Wo * r, r, kw * C * it, C * it, it)),
              win)


def _cols_planes_into(cols, x, kh, kw, stride, pads, dilation, Ho, Wo, groups):
    """``_cols_planes`` gathered into the first C/G*kh*kw rows of each group of ``cols``
    (N, G, >= K, Ho*Wo), contiguous."""
    win = _plane_windows(x, kh, kw, stride, pads, dilation, Ho, Wo, groups)
    it, P = cols.itemsize, Ho * Wo
    a, g = cols.strides[:2]
    np.copyto(as_strided(cols, win.shape, (a, g, kh * kw * P * it, kw * P * it, P * it, Wo * it,
                                           it)), win)


def _row_unfold(Ho: int, kh: int, d0: int) -> bool:
    """Whether ``_corr_rows`` pays: its gemm also computes the d0*(kh-1) rows of each image's
    padding border, at most doubling the work."""
    return d0 * (kh - 1) <= Ho


def _corr_rows(x, wk, pads, s1, dilation, bias=None, out=None):
    """Stride-1-in-H correlation of NCHW ``x`` with OIHW ``wk`` (groups 1), returned NCHW.

    Unfolds only along W: U (N*Hp*Wo, kw*C), gathered from an NHWC copy in runs of kw*C, is
    kh times smaller than a full im2col.  One gemm with all row taps side by side,
    U @ (kw*C, kh*O), then kh shifted adds over the rows finish the sum.  This also gives the
    input gradient of a stride-1 convolution as a full correlation with the flipped kernel,
    with no col2im scatter."""
    O, C, kh, kw = wk.shape
    d0, d1 = dilation
    xp = _nhwc_padded(x, pads)
    N, Hp, Wp, _ = xp.shape
    Ho = Hp - d0 * (kh - 1)
    Wo = (Wp - d1 * (kw - 1) - 1) // s1 + 1
    a, b, c, e = xp.strides
    U = np.empty((N, Hp, Wo, kw, C), x.dtype)
    native = _native_gather(x, wk) and (bias is None or bias.dtype == np.float32)
    if native:
        from kiln.jit import im2col

        native = im2col.gather_rows(U.reshape(N * Hp * Wo, kw * C), xp, 1, kw, (1, s1),
                                    dilation, Hp, Wo)
    if not native:
        np.copyto(U, as_strided(xp, U.shape, (a, b, c * s1, c * d1, e), writeable=False))
    Y = (U.reshape(N * Hp * Wo, kw * C) @ wk.transpose(3, 1, 2, 0).reshape(kw * C, kh * O))
    Y = Y.reshape(N, Hp, Wo, kh, O)
    if native and (out is None or out.flags.c_contiguous and out.dtype == np.float32):
        target = np.empty((N, O, Ho, Wo), Y.dtype) if out is None else out
        if im2col.corr_rows_sum(target, Y, bias, d0):
            return target
    acc = np.empty((N, Ho, Wo, O), Y.dtype)
    if bias is None:
        np.copyto(acc, Y[:, 0:Ho, :, 0])
    else:
        np.add(Y[:, 0:Ho, :, 0], bias, out=acc)
    for i in range(1, kh):
        acc += Y[:, i * d0:i * d0 + Ho, :, i]
    if out is None:
        return np.ascontiguousarray(acc.transpose(0, 3, 1, 2))
    np.copyto(out, acc.transpose(0, 3, 1, 2))
    return out


def _out_len(L, k, s, p0, p1, d) -> int:
    return (L + p0 + p1 - d * (k - 1) - 1) // s + 1


def _exact_pads(pads, H, W, Ho, Wo, kh, kw, stride, dilation) -> tuple:
    """The bottom/right padding for which the windows end exactly at the padded edge."""
    pt, _, pl, _ = pads
    pb = (Ho - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - H - pt
    pr = (Wo - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - W - pl
    return (pt, pb, pl, pr)


# -- the three convolution primitives ------------------------------------------------------------

# Large batches are convolved a few images at a time.  The column matrices of a whole batch
# of 256 (57M elements for the cnn's second layer, with its product) fall out of the caches
# between the gather and the gemm and page-fault in again as fresh temporaries at every call
# (glibc's thresholds, fixed by kiln/_malloc.py, keep smaller ones mapped).  Chunks of about
# _CHUNK_ELEMS elements (4 MB of float32) for the channels-last paths, whose gemms are
# compute-bound, and _PLANES_CHUNK (1 MB) for the per-sample path, whose few-channel gemm
# (K = 25 for a first layer) streams its operand once and runs best from L2: at batch 256 the
# cnn's conv2 forward takes 0.7x the time, its input gradient 0.6x, conv1 0.75x.  Below
# _WHOLE_BATCH (_PLANES_WHOLE) elements the batch stays one chunk: at batch 64 chunking alone
# was ~10% faster per call but made the compiled cnn step slower, its smaller temporaries
# lowering glibc's dynamic mmap/trim thresholds (~1,700 page faults a step in
# conv2d_weight's 20 MB im2col, which stays unchunked).  Gemm rows are independent: chunked
# results equal unchunked ones bitwise for the cnn's shapes.
_CHUNK_ELEMS = 1 << 20
_PLANES_CHUNK = 1 << 18
_WHOLE_BATCH = 1 << 24
_PLANES_WHOLE = 1 << 21


def _step(per_image: int, N: int, chunk: int, whole: int = _WHOLE_BATCH) -> int:
    """Images per chunk: the whole batch while its temporaries stay under ``whole`` elements,
    else about ``chunk`` elements' worth."""
    if per_image * N <= whole:
        return max(N, 1)
    return max(1, chunk // max(1, per_image))


def _conv2d_into(out, x, w, b, stride, padding, dilation, groups):
    """conv2d of NCHW ``x`` with OIHW ``w`` (and bias ``b`` or None) written into ``out``
    (N, O, Ho, Wo), which must not share memory with the inputs."""
    N, C, H, W = x.shape
    O, cg, kh, kw = w.shape
    Ho, Wo = out.shape[2:]
    P = Ho * Wo
    if out.size == 0:
        return out
    if not out.flags.c_contiguous:
        tmp = np.empty(out.shape, out.dtype)
        np.copyto(out, _conv2d_into(tmp, x, w, b, stride, padding, dilation, groups))
        return out
    direct = _direct(stride, dilation, groups, x, w)
    if direct is not None and direct.conv2d(out, x, w, b, padding):
        return out
    one = b is not None
    if _rows_layout(C, kw, Wo, groups):
        K = kh * kw * C
        if stride[0] == 1 and _row_unfold(Ho, kh, dilation[0]):
            Hp = H + padding[0] + padding[1]
            step = _step(Hp * Wo * kw * (C + kh * O), N, _CHUNK_ELEMS)
            for s in range(0, N, step):
                _corr_rows(x[s:s + step], w, padding, stride[1], dilation, b, out[s:s + step])
            return out
        step = _step(P * (K + one), N, _CHUNK_ELEMS)
        w2 = np.empty((O, K + one), w.dtype)  # the bias rides along as a column of the weight
        w2[:, :K] = w.transpose(0, 2, 3, 1).reshape(O, K)
        if one:
            w2[:, K] = b
        step = min(step, N)
        cols = np.empty((step * P, K + one), x.dtype)
        if one:
            cols[:, K] = 1
        y = np.empty((step * P, O), out.dtype)
        for s in range(0, N, step):
            n = min(N - s, step)
            _cols_rows_into(cols[:n * P], x[s:s + n], kh, kw, stride, padding, dilation, Ho, Wo)
            np.matmul(cols[:n * P], w2.T, out=y[:n * P])
            np.copyto(out[s:s + n], y[:n * P].reshape(n, Ho, Wo, O).transpose(0, 3, 1, 2))
        return out
    K = cg * kh * kw
    step = min(N, _step(groups * P * (K + one), N, _PLANES_CHUNK, _PLANES_WHOLE))
    og = O // groups
    w2 = np.empty((groups, og, K + one), w.dtype)
    w2[:, :, :K] = w.reshape(groups, og, K)
    if one:
        w2[:, :, K] = b.reshape(groups, og)
    cols = np.empty((step, groups, K + one, P), x.dtype)
    if one:
        cols[:, :, K] = 1
    o = out.reshape(N, groups, og, P)
    for s in range(0, N, step):
        n = min(N - s, step)
        _cols_planes_into(cols[:n], x[s:s + n], kh, kw, stride, padding, dilation, Ho, Wo,
                          groups)
        np.matmul(w2, cols[:n], out=o[s:s + n])
    return out


@primitive("conv2d", traits={"linalg"}, save=(0, 1))
def _conv2d(x, w, *bias, stride, padding, dilation, groups):
    N, C, H, W = x.shape
    O, cg, kh, kw = w.shape
    pt, pb, pl, pr = padding
    Ho = _out_len(H, kh, stride[0], pt, pb, dilation[0])
    Wo = _out_len(W, kw, stride[1], pl, pr, dilation[1])
    out = np.empty((N, O, Ho, Wo), np.result_type(x, w))
    return _conv2d_into(out, x, w, bias[0] if bias else None, stride, padding, dilation, groups)


@_conv2d.def_infer
def _conv2d_infer(shapes, dts, stride, padding, dilation, groups):
    (N, _, H, W), (O, _, kh, kw) = shapes[0], shapes[1]
    pt, pb, pl, pr = padding
    return (N, O, _out_len(H, kh, stride[0], pt, pb, dilation[0]),
            _out_len(W, kw, stride[1], pl, pr, dilation[1])), dts[0]


@_conv2d.def_vjp
def _conv2d_vjp(g, node):
    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    needs = node.needs
    gx = gw = gb = None
    if needs[0]:
        H, W = x._data.shape[2:]
        Ho, Wo = g._data.shape[2:]
        kh, kw = w._data.shape[2:]
        exact = _exact_pads(a["padding"], H, W, Ho, Wo, kh, kw, a["stride"], a["dilation"])
        gx = _conv_transpose2d(g, w, stride=a["stride"], padding=exact,
                               dilation=a["dilation"], groups=a["groups"])
    if needs[1]:
        gw = _conv2d_weight(x, g, stride=a["stride"], padding=a["padding"],
                            dilation=a["dilation"], groups=a["groups"],
                            kernel=tuple(w._data.shape[2:]))
    if len(needs) == 3:
        gb = _rsum(g, dim=(0, 2, 3)) if needs[2] else None
        return gx, gw, gb
    return gx, gw


@primitive("conv_transpose2d", traits={"linalg"}, save=(0, 1))
def _conv_transpose2d(g, w, stride, padding, dilation, groups):
    N, O, Ho, Wo = g.shape
    _, cg, kh, kw = w.shape
    C = cg * groups
    (s0, s1), (d0, d1) = stride, dilation
    Hf = (Ho - 1) * s0 + d0 * (kh - 1) + 1  # the padded extent the windows cover
    Wf = (Wo - 1) * s1 + d1 * (kw - 1) + 1
    he, we = (Ho - 1) * s0 + 1, (Wo - 1) * s1 + 1
    direct = _direct(stride, dilation, groups, g, w)
    if direct is not None and (out := direct.conv_transpose2d(g, w, padding)) is not None:
        return out
    crop = tuple(-p for p in padding)
    pt, pb, pl, pr = padding
    if (_rows_layout(C, kw, Wo, groups) and stride == (1, 1)
            and _row_unfold(Hf - pt - pb, kh, d0)):
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        pads = (d0 * (kh - 1) - pt, d0 * (kh - 1) - pb, d1 * (kw - 1) - pl, d1 * (kw - 1) - pr)
        H, W = Hf - pt - pb, Wf - pl - pr
        out = np.empty((N, C, H, W), g.dtype)
        step = _step((Ho + pads[0] + pads[1]) * W * kw * (O + kh * C), N, _CHUNK_ELEMS)
        for s in range(0, N, step):
            _corr_rows(g[s:s + step], flipped, pads, 1, dilation, out=out[s:s + step])
        return out
    if _rows_layout(C, kw, Wo, groups):
        g2 = g.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O)
        dc = (g2 @ w.transpose(0, 2, 3, 1).reshape(O, kh * kw * C)).reshape(N, Ho, Wo, kh, kw, C)
        # col2im in two passes (rows, then columns): kh + kw strided adds instead of kh * kw
        t = np.zeros((N, Hf, Wo, kw, C), dc.dtype)
        for i in range(kh):
            t[:, i * d0:i * d0 + he:s0] += dc[:, :, :, i]
        dxp = np.zeros((N, Hf, Wf, C), dc.dtype)
        for j in range(kw):
            dxp[:, :, j * d1:j * d1 + we:s1] += t[:, :, :, j]
        dx = _pad_hw(dxp, crop, axes=(1, 2))
        return np.ascontiguousarray(dx.transpose(0, 3, 1, 2))
    og = O // groups
    wt = w.reshape(groups, og, cg * kh * kw).transpose(0, 2, 1)
    dc = np.matmul(wt, g.reshape(N, groups, og, Ho * Wo)).reshape(N, C, kh, kw, Ho, Wo)
    dxp = np.zeros((N, C, Hf, Wf), dc.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i * d0:i * d0 + he:s0, j * d1:j * d1 + we:s1] += dc[:, :, i, j]
    return np.ascontiguousarray(_pad_hw(dxp, crop))


@_conv_transpose2d.def_infer
def _conv_transpose2d_infer(shapes, dts, stride, padding, dilation, groups):
    (N, _, Ho, Wo), (_, cg, kh, kw) = shapes
    pt, pb, pl, pr = padding
    H = (Ho - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - pt - pb
    W = (Wo - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - pl - pr
    return (N, cg * groups, H, W), dts[0]


@_conv_transpose2d.def_vjp
def _conv_transpose2d_vjp(h, node):
    g, w = node.inputs
    a = node.attrs
    ng, nw = node.needs
    dg = _conv2d(h, w, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                 groups=a["groups"]) if ng else None
    dw = _conv2d_weight(h, g, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                        groups=a["groups"], kernel=tuple(w._data.shape[2:])) if nw else None
    return dg, dw


@primitive("conv2d_weight", traits={"linalg"}, save=(0, 1))
def _conv2d_weight(x, g, stride, padding, dilation, groups, kernel):
    N, C = x.shape[:2]
    _, O, Ho, Wo = g.shape
    kh, kw = kernel
    cg = C // groups
    direct = _direct(stride, dilation, groups, x, g)
    if direct is not None and (gw := direct.conv2d_weight(x, g, padding, kernel)) is not None:
        return gw
    if _rows_layout(C, kw, Wo, groups):
        cols = _cols_rows(x, kh, kw, stride, padding, dilation, Ho, Wo)
        # (K, N*P) @ (N*P, O): OpenBLAS threads this shape evenly; the (O, K) product of the
        # same operands stalled for 100+ ms on a loaded 2-core machine
        gw = cols.T @ g.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O)
        return np.ascontiguousarray(gw.reshape(kh, kw, C, O).transpose(3, 2, 0, 1))
    cols = _cols_planes(x, kh, kw, stride, padding, dilation, Ho, Wo, groups)
    gw = np.matmul(g.reshape(N, groups, O // groups, Ho * Wo), cols.transpose(0, 1, 3, 2))
    return gw.sum(axis=0).reshape(O, cg, kh, kw)


@_conv2d_weight.def_infer
def _conv2d_weight_infer(shapes, dts, stride, padding, dilation, groups, kernel):
    (_, C, _, _), (_, O, _, _) = shapes
    return (O, C // groups) + tuple(kernel), dts[0]


@_conv2d_weight.def_vjp
def _conv2d_weight_vjp(k, node):
    x, g = node.inputs
    a = node.attrs
    nx, ng = node.needs
    dx = dg = None
    if nx:
        H, W = x._data.shape[2:]
        Ho, Wo = g._data.shape[2:]
        kh, kw = a["kernel"]
        exact = _exact_pads(a["padding"], H, W, Ho, Wo, kh, kw, a["stride"], a["dilation"])
        dx = _conv_transpose2d(g, k, stride=a["stride"], padding=exact, dilation=a["dilation"],
                               groups=a["groups"])
    if ng:
        dg = _conv2d(x, k, stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                     groups=a["groups"])
    return dx, dg


# -- argument checking ---------------------------------------------------------------------------

def _tensor_arg(x, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(x).__name__}")
    return x


def _ints(v, n: int, name: str, op: str) -> tuple:
    """An int or a sequence of ``n`` ints, as a tuple of ``n`` ints."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return (int(v),) * n
    if isinstance(v, (tuple, list)) and all(isinstance(e, numbers.Integral) for e in v):
        if len(v) == 1:
            return (int(v[0]),) * n
        if len(v) == n:
            return tuple(int(e) for e in v)
        raise RuntimeError(f"{op}: expected {name} to be a single integer value or a list of {n} "
                           f"values to match the convolution dimensions, but got {name}={list(v)}")
    raise TypeError(f"{op}(): argument '{name}' must be an int or a tuple of ints, not "
                    f"{type(v).__name__}")


def _sname(t: Tensor) -> str:
    return _SNAME[t.dtype.name]


def _conv_checks(x, w, bias, nd: int, op: str):
    x = _tensor_arg(x, op, "input")
    w = _tensor_arg(w, op, "weight")
    if x.ndim not in (nd + 1, nd + 2):
        raise RuntimeError(f"Expected {nd + 1}D (unbatched) or {nd + 2}D (batched) input to "
                           f"{op}, but got input of size: {list(x.shape)}")
    if w.ndim != nd + 2:
        raise RuntimeError(f"{op}: expected weight to be {nd + 2}-D, but got weight of size "
                           f"{list(w.shape)}")
    if x._data.dtype != w._data.dtype:
        raise RuntimeError(f"expected scalar type {_sname(x)} but found {_sname(w)}")
    if x._data.dtype == np.bool_:
        raise RuntimeError(f"{op}: not implemented for 'Bool'")
    if bias is not None:
        bias = _tensor_arg(bias, op, "bias")
        if bias._data.dtype != x._data.dtype:
            raise RuntimeError(f"expected scalar type {_sname(x)} but found {_sname(bias)}")
    return x, w, bias


def _check_groups(groups, op: str) -> int:
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"{op}(): argument 'groups' must be int, not {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    return int(groups)


def _check_geometry(stride, dilation, pads):
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(d <= 0 for d in dilation):
        raise RuntimeError("dilation should be greater than zero")
    if any(p < 0 for p in pads):
        raise RuntimeError("negative padding is not supported")


def _conv(input, weight, bias, stride, padding, dilation, groups, nd: int, op: str) -> Tensor:
    x, w, bias = _conv_checks(input, weight, bias, nd, op)
    groups = _check_groups(groups, op)
    stride = _ints(stride, nd, "stride", op)
    dilation = _ints(dilation, nd, "dilation", op)
    ksize = tuple(w._data.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0) * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            pads = ()
            for k, d in zip(ksize, dilation):
                total = d * (k - 1)  # PyTorch puts the odd unit on the bottom / right
                pads += (total // 2, total - total // 2)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}'")
    else:
        pads = tuple(p for p in _ints(padding, nd, "padding", op) for _ in (0, 1))
    _check_geometry(stride, dilation, pads)
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x.reshape((1,) + tuple(x._data.shape))
    sx, sw = x._data.shape, w._data.shape
    O = sw[0]
    if O % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} "
                           f"at dimension 0, but got weight of size [{list(sw)}] instead")
    if sx[1] != sw[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(sw)}, expected "
                           f"input{list(sx)} to have {sw[1] * groups} channels, but got {sx[1]} "
                           "channels instead")
    padded = [L + pads[2 * i] + pads[2 * i + 1] for i, L in enumerate(sx[2:])]
    eff = [d * (k - 1) + 1 for k, d in zip(ksize, dilation)]
    if any(e > p for e, p in zip(eff, padded)):
        raise RuntimeError(
            f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
            f"Kernel size: ({' x '.join(map(str, eff))}). Kernel size can't be greater than "
            "actual input size")
    args = (x, w)
    if bias is not None:
        if bias.ndim != 1 or bias._data.shape[0] != O:
            raise RuntimeError(f"Given weight of size {list(sw)}, expected bias to be "
                               f"1-dimensional with {O} elements, but got bias of size "
                               f"{list(bias.shape)} instead")
        args = (x, w, bias)
    if nd == 1:
        x4 = x.reshape(sx[0], sx[1], 1, sx[2])
        w4 = w.reshape(sw[0], sw[1], 1, sw[2])
        y = _conv2d(x4, w4, *args[2:], stride=(1, stride[0]), padding=(0, 0) + pads,
                    dilation=(1, dilation[0]), groups=groups)
        y = y.reshape(y._data.shape[0], O, y._data.shape[3])
    else:
        y = _conv2d(*args, stride=stride, padding=pads, dilation=dilation, groups=groups)
    if unbatched:
        y = y.reshape(tuple(y._data.shape[1:]))
    return y


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups=1) -> Tensor:
    """2-D convolution (cross-correlation) over (N, C, H, W) or (C, H, W) input.

    ``padding`` is an int, a pair, ``'valid'`` or ``'same'`` (stride 1; an odd total puts the
    extra row / column at the bottom / right, as PyTorch).

    >>> import kiln
    >>> kiln.conv2d(kiln.ones(1, 1, 4, 4), kiln.ones(2, 1, 3, 3), padding=1).shape
    kiln.Size([1, 2, 4, 4])
    """
    return _conv(input, weight, bias, stride, padding, dilation, groups, 2, "conv2d")


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups=1) -> Tensor:
    """1-D convolution over (N, C, L) or (C, L) input (runs as a conv2d of height 1)."""
    return _conv(input, weight, bias, stride, padding, dilation, groups, 1, "conv1d")


def _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation,
                    nd: int, op: str) -> Tensor:
    x, w, bias = _conv_checks(input, weight, bias, nd, op)
    groups = _check_groups(groups, op)
    stride = _ints(stride, nd, "stride", op)
    dilation = _ints(dilation, nd, "dilation", op)
    if isinstance(padding, str):
        raise TypeError(f"{op}(): argument 'padding' must be an int or a tuple of ints, not str")
    padding = _ints(padding, nd, "padding", op)
    opad = _ints(output_padding, nd, "output_padding", op)
    _check_geometry(stride, dilation, padding)
    for o, s, d in zip(opad, stride, dilation):
        if o < 0 or (o >= s and o >= d):
            names = ("height", "width") if nd == 2 else ("width",)
            raise RuntimeError(
                "output padding must be smaller than either stride or dilation, but got "
                + " ".join(f"output_padding_{n}: {v}" for n, v in zip(names, opad)) + " "
                + " ".join(f"stride_{n}: {v}" for n, v in zip(names, stride)) + " "
                + " ".join(f"dilation_{n}: {v}" for n, v in zip(names, dilation)))
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x.reshape((1,) + tuple(x._data.shape))
    sx, sw = x._data.shape, w._data.shape
    if sw[0] % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} "
                           f"at dimension 0, but got weight of size [{list(sw)}] instead")
    if sx[1] != sw[0]:
        raise RuntimeError(f"Given transposed=1, weight of size {list(sw)}, expected "
                           f"input{list(sx)} to have {sw[0]} channels, but got {sx[1]} channels "
                           "instead")
    cout = sw[1] * groups
    pads = tuple(v for p, o in zip(padding, opad) for v in (p, p - o))
    outs = [(L - 1) * s + d * (k - 1) + 1 - p0 - p1 for L, s, d, k, p0, p1 in
            zip(sx[2:], stride, dilation, sw[2:], pads[0::2], pads[1::2])]
    if any(o <= 0 for o in outs):
        raise RuntimeError(
            f"Given input size per channel: ({' x '.join(map(str, sx[2:]))}). Calculated output "
            f"size per channel: ({' x '.join(map(str, outs))}). Output size is too small")
    if bias is not None and (bias.ndim != 1 or bias._data.shape[0] != cout):
        raise RuntimeError(f"Given transposed=1, weight of size {list(sw)}, expected bias to be "
                           f"1-dimensional with {cout} elements, but got bias of size "
                           f"{list(bias.shape)} instead")
    if nd == 1:
        y = _conv_transpose2d(x.reshape(sx[0], sx[1], 1, sx[2]), w.reshape(sw[0], sw[1], 1, sw[2]),
                              stride=(1, stride[0]), padding=(0, 0) + pads,
                              dilation=(1, dilation[0]), groups=groups)
        y = y.reshape(sx[0], cout, outs[0])
        if bias is not None:
            y = y + bias.reshape(cout, 1)
    else:
        y = _conv_transpose2d(x, w, stride=stride, padding=pads, dilation=dilation, groups=groups)
        if bias is not None:
            y = y + bias.reshape(cout, 1, 1)
    if unbatched:
        y = y.reshape(tuple(y._data.shape[1:]))
    return y


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed 2-D convolution; ``weight`` is (in_channels, out_channels/groups, kH, kW).

    >>> import kiln
    >>> kiln.conv_transpose2d(kiln.ones(1, 2, 3, 3), kiln.ones(2, 1, 3, 3), stride=2).shape
    kiln.Size([1, 1, 7, 7])
    """
    return _conv_transpose(input, weight, bias, stride, padding, output_padding, groups,
                           dilation, 2, "conv_transpose2d")


def conv_transpose1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed 1-D convolution; ``weight`` is (in_channels, out_channels/groups, kW)."""
    return _conv_transpose(input, weight, bias, stride, padding, output_padding, groups,
                           dilation, 1, "conv_transpose1d")


# -- pooling -------------------------------------------------------------------------------------
#
# Pools are separable: a window's max (or sum) is the max over its rows of the max over its
# columns, so each pool is kw strided passes along W and then kh along H (kh + kw whole-array
# numpy ops, never a Python loop over batch or channels).  With kernel == stride the strided
# slices are plain reshapes of the input.  Attributes are PyTorch's (and ONNX's): symmetric
# padding and ceil_mode; the impls derive the output size and the ceil-mode overhang.

def _pool_len(L: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    num = L + 2 * p - d * (k - 1) - 1
    n = (-(-num // s) if ceil else num // s) + 1
    if ceil and (n - 1) * s >= L + p:  # the last window must start inside the input or its pad
        n -= 1
    return n


def _pool_pads(H, W, kernel, stride, padding, dilation, ceil):
    """Output size and (top, bottom, left, right) padding, the bottom/right ones extended by
    the ceil-mode overhang (or cropped to the last window)."""
    Ho = _pool_len(H, kernel[0], stride[0], padding[0], dilation[0], ceil)
    Wo = _pool_len(W, kernel[1], stride[1], padding[1], dilation[1], ceil)
    pb = (Ho - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1 - H - padding[0]
    pr = (Wo - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1 - W - padding[1]
    return Ho, Wo, (padding[0], pb, padding[1], pr)


def _lowest(dt):
    return -np.inf if dt.kind == "f" else np.iinfo(dt).min


def _max_windows(x, kernel, stride, padding, dilation, ceil_mode, want_index, nan_aware=False):
    """Max over each window, and (``want_index``) the flat H*W index of its first maximum
    (NaN wins, as PyTorch's CPU kernel: ``val > max || isnan(val)``).

    Index bookkeeping is branch-free: scanning taps in increasing order, "this tap is the new
    maximum" sets the index to the tap number, which exceeds every earlier one, so
    ``index = maximum(index, is_new * tap)`` replaces a masked write (numpy's masked copies and
    np.where run ~10x slower on unpredictable masks)."""
    H, W = x.shape[2:]
    Ho, Wo, pads = _pool_pads(H, W, kernel, stride, padding, dilation, ceil_mode)
    if (want_index and kernel == stride and dilation == (1, 1) and pads[0] == pads[2] == 0
            and pads[1] <= 0 and pads[3] <= 0):
        return _max_tiles_index(x, kernel, Ho, Wo, nan_aware)
    xp = _pad_hw(x, pads, fill=_lowest(x.dtype))
    (kh, kw), (s0, s1), (d0, d1) = kernel, stride, dilation
    he, we = (Ho - 1) * s0 + 1, (Wo - 1) * s1 + 1
    nan = nan_aware and x.dtype.kind == "f"
    idt = np.uint8 if max(kh, kw) < 256 else np.int32
    m = np.array(xp[..., 0:we:s1])  # pass 1: max over each window row (along W)
    jj = np.zeros(m.shape, idt) if want_index else None
    for j in range(1, kw):
        v = xp[..., j * d1:j * d1 + we:s1]
        if want_index:
            new = v > m
            if nan:
                new |= np.isnan(v)
            np.maximum(jj, np.multiply(new, j, dtype=idt), out=jj)
        np.maximum(m, v, out=m)
    out = np.array(m[:, :, 0:he:s0])  # pass 2: max over the rows (along H)
    ii = np.zeros(out.shape, idt) if want_index else None
    for i in range(1, kh):
        v = m[:, :, i * d0:i * d0 + he:s0]
        if want_index:
            new = v > out
            if nan:
                new |= np.isnan(v)
            np.maximum(ii, np.multiply(new, i, dtype=idt), out=ii)
        np.maximum(out, v, out=out)
    if not want_index:
        return out
    if not nan and x.dtype.kind == "f" and np.isnan(out).any():
        # a NaN took part (np.maximum propagates it): redo with the NaN-aware comparisons
        return _max_windows(x, kernel, stride, padding, dilation, ceil_mode, True, True)
    if kh == 1:
        jsel = jj[:, :, 0:he:s0]
    else:  # the column index within the chosen row
        jsel = np.zeros(out.shape, idt)
        for i in range(kh):
            jsel += (ii == i) * jj[:, :, i * d0:i * d0 + he:s0]
    if pads[0] or pads[2]:
        rr = ii.astype(np.int64) * d0 + (np.arange(Ho) * s0 - pads[0]).reshape(Ho, 1)
        cc = jsel.astype(np.int64) * d1 + (np.arange(Wo) * s1 - pads[2])
        # a window whose real values all equal the padding (-inf) "picks" a padding position:
        # PyTorch reports the window's first real tap instead
        if (rr < 0).any():
            rr = np.where(rr < 0, rr % d0, rr)
        if (cc < 0).any():
            cc = np.where(cc < 0, cc % d1, cc)
        return rr * W + cc
    flat = ii.astype(np.int64) * (d0 * W)
    flat += jsel * d1 if d1 != 1 else jsel
    flat += (np.arange(Ho) * (s0 * W)).reshape(Ho, 1) + np.arange(Wo) * s1
    return flat


def _max_tiles_index(x, kernel, Ho, Wo, nan_aware):
    """``_max_windows``' indices when the windows tile the input (kernel == stride, no padding
    or dilation): one scan over the kh*kw taps in row-major order (the same first-maximum /
    NaN rule), then a table lookup from tap number to H*W offset."""
    (kh, kw), W = kernel, x.shape[3]
    t = x[:, :, :Ho * kh, :Wo * kw].reshape(x.shape[:2] + (Ho, kh, Wo, kw))
    # one de-interleaving copy makes every tap contiguous: the compares below then run ~3x
    # faster than on stride-kw views, more than paying for the copy
    t = np.ascontiguousarray(t.transpose(3, 5, 0, 1, 2, 4)).reshape((kh * kw,) + t.shape[:3]
                                                                    + (Wo,))
    nan = nan_aware and x.dtype.kind == "f"
    idt = np.uint8 if kh * kw < 256 else np.int32
    m = t[0].copy()
    k = np.zeros(m.shape, idt)
    new = np.empty(m.shape, bool)
    for tap in range(1, kh * kw):
        v = t[tap]
        np.greater(v, m, out=new)
        if nan:
            new |= np.isnan(v)
        np.maximum(k, np.multiply(new, tap, dtype=idt), out=k)
        np.maximum(m, v, out=m)
    if not nan and x.dtype.kind == "f" and np.isnan(m).any():
        return _max_tiles_index(x, kernel, Ho, Wo, True)
    taps = np.arange(kh * kw)
    flat = (taps // kw * W + taps % kw).take(k)
    flat += (np.arange(Ho) * (kh * W)).reshape(Ho, 1) + np.arange(Wo) * kw
    return flat


_POOL_ATTRS = ("kernel", "stride", "padding", "dilation", "ceil_mode")


# kiln.jit's pooling kernels unroll the window: an 8x8 window takes ~1.7 s to compile
_NATIVE_POOL_TAPS = 16


def _native_max_pool(x, kernel, stride, padding, dilation, ceil_mode, mode):
    """Window maxima or their indices from kiln.jit's kernel (float32 windows of up to
    _NATIVE_POOL_TAPS taps), or None for the numpy path."""
    from kiln import jit

    if not (jit.available() and x.dtype == np.float32 and x.size
            and kernel[0] * kernel[1] <= _NATIVE_POOL_TAPS):
        return None
    from kiln.jit import pool

    Ho, Wo, _ = _pool_pads(*x.shape[2:], kernel, stride, padding, dilation, ceil_mode)
    return pool.max_pool2d(x, kernel, stride, padding, dilation, Ho, Wo, mode)


@primitive("max_pool2d", traits={"reduce"}, save=(0,))
def _max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    out = _native_max_pool(x, kernel, stride, padding, dilation, ceil_mode, "values")
    if out is not None:
        return out
    return _max_windows(x, kernel, stride, padding, dilation, ceil_mode, False)


def _pool_infer(shapes, dts, kernel, stride, padding, ceil_mode, dilation=(1, 1), **_):
    N, C, H, W = shapes[0]
    Ho, Wo, _ = _pool_pads(H, W, kernel, stride, padding, dilation, ceil_mode)
    return (N, C, Ho, Wo), dts[0]


_max_pool2d.def_infer(_pool_infer)


@_max_pool2d.def_vjp
def _max_pool2d_vjp(g, node):
    x = node.inputs[0]
    idx = _max_pool2d_indices(x, **node.attrs)
    return (_pool_scatter(g, idx, in_hw=tuple(x._data.shape[2:])),)


@primitive("max_pool2d_indices", traits={"index"})
def _max_pool2d_indices(x, kernel, stride, padding, dilation, ceil_mode):
    out = _native_max_pool(x, kernel, stride, padding, dilation, ceil_mode, "indices")
    if out is not None:
        return out
    return _max_windows(x, kernel, stride, padding, dilation, ceil_mode, True)


@_max_pool2d_indices.def_infer
def _max_pool2d_indices_infer(shapes, dts, **attrs):
    return _pool_infer(shapes, dts, **attrs)[0], np.dtype(np.int64)


_max_pool2d_indices.mark_not_differentiable("integer indices")


def _flat_index(idx, hw: int):
    """Per-plane H*W indices -> indices into the flattened (N, C, H, W) array."""
    N, C = idx.shape[:2]
    return idx + (np.arange(N * C, dtype=np.int64) * hw).reshape(N, C, 1, 1)


@primitive("pool_gather", traits={"index"}, save=(1,))
def _pool_gather(x, idx):
    H, W = x.shape[2:]
    return x.reshape(-1).take(_flat_index(idx, H * W))


@_pool_gather.def_infer
def _pool_gather_infer(shapes, dts):
    return tuple(shapes[1]), dts[0]


@_pool_gather.def_vjp
def _pool_gather_vjp(g, node):
    x, idx = node.inputs
    return _pool_scatter(g, idx, in_hw=tuple(x._data.shape[2:])), None


@primitive("pool_scatter", traits={"index"}, save=(1,))
def _pool_scatter(g, idx, in_hw):
    """Gradient of pool_gather: each value added at its index (windows may overlap)."""
    from kiln import jit

    if jit.available() and g.dtype == np.float32 and idx.dtype == np.int64:
        from kiln.jit import pool

        out = pool.pool_scatter(g, idx, in_hw)
        if out is not None:  # else an index outside its plane: numpy's add.at decides
            return out
    N, C = g.shape[:2]
    H, W = in_hw
    out = np.zeros(N * C * H * W, g.dtype)
    np.add.at(out, _flat_index(idx, H * W).reshape(-1), g.reshape(-1))
    return out.reshape(N, C, H, W)


@_pool_scatter.def_infer
def _pool_scatter_infer(shapes, dts, in_hw):
    return tuple(shapes[0][:2]) + tuple(in_hw), dts[0]


@_pool_scatter.def_vjp
def _pool_scatter_vjp(h, node):
    return _pool_gather(h, node.inputs[1]), None


def _avg_divisor(H, W, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override,
                 Ho, Wo):
    """PyTorch's divisor per output position: an (Ho, 1) x (1, Wo) product, or a number."""
    if divisor_override is not None:
        return divisor_override
    counts = []
    for L, Lo, k, s, p in ((H, Ho, kernel[0], stride[0], padding[0]),
                           (W, Wo, kernel[1], stride[1], padding[1])):
        start = np.arange(Lo) * s - p
        end = np.minimum(start + k, L + p)
        if count_include_pad:
            counts.append(end - start)
        else:
            counts.append(np.minimum(end, L) - np.maximum(start, 0))
    ch, cw = counts
    if (ch == ch[:1]).all() and (cw == cw[:1]).all() and Ho and Wo:
        return int(ch[0] * cw[0])
    return ch.reshape(Ho, 1) * cw.reshape(1, Wo)


def _divide(s, div):
    if s.dtype.kind == "f":
        return s / np.asarray(div, s.dtype) if isinstance(div, np.ndarray) else s / s.dtype.type(
            div)
    q = np.abs(s) // div  # integer pools divide with truncation, as C++
    return (np.sign(s) * q).astype(s.dtype)


@primitive("avg_pool2d", traits={"reduce"})
def _avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    H, W = x.shape[2:]
    Ho, Wo, pads = _pool_pads(H, W, kernel, stride, padding, (1, 1), ceil_mode)
    xp = _pad_hw(x, pads)
    (kh, kw), (s0, s1) = kernel, stride
    he, we = (Ho - 1) * s0 + 1, (Wo - 1) * s1 + 1
    m = np.array(xp[..., 0:we:s1])
    for j in range(1, kw):
        m += xp[..., j:j + we:s1]
    out = np.array(m[:, :, 0:he:s0])
    for i in range(1, kh):
        out += m[:, :, i:i + he:s0]
    div = _avg_divisor(H, W, kernel, stride, padding, ceil_mode, count_include_pad,
                       divisor_override, Ho, Wo)
    return _divide(out, div)


_avg_pool2d.def_infer(_pool_infer)


@_avg_pool2d.def_vjp
def _avg_pool2d_vjp(g, node):
    return (_avg_pool2d_backward(g, in_hw=tuple(node.inputs[0]._data.shape[2:]), **node.attrs),)


@primitive("avg_pool2d_backward", traits={"reduce"})
def _avg_pool2d_backward(g, in_hw, kernel, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    """The adjoint of avg_pool2d: each output's share spread back over its window."""
    N, C, Ho, Wo = g.shape
    H, W = in_hw
    _, _, pads = _pool_pads(H, W, kernel, stride, padding, (1, 1), ceil_mode)
    (kh, kw), (s0, s1) = kernel, stride
    div = _avg_divisor(H, W, kernel, stride, padding, ceil_mode, count_include_pad,
                       divisor_override, Ho, Wo)
    gd = g / (np.asarray(div, g.dtype) if isinstance(div, np.ndarray) else g.dtype.type(div))
    he, we = (Ho - 1) * s0 + 1, (Wo - 1) * s1 + 1
    Hf, Wf = he + kh - 1, we + kw - 1
    t = np.zeros((N, C, Hf, Wo), g.dtype)
    for i in range(kh):
        t[:, :, i:i + he:s0] += gd
    out = np.zeros((N, C, Hf, Wf), g.dtype)
    for j in range(kw):
        out[..., j:j + we:s1] += t
    return np.ascontiguousarray(_pad_hw(out, tuple(-p for p in pads)))


@_avg_pool2d_backward.def_infer
def _avg_pool2d_backward_infer(shapes, dts, in_hw, **_):
    return tuple(shapes[0][:2]) + tuple(in_hw), dts[0]


@_avg_pool2d_backward.def_vjp
def _avg_pool2d_backward_vjp(h, node):
    a = dict(node.attrs)
    a.pop("in_hw")
    return (_avg_pool2d(h, **a),)


def _pool_args(input, kernel_size, stride, padding, dilation, nd: int, op: str):
    x = _tensor_arg(input, op, "input")
    if x.ndim not in (nd + 1, nd + 2) or x.numel() == 0 and any(
            s == 0 for s in x._data.shape[1:]):
        raise RuntimeError(f"{op}: non-empty {nd + 1}D or {nd + 2}D (batch mode) tensor expected "
                           f"for input, got {list(x.shape)}")
    kernel = _ints(kernel_size, nd, "kernel_size", op)
    stride = kernel if stride is None or stride == [] or stride == () else _ints(
        stride, nd, "stride", op)
    padding = _ints(padding, nd, "padding", op)
    dilation = _ints(dilation, nd, "dilation", op)
    if any(k <= 0 for k in kernel):
        raise RuntimeError(f"{op}: kernel_size must be greater than zero, but got {list(kernel)}")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: stride must be greater than zero, but got {list(stride)}")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"{op}: dilation must be greater than zero, but got "
                           f"{list(dilation)}")
    for k, p, d in zip(kernel, padding, dilation):
        if p < 0 or p > ((k - 1) * d + 1) // 2:
            raise RuntimeError(f"{op}: pad should be at most half of effective kernel size, but "
                               f"got pad={p}, kernel_size={k} and dilation={d}")
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x.reshape((1,) + tuple(x._data.shape))
    if nd == 1:
        n, c, L = x._data.shape
        x = x.reshape(n, c, 1, L)
        kernel, stride, padding, dilation = ((1,) + kernel, (1,) + stride, (0,) + padding,
                                             (1,) + dilation)
    return x, kernel, stride, padding, dilation, unbatched


def _pool_out(y: Tensor, nd: int, unbatched: bool) -> Tensor:
    shape = y._data.shape
    if nd == 1:
        shape = shape[:2] + shape[3:]
    if unbatched:
        shape = shape[1:]
    return y if shape == y._data.shape else y.reshape(shape)


def _check_pool_size(x, Ho, Wo, nd, unbatched):
    if Ho <= 0 or Wo <= 0:
        shape = x._data.shape[1:] if nd == 2 else x._data.shape[1:2] + x._data.shape[3:]
        outs = (x._data.shape[1], Ho, Wo) if nd == 2 else (x._data.shape[1], Wo)
        raise RuntimeError(f"Given input size: ({'x'.join(map(str, shape))}). Calculated output "
                           f"size: ({'x'.join(map(str, outs))}). Output size is too small")


def _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, nd, op):
    x, kernel, stride, padding, dilation, unbatched = _pool_args(
        input, kernel_size, stride, padding, dilation, nd, op)
    Ho, Wo, _ = _pool_pads(*x._data.shape[2:], kernel, stride, padding, dilation,
                           bool(ceil_mode))
    _check_pool_size(x, Ho, Wo, nd, unbatched)
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation,
             "ceil_mode": bool(ceil_mode)}
    if not return_indices:
        return _pool_out(_max_pool2d(x, **attrs), nd, unbatched)
    idx = _max_pool2d_indices(x, **attrs)
    out = _pool_gather(x, idx)
    return _pool_out(out, nd, unbatched), _pool_out(idx, nd, unbatched)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """Max over (kH, kW) windows; with ``return_indices`` also each maximum's flat H*W index
    (the first on ties, as PyTorch on CPU).

    >>> import kiln
    >>> kiln.max_pool2d(kiln.arange(16.).reshape(1, 1, 4, 4), 2).tolist()
    [[[[5.0, 7.0], [13.0, 15.0]]]]
    """
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     2, "max_pool2d")


def max_pool1d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """Max over windows of the last dim of (N, C, L) or (C, L) input."""
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     1, "max_pool1d")


def _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override, nd, op):
    x, kernel, stride, padding, _, unbatched = _pool_args(input, kernel_size, stride, padding,
                                                          1, nd, op)
    if divisor_override is not None and (not isinstance(divisor_override, numbers.Integral)
                                         or divisor_override == 0):
        raise RuntimeError("divisor must be not zero")
    Ho, Wo, _ = _pool_pads(*x._data.shape[2:], kernel, stride, padding, (1, 1), bool(ceil_mode))
    _check_pool_size(x, Ho, Wo, nd, unbatched)
    y = _avg_pool2d(x, kernel=kernel, stride=stride, padding=padding, ceil_mode=bool(ceil_mode),
                    count_include_pad=bool(count_include_pad),
                    divisor_override=None if divisor_override is None else int(divisor_override))
    return _pool_out(y, nd, unbatched)


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override=None) -> Tensor:
    """Mean over (kH, kW) windows, with PyTorch's divisor rules for padding and ceil_mode.

    >>> import kiln
    >>> kiln.avg_pool2d(kiln.arange(16.).reshape(1, 1, 4, 4), 2).tolist()
    [[[[2.5, 4.5], [10.5, 12.5]]]]
    """
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override, 2, "avg_pool2d")


def avg_pool1d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> Tensor:
    """Mean over windows of the last dim of (N, C, L) or (C, L) input."""
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, None, 1,
                     "avg_pool1d")


def _adaptive_matrix(L: int, Lo: int, dt) -> np.ndarray:
    """(Lo, L) averaging matrix over PyTorch's bins [floor(i*L/Lo), ceil((i+1)*L/Lo))."""
    i = np.arange(Lo)
    start = (i * L) // Lo
    end = -((-(i + 1) * L) // Lo)
    pos = np.arange(L)
    inside = (pos >= start[:, None]) & (pos < end[:, None])
    return (inside / (end - start)[:, None]).astype(dt)


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """Average pooling to a fixed output size (None keeps that dim), PyTorch's bins.

    Evenly dividing sizes run as avg_pool2d; otherwise the bins overlap unevenly and the pool
    is two small matmuls with averaging matrices (rows, then columns).

    >>> import kiln
    >>> kiln.adaptive_avg_pool2d(kiln.ones(1, 2, 5, 7), (2, 3)).shape
    kiln.Size([1, 2, 2, 3])
    """
    x = _tensor_arg(input, "adaptive_avg_pool2d", "input")
    if x.ndim not in (3, 4):
        raise RuntimeError(f"adaptive_avg_pool2d(): Expected 3D or 4D tensor, but got "
                           f"{list(x.shape)}")
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise RuntimeError("adaptive_avg_pool2d: output_size must be 2")
        sizes = tuple(output_size)
    else:
        sizes = (output_size, output_size)
    H, W = x._data.shape[-2:]
    Ho, Wo = (H if sizes[0] is None else int(sizes[0]), W if sizes[1] is None else int(sizes[1]))
    if Ho < 0 or Wo < 0:
        raise RuntimeError(f"adaptive_avg_pool2d: elements of output_size must be greater than "
                           f"or equal to 0 but received {[Ho, Wo]}")
    for d in range(1, x.ndim - 2):
        if x._data.shape[d] == 0:
            raise RuntimeError("adaptive_avg_pool2d(): Expected input to have non-zero size for "
                               f"non-batch dimensions, but input has sizes {list(x.shape)}")
    if x._data.dtype.kind != "f":
        raise RuntimeError(f"\"adaptive_avg_pool2d\" not implemented for '{_sname(x)}'")
    if Ho and Wo and H % Ho == 0 and W % Wo == 0:
        if (Ho, Wo) == (H, W):
            return x.clone()
        k = (H // Ho, W // Wo)
        unbatched = x.ndim == 3
        x4 = x.reshape((1,) + tuple(x._data.shape)) if unbatched else x
        y = _avg_pool2d(x4, kernel=k, stride=k, padding=(0, 0), ceil_mode=False,
                        count_include_pad=True, divisor_override=None)
        return y.reshape(tuple(y._data.shape[1:])) if unbatched else y
    from kiln.ops.linalg import _matmul

    dt = x._data.dtype
    y = _matmul(x, _make(_adaptive_matrix(W, Wo, dt)), ta=False, tb=True)
    return _matmul(_make(_adaptive_matrix(H, Ho, dt)), y, ta=False, tb=False)


def adaptive_avg_pool1d(input: Tensor, output_size) -> Tensor:
    """Average pooling of the last dim of (N, C, L) or (C, L) input to ``output_size``."""
    x = _tensor_arg(input, "adaptive_avg_pool1d", "input")
    if x.ndim not in (2, 3):
        raise RuntimeError(f"adaptive_avg_pool1d(): Expected 2D or 3D tensor, but got "
                           f"{list(x.shape)}")
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 1:
            raise RuntimeError("adaptive_avg_pool1d: output_size must be 1")
        output_size = output_size[0]
    y = adaptive_avg_pool2d(x.reshape(tuple(x._data.shape[:-1]) + (1, x._data.shape[-1])),
                            (1, output_size))
    return y.reshape(tuple(x._data.shape[:-1]) + (y._data.shape[-1],))


# -- dropout -------------------------------------------------------------------------------------

@primitive("dropout_mask", traits={"random"})
def _dropout_mask(x, p, shape):
    """Keep each element with probability 1-p, scaled by 1/(1-p) so the mean is unchanged."""
    dt = x.dtype
    n = int(np.prod(shape))
    # 32 random bits per element (two from each raw 64-bit draw) compared with p * 2**32:
    # a third of the time of generating uniform floats
    bits = _rng(None).bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    keep = bits >= np.uint32(min(round(p * 2.0 ** 32), 2 ** 32 - 1))
    return np.multiply(keep.reshape(shape), dt.type(1.0 / (1.0 - p)), dtype=dt)


@_dropout_mask.def_infer
def _dropout_mask_infer(shapes, dts, p, shape):
    return tuple(shape), dts[0]


_dropout_mask.mark_not_differentiable("a random constant: the gradient flows through the mul")


def _dropout(input, p, training, inplace, mask_shape, op: str) -> Tensor:
    x = _tensor_arg(input, op, "input")
    if not isinstance(p, numbers.Real) or p < 0 or p > 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or x._data.size == 0:
        return x
    if x._data.dtype.kind != "f":
        raise RuntimeError(f"{op}: expected a floating-point input, got {x.dtype}")
    if p == 1:
        zero = _make(np.zeros((), x._data.dtype))
        return x.mul_(zero) if inplace else mul(x, zero)
    mask = _dropout_mask(x, p=float(p), shape=mask_shape)
    return x.mul_(mask) if inplace else mul(x, mask)


def dropout(input: Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (training only).

    >>> import kiln
    >>> kiln.dropout(kiln.ones(3), 0.5, training=False).tolist()
    [1.0, 1.0, 1.0]
    """
    x = _tensor_arg(input, "dropout", "input")
    return _dropout(x, p, training, inplace, tuple(x._data.shape), "dropout")


def _feature_dropout(input, p, training, inplace, nd: int, op: str) -> Tensor:
    x = _tensor_arg(input, op, "input")
    if x.ndim not in (nd + 1, nd + 2):
        raise RuntimeError(f"{op}: Expected {nd + 1}D or {nd + 2}D input, but received a "
                           f"{x.ndim}D input. Note that {op} exists to provide channel-wise "
                           "dropout on inputs with 2 spatial dimensions" if nd == 2 else
                           f"{op}: Expected {nd + 1}D or {nd + 2}D input, but received a "
                           f"{x.ndim}D input")
    shape = x._data.shape
    lead = 1 if x.ndim == nd + 1 else 2
    return _dropout(x, p, training, inplace, shape[:lead] + (1,) * nd, op)


def dropout1d(input: Tensor, p: float = 0.5, training: bool = True,
              inplace: bool = False) -> Tensor:
    """Zero whole channels of (N, C, L) or (C, L) input."""
    return _feature_dropout(input, p, training, inplace, 1, "dropout1d")


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True,
              inplace: bool = False) -> Tensor:
    """Zero whole channels of (N, C, H, W) or (C, H, W) input."""
    return _feature_dropout(input, p, training, inplace, 2, "dropout2d")


def dropout3d(input: Tensor, p: float = 0.5, training: bool = True,
              inplace: bool = False) -> Tensor:
    """Zero whole channels of (N, C, D, H, W) or (C, D, H, W) input."""
    return _feature_dropout(input, p, training, inplace, 3, "dropout3d")


TENSOR_METHODS: dict = {}
