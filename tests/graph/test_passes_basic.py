"""Tests of the basic graph passes: dce, cse, fold and simplify, on hand-built graphs run by
the reference interpreter before and after."""

import numpy as np
import pytest

import kiln
from kiln.backends.interpreter import run
from kiln.graph.ir import Graph, verify
from kiln.graph.passes.cse import CONST_MERGE_LIMIT, Unkeyable, attr_key, cse
from kiln.graph.passes.dce import dce, is_random
from kiln.graph.passes.fold import FOLD_LIMIT, fold
from kiln.graph.passes.simplify import simplify
from kiln.graph.symbolic import Sym
from kiln.ops.index import Slice
from kiln.ops.registry import REGISTRY, Primitive

F32 = np.float32


# -- helpers -------------------------------------------------------------------------------------

def snapshot(g: Graph):
    """Everything a pass could mutate in ``g``, by identity and by value."""
    def key(v):
        try:
            return attr_key(v)
        except Unkeyable:
            return None  # the id still catches a replaced value

    def node_state(n):
        attrs = tuple((k, id(v), key(v)) for k, v in n.attrs.items())
        return (id(n), n.op, tuple(id(i) for i in n.inputs), id(n.attrs), attrs, n.shape,
                n.dtype, n.loc)
    return (str(g), [node_state(n) for n in g.inputs], [node_state(n) for n in g.nodes],
            {k: id(v) for k, v in g.outputs.items()}, id(g.inputs), id(g.nodes), id(g.outputs))


def apply_pass(p, g: Graph) -> Graph:
    """Run pass ``p``; check that ``g`` is untouched and the result verifies."""
    before = snapshot(g)
    out = p(g)
    assert snapshot(g) == before, f"{p.__name__} mutated its input graph"
    assert out is not g
    verify(out)
    return out


def assert_same_results(g1: Graph, g2: Graph, arrays, bitwise=False):
    r1, r2 = run(g1, arrays), run(g2, arrays)
    assert r1.keys() == r2.keys()
    for k in r1:
        a, b = np.asarray(r1[k]), np.asarray(r2[k])
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if bitwise:
            assert a.tobytes() == b.tobytes(), k
        else:
            assert np.array_equal(a, b), k


