"""Memory planning: slot reuse, aliasing through views, frees, in-place state updates, and an
end-to-end check with a tiny ``out=`` executor against the reference interpreter."""

import numpy as np
import pytest

from kiln.backends.interpreter import run
from kiln.graph.ir import Graph, GraphError
from kiln.graph.passes.fuse import fuse
from kiln.graph.passes.memory import MemoryPlan, _default_overwrite_ok, aliased_input, plan
from kiln.graph.symbolic import Sym, resolve
from kiln.ops.registry import REGISTRY

F32 = np.float32
MM = {"ta": False, "tb": False}
T = {"dims": (1, 0)}


def always(n):
    return True


# -- the tiny executor -------------------------------------------------------------------------

def execute(g: Graph, mp: MemoryPlan, arrays: list, updates: dict, buffers: dict, env=None):
    """Run ``g`` as a codegen executor would under plan ``mp``.

    ``arrays`` are the inputs' storages (state inputs are updated in them).  A slot node's
    buffer is filled with NaN before the kernel reads its inputs, as a kernel using ``out`` as
    scratch would: if the buffer were still holding a live value, that value is destroyed.
    In-place nodes read all inputs, then write.  Freed values are deleted, so a value used
    after the plan freed it raises KeyError."""
    env = env or {}
    vals = dict(zip(g.inputs, arrays))
    storage = dict(zip(g.inputs, arrays))
    for n in g.nodes:
        args = [vals[i] for i in n.inputs]
        buf = None
        if n in mp.slot_of:
            s = mp.slot_of[n]
            shape, dtype = mp.slots[s]
            if s not in buffers:
                buffers[s] = np.empty(resolve(shape, env), dtype)
            buf = buffers[s]
            assert buf.shape == resolve(n.shape, env) and buf.dtype == n.dtype
            # over one of its own dying inputs (overwrite_ok), a kernel reads before it writes
            if buf.dtype.kind == "f" and not any(np.shares_memory(buf, a) for a in args):
                buf.fill(np.nan)
        if n.op == "const":
            out = n.attrs["value"]
        elif n.op == "fused":
            out = run(n.attrs["body"], args, env)["out"]
        else:
            out = np.asarray(REGISTRY[n.op].impl(*args, **resolve(n.attrs, env)))
        if buf is not None:
            np.copyto(buf, out)
            out = buf
        elif n in mp.inplace:
            dst = storage[mp.inplace[n]]
            np.copyto(dst, out)
            out = dst
        vals[n] = out
        for v in mp.free_after.get(n, []):
            del vals[v]
    for v in mp.copy_before_update:
        vals[v] = vals[v].copy()
    outs = {k: vals[v] for k, v in g.outputs.items()}
    for p, n in updates.items():
        if mp.inplace.get(n) is not p:  # one node may be the new value of two inputs
            np.copyto(storage[p], vals[n])
    return outs


def check_plan(g: Graph, updates: dict, writes_out=always, seed=0, calls=3, env=None, mp=None,
               returned=None, **kw):
    """Execute under the plan ``calls`` times; outputs and state must match the interpreter,
    and outputs returned by earlier calls must not change afterwards."""
    mp = mp or plan(g, writes_out, updates, returned=returned, **kw)
    returned = list(g.outputs) if returned is None else returned
    rng = np.random.default_rng(seed)
    shapes = [resolve(n.shape, env or {}) for n in g.inputs]
    ref = [rng.standard_normal(s).astype(n.dtype) for s, n in zip(shapes, g.inputs)]
    state = [a.copy() for a in ref]
    buffers: dict = {}
    earlier = []
    idx = {p: g.inputs.index(p) for p in updates}
    for _ in range(calls):
        want = run(g, [a.copy() for a in ref], env)
        new_state = run_updates(g, updates, ref, env)
        got = execute(g, mp, state, updates, buffers, env)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"output {k}")
        for p, v in new_state.items():
            np.testing.assert_array_equal(state[idx[p]], v, err_msg=f"state {p.name}")
            ref[idx[p]] = v
        for i, n in enumerate(g.inputs):
            if n not in updates:
                np.testing.assert_array_equal(state[i], ref[i], err_msg=f"input {n.name}")
        got = {k: got[k] for k in returned}
        for k in got:
            assert not any(np.shares_memory(got[k], b) for b in buffers.values())
            assert not any(np.shares_memory(got[k], state[i]) for i in idx.values())
        earlier.append(({k: v.copy() for k, v in got.items()}, got))
    for saved, got in earlier:
        for k in saved:
            np.testing.assert_array_equal(got[k], saved[k])
    return mp


