"""Attention: scaled_dot_product_attention and nn.MultiheadAttention, as PyTorch's."""

from __future__ import annotations

import math

import numpy as np

import kiln
from kiln.grad_mode import STATE
from kiln.ops.attention import attention
from kiln.ops.elementwise import _tname
from kiln.ops.linalg import linear
from kiln.ops.reduce import softmax
from kiln.tensor import Tensor, _make

__all__ = ["scaled_dot_product_attention"]

_CAUSAL: dict = {}


def _causal_mask(L: int, S: int) -> Tensor:
    """The (L, S) boolean mask of positions a causal query may NOT attend to (cached)."""
    m = _CAUSAL.get((L, S))
    if m is None:
        if len(_CAUSAL) > 64:
            _CAUSAL.clear()
        m = _CAUSAL[(L, S)] = _make(~np.tri(L, S, dtype=bool))
    return m


def _sdpa_checks(query, key, value, attn_mask) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be Tensor, "
                            f"not {type(t).__name__}")
    if query.ndim < 2 or key.ndim < 2 or value.ndim < 2:
        raise RuntimeError(
            "scaled_dot_product_attention: Expected query, key, and value to all be at least 2 "
            f"dimensional, but got query.dim: {query.ndim} key.dim: {key.ndim} and value.dim: "
            f"{value.ndim} instead.")
    dt = query._data.dtype
    if key._data.dtype != dt or value._data.dtype != dt:
        raise RuntimeError(
            "scaled_dot_product_attention: Expected query, key, and value to have the same "
            f"dtype, but got query.dtype: {_tname(query)} key.dtype: {_tname(key)} and "
            f"value.dtype: {_tname(value)} instead.")
    if dt.kind != "f":
        raise RuntimeError(f"scaled_dot_product_attention: expected scalar type Float but found "
                           f"{_tname(query)}")
    if attn_mask is not None:
        mdt = attn_mask._data.dtype
        if mdt != np.bool_ and mdt != dt:
            raise RuntimeError(
                "scaled_dot_product_attention: Expected attn_mask dtype to be bool or float or "
                f"to match query dtype, but got attn_mask.dtype: {_tname(attn_mask)} and "
                f"query.dtype: {_tname(query)} instead.")


def _batch_broadcasts(*ts) -> bool:
    try:
        np.broadcast_shapes(*(tuple(t.shape[:-2]) for t in ts))
    except ValueError:
        return False
    return True


