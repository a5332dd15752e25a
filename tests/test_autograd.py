"""Autograd engine behaviour, checked against PyTorch: accumulation, retain_graph, grad modes,
autograd.grad, higher-order gradients, hooks, custom Functions, deep graphs, in-place errors."""

import sys

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, randn


def both(arr, requires_grad=True):
    return (kiln.tensor(arr, requires_grad=requires_grad),
            torch.tensor(arr, requires_grad=requires_grad))


def assert_close(k, t, atol=1e-6, rtol=1e-6):
    np.testing.assert_allclose(k.detach().numpy(), t.detach().numpy(), atol=atol, rtol=rtol)


def test_backward_accumulates_into_grad_across_calls():
    a = randn(3, 4)
    (kx, tx) = both(a)
    for lib, x in ((kiln, kx), (torch, tx)):
        (x * x).sum().backward()
        (x * 3.0).sum().backward()
    assert_close(kx.grad, tx.grad)


def test_backward_with_gradient_argument_for_non_scalar():
    a, g = randn(2, 3), randn(2, 3, seed=1)
    kx, tx = both(a)
    (kx * kx).backward(kiln.tensor(g))
    (tx * tx).backward(torch.tensor(g))
    assert_close(kx.grad, tx.grad)


def test_non_scalar_backward_without_gradient_is_an_error():
    check_exception(lambda lib: (lib.ones(3, requires_grad=True) * 2).backward(),
                    match="scalar outputs")


def test_backward_on_tensor_without_grad_is_an_error():
    check_exception(lambda lib: lib.ones(3).sum().backward(), match="does not require grad")


def test_gradient_argument_of_wrong_shape_is_an_error():
    check_exception(lambda lib: (lib.ones(3, requires_grad=True) * 2).backward(lib.ones(4)),
                    match="shape")


def test_shared_subexpression_gradients_add_up():
    a = randn(5)
    kx, tx = both(a)
    for x in (kx, tx):
        y = x * 2.0
        z = y * y + y * 3.0 - y
        z.sum().backward()
    assert_close(kx.grad, tx.grad)


def test_second_backward_without_retain_graph_fails_and_with_it_accumulates():
    def twice(lib):
        x = lib.ones(3, requires_grad=True)
        y = (x * x).sum()
        y.backward()
        y.backward()

    check_exception(twice, match="second time")
    a = randn(3)
    kx, tx = both(a)
    for x in (kx, tx):
        y = (x * x).exp().sum()
        y.backward(retain_graph=True)
        y.backward()
    assert_close(kx.grad, tx.grad, rtol=1e-5)


def test_no_grad_enable_grad_and_set_grad_enabled_nest_and_restore():
    x = kiln.ones(2, requires_grad=True)
    with kiln.no_grad():
        assert not (x * 2).requires_grad
        with kiln.enable_grad():
            assert (x * 2).requires_grad
        assert not kiln.is_grad_enabled()
    assert kiln.is_grad_enabled()
    with kiln.set_grad_enabled(False):
        assert not (x * 2).requires_grad
    assert (x * 2).requires_grad
    kiln.set_grad_enabled(False)
    assert not kiln.is_grad_enabled()
    kiln.set_grad_enabled(True)

    @kiln.no_grad()
    def f(t):
        return t * 2

    assert not f(x).requires_grad
    with kiln.inference_mode():
        assert not (x * 2).requires_grad


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(ValueError):
        with kiln.no_grad():
            raise ValueError("boom")
    assert kiln.is_grad_enabled()


def test_grad_mode_is_per_thread_as_in_pytorch():
    """Another thread inside no_grad (a server answering requests) leaves this thread's
    autograd on, and a new thread starts with gradients enabled."""
    import threading

    inside, release, seen = threading.Event(), threading.Event(), {}

    def server():
        with kiln.no_grad():
            seen["server"] = kiln.is_grad_enabled()
            inside.set()
            release.wait(5)

    t = threading.Thread(target=server)
    t.start()
    try:
        assert inside.wait(5)
        x = kiln.ones(2, requires_grad=True)
        assert kiln.is_grad_enabled() and (x * 2).requires_grad
    finally:
        release.set()
        t.join()
    assert seen["server"] is False
    with kiln.no_grad():
        fresh = threading.Thread(target=lambda: seen.update(fresh=kiln.is_grad_enabled()))
        fresh.start()
        fresh.join()
    assert seen["fresh"] is True


