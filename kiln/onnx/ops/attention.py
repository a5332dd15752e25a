"""ONNX Attention (opset 23+) in Kiln ops: 3-D or 4-D Q/K/V, grouped-query heads, scale,
softcap, boolean or additive masks, causal and sliding-window masks aligned to the KV cache,
past/present key and value, nonpad_kv_seqlen, and the qk_matmul_output modes.

The masks that depend only on shapes (causal, window, padding) are built with NumPy; a mask
given as an input stays a tensor.  A query row whose every key is masked outputs zeros.
"""

from __future__ import annotations

import numpy as np

import kiln
import kiln.nn.functional as F
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T
from kiln.onnx.ops.nn import _err, _s


def _heads(x, n_heads):
    """(B, S, n*D) -> (B, n, S, D)."""
    b, s, h = x.shape
    return x.reshape(b, s, n_heads, h // n_heads).permute(0, 2, 1, 3)


def _static_bias(q_len, kv_len, causal, left, right, offset):
    """The additive causal / sliding-window bias: (q, kv), or (B, 1, q, kv) per-batch offsets."""
    i = np.arange(q_len).reshape(-1, 1)
    j = np.arange(kv_len).reshape(1, -1)
    per_batch = np.ndim(offset) > 0
    pos = i + (np.reshape(offset, (-1, 1, 1)) if per_batch else int(offset))
    allowed = np.ones(np.broadcast_shapes(pos.shape, j.shape), dtype=bool)
    if causal:
        allowed &= j <= pos
    if left >= 0:
        allowed &= pos - j <= left
    if right >= 0:
        allowed &= j - pos <= right
    bias = np.where(allowed, 0.0, -np.inf)
    return bias.reshape(bias.shape[0], 1, q_len, kv_len) if per_batch else bias


def _mask_bias(ctx, mask, kv_len, dtype):
    """An attention mask input as an additive float bias, padded to ``kv_len`` keys."""
    mask = T(mask)
    pad = kv_len - mask.shape[-1]
    if mask.dtype == kiln.bool:
        if pad > 0:
            mask = F.pad(mask.to(kiln.uint8), (0, pad)).to(kiln.bool)
        zero = kiln.zeros((), dtype=dtype)
        return kiln.where(mask, zero, kiln.full((), -np.inf, dtype=dtype))
    if not mask.dtype.is_floating_point:
        raise _err(ctx, f"attn_mask must be bool or floating point, not {mask.dtype}")
    mask = mask.to(dtype)
    return F.pad(mask, (0, pad), value=-np.inf) if pad > 0 else mask


@onnx_op("Attention")
def attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None,
              nonpad_kv_seqlen=None):
    q, k, v, past_key, past_value = T(q), T(k), T(v), T(past_key), T(past_value)
    rank = q.ndim
    if rank == 3:
        q = _heads(q, ctx.attr("q_num_heads"))
        k = _heads(k, ctx.attr("kv_num_heads"))
        v = _heads(v, ctx.attr("kv_num_heads"))
    elif rank != 4:
        raise _err(ctx, f"Q must be 3-D or 4-D, got {rank}-D")
    if (past_key is None) != (past_value is None):
        raise _err(ctx, "past_key and past_value must be given together")
    scale = ctx.attr("scale")
    scale = float(np.sqrt(1.0 / np.sqrt(q.shape[3]) if scale is None else scale))
    if past_key is not None:
        k = kiln.cat([past_key, k], dim=2)
        v = kiln.cat([past_value, v], dim=2)
    present_k, present_v = k, v
    q_len, kv_len = q.shape[2], k.shape[2]
    left, right = ctx.attr("left_window_size", -1), ctx.attr("right_window_size", -1)
    causal = bool(ctx.attr("is_causal", 0))

    lens = None
    if nonpad_kv_seqlen is not None:
        lens = np.asarray(ctx.static(6)).astype(np.int64).reshape(-1)
    if past_key is None and lens is not None:
        offset = lens - q_len
    else:
        offset = 0 if past_key is None else past_key.shape[2]
    static = np.zeros((q_len, kv_len))
    if causal or left >= 0 or right >= 0:
        static = _static_bias(q_len, kv_len, causal, left, right, offset)
    if lens is not None:
        pad = np.where(np.arange(kv_len) < lens[:, None], 0.0, -np.inf)
        static = static + pad.reshape(-1, 1, 1, kv_len)
    dtype = q.dtype
    bias = T(static.astype(dtype.np))
    if attn_mask is not None:
        bias = _mask_bias(ctx, attn_mask, kv_len, dtype) + bias

    reps = q.shape[1] // k.shape[1]
    if reps > 1:  # grouped-query attention: each KV head serves `reps` query heads
        b, h, s, d = k.shape
        k = k.unsqueeze(2).expand(b, h, reps, s, d).reshape(b, h * reps, s, d)
        dv = v.shape[3]
        v = v.unsqueeze(2).expand(b, h, reps, s, dv).reshape(b, h * reps, s, dv)

    qk = kiln.matmul(q * scale, (k * scale).transpose(-1, -2))
    softcap = ctx.attr("softcap", 0.0)
    if softcap and softcap > 0:
        qk = kiln.tanh(qk / softcap) * softcap
    logits = qk + bias
    dead = kiln.isinf(kiln.amax(bias, dim=-1, keepdim=True))  # every key masked (-inf)
    zero = kiln.zeros((), dtype=dtype)
    probs = kiln.softmax(kiln.where(dead, zero, logits), dim=-1)
    probs = kiln.where(dead, zero, probs)
    y = kiln.matmul(probs, v)
    if rank == 3:
        y = y.permute(0, 2, 1, 3)
        y = y.reshape(y.shape[0], y.shape[1], -1)
    mode = ctx.attr("qk_matmul_output_mode", 0)
    qk_out = {2: logits, 3: probs}.get(mode, qk)
    return (y, present_k, present_v, qk_out)[:ctx.n_outputs]