def run_updates(g: Graph, updates: dict, arrays: list, env=None) -> dict:
    """{state input: its new value} by the interpreter."""
    h = Graph()
    h.inputs, h.nodes = g.inputs, g.nodes
    h.outputs = {f"u{k}": n for k, n in enumerate(updates.values())}
    vals = run(h, [a.copy() for a in arrays], env)
    return {p: vals[f"u{k}"] for k, p in enumerate(updates)}


def storage_slot(mp: MemoryPlan, g: Graph):
    """{value: slot its storage lives in} following views."""
    out = {}
    for n in g.nodes:
        a = aliased_input(n)
        if n in mp.slot_of:
            out[n] = mp.slot_of[n]
        elif a is not None and a in out:
            out[n] = out[a]
    return out


def check_invariants(g: Graph, mp: MemoryPlan, updates: dict, returned=None):
    outputs = {g.outputs[k] for k in (g.outputs if returned is None else returned)}
    where = storage_slot(mp, g)
    users = g.users()
    pos = {n: k for k, n in enumerate(g.nodes)}

    def root_of(v):
        while v not in mp.slot_of:
            v = aliased_input(v)
        return v

    for n, s in mp.slot_of.items():
        assert n not in outputs and n.op not in ("input", "const")
        assert aliased_input(n) is None
        assert mp.slots[s] == (n.shape, n.dtype)
        for k, i in enumerate(n.inputs):
            if where.get(i) == s:  # only over a value that dies here, where the kernel allows
                assert _default_overwrite_ok(n, k), f"{n} writes over its own input"
                owner = i
                while owner not in mp.slot_of:
                    owner = aliased_input(owner)
                alive = [u for v, t in where.items() if t == s and root_of(v) is owner
                         for u in users[v]]
                assert all(pos[u] <= pos[n] for u in alive), f"{n} overwrites a live value"
                assert owner not in g.outputs.values()
    for n in outputs:
        assert n not in where, f"output {n} lives in a slot"
    for vs in mp.free_after.values():
        assert not set(vs) & (set(g.outputs.values()) | set(updates.values()))
    assert not set(mp.inplace) & set(mp.slot_of)


# -- slot reuse --------------------------------------------------------------------------------

def _chain(shape=(3, 3)):
    g = Graph()
    x = g.add_input("x", shape, F32)
    a = g.add("exp", [x])
    b = g.add("tanh", [a])
    c = g.add("neg", [b])
    d = g.add("sin", [c])
    g.outputs["out"] = g.add("cos", [d])
    return g, (a, b, c, d)


def test_slots_are_reused_when_lifetimes_do_not_overlap():
    g, (a, b, c, d) = _chain()
    mp = check_plan(g, {}, overwrite_ok=None)
    check_invariants(g, mp, {})
    assert mp.slots == [((3, 3), np.dtype(F32))] * 2
    assert mp.slot_of == {a: 0, b: 1, c: 0, d: 1}


def test_an_elementwise_chain_overwrites_its_dying_inputs():
    g, (a, b, c, d) = _chain()
    mp = check_plan(g, {})
    check_invariants(g, mp, {})
    assert mp.slots == [((3, 3), np.dtype(F32))]
    assert mp.slot_of == {a: 0, b: 0, c: 0, d: 0}


def test_no_overwrite_of_a_live_input_or_at_an_unsafe_position():
    g = Graph()
    x = g.add_input("x", (3, 3), F32)
    a = g.add("exp", [x])
    b = g.add("tanh", [a])  # a is read again below: b may not take its slot
    s = g.add("sin", [x])
    w = g.add("cos", [x])
    m = g.add("gt", [x, x])
    c = g.add("tanh_backward", [a, b])  # reads g (position 0) after writing out; y first
    d = g.add("sigmoid_backward", [c, s])  # both positions are read late
    e = g.add("where", [m, d, w])  # x (position 1) is read late, y (position 2) first
    g.outputs["out"] = g.add("neg", [e])
    mp = check_plan(g, {})
    check_invariants(g, mp, {})
    assert mp.slot_of[b] != mp.slot_of[a]
    assert mp.slot_of[c] == mp.slot_of[b]
    assert mp.slot_of[d] not in (mp.slot_of[c], mp.slot_of[s])
    assert mp.slot_of[e] == mp.slot_of[w]
    # with the view of a dying value at an unsafe position, not even the safe one is taken
    h = Graph()
    x = h.add_input("x", (4, 4), F32)
    a = h.add("exp", [x])
    t = h.add("permute", [a], T)
    h.outputs["out"] = h.add("neg", [h.add("tanh_backward", [t, a])])
    mp = check_plan(h, {})
    check_invariants(h, mp, {})
    assert len({mp.slot_of[a], mp.slot_of[h.nodes[2]]}) == 2


