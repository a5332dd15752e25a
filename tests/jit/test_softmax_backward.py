"""The softmax_backward primitive: its native row kernel (kiln.jit.rows.softmax_backward) against
the numpy path, which must keep the values of the composition softmax's VJP used before
(y * (g - sum(g * y))), and against PyTorch: gradients, double backward, kiln.compile, and
awkward inputs (masked and fully masked rows, NaN, non-contiguous and broadcast gradients, other
axes, empty, 0-d, float64 and float16, wide rows, the threaded path)."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
import kiln.jit  # noqa: E402
from kiln.jit import rows  # noqa: E402
from kiln.ops.reduce import _softmax_backward, _sum  # noqa: E402
from tests.helpers import compiled_softmax_step_matches_eager  # noqa: E402
from tests.helpers import native_and_numpy as _both  # noqa: E402

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(5)
# float32 row sums in another order than numpy's BLAS: a few ulp of the largest product g * y,
# which the subtraction g - s can expose relative to a small result
TOL = {"rtol": 1e-5, "atol": 1e-6}


pytestmark = pytest.mark.usefixtures("jit_on")


def _composed(g, y, axis):
    """The composition softmax's VJP dispatched before softmax_backward existed."""
    axes = (axis,) if y.ndim else ()
    return np.multiply(y, np.subtract(g, _sum.impl(np.multiply(g, y), axes=axes,
                                                   keepdims=True)))


def _probs(shape, axis=-1, masked=False):
    x = (RNG.standard_normal(shape) * 3).astype(np.float32)
    if masked:  # causal mask, as in attention
        x = np.where(np.triu(np.ones(shape[-2:], bool), 1), np.float32(-np.inf), x)
    return kiln.softmax(kiln.tensor(x), axis).numpy()


def _close(got, want, **tol):
    tol = {**TOL, **tol}
    scale = max(1.0, float(np.abs(want[np.isfinite(want)]).max(initial=0.0)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=tol["rtol"], atol=tol["atol"] * scale)


SHAPES = [(5,), (3, 63), (2, 65), (3, 136), (16, 4, 64, 64), (7, 5000), (2, 10000),
          (256, 4096)]  # the last: enough work for parallel.run's threads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_numpy_and_the_old_composition(monkeypatch, shape):
    y = _probs(shape, masked=len(shape) == 4)
    g = RNG.standard_normal(shape).astype(np.float32)
    assert rows.softmax_backward(g, y) is not None  # the native path
    ax = len(shape) - 1
    got, want = _both(monkeypatch, lambda: _softmax_backward.impl(g, y, axis=ax))
    np.testing.assert_array_equal(want, _composed(g, y, ax))  # numpy path: unchanged values
    _close(got, want)
    ref = (y.astype(np.float64) * (g - (g.astype(np.float64) * y).sum(-1, keepdims=True)))
    _close(got, ref)


def test_gradient_matches_torch(monkeypatch):
    x = (RNG.standard_normal((8, 3, 100)) * 2).astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)

    def run(lib=kiln):
        t = lib.tensor(x, requires_grad=True)
        lib.softmax(t, -1).backward(lib.tensor(g))
        return t.grad.numpy()

    got, want = _both(monkeypatch, run)
    ref = run(torch)
    _close(got, want)
    _close(got, ref)


@pytest.mark.parametrize("dim", [-1, 0])
def test_double_backward_matches_torch(monkeypatch, dim):
    x = RNG.standard_normal((6, 70)).astype(np.float32)
    w = RNG.standard_normal((6, 70)).astype(np.float32)
    v = RNG.standard_normal((6, 70)).astype(np.float32)

    def run(lib=kiln):
        t = lib.tensor(x, requires_grad=True)
        tw = lib.tensor(w, requires_grad=True)
        y = lib.softmax(t, dim)
        (gx,) = lib.autograd.grad((y * tw).sum(), t, create_graph=True)
        (gx * lib.tensor(v)).sum().backward()
        return gx.detach().numpy(), t.grad.numpy(), tw.grad.numpy()

    got, want = _both(monkeypatch, run)
    ref = run(torch)
    for a, n, r in zip(got, want, ref):
        _close(a, n)
        _close(a, r)


