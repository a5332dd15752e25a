"""ONNX recurrent operators (RNN, GRU, LSTM) in Kiln ops: every direction projects the whole input
sequence with one matmul, then loops over time with one (batch, H) x (H, G*H) matmul per step.

Directions forward / reverse / bidirectional, initial states, ``sequence_lens`` (steps past a
sequence's length leave its state unchanged and output zeros), ``layout`` 0 and 1, the
activation list with alpha/beta, ``clip``, LSTM peepholes and ``input_forget``, and GRU's
``linear_before_reset``.
"""

from __future__ import annotations

import numpy as np

import kiln
import kiln.nn.functional as F
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T as tensor  # T is the sequence length here
from kiln.onnx.ops.nn import _err, _s


def _activation(ctx, name: str, alpha, beta):
    """The ONNX RNN activation ``name`` as a function of a tensor."""
    key = name.lower()
    if key == "sigmoid":
        return kiln.sigmoid
    if key == "tanh":
        return kiln.tanh
    if key == "relu":
        return kiln.relu
    if key == "leakyrelu":
        return lambda x: F.leaky_relu(x, 0.01 if alpha is None else alpha)
    if key == "thresholdedrelu":
        a = 1.0 if alpha is None else alpha
        return lambda x: kiln.where(x > a, x, kiln.zeros_like(x))
    if key == "scaledtanh":
        return lambda x: alpha * kiln.tanh(x * beta)
    if key == "hardsigmoid":
        a, b = (0.2 if alpha is None else alpha), (0.5 if beta is None else beta)
        return lambda x: kiln.clamp(x * a + b, 0.0, 1.0)
    if key == "elu":
        return lambda x: F.elu(x, 1.0 if alpha is None else alpha)
    if key == "softsign":
        return F.softsign
    if key == "softplus":
        return F.softplus
    if key == "affine":
        return lambda x: x * alpha + beta
    raise _err(ctx, f"activation {name!r} is not supported")


def _activations(ctx, defaults: list, n_dir: int) -> list:
    """Per direction, the list of activation functions (f, g[, h])."""
    names = [_s(n) for n in (ctx.attr("activations") or defaults * n_dir)]
    if len(names) == len(defaults):
        names = names * n_dir
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    fns = []
    for n in names:
        a = alphas.pop(0) if alphas and n.lower() in _TAKES_ALPHA else None
        b = betas.pop(0) if betas and n.lower() in _TAKES_BETA else None
        fns.append(_activation(ctx, n, a, b))
    k = len(defaults)
    return [fns[d * k:(d + 1) * k] for d in range(n_dir)]


_TAKES_ALPHA = {"leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu", "affine"}
_TAKES_BETA = {"scaledtanh", "hardsigmoid", "affine"}


