"""Reductions against PyTorch: values, dtypes, gradients (ties, zeros, -inf), double backward
and the exceptions raised for bad dims and dtypes."""

import math

import numpy as np
import pytest
import torch

import kiln
from kiln.ops.reduce import vector_norm
from tests.helpers import check_exception, check_op, rand

F32 = {"atol": 1e-6, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}
TOL = {np.float32: F32, np.float64: F64}
# computed in float64 (dtype=) from a float32 input: the gradient is float32 again
F64_OF_F32 = {**F64, "grad_atol": 1e-6, "grad_rtol": 1e-5}
FLOATS = [np.float32, np.float64]
INF = math.inf
pytestmark = pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0:UserWarning")

# shape -> dims to reduce over (None = all); every case is run with keepdim False and True
SHAPES = {
    (): [None, 0, -1, (), (0,)],
    (5,): [None, 0, -1, (0,), []],
    (3, 4): [None, 0, 1, -1, (0, 1), (1, -2), []],
    (2, 3, 4): [None, 1, -3, (0, 2), (2, 0, 1)],
    (0,): [None, 0],
    (2, 0, 3): [None, 1, (0, 2), -1],
}
CASES = [(s, d) for s, dims in SHAPES.items() for d in dims]
NONEMPTY = [(s, d) for s, d in CASES if 0 not in s]


def _kw(dim, keepdim=False, all_dims=None):
    """Keyword arguments for a reduction; ``all_dims`` is how the op spells "every dim" when
    keepdim needs a dim (None for sum and mean, () for amax and amin)."""
    if dim is None and keepdim:
        dim = all_dims
    elif dim is None:
        return {}
    return {"dim": dim, "keepdim": True} if keepdim else {"dim": dim}


def ties(*shape, dtype=np.float32, seed=0):
    """Small integers as floats: plenty of exact ties."""
    return np.asarray(np.random.default_rng(seed).integers(-2, 3, shape), dtype)


def grad_of(fn):
    """``fn``'s gradient (wrt x, weighted by w) as a differentiable function of x and w: running
    check_op on it compares second derivatives with PyTorch."""
    def g(lib, x, w):
        (gx,) = lib.autograd.grad((fn(lib, x) * w).sum(), x, create_graph=True)
        return gx

    return g


# -- sum, mean -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", CASES)
def test_sum_mean(shape, dim, keepdim, dtype):
    kw = _kw(dim, keepdim)
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.sum(x, **kw), [x], **TOL[dtype])
    check_op(lambda lib, x: x.mean(**kw), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,dim", [((64, 300), 0), ((64, 300), 1), ((64, 300), (0, 1)),
                                       ((2, 30, 200), (0, 1)), ((2, 30, 200), (1, 2)),
                                       ((40, 3, 50), 0), ((40, 3, 50), 2)])
def test_sum_mean_long_rows(shape, dim, dtype):
    # sums over leading or trailing axes of contiguous floats go through BLAS: longer rows here
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == np.float32 else F64  # 300 float32 terms
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: x.sum(dim), [x], **tol)
    check_op(lambda lib, x: lib.mean(x, dim, keepdim=True), [x], **tol)
    check_op(lambda lib, x: x.softmax(-1), [x], **tol)
    check_op(lambda lib, x: x.var(dim), [x], **tol)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int32, np.int64])
def test_sum_of_integers_is_int64(dtype):
    x = (rand(3, 4) * 3).astype(dtype)
    check_op(lambda lib, x: x.sum(), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.sum(x, 1, keepdim=True), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.sum(x, 0, dtype=lib.int32), [x], atol=0, rtol=0)


def test_sum_mean_dtype_argument():
    x = rand(3, 4)
    check_op(lambda lib, x: lib.sum(x, 1, dtype=lib.float64), [x], **F64_OF_F32)
    check_op(lambda lib, x: x.mean(dtype=lib.float64), [x], **F64_OF_F32)
    i = np.arange(12).reshape(3, 4)
    check_op(lambda lib, x: lib.mean(x, 0, dtype=lib.float32), [i], **F32)


