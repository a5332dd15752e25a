"""Test helpers: check_op and check_exception compare Kiln with PyTorch (the oracle)."""

from __future__ import annotations

import numpy as np
import torch

import kiln
from kiln.dispatch import OBSERVERS

# Primitives whose forward (and VJP) a check_op call has compared with PyTorch.
FORWARD_CHECKED: set = set()
GRAD_CHECKED: set = set()


def rand(*shape, seed=0, low=-2.0, high=2.0, dtype=np.float32):
    """Seeded uniform test input."""
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def randn(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _to(lib, x, requires_grad):
    if isinstance(x, np.ndarray):
        if lib is torch:
            t = torch.tensor(x)
        else:
            t = kiln.tensor(x)
        if requires_grad and x.dtype.kind == "f":
            t.requires_grad_(True)
        return t
    return x


def _outputs(out):
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def _np(t):
    if isinstance(t, torch.Tensor):
        return t.detach().numpy()
    return t.detach().numpy()


def _dtype_name(t):
    return str(t.dtype).split(".")[-1]


def _graph_prims(tensors) -> set:
    seen, names = set(), set()
    stack = [t._node for t in tensors if getattr(t, "_node", None) is not None]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        names.add(n.prim.name)
        stack.extend(e for e in n.edges if isinstance(e, kiln.autograd.Node))
    return names


def check_op(fn, inputs, *, atol, rtol, grad=True, grad_atol=None, grad_rtol=None,
             torch_fn=None, check_dtype=True, seed=1):
    """Run ``fn(lib, *tensors)`` with lib=kiln and lib=torch and compare.

    Compares every output's shape, dtype and values, then backpropagates
    ``sum(out_i * w_i)`` (fixed random weights ``w_i``) through both and compares the gradient
    of every floating input.  Tolerances are stated by each caller.
    """
    torch_fn = torch_fn or fn
    k_in = [_to(kiln, x, grad) for x in inputs]
    t_in = [_to(torch, x, grad) for x in inputs]
    ran: list = []
    OBSERVERS.append(lambda prim, ins, attrs, out: ran.append(prim.name))
    try:
        k_out = _outputs(fn(kiln, *k_in))
    finally:
        OBSERVERS.pop()
    t_out = _outputs(torch_fn(torch, *t_in))
    assert len(k_out) == len(t_out), f"{len(k_out)} outputs vs torch's {len(t_out)}"
    for i, (k, t) in enumerate(zip(k_out, t_out)):
        assert isinstance(k, kiln.Tensor), f"output {i} is {type(k).__name__}, not a Tensor"
        assert tuple(k.shape) == tuple(t.shape), f"output {i}: shape {k.shape} vs {t.shape}"
        if check_dtype:
            assert _dtype_name(k) == _dtype_name(t), f"output {i}: {k.dtype} vs {t.dtype}"
        np.testing.assert_allclose(_np(k).astype(np.float64), _np(t).astype(np.float64),
                                   atol=atol, rtol=rtol, err_msg=f"output {i} differs")
    FORWARD_CHECKED.update(ran)
    if not grad:
        return k_out
    rng = np.random.default_rng(seed)
    k_loss, t_loss = 0, 0
    diff_outs = []
    for k, t in zip(k_out, t_out):
        if k.requires_grad and t.requires_grad:
            w = rng.uniform(0.5, 1.5, tuple(t.shape)).astype(_np(t).dtype)
            k_loss = k_loss + (k * kiln.tensor(w)).sum()
            t_loss = t_loss + (t * torch.tensor(w)).sum()
            diff_outs.append(k)
        else:
            assert k.requires_grad == t.requires_grad, (
                f"requires_grad {k.requires_grad} vs torch {t.requires_grad}")
    if not diff_outs:
        return k_out
    k_loss.backward()
    t_loss.backward()
    GRAD_CHECKED.update(_graph_prims(diff_outs))
    ga = atol if grad_atol is None else grad_atol
    gr = rtol if grad_rtol is None else grad_rtol
    for i, (k, t) in enumerate(zip(k_in, t_in)):
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            continue
        if t.grad is None:
            assert k.grad is None or not np.any(_np(k.grad)), f"input {i}: grad should be None"
            continue
        assert k.grad is not None, f"input {i}: kiln gave no gradient"
        np.testing.assert_allclose(_np(k.grad).astype(np.float64), _np(t.grad).astype(np.float64),
                                   atol=ga, rtol=gr, err_msg=f"gradient of input {i} differs")
    return k_out


def check_exception(fn, *, match=None):
    """``fn(lib)`` must raise the same exception class with kiln as with torch; the kiln
    message must match ``match`` (a regex), if given.  Returns the kiln exception."""
    import pytest

    with pytest.raises(Exception) as t_exc:
        fn(torch)
    with pytest.raises(Exception) as k_exc:
        fn(kiln)
    assert type(k_exc.value) is type(t_exc.value) or isinstance(k_exc.value, type(t_exc.value)), (
        f"kiln raised {type(k_exc.value).__name__}: {k_exc.value}; "
        f"torch raised {type(t_exc.value).__name__}: {t_exc.value}"
    )
    if match is not None:
        import re

        assert re.search(match, str(k_exc.value)), f"message {k_exc.value!r} !~ {match!r}"
    return k_exc.value


def mark_checked(prim_name: str) -> None:
    """For primitives PyTorch cannot check value-for-value (random ones): the calling test
    checked this primitive another way (statistics, finite differences)."""
    FORWARD_CHECKED.add(prim_name)
    GRAD_CHECKED.add(prim_name)
