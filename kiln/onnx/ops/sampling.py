"""ONNX AffineGrid and GridSample (2-D and 3-D) in Kiln ops.

GridSample reads the input at positions computed from the grid tensor: each interpolation tap
is a gather with indices computed by Kiln ops, weighted by Kiln ops of the grid, so gradients
reach both the input and the grid.
"""

from __future__ import annotations

import itertools

import numpy as np

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T
from kiln.onnx.ops.nn import _err, _s


def _base_grid(sizes, align_corners: bool) -> np.ndarray:
    """(prod(sizes), nd + 1) homogeneous coordinates in [-1, 1], x (last dim) first."""
    axes = []
    for n in sizes:
        if align_corners:
            axes.append(np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1))
        else:
            axes.append((2 * np.arange(n) + 1) / n - 1)
    mesh = np.meshgrid(*axes, indexing="ij")
    coords = [m.reshape(-1) for m in reversed(mesh)]  # x, y(, z)
    return np.stack(coords + [np.ones_like(coords[0])], axis=1)


@onnx_op("AffineGrid")
def affine_grid(ctx, theta, size):
    theta = T(theta)
    size = [int(v) for v in np.asarray(ctx.static(1)).reshape(-1)]
    spatial = size[2:]
    if len(spatial) not in (2, 3):
        raise _err(ctx, f"size must describe a 2-D or 3-D input, got {size}")
    base = T(_base_grid(spatial, bool(ctx.attr("align_corners", 0))).astype(theta.dtype.np))
    grid = kiln.matmul(base, theta.transpose(1, 2))  # (N, P, nd)
    return grid.reshape(size[0], *spatial, len(spatial))


def _reflect(x, lo: float, hi: float):
    """Reflect coordinates into [lo, hi] off the nearer border, repeatedly."""
    span = hi - lo
    if span <= 0:
        return kiln.zeros_like(x)

    def fold(d, near, far):  # d >= 0: distance past the `near` border
        n = kiln.floor(d / span)
        r = d - n * span
        even = kiln.remainder(n, 2.0) == 0
        return kiln.where(even, near + r * (1 if near == lo else -1),
                          far + r * (-1 if near == lo else 1))

    below = fold(lo - x, lo, hi)
    above = fold(x - hi, hi, lo)
    return kiln.where(x < lo, below, kiln.where(x > hi, above, x))


def _cubic_weights(t, A=-0.75):
    def near(d):
        return ((A + 2) * d - (A + 3)) * d * d + 1

    def far(d):
        return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@onnx_op("GridSample")
