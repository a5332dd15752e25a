"""concat_slices: sums of slab gradients that tile a dimension become cat + 0.0, bitwise equal."""

import numpy as np
import pytest

import kiln
from kiln.backends.interpreter import run
from kiln.graph.ir import Graph, verify
from kiln.graph.passes.concat_slices import concat_slices
from kiln.ops.index import Slice

F32 = np.float32


def slab(g, x, shape, dim, start, stop):
    index = tuple(Slice(start, stop, 1) if k == dim else Slice(0, n, 1)
                  for k, n in enumerate(shape))
    return g.add("index_view_backward", [x], {"shape": shape, "index": index})


def qkv_grad(order=((0, 0), (1, 1), (2, 2)), nested_right=False, shape=(2, 3, 12), dim=2,
             bounds=((0, 4), (4, 8), (8, 12))):
    """Three slab gradients of ``shape`` added as in the backward of ``qkv.split``."""
    g = Graph()
    parts = []
    for k, (a, b) in enumerate(bounds):
        s = list(shape)
        s[dim] = b - a
        x = g.add_input(f"g{k}", tuple(s), F32)
        parts.append(slab(g, g.add("neg", [x]), shape, dim, a, b))
    p = [parts[i] for i, _ in order]
    if nested_right:
        total = g.add("add", [p[0], g.add("add", [p[1], p[2]])])
    else:
        total = g.add("add", [g.add("add", [p[0], p[1]]), p[2]])
    g.outputs["grad"] = g.add("mul", [total, total])
    verify(g)
    return g


def inputs(g, seed=0):
    rng = np.random.default_rng(seed)
    arrays = []
    for n in g.inputs:
        a = rng.standard_normal(n.shape).astype(n.dtype)
        flat = a.reshape(-1)
        flat[:4] = [0.0, -0.0, np.nan, -np.inf]  # neg turns these into -0.0, +0.0, nan, inf
        arrays.append(a)
    return arrays


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_same(g, h):
    for seed in range(3):
        arrays = inputs(g, seed)
        want, got = run(g, arrays), run(h, arrays)
        for k in want:
            assert same(got[k], want[k]), k


@pytest.mark.parametrize("nested_right", [False, True])
@pytest.mark.parametrize("order", [((0, 0), (1, 1), (2, 2)), ((2, 2), (0, 0), (1, 1))])
def test_tiling_sum_becomes_one_cat(order, nested_right):
    g = qkv_grad(order, nested_right)
    h = concat_slices(g)
    verify(h)
    assert h.counts() == {"neg": 3, "cat": 1, "const": 1, "add": 1, "mul": 1}
    cat = next(n for n in h.nodes if n.op == "cat")
    assert cat.attrs == {"dim": 2} and [i.inputs[0].name for i in cat.inputs] == ["g0", "g1",
                                                                               "g2"]
    check_same(g, h)


def test_signed_zero_is_kept_as_the_sum_gives_it():
    """The sum turns -0.0 into +0.0; so must the rewrite (a bare cat would keep -0.0)."""
    g = qkv_grad()
    g.outputs = {"grad": g.nodes[-2]}  # the sum itself
    h = concat_slices(g)
    arrays = inputs(g)
    got = run(h, arrays)["grad"]
    assert same(got, run(g, arrays)["grad"])
    assert not np.signbit(got.reshape(-1)[0])  # neg(0.0) = -0.0, summed with zeros: +0.0


def test_other_dimension_and_two_slabs():
    g = qkv_grad(shape=(6, 5), dim=0, bounds=((0, 2), (2, 6)), order=((0, 0), (1, 1), (1, 1)))
    # the third leaf repeats the second: an overlap, so nothing may change
    assert concat_slices(g) is g
    g2 = Graph()
    a, b = g2.add_input("a", (2, 5), F32), g2.add_input("b", (4, 5), F32)
    g2.outputs["s"] = g2.add("add", [slab(g2, a, (6, 5), 0, 0, 2), slab(g2, b, (6, 5), 0, 2, 6)])
    h = concat_slices(g2)
    assert h.counts() == {"cat": 1, "const": 1, "add": 1}
    check_same(g2, h)


@pytest.mark.parametrize("case", ["gap", "other_user", "output", "int_index", "broadcast_add",
                                  "non_slab_leaf"])
def test_left_alone(case):
    g = Graph()
    a, b = g.add_input("a", (2, 4), F32), g.add_input("b", (2, 4), F32)
    shape = (2, 12)
    if case == "gap":
        s1, s2 = slab(g, a, shape, 1, 0, 4), slab(g, b, shape, 1, 6, 10)
        g.inputs[1].shape = (2, 4)
    else:
        c = g.add_input("c", (2, 8), F32)
        s1, s2 = slab(g, a, shape, 1, 0, 4), slab(g, c, shape, 1, 4, 12)
    if case == "non_slab_leaf":
        s2 = g.add("exp", [s2])
    if case == "int_index":
        x = g.add_input("x", (12,), F32)
        s2 = g.add("index_view_backward", [x], {"shape": shape, "index": (1,)})
        s1 = slab(g, g.add_input("y", (1, 12), F32), shape, 0, 0, 1)
    if case == "broadcast_add":
        s2 = g.add("add", [s2, g.add_input("r", (12,), F32)])
    total = g.add("add", [s1, s2])
    g.outputs["s"] = total
    if case == "other_user":
        g.outputs["t"] = g.add("neg", [s2])
    if case == "output":
        g.outputs["t"] = s1
    verify(g)
    assert concat_slices(g) is g


@pytest.mark.parametrize("packed", [True, False])
def test_attention_training_step_compiles_to_cats_and_matches_eager(packed):
    """The q/k/v split of a compiled attention step: cats instead of slab gradients when the
    heads are used as views of their own (packed=False: k and v swapped, so attention cannot
    take the projection whole), no split gradient at all when attention takes the projection
    (attention_packed); the same updated parameters as eager mode, bitwise."""
    B, T, C, H = 2, 5, 8, 2

    def make():
        kiln.manual_seed(0)
        w = kiln.randn(C, 3 * C).requires_grad_()
        x = kiln.randn(B, T, C)
        opt = kiln.optim.SGD([w], lr=0.1)

        def step():
            opt.zero_grad()
            q, k, v = (x @ w).split(C, dim=2)
            heads = [t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v)]
            if not packed:
                heads = [heads[0], heads[2], heads[1]]
            y = kiln.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
            loss = (y * y).sum()
            loss.backward()
            opt.step()
            return loss

        return w, step

    w_eager, step_eager = make()
    w_comp, step = make()
    step = kiln.compile(step)
    for _ in range(3):
        want, got = step_eager(), step()
        assert same(got.detach().numpy(), want.detach().numpy())
        assert same(w_comp.detach().numpy(), w_eager.detach().numpy())
    counts = step.graph().counts()
    assert "index_view_backward" not in counts
    if packed:
        assert counts.get("attention_packed") == 1 and "cat" not in counts
    else:
        assert counts.get("cat") == 1 and counts.get("attention") == 1
