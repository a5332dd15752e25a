"""What kiln.compile keeps, and makes, on the way to a graph: the first value of state created
during a trace is not copied unless it is needed, the trace runs elementwise ops with numpy
(no eager native kernels compiled for one run), and a graph's fused kernels are compiled as one
LLVM module whose code stays valid once its IR is freed."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
import kiln.jit
from kiln.grad_mode import STATE
from kiln.graph.capture import Tracer


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


# -- first values of tensors created during the trace -------------------------------------------

def _trace_created(value: np.ndarray, write):
    """Trace: make a tensor from ``value``, read it, then ``write`` it in place; returns the
    tracer, the tensor and the input node standing for its first value."""
    tracer = Tracer("t")
    STATE.tracer = tracer
    try:
        t = kiln.from_numpy(value)
        y = t * 2.0  # the first read
        write(t)
    finally:
        STATE.tracer = None
    return tracer, t, tracer.pending[id(t)][1], y


def test_zero_state_written_in_place_is_not_copied():
    tracer, t, n, _ = _trace_created(np.zeros((64, 32), np.float32), lambda t: t.add_(1.0))
    assert n.attrs["value"].strides == (0, 0)  # a view of one zero, not a copy
    assert np.array_equal(t.numpy(), np.ones((64, 32), np.float32))
    allowed = {id(t)}
    tracer.settle(allowed)  # t lives on: state read by reference from the next run
    assert n.kind == "captured" and n.attrs == {}


def test_first_value_kept_when_a_temporary_is_written_after_its_read():
    for value in (np.zeros(5, np.float32), np.full(5, -0.0, np.float32),
                  np.arange(5, dtype=np.float32)):
        tracer, t, n, _ = _trace_created(value.copy(), lambda t: t.mul_(3.0))
        t = None  # noqa: F841 - the temporary dies before the trace ends
        tracer.settle(set())
        const = n.attrs["value"]
        assert n.op == "const" and const.flags.writeable and const.strides == (4,)
        assert np.array_equal(_bits(const), _bits(value))  # -0.0 stays -0.0


def test_unwritten_constant_does_not_alias_the_callers_array():
    src = np.arange(6, dtype=np.float32)
    tracer, t, n, _ = _trace_created(src, lambda t: None)
    t = None  # noqa: F841
    tracer.settle(set())
    src[:] = -1  # changing the array after the trace does not change the graph's constant
    assert np.array_equal(n.attrs["value"], np.arange(6, dtype=np.float32))


def test_compiled_adam_step_matches_eager():
    def make():
        kiln.manual_seed(0)
        model = kiln.nn.Linear(64, 32)
        opt = kiln.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt

    x = kiln.randn(16, 64)

    def run(compiled: bool):
        model, opt = make()

        def step(x):
            opt.zero_grad()
            loss = (model(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        f = kiln.compile(step) if compiled else step
        losses = [f(x).item() for _ in range(4)]
        return losses, model.weight.detach().numpy().copy()

    (le, we), (lc, wc) = run(False), run(True)
    np.testing.assert_allclose(lc, le, rtol=1e-6)
    np.testing.assert_allclose(wc, we, rtol=1e-6, atol=1e-7)


# -- native kernels ------------------------------------------------------------------------------

@pytest.fixture
def jit(monkeypatch):
    pytest.importorskip("llvmlite")
    if not kiln.jit.available():
        pytest.skip("kiln.jit is off")
    from kiln.backends import jit_fused
    from kiln.jit import engine, expr

    monkeypatch.setattr(jit_fused, "MIN_WORK", 1)  # small groups take the native path too
    monkeypatch.setattr(expr, "_cache", {})  # kernels this test compiles itself
    modules = []
    compile_module = engine.compile_module

    def recording(mod, signatures):
        modules.append((mod.name, sorted(signatures)))
        return compile_module(mod, signatures)

    monkeypatch.setattr(engine, "compile_module", recording)
    return modules


def test_trace_runs_elementwise_ops_without_eager_kernels(jit, monkeypatch):
    from kiln.ops import elementwise

    calls = []

    def record(op, arrays):
        calls.append(STATE.tracer is not None)
        return None  # numpy computes

    monkeypatch.setattr(elementwise, "_eager_run", [record])
    x = kiln.randn(300, 300)
    f = kiln.compile(lambda x: (x + x) * x)
    f(x)
    assert True not in calls
    (x + x).numpy()  # eager mode still asks for its native kernel
    assert calls and calls[-1] is False


def test_fused_kernels_of_a_graph_share_one_module(jit):
    w = kiln.randn(24, 24)

    def fn(x):
        h = ((x - 3.0) * x).relu()
        return ((h @ w) * 0.5 - h).abs()

    x = kiln.randn(8, 24)
    want = fn(x).numpy()
    f = kiln.compile(fn)
    f(x)
    fused = [names for name, names in jit if name.startswith("fused_")]
    assert len(fused) == 1 and len(fused[0]) == 2  # both groups, one module
    assert not [name for name, _ in jit if name.startswith("fz_")]
    for _ in range(2):  # the native code runs after its IR module was freed
        assert np.array_equal(_bits(f(x).numpy()), _bits(want))


def test_batch_compiles_kernels_together_and_they_stay_valid(jit):
    from kiln.jit import expr as X

    batch = X.Batch("two")
    k1 = X.kernel("t_sub_mul", 2, lambda a, b: (a - b) * b, batch=batch)
    k2 = X.kernel("t_div_add", 2, lambda a, b: a / b + a, batch=batch)
    assert k1.fn is None and k2.fn is None
    batch.compile()
    assert [sorted(n) for _, n in jit] == [sorted([k1.name, k2.name])]
    a = np.linspace(-2, 2, 1000, dtype=np.float32)
    b = np.linspace(1, 3, 1000, dtype=np.float32)
    out = np.empty_like(a)
    k1([out], [a, b])
    assert np.array_equal(out, (a - b) * b)
    k2([out], [a, b])
    assert np.array_equal(out, a / b + a)


def test_batch_drops_a_kernel_whose_code_cannot_be_generated(jit):
    from kiln.jit import expr as X

    batch = X.Batch("partial")
    ok = X.kernel("t_ok", 1, lambda a: a * a + 1.0, batch=batch)
    with pytest.raises(ValueError, match="no native code"):
        X.kernel("t_bad", 1, lambda a: X.Expr("nosuchop", (a,)), batch=batch)
    batch.compile()  # the module holds only the kernel that was built
    a = np.arange(100, dtype=np.float32)
    out = np.empty_like(a)
    ok([out], [a])
    assert np.array_equal(out, a * a + 1.0)