def test_mean_errors():
    i = torch.arange(3).numpy()
    check_exception(lambda lib: lib.mean(lib.tensor(i)), match="mean")
    check_exception(lambda lib: lib.tensor(i).mean(dtype=lib.int64), match="mean")
    check_exception(lambda lib: lib.ones(2, 3).mean(2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).sum((0, 0)), match="multiple times")
    check_exception(lambda lib: lib.ones(2, 3).sum((0, -2)), match="multiple times")
    check_exception(lambda lib: lib.ones(2, 3).sum(0.5), match="")
    check_exception(lambda lib: lib.ones(()).sum(1), match="range")


# -- prod ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", [(s, d) for s, d in CASES if not isinstance(d, (tuple, list))])
def test_prod(shape, dim, keepdim, dtype):
    kw = _kw(dim, keepdim and dim is not None)
    check_op(lambda lib, x: lib.prod(x, **kw), [rand(*shape, dtype=dtype)], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_prod_gradient_with_zeros(dtype):
    x = np.array([[0., 2, 3, -1], [0, 2, 0, 3], [1, 2, 3, 4], [5, 0, 0, 0]], dtype)
    for dim in (None, 0, 1):
        check_op(lambda lib, x, dim=dim: lib.prod(x, **_kw(dim)), [x], **TOL[dtype])
    check_op(lambda lib, x: x.prod(1, keepdim=True), [x], **TOL[dtype])
    check_op(lambda lib, x: x.prod(), [np.array([0.0, 1.5, -2.0], dtype)], **TOL[dtype])


def test_prod_integers_and_errors():
    i = np.array([[1, 2], [3, 4]], np.int32)
    check_op(lambda lib, x: x.prod(), [i], atol=0, rtol=0)
    check_op(lambda lib, x: x.prod(0), [i], atol=0, rtol=0)
    check_op(lambda lib, x: x.prod(dtype=lib.float64), [i], **F64)
    check_op(lambda lib, x: x.prod(), [np.array([True, False])], atol=0, rtol=0)
    check_exception(lambda lib: lib.ones(2, 3).prod(2), match="range")
    check_exception(lambda lib: lib.prod(lib.ones(2, 3), (0, 1)), match="prod")


# -- cumsum, cumprod -----------------------------------------------------------------------------

SCAN_CASES = [((), 0), ((), -1), ((6,), 0), ((3, 4), 1), ((3, 4), -2), ((2, 3, 4), 1),
              ((0,), 0), ((2, 0), 1), ((2, 0), 0)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,dim", SCAN_CASES)
def test_cumsum_cumprod(shape, dim, dtype):
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.cumsum(x, dim), [x], **TOL[dtype])
    check_op(lambda lib, x: x.cumprod(dim), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_cumprod_gradient_with_zeros(dtype):
    x = np.array([[2., 0, 3, 0, 5], [0, 0, 1, 2, 3], [1, 2, 3, 4, 0], [1, -2, 0, 4, 5]], dtype)
    check_op(lambda lib, x: lib.cumprod(x, 1), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.cumprod(x, 0), [x], **TOL[dtype])


def test_cumsum_cumprod_dtypes_and_errors():
    b = np.array([True, True, False])
    i = np.array([2, 3, 4], np.int32)
    check_op(lambda lib, x: x.cumsum(0), [b], atol=0, rtol=0)
    check_op(lambda lib, x: x.cumprod(0), [i], atol=0, rtol=0)
    check_op(lambda lib, x: x.cumsum(0, dtype=lib.float64), [i], **F64)
    check_op(lambda lib, x: lib.cumsum(x, -1, dtype=lib.float64), [rand(2, 3)], **F64_OF_F32)
    check_exception(lambda lib: lib.ones(3).cumsum(1), match="range")
    check_exception(lambda lib: lib.ones(()).cumprod(2), match="range")


# -- amax, amin, max, min ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", NONEMPTY)
def test_amax_amin_ties(shape, dim, keepdim, dtype):
    kw = _kw(dim, keepdim, all_dims=())
    x = ties(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.amax(x, **kw), [x], **TOL[dtype])
    check_op(lambda lib, x: x.amin(**kw), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 3, 4)])
