"""Native eager add/sub/mul/div/relu/relu_backward/where (kiln.jit.eager_ops) against the numpy
implementations they replace: bitwise equal (same IEEE operations), NaN payloads and signed
zeros included; everything the kernels do not cover keeps numpy.

One exception: when both operands of an arithmetic op are NaN, which payload (and sign) the
result carries is the hardware's pick of operand order, which neither numpy (its vector loop
and remainder loop differ) nor LLVM fixes; the result is NaN in both."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import torch  # noqa: E402

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.jit import eager_ops as EO  # noqa: E402
from kiln.jit import parallel  # noqa: E402
from kiln.ops import elementwise as E  # noqa: E402

RNG = np.random.default_rng(0)
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 1.0, -1.0,
                     3e38, -3e38, 1e-38], np.float32)
BINARY = {"add": E._add, "sub": E._sub, "mul": E._mul, "div": E._div}
PRIMS = {**BINARY, "relu": E._relu, "relu_backward": E._relu_backward, "where": E._where}


@pytest.fixture
def small(monkeypatch):
    """Native kernels for arrays of any size (the thresholds are a speed choice)."""
    monkeypatch.setattr(EO, "MIN_SIZE", 1)
    monkeypatch.setattr(EO, "PLAIN_SIZE", 1)
    monkeypatch.setattr(parallel, "_threads", 2)


def _values(shape, dtype=np.float32):
    x = np.asarray(RNG.standard_normal(shape) * 3, np.float32)
    flat = x.reshape(-1)
    picks = RNG.integers(0, SPECIALS.size, size=flat.size)
    special = RNG.random(flat.size) < 0.3
    flat[special] = SPECIALS[picks[special]]
    with np.errstate(over="ignore"):
        return x.astype(dtype)


def _both(op, arrays, monkeypatch, native=True):
    """The primitive's result on the numpy path and on the native path; ``native`` says whether
    the native kernel must take the call."""
    monkeypatch.setattr(jit, "_available", False)
    with np.errstate(all="ignore"):
        ref = PRIMS[op].impl(*arrays)
    monkeypatch.setattr(jit, "_available", True)
    with np.errstate(all="ignore"):
        took = EO.run(op, arrays) is not None
        got = PRIMS[op].impl(*arrays)
    assert took == native
    return np.asarray(ref), np.asarray(got)


def _same(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(ref).tobytes()


def _same_arith(got, ref, a, b):
    """Bitwise, except NaN (either payload) where both operands are NaN."""
    both = np.broadcast_to(np.isnan(a) & np.isnan(b), ref.shape)
    assert np.isnan(got[both]).all() and np.isnan(ref[both]).all()
    _same(np.where(both, 0, got).astype(got.dtype), np.where(both, 0, ref).astype(ref.dtype))


SHAPE_PAIRS = [
    ((5,), (5,)),  # full, full
    ((7, 33), (33,)),  # row (a bias)
    ((7, 33), (7, 1)),  # col (a per-row statistic)
    ((7, 33), ()),  # scalar
    ((), (4, 9)),  # scalar first
    ((2, 3, 8), (1, 3, 8)),  # row of several dims
    ((6, 1), (1, 5)),  # col and row: an outer broadcast
    ((4, 1, 3), (4, 2, 3)),  # no single split: numpy
]


@pytest.mark.parametrize("op", list(BINARY))
@pytest.mark.parametrize("shapes", SHAPE_PAIRS)
def test_binary_bitwise(op, shapes, small, monkeypatch):
    a, b = _values(shapes[0]), _values(shapes[1])
    native = shapes != ((4, 1, 3), (4, 2, 3))
    _same_arith(*reversed(_both(op, (a, b), monkeypatch, native)), a, b)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 16, 7, 7)])
def test_relu_bitwise(shape, small, monkeypatch):
    x = _values(shape)
    x.reshape(-1)[:3] = np.array([-0.0, np.nan, -np.nan], np.float32)[:x.size]
    ref, got = _both("relu", (x,), monkeypatch)
    _same(got, ref)
    assert not np.signbit(got[x == 0]).any()  # relu(-0.0) is +0.0, as np.maximum(x, 0) gives


@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 16, 7, 7)])
def test_relu_backward_bitwise(shape, small, monkeypatch):
    g, y = _values(shape), _values(shape)
    _same(*reversed(_both("relu_backward", (g, y), monkeypatch)))


def test_relu_backward_broadcast_gradient(small, monkeypatch):
    g, y = _values((9,)), _values((4, 9))
    _same(*reversed(_both("relu_backward", (g, y), monkeypatch)))


@pytest.mark.parametrize("shapes", [
    ((8, 5), (8, 5), (8, 5)),
    ((16, 16), (), (2, 3, 16, 16)),  # the causal mask, masked_fill's order
    ((16, 16), (2, 3, 16, 16), ()),  # its gradient
    ((), (4, 4), (4, 4)),
    ((4, 1), (4, 6), (6,)),
    ((3, 1, 2), (3, 4, 2), (3, 4, 2)),  # no single split: numpy
])
def test_where_bitwise(shapes, small, monkeypatch):
    c = np.asarray(RNG.random(shapes[0]) > 0.5)
    x, y = _values(shapes[1]), _values(shapes[2])
    native = shapes[0] != (3, 1, 2)
    _same(*reversed(_both("where", (c, x, y), monkeypatch, native)))


def test_non_contiguous(small, monkeypatch):
    base = _values((40, 30))
    a = base.T[::2]  # (15, 40), strided: numpy
    b = _values((15, 40))
    _same(*reversed(_both("add", (a, b), monkeypatch, native=False)))
    _same(*reversed(_both("relu", (a,), monkeypatch, native=False)))
    # a strided or expanded bias is copied (small); the full operand stays as it is
    bias = base[:, 3]  # (40,), stride 30
    _same_arith(*reversed(_both("mul", (b, bias), monkeypatch)), b, bias)
    c = (RNG.random((1, 80)) > 0.5)[:, ::2]  # a strided row
    zero = np.zeros((), np.float32)
    _same(*reversed(_both("where", (c, b, zero), monkeypatch)))
    # an operand expanded to the full shape (stride 0) is not C-contiguous: numpy
    c = np.broadcast_to(c, (15, 40))
    _same(*reversed(_both("where", (c, b, zero), monkeypatch, native=False)))


def test_read_only_inputs(small, monkeypatch):
    a, b = _values((6, 7)), _values((7,))
    a.flags.writeable = False
    b.flags.writeable = False
    _same_arith(*reversed(_both("sub", (a, b), monkeypatch)), a, b)


def test_zero_d_and_empty(small, monkeypatch):
    a, b = np.array(2.5, np.float32), np.array(-0.0, np.float32)
    _same(*reversed(_both("div", (a, b), monkeypatch)))
    e = np.zeros((0, 5), np.float32)
    _same(*reversed(_both("add", (e, np.ones(5, np.float32)), monkeypatch)))
    _same(*reversed(_both("relu", (e,), monkeypatch, native=False)))  # nothing to compute


def test_empty_output_of_big_input(monkeypatch):
    # a big operand broadcast against an empty one: nothing to compute, the shape is numpy's
    big = _values((1, EO.MIN_SIZE))
    ref, got = _both("add", (np.zeros((0, 1), np.float32), big), monkeypatch)
    _same(got, ref)
    assert got.shape == (0, EO.MIN_SIZE)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes_keep_numpy(dtype, small, monkeypatch):
    a, b = _values((8, 9), dtype), _values((9,), dtype)
    for op in BINARY:
        _same(*reversed(_both(op, (a, b), monkeypatch, native=False)))
    _same(*reversed(_both("relu", (a,), monkeypatch, native=False)))
    _same(*reversed(_both("relu_backward", (a, a), monkeypatch, native=False)))
    _same(*reversed(_both("where", (a > 0, a, b), monkeypatch, native=False)))
    # mixed float32/float64 (not produced by Kiln's ops, which cast first) also keeps numpy
    _same(*reversed(_both("add", (_values((8, 9)), b), monkeypatch, native=False)))


def test_integer_and_bool_keep_numpy(small, monkeypatch):
    i = np.arange(12, dtype=np.int64).reshape(3, 4)
    _same(*reversed(_both("mul", (i, i), monkeypatch, native=False)))
    c = i > 4
    _same(*reversed(_both("where", (c, i, i), monkeypatch, native=False)))
    _same(*reversed(_both("where", (i, _values(i.shape), _values(i.shape)), monkeypatch,
                          native=False)))  # a non-bool condition


def test_thresholds(monkeypatch):
    monkeypatch.setattr(parallel, "_threads", 2)
    one, bias = np.ones((), np.float32), np.ones(64, np.float32)
    rows = EO.MIN_SIZE // 64
    assert EO.run("add", (np.ones((rows - 1, 64), np.float32), bias)) is None
    assert EO.run("add", (np.ones((rows, 64), np.float32), bias)) is not None
    assert EO.run("relu", (np.ones(EO.MIN_SIZE, np.float32),)) is not None
    # same-shape and scalar arithmetic: numpy's loop is as fast on one core
    assert EO.run("mul", (np.ones(EO.PLAIN_SIZE - 1, np.float32), one)) is None
    big = np.ones(EO.PLAIN_SIZE, np.float32)
    assert EO.run("mul", (big, one)) is not None
    assert EO.run("sub", (big, big)) is not None
    monkeypatch.setattr(parallel, "_threads", 1)
    assert EO.run("mul", (big, one)) is None
    assert EO.run("relu", (big,)) is not None


@pytest.mark.parametrize("op", ["add", "mul", "div", "relu", "relu_backward", "where"])
def test_large_parallel(op, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(parallel, "_threads", 2)
    shape = (1031, 517)  # not a multiple of the vector width or of the thread count
    x, y = _values(shape), _values(shape)
    arrays = {"relu": (x,), "where": (RNG.random(shape[1:]) > 0.5, np.zeros((), np.float32), y),
              "add": (x, _values(shape[1:]))}.get(op, (x, y))
    ref, got = _both(op, arrays, monkeypatch)
    if op in BINARY:
        _same_arith(got, ref, *arrays)
    else:
        _same(got, ref)


def test_autograd_matches_torch(small):
    """A small block (bias, scale, causal mask, relu, residual) forward and backward."""
    T = 12
    x0, w0, b0 = (RNG.standard_normal(s).astype(np.float32) for s in ((2, 3, T, T), (T,), (T, 1)))
    mask = np.triu(np.ones((T, T), bool), 1)

    def run(lib, tensor):
        x, w, b = (tensor(v, requires_grad=True) for v in (x0, w0, b0))
        h = (x * w + b) / 1.5 - x
        h = h.masked_fill(tensor(mask), float("-inf"))
        h = lib.where(tensor(mask), lib.zeros_like(h), h)
        y = lib.relu(h) * x + h
        (y * y).sum().backward()
        return [t.detach().numpy() for t in (y, x.grad, w.grad, b.grad)]

    got = run(kiln, kiln.tensor)
    ref = run(torch, torch.tensor)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


def test_module_step_matches_numpy_path(monkeypatch, small):
    """A linear-relu-linear step through autograd: native and numpy paths agree bitwise where
    only the accelerated ops differ (matmul and sum are shared)."""
    x0 = RNG.standard_normal((16, 20)).astype(np.float32)

    def run():
        kiln.manual_seed(0)
        net = kiln.nn.Sequential(kiln.nn.Linear(20, 30), kiln.nn.ReLU(), kiln.nn.Linear(30, 5))
        x = kiln.tensor(x0, requires_grad=True)
        loss = (net(x) * 0.5 - 1.0).relu().sum()
        loss.backward()
        return [x.grad.numpy()] + [p.grad.numpy() for p in net.parameters()]

    monkeypatch.setattr(jit, "_available", False)
    ref = run()
    monkeypatch.setattr(jit, "_available", True)
    got = run()
    for g, r in zip(got, ref):
        _same(g, r)


def test_run_into_out_declines_overlap_but_takes_the_input_itself(jit_on):
    from kiln.jit import eager_ops

    x = np.random.default_rng(3).standard_normal((256, 512)).astype(np.float32)
    b = np.random.default_rng(4).standard_normal(512).astype(np.float32)
    want = x + b
    assert eager_ops.run("add", (x, b), out=x) is x  # in place: element i read before written
    np.testing.assert_array_equal(x, want)
    big = np.zeros((257, 512), np.float32)
    shifted = big[1:]  # overlaps big[:-1] one row off
    assert eager_ops.run("add", (big[:-1], b), out=shifted) is None
    assert not big.any()
    assert eager_ops.run("add", (x, b), out=np.empty((256, 512), np.float64)) is None
