"""kiln.jit's accumulating row scatter (an embedding's gradient) against np.add.at, bitwise."""

import numpy as np
import pytest

pytest.importorskip("llvmlite")

import kiln  # noqa: E402
from kiln import jit  # noqa: E402
from kiln.ops import index as index_ops  # noqa: E402

RNG = np.random.default_rng(0)


def _case(V, n, tail, dtype=np.float32):
    out = RNG.standard_normal((V,) + tail).astype(dtype)
    rows = RNG.integers(-V, V, n)
    scale = 10.0 ** RNG.uniform(-3, 3, (n,) + (1,) * len(tail))  # sums that round differently
    vals = (RNG.standard_normal((n,) + tail) * scale).astype(dtype)
    return out, rows, vals


@pytest.mark.parametrize("V, n, tail", [(65, 1024, (128,)), (1, 50, (3,)), (7, 3000, (2, 5)),
                                        (1000, 10, (33,)), (3, 1, (1,)), (5, 0, (4,))])
def test_rows_add_is_bitwise_np_add_at(V, n, tail):
    out, rows, vals = _case(V, n, tail)
    want = out.copy()
    np.add.at(want, rows, vals)
    got = out.copy()
    index_ops._rows_add(got, rows, vals)
    np.testing.assert_array_equal(got, want)


def test_broadcast_values_and_parallel_columns():
    out = np.zeros((10, 70_000), np.float32)
    rows = RNG.integers(0, 10, 40)
    vals = RNG.standard_normal(70_000).astype(np.float32)  # one row for every index
    want = out.copy()
    np.add.at(want, rows, np.broadcast_to(vals, (40, 70_000)))
    index_ops._rows_add(out, rows, vals)
    np.testing.assert_array_equal(out, want)


def test_out_of_range_rows_raise_as_numpy_does():
    out, _, vals = _case(4, 3, (2,))
    with pytest.raises(IndexError):
        index_ops._rows_add(out, np.array([0, 4, 1]), vals)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_dtypes_keep_numpy(dtype):
    out, rows, vals = _case(6, 100, (3,), dtype)
    want = out.copy()
    np.add.at(want, rows, vals)
    index_ops._rows_add(out, rows, vals)
    np.testing.assert_array_equal(out, want)


def test_strided_target_keeps_numpy():
    base, rows, vals = _case(6, 100, (8,))
    want = base.copy()
    np.add.at(want[:, ::2], rows, vals[:, ::2])
    index_ops._rows_add(base[:, ::2], rows, vals[:, ::2])
    np.testing.assert_array_equal(base, want)


def test_embedding_gradient_matches_numpy_path_and_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    w = RNG.standard_normal((65, 32)).astype(np.float32)
    idx = RNG.integers(0, 65, (16, 64))
    g = RNG.standard_normal((16, 64, 32)).astype(np.float32)

    def grad():
        t = kiln.tensor(w, requires_grad=True)
        t[kiln.tensor(idx)].backward(kiln.tensor(g))
        return t.grad.numpy()

    native = grad()
    monkeypatch.setattr(jit, "_available", False)
    np.testing.assert_array_equal(native, grad())
    tw = torch.tensor(w, requires_grad=True)
    tw[torch.tensor(idx)].backward(torch.tensor(g))
    np.testing.assert_allclose(native, tw.grad.numpy(), rtol=1e-5, atol=1e-5)