def test_fused_node_overwrites_an_input_unless_its_last_op_reads_it_late():
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    a = g.add("matmul", [x, x], MM)
    c = g.add("where", [g.add("gt", [x, x]), a, g.add("neg", [x])])  # a: position 1, late
    d = g.add("matmul", [x, x], {"ta": True, "tb": False})
    e = g.add("tanh", [g.add("add", [d, d])])  # d is read first, inside the body
    g.outputs["out"] = g.add("matmul", [c, e], MM)
    f = fuse(g)
    fc, fe = (n for n in f.nodes if n.op == "fused")
    assert (fc.attrs["ops"], fe.attrs["ops"]) == ("gt+neg+where", "add+tanh")
    mp = check_plan(f, {})
    check_invariants(f, mp, {})
    assert mp.slot_of[fc] != mp.slot_of[a]  # its where would have to go through a copy
    assert mp.slot_of[fe] == mp.slot_of[d]


def test_slots_are_not_shared_by_live_values():
    g = Graph()
    x = g.add_input("x", (3, 3), F32)
    a = g.add("exp", [x])
    b = g.add("tanh", [x])
    c = g.add("add", [a, b])  # a and b are live together; c may not take either's slot
    g.outputs["out"] = g.add("neg", [c])
    mp = check_plan(g, {}, overwrite_ok=None)
    check_invariants(g, mp, {})
    assert len({mp.slot_of[a], mp.slot_of[b], mp.slot_of[c]}) == 3


def test_shape_and_dtype_must_match_for_reuse():
    g = Graph()
    x = g.add_input("x", (3, 3), F32)
    a = g.add("exp", [x])
    b = g.add("sum", [a], {"axes": (0,), "keepdims": False})  # (3,)
    c = g.add("cast", [b], {"dtype": np.dtype(np.float64)})
    d = g.add("tanh", [c])
    g.outputs["out"] = g.add("neg", [d])
    mp = check_plan(g, {}, overwrite_ok=None)
    check_invariants(g, mp, {})
    assert len(mp.slots) == 4  # a, b, c all differ; d (f64[3]) cannot take c's: c is its input
    assert mp.slot_of[d] not in (mp.slot_of[a], mp.slot_of[b])


def test_a_view_keeps_its_base_slot_busy():
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    a = g.add("exp", [x])
    v = g.add("permute", [a], T)  # aliases a's buffer
    w = g.add("reshape", [v], {"shape": (4, 4)})  # ... transitively
    b = g.add("tanh", [x])  # a's last direct reader is long gone: only the views keep it
    c = g.add("neg", [b])
    d = g.add("sin", [c])
    g.outputs["out"] = g.add("add", [d, w])
    mp = check_plan(g, {})
    check_invariants(g, mp, {})
    assert mp.slot_of[a] not in (mp.slot_of[b], mp.slot_of[c], mp.slot_of[d])
    assert v not in mp.slot_of and w not in mp.slot_of

    # Control: the same graph reading a copy instead of a view does reuse a's slot.
    h = Graph()
    x = h.add_input("x", (4, 4), F32)
    a = h.add("exp", [x])
    v = h.add("contiguous", [h.add("permute", [a], T)])
    b = h.add("tanh", [x])
    c = h.add("neg", [b])
    h.outputs["out"] = h.add("add", [h.add("sin", [c]), v])
    mp = check_plan(h, {})
    assert mp.slot_of[a] in (mp.slot_of[b], mp.slot_of[c])


