"""Direct convolution kernels (kiln.jit.conv_direct) against a float64 reference, through the
three convolution primitives of kiln.ops.conv: the error of every element stays within 2e-5 of
the sum of its products' magnitudes (float32 sums of C*kh*kw or N*Ho*Wo terms in another
order than the gemm path's).  Also: shapes and dtypes the kernels decline fall back to the
numpy path bit for bit, NaN/inf propagate like it, and autograd agrees with PyTorch."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.jit import conv_direct, engine  # noqa: E402
from kiln.ops import conv  # noqa: E402

pytestmark = pytest.mark.skipif(not conv_direct._avx512(), reason="direct kernels need AVX-512")

RNG = np.random.default_rng(0)
RTOL = 2e-5

# (N, C, H, W, O, kh, kw, pads (top, bottom, left, right))
GEOMS = [
    (64, 16, 14, 14, 32, 5, 5, (2, 2, 2, 2)),   # the cnn's conv2 (parallel path)
    (64, 1, 28, 28, 16, 5, 5, (2, 2, 2, 2)),    # the cnn's conv1
    (1, 16, 7, 9, 16, 3, 3, (1, 1, 1, 1)),
    (3, 5, 11, 6, 48, 3, 2, (0, 2, 1, 0)),
    (2, 32, 5, 5, 16, 1, 1, (0, 0, 0, 0)),
    (2, 3, 4, 30, 32, 2, 5, (1, 0, 4, 3)),
    (2, 16, 6, 6, 64, 5, 5, (0, 0, 0, 0)),   # 64*5*5 > MAX_REDUCTION for the input grad
    (2, 16, 7, 6, 64, 3, 3, (1, 1, 0, 2)),
    (2, 16, 5, 29, 16, 3, 3, (1, 1, 1, 1)),   # a narrower last pixel block, an odd last row
]


@pytest.fixture(autouse=True)
def _small_calls_too(monkeypatch):
    monkeypatch.setattr(conv_direct, "MIN_WORK", 0)


def _prims(x, w, gy, b, pads):
    """(conv2d, conv_transpose2d, conv2d_weight) of one stride-1 geometry."""
    kh, kw = w.shape[2:]
    kws = dict(stride=(1, 1), dilation=(1, 1), groups=1)
    y = conv._conv2d.impl(x, w, *(() if b is None else (b,)), padding=pads, **kws)
    H, W = x.shape[2:]
    exact = conv._exact_pads(pads, H, W, *y.shape[2:], kh, kw, (1, 1), (1, 1))
    gx = conv._conv_transpose2d.impl(gy, w, padding=exact, **kws)
    gw = conv._conv2d_weight.impl(x, gy, padding=pads, kernel=(kh, kw), **kws)
    return y, gx, gw


def _inputs(g, bias=True, dtype=np.float32):
    N, C, H, W, O, kh, kw, p = g
    Ho, Wo = H + p[0] + p[1] - kh + 1, W + p[2] + p[3] - kw + 1
    x = RNG.standard_normal((N, C, H, W)).astype(dtype)
    w = RNG.standard_normal((O, C, kh, kw)).astype(dtype)
    gy = RNG.standard_normal((N, O, Ho, Wo)).astype(dtype)
    b = RNG.standard_normal(O).astype(dtype) if bias else None
    return x, w, gy, b


def _check_close(got, x, w, gy, b, pads):
    f64 = [None if a is None else a.astype(np.float64) for a in (x, w, gy, b)]
    ref = _prims(*f64, pads)
    mag = _prims(*[None if a is None else np.abs(a) for a in f64], pads)
    for g, r, m in zip(got, ref, mag):
        assert g.dtype == np.float32 and g.shape == r.shape and g.flags.c_contiguous
        assert np.all(np.abs(g - r) <= RTOL * m + 1e-30)


def _calls(monkeypatch):
    calls = []
    for name in ("conv2d", "conv_transpose2d", "conv2d_weight"):
        f = getattr(conv_direct, name)

        def spy(*a, _f=f, _n=name):
            r = _f(*a)
            if r is not None and r is not False:
                calls.append(_n)
            return r

        monkeypatch.setattr(conv_direct, name, spy)
    return calls


@pytest.mark.parametrize("g", GEOMS)
@pytest.mark.parametrize("bias", [False, True])
def test_primitives_match_float64(monkeypatch, g, bias):
    calls = _calls(monkeypatch)
    x, w, gy, b = _inputs(g, bias)
    _check_close(_prims(x, w, gy, b, g[7]), x, w, gy, b, g[7])
    expect = {"conv2d", "conv2d_weight"}
    if g[1] % 16 == 0 and g[4] * g[5] * g[6] <= conv_direct.MAX_REDUCTION:
        expect.add("conv_transpose2d")
    assert set(calls) == expect


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(monkeypatch, threads):
    from kiln.jit import parallel

    g = GEOMS[0]
    x, w, gy, b = _inputs(g)
    monkeypatch.setattr(parallel, "_threads", threads)
    got = _prims(x, w, gy, b, g[7])
    _check_close(got, x, w, gy, b, g[7])


def test_non_contiguous_inputs(monkeypatch):
    g = (4, 16, 9, 10, 32, 3, 3, (1, 1, 1, 1))
    x, w, gy, b = _inputs(g)
    xs = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # F-ordered planes
    ws = np.repeat(w, 2, axis=1)[:, ::2]
    gys = np.repeat(gy, 2, axis=0)[::2]
    bs = np.repeat(b, 2)[::2]
    calls = _calls(monkeypatch)
    _check_close(_prims(xs, ws, gys, bs, g[7]), x, w, gy, b, g[7])
    assert set(calls) == {"conv2d", "conv_transpose2d", "conv2d_weight"}


def test_nan_inf_propagate_like_numpy(monkeypatch):
    g = (2, 16, 6, 7, 16, 3, 3, (1, 1, 1, 1))
    x, w, gy, b = _inputs(g)
    x.reshape(-1)[::37] = np.nan
    x.reshape(-1)[5::41] = np.inf
    gy.reshape(-1)[3::29] = -np.inf
    got = _prims(x, w, gy, b, g[7])
    monkeypatch.setattr(jit, "_available", False)
    want = _prims(x, w, gy, b, g[7])
    for a, c in zip(got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(c))
        fin = np.isfinite(c)
        np.testing.assert_array_equal(a[~fin & ~np.isnan(c)], c[~fin & ~np.isnan(c)])
        np.testing.assert_allclose(a[fin], c[fin], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_dtypes_fall_back(monkeypatch, dtype):
    g = GEOMS[2]
    x, w, gy, b = _inputs(g, dtype=dtype)
    calls = _calls(monkeypatch)
    got = _prims(x, w, gy, b, g[7])
    monkeypatch.setattr(jit, "_available", False)
    for a, c in zip(got, _prims(x, w, gy, b, g[7])):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, c)
    assert calls == []


@pytest.mark.parametrize("g,declined", [
    ((2, 16, 8, 8, 24, 3, 3, (1, 1, 1, 1)), {"conv2d", "conv2d_weight"}),  # O % 16
    ((0, 16, 8, 8, 16, 3, 3, (1, 1, 1, 1)), {"conv2d", "conv2d_weight", "conv_transpose2d"}),
    ((2, 16, 8, 8, 16, 3, 3, (-1, 1, 1, 1)), {"conv2d", "conv2d_weight"}),  # cropping
    ((1, 144, 4, 4, 16, 3, 3, (1, 1, 1, 1)), {"conv2d"}),  # C*kh*kw > MAX_REDUCTION
])
def test_declined_shapes_fall_back(monkeypatch, g, declined):
    x, w, gy, b = _inputs(g)
    calls = _calls(monkeypatch)
    got = _prims(x, w, gy, b, g[7])
    assert not declined & set(calls)
    monkeypatch.setattr(jit, "_available", False)
    for name, a, c in zip(("conv2d", "conv_transpose2d", "conv2d_weight"), got,
                          _prims(x, w, gy, b, g[7])):
        if name in calls:
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(a, c)


def test_small_calls_keep_numpy(monkeypatch):
    monkeypatch.setattr(conv_direct, "MIN_WORK", 1 << 20)
    g = (1, 16, 6, 6, 16, 3, 3, (1, 1, 1, 1))
    calls = _calls(monkeypatch)
    _prims(*_inputs(g), g[7])
    assert calls == []


def test_disabled_no_avx512_and_shape_budget(monkeypatch):
    g = (2, 16, 6, 6, 16, 3, 3, (1, 1, 1, 1))
    x, w, gy, b = _inputs(g)
    calls = _calls(monkeypatch)
    monkeypatch.setattr(conv_direct, "ENABLED", False)
    _prims(x, w, gy, b, g[7])
    monkeypatch.setattr(conv_direct, "ENABLED", True)
    monkeypatch.setattr(conv_direct, "_HAS_AVX512", False)
    _prims(x, w, gy, b, g[7])
    monkeypatch.setattr(conv_direct, "_HAS_AVX512", True)
    monkeypatch.setattr(engine, "SHAPE_KERNELS", 0)
    monkeypatch.setattr(conv_direct, "_cache", {})
    _prims(x, w, gy, b, g[7])
    assert calls == [] and conv_direct._cache == {}


def test_autograd_matches_torch():
    torch = pytest.importorskip("torch")
    x, w, gy, b = _inputs(GEOMS[0])
    ts = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ks = [kiln.tensor(a, requires_grad=True) for a in (x, w, b)]
    ty = torch.nn.functional.conv2d(*ts, padding=2)
    ky = kiln.nn.functional.conv2d(*ks, padding=2)
    ty.backward(torch.tensor(gy))
    ky.backward(kiln.tensor(gy))
    np.testing.assert_allclose(ky.detach().numpy(), ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    for k, t in zip(ks, ts):
        scale = np.abs(t.grad.numpy()).max()
        np.testing.assert_allclose(k.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-5 * scale)
