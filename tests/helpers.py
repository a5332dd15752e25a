"""Test helpers: check_op and check_exception compare Kiln with PyTorch (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
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
             torch_fn=None, check_dtype=True, seed=1, compiled=True):
    """Run ``fn(lib, *tensors)`` with lib=kiln and lib=torch and compare.

    Compares every output's shape, dtype and values, then backpropagates
    ``sum(out_i * w_i)`` (fixed random weights ``w_i``) through both and compares the gradient
    of every floating input.  Tolerances are stated by each caller.  Then, unless
    ``compiled=False`` (give the reason at the call), ``check_compiled`` checks that
    ``kiln.compile`` of the same computation replays it exactly.
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
        if compiled:
            check_compiled(fn, inputs, grad=grad, seed=seed)
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
        if compiled:
            check_compiled(fn, inputs, grad=grad, seed=seed)
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
    if compiled:
        check_compiled(fn, inputs, grad=grad, seed=seed)
    return k_out


# Compiled vs eager kiln run the same numpy code on the same values, so only reassociation in
# fused or generated code may differ: a few ulps.
COMPILED_TOL = {"float64": (1e-12, 1e-12), "float32": (1e-6, 1e-6), "float16": (1e-3, 1e-3)}

# Ops whose output shape or validity depends on the input values raise TraceError while
# tracing; these are the phrases of the documented reasons check_compiled accepts.
DOCUMENTED_TRACE_ERRORS = ("depends on the values", "would draw its numbers once")

# Primitive names the compile check ran through, and the functions it could not compile
# because the test's own code reads tensor values (``.numpy()`` inside ``fn``).
COMPILE_CHECKED: set = set()
COMPILE_SKIPPED: list = []

_VALUE_READS = {"numpy", "item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                "__array__"}


def _permuted(inputs, seed):
    """The inputs with every float array's values shuffled (same shape, dtype and domain)."""
    rng = np.random.default_rng(1000 + seed)
    out = []
    for x in inputs:
        if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size > 1:
            x = rng.permutation(x.reshape(-1)).reshape(x.shape)
        out.append(x.copy() if isinstance(x, np.ndarray) else x)
    return out


def _leaves(root, first) -> list:
    """``first`` (the inputs that require grad), then every other leaf that requires grad in
    ``root``'s autograd graph (parameters, buffers), in a deterministic walk order."""
    seen, out = {id(t) for t in first}, list(first)
    stack, visited = [root._node] if root._node is not None else [], set()
    while stack:
        n = stack.pop()
        if id(n) in visited:
            continue
        visited.add(id(n))
        for e in reversed(n.edges):
            if isinstance(e, kiln.autograd.Node):
                stack.append(e)
            elif e is not None and id(e) not in seen:
                seen.add(id(e))
                out.append(e)
    return out


def _step(fn, grad, seed):
    """fn's outputs and the gradients of the weighted-sum loss, as one function of the inputs.
    ``autograd.grad`` returns the gradients of every leaf (inputs, then parameters the function
    reads) without accumulating into ``.grad``, so the caller's parameters are left alone."""

    def step(*xs):
        outs = _outputs(fn(kiln, *xs))
        rng = np.random.default_rng(seed)
        loss = None
        for o in outs if grad else ():
            if o.requires_grad:
                w = rng.uniform(0.5, 1.5, tuple(o.shape)).astype(o._data.dtype)
                term = (o * kiln.tensor(w)).sum()
                loss = term if loss is None else loss + term
        if loss is None:
            return tuple(outs), ()
        ins = [x for x in xs if isinstance(x, kiln.Tensor) and x.requires_grad]
        leaves = _leaves(loss, ins)
        grads = kiln.autograd.grad(loss, leaves, allow_unused=True)
        # a gradient can be a view of a view of a value computed in the trace; kiln.compile
        # follows one level of ._base when it checks for escaped tensors (reported)
        return tuple(outs), tuple(g if g is None else g.clone() for g in grads)

    return step


def _same(got, want, what):
    if want is None:
        assert got is None, f"{what}: compiled gave a tensor, eager gave None"
        return
    assert got is not None, f"{what}: compiled gave None, eager gave a tensor"
    g, w = _np(got), _np(want)
    assert g.shape == w.shape, f"{what}: compiled shape {g.shape} vs eager {w.shape}"
    assert g.dtype == w.dtype, f"{what}: compiled dtype {g.dtype} vs eager {w.dtype}"
    if w.dtype.kind in "fc":
        atol, rtol = COMPILED_TOL[str(w.dtype)]
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=f"{what} differs")
    else:
        np.testing.assert_array_equal(g, w, err_msg=f"{what} differs")


