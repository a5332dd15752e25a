"""The optimizers' one-pass native updates (kiln.jit.optim_kernels) against the op-by-op path.

The native kernels do the op-by-op path's float32 operations in the same order, with the same
float32 roundings of the hyper-parameters, so the parameters and state must be bitwise equal
after every step; against torch.optim the tolerance is tests/optim's (rtol 1e-6, atol 1e-6).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.jit import optim_kernels  # noqa: E402

STEPS = 22
CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-3}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05}),
    ("SGD", {"lr": 1, "momentum": 1}),  # int hyper-parameters
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 3e-3, "weight_decay": 0.2}),
    # not native: fall back to the op-by-op path
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01, "maximize": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "maximize": True}),
]
SHAPES = [(37, 19), (5,), (), (0, 3), (1 << 15,)]  # the last one runs on several threads


def _ids(case):
    return case[0] + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def _grads(rng, shapes):
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(STEPS)]


def _run(name, kw, init, grads, *, grad_view=None):
    """Parameters and optimizer state after each step, as numpy copies."""
    ps = [kiln.tensor(a.copy(), requires_grad=True) for a in init]
    opt = getattr(kiln.optim, name)(ps, **kw)
    history = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = kiln.tensor(g) if grad_view is None else grad_view(g)
        opt.step()
        state = [{k: v.numpy().copy() for k, v in opt.state[p].items()} for p in ps]
        history.append(([p.detach().numpy().copy() for p in ps], state))
    return history


def _assert_same(got, ref):
    for (gp, gs), (rp, rs) in zip(got, ref):
        for a, b in zip(gp, rp):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(gs, rs):
            assert list(a) == list(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_native_equals_op_by_op(case, monkeypatch):
    name, kw = case
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = _grads(rng, SHAPES)
    monkeypatch.setattr(jit, "_available", False)
    ref = _run(name, kw, init, grads)
    monkeypatch.setattr(jit, "_available", True)
    optim_kernels._cache.clear()
    got = _run(name, kw, init, grads)
    _assert_same(got, ref)
    native = not (kw.get("amsgrad") or kw.get("maximize"))
    assert bool(optim_kernels._cache) == native


@pytest.mark.parametrize("case", CASES[:11], ids=[_ids(c) for c in CASES[:11]])
def test_native_matches_torch(case, monkeypatch):
    monkeypatch.setattr(jit, "_available", True)
    name, kw = case
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (1 << 15,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = _grads(rng, shapes)
    got = _run(name, kw, init, grads)
    tp = [torch.tensor(a, requires_grad=True) for a in init]
    topt = getattr(torch.optim, name)(tp, **kw)
    for step, gs in enumerate(grads):
        for p, g in zip(tp, gs):
            p.grad = torch.tensor(g)
        topt.step()
        for a, b in zip(got[step][0], tp):
            np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-6, atol=1e-6,
                                       err_msg=f"step {step + 1}")


@pytest.mark.parametrize("name, kw", [("Adam", {"lr": 0.01}), ("SGD", {"lr": 0.1,
                                                                       "momentum": 0.9})])
def test_fallbacks_for_unusual_arrays(name, kw, monkeypatch):
    """Non-contiguous gradients and float64 parameters take the op-by-op path, same results."""
    rng = np.random.default_rng(2)
    shapes = [(6, 8)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = _grads(rng, [(8, 6)])
    view = lambda g: kiln.tensor(g).t()  # noqa: E731
    monkeypatch.setattr(jit, "_available", False)
    ref = _run(name, kw, init, grads, grad_view=view)
    monkeypatch.setattr(jit, "_available", True)
    _assert_same(_run(name, kw, init, grads, grad_view=view), ref)
    init64 = [a.astype(np.float64) for a in init]
    grads64 = [[g.astype(np.float64).T for g in gs] for gs in grads]
    monkeypatch.setattr(jit, "_available", False)
    ref = _run(name, kw, init64, grads64)
    monkeypatch.setattr(jit, "_available", True)
    _assert_same(_run(name, kw, init64, grads64), ref)


@pytest.mark.parametrize("name, kw", [("Adam", {"lr": 0.01}), ("AdamW", {"lr": 0.01}),
                                      ("SGD", {"lr": 0.1, "momentum": 0.9})])
def test_version_counter_bumped(name, kw, monkeypatch):
    """A value saved for backward and then updated by step() is detected, as with p.sub_."""
    monkeypatch.setattr(jit, "_available", True)
    p = kiln.tensor(np.ones(4, np.float32), requires_grad=True)
    opt = getattr(kiln.optim, name)([p], **kw)
    for _ in range(2):  # the second step is native for SGD too (its buffer exists)
        (p * p).sum().backward()
        opt.step()
    v = p._version_counter
    y = (p * p).sum()
    p.grad = kiln.ones(4)
    opt.step()
    assert p._version_counter == v + 1
    for t in opt.state[p].values():
        assert t._version_counter > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("name, kw", [("Adam", {"lr": 0.01}), ("SGD", {"lr": 0.1,
                                                                       "momentum": 0.9})])
def test_compiled_step_matches_eager_native(name, kw, monkeypatch):
    """kiln.compile traces the op-by-op path; its steps agree with the native eager steps."""
    monkeypatch.setattr(jit, "_available", True)
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((8, 4)).astype(np.float32)
    xs = [kiln.tensor(rng.standard_normal((5, 8)).astype(np.float32)) for _ in range(6)]
    results = []
    for compiled in (False, True):
        w = kiln.tensor(w0.copy(), requires_grad=True)
        opt = getattr(kiln.optim, name)([w], **kw)

        def step(x, w=w, opt=opt):
            opt.zero_grad()
            loss = (x @ w).tanh().sum()
            loss.backward()
            opt.step()
            return loss

        f = kiln.compile(step) if compiled else step
        for x in xs:
            f(x)
        results.append(w.detach().numpy().copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)


def test_kiln_jit_0_keeps_numpy_and_never_loads_llvmlite():
    code = ("import sys, kiln\n"
            "w = kiln.ones(3, requires_grad=True)\n"
            "opt = kiln.optim.Adam([w])\n"
            "kiln.nn.functional.gelu(w).sum().backward()\n"
            "opt.step()\n"
            "print('llvmlite' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "KILN_JIT"}
    env["KILN_JIT"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