def grid_sample(ctx, x, grid):
    x, grid = T(x), T(grid)
    mode = _s(ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear"))
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = _s(ctx.attr("padding_mode", "zeros"))
    align = bool(ctx.attr("align_corners", 0))
    if mode not in ("nearest", "linear", "cubic") or padding not in ("zeros", "border",
                                                                     "reflection"):
        raise _err(ctx, f"mode={mode!r} padding_mode={padding!r} is not supported")
    n, c = x.shape[:2]
    sizes = list(x.shape[2:])
    nd = len(sizes)
    out = tuple(grid.shape[1:-1])
    g = grid.reshape(n, -1, nd)  # (N, P, nd), coordinates x first
    taps = []  # per spatial dim: list of (index tensor, weight tensor or None)
    for i, d in enumerate(sizes):
        v = g[:, :, nd - 1 - i]
        v = (v + 1) / 2 * (d - 1) if align else ((v + 1) * d - 1) / 2
        if mode == "nearest":
            v = kiln.round(v)
        lo, hi = (0.0, d - 1.0) if align else (-0.5, d - 0.5)
        if padding == "border" and mode != "cubic":  # cubic clamps each tap (as PyTorch)
            v = kiln.where((v < lo) | (v > hi), kiln.clamp(v, 0, d - 1), v)
        elif padding == "reflection":
            v = _reflect(v, lo, hi)
        if mode == "nearest":
            taps.append([(v, None)])
            continue
        base = kiln.floor(v)
        t = v - base
        if mode == "linear":
            taps.append([(base, 1 - t), (base + 1, t)])
        else:
            taps.append([(base + k - 1, w) for k, w in enumerate(_cubic_weights(t))])
    flat_x = x.reshape(n, c, -1)
    strides = [int(np.prod(sizes[i + 1:])) for i in range(nd)]
    y = None
    for combo in itertools.product(*taps):
        index, weight, valid = None, None, None
        for i, (pos, w) in enumerate(combo):
            d = sizes[i]
            if padding == "reflection" and mode != "nearest":
                pos = _reflect(pos, *((0.0, d - 1.0) if align else (-0.5, d - 0.5)))
            ok = (pos >= 0) & (pos <= d - 1)
            valid = ok if valid is None else valid & ok
            term = kiln.clamp(pos, 0, d - 1).to(kiln.int64) * strides[i]
            index = term if index is None else index + term
            if w is not None:
                weight = w if weight is None else weight * w
        vals = kiln.gather(flat_x, 2, index.unsqueeze(1).expand(n, c, index.shape[1]))
        if padding == "zeros":
            weight = valid.to(x.dtype) if weight is None else weight * valid.to(x.dtype)
        if weight is not None:
            vals = vals * weight.unsqueeze(1)
        y = vals if y is None else y + vals
    return y.reshape(n, c, *out)


def _bilinear_zeros(flat, py, px, H: int, W: int):
    """Bilinear samples of flat (..., C, H*W) at pixel coordinates py, px (..., P); taps outside
    the image read zero.  Returns (..., C, P)."""
    y0, x0 = kiln.floor(py), kiln.floor(px)
    ty, tx = py - y0, px - x0
    out = None
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            yy, xx = y0 + dy, x0 + dx
            ok = ((yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)).to(flat.dtype)
            idx = (kiln.clamp(yy, 0, H - 1) * W + kiln.clamp(xx, 0, W - 1)).to(kiln.int64)
            idx = idx.unsqueeze(-2).expand(*flat.shape[:-1], idx.shape[-1])
            v = kiln.gather(flat, flat.ndim - 1, idx) * (wy * wx * ok).unsqueeze(-2)
            out = v if out is None else out + v
    return out


@onnx_op("DeformConv")
def deform_conv(ctx, x, w, offset, b=None, mask=None):
    """2-D deformable convolution: each kernel tap reads the input bilinearly at its position
    moved by a learned offset (and scaled by the optional mask), then a grouped matmul."""
    x, w, offset, b, mask = (T(a) for a in (x, w, offset, b, mask))
    if x.ndim != 4:
        raise _err(ctx, f"only 2-D deformable convolution is supported, got {x.ndim - 2}-D")
    n, c, H, W = x.shape
    oc, cg, kh, kw = w.shape
    groups, og = ctx.attr("group", 1), ctx.attr("offset_group", 1)
    sh, sw = ctx.attr("strides") or [1, 1]
    dh, dw = ctx.attr("dilations") or [1, 1]
    pads = ctx.attr("pads") or [0, 0, 0, 0]
    oh, ow = offset.shape[2:]
    P, K = oh * ow, kh * kw
    off = offset.reshape(n, og, kh, kw, 2, P)
    msk = None if mask is None else mask.reshape(n, og, kh, kw, P)
    base_y = np.repeat(np.arange(oh) * sh - pads[0], ow).astype(x.dtype.np)
    base_x = np.tile(np.arange(ow) * sw - pads[1], oh).astype(x.dtype.np)
    flat = x.reshape(n, og, c // og, H * W)
    cols = []
    for a in range(kh):
        for bb in range(kw):
            py = off[:, :, a, bb, 0] + T(base_y + a * dh)
            px = off[:, :, a, bb, 1] + T(base_x + bb * dw)
            v = _bilinear_zeros(flat, py, px, H, W)  # (N, og, C/og, P)
            if msk is not None:
                v = v * msk[:, :, a, bb].unsqueeze(2)
            cols.append(v.reshape(n, c, P))
    cols = kiln.stack(cols, dim=2).reshape(n, groups, cg * K, P)
    y = kiln.matmul(w.reshape(groups, oc // groups, cg * K), cols).reshape(n, oc, oh, ow)
    return y if b is None else y + b.reshape(-1, 1, 1)


def _roi_samples(box, H, W, oh, ow, ratio, half_pixel):
    """Flat input positions (P, S, 4) and bilinear weights of each output bin's samples."""
    x0, y0, x1, y1 = box
    rh, rw = y1 - y0, x1 - x0
    if not half_pixel:
        rh, rw = max(rh, 1.0), max(rw, 1.0)
    gh = int(ratio) if ratio > 0 else int(np.ceil(rh / oh))
    gw = int(ratio) if ratio > 0 else int(np.ceil(rw / ow))
    ys = y0 + np.arange(oh)[:, None] * rh / oh + (np.arange(gh)[None, :] + 0.5) * rh / oh / gh
    xs = x0 + np.arange(ow)[:, None] * rw / ow + (np.arange(gw)[None, :] + 0.5) * rw / ow / gw
    y = np.broadcast_to(ys[:, None, :, None], (oh, ow, gh, gw)).reshape(oh * ow, -1)
    x = np.broadcast_to(xs[None, :, None, :], (oh, ow, gh, gw)).reshape(oh * ow, -1)
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    y, x = np.maximum(y, 0), np.maximum(x, 0)
    ylo, xlo = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    ytop, xtop = ylo >= H - 1, xlo >= W - 1
    ylo, xlo = np.where(ytop, H - 1, ylo), np.where(xtop, W - 1, xlo)
    y, x = np.where(ytop, ylo, y), np.where(xtop, xlo, x)
    yhi, xhi = np.where(ytop, ylo, ylo + 1), np.where(xtop, xlo, xlo + 1)
    ly, lx = y - ylo, x - xlo
    pos = np.stack([ylo * W + xlo, ylo * W + xhi, yhi * W + xlo, yhi * W + xhi], axis=-1)
    w = np.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], axis=-1)
    w[outside] = 0
    pos[outside] = 0
    return pos, w, max(gh * gw, 1)


@onnx_op("RoiAlign")
def roi_align(ctx, x, rois, batch_indices):
    """Average (or max) of bilinear samples in each bin of each region of interest.  The
    regions are read as static values (gradients reach ``x``, not the boxes)."""
    x = T(x)
    boxes = np.asarray(ctx.static(1), dtype=np.float64).reshape(-1, 4)
    batch = np.asarray(ctx.static(2)).astype(np.int64).reshape(-1)
    oh, ow = ctx.attr("output_height", 1), ctx.attr("output_width", 1)
    ratio, scale = ctx.attr("sampling_ratio", 0), ctx.attr("spatial_scale", 1.0)
    mode = _s(ctx.attr("mode", "avg"))
    ctm = _s(ctx.attr("coordinate_transformation_mode",
                      "half_pixel" if ctx.opset >= 16 else "output_half_pixel"))
    half = ctm == "half_pixel"
    n, c, H, W = x.shape
    flat = x.reshape(n, c, H * W)
    outs = []
    for box, b in zip(boxes, batch):
        pos, w, count = _roi_samples(box * scale - (0.5 if half else 0.0), H, W, oh, ow, ratio,
                                     half)
        vals = kiln.index_select(flat[int(b)], 1, kiln.from_numpy(pos.reshape(-1)))
        vals = vals.reshape(c, *pos.shape) * T(w.astype(x.dtype.np))
        if mode == "avg":
            y = vals.sum(dim=(-1, -2)) / count
        else:
            y = kiln.amax(kiln.amax(vals, dim=-1), dim=-1)
        outs.append(y.reshape(c, oh, ow))
    if not outs:
        return kiln.zeros(0, c, oh, ow, dtype=x.dtype)
    return kiln.stack(outs)