def test_outputs_and_their_bases_get_no_slot():
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    a = g.add("exp", [x])
    b = g.add("tanh", [x])
    c = g.add("mul", [a, b])
    g.outputs["c"] = c
    g.outputs["bt"] = g.add("permute", [b], T)  # an output aliasing b: b must be fresh too
    s = g.add("neg", [x])
    g.outputs["cp"] = g.add("copy", [x, s])  # copy returns s itself
    mp = check_plan(g, {})
    check_invariants(g, mp, {})
    assert set(mp.slot_of) == {a}


def test_only_nodes_that_write_out_get_slots():
    g, (a, b, c, d) = _chain()
    mp = check_plan(g, {}, writes_out=lambda n: n.op in ("exp", "neg"))
    assert set(mp.slot_of) == {a, c}
    assert mp.slot_of[a] == mp.slot_of[c]


def test_symbolic_shapes():
    B = Sym("B")
    g = Graph()
    x = g.add_input("x", (B, 3), F32)
    a = g.add("exp", [x], shape=(B, 3), dtype=F32)
    b = g.add("tanh", [a], shape=(B, 3), dtype=F32)
    c = g.add("neg", [b], shape=(B, 3), dtype=F32)
    g.outputs["out"] = g.add("sin", [c], shape=(B, 3), dtype=F32)
    mp = plan(g, always, {}, overwrite_ok=None)
    assert mp.slots == [((B, 3), np.dtype(F32))] * 2 and mp.slot_of[a] == mp.slot_of[c]
    assert len(plan(g, always, {}).slots) == 1
    check_plan(g, {}, mp=mp, env={"B": 5})


# -- frees -------------------------------------------------------------------------------------

def test_free_after_last_reader():
    g = Graph()
    x = g.add_input("x", (3,), F32)
    y = g.add_input("y", (3,), F32)
    a = g.add("exp", [x])
    dead = g.add("neg", [y])
    b = g.add("mul", [a, x])
    c = g.add("add", [b, a])
    g.outputs["c"] = c
    g.outputs["a2"] = g.add("sin", [c])
    mp = plan(g, always, {})
    assert mp.free_after == {dead: [y, dead], b: [x], c: [a, b]}
    check_plan(g, {}, mp=mp)


def test_outputs_and_updates_are_never_freed():
    g = Graph()
    p = g.add_input("p", (3,), F32, kind="captured")
    x = g.add_input("x", (3,), F32)
    a = g.add("mul", [p, x])
    g.outputs["a"] = a
    new = g.add("sub", [p, x])
    g.outputs["b"] = g.add("neg", [a])
    mp = check_plan(g, {p: new}, writes_out=lambda n: False)
    freed = {v for vs in mp.free_after.values() for v in vs}
    assert freed == {p, x}


# -- in-place state updates --------------------------------------------------------------------

def _sgd(read_after=False, view_after=False):
    g = Graph()
    p = g.add_input("p", (4, 4), F32, kind="captured")
    x = g.add_input("x", (4, 4), F32)
    lr = g.add_const(np.array(0.1, F32))
    y = g.add("matmul", [x, p], MM)
    pt = g.add("permute", [p], T) if view_after else None
    loss = g.add("sum", [g.add("mul", [y, y])], {"axes": (0, 1), "keepdims": False})
    grad = g.add("matmul", [x, y], {"ta": True, "tb": False})
    new = g.add("sub", [p, g.add("mul", [lr, grad])])
    g.outputs["loss"] = loss
    if read_after:
        g.outputs["y2"] = g.add("matmul", [x, p], MM)  # reads the old p after the update
    if view_after:
        g.outputs["z"] = g.add("matmul", [x, pt], MM)
    return g, p, new


def test_param_update_is_planned_in_place():
    g, p, new = _sgd()
    mp = check_plan(g, {p: new})
    check_invariants(g, mp, {p: new})
    assert mp.inplace == {new: p} and new not in mp.slot_of


def test_param_update_in_place_after_fusion():
    g, p, new = _sgd()
    f = fuse(g)
    fnew = f.nodes[-1]
    assert fnew.op == "fused" and fnew.attrs["ops"] == "mul+sub"
    mp = check_plan(f, {p: fnew})
    assert mp.inplace == {fnew: p}


def test_no_in_place_when_p_is_read_after_the_update():
    g, p, new = _sgd(read_after=True)
    mp = check_plan(g, {p: new})
    check_invariants(g, mp, {p: new})
    assert mp.inplace == {}
    assert new in mp.slot_of  # pinned in its own slot until the copy back


