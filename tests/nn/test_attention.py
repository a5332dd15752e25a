"""scaled_dot_product_attention, nn.MultiheadAttention and the transformer encoder against
PyTorch: values and gradients of q, k, v (every mask kind, fully masked rows, GQA), modules
loaded from torch's state_dicts in eval mode, with masks and both batch_first settings."""

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, randn

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning")
F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}
TOL = {np.float32: F32, np.float64: F64}


def _sdpa(lib, *args, **kw):
    return lib.nn.functional.scaled_dot_product_attention(*args, **kw)


def _bool_mask(shape, seed=0, empty_row=None):
    m = np.random.default_rng(seed).random(shape) > 0.4
    if empty_row is not None:
        m[..., empty_row, :] = False  # a query that may attend to nothing: zeros, as PyTorch
    return m


# -- scaled_dot_product_attention ----------------------------------------------------------------

QKV_SHAPES = [((2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 6, 5)),  # (N, H, L, E), S != L, Ev != E
              ((5, 4), (5, 4), (5, 3)),                     # 2-D
              ((3, 6, 4), (3, 6, 4), (3, 6, 4)),            # L > E
              ((1, 2, 3, 4), (1, 2, 0, 4), (1, 2, 0, 4))]   # no keys


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", QKV_SHAPES, ids=str)
def test_sdpa_masks(dt, shapes):
    qs, ks, _ = shapes
    q, k, v = (randn(*s, seed=i, dtype=dt) for i, s in enumerate(shapes))
    L, S = qs[-2], ks[-2]
    cases = [{}, {"scale": 0.3}, {"is_causal": True}]
    for kw in cases:
        check_op(lambda lib, q, k, v, kw=kw: _sdpa(lib, q, k, v, **kw), [q, k, v], **TOL[dt])
    if not S:
        return
    bm = _bool_mask((L, S), empty_row=1)
    check_op(lambda lib, q, k, v: _sdpa(lib, q, k, v, attn_mask=lib.tensor(bm)), [q, k, v],
             **TOL[dt])
    fm = randn(L, S, seed=7, dtype=dt)
    fm[0, :2] = -np.inf
    fm[-1] = -np.inf  # a fully masked row
    check_op(lambda lib, q, k, v, m: _sdpa(lib, q, k, v, attn_mask=m), [q, k, v, fm], **TOL[dt])


def test_sdpa_broadcast_masks_and_causal_shapes():
    q, k, v = randn(2, 3, 4, 8), randn(2, 3, 4, 8, seed=1), randn(2, 3, 4, 8, seed=2)
    per_batch = _bool_mask((2, 1, 4, 4), seed=3, empty_row=2)
    check_op(lambda lib, q, k, v: _sdpa(lib, q, k, v, attn_mask=lib.tensor(per_batch)),
             [q, k, v], **F32)
    fm = randn(3, 4, 4, seed=4)  # one mask per head
    check_op(lambda lib, q, k, v, m: _sdpa(lib, q, k, v, attn_mask=m), [q, k, v, fm], **F32)
    # causal with more queries than keys and with more keys than queries (top-left aligned)
    for L, S in ((5, 3), (2, 6)):
        q, k, v = randn(2, L, 4), randn(2, S, 4, seed=1), randn(2, S, 3, seed=2)
        check_op(lambda lib, q, k, v: _sdpa(lib, q, k, v, is_causal=True), [q, k, v], **F32)


def test_sdpa_gqa_and_double_backward():
    q, k, v = randn(2, 4, 3, 8), randn(2, 2, 5, 8, seed=1), randn(2, 2, 5, 6, seed=2)
    check_op(lambda lib, q, k, v: _sdpa(lib, q, k, v, enable_gqa=True), [q, k, v], **F32)

    def grad_of(lib, q, k, v):
        out = _sdpa(lib, q, k, v, is_causal=True)
        return lib.autograd.grad((out * out).sum(), (q, k, v), create_graph=True)

    f64 = [randn(2, 3, 4, dtype=np.float64, seed=i) for i in range(3)]
    check_op(grad_of, f64, **F64)