def _reads_in_fn(exc) -> bool:
    """The TraceError comes from the test's own code reading a value (``x.numpy()``), not from
    inside kiln: such a function cannot be compiled as written."""
    import os

    kiln_dir = os.path.dirname(os.path.abspath(kiln.__file__)) + os.sep
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    outside = [i for i, c in enumerate(frames) if not c.co_filename.startswith(kiln_dir)]
    if not outside or outside[-1] + 1 >= len(frames):
        return False
    nxt = frames[outside[-1] + 1]
    return nxt.co_filename.endswith(os.sep + "tensor.py") and nxt.co_name in _VALUE_READS


class _StateGuard:
    """Saves every tensor kiln.compile captures (parameters, buffers, running statistics) when
    the tracer first meets it, and the random state; ``restore`` puts them back, so the compile
    check leaves the caller's state as the eager check left it."""

    def __enter__(self):
        from kiln.graph.capture import Tracer

        self.saved = {}
        self.rng = kiln.random.default_generator.get_state()
        self.orig = orig = Tracer.node_of
        saved = self.saved

        def node_of(tracer, t):
            if id(t) not in tracer.values and id(t) not in tracer.created and id(t) not in saved:
                saved[id(t)] = (t, np.array(t._data), t._version[0])
            return orig(tracer, t)

        Tracer.node_of = node_of
        return self

    def __exit__(self, *exc):
        from kiln.graph.capture import Tracer

        Tracer.node_of = self.orig
        for t, data, version in self.saved.values():
            if t._data.flags.writeable:
                np.copyto(t._data, data)
            t._version[0] = version
        kiln.random.default_generator.set_state(self.rng)
        return False


def _make_np(t):
    return kiln.tensor(np.array(t._data))