def _repeat_heads(t: Tensor, rep: int) -> Tensor:
    """(..., Hk, S, E) -> (..., Hk * rep, S, E), each head repeated ``rep`` times in place
    (``repeat_interleave`` on dim -3)."""
    shape = tuple(t.shape)
    lead, hk = shape[:-3], shape[-3]
    return (t.unsqueeze(-3).expand(*lead, hk, rep, *shape[-2:])
            .reshape(*lead, hk * rep, *shape[-2:]))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` over (..., L, E) queries, (..., S, E)
    keys and (..., S, Ev) values.

    A boolean ``attn_mask`` marks the positions that take part (True); a float mask is added
    to the scores; ``is_causal`` (without a mask) masks out the upper triangle (query i sees
    keys 0..i).  A query
    whose every key is masked out gets zeros (and zero gradients), as PyTorch's.  Dropout is
    applied to the attention weights whenever ``dropout_p > 0``.

    >>> import kiln
    >>> q = k = v = kiln.ones(1, 2, 4)
    >>> kiln.nn.functional.scaled_dot_product_attention(q, k, v).shape
    kiln.Size([1, 2, 4])
    """
    _sdpa_checks(query, key, value, attn_mask)
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: Explicit attn_mask should not be set "
                           "when is_causal=True")
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and query.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        hq, hk = query.shape[-3], key.shape[-3]
        if hk == 0 or hq % hk or value.shape[-3] != hk:
            raise RuntimeError(f"scaled_dot_product_attention: number of heads in key/value "
                               f"({hk}) must divide the number of query heads ({hq})")
        key, value = _repeat_heads(key, hq // hk), _repeat_heads(value, hq // hk)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    if (attn_mask is None and not dropout_p > 0.0 and min(L, S, query.shape[-1], value.shape[-1])
            and key.shape[-1] == query.shape[-1] and value.shape[-2] == S
            and _batch_broadcasts(query, key, value)):
        return attention(query, key, value, is_causal, scale)  # one fused node
    # scale the smaller of q (L x E) and the scores (L x S)
    if query.shape[-1] <= S:
        scores = (query * scale) @ key.transpose(-2, -1)
    else:
        scores = (query @ key.transpose(-2, -1)) * scale

    if attn_mask is not None and STATE.tracer is not None:
        return _masked_attention_traced(scores, attn_mask, value, dropout_p, S)
    bool_mask = attn_mask is not None and attn_mask._data.dtype == np.bool_
    empty_rows = None  # numpy (..., L, 1): queries that may attend to no key at all
    if bool_mask or is_causal:
        if bool_mask:
            blocked = ~attn_mask._data
            mask_t = None
        else:  # causal only: the cached mask, never a fully blocked row when L <= S
            mask_t = _causal_mask(L, S)
            blocked = mask_t._data
        if S and mask_t is None:
            full = blocked.all(-1, keepdims=True)
            if full.any():
                # softmax of a row of -inf is nan: keep such rows finite, zero them afterwards
                empty_rows, blocked, mask_t = full, blocked & ~full, None
        scores = scores.masked_fill(mask_t if mask_t is not None else _make(blocked),
                                    float("-inf"))
    if attn_mask is not None and not bool_mask:
        m = attn_mask._data
        full = np.all(m == -np.inf, axis=-1, keepdims=True) if S else None
        if full is not None and full.any():
            empty_rows = full if empty_rows is None else full | empty_rows
            attn_mask = attn_mask.masked_fill(_make(full), 0.0)
        scores = scores + attn_mask
    attn = softmax(scores, -1)
    if empty_rows is not None:
        attn = attn.masked_fill(_make(empty_rows), 0.0)
    if dropout_p > 0.0:
        attn = kiln.nn.functional.dropout(attn, dropout_p, True)
    return attn @ value


def _masked_attention_traced(scores, attn_mask, value, dropout_p, S) -> Tensor:
    """The masked part of scaled_dot_product_attention with tensor ops only: inside
    kiln.compile the mask may be a graph value, so nothing may read it or branch on it."""
    is_bool = attn_mask._data.dtype == np.bool_
    blocked = attn_mask.logical_not() if is_bool else attn_mask == float("-inf")
    empty = blocked.all(-1, keepdim=True) if S else None  # rows that attend to no key
    if is_bool:
        if empty is not None:
            blocked = blocked & empty.logical_not()
        scores = scores.masked_fill(blocked, float("-inf"))
    else:
        scores = scores + (attn_mask.masked_fill(empty, 0.0) if empty is not None else attn_mask)
    attn = softmax(scores, -1)
    if empty is not None:
        attn = attn.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        attn = kiln.nn.functional.dropout(attn, dropout_p, True)
    return attn @ value


# -- nn.MultiheadAttention -----------------------------------------------------------------------

from kiln.nn import init  # noqa: E402
from kiln.nn.modules.linear import Linear  # noqa: E402
from kiln.nn.modules.module import Module  # noqa: E402
from kiln.nn.parameter import Parameter  # noqa: E402

__all__ += ["MultiheadAttention"]


def _canonical_mask(mask, name: str, dt) -> Tensor | None:
    """PyTorch's MHA masks as additive float masks: a boolean True (= masked out) becomes -inf."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
    if mask._data.dtype == np.bool_:
        if STATE.tracer is not None:  # the mask may be a graph value: convert it with an op
            return kiln.zeros(mask._data.shape, dtype=dt).masked_fill(mask, float("-inf"))
        return _make(np.where(mask._data, np.array(-np.inf, dt.np), np.array(0, dt.np)))
    if mask._data.dtype.kind != "f":
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


class MultiheadAttention(Module):
    """Multi-head attention with PyTorch's parameters (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``; ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and
    its forward: ``(output, averaged attention weights or None)``.

    Masks follow PyTorch's MultiheadAttention convention: a boolean True means "do not
    attend" (the opposite of scaled_dot_product_attention's), a float mask is added.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got "
                             f"embed_dim={embed_dim} and num_heads={num_heads} instead")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")
        dt = dtype or kiln.get_default_dtype()
        E = embed_dim
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = Parameter(kiln.empty(E, E, dtype=dt))
            self.k_proj_weight = Parameter(kiln.empty(E, self.kdim, dtype=dt))
            self.v_proj_weight = Parameter(kiln.empty(E, self.vdim, dtype=dt))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = Parameter(kiln.empty(3 * E, E, dtype=dt))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(kiln.empty(3 * E, dtype=dt))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(E, E, bias=bias, dtype=dt)
        if add_bias_kv:
            self.bias_k = Parameter(kiln.empty(1, 1, E, dtype=dt))
            self.bias_v = Parameter(kiln.empty(1, 1, E, dtype=dt))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            init.xavier_uniform_(self.q_proj_weight)
            init.xavier_uniform_(self.k_proj_weight)
            init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            init.constant_(self.in_proj_bias, 0.0)
            init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            init.xavier_normal_(self.bias_v)

    def _in_projection(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = b[:E], b[E:2 * E], b[2 * E:]
        if not self._qkv_same_embed_dim:
            return (linear(query, self.q_proj_weight, bq), linear(key, self.k_proj_weight, bk),
                    linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if key is value:
            if query is key:  # self-attention: one matmul for q, k and v
                return linear(query, w, b).chunk(3, dim=-1)
            q = linear(query, w[:E], bq)
            k, v = linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            return q, k, v
        return (linear(query, w[:E], bq), linear(key, w[E:2 * E], bk),
                linear(value, w[2 * E:], bv))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """(L, N, E) inputs ((N, L, E) with ``batch_first``, (L, E) unbatched) ->
        ``(output, weights)``; weights are (N, L, S) averaged over heads, (N, H, L, S) with
        ``average_attn_weights=False``, or None when ``need_weights`` is False."""
        batched = query.ndim == 3
        if query.ndim not in (2, 3):
            raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but "
                                 f"received {query.ndim}-D query tensor")
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise AssertionError(f"For {'batched' if batched else 'unbatched'} (query "
                                 f"{query.ndim}-D) query, expected key and value to be "
                                 f"{query.ndim}-D but found {key.ndim}-D and {value.ndim}-D "
                                 "tensors respectively")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if self.batch_first and batched:
            # (N, L, E) -> (L, N, E), keeping the identities that select packed projections
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not batched:
            same_kv, same_qk = key is value, query is key
            query = query.unsqueeze(1)
            key = query if same_qk else key.unsqueeze(1)
            value = key if same_kv else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        dt = query.dtype
        tgt_len, bsz, E = query.shape
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but "
                                 f"got {E}")
        H, hd = self.num_heads, self.head_dim
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", dt)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", dt)

        q, k, v = self._in_projection(query, key, value)
        if attn_mask is not None:
            if attn_mask.ndim == 2:
                if tuple(attn_mask.shape) != (tgt_len, key.shape[0]):
                    raise RuntimeError(f"The shape of the 2D attn_mask is "
                                       f"{list(attn_mask.shape)}, but should be "
                                       f"{[tgt_len, key.shape[0]]}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.ndim == 3:
                if tuple(attn_mask.shape) != (bsz * H, tgt_len, key.shape[0]):
                    raise RuntimeError(f"The shape of the 3D attn_mask is "
                                       f"{list(attn_mask.shape)}, but should be "
                                       f"{[bsz * H, tgt_len, key.shape[0]]}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.ndim} is not supported")
        if self.bias_k is not None:
            k = kiln.cat([k, self.bias_k.expand(1, bsz, E)])
            v = kiln.cat([v, self.bias_v.expand(1, bsz, E)])
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        q = q.reshape(tgt_len, bsz * H, hd).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * H, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * H, hd).transpose(0, 1)
        if self.add_zero_attn:
            k = kiln.cat([k, kiln.zeros(bsz * H, 1, hd, dtype=dt)], dim=1)
            v = kiln.cat([v, kiln.zeros(bsz * H, 1, hd, dtype=dt)], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, "
                                     f"but got {tuple(key_padding_mask.shape)}")
            kpm = (key_padding_mask.reshape(bsz, 1, 1, src_len).expand(bsz, H, 1, src_len)
                   .reshape(bsz * H, 1, src_len))
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0

        if need_weights:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = softmax(scores, -1)
            if p > 0.0:
                weights = kiln.nn.functional.dropout(weights, p, True)
            out = weights @ v
            out = out.transpose(0, 1).reshape(tgt_len * bsz, E)
            out = linear(out, self.out_proj.weight, self.out_proj.bias).reshape(tgt_len, bsz, E)
            weights = weights.reshape(bsz, H, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.shape[0] == 1 and attn_mask.ndim == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.reshape(bsz, H, -1, src_len)
            q = q.reshape(bsz, H, tgt_len, hd)
            k = k.reshape(bsz, H, src_len, hd)
            v = v.reshape(bsz, H, src_len, hd)
            out = scaled_dot_product_attention(q, k, v, attn_mask, p)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
            out = linear(out, self.out_proj.weight, self.out_proj.bias).reshape(tgt_len, bsz, E)
            if not batched:
                out = out.squeeze(1)
            weights = None
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def _pad_last(mask):
    """A mask with one more key position (the bias_k / zero-attention key), never masked."""
    if mask is None:
        return None
    return kiln.nn.functional.pad(mask, (0, 1))