def test_sdpa_dropout_statistics():
    # with dropout the weights are dropped and rescaled: the mean over many draws is unchanged
    q = kiln.zeros(1, 1, 400, 4)
    v = kiln.ones(1, 1, 8, 1)
    out = _sdpa(kiln, q, kiln.zeros(1, 1, 8, 4), v, dropout_p=0.25)
    vals = out.detach().numpy().ravel()
    assert abs(vals.mean() - 1.0) < 0.05 and vals.std() > 0.1


SDPA_ERRORS = [
    (lambda lib: _sdpa(lib, lib.ones(4), lib.ones(5, 4), lib.ones(5, 6)), "2 dimensional"),
    (lambda lib: _sdpa(lib, lib.ones(3, 4), lib.ones(5, 4, dtype=lib.float64), lib.ones(5, 6)),
     "same dtype"),
    (lambda lib: _sdpa(lib, lib.ones(1, 3, 4), lib.ones(1, 3, 4), lib.ones(1, 3, 4),
                       attn_mask=lib.ones(3, 3, dtype=lib.int64)), "attn_mask dtype"),
    (lambda lib: _sdpa(lib, lib.ones(1, 3, 4), lib.ones(1, 3, 4), lib.ones(1, 3, 4),
                       attn_mask=lib.ones(3, 3, dtype=lib.float64)), "attn_mask dtype"),
    (lambda lib: _sdpa(lib, lib.ones(1, 3, 4), lib.ones(1, 3, 4), lib.ones(1, 3, 4),
                       attn_mask=lib.ones(2, 3, dtype=lib.bool)), "size"),
    (lambda lib: _sdpa(lib, lib.ones(2, 3, 4), lib.ones(3, 3, 4), lib.ones(3, 3, 4)), "size"),
    (lambda lib: _sdpa(lib, lib.ones(1, 4, 3, 4), lib.ones(1, 2, 3, 4), lib.ones(1, 2, 3, 4)),
     "size"),
    (lambda lib: _sdpa(lib, lib.ones(2, 3, 4, requires_grad=True), lib.ones(2, 3, 4),
                       lib.ones(2, 3, 4), attn_mask=lib.ones(3, 3, dtype=lib.bool),
                       is_causal=True), "is_causal"),
]


@pytest.mark.parametrize("i", range(len(SDPA_ERRORS)))
def test_sdpa_errors(i):
    fn, match = SDPA_ERRORS[i]
    check_exception(fn, match=match)


# -- modules loaded from torch -------------------------------------------------------------------

def _pair(make, seed=0, dtype=None):
    """The same module in both libraries, kiln's loaded from torch's state_dict (numpy)."""
    torch.manual_seed(seed)
    tm, km = make(torch), make(kiln)
    if dtype == np.float64:
        tm.double()
        km.double()
    assert list(km.state_dict()) == list(tm.state_dict())
    assert [tuple(p.shape) for p in km.parameters()] == [tuple(p.shape) for p in tm.parameters()]
    km.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    tm.eval()
    km.eval()
    return km, tm


def check_module(km, tm, call, inputs, tol):
    """``call(module, lib, *tensors)`` on both; compare outputs, input and parameter grads."""
    check_op(lambda lib, *xs: call(km if lib is kiln else tm, lib, *xs), inputs, **tol)
    for (name, kp), (_, tp) in zip(km.named_parameters(), tm.named_parameters()):
        if tp.grad is None:
            assert kp.grad is None or not kp.grad.detach().numpy().any(), name
            continue
        np.testing.assert_allclose(kp.grad.detach().numpy(), tp.grad.numpy(),
                                   atol=tol["atol"] * 10, rtol=tol["rtol"] * 10, err_msg=name)


MHA_CONFIGS = [{}, {"batch_first": True}, {"add_bias_kv": True, "add_zero_attn": True},
               {"kdim": 4, "vdim": 6}, {"bias": False}]