def test_detach_cuts_the_graph_and_shares_storage():
    a = randn(3)
    kx, tx = both(a)
    for x in (kx, tx):
        y = x * 2
        d = y.detach()
        assert not d.requires_grad and d.grad_fn is None
        (y * d).sum().backward()
    assert_close(kx.grad, tx.grad)
    x = kiln.ones(3)
    d = x.detach()
    d.add_(1)
    assert x.tolist() == [2.0, 2.0, 2.0]


def test_requires_grad_rules():
    check_exception(lambda lib: lib.ones(3, dtype=lib.int64).requires_grad_(),
                    match="floating point")
    x = kiln.ones(2, requires_grad=True)
    y = x * 2
    assert not y.is_leaf and x.is_leaf and y.grad_fn is not None
    with pytest.raises(RuntimeError, match="leaf"):
        y.requires_grad = False
    assert repr(y.grad_fn) == "<MulBackward0 object>"


def test_autograd_grad_returns_without_accumulating():
    a, b = randn(4), randn(4, seed=1)
    kx, tx = both(a)
    ky, ty = both(b)
    kg = kiln.autograd.grad((kx * ky).sum(), (kx, ky))
    tg = torch.autograd.grad((tx * ty).sum(), (tx, ty))
    assert kx.grad is None
    for k, t in zip(kg, tg):
        assert_close(k, t)


def test_autograd_grad_of_a_non_leaf_input():
    a = randn(4)
    kx, tx = both(a)
    out = []
    for lib, x in ((kiln, kx), (torch, tx)):
        y = x * 3
        z = (y * y).sum()
        out.append(lib.autograd.grad(z, y)[0])
    assert_close(out[0], out[1])


def test_autograd_grad_unused_input_errors_or_gives_none():
    x = kiln.ones(2, requires_grad=True)
    y = kiln.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="not have been used"):
        kiln.autograd.grad((x * 2).sum(), (x, y))
    gx, gy = kiln.autograd.grad((x * 2).sum(), (x, y), allow_unused=True)
    assert gy is None and gx.tolist() == [2.0, 2.0]
    gx, gy = kiln.autograd.grad((x * 2).sum(), (x, y), materialize_grads=True)
    assert gy.tolist() == [0.0, 0.0]


def test_autograd_grad_input_that_does_not_require_grad_is_an_error():
    check_exception(lambda lib: lib.autograd.grad((lib.ones(2, requires_grad=True) * 2).sum(),
                                                  lib.ones(2)),
                    match="does not require grad")


@pytest.mark.parametrize("order", [2, 3])
def test_higher_order_gradients_match_torch(order):
    a = np.array([0.5, -1.2, 2.0], np.float64)
    kx, tx = both(a)
    results = []
    for lib, x in ((kiln, kx), (torch, tx)):
        y = (x * x * x + x.exp() * x).sum()
        g = y
        for _ in range(order):
            (g,) = lib.autograd.grad(g.sum() if g.ndim else g, x, create_graph=True)
        results.append(g)
    assert_close(results[0], results[1], atol=1e-12, rtol=1e-12)


def test_create_graph_backward_builds_differentiable_grad():
    a = np.array([1.5, -0.5], np.float64)
    kx, tx = both(a)
    for x in (kx, tx):
        (x * x * x).sum().backward(create_graph=True)
        g = x.grad
        x.grad = None
        (g * g).sum().backward()
    assert_close(kx.grad, tx.grad, atol=1e-12, rtol=1e-12)


def test_gradient_penalty_style_double_backward():
    w0, xin = randn(3, seed=2).astype(np.float64), randn(4, 3, seed=3).astype(np.float64)
    kw, tw = both(w0)
    kx, tx = both(xin)
    for lib, w, x in ((kiln, kw, kx), (torch, tw, tx)):
        out = ((x * w).sum(1).exp()).sum()
        (gx,) = lib.autograd.grad(out, x, create_graph=True)
        ((gx * gx).sum()).backward()
    assert_close(kw.grad, tw.grad, atol=1e-10, rtol=1e-10)


