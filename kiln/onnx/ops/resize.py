"""ONNX Resize and Upsample in Kiln ops.

Resizing is separable: each resized axis is one (out, in) interpolation matrix, computed with
NumPy from the shapes and attributes only, then applied to the data with a matmul (linear,
cubic) or an index_select (nearest, exact for every dtype).  tf_crop_and_resize's
extrapolation is a per-row bias (out-of-range rows have no weights).
"""

from __future__ import annotations

import numpy as np

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T
from kiln.onnx.ops.nn import _err, _s


def _source_coords(ctm, L, Lo, scale, roi):
    """Each output index's coordinate in the input (float64), per coordinate_transformation_mode."""
    x = np.arange(Lo, dtype=np.float64)
    out_w = scale * L
    if ctm == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        offset = L / 2 * (1 - Lo / out_w)
        return offset + (x + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return np.full(Lo, -0.5) if out_w == 1 else (x + 0.5) / scale - 0.5
    if ctm == "align_corners":
        return np.zeros(Lo) if out_w == 1 else x * (L - 1) / (out_w - 1)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_crop_and_resize":
        lo, hi = roi
        if out_w == 1:
            return np.full(Lo, (hi - lo) * (L - 1) / 2 + lo * (L - 1))
        return x * (hi - lo) * (L - 1) / (out_w - 1) + lo * (L - 1)
    raise ValueError(f"unknown coordinate_transformation_mode {ctm!r}")


def _cubic(d, A):
    d = np.abs(d)
    near = ((A + 2) * d - (A + 3)) * d * d + 1
    far = ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _coeffs(mode, ratio, is_int, scale, o):
    """(offsets, weights (Lo, n)): weights of pixels ``left + offset`` (left = x - ratio)."""
    r = ratio[:, None]
    if mode == "nearest":
        rule = o["nearest_mode"]
        if rule == "round_prefer_floor":
            right = ratio > 0.5
        elif rule == "round_prefer_ceil":
            right = ratio >= 0.5
        elif rule == "floor":
            right = np.zeros_like(ratio, dtype=bool)
        elif rule == "ceil":
            right = np.ones_like(ratio, dtype=bool)
        else:
            raise ValueError(f"unknown nearest_mode {rule!r}")
        right = right | is_int
        return np.array([0, 1]), np.stack([~right, right], axis=1).astype(np.float64)
    s = min(scale, 1.0) if o["antialias"] else 1.0
    if mode == "linear":
        start = int(np.floor(-1 / s) + 1)
        offs = np.arange(start, 2 - start)
        w = np.clip(1 - np.abs((offs[None, :] - r) * s), 0, 1)
    elif mode == "cubic":
        start = int(np.floor(-2 / s) + 1)
        offs = np.arange(start, 2 - start)
        w = _cubic((offs[None, :] - r) * s, o["cubic_coeff_a"])
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if o["antialias"]:
        w = w / w.sum(axis=1, keepdims=True)
    return offs, w


def _matrix(L, Lo, scale, roi, o):
    """The (Lo, L) interpolation matrix of one axis and the rows that extrapolate (or None)."""
    x = _source_coords(o["ctm"], L, Lo, scale, roi)
    left = np.floor(x)
    is_int = x == left
    ratio = np.where(is_int, 1.0, x - left)
    left = left - is_int  # the ratio is in (0, 1]: an exact hit is the right-hand pixel
    offs, w = _coeffs(o["mode"], ratio, is_int, scale, o)
    idx = left[:, None].astype(np.int64) + offs[None, :]
    if o["exclude_outside"]:
        w = np.where((idx < 0) | (idx >= L), 0.0, w)
        w = w / w.sum(axis=1, keepdims=True)
    m = np.zeros((Lo, L))
    rows = np.broadcast_to(np.arange(Lo)[:, None], idx.shape)
    np.add.at(m, (rows, np.clip(idx, 0, L - 1)), w)
    extrap = None
    if o["ctm"] == "tf_crop_and_resize":
        extrap = (x < 0) | (x > L - 1)
        m[extrap] = 0
        extrap = extrap if extrap.any() else None
    return m, extrap


def _resize_axis(y, axis, m, extrap, o):
    shape = [1] * y.ndim
    shape[axis] = m.shape[0]
    if o["mode"] == "nearest":
        y = kiln.index_select(y, axis, kiln.from_numpy(np.argmax(m, axis=1).astype(np.int64)))
    else:
        moved = kiln.movedim(y, axis, -1)
        y = kiln.movedim(kiln.matmul(moved, T(np.ascontiguousarray(m.T).astype(y.dtype.np))),
                         -1, axis)
    if extrap is not None:
        mask = kiln.from_numpy(extrap.reshape(shape))
        y = kiln.where(mask, kiln.full_like(y, o["extrapolation_value"]), y)
    return y


def _sizes_and_scales(ctx, shape, scales, sizes, axes):
    r = len(shape)
    axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in axes]
    if sizes is not None and sizes.size:
        full = list(shape)
        for a, s in zip(axes, sizes):
            full[a] = int(s)
        sc = [full[a] / shape[a] for a in range(r)]
        policy = _s(ctx.attr("keep_aspect_ratio_policy", "stretch"))
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            s = pick(sc[a] for a in axes)
            sc = [s if a in axes else 1.0 for a in range(r)]
            full = [int(s * shape[a] + 0.5) if a in axes else shape[a] for a in range(r)]
        return full, sc, axes
    if scales is None or not scales.size:
        raise _err(ctx, "needs either scales or sizes")
    sc = [1.0] * r
    for a, s in zip(axes, scales):
        sc[a] = float(s)
    return [int(s * n) for s, n in zip(sc, shape)], sc, axes


