"""Native im2col gathers (kiln.jit.im2col) against kiln.ops.conv's numpy path, bit for bit: the
channels-last copies and column matrices, the row correlation, and the three convolution
primitives, on padding (negative: cropping), stride, dilation, groups, odd sizes, batch 1, empty
batches, NaN/inf/-0, non-contiguous and non-float32 inputs, and batches large enough for the
parallel path."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.ops import conv  # noqa: E402

RNG = np.random.default_rng(0)

# (N, C, H, W, kh, kw, stride, pads (top, bottom, left, right), dilation, groups)
GEOMS = [
    (2, 3, 9, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 1, 28, 28, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1),
    (3, 16, 14, 14, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1),
    (2, 4, 11, 7, 3, 2, (2, 3), (1, 0, 2, 1), (1, 1), 1),
    (2, 5, 13, 12, 3, 3, (1, 2), (2, 2, 1, 1), (2, 3), 1),
    (1, 6, 7, 9, 2, 3, (2, 1), (0, 1, 1, 0), (1, 2), 3),
    (2, 4, 6, 5, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2),
    (1, 2, 5, 5, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1), 1),
]


def _data(shape, kind="normal", dtype=np.float32):
    x = RNG.standard_normal(shape).astype(dtype)
    if kind == "special" and x.size:
        flat = x.reshape(-1)
        flat[::7] = np.nan
        flat[1::11] = np.inf
        flat[2::13] = -np.inf
        flat[3::5] = -0.0
    return x


@pytest.fixture(autouse=True)
def _no_direct_conv(monkeypatch):
    """These tests check the im2col kernels bit for bit: keep kiln.jit.conv_direct out."""
    from kiln.jit import conv_direct

    monkeypatch.setattr(conv_direct, "ENABLED", False)


def _out_hw(g):
    N, C, H, W, kh, kw, s, p, d, _ = g
    return (conv._out_len(H, kh, s[0], p[0], p[1], d[0]),
            conv._out_len(W, kw, s[1], p[2], p[3], d[1]))


def _both(monkeypatch, f):
    """(native result, numpy result) of ``f()``."""
    monkeypatch.setattr(jit, "_available", True)
    a = f()
    monkeypatch.setattr(jit, "_available", False)
    b = f()
    return a, b


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("g", GEOMS)
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("kind", ["normal", "special"])
def test_cols_rows_bitwise(monkeypatch, g, ones, kind):
    N, C, H, W, kh, kw, s, p, d, groups = g
    Ho, Wo = _out_hw(g)
    x = _data((N, C, H, W), kind)
    a, b = _both(monkeypatch, lambda: np.array(conv._cols_rows(x, kh, kw, s, p, d, Ho, Wo, ones)))
    _same(a, b)


@pytest.mark.parametrize("g", GEOMS)
def test_cols_rows_non_contiguous_input(monkeypatch, g):
    N, C, H, W, kh, kw, s, p, d, groups = g
    Ho, Wo = _out_hw(g)
    x = _data((N, C, W, H)).transpose(0, 1, 3, 2)
    a, b = _both(monkeypatch, lambda: np.array(conv._cols_rows(x, kh, kw, s, p, d, Ho, Wo)))
    _same(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 16, 14, 14), (64, 32, 14, 14), (0, 4, 3, 3)])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (2, 2, 2, 2), (1, 0, 3, 2), (-1, 2, 0, -2)])
def test_nhwc_padded_bitwise(monkeypatch, shape, pads):
    x = _data(shape, "special")
    a, b = _both(monkeypatch, lambda: conv._nhwc_padded(x, pads))
    _same(a, b)
    a, b = _both(monkeypatch, lambda: conv._nhwc_padded(x[:, ::-1], pads))
    _same(a, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pads,s1,dil", [((2, 2, 2, 2), 1, (1, 1)), ((0, 1, 3, 0), 2, (2, 1)),
                                         ((-1, 2, 1, -1), 1, (1, 2)), ((4, 4, 4, 4), 1, (1, 1))])
def test_corr_rows_bitwise(monkeypatch, bias, pads, s1, dil):
    x = _data((3, 5, 9, 11), "special")
    wk = _data((4, 5, 3, 3))
    b = _data((4,)) if bias else None
    a, c = _both(monkeypatch, lambda: conv._corr_rows(x, wk, pads, s1, dil, b))
    _same(a, c)
    for order in ((0, 1, 2, 3), (1, 0, 2, 3)):  # a contiguous and a strided ``out``
        shape = tuple(a.shape[i] for i in order)
        a, c = _both(monkeypatch, lambda: conv._corr_rows(
            x, wk, pads, s1, dil, b, np.full(shape, 7.0, np.float32).transpose(order)))
        _same(a, c)


def _prims(x, w, g, b, s, p, d, groups):
    kh, kw = w.shape[2:]
    y = conv._conv2d.impl(x, w, *(() if b is None else (b,)), stride=s, padding=p, dilation=d,
                          groups=groups)
    gy = g if g is not None else np.ones_like(y)
    H, W = x.shape[2:]
    exact = conv._exact_pads(p, H, W, *y.shape[2:], kh, kw, s, d)
    gx = conv._conv_transpose2d.impl(gy, w, stride=s, padding=exact, dilation=d, groups=groups)
    gw = conv._conv2d_weight.impl(x, gy, stride=s, padding=p, dilation=d, groups=groups,
                                  kernel=(kh, kw))
    return y, gx, gw


@pytest.mark.parametrize("g", GEOMS)
@pytest.mark.parametrize("bias", [False, True])
def test_primitives_bitwise(monkeypatch, g, bias):
    N, C, H, W, kh, kw, s, p, d, groups = g
    Ho, Wo = _out_hw(g)
    O = 2 * groups
    x = _data((N, C, H, W), "special")
    w = _data((O, C // groups, kh, kw))
    b = _data((O,)) if bias else None
    gy = _data((N, O, Ho, Wo))
    for a, c in zip(*_both(monkeypatch, lambda: _prims(x, w, gy, b, s, p, d, groups))):
        _same(a, c)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_dtypes_fall_back(monkeypatch, dtype):
    g = GEOMS[2]
    N, C, H, W, kh, kw, s, p, d, groups = g
    x = _data((N, C, H, W), dtype=dtype)
    w = _data((4, C, kh, kw), dtype=dtype)
    b = _data((4,), dtype=dtype)
    for a, c in zip(*_both(monkeypatch, lambda: _prims(x, w, None, b, s, p, d, groups))):
        assert a.dtype == dtype
        _same(a, c)


def test_empty_batch(monkeypatch):
    x = _data((0, 16, 14, 14))
    w = _data((8, 16, 5, 5))
    b = _data((8,))
    for a, c in zip(*_both(monkeypatch, lambda: _prims(x, w, None, b, (1, 1), (2, 2, 2, 2),
                                                       (1, 1), 1))):
        _same(a, c)


@pytest.mark.parametrize("C,H,O", [(1, 28, 16), (16, 14, 32)])
def test_cnn_shapes_parallel(monkeypatch, C, H, O):
    """The benchmark cnn's layers at batch 64: large enough to split over threads."""
    x = _data((64, C, H, H))
    w = _data((O, C, 5, 5))
    b = _data((O,))
    gy = _data((64, O, H, H))
    for a, c in zip(*_both(monkeypatch, lambda: _prims(x, w, gy, b, (1, 1), (2, 2, 2, 2),
                                                       (1, 1), 1))):
        _same(a, c)


