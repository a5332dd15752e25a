"""kiln.jit.blas: float32 products split by rows or columns over kiln.jit's threads, each part a
single-threaded call to numpy's OpenBLAS, against numpy's own product."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln.jit import blas, parallel  # noqa: E402
from tests.helpers import native_and_numpy  # noqa: E402

pytestmark = pytest.mark.skipif(not blas._kernel(), reason="numpy's OpenBLAS not found")
RNG = np.random.default_rng(0)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _close(got, a, b):
    """Within 1e-5 of |a| @ |b| (the scale of a float32 sum's rounding) of numpy's product: a
    part may take OpenBLAS's small-matrix kernel where the whole product did not, and its sums
    of k products round differently."""
    bound = 1e-5 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    assert (np.abs(got.astype(np.float64) - (a @ b)) <= bound).all()


def _operands(m, k, n, ta, tb):
    a = RNG.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = RNG.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    return (a.T if ta else a), (b.T if tb else b)


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and every product above MIN_MACS split between them."""
    before = parallel.num_threads()
    parallel.set_num_threads(2)
    monkeypatch.setattr(blas, "SPLIT_MACS", 0)
    yield
    parallel.set_num_threads(before)


@pytest.mark.parametrize("m, k, n", [(1024, 128, 384), (128, 1024, 65), (64, 784, 256),
                                     (333, 77, 129), (2, 4096, 40)])
@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_products_match_numpy(two_threads, m, k, n, ta, tb):
    a, b = _operands(m, k, n, ta, tb)
    got = blas.matmul(a, b)
    assert got is not None
    _close(got, a, b)


@pytest.mark.parametrize("m, n", [(300, 50), (50, 300)])  # split by rows, by columns
def test_writes_into_out_with_row_stride(two_threads, m, n):
    a, b = _operands(m, 100, n, 0, 1)
    big = np.full((m, n + 20), np.nan, np.float32)
    out = big[:, 10:n + 10]
    assert blas.matmul(a, b, out) is out
    _close(out, a, b)
    assert np.isnan(big[:, :10]).all() and np.isnan(big[:, n + 10:]).all()


@pytest.mark.parametrize("case", ["row", "column", "small", "float64", "strided"])
def test_declines_what_it_does_not_take(case):
    a, b = _operands(512, 256, 256, 0, 0)
    out = None
    if case == "row":
        a = a[:1]
    elif case == "column":
        b = b[:, :1]
    elif case == "small":
        a, b = a[:8, :8], b[:8, :8]
    elif case == "float64":
        a = a.astype(np.float64)
    else:
        a = a[:, ::2]
        b = b[:128]
    assert blas.matmul(a, b, out) is None


def test_an_out_that_overlaps_an_operand_is_written_through_a_temporary(two_threads):
    a, b = _operands(512, 256, 256, 0, 0)
    expected = a @ b
    out = a[:, :256]  # the product overwrites its own left operand
    assert blas.matmul(a, b, out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_numpy_threads_unchanged_after_a_product(two_threads):
    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]
    blas.matmul(*_operands(512, 256, 256, 0, 0))
    after = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]
    assert before == after


def test_training_gradients_match_the_numpy_path_and_float64(monkeypatch, two_threads):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 300)).astype(np.float32)
    w = (rng.standard_normal((300, 200)) / np.sqrt(300)).astype(np.float32)  # tanh unsaturated

    def grads():
        xt, wt = kiln.tensor(x, requires_grad=True), kiln.tensor(w, requires_grad=True)
        (xt @ wt).tanh().sum().backward()
        return xt.grad.numpy(), wt.grad.numpy()

    (gx, gw), (nx, nw) = native_and_numpy(monkeypatch, grads)
    np.testing.assert_allclose(gx, nx, **TOL)
    np.testing.assert_allclose(gw, nw, **TOL)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    d = 1 - np.tanh(x64 @ w64) ** 2
    np.testing.assert_allclose(gw, x64.T @ d, **TOL)
    np.testing.assert_allclose(gx, d @ w64.T, **TOL)