def check_compiled(fn, inputs, *, grad=True, seed=1):
    """``kiln.compile`` of fn + weighted-sum loss + gradients, traced on the inputs and replayed
    on shuffled inputs, must equal eager kiln on the shuffled inputs under the same random
    state (outputs, gradients of the inputs and of the parameters fn reads, and the inputs
    themselves, which in-place ops may write).  Tolerances: COMPILED_TOL.  An op may instead
    refuse to trace with a documented TraceError (DOCUMENTED_TRACE_ERRORS).
    """
    from kiln.graph.capture import TraceError

    step = _step(fn, grad, seed)
    if not grad:  # outputs may still require grad (parameters): compile for inference
        step = kiln.no_grad()(step)
    compiled = kiln.compile(step)
    first = [_to(kiln, x.copy() if isinstance(x, np.ndarray) else x, grad) for x in inputs]
    ran: list = []
    with _StateGuard() as guard:
        OBSERVERS.append(lambda prim, ins, attrs, out: ran.append(prim.name))
        try:
            compiled(*first)
        except TraceError as e:
            if _reads_in_fn(e):
                COMPILE_SKIPPED.append(str(e))
                return
            assert any(p in str(e) for p in DOCUMENTED_TRACE_ERRORS), (
                f"kiln.compile refused to trace with an undocumented reason: {e}")
            return
        finally:
            OBSERVERS.pop()
        shuffled = _permuted(inputs, seed)
        c_in = [_to(kiln, x.copy() if isinstance(x, np.ndarray) else x, grad) for x in shuffled]
        e_in = [_to(kiln, x.copy() if isinstance(x, np.ndarray) else x, grad) for x in shuffled]
        state = kiln.random.default_generator.get_state()
        captured = [t for t, _, _ in guard.saved.values() if t._data.flags.writeable]
        before = [np.array(t._data) for t in captured]
        c_outs, c_grads = compiled(*c_in)
        assert len(compiled.entries) == 1 and not compiled.entries[0].eager, (
            "the second call did not replay the compiled graph: " + "; ".join(compiled.history)
            + "".join(f" ({e.reason})" for e in compiled.entries if e.eager))
        c_state = [_make_np(t) for t in captured]
        for t, a in zip(captured, before):  # the eager run starts from the same state
            np.copyto(t._data, a)
        kiln.random.default_generator.set_state(state)
        e_outs, e_grads = step(*e_in)
        for i, (t, c) in enumerate(zip(captured, c_state)):
            _same(c, _make_np(t), f"captured tensor {i} {tuple(t.shape)} after the call")
    assert len(c_outs) == len(e_outs) and len(c_grads) == len(e_grads)
    for i, (c, e) in enumerate(zip(c_outs, e_outs)):
        _same(c, e, f"compiled output {i}")
    for i, (c, e) in enumerate(zip(c_grads, e_grads)):
        _same(c, e, f"compiled gradient {i} (inputs first, then parameters)")
    for i, (c, e) in enumerate(zip(c_in, e_in)):
        if isinstance(e, kiln.Tensor):
            _same(c, e, f"input {i} after the compiled call")
    COMPILE_CHECKED.update(ran)


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


def workload_forward(name: str):
    """(the bench workload's forward as a function of its input, closing over the spec's
    parameters as kiln tensors; the bench.workloads module)."""
    from bench import workloads as W

    p = {k: kiln.tensor(v) for k, v in W.params(name).items()}
    return (lambda x: W.FORWARD[name](kiln, p, x)), W


def flat_arrays(obj) -> list:
    """The NumPy arrays of a tensor or a nested tuple/list of tensors (None skipped)."""
    if isinstance(obj, kiln.Tensor):
        return [obj.numpy()]
    if obj is None:
        return []
    return [a for x in obj for a in flat_arrays(x)]


def assert_close_scaled(got, want, rtol: float = 1e-5) -> None:
    """Same shape and dtype, max abs difference <= rtol * max(1, max |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = rtol * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def assert_outputs_close(got, want, rtol: float = 1e-5) -> None:
    """As many outputs as expected, each within ``assert_close_scaled``."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close_scaled(g, w, rtol)


def example_module(name: str):
    """examples/<name>.py imported as a module (once per process)."""
    import importlib.util
    import os
    import sys

    key = f"_kiln_example_{name}"
    if key not in sys.modules:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(key, os.path.join(root, "examples",
                                                                        f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def native_and_numpy(monkeypatch, f):
    """``(f() with kiln.jit's native kernels, f() with the numpy path)``."""
    import kiln.jit

    got = f()
    monkeypatch.setattr(kiln.jit, "_available", False)
    want = f()
    monkeypatch.setattr(kiln.jit, "_available", True)
    return got, want


def compiled_softmax_step_matches_eager(model, x, steps: int = 3):
    """The step ``(softmax(model(x)) * arange).sum()`` with its backward, eager and under
    kiln.compile ``steps`` times: the compiled loss and gradients must match eager's. Returns
    the compiled step."""

    def step(x):
        model.zero_grad()
        y = model(x)
        loss = (y.softmax(-1) * kiln.arange(float(y.shape[-1]))).sum()
        loss.backward()
        return loss

    compiled = kiln.compile(step)
    for _ in range(steps):
        want = step(x).item()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        assert compiled(x).item() == pytest.approx(want, rel=1e-6)
        for p, g in zip(model.parameters(), grads):
            np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-5, atol=1e-6)
    return compiled
