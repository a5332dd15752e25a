"""The fused attention primitive (kiln/ops/attention.py) and its native kernels
(kiln/jit/attention.py) against PyTorch's scaled_dot_product_attention: values and gradients
at the shapes the kernels take (head dims a multiple of the vector width, up to 128 queries and
keys), causal or not, L != S both ways, broadcast batches, strided views as a transformer
makes them, double backward; and that the native kernels, not the numpy fallback, ran."""

import numpy as np
import pytest
import torch

import kiln
from kiln import jit
from tests.helpers import check_op, randn

F32 = {"atol": 2e-5, "rtol": 2e-5}
native = pytest.mark.skipif(not jit.available(), reason="kiln.jit (llvmlite) not installed")


def _sdpa(lib, q, k, v, **kw):
    return lib.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def _lanes():
    from kiln.jit import bmm

    return bmm._shape_regs()[0] if jit.available() else 16


@pytest.fixture
def numpy_forbidden(monkeypatch):
    """Fail if the numpy fallback of the attention primitive runs."""
    from kiln.ops import attention

    def boom(*a, **k):
        raise AssertionError("the numpy fallback ran instead of the native kernel")

    monkeypatch.setattr(attention, "_probs", boom)


SHAPES = [  # (batch, L, S, E, Ev)
    ((2, 3), 20, 20, 1, 2),     # E and Ev in vector widths
    ((2,), 7, 19, 2, 1),        # fewer queries than keys
    ((3,), 33, 17, 1, 1),       # more queries than keys
    ((1, 2), 128, 128, 1, 1),   # the largest
    ((4,), 1, 5, 1, 3),         # one query
    ((), 16, 16, 2, 2),         # 2-D
]


@native
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_attention_matches_torch(shape, causal, numpy_forbidden):
    batch, L, S, e, ev = shape
    E, Ev = e * _lanes(), ev * _lanes()
    q, k, v = randn(*batch, L, E), randn(*batch, S, E, seed=1), randn(*batch, S, Ev, seed=2)
    check_op(lambda lib, q, k, v: _sdpa(lib, q, k, v, is_causal=causal), [q, k, v], **F32)


@native
def test_native_attention_scale_and_broadcast_batch(numpy_forbidden):
    E = _lanes()
    q, k, v = randn(2, 3, 9, E), randn(1, 3, 11, E, seed=1), randn(2, 1, 11, 2 * E, seed=2)
    for kw in ({"scale": 0.05}, {"is_causal": True, "scale": 1.7}):
        check_op(lambda lib, q, k, v, kw=kw: _sdpa(lib, q, k, v, **kw), [q, k, v], **F32)


@native
def test_native_attention_on_a_transformers_strided_views(numpy_forbidden):
    """q, k, v as a GPT block makes them: a split of one projection, heads transposed out of
    the feature axis (row stride 3C); the output transposed back and merged is a view."""
    B, T, H, D = 3, 24, 4, _lanes()
    C = H * D
    x = randn(B, T, 3 * C)

    def fn(lib, x):
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in x.split(C, dim=2))
        y = _sdpa(lib, q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, C)

    check_op(fn, [x], **F32)
    q = kiln.tensor(x).reshape(B, T, 3, H, D)[:, :, 0].transpose(1, 2)
    y = _sdpa(kiln, q, q, q, is_causal=True)
    merged = y.transpose(1, 2).reshape(B, T, C)
    assert np.shares_memory(merged.numpy(), y.numpy())  # heads-inner layout: no copy


@native
def test_native_attention_double_backward():
    """Under create_graph the gradient is built from ops, so it can be differentiated again."""
    E = _lanes()
    arrays = [randn(2, 6, E), randn(2, 8, E, seed=1), randn(2, 8, E, seed=2)]
    results = []
    for lib in (kiln, torch):
        q, k, v = (lib.tensor(a, requires_grad=True) for a in arrays)
        out = _sdpa(lib, q, k, v, is_causal=True)
        g = lib.autograd.grad((out * out).sum(), (q, k, v), create_graph=True)
        total = sum((x * x).sum() for x in g)
        results.append([x.detach().numpy() for x in lib.autograd.grad(total, (q, k, v))])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_numpy_path_matches_torch(monkeypatch):
    """The primitive's numpy impls (float32 without kiln.jit), values and gradients."""
    monkeypatch.setattr(jit, "available", lambda: False)
    q, k, v = randn(2, 5, 6), randn(2, 7, 6, seed=1), randn(2, 7, 3, seed=2)
    for kw in ({}, {"is_causal": True}, {"scale": 0.2}):
        check_op(lambda lib, q, k, v, kw=kw: _sdpa(lib, q, k, v, **kw), [q, k, v], **F32,
                 compiled=False)  # the monkeypatch does not reach compiled kernels


