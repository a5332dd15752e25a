"""kiln.jit.cross_entropy: the fused softmax cross-entropy kernels against PyTorch (every
reduction, ignore_index, rows whose shift is their own max, non-finite logits), and that an
out-of-range target still raises PyTorch's error."""

import numpy as np
import pytest
import torch

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln.nn import loss as loss_module  # noqa: E402

RNG = np.random.default_rng(3)


@pytest.fixture
def native_only(monkeypatch):
    """Fail if the numpy path of cross_entropy (forward or backward) runs."""
    def boom(*a, **k):
        raise AssertionError("the numpy path ran instead of kiln.jit.cross_entropy")

    monkeypatch.setattr(loss_module, "_exp_rows", boom)


def _both(x, t, **kw):
    out = []
    for lib in (kiln, torch):
        xt = lib.tensor(x, requires_grad=True)
        loss = lib.nn.functional.cross_entropy(xt, lib.tensor(t), **kw)
        w = np.linspace(0.5, 1.5, loss.numel(), dtype=np.float32).reshape(tuple(loss.shape))
        (loss * lib.tensor(w)).sum().backward()
        out.append((loss.detach().numpy(), xt.grad.numpy()))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, c", [(64, 10), (1024, 65), (7, 1), (3, 33)])
def test_matches_torch(native_only, reduction, n, c):
    x = (RNG.standard_normal((n, c)) * 4).astype(np.float32)
    t = RNG.integers(0, c, n)
    t[0] = 5 if c > 5 else 0
    for ignore in (-100, int(t[0])):
        (kl, kg), (tl, tg) = _both(x, t, reduction=reduction, ignore_index=ignore)
        assert kl.shape == tl.shape and kl.dtype == tl.dtype
        np.testing.assert_allclose(kl, tl, rtol=3e-6, atol=2e-6)
        np.testing.assert_allclose(kg, tg, rtol=1e-5, atol=1e-6)


def test_rows_far_below_the_global_max_and_non_finite_logits(native_only):
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    x[1] -= 500.0  # exp(x - global max) underflows: shifted by its own max
    x[2, 3] = np.inf
    x[3, 1] = np.nan
    x[4] = -np.inf
    t = np.array([0, 1, 2, 3, 4, 5])
    (kl, kg), (tl, tg) = _both(x, t, reduction="none")
    np.testing.assert_allclose(kl, tl, rtol=3e-6, atol=2e-6)  # nan where torch has nan
    np.testing.assert_allclose(kg, tg, rtol=1e-5, atol=1e-6)
    (kl, _), (tl, _) = _both(x[:2], t[:2], reduction="mean")
    np.testing.assert_allclose(kl, tl, rtol=3e-6)


def test_every_row_ignored_gives_nan_and_zero_gradient(native_only):
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    (kl, kg), (tl, tg) = _both(x, np.full(4, -100), reduction="mean")
    assert np.isnan(kl) and np.isnan(tl)
    np.testing.assert_array_equal(kg, tg)


def test_out_of_range_target_raises_as_torch():
    x = kiln.tensor(RNG.standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(IndexError, match="out of bounds"):
        kiln.nn.functional.cross_entropy(x, kiln.tensor([0, 1, 3, 2]))
