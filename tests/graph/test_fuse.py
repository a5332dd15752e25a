"""Elementwise fusion: group structure, graph invariants and bitwise-equal results."""

import numpy as np
import pytest

from kiln.backends.interpreter import run
from kiln.graph.ir import Graph, format_graph, verify
from kiln.graph.passes.fuse import fuse
from kiln.graph.symbolic import Sym

F32 = np.float32


def _snapshot(g: Graph):
    """Everything a pass could mutate, by identity and value."""
    return (list(g.inputs), [(n, n.op, n.inputs, dict(n.attrs), n.shape) for n in g.nodes],
            dict(g.outputs), format_graph(g))


def _arrays(g: Graph, seed=0, env=None):
    rng = np.random.default_rng(seed)
    out = []
    for n in g.inputs:
        shape = tuple(d.value(env) if isinstance(d, Sym) else d for d in n.shape)
        if n.dtype == np.bool_:
            out.append(rng.random(shape) > 0.5)
        else:
            out.append(rng.standard_normal(shape).astype(n.dtype))
    return out


def _check_same(g: Graph, seed=0):
    """fuse(g) passes verify(), leaves g alone and gives bitwise-identical outputs."""
    before = _snapshot(g)
    f = fuse(g)
    assert _snapshot(g) == before
    verify(f)
    arrays = _arrays(g, seed)
    want, got = run(g, arrays), run(f, arrays)
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])  # same numpy calls: bitwise equal
    return f


def _fused(f: Graph):
    return [n for n in f.nodes if n.op == "fused"]


def test_chain_becomes_one_fused_node():
    g = Graph()
    x = g.add_input("x", (3, 4), F32)
    y = g.add_input("y", (4,), F32)
    a = g.add("mul", [x, y], loc="m.py:1")
    b = g.add("add", [a, y], loc="m.py:2")
    c = g.add("tanh", [b], loc="m.py:3")
    g.outputs["out"] = c
    f = _check_same(g)
    assert f.counts() == {"fused": 1}
    (n,) = f.nodes
    assert n.attrs["ops"] == "mul+add+tanh"
    assert n.inputs == (x, y)  # in order of first use, each once
    assert n.shape == (3, 4) and n.dtype == F32 and n.loc == "m.py:3"
    body = n.attrs["body"]
    assert [i.name for i in body.inputs] == ["in0", "in1"]
    assert [i.shape for i in body.inputs] == [(3, 4), (4,)]
    assert [m.op for m in body.nodes] == ["mul", "add", "tanh"]
    assert body.outputs == {"out": body.nodes[-1]}
    assert not set(body.nodes) & set(g.nodes)  # copies, not the outer nodes
    assert f.outputs == {"out": n}


def test_value_used_twice_splits_groups():
    g = Graph()
    x = g.add_input("x", (5,), F32)
    y = g.add_input("y", (5,), F32)
    a = g.add("exp", [x])  # two users: must not be computed inside both
    b = g.add("mul", [a, y])
    c = g.add("add", [a, x])
    g.outputs["out"] = g.add("sub", [b, c])
    f = _check_same(g)
    assert f.counts() == {"exp": 1, "fused": 1}
    assert f.nodes[0] is a
    (n,) = _fused(f)
    assert n.attrs["ops"] == "mul+add+sub"
    assert a in n.inputs
    assert "exp" not in [m.op for m in n.attrs["body"].nodes]


def test_same_user_twice_still_fuses():
    g = Graph()
    x = g.add_input("x", (5,), F32)
    t = g.add("tanh", [x])
    g.outputs["out"] = g.add("neg", [g.add("mul", [t, t])])
    f = _check_same(g)
    assert f.counts() == {"fused": 1}
    assert f.nodes[0].attrs["ops"] == "tanh+mul+neg"


def test_graph_outputs_are_not_swallowed():
    g = Graph()
    x = g.add_input("x", (2, 3), F32)
    a = g.add("neg", [x])
    b = g.add("exp", [a])  # an output, read again below
    c = g.add("tanh", [b])
    d = g.add("sin", [c])
    g.outputs["b"] = b
    g.outputs["d"] = d
    f = _check_same(g)
    assert f.counts() == {"fused": 2}
    first, second = f.nodes
    assert first.attrs["ops"] == "neg+exp" and second.attrs["ops"] == "tanh+sin"
    assert f.outputs == {"b": first, "d": second}
    assert second.inputs == (first,)


def test_single_node_groups_stay_plain():
    g = Graph()
    x = g.add_input("x", (3,), F32)
    a = g.add("exp", [x])
    g.outputs["a"] = a
    g.outputs["b"] = g.add("tanh", [a])
    f = _check_same(g)
    assert f.nodes == g.nodes  # nothing to fuse: the very same nodes


