"""The generated-code executor and its out-kernels, checked bitwise against the interpreter and
the primitives' impls."""

import traceback
from types import SimpleNamespace

import numpy as np
import pytest

import kiln  # noqa: F401  (registers the primitives)
from kiln.backends.codegen import Executor
from kiln.backends.interpreter import run
from kiln.backends.kernels import OUT_KERNELS, UFUNCS, UNSAFE, _occurrence_levels, writes_out
from kiln.graph.ir import Graph, verify
from kiln.graph.symbolic import Sym
from kiln.ops.registry import REGISTRY

F32, F64 = np.float32, np.float64


def same(a, b) -> bool:
    """Bitwise equality: shape, dtype and bytes (NaN payloads and -0.0 included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def rand(shape, dtype=F32, seed=0, special=True):
    rng = np.random.default_rng(seed)
    a = np.array((rng.standard_normal(shape) * 3), dtype)
    if special and a.size >= 6 and a.dtype.kind == "f":
        a.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-30]
    return a


def rand_int(shape, dtype=np.int64, seed=0):
    return np.array(np.random.default_rng(seed).integers(-9, 9, shape), dtype)


# -- a stand-in memory plan (the real one is kiln/graph/passes/memory.py) ----------------------

def stand_in_plan(g, writes, updates=None, reuse=True, early_free=False):
    """Greedy plan: a slot per written node, reused when its value's last reader has run
    (``early_free``: already for the last reader itself).  Knows nothing about views."""
    index = {n: i for i, n in enumerate(g.nodes)}
    last = {n: max((index[u] for u in us), default=-1) for n, us in g.users().items()}
    outputs = set(g.outputs.values())
    inplace = dict(updates or {})
    slot_of, slots, free_after, pool = {}, [], {}, {}

    def release(n):
        dead = [u for u in dict.fromkeys(n.inputs) if last[u] == index[n] and u not in outputs]
        for u in dead:
            if u in slot_of and reuse:
                pool.setdefault(slots[slot_of[u]], []).append(slot_of[u])
        return dead

    for n in g.nodes:
        dead = release(n) if early_free else None
        if n not in inplace and n not in outputs and writes(n):
            key = (n.shape, n.dtype)
            if pool.get(key):
                slot_of[n] = pool[key].pop()
            else:
                slot_of[n] = len(slots)
                slots.append(key)
        free_after[n] = dead if early_free else release(n)
    return SimpleNamespace(slot_of=slot_of, slots=slots, free_after=free_after, inplace=inplace)


# -- kernels: bitwise equal to the impls ---------------------------------------------------------

def _cases():
    """(primitive, arrays, attrs) covering every out-kernel: broadcasting, 0-d, dtypes."""
    cases = []
    shapes2 = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((4,), (3, 4)), ((), ()), ((), (3, 4)),
               ((2, 3, 4), (4,))]
    for name in ("add", "sub", "mul", "div", "maximum", "minimum"):
        for dt in (F32, F64):
            for sa, sb in shapes2:
                cases.append((name, [rand(sa, dt, 1), rand(sb, dt, 2)], {}))
        if name != "div":
            cases.append((name, [rand_int((3, 4)), rand_int((4,), seed=1)], {}))
            cases.append((name, [rand_int((3, 4), np.int32), rand_int((3, 4), np.int32, 3)], {}))
    for name in ("neg", "abs", "relu"):
        for a in (rand((3, 4)), rand((), F64), rand((5,), F64), rand_int((3, 4))):
            cases.append((name, [a], {}))
    for name in ("exp", "expm1", "log", "log1p", "log2", "sqrt", "sin", "cos", "tanh", "floor",
                 "ceil", "trunc", "sigmoid"):
        for a in (rand((3, 4)), rand((), F64), rand((2, 3, 5), F64), np.abs(rand((7,)))):
            cases.append((name, [a], {}))
    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        for sa, sb in shapes2:
            a, b = rand(sa, F32, 1), rand(sb, F32, 2)
            if a.size and b.size:
                b.reshape(-1)[0] = a.reshape(-1)[0]
            cases.append((name, [a, b], {}))
        cases.append((name, [rand_int((3, 4)), rand_int((3, 4), seed=5)], {}))
    bools = [rand((3, 4), seed=7) > 0, rand((4,), seed=8) > 0]
    cases.append(("logical_not", [bools[0]], {}))
    for name in ("logical_and", "logical_or", "logical_xor"):
        cases.append((name, bools, {}))
        cases.append((name, [np.array(True), bools[0]], {}))
    for x, y in ((rand_int((4, 5)), rand_int((4, 5), seed=2)),
                 (rand((4, 5), seed=1) > 0, rand((4, 5), seed=2) > 0)):
        cases.append(("where", [rand((4, 5), seed=9) > 0, x, y], {}))
    for src, dst in ((F32, F64), (F64, F32), (F32, np.int64), (np.int64, F32), (F32, np.bool_),
                     (np.bool_, F32), (np.int64, np.int32), (F32, np.float16)):
        a = rand((3, 4), F32, 3, special=False) * 1e3
        a = (a > 0) if src == np.bool_ else a.astype(src)
        cases.append(("cast", [a], {"dtype": np.dtype(dst)}))
        cases.append(("cast", [a[0, 0].copy()], {"dtype": np.dtype(dst)}))
    for dt in (F32, F64):
        cond = rand((3, 4), seed=9) > 0
        cases.append(("where", [cond, rand((3, 4), dt, 1), rand((3, 4), dt, 2)], {}))
        cases.append(("where", [cond[:1], rand((3, 1), dt, 1), rand((), dt, 2)], {}))
        cases.append(("where", [np.array(False), rand((), dt, 1), rand((), dt, 2)], {}))
        big = rand((6, 50), dt, 3)
        cases.append(("where", [rand((6, 50), seed=4) > 0, big, rand((6, 50), dt, 5)], {}))
        cases.append(("where", [rand((6, 50), seed=4) > 0, np.array(-np.inf, dt), big], {}))
        cases.append(("where", [rand((6, 50), seed=4) > 0, rand((50,), dt, 6), big], {}))
        y = rand((3, 4), dt, 4)
        y[0, :3] = [0.0, -0.0, np.nan]
        for name in ("relu_backward", "tanh_backward", "sigmoid_backward"):
            cases.append((name, [rand((3, 4), dt, 5), y], {}))
            cases.append((name, [rand((), dt, 5), rand((), dt, 6)], {}))
        cases.append(("relu_backward", [rand((4,), dt, 5), y], {}))
        for e in (2.0, 0.5, 3.0, -1.5, 0.0, np.nan):
            cases.append(("pow", [rand((3, 4), dt, 6), np.array(e, dt)], {}))
        cases.append(("pow", [np.abs(rand((3, 4), dt, 6)), rand((3, 4), dt, 7)], {}))
        cases.append(("pow", [rand((4,), dt, 6), rand((3, 4), dt, 7)], {}))
        cases.append(("pow", [np.array(0.999, dt), rand((), dt, 8)], {}))
        cases.append(("cat", [rand((2, 3), dt, 1), rand((2, 1), dt, 2), rand((2, 4), dt, 3)],
                      {"dim": 1}))
        cases.append(("cat", [rand((4, 2, 3), dt, 1).transpose(1, 0, 2), rand((1, 4, 3), dt, 2)],
                      {"dim": 0}))
        table = rand((7, 3), dt, 1)
        for rows in (np.array([[3, 0, 3], [6, 3, 1]]), np.array([[2, 4, 5]]),  # repeats, none
                     np.array([[5, 5, 5, 5]]), np.array([[1, -1, 2]]),  # one row mostly, < 0
                     np.array([[2, 6, 2, 0, 1, 2, 4, 5, 3, 6, 0, 1, 3, 4, 5, 2, 0, 6]])):
            vals = rand(rows.shape[1:] + (3,), dt, 2)
            cases.append(("index_put", [table, vals, rows],
                          {"index": (), "dims": (0,), "accumulate": True}))
            cases.append(("index_put", [np.broadcast_to(np.zeros((), dt), (7, 3)), vals,
                                        rows], {"index": (), "dims": (0,), "accumulate": True}))
        rows = np.random.default_rng(3).integers(0, 64, (1, 8, 40))  # an embedding backward
        assert len(_occurrence_levels(rows[0].reshape(-1))) > 2  # the level path runs
        cases.append(("index_put", [np.broadcast_to(np.zeros((), dt), (64, 5)),
                                    rand((8, 40, 5), dt, 4), rows],
                      {"index": (), "dims": (0,), "accumulate": True}))
        relu_y = np.abs(rand((64, 16, 9), dt, 9)) * np.sign(rand((64, 16, 9), dt, 10))
        cases.append(("relu_backward", [rand((64, 16, 9), dt, 11), relu_y], {}))
        for sa, sb, ta, tb in (((5, 3), (3, 4), False, False), ((3, 5), (3, 4), True, False),
                               ((5, 3), (4, 3), False, True), ((3, 5), (4, 3), True, True),
                               ((2, 5, 3), (3, 4), False, False), ((2, 5, 3), (4, 3), False,
                                                                  True),
                               ((2, 5, 3), (2, 3, 4), False, False), ((2, 3, 5), (3, 4), True,
                                                                      False),
                               ((1, 7), (7, 1), False, False), ((64, 128), (10, 128), False,
                                                                True),
                               ((2, 1, 5, 3), (4, 3, 6), False, False)):
            cases.append(("matmul", [rand(sa, dt, 1, False), rand(sb, dt, 2, False)],
                          {"ta": ta, "tb": tb}))
        for sx, sw, sb in (((5, 3), (4, 3), (4,)), ((5, 3), (4, 3), None),
                           ((2, 5, 3), (4, 3), (4,)), ((64, 784), (128, 784), (128,)),
                           ((1, 3), (1, 3), ())):
            arrays = [rand(sx, dt, 1, False), rand(sw, dt, 2, False)]
            if sb is not None:
                arrays.append(rand(sb, dt, 3, False))
            cases.append(("linear", arrays, {}))
        for shape, axes, keep in (((3, 4), (0, 1), False), ((3, 4), (1,), False),
                                  ((3, 4), (1,), True), ((64, 10), (0,), False),
                                  ((2000, 10), (0,), True), ((4, 5, 6), (1, 2), False),
                                  ((4, 5, 6), (0, 1), True), ((4, 5, 6), (0, 2), False),
                                  ((4, 5, 6), (), False), ((), (), False), ((0, 3), (0,), False),
                                  ((3, 10000), (1,), False)):
            cases.append(("sum", [rand(shape, dt, 1, False)], {"axes": axes,
                                                                "keepdims": keep}))
        cases.append(("sum", [rand((6, 4), dt, 1, False).T], {"axes": (1,), "keepdims": False}))
        # conv2d: the cnn's two layers (planes and rows im2col), several chunks of a batch,
        # no bias, strided / dilated / grouped
        geo = {"stride": (1, 1), "padding": (2, 2, 2, 2), "dilation": (1, 1), "groups": 1}
        for sx, sw, bias, attrs in (((3, 1, 28, 28), (16, 1, 5, 5), True, geo),
                                    ((60, 1, 28, 28), (16, 1, 5, 5), True, geo),
                                    ((40, 16, 14, 14), (32, 16, 5, 5), True, geo),
                                    ((2, 16, 14, 14), (32, 16, 5, 5), False, geo),
                                    ((2, 8, 11, 9), (6, 4, 3, 3), True,
                                     {"stride": (2, 1), "padding": (1, 0, 1, 1),
                                      "dilation": (1, 2), "groups": 2}),
                                    ((2, 8, 11, 9), (6, 8, 3, 3), False,
                                     {"stride": (2, 2), "padding": (1, 1, 0, 0),
                                      "dilation": (2, 1), "groups": 1})):
            arrays = [rand(sx, dt, 1, False), rand(sw, dt, 2, False)]
            if bias:
                arrays.append(rand(sw[:1], dt, 3, False))
            cases.append(("conv2d", arrays, attrs))
    return cases


CASES = _cases()


def test_every_kernel_is_tested():
    assert {c[0] for c in CASES} == set(OUT_KERNELS)


@pytest.mark.parametrize("name,arrays,attrs", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_bitwise_equals_impl(name, arrays, attrs):
    want = np.asarray(REGISTRY[name].impl(*arrays, **attrs))
    out = np.empty(want.shape, want.dtype)
    got = OUT_KERNELS[name](out, *arrays, **attrs)
    assert got is out
    assert same(out, want), (name, out, want)
    # into a non-contiguous buffer (an in-place target can be one)
    if want.ndim >= 1:
        big = np.empty(want.shape[:-1] + (2 * want.shape[-1],), want.dtype)
        strided = big[..., ::2]
        OUT_KERNELS[name](strided, *arrays, **attrs)
        assert same(strided, want)
    # writing over an input of the output's shape and dtype is fine where UNSAFE allows it
    for p, a in enumerate(arrays):
        if p in UNSAFE[name] or a.shape != want.shape or a.dtype != want.dtype:
            continue
        copies = [x.copy() for x in arrays]
        OUT_KERNELS[name](copies[p], *copies, **attrs)
        assert same(copies[p], want), (name, p)


def test_ufunc_entries_are_the_kernels():
    for name, (ufunc, _extra) in UFUNCS.items():
        assert isinstance(ufunc, np.ufunc) and UNSAFE[name] == frozenset(), name


def test_fresh_kernels_run_for_outputs_without_a_buffer():
    """An embedding gradient is a graph output (no planned buffer): its faster kernel still
    runs, on a new array each call, and matches the interpreter."""
    g = Graph()
    tok = g.add_input("tok", (1, 4, 30), np.int64)
    gy = g.add_input("gy", (4, 30, 6), F32)
    zeros = g.add_const(np.broadcast_to(np.zeros((), F32), (50, 6)))
    g.outputs["grad"] = g.add("index_put", [zeros, gy, tok],
                              {"index": (), "dims": (0,), "accumulate": True})
    ex = Executor(g, None, "embedding_backward")
    assert "k_index_put(_empty((50, 6), " in ex.source
    arrays = [np.random.default_rng(1).integers(0, 50, (1, 4, 30)), rand((4, 30, 6), F32, 2)]
    first = ex(arrays)["grad"]
    assert same(first, run(g, arrays)["grad"])
    assert ex(arrays)["grad"] is not first


def test_fresh_relu_backward_for_a_gradient_output():
    """A relu gradient with no buffer (a graph output here; in the cnn step, the input of a
    convolution impl) runs its kernel on a new array, bitwise as the impl."""
    g = Graph()
    gy = g.add_input("gy", (4, 3, 5), F32)
    y = g.add_input("y", (4, 3, 5), F32)
    g.outputs["grad"] = g.add("relu_backward", [gy, y])
    ex = Executor(g, None, "relu_backward")
    assert "k_relu_backward(_empty((4, 3, 5), " in ex.source
    yv = rand((4, 3, 5), F32, 3)
    yv[0, 0, :3] = [0.0, -0.0, np.nan]
    arrays = [rand((4, 3, 5), F32, 2), yv]
    first = ex(arrays)["grad"]
    assert same(first, run(g, arrays)["grad"])
    assert ex(arrays)["grad"] is not first


# -- graphs built by hand ------------------------------------------------------------------------

def mlp_step(batch=8):
    """Forward, backward and SGD update of a 2-layer MLP with a squared-error loss."""
    g = Graph()
    x = g.add_input("x", (batch, 6), F32)
    t = g.add_input("t", (batch, 3), F32)
    w1 = g.add_input("w1", (5, 6), F32, kind="captured")
    b1 = g.add_input("b1", (5,), F32, kind="captured")
    w2 = g.add_input("w2", (3, 5), F32, kind="captured")
    lr = g.add_const(np.array(0.01, F32))
    two = g.add_const(np.array(2.0, F32))
    h = g.add("linear", [x, w1, b1], loc="train.py:10")
    r = g.add("relu", [h], loc="train.py:11")
    o = g.add("matmul", [r, w2], {"ta": False, "tb": True}, loc="train.py:12")
    d = g.add("sub", [o, t], loc="train.py:13")
    sq = g.add("mul", [d, d], loc="train.py:13")
    loss = g.add("sum", [sq], {"axes": (0, 1), "keepdims": False}, loc="train.py:13")
    go = g.add("mul", [d, two], loc="train.py:14")
    gw2 = g.add("matmul", [go, r], {"ta": True, "tb": False}, loc="train.py:14")
    gr = g.add("matmul", [go, w2], {"ta": False, "tb": False}, loc="train.py:14")
    gh = g.add("relu_backward", [gr, r], loc="train.py:14")
    gw1 = g.add("matmul", [gh, x], {"ta": True, "tb": False}, loc="train.py:14")
    gb1 = g.add("sum", [gh], {"axes": (0,), "keepdims": False}, loc="train.py:14")
    updates = {}
    for p, gp in ((w1, gw1), (b1, gb1), (w2, gw2)):
        step = g.add("mul", [gp, lr], loc="train.py:15")
        updates[g.add("sub", [p, step], loc="train.py:15")] = p
    g.outputs = {"loss": loss, "out": o}
    for new, p in updates.items():
        g.outputs[f"new_{p.name}"] = new
    verify(g)
    return g, updates


def mlp_inputs(batch=8, seed=0):
    params = [rand(s, F32, seed + k, False) * F32(0.1) for k, s in
              enumerate([(5, 6), (5,), (3, 5)], 2)]
    return [rand((batch, 6), F32, seed, False), rand((batch, 3), F32, seed + 1, False), *params]


def assert_same_outputs(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert same(got[k], want[k]), k


@pytest.mark.parametrize("mode", ["no-plan", "slots", "reuse", "early-free"])
def test_mlp_step_matches_interpreter(mode):
    g, _ = mlp_step()
    plan = None
    if mode != "no-plan":
        plan = stand_in_plan(g, writes_out, reuse=mode != "slots", early_free=mode == "early-free")
    ex = Executor(g, plan, "train_step")
    for seed in range(3):
        arrays = mlp_inputs(seed=seed)
        assert_same_outputs(ex(arrays), run(g, arrays))
    if plan is not None:
        assert sum(1 for n in g.nodes if n in plan.slot_of) >= 8


def test_mlp_step_in_place_updates_over_several_steps():
    g, updates = mlp_step()
    plan = stand_in_plan(g, writes_out, updates=updates)
    ex = Executor(g, plan, "train_step")
    ref = mlp_inputs()
    mine = [a.copy() for a in ref]
    params = mine[2:]
    for _ in range(4):
        want = run(g, ref)
        got = ex(mine)
        assert_same_outputs(got, want)
        for k, a in zip(("new_w1", "new_b1", "new_w2"), params):
            assert got[k] is a  # the result IS the parameter's array
        ref = ref[:2] + [want["new_w1"], want["new_b1"], want["new_w2"]]
    for a, b in zip(mine[2:], ref[2:]):
        assert same(a, b)


def test_buffers_are_reused_and_outputs_are_fresh():
    g, _ = mlp_step()
    plan = stand_in_plan(g, writes_out)
    ex = Executor(g, plan, "train_step")
    arrays = mlp_inputs()
    first = ex(arrays)
    (key, bufs), = ex.buffers.items()
    assert key == () and len(bufs) == len(plan.slots) >= 4
    ids = [id(b) for b in bufs]
    second = ex(mlp_inputs(seed=5))
    (bufs2,) = ex.buffers.values()
    assert [id(b) for b in bufs2] == ids
    for out in (first, second):
        for v in out.values():
            assert not any(np.shares_memory(v, b) for b in bufs)
    assert_same_outputs(first, run(g, arrays))  # not overwritten by the second call


def test_output_view_of_a_buffer_is_copied():
    g = Graph()
    x = g.add_input("x", (4, 6), F32)
    e = g.add("exp", [x])
    r = g.add("reshape", [e], {"shape": (24,)})
    t = g.add("permute", [e], {"dims": (1, 0)})
    g.outputs = {"flat": r, "t": t}
    plan = SimpleNamespace(slot_of={e: 0}, slots=[((4, 6), np.dtype(F32))], free_after={},
                           inplace={})
    ex = Executor(g, plan, "views")
    out = ex([rand((4, 6))])
    (bufs,) = ex.buffers.values()
    assert ex.fallbacks == []
    for v in out.values():
        assert not np.shares_memory(v, bufs[0])
    assert_same_outputs(out, run(g, [rand((4, 6))]))


def test_a_plan_that_overwrites_a_live_view_falls_back():
    g = Graph()
    x = g.add_input("x", (4, 6), F32)
    e = g.add("exp", [x])
    v = g.add("reshape", [e], {"shape": (6, 4)})  # a view of e's buffer, read at the end
    s = g.add("sin", [x])  # the naive plan gives it e's slot: e itself is dead
    c = g.add("reshape", [s], {"shape": (6, 4)})
    o = g.add("add", [v, c])
    g.outputs = {"o": o}
    plan = SimpleNamespace(slot_of={e: 0, s: 0}, slots=[((4, 6), np.dtype(F32))],
                           free_after={}, inplace={})
    ex = Executor(g, plan, "alias")
    assert [n for n, _ in ex.fallbacks] == [s]
    a = [rand((4, 6))]
    assert_same_outputs(ex(a), run(g, a))


def fused_graph(batch=8):
    """tanh(x * w + b) masked where x > 0, as one fused node; also a bool and a broadcast
    intermediate, and a constant, inside the body."""
    body = Graph()
    bx = body.add_input("x", (batch, 4), F32)
    bw = body.add_input("w", (batch, 4), F32)
    bb = body.add_input("b", (4,), F32)
    half = body.add_const(np.array(0.5, F32))
    m = body.add("mul", [bx, bw])
    a = body.add("add", [m, bb])
    t = body.add("tanh", [a])
    pos = body.add("gt", [bx, half])
    bb2 = body.add("mul", [bb, bb])  # (4,): a temporary of another shape
    y = body.add("where", [pos, t, bb2])
    body.outputs = {"y": y}
    g = Graph()
    x = g.add_input("x", (batch, 4), F32)
    w = g.add_input("w", (batch, 4), F32)
    b = g.add_input("b", (4,), F32)
    f = g.add("fused", [x, w, b], {"body": body, "ops": "mul+add+tanh+gt+mul+where"},
              shape=(batch, 4), dtype=F32, loc="model.py:7")
    e = g.add("exp", [f], loc="model.py:8")
    g.outputs = {"e": e, "f": f}
    verify(g)
    return g, f


@pytest.mark.parametrize("planned", [False, True])
def test_fused_node_matches_interpreter(planned):
    g, f = fused_graph()
    assert writes_out(f)
    plan = None
    if planned:
        g.outputs = {"e": g.outputs["e"]}  # so the fused node gets a slot
        plan = stand_in_plan(g, writes_out)
        assert f in plan.slot_of
    ex = Executor(g, plan, "fused")
    assert ex.fallbacks == []
    lines = ex.source.splitlines()
    body = f.attrs["body"]
    for b in body.nodes:  # one statement per body op (the constant is a global)
        hits = [ln for ln in lines if f"# %{f.id} fused: %{b.id} {b.op} " in ln]
        assert len(hits) == (0 if b.op == "const" else 1), b  # where: no copy into out
    if planned:  # the intermediates of the output's shape and dtype go into its buffer, but
        # not tanh's result, which where reads after it starts writing the output
        out = f"out=b{plan.slot_of[f]})"
        assert [ln.split("(")[0].strip() for ln in lines if out in ln] == [
            "u_multiply", "u_add"]
        assert any(ln.strip().startswith(f"v{f.id} = k_where(b{plan.slot_of[f]}, ")
                   for ln in lines)
    for seed in range(2):
        a = [rand((8, 4), F32, seed), rand((8, 4), F32, seed + 1), rand((4,), F32, seed + 2)]
        assert_same_outputs(ex(a), run(g, a))


def test_fused_node_reading_its_output_buffer_in_place():
    # the fused result is written over input w (in place), which the body reads twice
    g, f = fused_graph()
    g.outputs = {"f": f}
    w = g.inputs[1]
    plan = SimpleNamespace(slot_of={}, slots=[], free_after={}, inplace={f: w})
    ex = Executor(g, plan, "fused_inplace")
    a = [rand((8, 4), F32, 0), rand((8, 4), F32, 1), rand((4,), F32, 2)]
    want = run(g, [x.copy() for x in a])
    got = ex(a)
    assert got["f"] is a[1]
    assert_same_outputs(got, want)


def test_fused_where_keeps_its_late_read_operand_out_of_the_output_buffer():
    """where reads x after it starts writing out: a body value in position 1 goes to a
    temporary, so the result is written straight into the output (no extra copy)."""
    from kiln.graph.passes.fuse import fuse
    from kiln.graph.passes.memory import plan as real_plan

    g = Graph()
    tok = g.add_input("tok", (4, 6), np.int64)
    wrapped = g.add("where", [g.add("lt", [tok, g.add_const(np.array(0))]),
                              g.add("add", [tok, g.add_const(np.array(65))]), tok])
    table = g.add_input("table", (70, 3), F32)
    g.outputs["out"] = g.add("index", [table, g.add("reshape", [wrapped], {"shape": (1, 24)})],
                             {"dims": (0,)})
    f = fuse(g)
    assert [n.attrs.get("ops") for n in f.nodes if n.op == "fused"] == ["lt+add+where"]
    ex = Executor(f, real_plan(f, writes_out, {}), "wrap")
    assert "_copyto" not in ex.source and "k_where(" in ex.source
    arrays = [rand_int((4, 6)), rand((70, 3), F32, 1)]
    assert_same_outputs(ex(arrays), run(g, arrays))


def sym_graph():
    B = Sym("B")
    g = Graph()
    x = g.add_input("x", (B, 6), F32)
    w = g.add_input("w", (4, 6), F32)
    h = g.add("linear", [x, w], shape=(B, 4), dtype=F32, loc="sym.py:3")
    r = g.add("relu", [h], shape=(B, 4), dtype=F32, loc="sym.py:4")
    flat = g.add("reshape", [r], {"shape": (Sym("B", 4, 0),)}, shape=(Sym("B", 4, 0),),
                 dtype=F32, loc="sym.py:5")
    e = g.add("exp", [flat], shape=(Sym("B", 4, 0),), dtype=F32, loc="sym.py:6")
    s = g.add("sum", [e], {"axes": (0,), "keepdims": False}, shape=(), dtype=F32,
              loc="sym.py:7")
    g.outputs = {"s": s, "r2": g.add("mul", [r, r], shape=(B, 4), dtype=F32)}
    return g


def test_dynamic_batch_size_two_environments():
    g = sym_graph()
    verify(g)
    plan = stand_in_plan(g, writes_out)
    ex = Executor(g, plan, "dyn")
    assert "d_B = a0.shape[0]" in ex.source and "(4 * d_B)" in ex.source
    w = rand((4, 6), F32, 9, False)
    for batch in (3, 7, 3):
        a = [rand((batch, 6), F32, batch, False), w]
        assert_same_outputs(ex(a), run(g, a))
    bufs = ex.buffers
    assert set(bufs) == {(3,), (7,)}
    assert bufs[(3,)][0].shape[0] == 3 and bufs[(7,)][0].shape[0] == 7
    ex([rand((3, 6), F32, 1, False), w])
    assert all(x is y for x, y in zip(ex.buffers[(3,)], bufs[(3,)]))


def test_fused_node_with_dynamic_batch(monkeypatch):
    monkeypatch.setattr(kiln.jit, "_available", False)  # the numpy path's temporaries
    B = Sym("B")
    body = Graph()
    bx = body.add_input("x", (B, 4), F32)
    sq = body.add("mul", [bx, bx], shape=(B, 4), dtype=F32)
    pos = body.add("gt", [bx, body.add_const(np.array(0.0, F32))], shape=(B, 4), dtype=np.bool_)
    y = body.add("where", [pos, sq, bx], shape=(B, 4), dtype=F32)
    body.outputs = {"y": y}
    g = Graph()
    x = g.add_input("x", (B, 4), F32)
    f = g.add("fused", [x], {"body": body, "ops": "mul+gt+where"}, shape=(B, 4), dtype=F32)
    g.outputs = {"s": g.add("sum", [f], {"axes": (1,), "keepdims": False}, shape=(B,),
                            dtype=F32)}
    plan = stand_in_plan(g, writes_out)
    ex = Executor(g, plan, "fused_dyn")
    assert f in plan.slot_of and ex.fallbacks == []
    for batch in (5, 2, 5):
        a = [rand((batch, 4), F32, batch)]
        assert_same_outputs(ex(a), run(g, a))
    assert [b.shape for b in ex.buffers[(2,)]] == [(2, 4), (2, 4), (2, 4)]
    assert sorted(b.dtype.name for b in ex.buffers[(2,)]) == ["bool", "float32", "float32"]
    assert "_copyto" not in ex.source  # sq, read late by where, is kept out of the output


def test_sym_with_offset_binds_the_dimension():
    B = Sym("B", 2, 1)  # inputs of size 2B+1
    g = Graph()
    x = g.add_input("x", (B,), F64)
    y = g.add("exp", [x], shape=(B,), dtype=F64)
    z = g.add("reshape", [y], {"shape": (1, B)}, shape=(1, B), dtype=F64)
    g.outputs = {"z": g.add("neg", [z], shape=(1, B), dtype=F64)}
    ex = Executor(g, stand_in_plan(g, writes_out), "offset")
    for n in (5, 9):
        a = [rand((n,), F64, n)]
        assert_same_outputs(ex(a), run(g, a))
    assert set(ex.buffers) == {(2,), (4,)}


# -- errors --------------------------------------------------------------------------------------

def test_runtime_error_names_the_node_and_user_line():
    g, _ = mlp_step()
    ex = Executor(g, stand_in_plan(g, writes_out), "train_step", check_inputs=False)
    arrays = mlp_inputs()
    arrays[4] = rand((3, 7), F32, 1, False)  # w2 has the wrong number of columns
    with pytest.raises(ValueError) as info:
        ex(arrays)
    msg = str(info.value)
    node = next(n for n in g.nodes if n.op == "matmul")
    assert f"%{node.id}: f32[8,3] = matmul(%" in msg and "ta=False, tb=True" in msg
    assert "train.py:12" in msg and ex.filename in msg
    text = "".join(traceback.format_exception(info.value))
    assert ex.filename in text
    assert f"# %{node.id} matmul" in text  # the generated line itself, from linecache
    assert info.value.__cause__ is not None


def test_index_out_of_range_names_the_gather():
    g = Graph()
    x = g.add_input("x", (4, 5), F32)
    i = g.add_input("i", (4, 2), np.int64)
    y = g.add("gather", [x, i], {"dim": 1}, loc="loss.py:33")
    g.outputs = {"y": g.add("exp", [y])}
    ex = Executor(g, stand_in_plan(g, writes_out), "gather")
    good = np.array([[0, 1], [4, 2], [3, 3], [0, 0]])
    assert_same_outputs(ex([rand((4, 5)), good]), run(g, [rand((4, 5)), good]))
    bad = good.copy()
    bad[3, 1] = 9
    with pytest.raises(IndexError, match=rf"%{y.id}: f32\[4,2\] = gather\(x, i, dim=1\)") as info:
        ex([rand((4, 5)), bad])
    assert "loss.py:33" in str(info.value)
    assert ex.filename in "".join(traceback.format_exception(info.value))


def test_wrong_input_shape_is_reported_before_running():
    g, _ = mlp_step()
    ex = Executor(g, None, "train_step")
    arrays = mlp_inputs()
    arrays[0] = arrays[0][:5]
    with pytest.raises(RuntimeError, match=r"input x must be f32\[8,6\].*got float32\[5, 6\]"):
        ex(arrays)
    with pytest.raises(ValueError, match="graph takes 5 inputs, got 4"):
        ex(arrays[:4])


# -- the generated source ------------------------------------------------------------------------

def test_one_line_per_node():
    g, _ = mlp_step()
    ex = Executor(g, stand_in_plan(g, writes_out), "train_step")
    lines = ex.source.splitlines()
    for n in g.nodes:
        hits = [ln for ln in lines if f"# %{n.id} {n.op}" in ln]
        assert len(hits) == 1, n
        if n.loc:
            assert hits[0].endswith(f"@ {n.loc}")
    assert any("= k_matmul(b" in ln and "ta=True, tb=False" in ln for ln in lines)
    assert any("= u_subtract(" in ln for ln in lines)  # ufunc kernels are called directly
    assert lines[1].startswith("def train_step(a0, a1, a2, a3, a4):")
    assert "return {'loss': " in lines[-1]


# -- with the real memory plan -------------------------------------------------------------------

def test_real_plan_with_updates_and_a_returned_parameter():
    from kiln.graph.passes.memory import plan as memory_plan

    g, updates = mlp_step()
    w2 = g.inputs[4]
    g.outputs["w2_before"] = w2  # returned while it is updated in place
    ups = {p: n for n, p in updates.items()}
    p = memory_plan(g, writes_out, ups, returned=["loss", "out", "w2_before"])
    assert p.inplace and p.slot_of and w2 in p.copy_before_update
    ex = Executor(g, p, "train_step")
    ref = mlp_inputs()
    mine = [a.copy() for a in ref]
    for _ in range(3):
        want = run(g, ref)
        got = ex(mine)
        assert_same_outputs(got, want)
        assert not np.shares_memory(got["w2_before"], mine[4])
        for n, prm in p.inplace.items():
            assert got[next(k for k, v in g.outputs.items() if v is n)] is mine[
                g.inputs.index(prm)]
        ref = ref[:2] + [want["new_w1"], want["new_b1"], want["new_w2"]]
        for prm, n in ups.items():  # what kiln.compile does for updates not made in place
            k = g.inputs.index(prm)
            name = next(k2 for k2, v in g.outputs.items() if v is n)
            if got[name] is not mine[k]:
                np.copyto(mine[k], got[name])
    for a, b in zip(mine, ref):
        assert same(a, b)
