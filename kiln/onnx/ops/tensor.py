"""Tensor plumbing: casts, constants, shapes, reshapes, slicing, gathers and scatters."""

from __future__ import annotations

import numpy as np

import kiln
import kiln.nn.functional as F
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T, arr, axis, ints


def _np_type(elem_type: int, ctx):
    from kiln.onnx.importer import np_dtype

    return np_dtype(int(elem_type), f"ONNX node {ctx.name!r} ({ctx.op_type}) target type")


def _kiln_dtype(elem_type: int, ctx):
    return kiln.dtypes.from_numpy_dtype(_np_type(elem_type, ctx))


# -- identity, casts, constants ------------------------------------------------------------------

@onnx_op("Identity")
def identity(ctx, x):
    if x is None or isinstance(x, (np.ndarray, list)):  # static, a sequence, an empty optional
        return x
    return kiln.clone(x)


def _cast(x, dt):
    x = T(x)
    if x.dtype.is_floating_point and not dt.is_floating_point and dt is not kiln.bool:
        # float -> int truncates toward zero; NaN/inf have no integer value
        return kiln.trunc(x).to(dt)
    return x.to(dt)


@onnx_op("Cast")
def cast(ctx, x):
    return _cast(x, _kiln_dtype(ctx.attr("to"), ctx))


@onnx_op("CastLike")
def cast_like(ctx, x, like):
    return _cast(x, T(like).dtype)


@onnx_op("Constant")
def constant(ctx):
    a = ctx.attrs
    if "value" in a:
        return np.array(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], np.int64)
    raise NotImplementedError(f"Constant with attributes {sorted(a)} is not supported "
                              "(strings and sparse tensors are not)")


@onnx_op("ConstantOfShape")
def constant_of_shape(ctx, shape):
    value = ctx.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    return np.full(tuple(ints(ctx.static(0))), value.reshape(-1)[0], value.dtype)


@onnx_op("EyeLike")
def eye_like(ctx, x):
    x = T(x)
    dt = x.dtype.np if ctx.attr("dtype") is None else _np_type(ctx.attr("dtype"), ctx)
    n, m = x.shape
    return np.eye(n, m, k=ctx.attr("k", 0), dtype=dt)


@onnx_op("Range")
def range_(ctx, start, limit, delta):
    s, lim, d = (arr(ctx.static(i)) for i in range(3))
    if any(v.size != 1 for v in (s, lim, d)):
        raise ValueError(f"Range takes scalar start, limit and delta, got shapes "
                         f"{s.shape}, {lim.shape}, {d.shape}")
    s, lim, d = (v.reshape(()) for v in (s, lim, d))  # (1,) is accepted, as ONNX Runtime does
    n = max(int(np.ceil((lim - s) / d)), 0)
    return (s + np.arange(n).astype(s.dtype) * d).astype(s.dtype)


# -- shapes --------------------------------------------------------------------------------------

@onnx_op("Shape")
def shape(ctx, x):
    dims = np.array(T(x).shape, np.int64)
    n = len(dims)
    start, end = ctx.attr("start", 0), ctx.attr("end", n)
    start = min(max(start + n if start < 0 else start, 0), n)
    end = min(max(end + n if end < 0 else end, 0), n)
    return dims[start:end].copy()


@onnx_op("Size")
def size(ctx, x):
    return np.array(int(np.prod(T(x).shape)), np.int64)


@onnx_op("Reshape")
def reshape(ctx, x, new_shape=None):
    x = T(x)
    dims = ints(ctx.attr("shape")) if ctx.opset < 5 else ints(ctx.static(1))
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return kiln.reshape(x, tuple(dims))


@onnx_op("Flatten")
def flatten(ctx, x):
    x = T(x)
    ax = ctx.attr("axis", 1)
    ax = ax + x.ndim if ax < 0 else ax
    outer = int(np.prod(x.shape[:ax]))
    return kiln.reshape(x, (outer, int(np.prod(x.shape[ax:]))))


def _axes_of(ctx, i: int, attr: str = "axes", from_opset: int = 13):
    if ctx.opset >= from_opset:
        v = ctx.static(i)
        return None if v is None else ints(v)
    return ctx.attr(attr)


@onnx_op("Squeeze")
def squeeze(ctx, x, axes=None):
    x = T(x)
    dims = _axes_of(ctx, 1)
    if dims is None:
        dims = [i for i, n in enumerate(x.shape) if n == 1]
    dims = {axis(d, x.ndim, ctx) for d in dims}
    for d in dims:
        if x.shape[d] != 1:
            raise ValueError(f"cannot squeeze axis {d} of size {x.shape[d]}")
    return kiln.reshape(x, tuple(n for i, n in enumerate(x.shape) if i not in dims))