def test_native_kernels_run(monkeypatch):
    """The JIT path really uses the native kernels (else the tests above compare numpy twice)."""
    from kiln.jit import im2col

    calls = []
    for name in ("gather_rows", "corr_rows_sum", "nhwc_padded"):
        f = getattr(im2col, name)
        monkeypatch.setattr(im2col, name, lambda *a, _f=f, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.setattr(jit, "_available", True)
    _prims(_data((2, 16, 14, 14)), _data((4, 16, 5, 5)), None, _data((4,)), (1, 1),
           (2, 2, 2, 2), (1, 1), 1)
    _prims(_data((2, 1, 12, 12)), _data((4, 1, 5, 5)), None, _data((4,)), (1, 1),
           (2, 2, 2, 2), (1, 1), 1)
    assert set(calls) == {"gather_rows", "corr_rows_sum", "nhwc_padded"}


@pytest.mark.parametrize("make_bias", [
    lambda: kiln.tensor(np.arange(12, dtype=np.float32))[::2],  # strided
    lambda: kiln.tensor([3.0]).expand(6),                        # stride 0
])
def test_conv2d_with_a_non_contiguous_bias(make_bias, monkeypatch):
    rng = np.random.default_rng(5)
    x = kiln.tensor(rng.standard_normal((2, 8, 10, 10)).astype(np.float32))
    w = kiln.tensor(rng.standard_normal((6, 8, 3, 3)).astype(np.float32))
    bias = make_bias()
    got = kiln.nn.functional.conv2d(x, w, bias, padding=1).numpy()
    want = kiln.nn.functional.conv2d(x, w, kiln.tensor(bias.numpy().copy()), padding=1).numpy()
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(kiln.jit, "_available", False)
    np.testing.assert_array_equal(got, kiln.nn.functional.conv2d(x, w, bias, padding=1).numpy())


def test_new_shapes_use_numpy_once_the_shape_budget_is_spent(monkeypatch):
    from kiln.jit import engine, im2col

    monkeypatch.setattr(engine, "SHAPE_KERNELS", 0)
    monkeypatch.setattr(im2col, "_cache", {})
    rng = np.random.default_rng(6)
    x = kiln.tensor(rng.standard_normal((2, 3, 9, 11)).astype(np.float32))
    w = kiln.tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    got = kiln.nn.functional.conv2d(x, w, padding=1).numpy()
    assert im2col._cache == {}
    monkeypatch.setattr(kiln.jit, "_available", False)
    np.testing.assert_array_equal(got, kiln.nn.functional.conv2d(x, w, padding=1).numpy())
