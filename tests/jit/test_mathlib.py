"""kiln.jit.mathlib's float32 exp, log, tanh, sigmoid against float64 truth (in float32 ulps),
their special values and range limits, and the native GELU against erf."""

import math

import numpy as np
import pytest

pytest.importorskip("llvmlite")

from kiln.jit import expr as X  # noqa: E402
from kiln.jit import hot_ops, mathlib  # noqa: E402

RNG = np.random.default_rng(7)
TINY = float(np.finfo(np.float32).tiny)
EPS = float(np.finfo(np.float32).eps)


def _sigmoid64(v):
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-v))


# name: (expression, float64 truth, input range, max error in ulps)
FUNCS = {
    "exp": (X.exp, np.exp, (-104.0, 90.0), 1.0),
    "log": (X.log, np.log, (0.0, 1e6), 1.0),
    "tanh": (X.tanh, np.tanh, (-12.0, 12.0), 1.5),
    "sigmoid": (X.sigmoid, _sigmoid64, (-105.0, 105.0), 2.5),
}


def _run(name, x):
    k = X.kernel(f"test_mathlib_{name}", 1, FUNCS[name][0])
    out = np.empty_like(x)
    with np.errstate(all="ignore"):
        k([out], [x])
    return out


def _samples(lo, hi, n=1 << 20):
    """Uniform over [lo, hi] plus magnitudes spread over many binades (both signs)."""
    top = math.log2(max(abs(lo), abs(hi)))
    spread = 2.0 ** RNG.uniform(-40, top, n) * RNG.choice([-1.0, 1.0], n)
    x = np.concatenate([RNG.uniform(lo, hi, n), spread[(spread >= lo) & (spread <= hi)]])
    return x.astype(np.float32)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_accuracy_in_ulps(name):
    _, truth, (lo, hi), bound = FUNCS[name]
    x = _samples(lo, hi)
    got = _run(name, x).astype(np.float64)
    with np.errstate(all="ignore"):
        t = truth(x.astype(np.float64))
    normal = np.isfinite(t) & (np.abs(t) >= TINY) & (np.abs(t) <= np.finfo(np.float32).max)
    ulp = np.spacing(np.abs(t[normal]).astype(np.float32)).astype(np.float64)
    err = np.abs(got[normal] - t[normal]) / ulp
    assert err.max() <= bound, f"{name}: {err.max():.2f} ulp at x={x[normal][err.argmax()]!r}"


def _f32(*v):
    return np.array(v, np.float32)


def test_exp_range_limits():
    hi, lo = np.float32(mathlib.EXP_HI), np.float32(mathlib.EXP_LO)
    x = _f32(hi, np.nextafter(hi, np.float32(np.inf)), lo, np.nextafter(lo, np.float32(-np.inf)),
             0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38, -3e38, 1e-40)
    y = _run("exp", x)
    assert np.isfinite(y[0]) and y[0] > 3.4e38
    assert y[1] == np.inf
    assert TINY <= y[2] < 1.0001 * TINY
    assert y[3] == 0
    np.testing.assert_array_equal(y[4:], _f32(1, 1, np.inf, 0, np.nan, np.inf, 0, np.inf, 0, 1))


def test_exp_never_subnormal():
    x = np.linspace(-110, -80, 200001, dtype=np.float32)
    y = _run("exp", x)
    assert not ((y > 0) & (y < TINY)).any()
    assert (y[x < mathlib.EXP_LO] == 0).all() and (y[x >= mathlib.EXP_LO] >= TINY).all()


def test_tanh_specials_and_symmetry():
    x = _f32(0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 30.0, -30.0, 9.1, 1e30)
    y = _run("tanh", x)
    np.testing.assert_array_equal(y, _f32(0, -0.0, 1, -1, np.nan, 1e-40, -1e-40, 1, -1, 1, 1))
    assert np.signbit(y[1]) and not np.signbit(y[0])
    v = _samples(0.0, 12.0, 1 << 16)
    np.testing.assert_array_equal(_run("tanh", -v), -_run("tanh", v))


def test_sigmoid_and_log_specials():
    s = _run("sigmoid", _f32(0.0, np.inf, -np.inf, np.nan, 200.0, -200.0))
    np.testing.assert_array_equal(s, _f32(0.5, 1, 0, np.nan, 1, 0))
    x = _f32(0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 1.0, 1e-40, 1e-45)
    y = _run("log", x)
    np.testing.assert_array_equal(y[:7], _f32(-np.inf, -np.inf, np.nan, np.inf, np.nan, np.nan, 0))
    np.testing.assert_allclose(y[7:], np.log(x[7:].astype(np.float64)), rtol=2 * EPS)


@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("n", [1, 5, 17, 63, 1000])
def test_vector_and_scalar_loops_agree(name, n):
    """The vectorized body and the scalar remainder evaluate the same operations: a prefix of
    odd length gives the same bits as the full (parallel) run."""
    lo, hi = FUNCS[name][2]
    x = RNG.uniform(lo, hi, 1 << 18).astype(np.float32)
    np.testing.assert_array_equal(_run(name, x[:n].copy()), _run(name, x)[:n])


def _gelu_truth(x):
    x = x.astype(np.float64)
    erf = np.vectorize(math.erf)
    phi_cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return x * phi_cdf, phi_cdf + x * pdf


def test_gelu_against_erf():
    """Errors against the erf form, in float32 eps times the natural scale (|x| for gelu, 1
    for its derivative): the fitted Phi is good to 1e-7, exp and the division to 1 ulp."""
    x = np.concatenate([RNG.standard_normal(20000) * 3, RNG.uniform(-12, 12, 20000)])
    x = x.astype(np.float32)
    y, d = np.empty_like(x), np.empty_like(x)
    X.kernel("test_mathlib_gelu", 1, hot_ops._gelu_exact)([y], [x])
    X.kernel("test_mathlib_gelu_grad", 2, hot_ops._gelu_backward_exact)([d], [np.ones_like(x), x])
    ty, td = _gelu_truth(x)
    assert (np.abs(y - ty) <= 2 * EPS * np.abs(x.astype(np.float64))).all()
    assert (np.abs(d - td) <= 2 * EPS).all()


def test_gelu_tanh_against_float64():
    """The tanh form, computed as x / (1 + exp(-2u)): errors in eps times |x| (gelu) and
    1 + |x| u' / 2 (its derivative; u' = beta (1 + 3 kappa x^2))."""
    x = np.concatenate([RNG.standard_normal(20000) * 3, RNG.uniform(-30, 30, 20000)])
    x = x.astype(np.float32)
    y, d = np.empty_like(x), np.empty_like(x)
    X.kernel("test_mathlib_gelu_t", 1, hot_ops._gelu_tanh)([y], [x])
    X.kernel("test_mathlib_gelu_t_grad", 2, hot_ops._gelu_backward_tanh)([d], [np.ones_like(x), x])
    v = x.astype(np.float64)
    beta, kappa = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(beta * (v + kappa * v ** 3))
    du = beta * (1 + 3 * kappa * v * v)
    assert (np.abs(y - 0.5 * v * (1 + t)) <= 2 * EPS * np.abs(v)).all()
    td = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * du
    assert (np.abs(d - td) <= 2 * EPS * (1 + np.abs(v) * du / 2)).all()