@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=str)
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention(cfg, need_weights):
    km, tm = _pair(lambda lib: lib.nn.MultiheadAttention(8, 2, **cfg))
    bf = cfg.get("batch_first", False)
    L, S, N = 3, 5, 2

    def seq(n, d, seed):
        return randn(*((N, n, d) if bf else (n, N, d)), seed=seed)

    q, k, v = seq(L, 8, 0), seq(S, cfg.get("kdim", 8), 1), seq(S, cfg.get("vdim", 8), 2)
    kpm = np.zeros((N, S), bool)
    kpm[0, -2:] = True
    am = _bool_mask((L, S), seed=3)
    am[:, 0] = False  # True = masked in MultiheadAttention: keep one key per query
    fam = randn(N * 2, L, S, seed=4)

    for masks in ({}, {"key_padding_mask": kpm}, {"attn_mask": am},
                  {"attn_mask": fam, "key_padding_mask": kpm}):
        def call(m, lib, q, k, v, masks=masks):
            kw = {key: lib.tensor(val) for key, val in masks.items()}
            out, w = m(q, k, v, need_weights=need_weights, **kw)
            assert (w is None) == (not need_weights)
            return (out, w) if need_weights else out
        check_module(km, tm, call, [q, k, v], F32)


def test_multihead_attention_self_unbatched_and_per_head_weights():
    km, tm = _pair(lambda lib: lib.nn.MultiheadAttention(6, 3))
    x = randn(4, 6)  # unbatched (L, E)
    check_module(km, tm, lambda m, lib, x: m(x, x, x)[0], [x], F32)
    x = randn(4, 2, 6)
    check_module(km, tm, lambda m, lib, x: m(x, x, x, average_attn_weights=False), [x], F32)
    causal = np.triu(np.ones((4, 4), bool), 1)
    check_module(km, tm, lambda m, lib, x: m(x, x, x, attn_mask=lib.tensor(causal),
                                             need_weights=False, is_causal=True)[0], [x], F32)
    check_exception(lambda lib: (km if lib is kiln else tm)(lib.ones(4, 2, 6), lib.ones(4, 2, 6),
                                                           lib.ones(4, 2, 6), is_causal=True),
                    match="is_causal")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(batch_first, norm_first):
    def make(lib):
        return lib.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=batch_first,
                                              norm_first=norm_first)
    km, tm = _pair(make)
    x = randn(*((2, 5, 8) if batch_first else (5, 2, 8)))
    kpm = np.zeros((2, 5), bool)
    kpm[1, 3:] = True
    causal = np.triu(np.ones((5, 5), bool), 1)
    float_mask = np.triu(np.full((5, 5), -np.inf, np.float32), 1)
    for kw in ({}, {"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True},
               {"src_mask": float_mask, "src_key_padding_mask": kpm}):
        def call(m, lib, x, kw=kw):
            args = {key: (lib.tensor(v) if isinstance(v, np.ndarray) else v)
                    for key, v in kw.items()}
            return m(x, **args)
        check_module(km, tm, call, [x], F32)


@pytest.mark.parametrize("activation", ["gelu", "callable"])
def test_transformer_encoder(activation):
    def make(lib):
        act = lib.nn.functional.silu if activation == "callable" else activation
        layer = lib.nn.TransformerEncoderLayer(8, 4, dim_feedforward=12, activation=act,
                                               bias=activation == "gelu")
        kw = {"enable_nested_tensor": False} if lib is torch else {}
        return lib.nn.TransformerEncoder(layer, 2, norm=lib.nn.LayerNorm(8), **kw)
    km, tm = _pair(make, dtype=np.float64)
    assert "layers.1.self_attn.in_proj_weight" in km.state_dict()
    x = randn(4, 3, 8, dtype=np.float64)
    mask = np.triu(np.full((4, 4), -np.inf), 1)
    kpm = np.zeros((3, 4), bool)
    kpm[2, 2:] = True
    check_module(km, tm, lambda m, lib, x: m(x, mask=lib.tensor(mask),
                                             src_key_padding_mask=lib.tensor(kpm)), [x], F64)
    check_module(km, tm, lambda m, lib, x: m(x), [x], F64)


def test_transformer_train_mode_uses_dropout():
    layer = kiln.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5)
    x = kiln.randn(5, 2, 8)
    layer.train()
    a, b = layer(x), layer(x)
    assert not np.allclose(a.detach().numpy(), b.detach().numpy())
    layer.eval()
    np.testing.assert_array_equal(layer(x).detach().numpy(), layer(x).detach().numpy())
