"""Dynamic batch through batch-sized constants and tensors cached between calls.

kiln.compile merges the traces at two batch sizes into one graph with a symbol ``B``.  An RNN's
zero initial state ``zeros(layers, B, H)`` is a constant whose shape follows the batch: unify
turns two such one-value constants into a scalar constant expanded to ``(layers, B, H)``.  A
tensor made on the first call and kept for later calls (the causal mask cache of
scaled_dot_product_attention) is captured as an input from the first trace on, as later traces
see it.  Oracle: eager Kiln, max abs diff <= 1e-5 * max(1, max|out|)."""

import numpy as np
import pytest

import kiln
from kiln import nn
from kiln.graph.ir import Graph
from kiln.graph.symbolic import CannotUnify, Sym
from kiln.graph.unify import unify
from kiln.nn import attention
from tests.helpers import assert_close_scaled, assert_outputs_close, flat_arrays


RNNS = {
    "LSTM 2 layers": lambda: nn.LSTM(4, 6, num_layers=2, batch_first=True),
    "LSTM bidirectional": lambda: nn.LSTM(4, 5, bidirectional=True, batch_first=True),
    "GRU": lambda: nn.GRU(4, 6, num_layers=2, batch_first=True),
    "RNN tanh": lambda: nn.RNN(4, 6, batch_first=True),
}


@pytest.mark.parametrize("backend", ["codegen", "interpreter"])
@pytest.mark.parametrize("name", list(RNNS))
def test_rnn_one_graph_for_every_batch(name, backend):
    model = RNNS[name]().eval()
    f = kiln.compile(model, dynamic=True, backend=backend)
    with kiln.no_grad():
        for b in (5, 3, 8):
            x = kiln.randn(b, 7, 4)
            assert_outputs_close(flat_arrays(f(x)), flat_arrays(model(x)))
    assert len(f.entries) == 1 and f.entries[0].sizes == {"B": (5, 3)}
    assert len(f.history) == 2, f.history  # batch 8: no recompile
    assert "dimension 0 is now dynamic" in f.history[1]
    # the zero initial state: a scalar constant expanded to a shape with the batch symbol
    expands = [n for n in f.entries[0].traced.nodes if n.op == "expand"
               and n.inputs[0].op == "const" and n.inputs[0].shape == ()]
    assert expands and all(isinstance(n.shape[1], Sym) for n in expands)


def test_rnn_training_step_dynamic():
    """Forward, backward and SGD in one compiled step over an LSTM: one graph, eager values.
    (The loss is a sum: the backward of ``.mean()`` over the batch divides by a count that is a
    batch-dependent constant, which still keeps one graph per size.)"""
    def setup():
        kiln.manual_seed(1)
        m = nn.LSTM(3, 4, batch_first=True)
        return m, kiln.optim.SGD(m.parameters(), lr=0.1)

    def step_of(m, opt):
        def step(x):
            opt.zero_grad()
            loss = m(x)[0].square().sum() * 0.01
            loss.backward()
            opt.step()
            return loss
        return step

    m1, o1 = setup()
    m2, o2 = setup()
    eager, comp = step_of(m1, o1), kiln.compile(step_of(m2, o2), dynamic=True)
    for b in (5, 3, 8, 3):
        x = kiln.randn(b, 6, 3)
        assert_close_scaled(comp(x).detach().numpy(), eager(x).detach().numpy())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert_close_scaled(q.detach().numpy(), p.detach().numpy())
    assert len(comp.entries) == 1 and len(comp.history) == 2


def _const_graph(value, n):
    """x: f32[n] -> the constant ``value`` (as traced at batch size n)."""
    g = Graph()
    g.add_input("x", (n,), np.float32)
    g.outputs["out0"] = g.add_const(value)
    return g


def test_unify_uniform_constants():
    a = _const_graph(np.full((5, 2), 0.5, np.float32), 5)
    b = _const_graph(np.full((3, 2), 0.5, np.float32), 3)
    g = unify(a, b, "B", 5, 3)
    out = g.outputs["out0"]
    assert out.op == "expand" and out.shape == (Sym("B"), 2)
    assert out.attrs["shape"] == (Sym("B"), 2)
    (c,) = out.inputs
    assert c.op == "const" and c.shape == () and c.attrs["value"] == np.float32(0.5)
    from kiln.backends import interpreter

    got = interpreter.run(g, [np.zeros(4, np.float32)])["out0"]
    np.testing.assert_array_equal(got, np.full((4, 2), 0.5, np.float32))


@pytest.mark.parametrize("va, vb, why", [
    (np.arange(5, dtype=np.float32), np.arange(3, dtype=np.float32), "one value repeated"),
    (np.full(5, 5.0, np.float32), np.full(3, 3.0, np.float32), "one value repeated"),
    (np.full(2, 5.0, np.float32), np.full(2, 3.0, np.float32), "same shape"),
    (np.zeros(25, np.float32), np.zeros(10, np.float32), "not a linear function"),
])
def test_unify_refuses_other_constants(va, vb, why):
    with pytest.raises(CannotUnify, match=why):
        unify(_const_graph(va, 5), _const_graph(vb, 3), "B", 5, 3)