@onnx_op("RotaryEmbedding")
def rotary_embedding(ctx, x, cos, sin, position_ids=None):
    x, cos, sin = T(x), T(cos), T(sin)
    shape = tuple(x.shape)
    if x.ndim == 4:  # (B, heads, S, D) -> (B, S, heads, D)
        x = x.permute(0, 2, 1, 3)
    else:
        heads = ctx.attr("num_heads")
        if not heads:
            raise _err(ctx, "3-D input needs the num_heads attribute")
        x = x.reshape(shape[0], shape[1], heads, shape[2] // heads)
    dim = ctx.attr("rotary_embedding_dim", 0) or x.shape[3]
    if position_ids is not None:
        pos = T(position_ids).to(kiln.int64)
        cos = kiln.index_select(cos, 0, pos.reshape(-1)).reshape(*pos.shape, -1)
        sin = kiln.index_select(sin, 0, pos.reshape(-1)).reshape(*pos.shape, -1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, dim / 2)
    rot, rest = x[..., :dim], x[..., dim:]
    interleaved = ctx.attr("interleaved", 0)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :dim // 2],
                                                                   rot[..., dim // 2:])
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        rot = kiln.stack([real, imag], dim=-1).reshape(tuple(rot.shape))
    else:
        rot = kiln.cat([real, imag], dim=-1)
    y = kiln.cat([rot, rest], dim=-1) if dim < x.shape[3] else rot
    return y.reshape(shape) if len(shape) == 3 else y.permute(0, 2, 1, 3)


def _repeat_heads(x, reps):
    """(B, H, ...) -> (B, H * reps, ...), each head repeated ``reps`` times in a row."""
    if reps == 1:
        return x
    b, h = x.shape[:2]
    rest = tuple(x.shape[2:])
    return x.unsqueeze(2).expand(b, h, reps, *rest).reshape(b, h * reps, *rest)


@onnx_op("LinearAttention")
def linear_attention(ctx, q, k, v, past=None, decay=None, beta=None):
    """Recurrent linear attention: per step, state = decay * state (gated), the delta rule
    corrects v by what the state already recalls for k, state += k v^T, out = scale q^T state."""
    rule = _s(ctx.attr("update_rule", "gated_delta"))
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        raise _err(ctx, f"update_rule {rule!r} is not valid")
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if gating != (decay is not None) or delta != (beta is not None):
        raise _err(ctx, f"update_rule {rule!r} does not match the decay / beta inputs given")
    hq, hkv = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    q, k, v, past, decay, beta = (T(a) for a in (q, k, v, past, decay, beta))
    out_dtype = q.dtype
    state_dtype = out_dtype if past is None else past.dtype
    f32 = kiln.float32
    q4, k4, v4 = (_heads(a.to(f32), n) for a, n in ((q, hq), (k, hkv), (v, hkv)))
    b, t, dk, dv = q.shape[0], q.shape[1], q4.shape[3], v4.shape[3]
    if decay is not None:
        decay = decay.to(f32)
        decay = (decay.reshape(b, t, hkv, 1).permute(0, 2, 1, 3) if decay.shape[-1] == hkv
                 else _heads(decay, hkv))
    if beta is not None:
        beta = beta.to(f32).reshape(b, t, beta.shape[-1], 1).permute(0, 2, 1, 3)
    state = kiln.zeros(b, hkv, dk, dv) if past is None else past.to(f32)
    scale = ctx.attr("scale", 0.0) or 1.0 / np.sqrt(dk)
    outs = []
    for i in range(t):
        kt, vt = k4[:, :, i], v4[:, :, i]
        if gating:
            state = state * kiln.exp(decay[:, :, i]).unsqueeze(-1)
        if delta:
            recalled = kiln.matmul(kt.unsqueeze(-2), state).squeeze(-2)
            vt = beta[:, :, i] * (vt - recalled)
        state = state + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        read = _repeat_heads(state, hq // hkv)
        outs.append(kiln.matmul(q4[:, :, i].unsqueeze(-2), read).squeeze(-2) * scale)
    y = kiln.stack(outs, dim=2).permute(0, 2, 1, 3).reshape(b, t, hq * dv)
    return (y.to(out_dtype), state.to(state_dtype))[:ctx.n_outputs]
