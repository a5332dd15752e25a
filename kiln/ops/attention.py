"""The fused attention primitive: ``softmax(scale q k^T) v``, optionally causal, as one node.

scaled_dot_product_attention uses it when there is no mask but the causal one and no dropout:
one node instead of eight (products, scale, mask, softmax), the native kernels of
kiln/jit/attention.py for float32 heads they fit, and a backward that recomputes the scores
instead of keeping them.  Elsewhere the impls below do the same with numpy.

The backward is one primitive too (``attention_backward``: dq, dk, dv packed flat, each laid
out heads-inner); under ``create_graph`` the VJP builds the gradient from differentiable ops
instead.  When q, k and v are exactly the heads of one (batch, T, 3 * H * D) projection, as a
GPT block makes them, ``attention_packed`` takes the projection and its backward writes the
projection's gradient directly.
"""

from __future__ import annotations

import numpy as np

from kiln import jit
from kiln.grad_mode import STATE
from kiln.ops.reduce import softmax, sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor

__all__ = ["attention"]


def _batch(shapes) -> tuple:
    try:
        return tuple(np.broadcast_shapes(*(tuple(s[:-2]) for s in shapes)))
    except ValueError:
        raise RuntimeError("scaled_dot_product_attention: the batch dimensions of query "
                           f"{tuple(shapes[0])}, key {tuple(shapes[1])} and value "
                           f"{tuple(shapes[2])} do not broadcast") from None


def _probs(q, k, causal, scale):
    """softmax(scale q k^T) over the keys each query sees (numpy, q's dtype)."""
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(scale)
    if causal:
        L, S = s.shape[-2:]
        s[..., ~np.tri(L, S, dtype=bool)] = -np.inf
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


@primitive("attention", save=(0, 1, 2), save_out=True)
def _attention(q, k, v, causal, scale):
    """softmax(scale q k^T, keys j > i masked out when causal) v over the last two dims."""
    if jit.available():
        from kiln.jit import attention as native

        out = native.forward(q, k, v, causal, scale)
        if out is not None:
            return out
    return np.matmul(_probs(q, k, causal, scale), v)


@_attention.def_infer
def _attention_infer(shapes, dts, causal, scale):
    sq, sv = shapes[0], shapes[2]
    return _batch(shapes) + (sq[-2], sv[-1]), dts[0]


def _layout(batch: tuple, L: int, S: int, E: int, Ev: int) -> list:
    """(offset, size, heads-inner shape) of dq, dk and dv in attention_backward's output: each
    (batch..., rows, dim) stored as (batch[:-1]..., rows, batch[-1], dim)."""
    out, at = [], 0
    for rows, dim in ((L, E), (S, E), (S, Ev)):
        shape = batch[:-1] + (rows, batch[-1], dim) if batch else (rows, dim)
        size = int(np.prod(shape))
        out.append((at, size, shape))
        at += size
    return out


def _views(flat, layout):
    """The (batch..., rows, dim) views of dq, dk and dv in ``flat`` (numpy or Kiln)."""
    views = []
    for at, size, shape in layout:
        x = flat[at:at + size].reshape(shape)
        views.append(x.swapaxes(-3, -2) if len(shape) > 2 else x)
    return views


@primitive("attention_backward", save=(0, 1, 2, 3, 4))
def _attention_backward(q, k, v, o, g, causal, scale):
    """dq, dk and dv of attention for the output gradient ``g`` (``o`` its output), over the
    full broadcast batch, packed flat (see _layout)."""
    batch = _batch((q.shape, k.shape, v.shape))
    (L, E), S, Ev = q.shape[-2:], k.shape[-2], v.shape[-1]
    layout = _layout(batch, L, S, E, Ev)
    flat = np.empty(sum(size for _, size, _ in layout), q.dtype)
    views = _views(flat, layout)
    _grads_into(views, q, k, v, o, g, causal, scale)
    return flat


def _grads_into(outs, q, k, v, o, g, causal, scale) -> None:
    """dq, dk and dv written into the arrays ``outs`` (native kernels when they fit)."""
    if jit.available():
        from kiln.jit import attention as native

        if native.backward(q, k, v, o, g, causal, scale, outs):
            return
    p = _probs(q, k, causal, scale)
    dv = np.matmul(np.swapaxes(p, -1, -2), g)
    dp = np.matmul(g, np.swapaxes(v, -1, -2))
    dp -= np.sum(g * o, axis=-1, keepdims=True)
    p *= dp
    p *= p.dtype.type(scale)
    for out, grad in zip(outs, (np.matmul(p, k), np.matmul(np.swapaxes(p, -1, -2), q), dv)):
        out[...] = grad


@_attention_backward.def_infer
def _attention_backward_infer(shapes, dts, causal, scale):
    (L, E), S, Ev = shapes[0][-2:], shapes[1][-2], shapes[2][-1]
    layout = _layout(_batch(shapes[:3]), L, S, E, Ev)
    return (sum(size for _, size, _ in layout),), dts[0]