def test_attention_is_one_node():
    q = kiln.tensor(randn(1, 4, 8), requires_grad=True)
    out = _sdpa(kiln, q, q, q, is_causal=True)
    assert out._node.prim.name == "attention"


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_primitive_matches_torch(causal):
    """The gradients as outputs of autograd.grad (attention_backward runs inside the call)."""
    E = _lanes()
    arrays = [randn(2, 9, E), randn(2, 12, E, seed=1), randn(2, 12, 2 * E, seed=2)]
    w = randn(2, 9, 2 * E, seed=3)

    def fn(lib, q, k, v):
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        out = _sdpa(lib, q, k, v, is_causal=causal)
        return lib.autograd.grad((out * lib.tensor(w)).sum(), (q, k, v))

    # compiled=False: check_compiled runs a grad=False function under no_grad
    check_op(fn, arrays, **F32, grad=False, compiled=False)


# -- q, k, v as the heads of one projection (attention_packed) -------------------------------------

def _gpt_heads(lib, x, B, T, H, D, order=(0, 1, 2)):
    parts = x.split(H * D, dim=2)
    return [parts[i].reshape(B, T, H, D).transpose(1, 2) for i in order]


@pytest.mark.parametrize("causal", [False, True])
def test_heads_of_one_projection_are_one_packed_node(causal, numpy_forbidden):
    """A GPT block's q, k, v (split, reshape, transpose of one projection): attention takes
    the projection itself, and its gradient is written in the projection's layout."""
    B, T, H, D = 2, 20, 3, _lanes()
    x = randn(B, T, 3 * H * D)

    def fn(lib, x):
        q, k, v = _gpt_heads(lib, x, B, T, H, D)
        return _sdpa(lib, q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, H * D)

    check_op(fn, [x], **F32)
    xt = kiln.tensor(x, requires_grad=True)
    assert _sdpa(kiln, *_gpt_heads(kiln, xt, B, T, H, D), is_causal=causal)._node.prim.name == \
        "attention_packed"


def test_views_that_are_not_the_standard_heads_take_the_general_node():
    B, T, H, D = 2, 6, 2, 4
    x = kiln.tensor(randn(B, T, 3 * H * D), requires_grad=True)
    swapped = _gpt_heads(kiln, x, B, T, H, D, order=(1, 0, 2))  # k first
    assert _sdpa(kiln, *swapped)._node.prim.name == "attention"
    q, k, _ = _gpt_heads(kiln, x, B, T, H, D)
    other = kiln.tensor(randn(B, H, T, D), requires_grad=True)
    assert _sdpa(kiln, q, k, other)._node.prim.name == "attention"
    check_op(lambda lib, x: _sdpa(lib, *_gpt_heads(lib, x, B, T, H, D, order=(2, 0, 1))),
             [randn(B, T, 3 * H * D)], **F32)


def test_packed_numpy_path_double_backward_and_gradient_primitive(monkeypatch):
    B, T, H, D = 2, 7, 2, 3  # head dim 3: the numpy impls
    x = randn(B, T, 3 * H * D, dtype=np.float64)
    check_op(lambda lib, x: _sdpa(lib, *_gpt_heads(lib, x, B, T, H, D), is_causal=True), [x],
             atol=1e-12, rtol=1e-10)
    results = []
    for lib in (kiln, torch):
        xt = lib.tensor(x, requires_grad=True)
        q, k, v = _gpt_heads(lib, xt, B, T, H, D)
        if lib is kiln:
            out = _sdpa(lib, q, k, v, is_causal=True)
        else:  # the math of it: torch's CPU flash kernel has no double backward
            s = (q @ k.transpose(-2, -1)) / np.sqrt(D)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            out = s.softmax(-1) @ v
        (g,) = lib.autograd.grad((out * out).sum(), (xt,), create_graph=True)
        results.append(lib.autograd.grad((g * g).sum(), (xt,))[0].detach().numpy())
    np.testing.assert_allclose(results[0], results[1], atol=1e-10, rtol=1e-8)

    def grads(lib, x):  # attention_packed_backward runs inside the call
        xt = x.requires_grad_(True)
        out = _sdpa(lib, *_gpt_heads(lib, xt, B, T, H, D), is_causal=True)
        return lib.autograd.grad((out * out).sum(), (xt,))

    check_op(grads, [x], atol=1e-12, rtol=1e-10, grad=False, compiled=False)