def test_no_in_place_when_a_view_of_p_is_live_after_the_update():
    g, p, new = _sgd(view_after=True)
    mp = check_plan(g, {p: new})
    assert mp.inplace == {}


def test_no_in_place_through_a_view_or_unsafe_kernel():
    g = Graph()
    p = g.add_input("p", (4, 4), F32, kind="captured")
    new = g.add("add", [g.add("permute", [p], T), p])  # reads p through a view: overlap
    g.outputs["out"] = g.add("sum", [new], {"axes": (0,), "keepdims": False})
    assert plan(g, always, {p: new}).inplace == {}
    check_plan(g, {p: new})

    h = Graph()
    p = h.add_input("p", (4, 4), F32, kind="captured")
    new = h.add("tanh", [p])
    assert plan(h, always, {p: new}).inplace == {new: p}
    assert plan(h, always, {p: new}, alias_safe=lambda n: False).inplace == {}
    # A kernel that does not read p needs no aliasing guarantee.
    q = h.add_input("q", (4, 4), F32)
    s = h.add("sin", [p])
    new2 = h.add("cos", [q])
    h.outputs["s"] = h.add("neg", [s])
    mp = plan(h, always, {p: new2}, alias_safe=lambda n: False)
    assert mp.inplace == {new2: p}
    check_plan(h, {p: new2}, mp=mp)


def test_no_in_place_for_shape_dtype_output_or_no_out():
    def build():
        g = Graph()
        p = g.add_input("p", (4,), F32, kind="captured")
        x = g.add_input("x", (3, 4), F32)
        return g, p, x

    g, p, x = build()
    new = g.add("sub", [p, x])  # broadcasts to (3, 4)
    assert plan(g, always, {p: new}).inplace == {}
    g, p, x = build()
    new = g.add("cast", [p], {"dtype": np.dtype(np.float64)})
    assert plan(g, always, {p: new}).inplace == {}
    g, p, x = build()
    new = g.add("neg", [p])
    g.outputs["new"] = new  # would hand the parameter's own storage to the user
    assert plan(g, always, {p: new}).inplace == {}
    check_plan(g, {p: new})
    g, p, x = build()
    new = g.add("neg", [p])
    assert plan(g, lambda n: False, {p: new}).inplace == {}
    g, p, x = build()
    assert plan(g, always, {p: g.add("reshape", [p], {"shape": (4,)})}).inplace == {}


def test_adam_like_update_end_to_end():
    g = Graph()
    p = g.add_input("p", (8,), F32, kind="captured")
    m = g.add_input("m", (8,), F32, kind="captured")
    v = g.add_input("v", (8,), F32, kind="captured")
    x = g.add_input("x", (8,), F32)
    c = {k: g.add_const(np.array(val, F32)) for k, val in
         {"b1": 0.9, "nb1": 0.1, "b2": 0.999, "nb2": 0.001, "lr": 0.01, "eps": 1e-8}.items()}
    g.outputs["loss"] = g.add("sum", [g.add("mul", [p, x])], {"axes": (0,), "keepdims": False})
    grad = g.add("mul", [g.add("tanh", [g.add("mul", [p, x])]), x])
    m2 = g.add("add", [g.add("mul", [c["b1"], m]), g.add("mul", [c["nb1"], grad])])
    v2 = g.add("add", [g.add("mul", [c["b2"], v]), g.add("mul", [c["nb2"],
                                                                 g.add("mul", [grad, grad])])])
    step = g.add("div", [g.add("mul", [c["lr"], m2]), g.add("add", [g.add("sqrt", [v2]),
                                                                    c["eps"]])])
    p2 = g.add("sub", [p, step])
    # Capture lists update values as outputs too, so that dce and fuse keep them.
    g.outputs.update({"new_p": p2, "new_m": m2, "new_v": v2})
    for graph in (g, fuse(g)):
        o = graph.outputs
        ups = {p: o["new_p"], m: o["new_m"], v: o["new_v"]}
        mp = check_plan(graph, ups, returned=["loss"])
        check_invariants(graph, mp, ups, returned=["loss"])
        # m2 and v2 are read by the step after they are computed, which is fine: the old m
        # and v are not read then.  p is read by the loss, before p2.
        assert mp.inplace == {o["new_p"]: p, o["new_m"]: m, o["new_v"]: v}
    assert fuse(g).counts() == {"const": 6, "mul": 1, "sum": 1, "fused": 4}
    # Returned to the user, the new values must be fresh arrays: no in-place then.
    assert plan(g, always, {p: p2, m: m2, v: v2}).inplace == {}


