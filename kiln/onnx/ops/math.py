"""Elementwise arithmetic and unary math operators."""

from __future__ import annotations

import functools
import math

import numpy as np

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T


def _floating(x):
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    return x


# -- binary arithmetic ---------------------------------------------------------------------------

@onnx_op("Add")
def add(ctx, a, b):
    return kiln.add(T(a), T(b))


@onnx_op("Sub")
def sub(ctx, a, b):
    a, b = T(a), T(b)
    if a.dtype is kiln.bool:
        raise TypeError("Sub is not defined for bool inputs")
    return kiln.sub(a, b)


@onnx_op("Mul")
def mul(ctx, a, b):
    return kiln.mul(T(a), T(b))


@onnx_op("Div")
def div(ctx, a, b):
    a, b = T(a), T(b)
    if a.dtype.is_floating_point:
        return kiln.div(a, b)
    return kiln.div(a, b, rounding_mode="trunc")  # C integer division


@onnx_op("Pow")
def pow_(ctx, a, b):
    a, b = T(a), T(b)
    if b.dtype is not a.dtype:
        b = b.to(a.dtype)
    if not a.dtype.is_floating_point:
        # integer powers through float64 (exact for the values that fit), as ONNX Runtime does
        return kiln.pow(a.to(kiln.float64), b.to(kiln.float64)).to(a.dtype)
    return kiln.pow(a, b)


@onnx_op("Mod")
def mod(ctx, a, b):
    a, b = T(a), T(b)
    if ctx.attr("fmod", 0):
        return kiln.fmod(a, b)
    return kiln.remainder(a, b)  # the sign of the divisor, as Python's %


def _variadic(fn, ctx, args):
    args = [T(a) for a in args if a is not None]
    if not args:
        raise ValueError(f"{ctx.op_type} needs at least one input")
    return functools.reduce(fn, args[1:], args[0] if len(args) > 1 else kiln.clone(args[0]))


@onnx_op("Max")
def max_(ctx, *args):
    return _variadic(kiln.maximum, ctx, args)


@onnx_op("Min")
def min_(ctx, *args):
    return _variadic(kiln.minimum, ctx, args)


@onnx_op("Sum")
def sum_(ctx, *args):
    return _variadic(kiln.add, ctx, args)


@onnx_op("Mean")
def mean(ctx, *args):
    n = len([a for a in args if a is not None])
    return _variadic(kiln.add, ctx, args) / n


# -- bitwise -------------------------------------------------------------------------------------

@onnx_op("BitwiseAnd")
def bitwise_and(ctx, a, b):
    return kiln.bitwise_and(T(a), T(b))


@onnx_op("BitwiseOr")
def bitwise_or(ctx, a, b):
    return kiln.bitwise_or(T(a), T(b))


@onnx_op("BitwiseXor")
def bitwise_xor(ctx, a, b):
    return kiln.bitwise_xor(T(a), T(b))


@onnx_op("BitwiseNot")
def bitwise_not(ctx, a):
    return kiln.bitwise_not(T(a))


@onnx_op("BitShift")
def bit_shift(ctx, x, y):
    """Shifts as NumPy does (ONNX's reference): a count outside [0, width) shifts every bit
    out; right shifts of signed values are arithmetic.  Computed as products and floor
    divisions by powers of two in int64."""
    x, y = T(x), T(y)
    if x.dtype.is_floating_point or x.dtype is kiln.bool:
        raise TypeError(f"BitShift needs integer inputs, got {x.dtype}")
    width = x.dtype.itemsize * 8
    x64, y64 = x.to(kiln.int64), y.to(kiln.int64)
    inside = kiln.logical_and(y64 >= 0, y64 < width)
    if ctx.attr("direction") == "LEFT":
        count = kiln.clamp(y64, 0, width - 1)
        shifted = x64 * kiln.pow(kiln.full_like(count, 2), count)  # wraps as a shift does
        return kiln.where(inside, shifted, kiln.zeros_like(x64)).to(x.dtype)
    count = kiln.clamp(y64, 0, min(width - 1, 62))
    shifted = kiln.div(x64, kiln.pow(kiln.full_like(count, 2), count), rounding_mode="floor")
    fill = kiln.where(x64 < 0, kiln.full_like(x64, -1), kiln.zeros_like(x64))
    return kiln.where(kiln.logical_and(inside, y64 < 63), shifted, fill).to(x.dtype)