def _setup(ctx, x, w, r, b, seq_lens, h0, gates: int):
    """Common inputs, in layout 0: x (T, N, I); per-direction weights; masks for seq_lens."""
    x, w, r, b, h0 = tensor(x), tensor(w), tensor(r), tensor(b), tensor(h0)
    layout = ctx.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
    direction = _s(ctx.attr("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _err(ctx, f"direction={direction!r} is not valid")
    n_dir = 2 if direction == "bidirectional" else 1
    T, N = x.shape[0], x.shape[1]
    H = ctx.attr("hidden_size") or r.shape[-1]
    masks = None
    if seq_lens is not None:
        lens = np.asarray(ctx.static(4)).astype(np.int64).reshape(-1)
        if (lens < T).any():
            masks = [kiln.from_numpy((t < lens).reshape(N, 1)) for t in range(T)]
    dirs = []
    for d in range(n_dir):
        reverse = direction == "reverse" or d == 1
        wb = rb = None
        if b is not None:
            wb, rb = b[d, :gates * H], b[d, gates * H:]
        h = kiln.zeros(N, H, dtype=x.dtype) if h0 is None else h0[d]
        dirs.append((reverse, w[d], r[d], wb, rb, h))
    return x, T, H, masks, dirs, layout


def _run(x, T, masks, reverse, step, state):
    """Loop ``state = step(t, state)`` over time; returns per-step outputs and the final state."""
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        new = step(t, state)
        if masks is not None:
            m = masks[t]
            ys[t] = kiln.where(m, new[0], kiln.zeros_like(new[0]))
            new = tuple(kiln.where(m, n, s) for n, s in zip(new, state))
        else:
            ys[t] = new[0]
        state = new
    return kiln.stack(ys), state


def _outputs(ctx, ys, finals, layout):
    """ONNX outputs Y, Y_h (, Y_c) from per-direction (T, N, H) sequences and final states."""
    y = kiln.stack(ys, dim=1)  # (T, D, N, H)
    states = [kiln.stack(list(s)) for s in zip(*finals)]  # each (D, N, H)
    if layout:
        y = y.permute(2, 0, 1, 3)
        states = [s.transpose(0, 1) for s in states]
    return (y, *states)[:ctx.n_outputs]


def _clip(ctx):
    c = ctx.attr("clip")
    return (lambda v: v) if c is None else (lambda v: kiln.clamp(v, -c, c))


@onnx_op("RNN")
def rnn(ctx, x, w, r, b=None, seq_lens=None, h0=None):
    x, T, H, masks, dirs, layout = _setup(ctx, x, w, r, b, seq_lens, h0, 1)
    acts = _activations(ctx, ["Tanh"], len(dirs))
    clip = _clip(ctx)
    ys, finals = [], []
    for (reverse, wd, rd, wb, rb, h), (f,) in zip(dirs, acts):
        xp = kiln.matmul(x, wd.t()) + (0 if wb is None else wb + rb)

        def step(t, s, xp=xp, rd=rd, f=f):
            return (f(clip(xp[t] + kiln.linear(s[0], rd))),)
        y, s = _run(x, T, masks, reverse, step, (h,))
        ys.append(y)
        finals.append(s)
    return _outputs(ctx, ys, finals, layout)


@onnx_op("GRU")
def gru(ctx, x, w, r, b=None, seq_lens=None, h0=None):
    x, T, H, masks, dirs, layout = _setup(ctx, x, w, r, b, seq_lens, h0, 3)
    acts = _activations(ctx, ["Sigmoid", "Tanh"], len(dirs))
    clip = _clip(ctx)
    before_reset = bool(ctx.attr("linear_before_reset", 0))
    ys, finals = [], []
    for (reverse, wd, rd, wb, rb, h), (f, g) in zip(dirs, acts):
        xp = kiln.matmul(x, wd.t()) + (0 if wb is None else wb)

        def step(t, s, xp=xp, rd=rd, rb=rb, f=f, g=g):
            hp = s[0]
            xt = xp[t]
            hr = kiln.linear(hp, rd[:2 * H], None if rb is None else rb[:2 * H])
            zr = f(clip(xt[:, :2 * H] + hr))
            z, rg = zr[:, :H], zr[:, H:]
            rbh = None if rb is None else rb[2 * H:]
            if before_reset:
                n = g(clip(xt[:, 2 * H:] + rg * kiln.linear(hp, rd[2 * H:], rbh)))
            else:
                n = g(clip(xt[:, 2 * H:] + kiln.linear(rg * hp, rd[2 * H:], rbh)))
            return (n + z * (hp - n),)  # (1 - z) * n + z * h
        y, s = _run(x, T, masks, reverse, step, (h,))
        ys.append(y)
        finals.append(s)
    return _outputs(ctx, ys, finals, layout)


@onnx_op("LSTM")
def lstm(ctx, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    x, T, H, masks, dirs, layout = _setup(ctx, x, w, r, b, seq_lens, h0, 4)
    c0, p = tensor(c0), tensor(p)
    if c0 is not None and layout:
        c0 = c0.transpose(0, 1)
    acts = _activations(ctx, ["Sigmoid", "Tanh", "Tanh"], len(dirs))
    clip = _clip(ctx)
    couple = bool(ctx.attr("input_forget", 0))
    ys, finals = [], []
    for d, ((reverse, wd, rd, wb, rb, h), (f, g, hf)) in enumerate(zip(dirs, acts)):
        xp = kiln.matmul(x, wd.t()) + (0 if wb is None else wb + rb)
        c = kiln.zeros_like(h) if c0 is None else c0[d]
        pi = pf = po = None
        if p is not None:
            pi, po, pf = p[d, :H], p[d, H:2 * H], p[d, 2 * H:]

        def step(t, s, xp=xp, rd=rd, f=f, g=g, hf=hf, pi=pi, po=po, pf=pf):
            hp, cp = s
            gates = xp[t] + kiln.linear(hp, rd)  # i, o, f, c
            gi, go, gf, gc = (gates[:, k * H:(k + 1) * H] for k in range(4))
            if pi is not None:
                gi, gf = gi + pi * cp, gf + pf * cp
            i = f(clip(gi))
            fg = 1 - i if couple else f(clip(gf))
            cn = fg * cp + i * g(clip(gc))
            if po is not None:
                go = go + po * cn
            return (f(clip(go)) * hf(cn), cn)
        y, s = _run(x, T, masks, reverse, step, (h, c))
        ys.append(y)
        finals.append(s)
    return _outputs(ctx, ys, finals, layout)