def test_tensor_hooks_see_and_replace_gradients():
    a = randn(3)
    kx, tx = both(a)
    seen = {}
    for name, x in (("k", kx), ("t", tx)):
        y = x * 2
        y.register_hook(lambda g, name=name: seen.setdefault(name + "y", g.clone()) * 10)
        h = x.register_hook(lambda g, name=name: seen.setdefault(name + "x", g.clone()))
        (y * y).sum().backward()
        h.remove()
    assert_close(seen["ky"], seen["ty"])
    assert_close(seen["kx"], seen["tx"])
    assert_close(kx.grad, tx.grad)


def test_retain_grad_keeps_non_leaf_gradient():
    a = randn(3)
    kx, tx = both(a)
    ys = []
    for x in (kx, tx):
        y = x * 3
        y.retain_grad()
        (y * y).sum().backward()
        ys.append(y)
    assert_close(ys[0].grad, ys[1].grad)


def test_custom_function_forward_backward_and_double_backward():
    class KCube(kiln.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.save_for_backward(x)
            ctx.k = k
            return x * x * x * k

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x * x * ctx.k, None

    class TCube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.save_for_backward(x)
            ctx.k = k
            return x * x * x * k

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x * x * ctx.k, None

    a = np.array([0.3, -2.0, 1.1], np.float64)
    kx, tx = both(a)
    ky, ty = KCube.apply(kx, 2.0), TCube.apply(tx, 2.0)
    assert_close(ky, ty)
    (kg,) = kiln.autograd.grad(ky.sum(), kx, create_graph=True)
    (tg,) = torch.autograd.grad(ty.sum(), tx, create_graph=True)
    assert_close(kg, tg)
    kg.sum().backward()
    tg.sum().backward()
    assert_close(kx.grad, tx.grad, atol=1e-12)


def test_custom_function_returning_wrong_number_of_gradients_is_an_error():
    class Bad(kiln.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            return x * y

        @staticmethod
        def backward(ctx, g):
            return g

    x = kiln.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="incorrect number of gradients"):
        Bad.apply(x, x).sum().backward()


def test_backward_through_10000_ops_deep_graph():
    x = kiln.tensor([1.0, 2.0], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    limit = sys.getrecursionlimit()
    y.sum().backward()
    assert sys.getrecursionlimit() == limit
    np.testing.assert_allclose(x.grad.numpy(), np.full(2, 1.0001 ** 10_000, np.float32),
                               rtol=1e-3)


def test_in_place_on_leaf_requiring_grad_is_an_error_but_allowed_under_no_grad():
    check_exception(lambda lib: lib.ones(2, requires_grad=True).add_(1), match="leaf Variable")
    x = kiln.ones(2, requires_grad=True)
    with kiln.no_grad():
        x.mul_(3)
    assert x.tolist() == [3.0, 3.0] and x.requires_grad and x.is_leaf


def test_in_place_change_of_a_saved_value_is_detected():
    def f(lib):
        x = lib.ones(3, requires_grad=True)
        y = x.exp()
        y.add_(1)
        y.sum().backward()

    check_exception(f, match="modified by an inplace operation")

    def g(lib):
        x = lib.ones(3, requires_grad=True)
        w = lib.ones(3) * 2
        y = x * w
        w.mul_(5)
        y.sum().backward()

    check_exception(g, match="modified by an inplace operation")


def test_in_place_ops_in_the_graph_give_torch_gradients():
    a, b = randn(4), randn(4, seed=1)
    kx, tx = both(a)
    ky, ty = both(b)
    for x, y in ((kx, ky), (tx, ty)):
        z = x * 1
        z.add_(y)
        z.mul_(y)
        z.sub_(x, alpha=2)
        (z * z).sum().backward()
    assert_close(kx.grad, tx.grad, rtol=1e-5)
    assert_close(ky.grad, ty.grad, rtol=1e-5)


def test_in_place_into_a_plain_buffer_joins_the_graph():
    a = randn(3)
    kx, tx = both(a)
    for lib, x in ((kiln, kx), (torch, tx)):
        buf = lib.zeros(3)
        buf += x
        buf *= 2
        assert buf.requires_grad and not buf.is_leaf
        buf.sum().backward()
    assert_close(kx.grad, tx.grad)


def test_grad_of_integer_cast_is_cut():
    x = kiln.tensor([1.5, 2.5], requires_grad=True)
    assert not x.long().requires_grad
    assert x.double().requires_grad


# -- views' gradients delivered in place (index_view's grad_into) -------------------------------

def _split_grads(monkeypatch, into: bool, hook=False, create_graph=False):
    from kiln.ops import index as index_ops

    if not into:
        monkeypatch.setattr(index_ops._index_view, "grad_into", None)
    rng = np.random.default_rng(3)
    w = kiln.tensor(rng.standard_normal((4, 6, 9)).astype(np.float32), requires_grad=True)
    mid = w * 2.0  # a non-leaf: its pieces' gradients go through grad_into
    seen = []
    if hook:
        mid.register_hook(lambda g: seen.append(g.numpy().copy()))
    q, k, v = mid.split(3, dim=2)
    loss = (q * q).sum() + (k * 3.0).sum() + v[:, 1:].exp().sum() + mid[0, 2, 5] * 7.0
    (gw,) = kiln.autograd.grad(loss, w, create_graph=True) if create_graph else (None,)
    if not create_graph:
        loss.backward()
        gw = w.grad
    return gw, seen


def test_split_gradients_written_in_place_equal_the_vjp_path(monkeypatch):
    from kiln.ops import index as index_ops

    calls = []
    real = index_ops._index_view.grad_into

    def counting(acc, g, node):
        calls.append(acc is None)
        return real(acc, g, node)

    monkeypatch.setattr(index_ops._index_view, "grad_into", counting)
    fast, _ = _split_grads(monkeypatch, True)
    assert calls == [True, True, False, False, False]  # buffers for v and mid, then writes
    slow, _ = _split_grads(monkeypatch, False)
    np.testing.assert_array_equal(fast.numpy(), slow.numpy())
    torch = pytest.importorskip("torch")
    w = torch.tensor(np.random.default_rng(3).standard_normal((4, 6, 9)).astype(np.float32),
                     requires_grad=True)
    mid = w * 2.0
    q, k, v = mid.split(3, dim=2)
    ((q * q).sum() + (k * 3.0).sum() + v[:, 1:].exp().sum() + mid[0, 2, 5] * 7.0).backward()
    np.testing.assert_allclose(fast.numpy(), w.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_split_gradients_reach_hooks_and_double_backward(monkeypatch):
    (fast, seen_fast), (slow, seen_slow) = (_split_grads(monkeypatch, True, hook=True),
                                            _split_grads(monkeypatch, False, hook=True))
    assert len(seen_fast) == len(seen_slow) == 1
    np.testing.assert_array_equal(seen_fast[0], seen_slow[0])
    gw, _ = _split_grads(monkeypatch, True, create_graph=True)
    gw.sum().backward()  # the recorded graph of the backward is differentiable
    np.testing.assert_array_equal(gw.detach().numpy(), fast.numpy())


def test_leaf_gradients_never_share_memory_with_each_other_or_the_caller():
    """A first gradient that went to one leaf alone becomes its .grad without a copy; one that
    also went elsewhere (add passes g to both sides, a caller's gradient, a hook's result) is
    copied, so accumulating into one .grad never changes another or the caller's tensor."""
    import numpy as np

    a = kiln.ones(3, requires_grad=True)
    b = kiln.ones(3, requires_grad=True)
    upstream = kiln.tensor([1.0, 2.0, 3.0])
    (a + b).backward(upstream)
    assert not np.shares_memory(a.grad.numpy(), b.grad.numpy())
    assert not np.shares_memory(a.grad.numpy(), upstream.numpy())
    (a + b).backward(upstream)  # accumulates in place into each .grad
    np.testing.assert_array_equal(upstream.numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(a.grad.numpy(), [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(b.grad.numpy(), [2.0, 4.0, 6.0])

    kept = []
    w = kiln.ones(2, 2, requires_grad=True)
    w.register_hook(lambda g: kept.append(g * 1) or kept[-1])
    x = kiln.ones(3, 2)
    (x @ w).sum().backward()
    (x @ w).sum().backward()
    np.testing.assert_array_equal(kept[0].numpy(), np.full((2, 2), 3.0))  # not accumulated into
    h = kiln.ones(4, 2, requires_grad=True)
    y = h * 2
    y.retain_grad()
    (y + h).sum().backward()
    assert not np.shares_memory(h.grad.numpy(), y.grad.numpy())