# -- unary ---------------------------------------------------------------------------------------

def _unary(op_type, fn):
    def run(ctx, x):
        return fn(T(x))
    run.__name__ = op_type.lower()
    onnx_op(op_type)(run)


for _name, _fn in {
    "Neg": kiln.neg, "Abs": kiln.abs, "Sqrt": kiln.sqrt, "Exp": kiln.exp, "Log": kiln.log,
    "Reciprocal": kiln.reciprocal, "Floor": kiln.floor, "Ceil": kiln.ceil, "Round": kiln.round,
    "Sign": kiln.sign, "Sin": kiln.sin, "Cos": kiln.cos, "Erf": kiln.erf,
    "Sigmoid": kiln.sigmoid, "Tanh": kiln.tanh,
}.items():
    _unary(_name, _fn)


@onnx_op("Tan")
def tan(ctx, x):
    x = _floating(T(x))
    return kiln.sin(x) / kiln.cos(x)


@onnx_op("Sinh")
def sinh(ctx, x):
    x = _floating(T(x))
    return (kiln.expm1(x) - kiln.expm1(-x)) * 0.5


@onnx_op("Cosh")
def cosh(ctx, x):
    x = _floating(T(x))
    return (kiln.exp(x) + kiln.exp(-x)) * 0.5


@onnx_op("Asinh")
def asinh(ctx, x):
    x = _floating(T(x))
    zero = kiln.zeros_like(x)
    pos = x >= 0
    # odd, and each branch on a non-negative argument (no cancellation, right gradient at 0)
    up, down = kiln.where(pos, x, zero), kiln.where(pos, zero, -x)
    f_up = kiln.log(up + kiln.sqrt(up * up + 1))
    f_down = kiln.log(down + kiln.sqrt(down * down + 1))
    return kiln.where(pos, f_up, -f_down)


@onnx_op("Acosh")
def acosh(ctx, x):
    x = _floating(T(x))
    return kiln.log(x + kiln.sqrt(x * x - 1))


@onnx_op("Atanh")
def atanh(ctx, x):
    x = _floating(T(x))
    return 0.5 * (kiln.log1p(x) - kiln.log1p(-x))


def _atan_series(s):
    """arctan(s) for |s| <= tan(pi/12): the odd Taylor series to s^15 (error < 2e-11)."""
    s2 = s * s
    poly = 1 / 15.0
    for k in (13, 11, 9, 7, 5, 3, 1):
        poly = 1.0 / k - s2 * poly
    return s * poly


def _atan(x):
    """arctan from Kiln ops: range reduction to |s| <= tan(pi/12), then ``_atan_series``.
    Small inputs take the series directly (signed), so the gradient at 0 is right."""
    r3 = 2 - math.sqrt(3)  # tan(pi/12)
    a = kiln.abs(x)
    small = a <= r3
    direct = _atan_series(kiln.where(small, x, kiln.zeros_like(x)))
    big = a > 1
    t = kiln.where(big, 1 / kiln.clamp(a, min=1e-30), a)  # t in [0, 1]
    mid = t > r3
    s = kiln.where(mid, (t * math.sqrt(3) - 1) / (t + math.sqrt(3)), t)  # |s| <= tan(pi/12)
    r = _atan_series(s)
    r = kiln.where(mid, r + math.pi / 6, r)
    r = kiln.where(big, math.pi / 2 - r, r)
    return kiln.where(small, direct, kiln.sign(x) * r)


@onnx_op("Atan")
def atan(ctx, x):
    return _atan(_floating(T(x)))


@onnx_op("Asin")
def asin(ctx, x):
    x = _floating(T(x))
    # asin(x) = 2 atan(x / (1 + sqrt(1 - x^2))), stable on [-1, 1]
    return 2 * _atan(x / (1 + kiln.sqrt(kiln.clamp(1 - x * x, min=0))))


@onnx_op("Acos")
def acos(ctx, x):
    x = _floating(T(x))
    # acos(x) = 2 atan(sqrt((1 - x) / (1 + x))), written to stay finite at x = -1
    return 2 * _atan2(kiln.sqrt(kiln.clamp(1 - x, min=0)), kiln.sqrt(kiln.clamp(1 + x, min=0)))