def rand(*shape, dtype=F32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


SPECIAL = np.array([-0.0, 0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 3.5, -2.25, 1e38], F32)


# -- dce -----------------------------------------------------------------------------------------

def test_dce_removes_dead_nodes_and_consts_keeps_inputs():
    g = Graph()
    x = g.add_input("x", (3, 4), F32)
    unused = g.add_input("unused", (2,), F32)
    c = g.add_const(np.full((4,), 2.0, F32))
    dead = g.add("mul", [x, c])
    g.add("exp", [dead])
    y = g.add("neg", [x])
    g.outputs["y"] = y
    out = apply_pass(dce, g)
    assert out.nodes == [y]
    assert out.inputs == [x, unused]
    assert out.outputs == {"y": y}
    args = [rand(3, 4), rand(2)]
    assert_same_results(g, out, args)


def test_dce_keeps_everything_an_output_needs():
    g = Graph()
    x = g.add_input("x", (3,), F32)
    a = g.add("exp", [x])
    b = g.add("neg", [a])
    g.add("sin", [b])  # dead
    g.outputs["b"] = b
    g.outputs["a"] = a
    g.outputs["x"] = x  # an output may be an input
    out = apply_pass(dce, g)
    assert [n.op for n in out.nodes] == ["exp", "neg"]
    assert_same_results(g, out, [rand(3)])


def test_dce_empty_and_already_minimal():
    g = Graph()
    x = g.add_input("x", (2,), F32)
    g.outputs["x"] = x
    assert apply_pass(dce, g).nodes == []
    g.outputs["y"] = g.add("exp", [x])
    out = apply_pass(dce, g)
    assert out.nodes == g.nodes


def _dropout_graph(keep_dead: bool) -> Graph:
    g = Graph()
    x = g.add_input("x", (64,), F32)
    sx = g.add("sin", [x])  # read only by the dead random node
    if keep_dead:
        g.add("dropout_mask", [sx], {"p": 0.5, "shape": (64,)})
    live = g.add("dropout_mask", [x], {"p": 0.5, "shape": (64,)})
    g.outputs["y"] = g.add("mul", [x, live])
    return g


def test_dce_keeps_dead_random_nodes_to_preserve_the_stream():
    g = _dropout_graph(keep_dead=True)
    out = apply_pass(dce, g)
    assert out.counts() == {"sin": 1, "dropout_mask": 2, "mul": 1}
    x = [rand(64) + 5]
    kiln.manual_seed(7)
    want = run(g, x)["y"]
    kiln.manual_seed(7)
    got = run(out, x)["y"]
    assert np.array_equal(want, got)
    # Dropping the dead draw would change the live mask: the rule above is what keeps it.
    kiln.manual_seed(7)
    without = run(_dropout_graph(keep_dead=False), x)["y"]
    assert not np.array_equal(want, without)


def test_dce_keeps_dead_fused_node_with_random_body():
    body = Graph()
    i = body.add_input("in0", (8,), F32)
    body.outputs["out"] = body.add("dropout_mask", [i], {"p": 0.5, "shape": (8,)})
    g = Graph()
    x = g.add_input("x", (8,), F32)
    fused = g.add("fused", [x], {"body": body}, shape=(8,), dtype=F32)
    g.outputs["y"] = g.add("exp", [x])
    assert is_random(fused)
    assert not is_random(g.outputs["y"])
    out = apply_pass(dce, g)
    assert out.counts() == {"fused": 1, "exp": 1}


# -- cse -----------------------------------------------------------------------------------------

def test_cse_merges_identical_nodes_transitively():
    g = Graph()
    x = g.add_input("x", (3, 4), F32)
    w = g.add_input("w", (4,), F32)
    e1 = g.add("exp", [x])
    e2 = g.add("exp", [x])
    m1 = g.add("mul", [e1, w])
    m2 = g.add("mul", [e2, w])  # the same once e2 is e1
    m3 = g.add("mul", [w, e1])  # operand order differs: not merged
    s = g.add("add", [m1, m2])
    g.outputs["s"] = s
    g.outputs["m2"] = m2
    g.outputs["m3"] = m3
    out = apply_pass(cse, g)
    assert out.counts() == {"exp": 1, "mul": 2, "add": 1}
    assert out.outputs["m2"] is m1
    assert out.outputs["s"].inputs == (m1, m1)
    assert_same_results(g, out, [rand(3, 4), rand(4, seed=1)])


def test_cse_compares_attrs():
    g = Graph()
    x = g.add_input("x", (3, 4), F32)
    a = g.add("sum", [x], {"axes": (0,), "keepdims": False})
    b = g.add("sum", [x], {"axes": (0,), "keepdims": False})
    c = g.add("sum", [x], {"axes": (1,), "keepdims": False})
    d = g.add("sum", [x], {"axes": (0,), "keepdims": True})
    i1 = g.add("index_view", [x], {"index": (Slice(1, 3, 1), None)})
    i2 = g.add("index_view", [x], {"index": (Slice(1, 3, 1), None)})
    i3 = g.add("index_view", [x], {"index": (Slice(0, 3, 1), None)})
    i4 = g.add("index_view", [x], {"index": ((1, 3, 1), None)})  # a tuple is not a Slice
    for k, n in dict(a=a, b=b, c=c, d=d, i1=i1, i2=i2, i3=i3).items():
        g.outputs[k] = n
    assert attr_key(i4.attrs) != attr_key(i1.attrs)
    out = apply_pass(cse, g)
    assert out.counts() == {"sum": 3, "index_view": 3}  # i1, i3 and i4
    assert out.outputs["b"] is a and out.outputs["i2"] is i1
    assert out.outputs["c"] is c and out.outputs["d"] is d and out.outputs["i3"] is i3
    assert_same_results(g, out, [rand(3, 4)])


def test_attr_key_distinguishes_what_primitives_distinguish():
    k = attr_key
    assert k(1) != k(1.0) != k(True) and k(1) != k(True)
    assert k(0.0) != k(-0.0)
    assert k(float("nan")) == k(float("nan"))
    assert k((1, 2)) != k([1, 2])
    assert k(None) != k(Ellipsis)
    assert k(slice(1, None)) == k(slice(1, None)) != k(slice(1, 2))
    assert k(np.float32) == k(np.float32) != k(np.float64)
    assert k(np.dtype("f4")) == k(np.dtype(np.float32)) != k(np.dtype("f8"))
    assert k(np.arange(3)) == k(np.arange(3)) != k(np.arange(3).astype(np.int32))
    assert k(np.arange(3)) != k(np.arange(3).reshape(3, 1))
    assert k(np.int64(3)) != k(3)
    assert k(Sym("B", 2, 1)) == k(Sym("B", 2, 1)) != k(Sym("B", 2, 0))
    assert k({"a": (1, None), "b": [2.5]}) == k({"b": [2.5], "a": (1, None)})
    assert k({"a": 1}) != k({"a": 2})
    for bad in (object(), {1, 2}, np.array([None], dtype=object), lambda: 0):
        with pytest.raises(Unkeyable):
            k(bad)
    with pytest.raises(Unkeyable):
        k({"x": [1, object()]})  # nested


@pytest.fixture
def tag_primitive():
    """A throwaway primitive ``_test_tag(x, tag)`` returning a copy of x (removed after)."""
    name = "_test_tag"
    REGISTRY[name] = Primitive(name, lambda x, tag: np.array(x, copy=True),
                               infer=lambda shapes, dts, tag: (shapes[0], dts[0]))
    yield name
    del REGISTRY[name]


def test_cse_does_not_merge_unkeyable_attrs(tag_primitive):
    g = Graph()
    x = g.add_input("x", (3,), F32)
    tag = object()
    a = g.add(tag_primitive, [x], {"tag": tag})
    b = g.add(tag_primitive, [x], {"tag": tag})  # same object, but not keyable: kept
    c = g.add(tag_primitive, [x], {"tag": (1, 2)})
    d = g.add(tag_primitive, [x], {"tag": (1, 2)})
    for k, n in dict(a=a, b=b, c=c, d=d).items():
        g.outputs[k] = n
    out = apply_pass(cse, g)
    assert out.counts() == {tag_primitive: 3}
    assert out.outputs["b"] is b and out.outputs["d"] is c
    assert_same_results(g, out, [rand(3)])


def test_cse_never_merges_random_nodes():
    g = Graph()
    x = g.add_input("x", (256,), F32)
    g.outputs["m1"] = g.add("dropout_mask", [x], {"p": 0.5, "shape": (256,)})
    g.outputs["m2"] = g.add("dropout_mask", [x], {"p": 0.5, "shape": (256,)})
    out = apply_pass(cse, g)
    assert out.counts() == {"dropout_mask": 2}
    kiln.manual_seed(3)
    r = run(out, [rand(256)])
    assert not np.array_equal(r["m1"], r["m2"])  # two independent draws
    kiln.manual_seed(3)
    want = run(g, [rand(256)])
    kiln.manual_seed(3)
    got = run(out, [rand(256)])
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_cse_merges_small_equal_consts_only():
    g = Graph()
    x = g.add_input("x", (4,), F32)
    c1 = g.add_const(np.array([1, 2, 3, 4], F32))
    c2 = g.add_const(np.array([1, 2, 3, 4], F32))
    c3 = g.add_const(np.array([1, 2, 3, 4], np.float64))  # other dtype
    z1 = g.add_const(np.array(0.0, F32))
    z2 = g.add_const(np.array(-0.0, F32))  # equal as numbers, different bits
    n = CONST_MERGE_LIMIT + 1
    big1 = g.add_const(np.zeros(n, F32))
    big2 = g.add_const(np.zeros(n, F32))
    a1 = g.add("add", [x, c1])
    a2 = g.add("add", [x, c2])  # the same node once c2 is c1
    g.outputs["a1"], g.outputs["a2"] = a1, a2
    g.outputs["c3"] = c3
    g.outputs["z1"], g.outputs["z2"] = z1, z2
    g.outputs["b1"], g.outputs["b2"] = big1, big2
    out = apply_pass(cse, g)
    consts = [m for m in out.nodes if m.op == "const"]
    assert consts == [c1, c3, z1, z2, big1, big2]
    assert out.counts()["add"] == 1 and out.outputs["a2"] is a1
    assert_same_results(g, out, [rand(4)])
    for k in ("z1", "z2"):  # the sign of zero survives
        assert run(out, [rand(4)])[k].tobytes() == run(g, [rand(4)])[k].tobytes()


def test_cse_with_sym_attrs():
    B = Sym("B")
    g = Graph()
    x = g.add_input("x", (B, 6), F32)
    r1 = g.add("reshape", [x], {"shape": (B, 2, 3)}, shape=(B, 2, 3), dtype=F32)
    r2 = g.add("reshape", [x], {"shape": (B, 2, 3)}, shape=(B, 2, 3), dtype=F32)
    r3 = g.add("reshape", [x], {"shape": (Sym("B", 2), 3)}, shape=(Sym("B", 2), 3), dtype=F32)
    g.outputs["r1"], g.outputs["r2"], g.outputs["r3"] = r1, r2, r3
    out = apply_pass(cse, g)
    assert out.counts() == {"reshape": 2}
    assert out.outputs["r2"] is r1 and out.outputs["r3"] is r3
    for b in (1, 5):
        assert_same_results(g, out, [rand(b, 6)])


def test_cse_leaves_fused_nodes():
    body = Graph()
    i = body.add_input("in0", (3,), F32)
    body.outputs["out"] = body.add("exp", [i])
    g = Graph()
    x = g.add_input("x", (3,), F32)
    g.outputs["a"] = g.add("fused", [x], {"body": body}, shape=(3,), dtype=F32)
    g.outputs["b"] = g.add("fused", [x], {"body": body}, shape=(3,), dtype=F32)
    assert apply_pass(cse, g).counts() == {"fused": 2}


# -- fold ----------------------------------------------------------------------------------------

def test_fold_chain_of_constants():
    g = Graph()
    x = g.add_input("x", (2, 3), F32)
    c = g.add_const(np.arange(6, dtype=F32))
    r = g.add("reshape", [c], {"shape": (2, 3)}, loc="model.py:3")
    e = g.add("exp", [r], loc="model.py:4")
    y = g.add("mul", [x, e])
    g.outputs["y"] = y
    g.outputs["e"] = e
    out = apply_pass(fold, g)
    assert out.counts() == {"const": 3, "mul": 1}
    folded = out.outputs["e"]
    assert folded.op == "const" and folded.loc == "model.py:4"
    assert np.array_equal(folded.attrs["value"], np.exp(np.arange(6, dtype=F32)).reshape(2, 3))
    assert out.outputs["y"].inputs == (x, folded)
    assert_same_results(g, out, [rand(2, 3)])
    assert apply_pass(dce, out).counts() == {"const": 1, "mul": 1}


def test_fold_result_does_not_alias_a_constant():
    g = Graph()
    c = g.add_const(np.arange(6, dtype=F32))
    g.outputs["r"] = g.add("reshape", [c], {"shape": (3, 2)})
    g.outputs["e"] = g.add("expand", [g.add_const(np.ones((1, 2), F32))], {"shape": (4, 2)})
    out = apply_pass(fold, g)
    r = out.outputs["r"].attrs["value"]
    assert not np.shares_memory(r, c.attrs["value"])
    assert out.outputs["e"].attrs["value"].strides == (8, 4)  # materialized, not broadcast
    assert_same_results(g, out, [])


def test_fold_skips_random_large_sym_and_failing_nodes():
    g = Graph()
    c = g.add_const(np.ones(8, F32))
    g.outputs["mask"] = g.add("dropout_mask", [c], {"p": 0.5, "shape": (8,)})
    one = g.add_const(np.array(1.0, F32))
    at = g.add("expand", [one], {"shape": (1000, FOLD_LIMIT // 1000)})  # exactly the limit
    over = g.add("expand", [one], {"shape": (1000, FOLD_LIMIT // 1000 + 1)})
    g.outputs["at"], g.outputs["over"] = at, over
    ci = g.add_const(np.array([1, 2], np.int64))
    g.outputs["zdiv"] = g.add("floor_divide", [ci, g.add_const(np.array([1, 0], np.int64))])
    out = apply_pass(fold, g)
    ops = {k: n.op for k, n in out.outputs.items()}
    assert ops == {"mask": "dropout_mask", "at": "const", "over": "expand",
                   "zdiv": "floor_divide"}
    with pytest.raises(ZeroDivisionError):
        run(out, [])
    B = Sym("B")
    g2 = Graph()
    x = g2.add_input("x", (B,), F32)
    c6 = g2.add_const(np.ones(6, F32))
    g2.outputs["r"] = g2.add("reshape", [c6], {"shape": (B, 3)}, shape=(B, 3), dtype=F32)
    g2.outputs["x"] = x
    out2 = apply_pass(fold, g2)
    assert out2.outputs["r"].op == "reshape"
    assert_same_results(g2, out2, [rand(2)])


def test_fold_skips_warnings_but_keeps_value():
    g = Graph()
    g.outputs["y"] = g.add("log", [g.add_const(np.array([0.0, 1.0], F32))])
    out = apply_pass(fold, g)
    assert out.outputs["y"].op == "log"
    assert_same_results(g, out, [])


# -- simplify ------------------------------------------------------------------------------------

def _binary_graph(op, const, x_first=True, dtype=F32, shape=(10,)):
    g = Graph()
    x = g.add_input("x", shape, dtype)
    c = g.add_const(np.asarray(const, dtype) if not isinstance(const, np.ndarray) else const)
    g.outputs["y"] = g.add(op, [x, c] if x_first else [c, x])
    return g, x


@pytest.mark.parametrize("op,const,x_first", [
    ("mul", 1.0, True), ("mul", 1.0, False), ("mul", np.ones(10, F32), True),
    ("div", 1.0, True), ("sub", 0.0, True), ("add", -0.0, True), ("add", -0.0, False),
])
def test_simplify_neutral_constants_exact(op, const, x_first):
    g, x = _binary_graph(op, const, x_first)
    out = apply_pass(simplify, g)
    assert out.outputs["y"] is x
    assert apply_pass(dce, out).nodes == []
    assert_same_results(g, out, [SPECIAL], bitwise=True)
    assert_same_results(g, out, [rand(10)], bitwise=True)


@pytest.mark.parametrize("op,const,x_first", [
    ("add", 0.0, True), ("add", 0.0, False),  # -0.0 + 0.0 is +0.0
    ("sub", -0.0, True),  # -0.0 - (-0.0) is +0.0
    ("sub", 0.0, False),  # 0 - x is -x
    ("div", 1.0, False),  # 1 / x
    ("mul", np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 2], F32), True),  # not all ones
    ("mul", np.ones(10, np.float64), True),  # another dtype
])
def test_simplify_leaves_inexact_rewrites(op, const, x_first):
    g, x = _binary_graph(op, const, x_first)
    out = apply_pass(simplify, g)
    assert out.outputs["y"] is g.outputs["y"]
    assert out.nodes == g.nodes


def test_simplify_x_plus_zero_really_is_inexact():
    """Why x + 0.0 is kept: on -0.0 it gives +0.0, so x would change the bits."""
    g, x = _binary_graph("add", 0.0)
    y = run(g, [SPECIAL])["y"]
    assert np.signbit(SPECIAL[0]) and not np.signbit(y[0])


def test_simplify_broadcasting_one_is_not_identity():
    g = Graph()
    x = g.add_input("x", (4,), F32)
    g.outputs["y"] = g.add("mul", [x, g.add_const(np.ones((3, 4), F32))])
    g.outputs["z"] = g.add("div", [x, g.add_const(np.ones((2, 1), F32))])
    out = apply_pass(simplify, g)
    assert out.nodes == g.nodes and out.outputs == g.outputs
    # a smaller one that does not change the shape is fine
    g2 = Graph()
    x2 = g2.add_input("x", (3, 4), F32)
    g2.outputs["y"] = g2.add("mul", [g2.add_const(np.ones((1, 4), F32)), x2])
    assert apply_pass(simplify, g2).outputs["y"] is x2


@pytest.mark.parametrize("dtype,op,const", [
    (np.int32, "add", 0), (np.int32, "sub", 0), (np.int32, "mul", 1), (np.uint8, "add", 0),
    (np.bool_, "add", False), (np.bool_, "mul", True), (np.int64, "mul", 1),
])
def test_simplify_integer_and_bool_neutral_constants(dtype, op, const):
    g, x = _binary_graph(op, const, dtype=dtype)
    out = apply_pass(simplify, g)
    assert out.outputs["y"] is x
    info = np.iinfo(dtype) if dtype != np.bool_ else None
    vals = (np.array([0, 1, 0, 1, 1, 0, 0, 1, 1, 0], dtype) if info is None else
            np.array([info.min, info.max, 0, 1, 2, info.max - 1, info.min + 1, 3, 5, 7], dtype))
    assert_same_results(g, out, [vals], bitwise=True)


def test_simplify_leaves_bool_sub_and_int_div():
    g, _ = _binary_graph("sub", False, dtype=np.bool_)  # numpy refuses bool subtraction
    assert apply_pass(simplify, g).nodes == g.nodes
    g = Graph()
    x = g.add_input("x", (3,), np.int64)
    g.outputs["y"] = g.add("div", [x, g.add_const(np.array(1, np.int64))])
    assert apply_pass(simplify, g).nodes == g.nodes  # its value is a float


def test_simplify_double_negation():
    g = Graph()
    x = g.add_input("x", (10,), F32)
    n1 = g.add("neg", [x])
    n2 = g.add("neg", [n1])
    n3 = g.add("neg", [n2])
    n4 = g.add("neg", [n3])
    g.outputs.update(n2=n2, n3=n3, n4=n4, n1=n1)
    out = apply_pass(simplify, g)
    assert out.outputs["n2"] is x and out.outputs["n4"] is x
    assert out.outputs["n3"].op == "neg" and out.outputs["n3"].inputs == (x,)
    assert out.counts() == {"neg": 2}  # n1 (an output) and the new neg(x) for n3
    assert_same_results(g, out, [SPECIAL], bitwise=True)
    gi = Graph()
    xi = gi.add_input("x", (4,), np.int8)
    gi.outputs["y"] = gi.add("neg", [gi.add("neg", [xi])])
    outi = apply_pass(simplify, gi)
    assert outi.outputs["y"] is xi
    assert_same_results(gi, outi, [np.array([-128, -1, 0, 127], np.int8)], bitwise=True)
    gb = Graph()
    xb = gb.add_input("x", (4,), np.bool_)
    gb.outputs["y"] = gb.add("neg", [gb.add("neg", [xb])])
    assert apply_pass(simplify, gb).outputs["y"] is gb.outputs["y"]  # an error at run time


def test_simplify_shape_identities():
    g = Graph()
    x = g.add_input("x", (2, 3, 4), F32)
    g.outputs["r"] = g.add("reshape", [x], {"shape": (2, 3, 4)})
    g.outputs["r1"] = g.add("reshape", [x], {"shape": (2, -1, 4)})
    g.outputs["p"] = g.add("permute", [x], {"dims": (0, 1, 2)})
    g.outputs["pn"] = g.add("permute", [x], {"dims": (-3, -2, -1)})
    g.outputs["c"] = g.add("cast", [x], {"dtype": np.dtype(F32)})
    g.outputs["ct"] = g.add("cast", [x], {"dtype": F32})
    g.outputs["e"] = g.add("expand", [x], {"shape": (2, 3, 4)})
    kept = {
        "r2": g.add("reshape", [x], {"shape": (6, 4)}),
        "p2": g.add("permute", [x], {"dims": (1, 0, 2)}),
        "c2": g.add("cast", [x], {"dtype": np.dtype(np.float64)}),
        "e2": g.add("expand", [x], {"shape": (5, 2, 3, 4)}),
    }
    g.outputs.update(kept)
    out = apply_pass(simplify, g)
    for k in ("r", "r1", "p", "pn", "c", "ct", "e"):
        assert out.outputs[k] is x, k
    for k, n in kept.items():
        assert out.outputs[k] is n, k
    assert_same_results(g, out, [rand(2, 3, 4)], bitwise=True)


def test_simplify_reshape_and_permute_chains():
    g = Graph()
    x = g.add_input("x", (2, 3, 4), F32)
    r1 = g.add("reshape", [x], {"shape": (6, 4)})
    r2 = g.add("reshape", [r1], {"shape": (4, -1)})
    r3 = g.add("reshape", [r2], {"shape": (24,)})
    back = g.add("reshape", [r3], {"shape": (2, 3, 4)})
    p1 = g.add("permute", [x], {"dims": (1, 2, 0)})
    p2 = g.add("permute", [p1], {"dims": (2, 0, 1)})  # undoes p1
    p3 = g.add("permute", [p1], {"dims": (-1, 1, 0)})
    g.outputs.update(r2=r2, r3=r3, back=back, p2=p2, p3=p3)
    out = apply_pass(simplify, g)
    o = out.outputs
    assert o["r2"].op == "reshape" and o["r2"].inputs == (x,) and o["r2"].shape == (4, 6)
    assert o["r3"].op == "reshape" and o["r3"].inputs == (x,)
    assert o["back"] is x
    assert o["p2"] is x
    assert o["p3"].op == "permute" and o["p3"].inputs == (x,)
    assert o["p3"].attrs["dims"] == (0, 2, 1)
    assert_same_results(g, out, [rand(2, 3, 4)], bitwise=True)
    assert apply_pass(dce, out).counts() == {"reshape": 2, "permute": 1}


def test_simplify_sym_reshape():
    B = Sym("B")
    g = Graph()
    x = g.add_input("x", (B, 4), F32)
    r = g.add("reshape", [x], {"shape": (Sym("B", 4),)}, shape=(Sym("B", 4),), dtype=F32)
    g.outputs["y"] = g.add("reshape", [r], {"shape": (B, 4)}, shape=(B, 4), dtype=F32)
    out = apply_pass(simplify, g)
    assert out.outputs["y"] is x
    assert_same_results(g, out, [rand(3, 4)], bitwise=True)


def test_simplify_redirects_users_and_outputs():
    g = Graph()
    x = g.add_input("x", (5,), F32)
    w = g.add_input("w", (5,), F32)
    xw = g.add("mul", [x, w])
    one = g.add("mul", [xw, g.add_const(np.array(1.0, F32))])
    y = g.add("exp", [one])
    g.outputs.update(y=y, one=one)
    out = apply_pass(simplify, g)
    assert out.outputs["one"] is xw
    assert out.outputs["y"].inputs == (xw,)
    assert_same_results(g, out, [rand(5), rand(5, seed=2)], bitwise=True)


# -- all together --------------------------------------------------------------------------------

def test_passes_in_sequence():
    g = Graph()
    x = g.add_input("x", (4, 3), F32)
    c = g.add_const(np.arange(3, dtype=F32))
    k = g.add("mul", [g.add("neg", [c]), g.add_const(np.array(-1.0, F32))])  # folds to c
    a1 = g.add("add", [x, k])
    a2 = g.add("add", [x, g.add("neg", [g.add("neg", [k])])])
    t = g.add("permute", [g.add("permute", [a2], {"dims": (1, 0)})], {"dims": (1, 0)})
    g.outputs["y"] = g.add("mul", [a1, t])
    out = g
    for p in (fold, simplify, cse, dce):
        out = apply_pass(p, out)
    assert out.counts() == {"const": 1, "add": 1, "mul": 1}
    assert_same_results(g, out, [rand(4, 3)], bitwise=True)