@onnx_op("Unsqueeze")
def unsqueeze(ctx, x, axes=None):
    x = T(x)
    dims = _axes_of(ctx, 1)
    rank = x.ndim + len(dims)
    dims = {axis(d, rank, ctx) for d in dims}
    it = iter(x.shape)
    return kiln.reshape(x, tuple(1 if i in dims else next(it) for i in range(rank)))


@onnx_op("Transpose")
def transpose(ctx, x):
    x = T(x)
    perm = ctx.attr("perm") or list(range(x.ndim))[::-1]
    return kiln.permute(x, tuple(perm))


@onnx_op("Expand")
def expand(ctx, x, shape):
    x = T(x)
    target = ints(ctx.static(1))
    out = np.broadcast_shapes(tuple(x.shape), tuple(target))
    return kiln.clone(kiln.broadcast_to(x, out))


@onnx_op("Tile")
def tile(ctx, x, repeats):
    return kiln.tile(T(x), tuple(ints(ctx.static(1))))


@onnx_op("Concat")
def concat(ctx, *xs):
    xs = [T(x) for x in xs if x is not None]
    ax = axis(ctx.attr("axis"), xs[0].ndim, ctx)
    return kiln.cat(xs, ax)


@onnx_op("Split")
def split(ctx, x, sizes=None):
    x = T(x)
    ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
    n = x.shape[ax]
    if ctx.opset >= 13:
        sizes = None if sizes is None else ints(ctx.static(1))
    else:
        sizes = ctx.attr("split")
    if not sizes:
        parts = ctx.attr("num_outputs", ctx.n_outputs)
        step = -(-n // parts)
        sizes = [min(step, n - i * step) for i in range(parts)]
    if sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to the axis size {n}")
    return tuple(kiln.split(x, list(sizes), ax))


# -- slicing and indexing ------------------------------------------------------------------------

@onnx_op("Slice")
def slice_(ctx, x, starts=None, ends=None, axes=None, steps=None):
    x = T(x)
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    else:
        starts, ends = ints(ctx.static(1)), ints(ctx.static(2))
        axes = None if axes is None else ints(ctx.static(3))
        steps = None if steps is None else ints(ctx.static(4))
    axes = list(range(len(starts))) if axes is None else [axis(a, x.ndim, ctx) for a in axes]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    flips = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            raise ValueError("Slice step cannot be 0")
        n = x.shape[a]
        r = range(n)[slice(s, e, st)]
        if len(r) == 0:
            index[a] = slice(0, 0)
        elif st > 0:
            index[a] = slice(r[0], r[-1] + 1, st)
        else:
            flips.append(a)
            index[a] = slice(n - 1 - r[0], n - r[-1], -st)
    if flips:
        x = kiln.flip(x, tuple(flips))
    return kiln.clone(x[tuple(index)])


def _norm_index(idx, n):
    idx = T(idx)
    return kiln.where(idx < 0, idx + n, idx)


@onnx_op("Gather")
def gather(ctx, x, idx):
    x = T(x)
    ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
    idx = _norm_index(idx, x.shape[ax]).to(kiln.int64)
    return kiln.clone(x[(slice(None),) * ax + (idx,)])


@onnx_op("GatherElements")
def gather_elements(ctx, x, idx):
    x = T(x)
    ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
    return kiln.gather(x, ax, _norm_index(idx, x.shape[ax]).to(kiln.int64))


@onnx_op("GatherND")
def gather_nd(ctx, x, idx):
    x, idx = T(x), T(idx).to(kiln.int64)
    b = ctx.attr("batch_dims", 0)
    k = idx.shape[-1]
    batch = x.shape[:b]
    nb = int(np.prod(batch))
    xf = kiln.reshape(x, (nb,) + tuple(x.shape[b:]))
    idf = kiln.reshape(idx, (nb, -1, k))
    m = idf.shape[1]
    bi = kiln.from_numpy(np.repeat(np.arange(nb), m).reshape(nb, m))
    parts = [bi] + [_norm_index(idf[..., j], x.shape[b + j]) for j in range(k)]
    out = xf[tuple(parts)]
    return kiln.reshape(out, tuple(idx.shape[:-1]) + tuple(x.shape[b + k:]))


_COMBINE = {"mul": kiln.mul, "max": kiln.maximum, "min": kiln.minimum}


def _scatter_reduce(x, coords, upd, red, ctx):
    """``x[coords] = red(x[coords], upd)`` applied in order, repeated coordinates included:
    updates go in rounds, the k-th update of each coordinate in round k.  ``coords`` is a tuple
    of equal-length index arrays (read eagerly: their values decide the rounds)."""
    if red not in _COMBINE:
        raise NotImplementedError(f"{ctx.op_type} reduction {red!r} is not supported")
    cs = [np.asarray(c.detach().numpy()).reshape(-1) for c in coords]
    n = cs[0].size if cs else 0
    key = np.ravel_multi_index(cs, x.shape[:len(cs)]) if n else np.zeros(0, np.int64)
    order = np.argsort(key, kind="stable")
    rank = np.empty(n, np.int64)
    sk = key[order]
    starts = np.r_[0, np.flatnonzero(sk[1:] != sk[:-1]) + 1] if n else np.zeros(0, np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank[order] = np.arange(n) - first
    for r in range(int(rank.max()) + 1 if n else 0):
        sel = np.flatnonzero(rank == r)
        where = tuple(kiln.from_numpy(c[sel]) for c in cs)
        cur = x[where]
        x = kiln.index_put(x, where, _COMBINE[red](cur, upd[kiln.from_numpy(sel)]))
    return x


@onnx_op("ScatterElements", "Scatter")
def scatter_elements(ctx, x, idx, upd):
    x, upd = T(x), T(upd)
    ax = axis(ctx.attr("axis", 0), x.ndim, ctx)
    red = ctx.attr("reduction", "none")
    idx = _norm_index(idx, x.shape[ax]).to(kiln.int64)
    if red == "add":
        return kiln.scatter_add(x, ax, idx, upd)
    if red == "none":
        return kiln.scatter(x, ax, idx, upd)
    grids = np.indices(tuple(idx.shape))
    coords = [kiln.from_numpy(g) for g in grids]
    coords[ax] = idx
    n = int(np.prod(idx.shape))
    return _scatter_reduce(x, coords, kiln.reshape(upd, (n,)), red, ctx)


@onnx_op("ScatterND")
def scatter_nd(ctx, x, idx, upd):
    x, idx, upd = T(x), T(idx).to(kiln.int64), T(upd)
    red = ctx.attr("reduction", "none")
    k = idx.shape[-1]
    parts = tuple(_norm_index(idx[..., j], x.shape[j]) for j in range(k))
    if red == "none":
        return kiln.index_put(x, parts, upd)
    if red == "add":
        return kiln.index_put(x, parts, upd, accumulate=True)
    n = int(np.prod(idx.shape[:-1]))
    upd = kiln.reshape(upd, (n,) + tuple(x.shape[k:]))
    return _scatter_reduce(x, parts, upd, red, ctx)


# -- padding, triangles, one-hot, nonzero --------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}


@onnx_op("Pad")
def pad(ctx, x, pads=None, value=None, axes=None):
    x = T(x)
    mode = ctx.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode {mode!r} is not supported")
    if ctx.opset < 11:
        pads, fill = ctx.attr("pads"), ctx.attr("value", 0.0)
    else:
        pads = ints(ctx.static(1))
        fill = 0 if value is None else arr(ctx.static(2)).reshape(-1)[0].item()
    n = len(pads) // 2
    dims = list(range(x.ndim)) if axes is None else [axis(a, x.ndim, ctx)
                                                      for a in ints(ctx.static(3))]
    before = dict(zip(dims, pads[:n]))
    after = dict(zip(dims, pads[n:]))
    flat = []
    for d in reversed(range(x.ndim)):
        flat += [before.get(d, 0), after.get(d, 0)]
    if mode == "constant":
        return F.pad(x, tuple(flat), mode="constant", value=fill)
    return _pad_nonconstant(x, flat, _PAD_MODES[mode])


def _pad_nonconstant(x, flat, mode):
    # kiln (as PyTorch) pads only trailing dims in these modes: move padded dims last, one at a
    # time
    for i in range(x.ndim):
        d = x.ndim - 1 - i
        lo, hi = flat[2 * i], flat[2 * i + 1]
        if lo == 0 and hi == 0:
            continue
        y = kiln.movedim(x, d, -1)
        shape = y.shape
        y = kiln.reshape(y, (1, -1, shape[-1]))
        y = F.pad(y, (lo, hi), mode=mode)
        x = kiln.movedim(kiln.reshape(y, tuple(shape[:-1]) + (y.shape[-1],)), -1, d)
    return kiln.clone(x)


@onnx_op("Trilu")
def trilu(ctx, x, k=None):
    x = T(x)
    k = 0 if k is None else ints(ctx.static(1))[0]
    return kiln.triu(x, k) if ctx.attr("upper", 1) else kiln.tril(x, k)


@onnx_op("OneHot")
def one_hot(ctx, idx, depth, values):
    idx = T(idx)
    depth = int(arr(ctx.static(1)).reshape(-1)[0])
    vals = T(values)
    idx = kiln.where(idx < 0, idx + depth, idx).to(kiln.int64)
    valid = kiln.logical_and(idx >= 0, idx < depth)
    hot = F.one_hot(kiln.where(valid, idx, kiln.zeros_like(idx)), depth)
    hot = kiln.logical_and(hot.to(kiln.bool), kiln.unsqueeze(valid, -1))
    out = kiln.where(hot, vals[1], vals[0])
    ax = ctx.attr("axis", -1)
    ax = ax + out.ndim if ax < 0 else ax
    return kiln.movedim(out, -1, ax)


@onnx_op("NonZero")
def nonzero(ctx, x):
    x = T(x)
    return np.array(np.nonzero(x.detach().numpy()), np.int64).reshape(x.ndim, -1)


@onnx_op("Compress")
def compress(ctx, x, cond):
    x = T(x)
    keep = np.flatnonzero(np.asarray(T(cond).detach().numpy()).reshape(-1))
    ax = ctx.attr("axis")
    if ax is None:
        x, ax = kiln.reshape(x, (-1,)), 0
    ax = axis(ax, x.ndim, ctx)
    keep = keep[keep < x.shape[ax]]
    return kiln.index_select(x, ax, kiln.from_numpy(keep.astype(np.int64)))


@onnx_op("ReverseSequence")
def reverse_sequence(ctx, x, lens):
    x = T(x)
    lens = np.asarray(T(lens).detach().numpy()).reshape(-1)
    b_ax, t_ax = ctx.attr("batch_axis", 1), ctx.attr("time_axis", 0)
    steps = x.shape[t_ax]
    t = np.arange(steps)[:, None]
    src = np.where(t < lens[None, :], lens[None, :] - 1 - t, t)  # (time, batch)
    if b_ax < t_ax:
        src = src.T
    shape = [1] * x.ndim
    shape[t_ax], shape[b_ax] = steps, lens.size
    index = np.broadcast_to(src.reshape(shape), tuple(x.shape)).astype(np.int64)
    return kiln.gather(x, t_ax, kiln.from_numpy(np.ascontiguousarray(index)))


@onnx_op("CenterCropPad")
def center_crop_pad(ctx, x, shape):
    x = T(x)
    sizes = ints(ctx.static(1))
    axes = ctx.attr("axes") or list(range(x.ndim))
    index = [slice(None)] * x.ndim
    pads = [0, 0] * x.ndim  # (before, after) per dim, first dim first
    for a, want in zip(axes, sizes):
        a = axis(a, x.ndim, ctx)
        n = x.shape[a]
        if want < n:
            start = (n - want) // 2
            index[a] = slice(start, start + want)
        elif want > n:
            pads[2 * a] = (want - n) // 2
            pads[2 * a + 1] = want - n - pads[2 * a]
    y = x[tuple(index)]
    flat = []
    for d in reversed(range(x.ndim)):
        flat += [pads[2 * d], pads[2 * d + 1]]
    return F.pad(y, tuple(flat), mode="constant", value=0)


@onnx_op("Unique")
def unique(ctx, x):
    x = T(x)
    ax = ctx.attr("axis")
    data = np.asarray(x.detach().numpy())
    if ax is None:
        flat = data.reshape(-1)
        _, first, inverse, counts = np.unique(flat, return_index=True, return_inverse=True,
                                              return_counts=True)
    else:
        ax = axis(ax, x.ndim, ctx)
        _, first, inverse, counts = np.unique(data, axis=ax, return_index=True,
                                              return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if not ctx.attr("sorted", 1):  # order of first occurrence
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    source = kiln.reshape(x, (-1,)) if ax is None else x
    y = kiln.index_select(source, 0 if ax is None else ax,
                          kiln.from_numpy(first.astype(np.int64)))
    return (y, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64))


def _window(ctx, terms):
    """A cosine-sum window ``sum_k a_k cos(2 pi k n / N)`` as a static value."""
    size = int(arr(ctx.static(0)).reshape(-1)[0])
    dt = _np_type(ctx.attr("output_datatype", 1), ctx)
    denom = size if ctx.attr("periodic", 1) else size - 1
    n = np.arange(size, dtype=np.float64)
    w = sum(a * np.cos(2 * np.pi * k * n / denom) for k, a in enumerate(terms))
    return np.asarray(w).astype(dt)


@onnx_op("HannWindow")
def hann_window(ctx, size):
    return _window(ctx, (0.5, -0.5))


@onnx_op("HammingWindow")
def hamming_window(ctx, size):
    return _window(ctx, (25 / 46, -21 / 46))


@onnx_op("BlackmanWindow")
def blackman_window(ctx, size):
    return _window(ctx, (0.42, -0.5, 0.08))
