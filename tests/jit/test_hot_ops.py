"""Native GELU and its gradient (kiln.jit.hot_ops) against the numpy kernels they replace.

Both paths evaluate the same formula; the native one rounds differently in exp and tanh (about
1 ulp each) and in Q (fma).  Tolerance: 4 ulp of the result plus 4 ulp of 1 times the size of
the terms that cancel (``scale`` below): x for gelu (x Phi(x) for negative x), |g| for the exact
gradient (Phi + x phi), |g| (1 + |x| u'(x) / 2) for the tanh form's gradient (1 - tanh^2 near
tanh = 1).
"""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.jit import expr as X  # noqa: E402
from kiln.ops import elementwise as E  # noqa: E402

RNG = np.random.default_rng(0)
EPS32 = float(np.finfo(np.float32).eps)
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 5.5, -5.5, 5.6, -5.6,
                     -27.0, -30.0, 30.0, 88.0, -88.0, 1e20, -1e20], np.float32)


def _both(fn, monkeypatch):
    """``fn()`` on the numpy path, then on the native path."""
    monkeypatch.setattr(jit, "_available", False)
    ref = fn()
    monkeypatch.setattr(jit, "_available", True)
    return ref, fn()


def _close(got, ref, scale):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    inf = np.isinf(ref)
    assert np.array_equal(got[inf], ref[inf])
    ok = np.isfinite(ref)
    tol = 4 * np.spacing(np.abs(ref[ok]).astype(np.float32)) + 4 * EPS32 * scale[ok]
    err = np.abs(got[ok] - ref[ok])
    assert (err <= tol).all(), f"max err {err.max()} at {np.argmax(err - tol)}"


def _scales(x, g, approximate):
    x64 = np.abs(x.astype(np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        if approximate == "tanh":
            du = 0.8 * (1 + 0.134 * x64 * x64)
            back = np.abs(g) * (1 + du * x64 * 0.5)
        else:
            back = np.abs(g) * 1.25
    return x64, back


def _inputs(shape, scale=3.0):
    x = np.asarray(RNG.standard_normal(shape) * scale, np.float32)
    flat = x.reshape(-1)
    k = min(flat.size, SPECIALS.size)
    flat[:k] = SPECIALS[:k]
    g = np.asarray(RNG.standard_normal(shape), np.float32)
    return x, g


def _run(x, g, approximate):
    y = E._gelu(kiln.from_numpy(x), approximate=approximate)._data
    d = E._gelu_backward(kiln.from_numpy(g), kiln.from_numpy(x), approximate=approximate)._data
    return y, d


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,), (3, 7), (16, 64, 33), (1 << 18,)])
def test_native_matches_numpy(shape, approximate, monkeypatch):
    x, g = _inputs(shape)
    with np.errstate(all="ignore"):
        (y0, d0), (y1, d1) = _both(lambda: _run(x, g, approximate), monkeypatch)
    sx, sg = _scales(x, g, approximate)
    _close(y1, y0, sx)
    _close(d1, d0, sg)
    if x.size:  # the native kernels did run
        keys = {k[0] for k in X._cache}
        assert {f"gelu_{approximate}", f"gelu_backward_{approximate}"} <= keys


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_non_contiguous_inputs(approximate, broadcast, monkeypatch):
    x, g = _inputs((40, 30))
    xs = x.T[::2, :20]  # (15, 20), strided
    gs = np.broadcast_to(g[0, :20], (15, 20)) if broadcast else g.T[1::2, :20]
    assert not xs.flags.c_contiguous and not gs.flags.c_contiguous
    with np.errstate(all="ignore"):
        (y0, d0), (y1, d1) = _both(lambda: _run(xs, gs, approximate), monkeypatch)
    sx, sg = _scales(xs, gs, approximate)
    _close(y1, y0, sx)
    _close(d1, d0, sg)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_other_dtypes(dtype, approximate, monkeypatch):
    """float64 keeps numpy (erf); float16 goes through float32, so the results agree to
    float16 rounding (a rare one-ulp double-rounding difference)."""
    with np.errstate(over="ignore"):
        x, g = (a.astype(dtype) for a in _inputs((50, 9)))
    with np.errstate(all="ignore"):
        (y0, d0), (y1, d1) = _both(lambda: _run(x, g, approximate), monkeypatch)
    assert y1.dtype == dtype and d1.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(d1, d0)
    else:
        for a, b in ((y1, y0), (d1, d0)):
            ok = np.isfinite(b)
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert (np.abs(a[ok] - b[ok]).astype(np.float64)
                    <= np.spacing(np.abs(b[ok])).astype(np.float64) + 1e-7).all()


def test_module_gradients_match_numpy_path(monkeypatch):
    """nn.GELU forward and backward through autograd, both forms, native vs numpy."""
    x0 = RNG.standard_normal((8, 300)).astype(np.float32) * 2

    def run():
        out = []
        for approximate in ("none", "tanh"):
            x = kiln.tensor(x0, requires_grad=True)
            y = kiln.nn.GELU(approximate=approximate)(x)
            (y * y).sum().backward()
            out += [y.detach().numpy(), x.grad.numpy()]
        return out

    ref, got = _both(run, monkeypatch)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)


def test_compiled_step_uses_native_kernel(monkeypatch):
    """A compiled function calls the primitive's impl: the native result, same as eager."""
    monkeypatch.setattr(jit, "_available", True)
    x = kiln.tensor(RNG.standard_normal((4, 64)).astype(np.float32))
    f = kiln.compile(lambda t: kiln.nn.functional.gelu(t) * 2)
    eager = kiln.nn.functional.gelu(x) * 2
    np.testing.assert_array_equal(f(x).numpy(), eager.numpy())
    np.testing.assert_array_equal(f(x).numpy(), eager.numpy())