_attention_backward.mark_not_differentiable(
    "attention's VJP builds its gradient from differentiable ops under create_graph")


@_attention.def_vjp
def _attention_vjp(g, node):
    q, k, v = node.inputs
    causal, scale = node.attrs["causal"], node.attrs["scale"]
    if STATE.grad_enabled:  # create_graph: gradients that can be differentiated again
        grads = _grads_from_ops(g, q, k, v, causal, scale)
    else:
        batch = _batch((q.shape, k.shape, v.shape))
        (L, E), S, Ev = q.shape[-2:], k.shape[-2], v.shape[-1]
        packed = _attention_backward(q, k, v, node.out, g, causal=causal, scale=scale)
        grads = _views(packed, _layout(batch, L, S, E, Ev))
    return tuple(sum_to(d, x.shape) if need else None
                 for d, x, need in zip(grads, (q, k, v), node.needs))


def _grads_from_ops(g: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    from kiln.nn.attention import _causal_mask

    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(_causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    p = softmax(s, -1)
    dp = g @ v.transpose(-2, -1)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    return ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ g


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """softmax(scale q k^T) v as one node (keys j > i masked out when ``causal``)."""
    x = _packed_source(q, k, v)
    if x is not None:
        return _attention_packed(x, heads=q.shape[-3], causal=bool(causal), scale=float(scale))
    return _attention(q, k, v, causal=bool(causal), scale=float(scale))


# -- q, k and v as the heads of one projection -----------------------------------------------------
#
# A GPT block splits one (batch, T, 3C) projection into q, k and v and views each as
# (batch, H, T, D) heads.  Attention taking that projection itself, its gradient is the
# projection's gradient, written by the backward kernel in place: no split/reshape/transpose
# VJPs and no zero-filled (batch, T, 3C) buffer that three copies fill.

def _heads(x, heads: int) -> list:
    """q, k, v: (batch..., H, T, D) views of x (batch..., T, 3 * H * D) (numpy or Kiln)."""
    *lead, t, c3 = x.shape
    y = x.reshape(*lead, t, 3, heads, c3 // (3 * heads))
    return [y[..., i, :, :].swapaxes(-3, -2) for i in range(3)]


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _packed_source(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """The tensor x of shape (batch..., T, 3 * H * D) whose heads are exactly q, k and v (the
    views ``_heads`` makes), or None."""
    x = q._base
    if x is None or k._base is not x or v._base is not x:
        return None
    a = x._data
    shape = q._data.shape
    if (k._data.shape != shape or v._data.shape != shape or len(shape) != a.ndim + 1
            or len(shape) < 3 or not a.flags.c_contiguous or a.dtype != q._data.dtype):
        return None
    *lead, h, t, d = shape
    if a.shape != (*lead, t, 3 * h * d) or not h * d:
        return None
    want = _heads(a, h)
    return x if all(m.strides == w.strides and _address(m) == _address(w)
                    for m, w in zip((q._data, k._data, v._data), want)) else None


@primitive("attention_packed", save=(0,), save_out=True)
def _attention_packed(x, heads, causal, scale):
    """attention(q, k, v) of the heads of x (batch..., T, 3 * H * D): [q | k | v] along the
    last axis, each H heads of D."""
    return _attention.impl(*_heads(x, heads), causal, scale)


@_attention_packed.def_infer
def _attention_packed_infer(shapes, dts, heads, causal, scale):
    *lead, t, c3 = shapes[0]
    return tuple(lead) + (heads, t, c3 // (3 * heads)), dts[0]


@primitive("attention_packed_backward", save=(0, 1, 2))
def _attention_packed_backward(x, o, g, heads, causal, scale):
    """The gradient of attention_packed: dq, dk and dv in x's layout."""
    dx = np.empty(x.shape, x.dtype)
    _grads_into(_heads(dx, heads), *_heads(x, heads), o, g, causal, scale)
    return dx


@_attention_packed_backward.def_infer
def _attention_packed_backward_infer(shapes, dts, heads, causal, scale):
    return shapes[0], dts[0]


_attention_packed_backward.mark_not_differentiable(
    "attention_packed's VJP builds its gradient from differentiable ops under create_graph")


@_attention_packed.def_vjp
def _attention_packed_vjp(g, node):
    (x,), a = node.inputs, node.attrs
    if not STATE.grad_enabled:
        return (_attention_packed_backward(x, node.out, g, **a),)
    from kiln.ops.shape import stack

    grads = _grads_from_ops(g, *_heads(x, a["heads"]), a["causal"], a["scale"])
    dx = stack([d.transpose(-3, -2) for d in grads], dim=-3)  # (batch..., T, 3, H, D)
    return (dx.reshape(x.shape),)
