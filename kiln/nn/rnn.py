"""Recurrent layers: nn.RNN, nn.LSTM, nn.GRU and their cells, with PyTorch's parameters, gate
orders and outputs.

Each layer and direction projects the whole input sequence with one matmul; the loop over
time then does one (N, H) x (H, G) matmul and a few elementwise ops per step, in Kiln ops, so
autograd (and double backward) comes for free.
"""

from __future__ import annotations

import math
import numbers
import warnings

import kiln
from kiln.nn import init
from kiln.nn.modules.module import Module
from kiln.nn.parameter import Parameter
from kiln.ops.elementwise import relu, sigmoid, tanh
from kiln.ops.linalg import linear
from kiln.tensor import Tensor

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RNNCell"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


# -- one time step -------------------------------------------------------------------------------

def _rnn_step(xp, h, w_hh, b_hh, act):
    return act(xp + linear(h, w_hh, b_hh))


def _lstm_step(xp, h, c, w_hh, b_hh, w_hr):
    gates = xp + linear(h, w_hh, b_hh)
    H = c.shape[-1]
    s = sigmoid(gates)  # i, f, (g), o: one call over all four; g's share is not used
    g = tanh(gates[..., 2 * H:3 * H])
    c = s[..., H:2 * H] * c + s[..., :H] * g
    h = s[..., 3 * H:] * tanh(c)
    if w_hr is not None:
        h = linear(h, w_hr)
    return h, c


def _gru_step(xp, h, w_hh, b_hh):
    # r and z from x and h together; n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    gh = linear(h, w_hh, b_hh)
    H = h.shape[-1]
    rz = sigmoid(xp[..., :2 * H] + gh[..., :2 * H])
    r, z = rz[..., :H], rz[..., H:]
    n = tanh(xp[..., 2 * H:] + r * gh[..., 2 * H:])
    return n + z * (h - n)  # (1 - z) * n + z * h


def _activation(mode: str):
    return relu if mode == "RNN_RELU" else tanh


# -- the layers ----------------------------------------------------------------------------------