def test_values_aliasing_updated_state_are_copied_before_the_write_back():
    g = Graph()
    p = g.add_input("p", (4, 4), F32, kind="captured")
    q = g.add_input("q", (4, 4), F32, kind="captured")
    pt = g.add("permute", [p], T)
    g.outputs["pt"] = pt  # the user keeps the old p, seen through a view
    qr = g.add("reshape", [q], {"shape": (4, 4)})
    pr = g.add("reshape", [p], {"shape": (4, 4)})
    g.outputs.update({"new_p": qr, "new_q": pr})
    updates = {p: qr, q: pr}  # swap p and q
    mp = check_plan(g, updates, returned=["pt"])
    assert mp.copy_before_update == [pt, qr, pr] and mp.inplace == {}


# -- randomized end-to-end ---------------------------------------------------------------------

def _random_graph(rng):
    g = Graph()
    params = [g.add_input(f"p{k}", (4, 4), F32, kind="captured") for k in range(2)]
    vals = params + [g.add_input("x", (4, 4), F32), g.add_input("y", (4,), F32)]
    for _ in range(int(rng.integers(5, 30))):
        a = vals[int(rng.integers(len(vals)))]
        b = vals[int(rng.integers(len(vals)))]
        k = rng.random()
        if k < 0.25:
            n = g.add(["tanh", "sin", "neg", "relu"][int(rng.integers(4))], [a])
        elif k < 0.5:
            n = g.add(["add", "mul", "sub", "maximum"][int(rng.integers(4))], [a, b])
        elif a.shape != (4, 4):
            continue
        elif k < 0.62:
            n = g.add("permute", [a], T)
        elif k < 0.7:
            n = g.add("reshape", [a], {"shape": (4, 4)})
        elif k < 0.8:
            n = g.add("matmul", [a, a], MM)
        elif k < 0.88:
            n = g.add("sum", [a], {"axes": (1,), "keepdims": True})
        elif k < 0.94 and b.shape[-1] == 4:
            n = g.add("copy", [a, b])
        else:
            n = g.add("index_view", [a], {"index": (int(rng.integers(4)),)})  # a row view
        vals.append(n)
    comps = vals[4:]
    for k in range(int(rng.integers(1, 3))):
        g.outputs[f"o{k}"] = comps[int(rng.integers(len(comps)))]
    returned = list(g.outputs)
    for p in params:
        cands = [n for n in comps if n.shape == (4, 4)]
        if cands and rng.random() < 0.8:
            g.outputs[f"new_{p.name}"] = cands[int(rng.integers(len(cands)))]
    return g, returned


@pytest.mark.parametrize("seed", range(60))
def test_random_graphs_run_correctly_under_the_plan(seed):
    rng = np.random.default_rng(seed)
    g, returned = _random_graph(rng)
    if seed % 2:
        g = fuse(g)
    updates = {p: g.outputs[f"new_{p.name}"] for p in g.inputs if f"new_{p.name}" in g.outputs}
    picks = {n: rng.random() < 0.8 for n in g.nodes}
    mp = check_plan(g, updates, writes_out=picks.__getitem__, seed=seed, returned=returned)
    check_invariants(g, mp, updates, returned)


def test_the_executor_check_catches_a_bad_plan():
    """A plan that reuses a live buffer must make ``check_plan`` fail (the test can fail)."""
    g = Graph()
    x = g.add_input("x", (4, 4), F32)
    a = g.add("exp", [x])
    v = g.add("permute", [a], T)
    b = g.add("tanh", [x])
    c = g.add("neg", [b])
    g.outputs["out"] = g.add("add", [c, v])
    good = plan(g, always, {})
    bad = MemoryPlan(slot_of={a: 0, b: 1, c: 0}, slots=list(good.slots),
                     free_after=good.free_after, inplace={})
    check_plan(g, {}, mp=good)
    with pytest.raises(AssertionError):
        check_plan(g, {}, mp=bad)


def test_updates_must_map_inputs_to_graph_values():
    g, p, new = _sgd()
    other = Graph().add_input("q", (4, 4), F32)
    with pytest.raises(GraphError, match="update"):
        plan(g, always, {new: p})
    with pytest.raises(GraphError, match="update"):
        plan(g, always, {p: other})
