"""nn.RNN, nn.LSTM, nn.GRU and their cells against PyTorch on the same weights (loaded from
torch's state_dict): outputs, final states, and the gradients of the input, the initial states
and every parameter, for multi-layer, bidirectional, batch_first and unbatched inputs."""

import warnings

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, randn

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}


def _pair(make, dtype=None, seed=0):
    torch.manual_seed(seed)
    tm, km = make(torch), make(kiln)
    assert list(km.state_dict()) == list(tm.state_dict())
    assert [tuple(p.shape) for p in km.parameters()] == [tuple(p.shape) for p in tm.parameters()]
    if dtype == np.float64:
        tm.double()
        km.double()
    km.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return km, tm


def check_module(km, tm, call, inputs, tol):
    check_op(lambda lib, *xs: call(km if lib is kiln else tm, *xs), inputs, **tol)
    for (name, kp), (_, tp) in zip(km.named_parameters(), tm.named_parameters()):
        assert tp.grad is not None, name
        np.testing.assert_allclose(kp.grad.detach().numpy(), tp.grad.numpy(), err_msg=name,
                                   atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)
        kp.grad, tp.grad = None, None


def _flat(out):
    """(output, h_n) or (output, (h_n, c_n)) as a flat tuple of tensors."""
    y, h = out
    return (y, *h) if isinstance(h, tuple) else (y, h)


CONFIGS = [
    {},
    {"num_layers": 2},
    {"bidirectional": True},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"bias": False, "batch_first": True},
]


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("with_h0", [False, True])
def test_recurrent_layers(cls, cfg, with_h0):
    km, tm = _pair(lambda lib: getattr(lib.nn, cls)(3, 5, **cfg))
    T, N = 4, 2
    dirs = 2 if cfg.get("bidirectional") else 1
    x = randn(*((N, T, 3) if cfg.get("batch_first") else (T, N, 3)))
    states = [randn(cfg.get("num_layers", 1) * dirs, N, 5, seed=s) for s in (1, 2)]
    states = states[:2 if cls == "LSTM" else 1] if with_h0 else []

    def call(m, x, *hx):
        if not hx:
            return _flat(m(x))
        return _flat(m(x, tuple(hx) if len(hx) == 2 else hx[0]))

    check_module(km, tm, call, [x, *states], F32)


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_unbatched_float64_and_relu(cls):
    kw = {"nonlinearity": "relu"} if cls == "RNN" else {}
    km, tm = _pair(lambda lib: getattr(lib.nn, cls)(3, 4, num_layers=2, bidirectional=True,
                                                    **kw), dtype=np.float64)
    x = randn(5, 3, dtype=np.float64)  # (L, H_in): no batch dim
    hs = [randn(4, 4, seed=s, dtype=np.float64) for s in (1, 2)][:2 if cls == "LSTM" else 1]

    def call(m, x, *hx):
        return _flat(m(x, tuple(hx) if len(hx) == 2 else hx[0]))

    check_module(km, tm, call, [x, *hs], F64)


def test_lstm_projection_and_positional_arguments():
    km, tm = _pair(lambda lib: lib.nn.LSTM(3, 6, 2, True, False, 0.0, True, 2))
    assert km.weight_hr_l1_reverse.shape == (2, 6)
    x = randn(4, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: projections not supported with oneDNN
        check_module(km, tm, lambda m, x: _flat(m(x)), [x], F32)
    km, tm = _pair(lambda lib: lib.nn.RNN(3, 4, 1, "relu", False))
    assert km.nonlinearity == "relu" and not km.bias and repr(km) == repr(tm)


def test_dropout_between_layers_in_training_only():
    m = kiln.nn.GRU(3, 8, num_layers=2, dropout=0.5)
    x = kiln.randn(4, 2, 3)
    a, b = m(x)[0], m(x)[0]
    assert not np.allclose(a.detach().numpy(), b.detach().numpy())
    m.eval()
    np.testing.assert_array_equal(m(x)[0].detach().numpy(), m(x)[0].detach().numpy())
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        kiln.nn.LSTM(3, 4, dropout=0.2)


def test_init_range_and_dtype():
    m = kiln.nn.LSTM(3, 16, num_layers=2, bidirectional=True)
    k = 1 / np.sqrt(16)
    for name, p in m.named_parameters():
        v = p.detach().numpy()
        assert v.dtype == np.float32 and v.min() >= -k and v.max() <= k, name
        assert v.std() > k / 3, name  # spread over the range, not constant
    assert len(m.all_weights) == 4 and len(m.all_weights[0]) == 4


@pytest.mark.parametrize("cls", ["RNNCell", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("bias", [True, False])
def test_cells(cls, bias):
    km, tm = _pair(lambda lib: getattr(lib.nn, cls)(3, 4, bias=bias))
    n_states = 2 if cls == "LSTMCell" else 1
    x = randn(2, 3)
    hs = [randn(2, 4, seed=s) for s in (1, 2)][:n_states]

    def call(m, x, *hx):
        if not hx:
            return m(x)
        return m(x, tuple(hx) if len(hx) == 2 else hx[0])

    check_module(km, tm, call, [x, *hs], F32)
    check_module(km, tm, call, [x], F32)
    check_module(km, tm, call, [randn(3), *[h[0] for h in hs]], F32)  # unbatched
    if cls == "RNNCell":
        km, tm = _pair(lambda lib: lib.nn.RNNCell(3, 4, bias, "relu"))
        check_module(km, tm, call, [x, *hs], F32)


def test_double_backward_through_lstm():
    km, tm = _pair(lambda lib: lib.nn.LSTM(2, 3), dtype=np.float64)

    def grad_of(m, x):
        lib = kiln if m is km else torch
        out, _ = m(x)
        (gx,) = lib.autograd.grad((out * out).sum(), x, create_graph=True)
        return gx

    check_op(lambda lib, x: grad_of(km if lib is kiln else tm, x),
             [randn(3, 1, 2, dtype=np.float64)], **F64)


def _errors():
    return [
        (lambda lib: lib.nn.GRU(3, 4)(lib.ones(2, 2, 5)), "input_size"),
        (lambda lib: lib.nn.GRU(3, 4)(lib.ones(1, 2, 2, 3)), "2D or 3D"),
        (lambda lib: lib.nn.GRU(3, 4)(lib.ones(5, 2, 3), lib.ones(2, 2, 4)), "hidden size"),
        (lambda lib: lib.nn.LSTM(3, 4)(lib.ones(5, 2, 3), (lib.ones(1, 2, 4),
                                                           lib.ones(1, 3, 4))), "hidden size"),
        (lambda lib: lib.nn.RNN(3, 4)(lib.ones(5, 3), lib.ones(1, 2, 4)), "2-D"),
        (lambda lib: lib.nn.RNN(3, 4, nonlinearity="gelu"), "nonlinearity"),
        (lambda lib: lib.nn.RNN(3, 4, dropout=1.5), "dropout"),
        (lambda lib: lib.nn.LSTM(3, 4, num_layers=0), "num_layers"),
        (lambda lib: lib.nn.GRUCell(3, 4)(lib.ones(2, 5)), "input_size"),
        (lambda lib: lib.nn.LSTMCell(3, 4)(lib.ones(2, 3), (lib.ones(3, 4), lib.ones(3, 4))),
         "batch size"),
    ]


@pytest.mark.parametrize("i", range(len(_errors())))
def test_errors(i):
    fn, match = _errors()[i]
    check_exception(fn, match=match)