def test_batch_dependent_constant_keeps_two_graphs():
    """An arange over the batch cannot become one graph: compile keeps one per size, and stays
    right."""
    def f(x):
        return x * kiln.arange(x.shape[0], dtype=kiln.float32)[:, None]

    cf = kiln.compile(f)
    for b in (5, 3, 5, 3):
        x = kiln.randn(b, 2)
        assert_close_scaled(cf(x).numpy(), f(x).numpy())
    assert len(cf.entries) == 2 and not any(e.sizes for e in cf.entries)


def test_cached_causal_mask_is_state():
    """The causal mask cached by the first call's trace is an input from the first trace on,
    so the trace at another batch size merges with it."""
    attention._CAUSAL.clear()

    def f(q):
        scores = q @ q.transpose(-2, -1)
        return scores.masked_fill(attention._causal_mask(q.shape[-2], q.shape[-2]), 0.0)

    cf = kiln.compile(f, dynamic=True)
    for b in (5, 3, 8):
        q = kiln.randn(b, 2, 6, 4)
        assert_close_scaled(cf(q).numpy(), f(q).numpy())
    assert len(cf.entries) == 1 and len(cf.history) == 2, cf.history
    mask = attention._CAUSAL[(6, 6)]
    assert any(t is mask for t in cf.entries[0].captured)


def test_tensor_cached_on_first_call_is_read_by_reference():
    """A tensor made during the first trace and kept (a lazily built buffer) is read at every
    run, as eager reads it, rather than frozen as a constant."""
    cache: dict = {}

    def f(x):
        if "w" not in cache:
            cache["w"] = kiln.ones(3)
        return x * cache["w"]

    cf = kiln.compile(f, dynamic=True)
    x = kiln.randn(4, 3)
    assert_close_scaled(cf(x).numpy(), x.numpy())
    cache["w"].mul_(2.0)  # changed outside: the compiled function sees it, as eager does
    assert_close_scaled(cf(x).numpy(), 2 * x.numpy())
    x = kiln.randn(6, 3)
    assert_close_scaled(cf(x).numpy(), 2 * x.numpy())
    assert len(cf.entries) == 1 and cf.entries[0].sizes


def test_temporary_constants_stay_constants():
    def f(x):
        return x + kiln.full((3,), 2.0)

    cf = kiln.compile(f)
    x = kiln.randn(4, 3)
    assert_close_scaled(cf(x).numpy(), f(x).numpy())
    g = cf.graph(optimized=False)
    assert [n.kind for n in g.inputs] == ["arg"]
    assert any(n.op == "const" for n in g.nodes)


@pytest.mark.parametrize("backend", ["codegen", "interpreter"])
def test_batch_sized_constant_output_is_a_fresh_array(backend):
    """A returned zeros(B, 3) is writable and not shared between calls, as in eager."""
    def f(x):
        return x * 2, kiln.zeros(x.shape[0], 3)

    cf = kiln.compile(f, dynamic=True, backend=backend)
    for b in (5, 3, 8, 8):
        out, z = cf(kiln.randn(b, 2))
        np.testing.assert_array_equal(z.numpy(), np.zeros((b, 3), np.float32))
        z.add_(1.0)  # raises on a read-only (broadcast) view; must not leak into the next call
    assert len(cf.entries) == 1 and len(cf.history) == 2


def test_a_size_that_is_not_linear_in_the_batch_gets_its_own_graph():
    """x[: n // 2] is 2 at batch 4 and 5: the dynamic graph would freeze it; every new size
    is checked once against a fresh trace, and one that does not fit is compiled on its own."""
    f = kiln.compile(lambda x: x[: x.shape[0] // 2] * 2.0)
    for n in (4, 5, 8, 8, 6, 9):
        x = kiln.randn(n, 3)
        y = f(x)
        np.testing.assert_array_equal(y.numpy(), x.numpy()[: n // 2] * 2.0)
    assert f.misfit is not None and f.misfit[0] in (8, 6, 9)
    assert any("batch size 8 does not fit the dynamic graph" in h for h in f.history)


def test_linear_graphs_check_each_new_size_once():
    f = kiln.compile(lambda x: (x * 2).reshape(-1))
    for n in (4, 5, 8, 8, 6, 8):
        np.testing.assert_array_equal(f(kiln.ones(n, 3)).numpy(), np.full(3 * n, 2.0))
    assert len(f.history) == 2 and f.misfit is None
    assert len(f.entries) == 1 and f.entries[0].verified == {4, 5, 6, 8}
