"""Native max pooling (kiln.jit.pool) against the numpy path and PyTorch: values, indices and
the backward scatter, bit for bit, on ties, NaN, -inf, padding, dilation, ceil mode, odd sizes,
non-contiguous inputs, batch 1 and batches large enough for the parallel path."""

import numpy as np
import pytest
import torch

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.jit import pool  # noqa: E402
from kiln.ops import conv  # noqa: E402

RNG = np.random.default_rng(0)

# (kernel, stride, padding, dilation, ceil_mode)
CONFIGS = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((2, 2), (1, 1), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((2, 3), (1, 2), (1, 1), (1, 1), False),
    ((3, 3), (2, 2), (0, 0), (1, 1), True),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((2, 2), (1, 1), (0, 0), (2, 2), False),
    ((2, 3), (2, 2), (1, 1), (2, 1), True),
    ((3, 2), (3, 2), (1, 0), (1, 2), False),
    ((4, 4), (4, 4), (0, 0), (1, 1), True),
    ((1, 1), (1, 1), (0, 0), (1, 1), False),
]
SHAPES = [(2, 3, 9, 8), (1, 1, 5, 7), (1, 2, 4, 4), (3, 2, 13, 11)]


def _data(kind, shape):
    if kind == "ties":
        return RNG.integers(0, 2, shape).astype(np.float32)
    x = RNG.standard_normal(shape).astype(np.float32)
    if kind == "nan":
        x[RNG.random(shape) < 0.2] = np.nan
    elif kind == "inf":
        x[RNG.random(shape) < 0.5] = -np.inf
    elif kind == "all_inf":
        x[:] = -np.inf
    elif kind == "specials":
        x[RNG.random(shape) < 0.3] = np.inf
        x[RNG.random(shape) < 0.1] = np.nan
    return x


def _both_paths(fn, monkeypatch):
    """fn() with native kernels on, then with them off."""
    monkeypatch.setattr(jit, "_available", True)
    got = fn()
    monkeypatch.setattr(jit, "_available", False)
    want = fn()
    monkeypatch.setattr(jit, "_available", None)
    return got, want


def _attrs(cfg):
    return dict(zip(conv._POOL_ATTRS, cfg))


