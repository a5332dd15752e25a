"""kiln.nn.init against torch.nn.init: gains and fans exactly, exact fills value for value, random
schemes statistically (same bounds, moments matching the formulas and torch's own samples), and
the default initialisation of the layers."""

import math
import warnings

import numpy as np
import pytest
import torch

import kiln
from kiln.nn import init
from tests.helpers import check_exception


def pair(shape, dtype=np.float32):
    """The same zero tensor in both libraries."""
    a = np.zeros(shape, dtype)
    return kiln.tensor(a), torch.tensor(a)


def moments_close(k: np.ndarray, t: np.ndarray, mean: float, std: float, *, sigmas=6.0):
    """Sample mean and std of both libraries' draws agree with the formula (within ``sigmas``
    standard errors) and with each other."""
    for name, a in (("kiln", k), ("torch", t)):
        a = a.astype(np.float64).ravel()
        n = a.size
        assert abs(a.mean() - mean) <= sigmas * std / math.sqrt(n), (name, a.mean(), mean)
        assert abs(a.std() - std) <= sigmas * std / math.sqrt(2 * n) + 1e-12, (name, a.std(), std)


@pytest.mark.parametrize("nonlinearity,param", [
    ("linear", None), ("conv1d", None), ("conv2d", None), ("conv_transpose2d", None),
    ("sigmoid", None), ("tanh", None), ("relu", None), ("leaky_relu", None),
    ("leaky_relu", 0.2), ("leaky_relu", math.sqrt(5)), ("leaky_relu", 3), ("selu", None)])
def test_calculate_gain_matches_torch(nonlinearity, param):
    assert init.calculate_gain(nonlinearity, param) == torch.nn.init.calculate_gain(
        nonlinearity, param)


def test_calculate_gain_errors():
    check_exception(lambda lib: lib.nn.init.calculate_gain("swish"), match="Unsupported")
    check_exception(lambda lib: lib.nn.init.calculate_gain("leaky_relu", True),
                    match="not a valid number")


@pytest.mark.parametrize("shape", [(3, 5), (8, 4, 3), (16, 3, 5, 7), (2, 3, 1, 2, 2), (4, 0)])
def test_fan_in_fan_out_match_torch(shape):
    k, t = pair(shape)
    assert init._calculate_fan_in_and_fan_out(k) == \
        torch.nn.init._calculate_fan_in_and_fan_out(t)


def test_fan_errors():
    check_exception(lambda lib: lib.nn.init._calculate_fan_in_and_fan_out(lib.zeros(4)),
                    match="fewer than 2 dimensions")
    check_exception(lambda lib: lib.nn.init.kaiming_uniform_(lib.zeros(4, 4), mode="fan_avg"),
                    match="not supported")
    check_exception(lambda lib: lib.nn.init.eye_(lib.zeros(2, 2, 2)), match="2 dimensions")
    check_exception(lambda lib: lib.nn.init.orthogonal_(lib.zeros(3)), match="2 or more")
    check_exception(lambda lib: lib.nn.init.dirac_(lib.zeros(3, 3)), match="3, 4, or 5")


