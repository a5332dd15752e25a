"""Fused elementwise groups as native kernels (kiln/backends/jit_fused.py): compiled with the JIT,
compiled without it and the interpreter agree bitwise (only exact float32 operations are mapped)."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
import kiln.jit  # noqa: E402
from kiln.backends import jit_fused  # noqa: E402
from kiln.backends.codegen import Executor  # noqa: E402
from kiln.backends.interpreter import run as interpret  # noqa: E402
from kiln.backends.kernels import writes_out  # noqa: E402
from kiln.graph.ir import Graph  # noqa: E402
from kiln.graph.passes.fuse import fuse  # noqa: E402
from kiln.graph.passes.memory import plan  # noqa: E402
from kiln.graph.symbolic import Sym  # noqa: E402

F32, F64, BOOL = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.bool_)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs, as numpy


@pytest.fixture(autouse=True)
def jit_on(monkeypatch):
    monkeypatch.setattr(kiln.jit, "_available", True)
    monkeypatch.setattr(jit_fused, "MIN_WORK", 1)  # small graphs take the native path too


def executor(g: Graph, jit: bool, updates=None, returned=None):
    kiln.jit._available = jit
    try:
        f = fuse(g)
        ups = {x: f.outputs[name] for x, name in (updates or {}).items()}  # {input: output name}
        return Executor(f, plan(f, writes_out, ups, returned=returned), "t")
    finally:
        kiln.jit._available = True


def awkward(shape, seed, dtype=F32):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * 3).astype(dtype)
    flat = a.reshape(-1)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40], dtype)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    return a


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype.kind == "f":  # bitwise, NaN included, signed zeros distinguished
        bits = f"u{a.dtype.itemsize}"
        nan = np.isnan(a)
        assert np.array_equal(nan, np.isnan(b))
        assert np.array_equal(a[~nan].view(bits), b[~nan].view(bits))
    else:
        assert np.array_equal(a, b)


def check(g: Graph, arrays, expect_native=True, **kw):
    on, off = executor(g, True, **kw), executor(g, False, **kw)
    assert ("= jf" in on.source) == expect_native, on.source
    assert "= jf" not in off.source
    ref = interpret(g, [a.copy() for a in arrays])
    r_off = off([a.copy() for a in arrays])
    r_on = on([a.copy() for a in arrays])
    for k in ref:
        same(r_off[k], ref[k])
        same(r_on[k], ref[k])
    return on


def test_bias_relu_scale_broadcast_row():
    g = Graph()
    x = g.add_input("x", (64, 300), F32)
    b = g.add_input("b", (300,), F32)
    y = g.add("mul", [g.add("relu", [g.add("add", [x, b])]), g.add_const(np.float32(2.5))])
    g.outputs = {"y": g.add("neg", [y])}
    check(g, [awkward((64, 300), 1), awkward((300,), 2)])


def test_per_row_column_and_scalar_inputs():
    g = Graph()
    x = g.add_input("x", (32, 4, 50), F32)
    c = g.add_input("c", (32, 4, 1), F32)
    s = g.add_input("s", (), F32)
    d = g.add("div", [g.add("sub", [x, c]), s])
    g.outputs = {"y": g.add("maximum", [g.add("minimum", [d, x]), c])}
    check(g, [awkward((32, 4, 50), 3), awkward((32, 4, 1), 4), np.array(0.3, F32)])


def test_layout_with_no_single_split_keeps_numpy():
    # a (T, T) mask and a per-row statistic of (B, H, T, T): no one (rows, cols) view fits both
    g = Graph()
    x = g.add_input("x", (2, 3, 8, 8), F32)
    r = g.add_input("r", (2, 3, 8, 1), F32)
    m = g.add_input("m", (8, 8), BOOL)
    z = g.add_const(np.float32(0))
    g.outputs = {"y": g.add("where", [m, g.add("mul", [g.add("sub", [x, r]), x]), z])}
    rng = np.random.default_rng(5)
    check(g, [awkward((2, 3, 8, 8), 5), awkward((2, 3, 8, 1), 6), rng.random((8, 8)) > 0.5],
          expect_native=False)


def test_comparisons_where_bool_output_and_casts():
    g = Graph()
    x = g.add_input("x", (40, 30), F32)
    y = g.add_input("y", (40, 30), F32)
    lt = g.add("lt", [x, y])
    ne = g.add("ne", [x, y])
    both = g.add("logical_and", [g.add("logical_not", [lt]), ne])
    g.outputs = {"mask": both}
    h = Graph()
    x2 = h.add_input("x", (40, 30), F32)
    y2 = h.add_input("y", (40, 30), F32)
    c = h.add("cast", [h.add("ge", [x2, y2])], {"dtype": F32})
    w = h.add("where", [h.add("le", [x2, y2]), x2, c])
    t = h.add("cast", [w], {"dtype": BOOL})
    h.outputs = {"z": h.add("cast", [t], {"dtype": F32})}
    a = [awkward((40, 30), 7), awkward((40, 30), 8)]
    a[1].reshape(-1)[:7] = a[0].reshape(-1)[:7][::-1]
    check(g, a)
    check(h, a)


def test_relu_backward_and_square_sqrt_pow():
    g = Graph()
    gr = g.add_input("g", (50, 20), F32)
    y = g.add_input("y", (50, 20), F32)
    r = g.add("relu_backward", [g.add("mul", [gr, gr]), y])
    p = g.add("pow", [g.add("abs", [r]), g.add_const(np.float32(0.5))])
    g.outputs = {"out": g.add("pow", [p, g.add_const(np.float32(2.0))])}
    check(g, [awkward((50, 20), 9), awkward((50, 20), 10)])


def test_adam_like_float64_prologue():
    # 0-d float64 bias corrections computed before the kernel, cast to float32 scalars
    g = Graph()
    p = g.add_input("p", (300, 70), F32)
    m = g.add_input("m", (300, 70), F32)
    v = g.add_input("v", (300, 70), F32)
    step = g.add_input("step", (), F64)
    beta = g.add_const(np.float64(0.999))
    bc = g.add("sub", [g.add_const(np.float64(1.0)), g.add("pow", [beta, step])])
    c = g.add("cast", [g.add("pow", [bc, g.add_const(np.float64(0.5))])], {"dtype": F32})
    den = g.add("add", [g.add("div", [g.add("sqrt", [v]), c]), g.add_const(np.float32(1e-8))])
    g.outputs = {"p": g.add("sub", [p, g.add("div", [g.add("mul", [m, c]), den])])}
    vals = [awkward((300, 70), 11), awkward((300, 70), 12),
            np.abs(awkward((300, 70), 13)), np.array(3.0)]
    check(g, vals)


def test_float64_and_float16_graphs_keep_numpy():
    for dt in (F64, np.dtype(np.float16)):
        g = Graph()
        x = g.add_input("x", (30, 30), dt)
        g.outputs = {"y": g.add("mul", [g.add("add", [x, x]), x])}
        check(g, [awkward((30, 30), 14, dt)], expect_native=False)


def test_unsupported_op_keeps_numpy():
    g = Graph()
    x = g.add_input("x", (30, 30), F32)
    g.outputs = {"y": g.add("tanh", [g.add("add", [x, x])])}  # not bitwise in native code
    check(g, [awkward((30, 30), 15)], expect_native=False)


def test_small_groups_keep_numpy(monkeypatch):
    monkeypatch.setattr(jit_fused, "MIN_WORK", 65536)
    g = Graph()
    x = g.add_input("x", (10, 10), F32)
    g.outputs = {"y": g.add("mul", [g.add("add", [x, x]), x])}
    check(g, [awkward((10, 10), 16)], expect_native=False)


def test_non_contiguous_input_and_output_in_place():
    g = Graph()
    x = g.add_input("x", (40, 60), F32)
    w = g.add_input("w", (60, 40), F32)
    t = g.add("permute", [w], {"dims": (1, 0)})
    new = g.add("add", [g.add("mul", [x, t]), x])  # x's new value, written over x
    g.outputs = {"update:x": new}
    vals = [awkward((40, 60), 17), awkward((60, 40), 18)]
    on = executor(g, True, updates={x: "update:x"}, returned=[])
    off = executor(g, False, updates={x: "update:x"}, returned=[])
    assert "jf" in on.source and "a0 = " not in on.source
    a_on, a_off = [v.copy() for v in vals], [v.copy() for v in vals]
    r_on, r_off = on(a_on), off(a_off)
    same(r_on["update:x"], r_off["update:x"])
    same(r_on["update:x"], vals[0] * vals[1].T + vals[0])
    assert r_on["update:x"] is a_on[0]  # written in place


def test_row_input_aliasing_the_output_is_copied_first():
    g = Graph()
    x = g.add_input("x", (8, 16), F32)
    b = g.add_input("b", (16,), F32)
    g.outputs = {"y": g.add("mul", [g.add("add", [x, b]), x])}
    f = fuse(g)
    node = next(n for n in f.nodes if n.op == "fused")
    run = jit_fused.runner(node, aliased={0, 1})
    out = awkward((8, 16), 19)
    bias = out[3]  # a row of the output itself
    want = (out + bias) * out
    run(out, out, bias)
    same(out, want)


def test_empty_and_parallel_sizes(monkeypatch):
    g = Graph()
    B = Sym("B")
    x = g.add_input("x", (B, 33), F32)
    b = g.add_input("b", (33,), F32)
    s = g.add("add", [x, b], shape=(B, 33), dtype=F32)
    g.outputs = {"y": g.add("mul", [s, x], shape=(B, 33), dtype=F32)}
    on, off = executor(g, True), executor(g, False)
    assert "= jf" in on.source
    monkeypatch.setattr(jit_fused, "PARALLEL_WORK", 0)
    for n in (0, 1, 7, 5000):
        vals = [awkward((n, 33), n), awkward((33,), 20)]
        same(on(vals)["y"], off(vals)["y"])


def test_compiled_training_step_matches_numpy_path(monkeypatch):
    native = []
    real = jit_fused.runner
    monkeypatch.setattr(jit_fused, "runner", lambda *a: native.append(real(*a)) or native[-1])

    def make(jit):
        kiln.jit._available = jit
        kiln.manual_seed(0)
        model = kiln.nn.Sequential(kiln.nn.Linear(20, 64), kiln.nn.ReLU(), kiln.nn.Linear(64, 3))
        opt = kiln.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

        @kiln.compile(dynamic=True)
        def step(x, y):
            opt.zero_grad()
            loss = kiln.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return model, step

    rng = np.random.default_rng(21)
    runs = {}
    for jit in (False, True):
        model, step = make(jit)
        kiln.jit._available = True
        losses = []
        for batch in (16, 40, 16, 9):
            x = kiln.tensor(rng.standard_normal((batch, 20)).astype(np.float32))
            y = kiln.tensor(rng.integers(0, 3, batch))
            losses.append(step(x, y).item())
        runs[jit] = (losses, [p.detach().numpy().copy() for p in model.parameters()])
        rng = np.random.default_rng(21)
    assert sum(r is not None for r in native) >= 3  # the optimizer's groups at least
    assert runs[False][0] == runs[True][0]
    for a, b in zip(runs[False][1], runs[True][1]):
        same(a, b)


def test_exported_program_with_and_without_the_jit(tmp_path):
    from kiln.export import export, load_exported

    kiln.manual_seed(1)
    w, b = kiln.randn(300, 200), kiln.randn(200)

    def fn(x):
        return kiln.relu(x @ w + b) * 2.0

    path = str(tmp_path / "m.kiln")
    export(fn, kiln.randn(64, 300), path)
    x = kiln.randn(64, 300)
    outs = {}
    for jit in (True, False):
        kiln.jit._available = jit
        outs[jit] = load_exported(path)(x).numpy()
    kiln.jit._available = True
    same(outs[True], outs[False])
    same(outs[True], fn(x).numpy())
    # the artifact runs where the JIT is off (or llvmlite missing), without importing llvmlite
    code = ("import sys, kiln; from kiln.export import load_exported; "
            f"p = load_exported({path!r}); p(kiln.randn(64, 300)); "
            "assert 'llvmlite' not in sys.modules, 'llvmlite imported'")
    env = {"KILN_JIT": "0", "PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_single_big_ops_run_the_native_eager_kernels():
    """Unfused float32 bias adds, relu, where and relu's gradient of 64k+ elements run kiln.jit's
    eager kernels into their buffers, bitwise as the interpreter."""
    g = Graph()
    x = g.add_input("x", (256, 512), F32)
    b = g.add_input("b", (512,), F32)
    y = g.add_input("y", (256, 512), F32)
    m = g.add_input("m", (256, 512), BOOL)
    a = g.add("add", [x, b])  # each intermediate has two users: no fused groups
    r = g.add("relu", [a])
    w = g.add("where", [m, r, y])
    g.outputs = {"rb": g.add("relu_backward", [w, a]), "s": g.add("add", [r, w])}
    rng = np.random.default_rng(11)
    arrays = [awkward((256, 512), 11), awkward((512,), 12), awkward((256, 512), 13),
              rng.random((256, 512)) > 0.5]
    on = check(g, arrays, expect_native=False)
    for op in ("add", "relu", "where", "relu_backward"):
        assert f"k_native_{op}(" in on.source, on.source
    small = Graph()
    xs = small.add_input("x", (8, 512), F32)
    t = small.add("add", [xs, small.add_input("b", (512,), F32)])
    small.outputs = {"y": small.add("mul", [t, small.add("relu", [t])])}
    assert "k_native_" not in check(small, [awkward((8, 512), 14), awkward((512,), 15)]).source