@pytest.mark.parametrize("kind", ["rand", "ties", "nan", "inf", "all_inf", "specials"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_pool_matches_numpy_path(cfg, kind, monkeypatch):
    a = _attrs(cfg)
    for shape in SHAPES:
        x = _data(kind, shape)
        (v, i), (nv, ni) = _both_paths(
            lambda: (conv._max_pool2d.impl(x, **a), conv._max_pool2d_indices.impl(x, **a)),
            monkeypatch)
        assert v.dtype == np.float32 and i.dtype == np.int64
        np.testing.assert_array_equal(v, nv)  # NaN positions must agree too
        np.testing.assert_array_equal(i, ni)
        g = RNG.standard_normal(i.shape).astype(np.float32)
        s, ns = _both_paths(lambda: conv._pool_scatter.impl(g, i, in_hw=shape[2:]), monkeypatch)
        assert s.dtype == np.float32
        np.testing.assert_array_equal(s, ns)


@pytest.mark.parametrize("kind", ["rand", "ties", "nan", "all_inf"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_pool_matches_torch(cfg, kind, monkeypatch):
    monkeypatch.setattr(jit, "_available", True)
    kernel, stride, padding, dilation, ceil = cfg
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
              ceil_mode=ceil, return_indices=True)
    x = _data(kind, (2, 3, 9, 8))
    v, i = torch.nn.functional.max_pool2d(torch.tensor(x), **kw)
    kv, ki = kiln.nn.functional.max_pool2d(kiln.tensor(x), **kw)
    np.testing.assert_array_equal(kv.numpy(), v.numpy())
    np.testing.assert_array_equal(ki.numpy(), i.numpy())
    kw.pop("return_indices")
    np.testing.assert_array_equal(kiln.nn.functional.max_pool2d(kiln.tensor(x), **kw).numpy(),
                                  torch.nn.functional.max_pool2d(torch.tensor(x), **kw).numpy())


@pytest.mark.parametrize("shape, cfg", [((64, 16, 28, 28), CONFIGS[0]),
                                        ((64, 32, 14, 14), CONFIGS[0]),
                                        ((16, 8, 33, 31), CONFIGS[5])])
def test_large_batches_and_gradient(shape, cfg, monkeypatch):
    """Large inputs (the parallel path): forward, indices and the input gradient vs PyTorch,
    and the kernels really run."""
    monkeypatch.setattr(jit, "_available", True)
    calls = []
    for name in ("max_pool2d", "pool_scatter"):
        real = getattr(pool, name)
        monkeypatch.setattr(pool, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    kernel, stride, padding, dilation, ceil = cfg
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
              ceil_mode=ceil)
    x = _data("ties", shape)  # many ties: the first maximum must win everywhere
    w = RNG.standard_normal(conv._pool_infer([shape], [x.dtype], *cfg[:3], cfg[4],
                                             dilation=cfg[3])[0]).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    (torch.nn.functional.max_pool2d(tx, **kw) * torch.tensor(w)).sum().backward()
    kx = kiln.tensor(x, requires_grad=True)
    out = kiln.nn.functional.max_pool2d(kx, **kw)
    (out * kiln.tensor(w)).sum().backward()
    np.testing.assert_array_equal(out.detach().numpy(), torch.nn.functional.max_pool2d(tx, **kw)
                                  .detach().numpy())
    np.testing.assert_array_equal(kx.grad.numpy(), tx.grad.numpy())
    assert len(calls) >= 3


def test_noncontiguous_and_other_dtypes_fall_back(monkeypatch):
    a = _attrs(CONFIGS[2])
    base = RNG.standard_normal((3, 4, 12, 10)).astype(np.float32)
    for x in (base[:, ::2, 1::2, ::-1], base.transpose(0, 1, 3, 2), base[::2]):
        got, want = _both_paths(lambda: conv._max_pool2d_indices.impl(x, **a), monkeypatch)
        np.testing.assert_array_equal(got, want)
        got, want = _both_paths(lambda: conv._max_pool2d.impl(x, **a), monkeypatch)
        np.testing.assert_array_equal(got, want)
    for dt in (np.float64, np.float16, np.int32):
        x = base.astype(dt)
        got, want = _both_paths(lambda: conv._max_pool2d_indices.impl(x, **a), monkeypatch)
        np.testing.assert_array_equal(got, want)
        got, want = _both_paths(lambda: conv._max_pool2d.impl(x, **a), monkeypatch)
        assert got.dtype == dt
        np.testing.assert_array_equal(got, want)
    i = conv._max_pool2d_indices.impl(base, **a)
    g = RNG.standard_normal(i.shape)
    got, want = _both_paths(lambda: conv._pool_scatter.impl(g, i, in_hw=(12, 10)), monkeypatch)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    g32 = g.astype(np.float32)[:, :, ::-1]  # non-contiguous gradient
    got, want = _both_paths(lambda: conv._pool_scatter.impl(g32, i, in_hw=(12, 10)), monkeypatch)
    np.testing.assert_array_equal(got, want)


def test_empty_inputs(monkeypatch):
    a = _attrs(CONFIGS[0])
    x = np.zeros((0, 3, 8, 8), np.float32)
    got, want = _both_paths(lambda: conv._max_pool2d.impl(x, **a), monkeypatch)
    assert got.shape == want.shape == (0, 3, 4, 4)
    got, want = _both_paths(lambda: conv._max_pool2d_indices.impl(x, **a), monkeypatch)
    assert got.shape == want.shape and got.dtype == want.dtype
    g = np.zeros((0, 3, 4, 4), np.float32)
    got, want = _both_paths(lambda: conv._pool_scatter.impl(g, want, in_hw=(8, 8)), monkeypatch)
    assert got.shape == want.shape == (0, 3, 8, 8)


def test_scatter_sums_overlapping_windows_in_order(monkeypatch):
    """Overlapping windows send several gradients to one position: the sums (and their order,
    hence the rounding) are numpy's add.at."""
    x = _data("ties", (4, 5, 10, 9))
    i = conv._max_pool2d_indices.impl(x, **_attrs(CONFIGS[1]))
    g = (RNG.standard_normal(i.shape) * 10.0 ** RNG.integers(-6, 6, i.shape)).astype(np.float32)
    got, want = _both_paths(lambda: conv._pool_scatter.impl(g, i, in_hw=(10, 9)), monkeypatch)
    np.testing.assert_array_equal(got, want)


def test_scatter_out_of_plane_index_uses_numpy(monkeypatch):
    g = np.ones((1, 2, 2, 2), np.float32)
    i = np.zeros((1, 2, 2, 2), np.int64)
    i[0, 1, 0, 0] = -1  # lands in plane 0 in the numpy path's flat indexing
    got, want = _both_paths(lambda: conv._pool_scatter.impl(g, i, in_hw=(2, 2)), monkeypatch)
    np.testing.assert_array_equal(got, want)
    i[0, 1, 0, 0] = 99
    monkeypatch.setattr(jit, "_available", True)
    with pytest.raises(IndexError):
        conv._pool_scatter.impl(g, i, in_hw=(2, 2))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[7]])
def test_values_and_indices_in_one_pass(cfg):
    """mode 'both' (one scan for both outputs) agrees with the two single-output kernels."""
    x = _data("specials", (3, 4, 11, 10))
    Ho, Wo, _ = conv._pool_pads(11, 10, cfg[0], cfg[1], cfg[2], cfg[3], cfg[4])
    v, i = pool.max_pool2d(x, *cfg[:4], Ho, Wo, "both")
    np.testing.assert_array_equal(v, pool.max_pool2d(x, *cfg[:4], Ho, Wo, "values"))
    np.testing.assert_array_equal(i, pool.max_pool2d(x, *cfg[:4], Ho, Wo, "indices"))


def test_large_windows_use_the_numpy_path_instead_of_a_huge_kernel(monkeypatch):
    """A 60x80 window (ONNX's MaxPool2d_stride_padding_dilation model) would unroll into a
    kernel that takes minutes to compile: such windows stay on numpy."""
    from kiln.jit import pool

    def refuse(*a, **k):
        raise AssertionError("native pooling was asked for a 60x80 window")

    monkeypatch.setattr(pool, "max_pool2d", refuse)
    x = np.random.default_rng(0).standard_normal((1, 1, 200, 200)).astype(np.float32)
    y = kiln.nn.functional.max_pool2d(kiln.tensor(x), (60, 80), stride=10, padding=(10, 20),
                                      dilation=2)
    want = torch.nn.functional.max_pool2d(torch.tensor(x), (60, 80), stride=10,
                                          padding=(10, 20), dilation=2)
    np.testing.assert_array_equal(y.numpy(), want.numpy())


def test_pooling_new_shapes_use_numpy_once_the_shape_budget_is_spent(monkeypatch):
    from kiln.jit import engine

    monkeypatch.setattr(engine, "SHAPE_KERNELS", 0)
    monkeypatch.setattr(pool, "_cache", {})
    x = np.random.default_rng(7).standard_normal((2, 3, 9, 7)).astype(np.float32)
    t = kiln.tensor(x, requires_grad=True)
    y = kiln.nn.functional.max_pool2d(t, 2)
    y.sum().backward()
    assert pool._cache == {}
    tt = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.max_pool2d(tt, 2)
    want.sum().backward()
    np.testing.assert_array_equal(y.detach().numpy(), want.detach().numpy())
    np.testing.assert_array_equal(t.grad.numpy(), tt.grad.numpy())
