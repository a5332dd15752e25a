"""Tensor basics checked against PyTorch: factories, dtypes and promotion, conversions, repr."""

import itertools

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]


def kd(name):
    return getattr(kiln, "bool" if name == "bool" else name)


def td(name):
    return getattr(torch, name)


def same(k, t):
    assert str(k.dtype).split(".")[-1] == str(t.dtype).split(".")[-1], (k.dtype, t.dtype)
    assert tuple(k.shape) == tuple(t.shape)
    np.testing.assert_array_equal(k.numpy(), t.numpy())


@pytest.mark.parametrize("data", [
    [1, 2, 3], [1.5, 2.0], [[1, 2], [3, 4]], 3, 2.5, True, [True, False], [], [[]],
    np.arange(4, dtype=np.int32), np.ones((2, 2), np.float64), np.float32(1.5),
])
def test_tensor_from_data_infers_torch_dtype(data):
    same(kiln.tensor(data), torch.tensor(data))


@pytest.mark.parametrize("name", DTYPES)
def test_tensor_with_explicit_dtype(name):
    same(kiln.tensor([0, 1, 2], dtype=kd(name)), torch.tensor([0, 1, 2], dtype=td(name)))


@pytest.mark.parametrize("fn,args,kwargs", [
    ("zeros", (2, 3), {}), ("ones", ((2, 3),), {}), ("zeros", (0,), {}),
    ("ones", (2,), {"dtype": "int32"}), ("full", ((2, 2), 7), {}), ("full", ((2,), 1.5), {}),
    ("full", ((2,), True), {}), ("arange", (5,), {}), ("arange", (1, 4, 0.5), {}),
    ("arange", (0, 10, 3), {}), ("arange", (5.0,), {}), ("arange", (10, 0, -2), {}),
    ("linspace", (0, 1, 5), {}), ("linspace", (-2, 2, 1), {}), ("eye", (3,), {}),
    ("eye", (2, 4), {}), ("empty", (0, 2), {}),
])
def test_factories_match_torch(fn, args, kwargs):
    kk = {k: (kd(v) if k == "dtype" else v) for k, v in kwargs.items()}
    tk = {k: (td(v) if k == "dtype" else v) for k, v in kwargs.items()}
    k, t = getattr(kiln, fn)(*args, **kk), getattr(torch, fn)(*args, **tk)
    if fn == "empty":
        assert tuple(k.shape) == tuple(t.shape) and k.dtype == kiln.float32
    else:
        assert str(k.dtype).split(".")[-1] == str(t.dtype).split(".")[-1]
        np.testing.assert_allclose(k.numpy(), t.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", ["zeros_like", "ones_like", "empty_like"])
def test_like_factories_keep_shape_and_dtype(fn):
    src = kiln.ones(2, 3, dtype=kiln.float64)
    out = getattr(kiln, fn)(src)
    assert out.shape == (2, 3) and out.dtype == kiln.float64
    assert kiln.full_like(src, 4, dtype=kiln.int32).tolist() == [[4, 4, 4], [4, 4, 4]]


def test_negative_size_is_an_error():
    check_exception(lambda lib: lib.zeros(2, -1), match="negative dimension")


@pytest.mark.parametrize("a,b", list(itertools.product(DTYPES, DTYPES)))
def test_promotion_of_two_tensors_matches_torch(a, b):
    assert str(kiln.promote_types(kd(a), kd(b))).split(".")[-1] == \
        str(torch.promote_types(td(a), td(b))).split(".")[-1]


@pytest.mark.parametrize("a", DTYPES)
@pytest.mark.parametrize("scalar", [2, 2.5, True])
@pytest.mark.parametrize("zero_dim", [False, True])
def test_promotion_with_python_scalars_and_0d_tensors(a, scalar, zero_dim):
    shape = () if zero_dim else (2,)
    k = kiln.ones(shape, dtype=kd(a))
    t = torch.ones(shape, dtype=td(a))
    assert str(kiln.result_type(k, scalar)).split(".")[-1] == \
        str(torch.result_type(t, scalar)).split(".")[-1]


@pytest.mark.parametrize("a,b", [("int32", "float64"), ("float16", "float64"),
                                 ("int64", "float16"), ("bool", "int32"), ("uint8", "int8")])
def test_0d_tensor_promotion_matches_torch(a, b):
    k = kiln.ones(3, dtype=kd(a)) + kiln.tensor(1, dtype=kd(b))
    t = torch.ones(3, dtype=td(a)) + torch.tensor(1, dtype=td(b))
    same(k, t)


def test_item_tolist_numpy_and_python_conversions():
    x = kiln.tensor([[1.5, 2.0]])
    assert x.tolist() == [[1.5, 2.0]]
    assert kiln.tensor(3).item() == 3 and isinstance(kiln.tensor(3).item(), int)
    assert float(kiln.tensor([2.5])) == 2.5 and int(kiln.tensor(7)) == 7
    assert [1, 2, 3][kiln.tensor(1)] == 2
    a = np.arange(3.0)
    shared = kiln.from_numpy(a)
    a[0] = 9
    assert shared.tolist() == [9.0, 1.0, 2.0] and shared.dtype == kiln.float64
    check_exception(lambda lib: lib.ones(2).item(), match="cannot be converted")
    check_exception(lambda lib: bool(lib.ones(2)), match="ambiguous")
    check_exception(lambda lib: lib.ones(2, requires_grad=True).numpy(), match="detach")


def test_shape_size_dim_numel_len_iter():
    x = kiln.zeros(2, 3, 4)
    assert x.shape == (2, 3, 4) and x.size() == (2, 3, 4) and x.size(-1) == 4
    assert x.dim() == 3 and x.ndim == 3 and x.numel() == 24 and len(x) == 2
    assert repr(x.shape) == "kiln.Size([2, 3, 4])"
    assert [tuple(r.shape) for r in x] == [(3, 4), (3, 4)]
    check_exception(lambda lib: lib.zeros(2, 3).size(2), match="Dimension out of range")


@pytest.mark.parametrize("make", [
    lambda lib: lib.tensor([1.0, 2.5, -3.0]),
    lambda lib: lib.tensor([[1.0, 2.0], [3.0, 4.0]]),
    lambda lib: lib.tensor([1, 2, 3]),
    lambda lib: lib.tensor(3.0),
    lambda lib: lib.tensor([True, False]),
    lambda lib: lib.tensor([1.0, 2.0], dtype=lib.float64),
    lambda lib: lib.tensor([1.0, 2.0], requires_grad=True),
    lambda lib: lib.zeros(0, 3),
])
def test_repr_reads_like_torch(make):
    assert repr(make(kiln)) == repr(make(torch)).replace("torch.", "kiln.")


def test_tensors_are_not_picklable():
    import pickle

    with pytest.raises(TypeError, match="kiln.save"):
        pickle.dumps(kiln.ones(2))


def test_manual_seed_makes_random_factories_repeat():
    kiln.manual_seed(123)
    a = [kiln.rand(3), kiln.randn(2, 2), kiln.randint(0, 10, (4,)), kiln.randperm(5),
         kiln.normal(0.0, 2.0, (3,))]
    kiln.manual_seed(123)
    b = [kiln.rand(3), kiln.randn(2, 2), kiln.randint(0, 10, (4,)), kiln.randperm(5),
         kiln.normal(0.0, 2.0, (3,))]
    for x, y in zip(a, b):
        assert x.tolist() == y.tolist()
    assert a[2].dtype == kiln.int64 and sorted(a[3].tolist()) == [0, 1, 2, 3, 4]
    g = kiln.Generator().manual_seed(5)
    assert kiln.rand(2, generator=g).tolist() == kiln.rand(
        2, generator=kiln.Generator().manual_seed(5)).tolist()


def test_random_factories_have_the_right_distribution():
    kiln.manual_seed(0)
    u = kiln.rand(100_000).numpy()
    n = kiln.randn(100_000).numpy()
    r = kiln.randint(3, 7, (100_000,)).numpy()
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02
    assert set(np.unique(r)) == {3, 4, 5, 6}
    m = kiln.normal(kiln.tensor([0.0, 10.0]).expand(50_000, 2), 1.0).numpy()
    assert abs(m[:, 1].mean() - 10) < 0.05