def test_max_min_full_reduction_ties(shape, dtype):
    for x in (ties(*shape, dtype=dtype), rand(*shape, dtype=dtype)):
        check_op(lambda lib, x: lib.max(x), [x], **TOL[dtype])
        check_op(lambda lib, x: x.min(), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", [((), 0), ((), -1), ((7,), 0), ((3, 4), 1), ((3, 4), -2),
                                       ((2, 3, 4), 1), ((0, 3), 1), ((2, 0, 3), 2)])
def test_max_min_with_dim(shape, dim, keepdim, dtype):
    x = ties(*shape, dtype=dtype)  # ties: the first index is chosen and alone gets the gradient
    check_op(lambda lib, x: lib.max(x, dim, keepdim), [x], **TOL[dtype])
    check_op(lambda lib, x: x.min(dim=dim, keepdim=keepdim), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.max(x, dim, keepdim).indices, [x], atol=0, rtol=0)


def test_max_returns_values_and_indices():
    x = kiln.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    out = x.max(1)
    values, indices = out
    assert out.values is values and out.indices is indices
    assert values.tolist() == [3.0, 2.0] and indices.tolist() == [1, 0]
    assert x.min(dim=0, keepdim=True).indices.tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.int64])
def test_max_min_integers(dtype):
    x = ties(3, 4).astype(dtype)
    check_op(lambda lib, x: x.max(), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.amin(x, 1), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.max(x, 0), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.min(x, 1, True), [x], atol=0, rtol=0)


def test_max_min_elementwise_form():
    a, b = ties(3, 4), ties(4, seed=1)
    check_op(lambda lib, a, b: lib.max(a, b), [a, b], **F32)
    check_op(lambda lib, a, b: a.min(b), [a, b], **F32)


def test_max_amax_errors():
    check_exception(lambda lib: lib.max(lib.ones(0)), match="max")
    check_exception(lambda lib: lib.ones(2, 0).min(), match="min")
    check_exception(lambda lib: lib.ones(2, 0).max(1), match="non-zero size")
    check_exception(lambda lib: lib.ones(2, 0).amax(), match="amax")
    check_exception(lambda lib: lib.amin(lib.ones(2, 0), 1), match="non-zero size")
    check_exception(lambda lib: lib.amax(lib.ones(2, 0), (0, 1)), match="non-zero size")
    check_exception(lambda lib: lib.ones(2, 3).max(2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).amax(-3), match="range")
    check_exception(lambda lib: lib.ones(()).max(1), match="range")
    check_exception(lambda lib: lib.ones(3).max(0.5), match="max")
    check_exception(lambda lib: lib.ones(3).amin((0, 0)), match="multiple times")


# -- argmax, argmin ------------------------------------------------------------------------------

@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", [((), None), ((), 0), ((7,), None), ((7,), -1),
                                       ((3, 4), None), ((3, 4), 0), ((2, 3, 4), 2),
                                       ((0, 3), 1)])
def test_argmax_argmin(shape, dim, keepdim):
    x = ties(*shape)  # ties: the first index wins, as in PyTorch
    check_op(lambda lib, x: lib.argmax(x, dim, keepdim), [x], atol=0, rtol=0)
    check_op(lambda lib, x: x.argmin(dim=dim, keepdim=keepdim), [x], atol=0, rtol=0)


