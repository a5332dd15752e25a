"""ONNX neural-network operators: Gemm/MatMul, convolution, pooling, normalization, softmax and
activations, written in Kiln ops (autograd and kiln.compile work on the imported model).

Geometry (pads, output sizes, pooling divisors) is computed from shapes and attributes only.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

import kiln
import kiln.nn.functional as F
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T
from kiln.tensor import Tensor

# -- helpers ---------------------------------------------------------------------------------


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _err(ctx, msg: str) -> NotImplementedError:
    """An unsupported-variant error (the importer prefixes the node's name and op type)."""
    return NotImplementedError(f"{ctx.op_type}: {msg}")


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _spatial(ctx, x_shape, kernel, is_pool: bool):
    """(strides, dilations, begin pads, end pads, output sizes) of a conv or pool node."""
    nd = len(kernel)
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    auto = _s(ctx.attr("auto_pad", "NOTSET"))
    ceil = bool(ctx.attr("ceil_mode", 0)) if is_pool else False
    sizes = x_shape[2:]
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-L // s) for L, s in zip(sizes, strides)]
        total = [max((o - 1) * s + e - L, 0) for o, s, e, L in zip(out, strides, eff, sizes)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
        return strides, dil, begin, end, out
    if auto == "VALID":
        pads = [0] * (2 * nd)
    elif auto != "NOTSET":
        raise _err(ctx, f"auto_pad={auto!r} is not a valid value")
    begin, end = pads[:nd], pads[nd:]
    out = []
    for L, s, e, b, p in zip(sizes, strides, eff, begin, end):
        num = L + b + p - e
        n = (-(-num // s) if ceil else num // s) + 1
        if ceil and (n - 1) * s >= L + b:  # the last window must start inside input or pad
            n -= 1
        out.append(n)
    if any(o <= 0 for o in out):
        raise _err(ctx, f"input of spatial size {list(sizes)} is too small for kernel {kernel}")
    return strides, dil, begin, end, out


def _pad_spatial(x: Tensor, begin, end, value=0.0) -> Tensor:
    """Pad (negative: crop) the trailing spatial dims by per-dim begin/end amounts."""
    if not any(begin) and not any(end):
        return x
    widths = []
    for b, e in zip(reversed(begin), reversed(end)):
        widths += [int(b), int(e)]
    return F.pad(x, tuple(widths), value=value)


def _windows(x: Tensor, kernel, strides, dil, out):
    """Each kernel tap's strided view of (already padded) ``x``: (tap index, view)."""
    for taps in itertools.product(*(range(k) for k in kernel)):
        idx = (slice(None), slice(None)) + tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(taps, dil, out, strides))
        yield taps, x[idx]


# -- matrix products ---------------------------------------------------------------------------

@onnx_op("MatMul")
def matmul(ctx, a, b):
    return kiln.matmul(T(a), T(b))


@onnx_op("Gemm")
def gemm(ctx, a, b, c=None):
    a, b, c = T(a), T(b), T(c)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    if (not ta and tb and alpha == 1.0 and (c is None or beta == 1.0 and c.ndim == 1
                                            and c.shape[0] == b.shape[0])):
        return kiln.linear(a, b, c)
    y = kiln.matmul(a.t() if ta else a, b.t() if tb else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@onnx_op("Einsum")
def einsum(ctx, *xs):
    return kiln.einsum(_s(ctx.attr("equation")).replace(" ", ""), *[T(x) for x in xs])


# -- convolution -------------------------------------------------------------------------------

def _conv3d(x, w, stride, dil, groups):
    """3-D convolution (unpadded) as a sum over depth taps of 2-D convolutions."""
    n, c, D = x.shape[:3]
    kd = w.shape[2]
    Do = (D - dil[0] * (kd - 1) - 1) // stride[0] + 1
    y = None
    for t in range(kd):
        xs = x[:, :, t * dil[0]: t * dil[0] + (Do - 1) * stride[0] + 1: stride[0]]
        x4 = xs.permute(0, 2, 1, 3, 4).reshape(n * Do, c, *xs.shape[3:])
        z = F.conv2d(x4, w[:, :, t], None, stride[1:], 0, dil[1:], groups)
        y = z if y is None else y + z
    y = y.reshape(n, Do, *y.shape[1:]).permute(0, 2, 1, 3, 4)
    return y


@onnx_op("Conv")
def conv(ctx, x, w, b=None):
    x, w, b = T(x), T(w), T(b)
    nd = w.ndim - 2
    groups = ctx.attr("group", 1)
    strides, dil, begin, end, _ = _spatial(ctx, tuple(x.shape), tuple(w.shape[2:]), False)
    if begin == end:
        padding = tuple(begin)
    else:
        x, padding = _pad_spatial(x, begin, end), (0,) * nd
    if nd == 1:
        return F.conv1d(x, w, b, strides, padding, dil, groups)
    if nd == 2:
        return F.conv2d(x, w, b, strides, padding, dil, groups)
    if nd == 3:
        y = _conv3d(_pad_spatial(x, padding, padding), w, strides, dil, groups)
        return y if b is None else y + b.reshape(-1, 1, 1, 1)
    raise _err(ctx, f"{nd}-D convolution is not supported (1-D, 2-D and 3-D are)")


def _conv_transpose3d(x, w, stride, dil, groups):
    """3-D transposed convolution (unpadded) as 2-D ones per depth tap, placed along depth."""
    n, c, D = x.shape[:3]
    kd = w.shape[2]
    x4 = x.permute(0, 2, 1, 3, 4).reshape(n * D, c, *x.shape[3:])
    span = (D - 1) * stride[0] + 1
    y = None
    for t in range(kd):
        z = F.conv_transpose2d(x4, w[:, :, t], None, stride[1:], 0, 0, groups, dil[1:])
        z = z.reshape(n, D, *z.shape[1:])
        if stride[0] > 1:  # interleave stride - 1 zero planes between input depths
            z = kiln.stack([z] + [kiln.zeros_like(z)] * (stride[0] - 1), dim=2)
            z = z.reshape(n, D * stride[0], *z.shape[3:])[:, :span]
        z = F.pad(z, (0, 0, 0, 0, 0, 0, t * dil[0], (kd - 1 - t) * dil[0]))
        y = z if y is None else y + z
    return y.permute(0, 2, 1, 3, 4)


@onnx_op("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    x, w, b = T(x), T(w), T(b)
    nd = w.ndim - 2
    if nd not in (1, 2, 3):
        raise _err(ctx, f"{nd}-D transposed convolution is not supported (1-D to 3-D are)")
    groups = ctx.attr("group", 1)
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    opad = list(ctx.attr("output_padding") or [0] * nd)
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    auto = _s(ctx.attr("auto_pad", "NOTSET"))
    sizes = x.shape[2:]
    full = [(L - 1) * s + d * (k - 1) + 1 for L, s, d, k in zip(sizes, strides, dil, w.shape[2:])]
    out_shape = ctx.attr("output_shape")
    if out_shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [L * s for L, s in zip(sizes, strides)]
    if out_shape is not None:
        out_shape = list(out_shape)[-nd:]
        total = [f + o - t for f, o, t in zip(full, opad, out_shape)]
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin)]
    else:
        begin, end = pads[:nd], pads[nd:]
    if nd == 3:
        y = _conv_transpose3d(x, w, strides, dil, groups)
    else:
        conv_t = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
        y = conv_t(x, w, None, strides, 0, 0, groups, dil)
    y = _pad_spatial(y, [-p for p in begin], [o - p for o, p in zip(opad, end)])
    return y if b is None else y + b.reshape((-1,) + (1,) * nd)


@onnx_op("CausalConvWithState")
def causal_conv_with_state(ctx, x, w, b=None, past=None):
    """Depthwise causal 1-D convolution over [past_state, x]; returns (y, present_state)."""
    x, w, b, past = T(x), T(w), T(b), T(past)
    act = _s(ctx.attr("activation", "none"))
    if act not in ("none", "silu", "swish"):
        raise _err(ctx, f"activation {act!r} is not supported")
    if x.ndim != 3:
        raise _err(ctx, f"input must be 3-D (batch, channels, length), got {x.ndim}-D")
    k = w.shape[2]
    if past is None:
        past = kiln.zeros(x.shape[0], x.shape[1], k - 1, dtype=x.dtype)
    xp = kiln.cat([past, x], dim=2)
    y = F.conv1d(xp, w, b, 1, 0, 1, x.shape[1])
    if act != "none":
        y = y * kiln.sigmoid(y)
    return (y, xp[:, :, xp.shape[2] - (k - 1):])[:ctx.n_outputs]


def _spread(z: Tensor, axis: int, stride: int, offset: int, total: int) -> Tensor:
    """Place z's entries along ``axis`` at offset + i * stride of a zero tensor of length total."""
    n = z.shape[axis]
    if stride > 1:
        z = kiln.stack([z] + [kiln.zeros_like(z)] * (stride - 1), dim=axis + 1)
        shape = list(z.shape)
        z = z.reshape(shape[:axis] + [n * stride] + shape[axis + 2:])
        z = z.narrow(axis, 0, (n - 1) * stride + 1)
    widths = [0, 0] * (z.ndim - 1 - axis) + [offset, total - offset - z.shape[axis]]
    return F.pad(z, tuple(widths))


@onnx_op("Col2Im")
def col2im(ctx, x, image_shape, block_shape):
    """Sum sliding blocks (N, C * prod(block), L) back into images (N, C, *image_shape)."""
    x = T(x)
    image = [int(v) for v in np.asarray(ctx.static(1)).reshape(-1)]
    block = [int(v) for v in np.asarray(ctx.static(2)).reshape(-1)]
    nd = len(image)
    strides = list(ctx.attr("strides") or [1] * nd)
    dil = list(ctx.attr("dilations") or [1] * nd)
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    padded = [L + pads[i] + pads[nd + i] for i, L in enumerate(image)]
    counts = [(p - d * (k - 1) - 1) // s + 1 for p, d, k, s in zip(padded, dil, block, strides)]
    if int(np.prod(counts)) != x.shape[2]:
        raise _err(ctx, f"input has {x.shape[2]} blocks, but the geometry gives {counts}")
    n, c = x.shape[0], x.shape[1] // int(np.prod(block))
    cols = x.reshape(n, c, *block, *counts)
    y = None
    for taps in itertools.product(*(range(k) for k in block)):
        z = cols[(slice(None), slice(None)) + taps]  # (N, C, *counts)
        for i in range(nd):
            z = _spread(z, 2 + i, strides[i], taps[i] * dil[i], padded[i])
        y = z if y is None else y + z
    return _pad_spatial(y, [-p for p in pads[:nd]], [-p for p in pads[nd:]])


# -- pooling -----------------------------------------------------------------------------------

def _pool_setup(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    strides, dil, begin, end, out = _spatial(ctx, tuple(x.shape), kernel, True)
    # the padded extent the windows read: ceil mode may run past the end pad (or stop short)
    ext = [(o - 1) * s + d * (k - 1) + 1 - L - b
           for o, s, d, k, L, b in zip(out, strides, dil, kernel, x.shape[2:], begin)]
    return kernel, strides, dil, begin, end, ext, out


def _native_ok(x, kernel, dil, begin, end) -> bool:
    """Whether Kiln's own 1-D/2-D pools implement this geometry (symmetric, small pads)."""
    return (x.ndim in (3, 4) and begin == end
            and all(p <= (d * (k - 1) + 1) // 2 for p, k, d in zip(begin, kernel, dil)))


def _max_indices(ctx, x, kernel, strides, dil, begin, ext, out):
    """MaxPool's Indices output: flat indices into x (N, C, spatial...) of each maximum."""
    order = "F" if ctx.attr("storage_order", 0) else "C"
    xp = _pad_spatial(x, begin, ext, value=-math.inf)
    sizes = x.shape[2:]
    nc = int(np.prod(x.shape[:2]))
    base = (np.arange(nc, dtype=np.int64) * int(np.prod(sizes))).reshape(
        tuple(x.shape[:2]) + (1,) * len(sizes))
    best = best_idx = None
    for taps, v in _windows(xp, kernel, strides, dil, out):
        pos = [np.arange(o) * s + t * d - b for o, s, t, d, b in
               zip(out, strides, taps, dil, begin)]
        grids = np.meshgrid(*[np.clip(p, 0, L - 1) for p, L in zip(pos, sizes)], indexing="ij")
        flat = np.ravel_multi_index(grids, sizes, order=order).astype(np.int64)
        idx = kiln.from_numpy(np.ascontiguousarray(base + flat))
        if best is None:
            best, best_idx = v, idx.expand(*v.shape)
        else:
            new = v > best
            best = kiln.where(new, v, best)
            best_idx = kiln.where(new, idx, best_idx)
    return best, best_idx


@onnx_op("MaxPool")
def max_pool(ctx, x):
    x = T(x)
    kernel, strides, dil, begin, end, ext, out = _pool_setup(ctx, x)
    if ctx.n_outputs > 1:
        return _max_indices(ctx, x, kernel, strides, dil, begin, ext, out)
    if _native_ok(x, kernel, dil, begin, end):
        pool = F.max_pool1d if x.ndim == 3 else F.max_pool2d
        y = pool(x, kernel, strides, begin, dil, bool(ctx.attr("ceil_mode", 0)))
        if tuple(y.shape[2:]) == tuple(out):
            return y
    xp = _pad_spatial(x, begin, ext, value=-math.inf)
    y = None
    for _, v in _windows(xp, kernel, strides, dil, out):
        y = v if y is None else kiln.maximum(y, v)
    return y


@onnx_op("MaxUnpool")
def max_unpool(ctx, x, indices, output_shape=None):
    x, indices = T(x), T(indices).to(kiln.int64)
    kernel = list(ctx.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(ctx.attr("strides") or [1] * nd)
    pads = list(ctx.attr("pads") or [0] * (2 * nd))
    shape = list(x.shape[:2]) + [(L - 1) * s - pads[i] - pads[nd + i] + k for i, (L, s, k)
                                 in enumerate(zip(x.shape[2:], strides, kernel))]
    flat = kiln.zeros(int(np.prod(shape)), dtype=x.dtype)
    y = kiln.scatter(flat, 0, indices.reshape(-1), x.reshape(-1)).reshape(shape)
    if output_shape is not None:
        # As the ONNX reference and node tests: indices address the shape inferred from the
        # attributes, zero-padded at the end to output_shape (ONNX Runtime instead reads the
        # indices as addressing the output_shape tensor).
        want = [int(v) for v in np.asarray(ctx.static(2)).reshape(-1)]
        y = _pad_spatial(y, [0] * nd, [w - s for w, s in zip(want[2:], shape[2:])])
    return y


def _divisor(sizes, kernel, strides, dil, begin, end, out, include_pad: bool):
    """Per-output count of the window positions that the average divides by (separable)."""
    div = np.ones((), dtype=np.float64)
    for L, k, s, d, b, e, o in zip(sizes, kernel, strides, dil, begin, end, out):
        lo, hi = (0, b + L + e) if include_pad else (b, b + L)
        pos = np.arange(o)[:, None] * s + np.arange(k)[None, :] * d
        cnt = ((pos >= lo) & (pos < hi)).sum(axis=1)
        div = np.multiply.outer(div, cnt)
    return np.maximum(div, 1)


def _window_sum(x, kernel, strides, dil, begin, ext, out, fn=None):
    xp = _pad_spatial(x if fn is None else fn(x), begin, ext)
    y = None
    for _, v in _windows(xp, kernel, strides, dil, out):
        y = v if y is None else y + v
    return y


@onnx_op("AveragePool")
def average_pool(ctx, x):
    x = T(x)
    kernel, strides, dil, begin, end, ext, out = _pool_setup(ctx, x)
    include = bool(ctx.attr("count_include_pad", 0))
    if _native_ok(x, kernel, dil, begin, end) and all(d == 1 for d in dil):
        pool = F.avg_pool1d if x.ndim == 3 else F.avg_pool2d
        y = pool(x, kernel, strides, begin, bool(ctx.attr("ceil_mode", 0)), include)
        if tuple(y.shape[2:]) == tuple(out):
            return y
    div = _divisor(x.shape[2:], kernel, strides, dil, begin, end, out, include)
    y = _window_sum(x, kernel, strides, dil, begin, ext, out)
    return y * T((1.0 / div).astype(y.dtype.np))


@onnx_op("LpPool")
def lp_pool(ctx, x):
    x = T(x)
    p = ctx.attr("p", 2)
    kernel, strides, dil, begin, end, ext, out = _pool_setup(ctx, x)
    s = _window_sum(x, kernel, strides, dil, begin, ext, out, fn=lambda v: kiln.abs(v) ** p)
    return s ** (1.0 / p)


@onnx_op("GlobalAveragePool")
def global_average_pool(ctx, x):
    x = T(x)
    return kiln.mean(x, dim=tuple(range(2, x.ndim)), keepdim=True)


@onnx_op("GlobalMaxPool")
def global_max_pool(ctx, x):
    x = T(x)
    return kiln.amax(x, dim=tuple(range(2, x.ndim)), keepdim=True)


@onnx_op("GlobalLpPool")
def global_lp_pool(ctx, x):
    x = T(x)
    p = ctx.attr("p", 2)
    return kiln.sum(kiln.abs(x) ** p, dim=tuple(range(2, x.ndim)), keepdim=True) ** (1.0 / p)


# -- normalization -----------------------------------------------------------------------------

def _channel_shape(x: Tensor) -> tuple:
    return (-1,) + (1,) * (x.ndim - 2)


@onnx_op("BatchNormalization")
def batch_norm(ctx, x, scale, bias, mean, var):
    x, scale, bias, mean, var = T(x), T(scale), T(bias), T(mean), T(var)
    eps = ctx.attr("epsilon", 1e-5)
    training = bool(ctx.attr("training_mode", 0)) and ctx.opset >= 14
    if not training and ctx.n_outputs > 1 and ctx.opset >= 14:
        raise _err(ctx, "running mean/var outputs need training_mode=1")
    if not training:
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    momentum = ctx.attr("momentum", 0.9)
    dims = (0,) + tuple(range(2, x.ndim))
    bvar, bmean = kiln.var_mean(x, dim=dims, correction=0)
    shape = _channel_shape(x)
    y = ((x - bmean.reshape(shape)) * kiln.rsqrt(bvar.reshape(shape) + eps) * scale.reshape(shape)
         + bias.reshape(shape))
    running_mean = mean * momentum + bmean * (1 - momentum)
    running_var = var * momentum + bvar * (1 - momentum)
    return (y, running_mean, running_var)[:ctx.n_outputs]


@onnx_op("InstanceNormalization")
def instance_norm(ctx, x, scale, bias):
    x, scale, bias = T(x), T(scale), T(bias)
    return F.group_norm(x, x.shape[1], scale, bias, ctx.attr("epsilon", 1e-5))


@onnx_op("LayerNormalization")
def layer_norm(ctx, x, scale, bias=None):
    x, scale, bias = T(x), T(scale), T(bias)
    axis = _axis(ctx.attr("axis", -1), x.ndim)
    eps = ctx.attr("epsilon", 1e-5)
    norm_shape = tuple(x.shape[axis:])
    if (ctx.n_outputs == 1 and tuple(scale.shape) == norm_shape
            and (bias is None or tuple(bias.shape) == norm_shape)):
        return F.layer_norm(x, norm_shape, scale, bias, eps)
    dims = tuple(range(axis, x.ndim))
    var, mean = kiln.var_mean(x, dim=dims, keepdim=True, correction=0)
    inv = kiln.rsqrt(var + eps)
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv)[:ctx.n_outputs]


@onnx_op("RMSNormalization")
def rms_norm(ctx, x, scale):
    x, scale = T(x), T(scale)
    dims = tuple(range(_axis(ctx.attr("axis", -1), x.ndim), x.ndim))
    ms = kiln.mean(x * x, dim=dims, keepdim=True)
    return x * kiln.rsqrt(ms + ctx.attr("epsilon", 1e-5)) * scale


@onnx_op("GroupNormalization")
def group_norm(ctx, x, scale, bias):
    x, scale, bias = T(x), T(scale), T(bias)
    groups = ctx.attr("num_groups")
    C = x.shape[1]
    if scale.shape[0] != C:  # opset 18: one scale and bias per group
        rep = C // groups
        scale = scale.reshape(-1, 1).expand(groups, rep).reshape(C)
        bias = bias.reshape(-1, 1).expand(groups, rep).reshape(C)
    return F.group_norm(x, groups, scale, bias, ctx.attr("epsilon", 1e-5))


@onnx_op("LpNormalization")
def lp_normalization(ctx, x):
    x = T(x)
    p = ctx.attr("p", 2)
    if p not in (1, 2):
        raise _err(ctx, f"p must be 1 or 2, got {p}")
    axis = ctx.attr("axis", -1)
    norm = (kiln.sum(kiln.abs(x), dim=axis, keepdim=True) if p == 1
            else kiln.sqrt(kiln.sum(x * x, dim=axis, keepdim=True)))
    return x / kiln.where(norm == 0, kiln.ones_like(norm), norm)  # a zero vector stays zero


@onnx_op("MeanVarianceNormalization")
def mean_variance_normalization(ctx, x):
    x = T(x)
    axes = tuple(ctx.attr("axes", [0, 2, 3]))
    mean = kiln.mean(x, dim=axes, keepdim=True)
    var = kiln.mean(x * x, dim=axes, keepdim=True) - mean * mean
    return (x - mean) / (kiln.sqrt(var) + 1e-9)


@onnx_op("LRN")
def lrn(ctx, x):
    x = T(x)
    size = ctx.attr("size")
    alpha, beta, bias = ctx.attr("alpha", 1e-4), ctx.attr("beta", 0.75), ctx.attr("bias", 1.0)
    C = x.shape[1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x * x
    padded = F.pad(sq.reshape(x.shape[0], 1, C, -1), (0, 0, lo, hi)).reshape(
        (x.shape[0], C + size - 1) + tuple(x.shape[2:]))
    total = None
    for i in range(size):
        v = padded[:, i:i + C]
        total = v if total is None else total + v
    return x / (bias + (alpha / size) * total) ** beta


# -- softmax family ----------------------------------------------------------------------------

def _along_axis(ctx, x, fn):
    """Apply ``fn(x, dim)``: opset >= 13 along ``axis``; before, on x coerced to 2-D at axis."""
    if ctx.opset >= 13:
        return fn(x, ctx.attr("axis", -1))
    axis = _axis(ctx.attr("axis", 1), x.ndim)
    shape = tuple(x.shape)
    rows = int(np.prod(shape[:axis]))
    return fn(x.reshape(rows, -1), 1).reshape(shape)


@onnx_op("Softmax")
def softmax(ctx, x):
    return _along_axis(ctx, T(x), lambda v, d: kiln.softmax(v, d))


@onnx_op("LogSoftmax")
def log_softmax(ctx, x):
    return _along_axis(ctx, T(x), lambda v, d: kiln.log_softmax(v, d))


def _hardmax(x, dim):
    dim = _axis(dim, x.ndim)
    first = kiln.argmax(x, dim=dim, keepdim=True)
    shape = [1] * x.ndim
    shape[dim] = x.shape[dim]
    ar = kiln.arange(x.shape[dim]).reshape(shape)
    return (ar == first).to(x.dtype)


@onnx_op("Hardmax")
def hardmax(ctx, x):
    return _along_axis(ctx, T(x), _hardmax)


# -- activations -------------------------------------------------------------------------------

@onnx_op("Relu")
def relu(ctx, x):
    return kiln.relu(T(x))


@onnx_op("LeakyRelu")
def leaky_relu(ctx, x):
    return F.leaky_relu(T(x), ctx.attr("alpha", 0.01))


@onnx_op("PRelu")
def prelu(ctx, x, slope):
    x, slope = T(x), T(slope)
    if ctx.opset < 7 and slope.ndim == 1 and x.ndim > 2 and slope.shape[0] > 1:
        slope = slope.reshape(_channel_shape(x))  # before opset 7: one slope per channel
    return kiln.where(x < 0, x * slope, x)


@onnx_op("Elu")
def elu(ctx, x):
    return F.elu(T(x), ctx.attr("alpha", 1.0))


@onnx_op("Selu")
def selu(ctx, x):
    x = T(x)
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * kiln.where(x > 0, x, alpha * kiln.expm1(kiln.clamp_max(x, 0.0)))


@onnx_op("Celu")
def celu(ctx, x):
    return F.celu(T(x), ctx.attr("alpha", 1.0))


@onnx_op("Gelu")
def gelu(ctx, x):
    return F.gelu(T(x), approximate=_s(ctx.attr("approximate", "none")))


@onnx_op("HardSigmoid")
def hard_sigmoid(ctx, x):
    x = T(x)
    return kiln.clamp(x * ctx.attr("alpha", 0.2) + ctx.attr("beta", 0.5), 0.0, 1.0)


@onnx_op("HardSwish")
def hard_swish(ctx, x):
    return F.hardswish(T(x))


@onnx_op("Softplus")
def softplus(ctx, x):
    return F.softplus(T(x))


@onnx_op("Softsign")
def softsign(ctx, x):
    return F.softsign(T(x))


@onnx_op("Mish")
def mish(ctx, x):
    return F.mish(T(x))


@onnx_op("ThresholdedRelu")
def thresholded_relu(ctx, x):
    x = T(x)
    return kiln.where(x > ctx.attr("alpha", 1.0), x, kiln.zeros_like(x))


@onnx_op("Shrink")
def shrink(ctx, x):
    x = T(x)
    lambd, bias = ctx.attr("lambd", 0.5), ctx.attr("bias", 0.0)
    zero = kiln.zeros_like(x)
    return kiln.where(x < -lambd, x + bias, kiln.where(x > lambd, x - bias, zero))


@onnx_op("Swish")
def swish(ctx, x):
    x = T(x)
    return x * kiln.sigmoid(x * ctx.attr("alpha", 1.0))


@onnx_op("SwiGLU")
def swiglu(ctx, a, b):
    a, b = T(a), T(b)
    if tuple(a.shape) != tuple(b.shape):
        raise _err(ctx, f"A and B must have the same shape, got {list(a.shape)} and "
                        f"{list(b.shape)}")
    return a * kiln.sigmoid(a * ctx.attr("alpha", 1.0)) * b


@onnx_op("Dropout")
def dropout(ctx, x, ratio=None, training_mode=None):
    x = T(x)
    training = training_mode is not None and bool(np.asarray(ctx.static(2)))
    if training:
        p = 0.5 if ratio is None else float(np.asarray(ctx.static(1)))
        keep = F.dropout(kiln.ones_like(x), p, training=True)  # 0 or 1 / (1 - p)
        return (x * keep, keep != 0)[:ctx.n_outputs]
    if ctx.n_outputs == 1:
        return x
    return x, np.ones(tuple(x.shape), dtype=np.bool_)


# -- rearrangements ----------------------------------------------------------------------------

@onnx_op("DepthToSpace")
def depth_to_space(ctx, x):
    x = T(x)
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if _s(ctx.attr("mode", "DCR")) == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@onnx_op("SpaceToDepth")
def space_to_depth(ctx, x):
    x = T(x)
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    if _s(ctx.attr("mode", "DCR")) == "CRD":
        y = y.permute(0, 1, 3, 5, 2, 4)
    else:
        y = y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)