def test_masked_rows_nan_and_specials(monkeypatch):
    x = RNG.standard_normal((6, 80)).astype(np.float32)
    x[0, 3:] = -np.inf  # few survivors
    x[1, ::2] = -np.inf
    x[2] = -np.inf  # fully masked: y is nan, so is the gradient (as in PyTorch)
    y = kiln.softmax(kiln.tensor(x), -1).numpy()
    g = RNG.standard_normal(x.shape).astype(np.float32)
    g[3, 5] = np.nan  # a nan gradient spoils its row
    g[4, 7] = np.inf
    got, want = _both(monkeypatch, lambda: _softmax_backward.impl(g, y, axis=1))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    _close(got, want)
    assert np.isnan(got[2]).all() and np.isnan(got[3]).all()
    t = torch.tensor(x, requires_grad=True)
    torch.softmax(t, -1).backward(torch.tensor(g))
    _close(got, t.grad.numpy())


def test_non_contiguous_broadcast_and_other_axes(monkeypatch):
    x = RNG.standard_normal((64, 72)).astype(np.float32)
    g = RNG.standard_normal((72, 64)).astype(np.float32)

    def run():
        out = []
        t = kiln.tensor(x, requires_grad=True)
        kiln.softmax(t.t(), -1).backward(kiln.tensor(g))  # non-contiguous y rows
        out.append(t.grad.numpy())
        t = kiln.tensor(x, requires_grad=True)
        kiln.softmax(t, -1).backward(kiln.tensor(g).t())  # non-contiguous gradient
        out.append(t.grad.numpy())
        t = kiln.tensor(x, requires_grad=True)
        (kiln.softmax(t, -1) * 2).sum().backward()  # zero-strided gradient
        out.append(t.grad.numpy())
        t = kiln.tensor(x, requires_grad=True)
        kiln.softmax(t, 0).backward(kiln.tensor(g.T.copy()))  # not the last axis
        out.append(t.grad.numpy())
        return out

    for a, n in zip(*_both(monkeypatch, run)):
        _close(a, n)


def test_empty_and_scalar(monkeypatch):
    for shape in [(0,), (3, 0), (0, 5), ()]:
        def run():
            t = kiln.tensor(np.zeros(shape, np.float32), requires_grad=True)
            kiln.softmax(t, -1).backward(kiln.ones(shape))
            return t.grad.numpy()

        got, want = _both(monkeypatch, run)
        assert got.shape == shape
        np.testing.assert_array_equal(got, want)
    assert rows.softmax_backward(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)) is None
    assert rows.softmax_backward(np.zeros((), np.float32), np.zeros((), np.float32)) is None


@pytest.mark.parametrize("dt", [np.float64, np.float16])
def test_other_dtypes_keep_numpy(monkeypatch, dt):
    y = _probs((4, 70)).astype(dt)
    g = RNG.standard_normal(y.shape).astype(dt)
    assert rows.softmax_backward(g, y) is None
    got, want = _both(monkeypatch, lambda: _softmax_backward.impl(g, y, axis=1))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _composed(g, y, 1))
    assert got.dtype == dt


def test_mixed_dtypes_and_strided_y_fall_back():
    y = _probs((4, 64))
    assert rows.softmax_backward(y.astype(np.float64), y) is None
    assert rows.softmax_backward(y[:, ::2], y[:, ::2]) is None  # y must be contiguous
    assert rows.softmax_backward(y[:2], y) is None


def test_compiled_step_uses_softmax_backward(monkeypatch):
    calls = []
    real = rows.softmax_backward
    monkeypatch.setattr(rows, "softmax_backward", lambda *a: calls.append(1) or real(*a))
    kiln.manual_seed(0)
    lin = kiln.nn.Linear(64, 64)
    x = kiln.tensor(RNG.standard_normal((32, 64)).astype(np.float32))
    compiled = compiled_softmax_step_matches_eager(lin, x)
    calls.clear()
    compiled(x)  # the generated executor, not a trace
    assert calls
