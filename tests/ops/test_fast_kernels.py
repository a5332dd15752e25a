"""The float32 fast paths of erf, gelu, gelu_backward, layer_norm (forward and backward) and
softmax against float64 references, at sizes past their chunking, and their fallbacks."""

import math

import numpy as np
import pytest

import kiln
from kiln.nn.normalization import _ln_moments
from kiln.ops.registry import REGISTRY

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _erf64(x):
    return np.array([math.erf(v) for v in np.asarray(x, np.float64).ravel()]).reshape(x.shape)


def _phi64(x):
    x = np.asarray(x, np.float64)
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.ravel()]).reshape(x.shape)


def test_erf_float32_relative_error():
    # 100k points (several 32768-element chunks), tiny and subnormal magnitudes, the cap at 4
    x = np.concatenate([np.linspace(-6, 6, 100001), np.logspace(-38, 1, 3000),
                        -np.logspace(-38, 1, 3000), [3.9, 3.92, 4.0, 4.5, 1e30, -1e30]])
    x = x.astype(np.float32)
    got = kiln.erf(kiln.tensor(x)).numpy().astype(np.float64)
    want = _erf64(x)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-37)
    assert rel.max() <= 4e-7, (rel.max(), x[rel.argmax()])  # measured 2.5e-7


def test_erf_float32_special_values():
    x = np.array([np.inf, -np.inf, np.nan, -0.0, 1e-40] + [0.5] * 40, np.float32)
    got = kiln.erf(kiln.tensor(x)).numpy()
    assert got[0] == 1 and got[1] == -1 and np.isnan(got[2])
    assert got[3] == 0 and np.signbit(got[3])
    assert abs(got[4] - 1.1283791e-40) <= 1e-44


def test_gelu_float32_value_and_gradient():
    x = np.concatenate([np.linspace(-12, 12, 120001), [-800.0, -30.0, -1e-8, 0.0, 1e-8, 800.0]])
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = _phi64(x)
    t = kiln.tensor(x, requires_grad=True)
    y = kiln.nn.functional.gelu(t)
    y.sum().backward()
    err = np.abs(y.detach().numpy() - x64 * cdf)
    assert (err / np.maximum(np.abs(x64), 1)).max() <= 2.5e-7  # measured 1.4e-7
    d = cdf + x64 * np.exp(-0.5 * x64 * x64) * INV_SQRT_2PI
    assert np.abs(t.grad.numpy() - d).max() <= 3e-7  # measured 1.8e-7


def test_gelu_float32_special_values():
    x = np.array([np.inf, -np.inf, np.nan, -1e38, 1e38, -50.0] + [1.0] * 40, np.float32)
    y = REGISTRY["gelu"].impl(x, approximate="none")
    assert y[0] == np.inf and np.isnan(y[1]) and np.isnan(y[2])  # PyTorch float64's results
    assert y[3] == 0 and y[4] == 1e38 and y[5] == 0
    g = REGISTRY["gelu_backward"].impl(np.ones_like(x), x, approximate="none")
    assert np.isnan(g[:3]).all() and g[3] == 0 and g[4] == 1 and g[5] == 0


@pytest.mark.parametrize("name", ["erf", "gelu"])
def test_float16_goes_through_float32(name):
    x = np.linspace(-5, 5, 1001).astype(np.float16)
    fn = kiln.erf if name == "erf" else kiln.nn.functional.gelu
    got = fn(kiln.tensor(x)).numpy()
    assert got.dtype == np.float16
    want = _erf64(x) if name == "erf" else x.astype(np.float64) * _phi64(x)
    # one float16 ulp of the exact value (a float32 result rounded once more), plus for gelu
    # the float32 kernel's absolute error in Phi (1e-7, times |x|; PyTorch's is larger)
    tol = np.abs(want) * 2.0 ** -10 + 2.0 ** -24 + (1e-7 * np.abs(x) if name == "gelu" else 0)
    assert (np.abs(got - want) <= tol).all()


# -- layer_norm ----------------------------------------------------------------------------------

def _ln64(x, w, b, g, eps=1e-5):
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    xc = x - x.mean(-1, keepdims=True)
    r = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    xh = xc * r
    gh = g * w
    dx = r * (gh - gh.mean(-1, keepdims=True) - xh * (gh * xh).mean(-1, keepdims=True))
    d = x.shape[-1]
    return xh * w + b, dx, (g * xh).reshape(-1, d).sum(0), g.reshape(-1, d).sum(0)


@pytest.mark.parametrize("shift,tol", [(0.0, 2e-6), (30.0, 1e-5)],
                         ids=["fast", "large-mean fallback"])
def test_layer_norm_float32_paths(shift, tol):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 64, 128)) + shift).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(128)).astype(np.float32)
    b = (0.1 * rng.standard_normal(128)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    # the one-pass statistics are used exactly when no row has mean^2 > var
    assert (_ln_moments(x.reshape(-1, 128), 1e-5) is None) == bool(shift)
    y0, dx0, dw0, db0 = _ln64(x, w, b, g)
    y = REGISTRY["layer_norm"].impl(x, w, b, k=1, eps=1e-5, has_weight=True, has_bias=True)
    p = REGISTRY["layer_norm_backward"].impl(x, g, w, k=1, eps=1e-5, parts=("x", "w", "b"))
    dx, dw, db = p[:x.size].reshape(x.shape), p[x.size:x.size + 128], p[x.size + 128:]
    # measured: fast 7e-7 and 8e-7; two-pass 4.6e-6 and 6e-6 (rounding x - mean at mean 30)
    assert np.abs(y - y0).max() <= tol
    assert np.abs(dx - dx0).max() <= 1.5 * tol
    np.testing.assert_allclose(dw, dw0, rtol=1e-5, atol=1e-4)  # sums of 512 rows
    np.testing.assert_allclose(db, db0, rtol=1e-5, atol=1e-4)
    only_x = REGISTRY["layer_norm_backward"].impl(x, g, w, k=1, eps=1e-5, parts=("x",))
    np.testing.assert_array_equal(only_x, dx)


def test_layer_norm_one_pass_rejects_nan_and_inf():
    x = np.ones((4, 8), np.float32)
    x[:, ::2] = -1
    assert _ln_moments(x, 1e-5) is not None
    for bad in (np.nan, np.inf):
        x2 = x.copy()
        x2[1, 3] = bad
        assert _ln_moments(x2, 1e-5) is None


# -- softmax -------------------------------------------------------------------------------------

def test_softmax_global_shift_and_row_fixups():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4, 64)).astype(np.float32) * 3
    x[..., 40:] = -np.inf  # masked keys
    x[1, 2] -= 200.0  # exp(x - global max) underflows to 0 on this row: must be redone
    x[3, 1] -= 20.0  # beyond the trusted spread: redone with its own max
    x[4, 0] = -np.inf  # a fully masked row: NaN, as PyTorch
    got = REGISTRY["softmax"].impl(x, axis=2)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(x64 - x64.max(-1, keepdims=True))
        want = e / e.sum(-1, keepdims=True)
    assert np.isnan(got[4, 0]).all()
    ok = ~np.isnan(want)
    assert np.array_equal(np.isnan(got), ~ok)
    # relative 1e-6 on outputs above 1e-3 (measured 5e-7); below, 1e-9 absolute
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-9)