def test_argmax_nan_and_errors():
    x = np.array([2.0, np.nan, 3.0, np.nan], np.float32)
    check_op(lambda lib, x: lib.argmax(x), [x], atol=0, rtol=0)
    check_op(lambda lib, x: lib.max(x, 0), [x], atol=0, rtol=0)
    check_exception(lambda lib: lib.ones(0).argmax(), match="argmax")
    check_exception(lambda lib: lib.ones(0, 3).argmin(0), match="non-zero size")
    check_exception(lambda lib: lib.ones(2, 3).argmax(2), match="range")


# -- var, std ------------------------------------------------------------------------------------

VAR_CASES = [((), None), ((7,), None), ((7,), 0), ((3, 4), 1), ((3, 4), (0, 1)), ((3, 4), -2),
             ((2, 3, 4), (0, 2)), ((2, 3, 4), None), ((0,), None), ((2, 0), 1), ((1, 3), 0)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("correction", [None, 0, 2, 0.5])
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # no degrees of freedom: inf*0
@pytest.mark.parametrize("shape,dim", VAR_CASES)
def test_var_std(shape, dim, correction, keepdim, dtype):
    kw = _kw(dim, keepdim)
    if correction is not None:
        kw["correction"] = correction
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.var(x, **kw), [x], **TOL[dtype])
    check_op(lambda lib, x: x.std(**kw), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_var_std_unbiased_and_means(dtype):
    x = rand(3, 4, dtype=dtype)
    check_op(lambda lib, x: x.var(1, unbiased=False), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.std(x, 0, True, True), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.var(x, False), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.std(x, unbiased=True), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.var_mean(x, 1, correction=0), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.std_mean(x, (0, 1), keepdim=True), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_std_of_constant_has_zero_gradient(dtype):
    x = np.array([[1.5, 1.5, 1.5], [1.0, 2.0, 3.0]], dtype)
    check_op(lambda lib, x: x.std(1), [x], **TOL[dtype])
    check_op(lambda lib, x: x.std(), [np.full(4, 2.0, dtype)], **TOL[dtype])


def test_var_std_errors():
    i = np.arange(4)
    check_exception(lambda lib: lib.var(lib.tensor(i)), match="var")
    check_exception(lambda lib: lib.tensor(i).std(0), match="std")
    check_exception(lambda lib: lib.ones(2, 3).var(2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).std((1, 1)), match="multiple times")


# -- logsumexp -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", [(s, d) for s, d in CASES if d not in (None, (), [])])
def test_logsumexp(shape, dim, keepdim, dtype):
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.logsumexp(x, dim, keepdim), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf: nan, as in torch
def test_logsumexp_large_and_infinite(dtype):
    big = (rand(3, 5, dtype=dtype) * 1e4).astype(dtype)
    check_op(lambda lib, x: x.logsumexp(1), [big], **TOL[dtype])
    check_op(lambda lib, x: x.logsumexp((0, 1)), [-big], **TOL[dtype])
    x = np.array([[-INF, 1.0, 2.0], [-INF, -INF, -INF], [INF, 1.0, -INF]], dtype)
    check_op(lambda lib, x: x.logsumexp(1), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.logsumexp(x, 0, True), [x[:2]], **TOL[dtype])


def test_logsumexp_integer_input_and_errors():
    check_op(lambda lib, x: x.logsumexp(0), [np.arange(4)], **F32)
    check_exception(lambda lib: lib.ones(2, 3).logsumexp(2), match="range")


# -- all, any, count_nonzero ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("shape,dim", CASES)
def test_all_any(shape, dim, keepdim, dtype):
    x = np.asarray(ties(*shape) > 0, dtype)
    kw = _kw(dim, keepdim)
    check_op(lambda lib, x: lib.all(x, **kw), [x], atol=0, rtol=0)
    check_op(lambda lib, x: x.any(**kw), [x], atol=0, rtol=0)


@pytest.mark.parametrize("shape,dim", CASES)
def test_count_nonzero(shape, dim):
    x = ties(*shape)
    check_op(lambda lib, x: lib.count_nonzero(x, **_kw(dim)), [x], atol=0, rtol=0)
    check_op(lambda lib, x: x.count_nonzero(**_kw(dim)), [x.astype(np.int32)], atol=0, rtol=0)


def test_all_any_errors():
    check_exception(lambda lib: lib.ones(2, 3).all(2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).any((0, 0)), match="multiple times")
    check_exception(lambda lib: lib.ones(2, 3).count_nonzero(-3), match="range")


# -- norms ---------------------------------------------------------------------------------------

ORDS = [2, 1, INF, -INF, 3, 1.5, 0.5, 0, -1]


def _vector_norm(ord, **kw):
    return (lambda lib, x: vector_norm(x, ord, **kw),
            lambda lib, x: torch.linalg.vector_norm(x, ord, **kw))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("shape,dim,keepdim", [((), None, False), ((7,), None, False),
                                               ((3, 4), 1, False), ((3, 4), (0, 1), True),
                                               ((2, 3, 4), -1, True), ((2, 0), 1, False)])
def test_vector_norm(shape, dim, keepdim, ord, dtype):
    if 0 in shape and (ord < 0 or ord == INF):
        pytest.skip("no identity: an error (test_norm_errors)")
    x = rand(*shape, dtype=dtype)
    if shape:
        x.reshape(-1)[::3] = 0  # zeros: the kink of |x|
    fn, torch_fn = _vector_norm(ord, dim=dim, keepdim=keepdim)
    check_op(fn, [x], torch_fn=torch_fn, **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ord", ORDS)
def test_vector_norm_zero_vector_and_ties(ord, dtype):
    zeros = np.zeros((2, 3), dtype)
    zeros[1] = [1.0, -1.0, 1.0]  # one all-zero row, one row of |x| ties
    fn, torch_fn = _vector_norm(ord, dim=1)
    check_op(fn, [zeros], torch_fn=torch_fn, **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_norm(dtype):
    x = rand(3, 4, dtype=dtype)
    x[0] = 0
    check_op(lambda lib, x: x.norm(), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.norm(x, dim=1), [x], **TOL[dtype])
    check_op(lambda lib, x: x.norm(p=1, dim=0, keepdim=True), [x], **TOL[dtype])
    check_op(lambda lib, x: x.norm(INF, (0, 1)), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.norm(x, "fro", (0, 1)), [x], **TOL[dtype])
    check_op(lambda lib, x: lib.norm(x, 3, -1), [x], **TOL[dtype])
    check_op(lambda lib, x: x.norm(dtype=lib.float64), [x.astype(np.float32)], **F64_OF_F32)


def test_norm_errors():
    i = np.arange(4)
    check_exception(lambda lib: lib.tensor(i).norm(), match="floating point")
    check_exception(lambda lib: lib.ones(2, 3).norm(dim=2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).norm(p="abc"), match="not supported")
    for ord in (INF, -INF, -1):
        check_exception(
            lambda lib, ord=ord: (vector_norm if lib is kiln else torch.linalg.vector_norm)(
                lib.ones(0, 3), ord, 0), match="empty")
    check_exception(
        lambda lib: (vector_norm if lib is kiln else torch.linalg.vector_norm)(
            lib.ones(2, 3, dtype=lib.float64), 2, dtype=lib.float32), match="narrowing")


# -- softmax, log_softmax ------------------------------------------------------------------------

SOFTMAX_CASES = [((), 0), ((), -1), ((7,), 0), ((3, 5), 1), ((3, 5), 0), ((3, 5), -1),
                 ((2, 3, 4), 1), ((0, 3), 1), ((3, 0), 1)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
def test_softmax_log_softmax(shape, dim, dtype):
    x = rand(*shape, dtype=dtype)
    check_op(lambda lib, x: lib.softmax(x, dim), [x], **TOL[dtype])
    check_op(lambda lib, x: x.log_softmax(dim), [x], **TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_large_logits_and_masks(dtype):
    big = (rand(4, 6, dtype=dtype) * 1e4).astype(dtype)
    check_op(lambda lib, x: x.softmax(-1), [big], **TOL[dtype])
    check_op(lambda lib, x: x.log_softmax(-1), [big], **TOL[dtype])
    masked = rand(4, 5, dtype=dtype)
    masked[0, 1:] = -INF   # one survivor
    masked[1, ::2] = -INF  # attention-style mask
    masked[2] = -INF       # a fully masked row: nan, as in PyTorch
    check_op(lambda lib, x: x.softmax(1), [masked], **TOL[dtype])
    check_op(lambda lib, x: lib.log_softmax(x, 1), [masked], **TOL[dtype])
    check_op(lambda lib, x: x.softmax(0), [masked[:2]], **TOL[dtype])


def test_softmax_dtype_argument_and_errors():
    x = rand(3, 4)
    check_op(lambda lib, x: lib.softmax(x, 1, dtype=lib.float64), [x], **F64_OF_F32)
    check_op(lambda lib, x: x.log_softmax(0, lib.float64), [x], **F64_OF_F32)
    check_op(lambda lib, x: lib.softmax(x, 0, dtype=lib.float32), [np.arange(4)], **F32)
    check_exception(lambda lib: lib.softmax(lib.tensor([1, 2]), 0), match="softmax")
    check_exception(lambda lib: lib.tensor([1, 2]).log_softmax(0), match="log_softmax")
    check_exception(lambda lib: lib.ones(2, 3).softmax(2), match="range")
    check_exception(lambda lib: lib.ones(2, 3).log_softmax(-3), match="range")


# -- double backward -----------------------------------------------------------------------------

DOUBLE = {
    "softmax": lambda lib, x: lib.softmax(x, 1),
    "log_softmax": lambda lib, x: lib.log_softmax(x, 0),
    "logsumexp": lambda lib, x: lib.logsumexp(x, 1),
    "var": lambda lib, x: x.var(1, keepdim=True),
    "var_all_correction0": lambda lib, x: x.var(correction=0),
    "std": lambda lib, x: x.std(0),
    "prod": lambda lib, x: x.prod(1),
    "prod_all": lambda lib, x: x.prod(),
    "cumprod": lambda lib, x: x.cumprod(1),
    "mean": lambda lib, x: (x.mean(1) ** 2 if lib is torch else x.mean(1) * x.mean(1)),
    "amax": lambda lib, x: x.amax(1) * x.sum(1),
    "max_dim": lambda lib, x: lib.max(x, 1).values,
    "norm2": lambda lib, x: x.norm(dim=1),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(DOUBLE))
def test_double_backward(name, dtype):
    x = rand(3, 4, dtype=dtype, seed=2)
    x[0, 1] = 0  # prod, cumprod: a zero, whose second derivatives are exact too
    if name in ("prod", "prod_all"):
        x[2] = [0.0, 1.5, 0.0, -1.0]  # two zeros in a row
    if name in ("amax", "max_dim"):
        x = ties(3, 4, dtype=dtype)
    w = rand(*DOUBLE[name](torch, torch.tensor(x)).shape, dtype=dtype, seed=3)
    check_op(grad_of(DOUBLE[name]), [x, w], **TOL[dtype])


def test_double_backward_mixed_dims():
    x, w = rand(2, 3, 4, dtype=np.float64), rand(3, dtype=np.float64, seed=1)
    check_op(grad_of(lambda lib, x: x.softmax(-1).sum((0, 2)) + lib.logsumexp(x, (0, 2))),
             [x, w], **F64)
    check_op(grad_of(lambda lib, x: x.std((0, 2), correction=0)), [x, w], **F64)