def _atan2(y, x):
    """atan2 for y >= 0, x >= 0."""
    safe = kiln.where(x > 0, x, kiln.ones_like(x))
    return kiln.where(x > 0, _atan(y / safe), kiln.full_like(y, math.pi / 2))


# -- clipping and tests --------------------------------------------------------------------------

@onnx_op("Clip")
def clip(ctx, x, lo=None, hi=None):
    x = T(x)
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
        lo = None if lo is None else np.array(lo, x.dtype.np)
        hi = None if hi is None else np.array(hi, x.dtype.np)
    if lo is not None:
        x = kiln.maximum(x, T(lo).to(x.dtype))
    if hi is not None:
        x = kiln.minimum(x, T(hi).to(x.dtype))
    return x if lo is not None or hi is not None else kiln.clone(x)


@onnx_op("IsNaN")
def isnan(ctx, x):
    return kiln.isnan(T(x))


@onnx_op("IsInf")
def isinf(ctx, x):
    x = T(x)
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    inf = kiln.isinf(x)
    if pos and neg:
        return inf
    if pos:
        return kiln.logical_and(inf, x > 0)
    if neg:
        return kiln.logical_and(inf, x < 0)
    return kiln.zeros_like(inf)


# -- signal --------------------------------------------------------------------------------------

def _fit(x, n: int, ax: int):
    """``x`` truncated or zero-padded to length ``n`` along axis ``ax``."""
    m = x.shape[ax]
    if m >= n:
        return kiln.narrow(x, ax, 0, n)
    pad_shape = list(x.shape)
    pad_shape[ax] = n - m
    return kiln.cat([x, kiln.zeros(tuple(pad_shape), dtype=x.dtype)], ax)


def _along(mat: np.ndarray, x, ax: int):
    """``mat @ x`` along axis ``ax`` of ``x`` (``mat`` a constant (out, in) matrix)."""
    y = kiln.movedim(x, ax, -1)
    y = kiln.matmul(y, kiln.from_numpy(np.ascontiguousarray(mat.T.astype(x.dtype.np))))
    return kiln.movedim(y, -1, ax)


@onnx_op("DFT")
def dft(ctx, x, length=None, ax_input=None):
    """The discrete Fourier transform as products with cosine and sine matrices, so that it
    has gradients.  The last axis of ``x`` holds (real) or (real, imaginary)."""
    x = _floating(T(x))
    if ctx.opset >= 20:
        ax = -2 if ax_input is None else int(np.asarray(ctx.static(2)).reshape(-1)[0])
    else:
        ax = ctx.attr("axis", 1)
    ax = ax % x.ndim
    inverse, onesided = ctx.attr("inverse", 0), ctx.attr("onesided", 0)
    if length is not None:
        n = int(np.asarray(ctx.static(1)).reshape(-1)[0])
    else:
        n = 2 * (x.shape[ax] - 1) if inverse and onesided else x.shape[ax]
    return _dft(x, n, ax, inverse, onesided)