@pytest.mark.parametrize("fn", [
    lambda lib, x: lib.nn.init.zeros_(x),
    lambda lib, x: lib.nn.init.ones_(x),
    lambda lib, x: lib.nn.init.constant_(x, -2.5),
    lambda lib, x: lib.nn.init.eye_(x.view(6, 20) if lib is torch else x.reshape(6, 20)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_fills_match_torch(fn, dtype):
    k, t = pair((6, 20), dtype)
    fn(kiln, k)
    fn(torch, t)
    np.testing.assert_array_equal(k.numpy(), t.numpy())
    assert k.numpy().dtype == dtype


@pytest.mark.parametrize("shape,groups", [((4, 4, 3), 1), ((6, 3, 3, 3), 2), ((4, 2, 3, 3, 3), 1)])
def test_dirac_matches_torch(shape, groups):
    k, t = pair(shape)
    init.dirac_(k, groups)
    torch.nn.init.dirac_(t, groups)
    np.testing.assert_array_equal(k.numpy(), t.numpy())


def test_uniform_and_normal_moments():
    k, t = pair((400, 500))
    init.uniform_(k, -0.5, 1.5)
    torch.nn.init.uniform_(t, -0.5, 1.5)
    for a in (k.numpy(), t.numpy()):
        assert a.min() >= -0.5 and a.max() <= 1.5 and a.min() < -0.499 and a.max() > 1.499
    moments_close(k.numpy(), t.numpy(), 0.5, 2 / math.sqrt(12))
    init.normal_(k, 3.0, 0.25)
    torch.nn.init.normal_(t, 3.0, 0.25)
    moments_close(k.numpy(), t.numpy(), 3.0, 0.25)


@pytest.mark.parametrize("shape", [(256, 784), (64, 32, 3, 3)])
@pytest.mark.parametrize("kw", [{}, {"a": math.sqrt(5)}, {"nonlinearity": "relu"},
                                {"mode": "fan_out", "nonlinearity": "relu"},
                                {"a": 0.2, "mode": "fan_out"}])
def test_kaiming_matches_torch(shape, kw):
    k, t = pair(shape)
    fan = init._calculate_correct_fan(k, kw.get("mode", "fan_in"))
    gain = torch.nn.init.calculate_gain(kw.get("nonlinearity", "leaky_relu"), kw.get("a", 0))
    std = gain / math.sqrt(fan)
    bound = math.sqrt(3) * std
    assert init.kaiming_uniform_(k, **kw) is k
    torch.nn.init.kaiming_uniform_(t, **kw)
    for a in (k.numpy(), t.numpy()):
        assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.99 * bound
    moments_close(k.numpy(), t.numpy(), 0.0, bound / math.sqrt(3))
    init.kaiming_normal_(k, **kw)
    torch.nn.init.kaiming_normal_(t, **kw)
    moments_close(k.numpy(), t.numpy(), 0.0, std)


@pytest.mark.parametrize("gain", [1.0, 5 / 3])
def test_xavier_matches_torch(gain):
    k, t = pair((300, 200, 2))
    fan_in, fan_out = 200 * 2, 300 * 2
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    init.xavier_uniform_(k, gain=gain)
    torch.nn.init.xavier_uniform_(t, gain=gain)
    bound = math.sqrt(3) * std
    for a in (k.numpy(), t.numpy()):
        assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.99 * bound
    moments_close(k.numpy(), t.numpy(), 0.0, std)
    init.xavier_normal_(k, gain=gain)
    torch.nn.init.xavier_normal_(t, gain=gain)
    moments_close(k.numpy(), t.numpy(), 0.0, std)


def _truncnorm_moments(mean, std, a, b):
    alpha, beta = (a - mean) / std, (b - mean) / std

    def pdf(x):
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x):
        return (1 + math.erf(x / math.sqrt(2))) / 2

    z = cdf(beta) - cdf(alpha)
    m = mean + std * (pdf(alpha) - pdf(beta)) / z
    var = std**2 * (1 + (alpha * pdf(alpha) - beta * pdf(beta)) / z
                    - ((pdf(alpha) - pdf(beta)) / z) ** 2)
    return m, math.sqrt(var)


@pytest.mark.parametrize("mean,std,a,b", [(0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.04, 0.04),
                                          (1.0, 2.0, 0.5, 1.0), (0.0, 1.0, 1.5, 4.0)])
def test_trunc_normal_matches_torch(mean, std, a, b):
    k, t = pair((200, 300))
    init.trunc_normal_(k, mean, std, a, b)
    torch.nn.init.trunc_normal_(t, mean, std, a, b)
    for arr in (k.numpy(), t.numpy()):
        assert arr.min() >= a and arr.max() <= b
    m, s = _truncnorm_moments(mean, std, a, b)
    moments_close(k.numpy(), t.numpy(), m, s)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 3, 2, 2)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal_matches_torch(shape, gain):
    k, t = pair(shape)
    init.orthogonal_(k, gain)
    torch.nn.init.orthogonal_(t, gain)
    for a in (k.numpy(), t.numpy()):
        m = a.reshape(shape[0], -1).astype(np.float64)
        small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        np.testing.assert_allclose(small, gain**2 * np.eye(small.shape[0]), atol=1e-5)


def test_sparse_zeroes_a_fraction_of_each_column():
    k = kiln.zeros(10, 6)
    init.sparse_(k, 0.3, std=0.5)
    zeros = (k.numpy() == 0).sum(axis=0)
    assert np.all(zeros >= 3)


def test_init_is_in_place_outside_autograd_and_seeded():
    p = kiln.nn.Parameter(kiln.zeros(30, 20))
    version = p._version_counter
    out = init.kaiming_uniform_(p, a=math.sqrt(5))
    assert out is p and p.is_leaf and p.grad_fn is None and p.requires_grad
    assert p._version_counter > version
    kiln.manual_seed(3)
    a = init.normal_(kiln.zeros(4, 5)).numpy().copy()
    kiln.manual_seed(3)
    b = init.normal_(kiln.zeros(4, 5)).numpy().copy()
    np.testing.assert_array_equal(a, b)
    g = kiln.Generator().manual_seed(9)
    c = init.uniform_(kiln.zeros(3), generator=g).numpy().copy()
    d = init.uniform_(kiln.zeros(3), generator=kiln.Generator().manual_seed(9)).numpy()
    np.testing.assert_array_equal(c, d)
    h = init.normal_(kiln.zeros(100, dtype=kiln.float16))
    assert h.dtype == kiln.float16 and np.all(np.isfinite(h.numpy()))
    x = kiln.zeros(8, 8, dtype=kiln.float64)
    init.xavier_uniform_(x)
    assert x.dtype == kiln.float64 and np.any(x.numpy())


def test_zero_element_tensors_warn_like_torch():
    for lib in (kiln, torch):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lib.nn.init.kaiming_uniform_(lib.zeros(0, 3))
            lib.nn.init.kaiming_normal_(lib.zeros(4, 0))
        assert len(w) == 2 and "zero-element" in str(w[0].message)


def _layer_pairs():
    return [
        (lambda lib: lib.nn.Linear(500, 300), 500),
        (lambda lib: lib.nn.Conv2d(32, 64, 3), 32 * 9),
        (lambda lib: lib.nn.Conv1d(16, 600, 5, groups=4), 4 * 5),
        (lambda lib: lib.nn.ConvTranspose2d(64, 40, 3), 40 * 9),
    ]


@pytest.mark.parametrize("make,fan_in", _layer_pairs())
def test_layer_default_init_matches_torch(make, fan_in):
    torch.manual_seed(0)
    k, t = make(kiln), make(torch)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives U(+-1/sqrt(fan_in))
    kw, tw = k.weight.detach().numpy(), t.weight.detach().numpy()
    for a in (kw, tw):
        assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.98 * bound
    moments_close(kw, tw, 0.0, bound / math.sqrt(3))
    kb, tb = k.bias.detach().numpy(), t.bias.detach().numpy()
    lo = 1e-6 ** (1 / kb.size)  # P(max |U| < lo * bound) = lo ** n = 1e-6
    for a in (kb, tb):
        assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > lo * bound
    moments_close(kb, tb, 0.0, bound / math.sqrt(3), sigmas=8.0)


def test_embedding_and_bilinear_default_init():
    k = kiln.nn.Embedding(1000, 64, padding_idx=3)
    t = torch.nn.Embedding(1000, 64, padding_idx=3)
    kw, tw = k.weight.detach().numpy(), t.weight.detach().numpy()
    assert not np.any(kw[3]) and not np.any(tw[3])
    moments_close(np.delete(kw, 3, 0), np.delete(tw, 3, 0), 0.0, 1.0)
    kb = kiln.nn.Bilinear(50, 20, 100)
    tb = torch.nn.Bilinear(50, 20, 100)
    bound = 1 / math.sqrt(50)
    for a in (kb.weight.detach().numpy(), tb.weight.detach().numpy()):
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    moments_close(kb.weight.detach().numpy(), tb.weight.detach().numpy(), 0.0,
                  bound / math.sqrt(3))


def test_layer_init_follows_the_seed_and_dtype():
    kiln.manual_seed(5)
    a = kiln.nn.Linear(4, 3).weight.detach().numpy().copy()
    kiln.manual_seed(5)
    b = kiln.nn.Linear(4, 3).weight.detach().numpy().copy()
    np.testing.assert_array_equal(a, b)
    m = kiln.nn.Linear(4, 3, dtype=kiln.float64)
    assert m.weight.dtype == kiln.float64 and m.bias.dtype == kiln.float64