def _resize(ctx, x, roi, scales, sizes, o):
    x = T(x)
    shape = tuple(x.shape)
    axes = ctx.attr("axes")
    out, sc, axes = _sizes_and_scales(ctx, shape, scales, sizes, axes)
    r = len(shape)
    if roi is not None and roi.size:
        roi = np.asarray(roi, dtype=np.float64).reshape(-1)
        n = len(roi) // 2
        full = [[0.0, 1.0] for _ in range(r)]
        for i, a in enumerate(axes if n != r else range(r)):
            full[a] = [roi[i], roi[n + i]]
        roi = full
    else:
        roi = [[0.0, 1.0]] * r
    if o["mode"] != "nearest" and not x.dtype.is_floating_point:
        raise _err(ctx, f"{o['mode']} resizing of {x.dtype} data is not supported")
    y = x
    for a in axes:
        if out[a] == shape[a] and np.isclose(sc[a], 1.0) and roi[a] == [0.0, 1.0]:
            continue
        m, extrap = _matrix(shape[a], out[a], sc[a], roi[a], o)
        y = _resize_axis(y, a, m, extrap, o)
    return y


def _options(ctx, legacy: bool) -> dict:
    mode = _s(ctx.attr("mode", "nearest"))
    if legacy:  # Upsample and Resize-10: asymmetric coordinates, nearest rounds down
        return {"mode": "linear" if mode in ("linear", "bilinear") else mode,
                "ctm": "asymmetric", "nearest_mode": "floor", "antialias": 0,
                "exclude_outside": 0, "cubic_coeff_a": -0.75, "extrapolation_value": 0.0}
    return {"mode": mode,
            "ctm": _s(ctx.attr("coordinate_transformation_mode", "half_pixel")),
            "nearest_mode": _s(ctx.attr("nearest_mode", "round_prefer_floor")),
            "antialias": ctx.attr("antialias", 0),
            "exclude_outside": ctx.attr("exclude_outside", 0),
            "cubic_coeff_a": ctx.attr("cubic_coeff_a", -0.75),
            "extrapolation_value": ctx.attr("extrapolation_value", 0.0)}


@onnx_op("Resize")
def resize(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.opset < 11:  # Resize-10: (X, scales)
        return _resize(ctx, x, None, np.asarray(ctx.static(1)), None, _options(ctx, True))
    roi = None if roi is None else np.asarray(ctx.static(1))
    scales = None if scales is None else np.asarray(ctx.static(2))
    sizes = None if sizes is None else np.asarray(ctx.static(3))
    return _resize(ctx, x, roi, scales, sizes, _options(ctx, False))


@onnx_op("Upsample")
def upsample(ctx, x, scales=None):
    sc = np.asarray(ctx.attr("scales") if scales is None else ctx.static(1))
    return _resize(ctx, x, None, sc, None, _options(ctx, True))