def _dft(x, n: int, ax: int, inverse: bool, onesided: bool):
    """DFT of length ``n`` along ``ax`` of ``x`` (last axis: real or (real, imaginary)),
    computed in float64 as NumPy's FFT (ONNX's reference) does."""
    dtype = x.dtype
    x = x.to(kiln.float64)
    re = kiln.narrow(x, -1, 0, 1).squeeze(-1)
    im = kiln.narrow(x, -1, 1, 1).squeeze(-1) if x.shape[-1] == 2 else None
    k = np.arange(n)
    if inverse and onesided:  # one-sided spectrum -> real signal (irfft)
        half = n // 2 + 1
        re = _fit(re, half, ax)
        im = _fit(im, half, ax) if im is not None else None
        weight = np.full(half, 2.0)
        weight[0] = 1.0
        if n % 2 == 0:
            weight[-1] = 1.0
        angle = 2 * np.pi * np.outer(k, np.arange(half)) / n
        y = _along(np.cos(angle) * weight / n, re, ax)
        if im is not None:
            y = y - _along(np.sin(angle) * weight / n, im, ax)
        return kiln.unsqueeze(y, -1).to(dtype)
    re = _fit(re, n, ax)
    im = _fit(im, n, ax) if im is not None else None
    angle = 2 * np.pi * np.outer(k, k) / n
    cos, sin = np.cos(angle), np.sin(angle)
    if inverse:
        cos, sin = cos / n, -sin / n
    out_re = _along(cos, re, ax)
    out_im = -_along(sin, re, ax)
    if im is not None:
        out_re = out_re + _along(sin, im, ax)
        out_im = out_im + _along(cos, im, ax)
    y = kiln.stack([out_re, out_im], -1)
    if onesided:
        y = kiln.narrow(y, ax, 0, n // 2 + 1)
    return y.to(dtype)


@onnx_op("STFT")
def stft(ctx, x, step, window=None, length=None):
    """Short-time Fourier transform: windowed frames of ``x`` ([batch, time, 1 or 2]), each
    transformed by ``_dft``."""
    x = _floating(T(x))
    hop = int(np.asarray(ctx.static(1)).reshape(-1)[0])
    if length is not None:
        n = int(np.asarray(ctx.static(3)).reshape(-1)[0])
    else:
        n = T(window).shape[0] if window is not None else x.shape[-2]
    frames = 1 + (x.shape[1] - n) // hop
    idx = kiln.from_numpy(np.arange(frames)[:, None] * hop + np.arange(n)[None, :])
    y = x[:, idx]  # [batch, frames, n, 1 or 2]
    if window is not None:
        y = y * kiln.reshape(T(window).to(x.dtype), (1, 1, n, 1))
    return _dft(y, n, 2, False, ctx.attr("onesided", 1))


# -- quantization --------------------------------------------------------------------------------

def _broadcast_param(v, x, ctx):
    """A scale or zero point shaped to broadcast against ``x``: a scalar, one value per index
    of ``axis`` (1-D), or blocks of ``block_size`` along ``axis`` (same rank as ``x``)."""
    v = T(v)
    if v.ndim == 0 or v.numel() == 1 and v.ndim <= 1:
        return kiln.reshape(v, ())
    ax = ctx.attr("axis", 1) % x.ndim
    block = ctx.attr("block_size", 0)
    if block:
        idx = kiln.from_numpy(np.arange(x.shape[ax], dtype=np.int64) // block)
        return kiln.index_select(v, ax, idx)
    shape = [1] * x.ndim
    shape[ax] = v.shape[0]
    return kiln.reshape(v, tuple(shape))


@onnx_op("DequantizeLinear")
def dequantize_linear(ctx, x, scale, zero_point=None):
    x, scale = T(x), T(scale)
    y = x.to(kiln.float32)
    if zero_point is not None:
        y = y - _broadcast_param(zero_point, x, ctx).to(kiln.float32)
    y = y * _broadcast_param(scale, x, ctx).to(kiln.float32)
    return y.to(_out_type(ctx, scale.dtype))


def _out_type(ctx, default):
    if not ctx.attr("output_dtype"):
        return default
    from kiln.onnx.ops.tensor import _kiln_dtype

    return _kiln_dtype(ctx.attr("output_dtype"), ctx)


def _quant_range(qtype):
    # int32 is not a quantized ONNX type: an int32 zero point is a widened uint16 one
    return (0, 65535) if qtype is kiln.int32 else (np.iinfo(qtype.np).min, np.iinfo(qtype.np).max)


@onnx_op("QuantizeLinear")
def quantize_linear(ctx, x, scale, zero_point=None):
    x, scale = T(x), T(scale)
    qtype = _out_type(ctx, kiln.uint8 if zero_point is None else T(zero_point).dtype)
    if qtype.is_floating_point or qtype is kiln.bool:
        raise NotImplementedError(f"QuantizeLinear to {qtype} is not supported")
    y = kiln.round(x.to(kiln.float32) / _broadcast_param(scale, x, ctx).to(kiln.float32))
    if zero_point is not None:
        y = y + _broadcast_param(zero_point, x, ctx).to(kiln.float32)
    lo, hi = _quant_range(qtype)
    return kiln.clamp(y, float(lo), float(hi)).to(qtype)


@onnx_op("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx, x):
    x = T(x).to(kiln.float32)
    lo = kiln.clamp(kiln.amin(x), max=0.0)
    hi = kiln.clamp(kiln.amax(x), min=0.0)
    scale = (hi - lo) / 255.0
    safe = kiln.where(scale > 0, scale, kiln.ones_like(scale))
    zero = kiln.clamp(kiln.round(-lo / safe), 0.0, 255.0)
    y = kiln.clamp(kiln.round(x / safe) + zero, 0.0, 255.0)
    return y.to(kiln.uint8), scale, zero.to(kiln.uint8)