def test_matmul_reduce_and_views_break_groups():
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    w = g.add_input("w", (4, 4), F32)
    a = g.add("mul", [g.add("tanh", [x]), x])
    m = g.add("matmul", [a, w], {"ta": False, "tb": False})
    r = g.add("relu", [g.add("neg", [m])])
    s = g.add("sum", [r], {"axes": (1,), "keepdims": True})
    v = g.add("permute", [g.add("exp", [s])], {"dims": (1, 0)})
    g.outputs["out"] = g.add("add", [g.add("sin", [v]), x])
    f = _check_same(g)
    ops = [n.attrs.get("ops", n.op) for n in f.nodes]
    assert ops == ["tanh+mul", "matmul", "neg+relu", "sum", "exp", "permute", "sin+add"]


def test_consts_stay_outside_as_inputs():
    g = Graph()
    x = g.add_input("x", (3,), F32)
    two = g.add_const(np.array(2.0, F32))
    g.outputs["out"] = g.add("exp", [g.add("mul", [x, two])])
    f = _check_same(g)
    assert f.counts() == {"const": 1, "fused": 1}
    assert f.nodes[1].inputs == (x, two)


def test_fused_node_is_placed_after_all_its_inputs():
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    a = g.add("exp", [x])
    m = g.add("matmul", [x, x], {"ta": False, "tb": True})  # between the group's nodes
    b = g.add("add", [a, m])
    g.outputs["out"] = g.add("matmul", [b, x], {"ta": False, "tb": False})
    f = _check_same(g)
    assert [n.op for n in f.nodes] == ["matmul", "fused", "matmul"]
    assert f.nodes[1].inputs == (x, m)
    assert f.nodes[2].inputs[0] is f.nodes[1]  # the consumer now reads the fused node
    assert g.outputs["out"].inputs[0] is b  # ... through a copy: the original is untouched


def test_mixed_dtypes_and_where():
    g = Graph()
    x = g.add_input("x", (3, 2), F32)
    c = g.add("gt", [x, g.add_const(np.array(0.0, F32))])
    y = g.add("cast", [g.add("neg", [x])], {"dtype": np.dtype(np.float64)})
    z = g.add("cast", [x], {"dtype": np.dtype(np.float64)})
    g.outputs["out"] = g.add("where", [c, y, z])
    f = _check_same(g)
    (n,) = _fused(f)
    assert sorted(n.attrs["ops"].split("+")) == ["cast", "cast", "gt", "neg", "where"]
    assert n.dtype == np.float64


def test_dynamic_shapes():
    B = Sym("B")
    g = Graph()
    x = g.add_input("x", (B, 3), F32)
    a = g.add("tanh", [x], shape=(B, 3), dtype=F32)
    g.outputs["out"] = g.add("mul", [a, x], shape=(B, 3), dtype=F32)
    f = fuse(g)
    verify(f)
    assert f.counts() == {"fused": 1}
    assert f.nodes[0].attrs["body"].inputs[0].shape == (B, 3)
    for b in (1, 5):
        arrays = _arrays(g, env={"B": b})
        np.testing.assert_array_equal(run(f, arrays)["out"], run(g, arrays)["out"])


def test_fusing_twice_changes_nothing():
    g = Graph()
    x = g.add_input("x", (3,), F32)
    g.outputs["out"] = g.add("sin", [g.add("exp", [x])])
    f = fuse(g)
    assert fuse(f).nodes == f.nodes


_UNARY = ["tanh", "sin", "neg", "relu", "abs"]
_BINARY = ["add", "mul", "sub", "maximum"]


def _random_graph(rng) -> Graph:
    g = Graph()
    vals = [g.add_input("x", (4, 4), F32), g.add_input("y", (4,), F32)]
    for _ in range(int(rng.integers(3, 25))):
        k = rng.random()
        a = vals[int(rng.integers(len(vals)))]
        if k < 0.35:
            n = g.add(_UNARY[int(rng.integers(len(_UNARY)))], [a])
        elif k < 0.75:
            b = vals[int(rng.integers(len(vals)))]
            n = g.add(_BINARY[int(rng.integers(len(_BINARY)))], [a, b])
        elif k < 0.85 and a.shape == (4, 4):
            n = g.add("matmul", [a, a], {"ta": False, "tb": True})
        elif k < 0.92 and a.shape == (4, 4):
            n = g.add("sum", [a], {"axes": (0,), "keepdims": False})
        elif a.shape == (4, 4):
            n = g.add("permute", [a], {"dims": (1, 0)})
        else:
            continue
        vals.append(n)
    picks = rng.choice(len(vals) - 2, size=min(2, len(vals) - 2), replace=False) + 2
    g.outputs = {f"o{i}": vals[int(p)] for i, p in enumerate(picks)}
    g.outputs["last"] = vals[-1]
    return g


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs_keep_their_values(seed):
    g = _random_graph(np.random.default_rng(seed))
    f = _check_same(g, seed)
    # Each original computation runs exactly once: none dropped, none duplicated.
    sizes = [len(n.attrs["body"].nodes) if n.op == "fused" else 1 for n in f.nodes]
    assert sum(sizes) == len(g.nodes)
    for n in _fused(f):
        body = n.attrs["body"]
        assert len(body.nodes) >= 2
        inner = body.users()
        for m in body.nodes[:-1]:  # intermediate values feed exactly one node of the group
            assert len(set(inner[m])) == 1
