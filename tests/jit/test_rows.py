"""kiln.jit.rows (layer_norm forward/backward, softmax, log_softmax) against kiln's numpy path,
a float64 reference and PyTorch, on awkward inputs: odd and large shapes (the threaded path),
non-contiguous and broadcast inputs, NaN and inf, other dtypes (which keep the numpy path)."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
import kiln.jit  # noqa: E402
from kiln.jit import rows  # noqa: E402
from tests.helpers import compiled_softmax_step_matches_eager  # noqa: E402
from tests.helpers import native_and_numpy as _both  # noqa: E402

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)
# float32 row sums in another order than numpy's: a few ulp of the largest term
TOL = {"rtol": 2e-5, "atol": 2e-6}


pytestmark = pytest.mark.usefixtures("jit_on")


def _close(got, want, scale=1.0, **tol):
    tol = {**TOL, **tol}
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _ln(x, w, b, eps=1e-5, grad_of=(), g=None, lib=kiln):
    t = lib.tensor(x, requires_grad="x" in grad_of)
    tw = None if w is None else lib.tensor(w, requires_grad="w" in grad_of)
    tb = None if b is None else lib.tensor(b, requires_grad="b" in grad_of)
    y = lib.nn.functional.layer_norm(t, w.shape if w is not None else x.shape[-1:], tw, tb, eps)
    if not grad_of:
        return [y.detach().numpy()]
    y.backward(lib.tensor(g))
    grads = {"x": t, "w": tw, "b": tb}
    return [y.detach().numpy()] + [grads[p].grad.numpy() for p in grad_of]


LN_SHAPES = [(1, 1), (3, 5), (7, 300), (2, 3, 63), (16, 64, 128), (300, 17), (1, 4096)]


@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "b", ""])
def test_layer_norm_matches_numpy_and_torch(monkeypatch, shape, affine):
    x = (RNG.standard_normal(shape) * 3 + 2).astype(np.float32)
    d = shape[-1]
    w = RNG.standard_normal(d).astype(np.float32) if "w" in affine else None
    b = RNG.standard_normal(d).astype(np.float32) if "b" in affine else None
    g = RNG.standard_normal(shape).astype(np.float32)
    parts = ("x",) + tuple(affine)
    got, want = _both(monkeypatch, lambda: _ln(x, w, b, grad_of=parts, g=g))
    ref = _ln(x, w, b, grad_of=parts, g=g, lib=torch)
    for a, n, r in zip(got, want, ref):
        scale = max(1.0, np.abs(r).max())
        _close(a, n, scale)
        _close(a, r, scale)


# (4, 33, 40): the generic row kernels; (37, 64): the kernels that hold a row in registers
@pytest.mark.parametrize("shape, parts", [
    *[((4, 33, 40), p) for p in [("w",), ("b",), ("w", "b"), ("x", "b"), ("x", "w")]],
    *[((37, 64), p) for p in [("w",), ("b",), ("x", "w"), ("x", "b")]]])
def test_layer_norm_backward_parts(monkeypatch, shape, parts):
    x = (RNG.standard_normal(shape) + 5).astype(np.float32)
    d = shape[-1]
    w, b = RNG.standard_normal(d).astype(np.float32), RNG.standard_normal(d).astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    got, want = _both(monkeypatch, lambda: _ln(x, w, b, grad_of=parts, g=g))
    for a, n in zip(got, want):
        _close(a, n, max(1.0, np.abs(n).max()))


def _check_large_mean(monkeypatch, shape):
    """Rows of mean 1000, spread 0.01: float32 loses ~ulp(1000) / 0.01 = 0.6% of xhat to the
    mean's rounding; the native path must be no less accurate than numpy's (it is ~8x more,
    with its corrected mean)."""
    x = (RNG.standard_normal(shape) * 0.01 + 1000).astype(np.float32)
    w, b = RNG.standard_normal(shape[1:]).astype(np.float32), np.zeros(shape[1:], np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    got, want = _both(monkeypatch, lambda: _ln(x, w, b, grad_of=("x", "w", "b"), g=g))
    ref = _ln(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
              grad_of=("x", "w", "b"), g=g.astype(np.float64), lib=torch)
    for a, n, r in zip(got, want, ref):
        scale = max(1.0, np.abs(r).max())
        assert np.abs(a - r).max() <= max(np.abs(n - r).max(), 1e-5 * scale)


def test_layer_norm_two_normalized_dims_and_large_mean(monkeypatch):
    _check_large_mean(monkeypatch, (6, 3, 50))


def test_layer_norm_non_contiguous_broadcast_and_specials(monkeypatch):
    base = RNG.standard_normal((40, 24)).astype(np.float32)
    w = RNG.standard_normal(40).astype(np.float32)

    def run():
        t = kiln.tensor(base).t()  # (24, 40), non-contiguous
        e = kiln.tensor(base[0]).expand(5, 24)  # broadcast rows
        return [kiln.nn.functional.layer_norm(t, (40,), kiln.tensor(w)).numpy(),
                kiln.nn.functional.layer_norm(e, (24,)).numpy()]

    for a, n in zip(*_both(monkeypatch, run)):
        _close(a, n, 4.0)
    _check_special_rows(monkeypatch, 8)


def _check_special_rows(monkeypatch, d):
    """NaN, +-inf and a zero-variance row in rows of width ``d``: same NaNs, finite values close."""
    x = RNG.standard_normal((6, d)).astype(np.float32)
    x[1, 3], x[2, 0], x[3, 5], x[4] = np.nan, np.inf, -np.inf, 7.0
    got, want = _both(monkeypatch, lambda: _ln(x, None, None, grad_of=("x",),
                                               g=np.ones_like(x)))
    for a, n in zip(got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(n))
        ok = np.isfinite(n)
        _close(a[ok], n[ok], 4.0)


@pytest.mark.parametrize("dt", [np.float64, np.float16])
def test_layer_norm_other_dtypes_keep_numpy(monkeypatch, dt):
    x = RNG.standard_normal((5, 12)).astype(dt)
    w = RNG.standard_normal(12).astype(dt)
    got, want = _both(monkeypatch, lambda: _ln(x, w, None, grad_of=("x", "w"),
                                               g=np.ones_like(x)))
    for a, n in zip(got, want):
        np.testing.assert_array_equal(a, n)


def test_layer_norm_empty():
    for shape in [(0, 8), (3, 0)]:
        x = np.zeros(shape, np.float32)
        y = kiln.nn.functional.layer_norm(kiln.tensor(x), shape[-1:]).numpy()
        assert y.shape == shape
    assert rows.layer_norm(np.zeros((0, 8), np.float32), None, None, 1e-5) is None


# Row lengths that are multiples of 16 up to 512 get kernels compiled for their length (the
# row held in registers); the others, and these with _MAX_HELD = 0, the generic kernels.
HELD_SHAPES = [(1, 16), (5, 48), (17, 112), (1000, 128), (3, 512), (2048, 128)]


@pytest.mark.parametrize("shape", HELD_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", ""])
def test_layer_norm_held_rows_match_generic_numpy_and_torch(monkeypatch, shape, affine):
    x = (RNG.standard_normal(shape) * 3 + 2).astype(np.float32)
    d = shape[-1]
    w = RNG.standard_normal(d).astype(np.float32) if affine else None
    b = RNG.standard_normal(d).astype(np.float32) if affine else None
    g = RNG.standard_normal(shape).astype(np.float32)
    parts = ("x",) + tuple(affine)
    got, want = _both(monkeypatch, lambda: _ln(x, w, b, grad_of=parts, g=g))
    assert any(k[1] == d for k in rows._held)  # the held kernels ran
    monkeypatch.setattr(rows, "_MAX_HELD", 0)
    generic = _ln(x, w, b, grad_of=parts, g=g)
    ref = _ln(x, w, b, grad_of=parts, g=g, lib=torch)
    for a, gen, n, r in zip(got, generic, want, ref):
        scale = max(1.0, np.abs(r).max())
        _close(a, gen, scale)
        _close(a, n, scale)
        _close(a, r, scale)


def test_layer_norm_held_large_mean_and_specials(monkeypatch):
    _check_large_mean(monkeypatch, (6, 160))
    _check_special_rows(monkeypatch, 32)


def test_layer_norm_held_kernels_respect_the_shape_budget(monkeypatch):
    from kiln.jit import engine
    monkeypatch.setattr(engine, "SHAPE_KERNELS", 0)
    monkeypatch.setattr(rows, "_held", {})
    x = RNG.standard_normal((4, 80)).astype(np.float32)
    y = rows.layer_norm(x, None, None, 1e-5)
    assert y is not None and not rows._held  # the generic kernel
    m = x.mean(-1, keepdims=True)
    _close(y, (x - m) / np.sqrt(x.var(-1, keepdims=True) + 1e-5), 4.0)


def _softmax_ref(x, log):
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = x - x.max(-1, keepdims=True)
        ls = s - np.log(np.exp(s).sum(-1, keepdims=True))
    return ls if log else np.exp(ls)


SM_SHAPES = [(5,), (3, 63), (2, 65), (3, 136), (16, 4, 64, 64), (7, 5000), (2, 20000)]


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape", SM_SHAPES, ids=str)
def test_softmax_matches_numpy_and_float64(monkeypatch, shape, log):
    x = (RNG.standard_normal(shape) * 4).astype(np.float32)
    if len(shape) == 4:  # causal mask, as in attention
        x = np.where(np.triu(np.ones(shape[-2:], bool), 1), np.float32(-np.inf), x)
    f = kiln.log_softmax if log else kiln.softmax
    got, want = _both(monkeypatch, lambda: f(kiln.tensor(x), -1).numpy())
    ref = _softmax_ref(x, log)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    ok = np.isfinite(ref)
    tol = {"rtol": 1e-5, "atol": 1e-6 if log else 1e-8}
    _close(got[ok], ref[ok], **tol)
    _close(got[ok], want[ok], **tol)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_specials(monkeypatch, log):
    x = RNG.standard_normal((7, 72)).astype(np.float32)
    assert rows.softmax(x) is not None  # the native path
    x[0, 2] = np.nan
    x[1, 4] = np.inf
    x[2] = -np.inf
    x[3, :4] = -np.inf
    x[4] *= 1e30
    x[5] = 3e38
    x[6] -= 1e4  # far below the global max
    f = kiln.log_softmax if log else kiln.softmax
    got, want = _both(monkeypatch, lambda: f(kiln.tensor(x), 1).numpy())
    ref = torch.log_softmax(torch.tensor(x), 1) if log else torch.softmax(torch.tensor(x), 1)
    ref = ref.numpy()
    for other in (want, ref):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(other))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(other))
        ok = np.isfinite(other)
        _close(got[ok], other[ok], rtol=1e-5, atol=1e-6)


def test_softmax_gradient_non_contiguous_and_other_axes(monkeypatch):
    x = RNG.standard_normal((64, 10)).astype(np.float32)
    g = RNG.standard_normal((10, 64)).astype(np.float32)

    def run():
        out = []
        for f in (kiln.softmax, kiln.log_softmax):
            t = kiln.tensor(x, requires_grad=True)
            y = f(t.t(), -1)  # non-contiguous rows
            y.backward(kiln.tensor(g))
            out += [y.detach().numpy(), t.grad.numpy(), f(kiln.tensor(x), 0).numpy()]
        return out

    for a, n in zip(*_both(monkeypatch, run)):
        _close(a, n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dt", [np.float64, np.float16])
def test_softmax_other_dtypes_keep_numpy(monkeypatch, dt):
    x = RNG.standard_normal((4, 30)).astype(dt)
    for f in (kiln.softmax, kiln.log_softmax):
        got, want = _both(monkeypatch, lambda: f(kiln.tensor(x), -1).numpy())
        np.testing.assert_array_equal(got, want)


def test_softmax_empty_and_scalar():
    for shape in [(0,), (3, 0), (0, 5), ()]:
        x = kiln.tensor(np.zeros(shape, np.float32))
        assert kiln.softmax(x, -1).shape == shape
        assert kiln.log_softmax(x, -1).shape == shape
    assert rows.softmax(np.zeros((0, 4), np.float32)) is None
    # rows mostly outside the 64-element vector steps keep numpy's path (faster there)
    for n in (5, 32, 63, 100):
        assert rows.softmax(np.zeros((3, n), np.float32)) is None
    for n in (64, 65, 128, 1000):
        assert rows.softmax(np.zeros((3, n), np.float32)) is not None


def test_compiled_step_uses_the_same_kernels(monkeypatch):
    calls = {"layer_norm": 0, "layer_norm_backward": 0, "softmax": 0}

    def counting(name, f):
        def counted(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return counted

    for name in calls:
        monkeypatch.setattr(rows, name, counting(name, getattr(rows, name)))
    kiln.manual_seed(0)
    model = kiln.nn.Sequential(kiln.nn.Linear(64, 64), kiln.nn.LayerNorm(64))
    x = kiln.tensor(RNG.standard_normal((32, 64)).astype(np.float32))
    compiled = compiled_softmax_step_matches_eager(model, x)
    calls.update(dict.fromkeys(calls, 0))
    compiled(x)  # the generated executor, not a trace
    assert all(calls.values()), calls


def test_layer_norm_backward_of_broadcast_gradient(monkeypatch):
    # y.sum() sends a zero-strided gradient: copied to contiguous rows for the native kernel
    x = RNG.standard_normal((32, 48)).astype(np.float32)
    w = RNG.standard_normal(48).astype(np.float32)

    def run():
        t, tw = kiln.tensor(x, requires_grad=True), kiln.tensor(w, requires_grad=True)
        (kiln.nn.functional.layer_norm(t, (48,), tw) * 3).sum().backward()
        return t.grad.numpy(), tw.grad.numpy()

    for a, n in zip(*_both(monkeypatch, run)):
        _close(a, n, max(1.0, np.abs(n).max()))