class RNNBase(Module):
    """What RNN, LSTM and GRU share: parameters, checks and the layer/direction loop."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None,
                 dtype=None) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or \
                not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", UserWarning,
                          stacklevel=3)
        for name, v in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} should be of type int, got: {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable "
                             "projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        dirs = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        real_hidden = proj_size or hidden_size
        dt = dtype or kiln.get_default_dtype()
        self._flat_weights_names = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden * dirs
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = [("weight_ih", (gate_size, layer_input)),
                          ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                for base, shape in shapes:
                    setattr(self, base + sfx, Parameter(kiln.empty(*shape, dtype=dt)))
                    self._flat_weights_names.append(base + sfx)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for w in self.parameters():
            init.uniform_(w, -stdv, stdv)

    @property
    def all_weights(self) -> list:
        return [[getattr(self, n) for n in self._flat_weights_names[i:i + self._per_dir()]]
                for i in range(0, len(self._flat_weights_names), self._per_dir())]

    def _per_dir(self) -> int:
        return 2 + 2 * self.bias + (self.proj_size > 0)

    def _weights(self, layer: int, reverse: bool):
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        get = self.__getattr__
        b_ih = get("bias_ih" + sfx) if self.bias else None
        b_hh = get("bias_hh" + sfx) if self.bias else None
        w_hr = get("weight_hr" + sfx) if self.proj_size else None
        return get("weight_ih" + sfx), get("weight_hh" + sfx), b_ih, b_hh, w_hr

    def _check_input(self, input: Tensor) -> bool:
        name = "LSTM" if self.mode == "LSTM" else "GRU" if self.mode == "GRU" else "RNN"
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.ndim not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.ndim}D tensor "
                             f"instead (shape {list(input.shape)})")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{self!r}: input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.shape[-1]} (input shape "
                               f"{list(input.shape)})")
        if input.dtype != self.weight_ih_l0.dtype:
            raise RuntimeError(f"{name}: input must have the type {self.weight_ih_l0.dtype}, "
                               f"got type {input.dtype}")
        return input.ndim == 3

    def _check_hidden(self, hx: Tensor, batched: bool, batch: int, size: int, what: str):
        dirs = 2 if self.bidirectional else 1
        if batched and hx.ndim != 3:
            raise RuntimeError(f"For batched 3-D input, {what} should also be 3-D but got "
                               f"{hx.ndim}-D tensor")
        if not batched and hx.ndim != 2:
            raise RuntimeError(f"For unbatched 2-D input, {what} should also be 2-D but got "
                               f"{hx.ndim}-D tensor")
        expected = (self.num_layers * dirs, batch, size) if batched else (
            self.num_layers * dirs, size)
        if tuple(hx.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(hx.shape)}")

    def _run(self, x: Tensor, h0: Tensor, c0: Tensor | None):
        """x (T, N, I), h0/c0 (L*D, N, H) -> output (T, N, D*H), [h_n], [c_n]."""
        dirs = 2 if self.bidirectional else 1
        T = x.shape[0]
        h_n, c_n = [], []
        p = self.dropout if self.training else 0.0
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, bool(d))
                k = layer * dirs + d
                h = h0[k]
                c = c0[k] if c0 is not None else None
                xp = linear(x, w_ih, b_ih).unbind(0)  # the input projection of every step
                seq = [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    if self.mode == "LSTM":
                        h, c = _lstm_step(xp[t], h, c, w_hh, b_hh, w_hr)
                    elif self.mode == "GRU":
                        h = _gru_step(xp[t], h, w_hh, b_hh)
                    else:
                        h = _rnn_step(xp[t], h, w_hh, b_hh, _activation(self.mode))
                    seq[t] = h
                outs.append(kiln.stack(seq))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outs[0] if dirs == 1 else kiln.cat(outs, -1)
            if p > 0 and layer < self.num_layers - 1:
                x = kiln.nn.functional.dropout(x, p, True)
        return x, kiln.stack(h_n), (kiln.stack(c_n) if c_n else None)

    def _forward(self, input: Tensor, hx, is_lstm: bool):
        batched = self._check_input(input)
        if not batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        batch = input.shape[1]
        dirs = 2 if self.bidirectional else 1
        real_hidden = self.proj_size or self.hidden_size
        dt = input.dtype
        if hx is None:
            h0 = kiln.zeros(self.num_layers * dirs, batch, real_hidden, dtype=dt)
            c0 = (kiln.zeros(self.num_layers * dirs, batch, self.hidden_size, dtype=dt)
                  if is_lstm else None)
        else:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise RuntimeError("LSTM: hx must be a tuple (h_0, c_0)")
                h0, c0 = hx
                self._check_hidden(h0, batched, batch, real_hidden, "h_0")
                self._check_hidden(c0, batched, batch, self.hidden_size, "c_0")
            else:
                h0, c0 = hx, None
                self._check_hidden(h0, batched, batch, real_hidden, "hx")
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        out, h_n, c_n = self._run(input, h0, c0)
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if is_lstm else h_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s


def _split_args(args, kwargs, names):
    """Positional arguments after ``input_size, hidden_size, num_layers`` by name."""
    out = dict(zip(names, args))
    for k in out:
        if k in kwargs:
            raise TypeError(f"got multiple values for argument '{k}'")
    out.update(kwargs)
    return out


class RNN(RNNBase):
    """Elman RNN: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` (or relu).

    ``RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False)``; ``forward(input, hx=None) ->
    (output, h_n)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kw = _split_args(args, kwargs, ["input_size", "hidden_size", "num_layers",
                                        "nonlinearity", "bias", "batch_first", "dropout",
                                        "bidirectional", "device", "dtype"])
        nonlinearity = kw.pop("nonlinearity", "tanh")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(mode, **kw)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._forward(input, hx, False)


class LSTM(RNNBase):
    """Long short-term memory, gates ordered (i, f, g, o) as PyTorch's:
    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``.

    ``forward(input, (h_0, c_0)=None) -> (output, (h_n, c_n))``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kw = _split_args(args, kwargs, ["input_size", "hidden_size", "num_layers", "bias",
                                        "batch_first", "dropout", "bidirectional", "proj_size",
                                        "device", "dtype"])
        super().__init__("LSTM", **kw)

    def forward(self, input: Tensor, hx=None):
        return self._forward(input, hx, True)


class GRU(RNNBase):
    """Gated recurrent unit, gates ordered (r, z, n) as PyTorch's:
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h_t = (1 - z) * n + z * h_{t-1}``.

    ``forward(input, hx=None) -> (output, h_n)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kw = _split_args(args, kwargs, ["input_size", "hidden_size", "num_layers", "bias",
                                        "batch_first", "dropout", "bidirectional", "device",
                                        "dtype"])
        super().__init__("GRU", **kw)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._forward(input, hx, False)


# -- cells ---------------------------------------------------------------------------------------

class RNNCellBase(Module):
    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        dt = dtype or kiln.get_default_dtype()
        self.weight_ih = Parameter(kiln.empty(num_chunks * hidden_size, input_size, dtype=dt))
        self.weight_hh = Parameter(kiln.empty(num_chunks * hidden_size, hidden_size, dtype=dt))
        if bias:
            self.bias_ih = Parameter(kiln.empty(num_chunks * hidden_size, dtype=dt))
            self.bias_hh = Parameter(kiln.empty(num_chunks * hidden_size, dtype=dt))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for w in self.parameters():
            init.uniform_(w, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s

    def _prepare(self, input: Tensor, hx, n_states: int):
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.ndim not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.ndim}D instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.shape[-1]} "
                               f"expected {self.input_size}")
        batched = input.ndim == 2
        if not batched:
            input = input.unsqueeze(0)
        n = input.shape[0]
        if hx is None:
            states = [kiln.zeros(n, self.hidden_size, dtype=input.dtype)
                      for _ in range(n_states)]
        else:
            states = list(hx) if n_states == 2 else [hx]
            want = 2 if batched else 1
            for s in states:
                if s.ndim != want:
                    raise RuntimeError(f"{name}: Expected hidden to be {want}D, got {s.ndim}D "
                                       "instead")
            if not batched:
                states = [s.unsqueeze(0) for s in states]
            for s in states:
                if s.shape[0] != n:
                    raise RuntimeError(f"Input batch size {n} doesn't match hidden batch size "
                                       f"{s.shape[0]}")
                if s.shape[1] != self.hidden_size:
                    raise RuntimeError(f"hidden has inconsistent hidden_size: got "
                                       f"{s.shape[1]}, expected {self.hidden_size}")
        return input, states, batched


class RNNCell(RNNCellBase):
    """One step of an Elman RNN: ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)`` (or relu)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), batched = self._prepare(input, hx, 1)
        act = relu if self.nonlinearity == "relu" else tanh
        h = _rnn_step(linear(x, self.weight_ih, self.bias_ih), h, self.weight_hh, self.bias_hh,
                      act)
        return h if batched else h.squeeze(0)


class LSTMCell(RNNCellBase):
    """One LSTM step: ``forward(input, (h, c)=None) -> (h', c')``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, 4, dtype=dtype)

    def forward(self, input: Tensor, hx=None):
        x, (h, c), batched = self._prepare(input, hx, 2)
        h, c = _lstm_step(linear(x, self.weight_ih, self.bias_ih), h, c, self.weight_hh,
                          self.bias_hh, None)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(RNNCellBase):
    """One GRU step: ``forward(input, hx=None) -> h'``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, 3, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), batched = self._prepare(input, hx, 1)
        h = _gru_step(linear(x, self.weight_ih, self.bias_ih), h, self.weight_hh, self.bias_hh)
        return h if batched else h.squeeze(0)
