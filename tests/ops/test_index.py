"""Indexing ops against PyTorch: getitem/setitem in every form, gather/scatter, index_select,
sort/topk, nonzero, one_hot, embedding, multinomial; values, gradients and errors."""

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, mark_checked, rand

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using a non-tuple sequence:UserWarning",  # PyTorch's, for x[[[0, 1], [1, 2]]]
    "ignore:The reduce argument of torch.scatter:UserWarning",
)

F32 = {"atol": 1e-6, "rtol": 1e-6}
F64 = {"atol": 1e-12, "rtol": 1e-12}


def T(lib, a):
    """A constant (non-differentiable) tensor of ``lib`` from a numpy array or list."""
    return lib.tensor(np.asarray(a))


def _key(lib, key):
    """Build an index for ``lib``: numpy arrays wrapped as ``("t", arr)`` become lib tensors."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "t":
        return T(lib, key[1])
    if isinstance(key, tuple):
        return tuple(_key(lib, k) for k in key)
    return key


def tt(a):
    return ("t", np.asarray(a))


# -- getitem --------------------------------------------------------------------------------------

BASIC = [
    0, -1, 2, slice(None), slice(1, None), slice(None, -1), slice(0, 3, 2), slice(-2, None),
    slice(5, 10), slice(2, 1), (0, 1), (-1, -2, 0), (slice(None), 1), (1, slice(1, 3)),
    (Ellipsis, 0), (0, Ellipsis), (Ellipsis,), (None,), (None, 0, None), (slice(None), None, 1),
    (Ellipsis, None), (0, 1, 2), (slice(None, None, 3), Ellipsis, slice(1, 2)),
    (tt(1),), (tt(-1), slice(None), tt(0)), (True,), (slice(None), True), (False,),
]


@pytest.mark.parametrize("key", BASIC, ids=repr)
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_getitem_basic(key, dt):
    x = rand(3, 4, 5, dtype=dt)
    check_op(lambda lib, x: x[_key(lib, key)], [x], **(F32 if dt == np.float32 else F64))


def test_getitem_basic_small_shapes():
    check_op(lambda lib, x: x[...], [rand()], **F32)
    check_op(lambda lib, x: x[None], [rand()], **F32)
    check_op(lambda lib, x: x[0], [rand(4)], **F32)
    check_op(lambda lib, x: x[1:], [rand(0, 3)], **F32)
    check_op(lambda lib, x: x[:, 1], [rand(0, 3)], **F32)


ADVANCED = [
    tt([0, 2, 0, 1, 2]),                             # repeats
    tt([-1, 0, -3]),                                 # negative
    tt([[0, 1], [2, 2]]),                            # 2-d index
    [0, 2, 2],                                       # list
    np.array([1, 1, 0]),                             # numpy array
    (tt([0, 2, 2]), tt([1, 3, 1])),                  # two arrays
    (tt([[0], [2]]), tt([1, 3, 1])),                 # broadcast together
    (slice(None), tt([3, 0, 3])),                    # slice then array
    (tt([0, 2]), slice(1, 3), tt([4, 4])),           # separated: index dims go first
    (slice(None), tt([1, 2]), tt([0, 4])),           # adjacent: stay in place
    (0, slice(None), tt([1, 2])),                    # int applied first (PyTorch, not numpy)
    (tt([0, 1]), 0, tt([1, 2])),
    (None, tt([0, 1]), None, tt([1, 2])),
    (Ellipsis, tt([0, 4, 4])),
    (tt(1), slice(None), tt([0, 1])),                # 0-d tensor acts as an int
    tt(np.array([], np.int64)),                      # empty
    [],                                              # empty list
    tt([True, False, True]),                         # bool mask
    [True, False, True],                             # bool list
    np.array([False, False, False]),                 # all-False mask
    tt(np.eye(3, 4, dtype=bool)),                    # 2-d mask
    (slice(None), tt([True, False, True, True])),    # mask after a slice
    (tt([True, False, True]), tt([1, 3])),           # mask and array broadcast
    (tt(np.zeros((3, 4), bool)),),                   # all-False 2-d mask
    (tt([0, 2]), None),
    ([[0, 1], [1, 2]]),                              # list of lists: a tuple (PyTorch rule)
    (tt(np.array([0, 2], np.int32)),),               # int32 index
    (Ellipsis, tt([[True, False, True, False, True]] * 4)),
    (tt([2, 1, 0]), slice(4, 4)),                    # empty region of an advanced index
]


@pytest.mark.parametrize("key", ADVANCED, ids=repr)
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_getitem_advanced(key, dt):
    x = rand(3, 4, 5, dtype=dt)
    check_op(lambda lib, x: x[_key(lib, key)], [x], **(F32 if dt == np.float32 else F64))


def test_getitem_index_as_input_tensor():
    idx = np.array([[0, 3], [3, 3]])
    check_op(lambda lib, x, i: x[:, i] * x[i[0]].sum(), [rand(4, 4), idx], **F32)
    check_op(lambda lib, x, i: x[i, i], [rand(4, 4, dtype=np.float64), idx], **F64)


def test_getitem_is_a_view():
    x = kiln.arange(12.).reshape(3, 4)
    v = x[1, 1:3]
    x[1, 2] = 100.0
    assert v.tolist() == [5.0, 100.0]
    assert v._version is x._version
    e = x[0, 0]  # every dim indexed by an int: still a 0-d view
    x[0, 0] = -1.0
    assert e.item() == -1.0
    a = x[[0, 1]]  # advanced indexing copies
    x[0, 1] = 7.0
    assert a[0, 1].item() == 1.0


def test_getitem_multiply_used_and_chained():
    check_op(lambda lib, x: x[0] * x[1:2] + x[[2, 2]][:, 1:].sum(), [rand(3, 4)], **F32)
    check_op(lambda lib, x: x[1:][:, [0, 0]][0], [rand(3, 4, dtype=np.float64)], **F64)


def test_getitem_errors():
    x = np.zeros((3, 4), np.float32)
    check_exception(lambda lib: T(lib, x)[5], match="index 5 is out of bounds for dimension 0 "
                                                     "with size 3")
    check_exception(lambda lib: T(lib, x)[-4], match="index -4 is out of bounds")
    check_exception(lambda lib: T(lib, x)[0, 4], match="dimension 1 with size 4")
    check_exception(lambda lib: T(lib, x)[T(lib, [0, 3])], match="index 3 is out of bounds")
    check_exception(lambda lib: T(lib, x)[:, T(lib, [-5])], match="index -5")
    check_exception(lambda lib: T(lib, x)[[0, 7]], match="index 7")
    check_exception(lambda lib: T(lib, x)[::-1], match="step must be greater than zero")
    check_exception(lambda lib: T(lib, x)[::0], match="step")
    check_exception(lambda lib: T(lib, x)[1.5], match="valid indices")
    check_exception(lambda lib: T(lib, x)[T(lib, [1.0])], match="long, int, byte or bool")
    check_exception(lambda lib: T(lib, x)[T(lib, 1.0)], match="long, int, byte or bool")
    check_exception(lambda lib: T(lib, x)[T(lib, np.array([1], np.int16))], match="long")
    check_exception(lambda lib: T(lib, x)[0, 0, 0], match="too many indices")
    check_exception(lambda lib: T(lib, x)[T(lib, [True, False])], match="shape of the mask")
    check_exception(lambda lib: T(lib, x)[T(lib, np.ones((3, 3), bool))],
                    match=r"mask \[3, 3\] at index 1")
    check_exception(lambda lib: T(lib, x)[T(lib, [0, 1]), T(lib, [0, 1, 2])],
                    match="could not be broadcast")
    check_exception(lambda lib: T(lib, np.float32(1))[0], match="0-dim")


# -- setitem --------------------------------------------------------------------------------------

SET_KEYS = [
    (0, (4, 5)), ((slice(None), 1), (3, 5)), ((1, slice(1, 3)), (2, 5)), ((Ellipsis, 2), (4,)),
    (tt([0, 2]), (2, 4, 5)), ((tt([0, 2]), slice(None), tt([4, 1])), (2, 4)),
    ((slice(None), tt([1, 3])), (1, 5)), (tt([True, False, True]), (2, 4, 5)),
    ((0, tt([True, False, False, True])), (2, 5)), ((None, 1), (1, 4, 5)), ((), (3, 4, 5)),
    (tt([[1], [2]]), (2, 1, 4, 5)),
]


@pytest.mark.parametrize("key,vshape", SET_KEYS, ids=repr)
def test_setitem_tensor_value(key, vshape):
    def fn(lib, x, v):
        y = x * 1
        y[_key(lib, key)] = v
        return y * y

    check_op(fn, [rand(3, 4, 5), rand(*vshape, seed=2)], **F32)


@pytest.mark.parametrize("key,vshape", SET_KEYS[:6], ids=repr)
def test_setitem_number_and_broadcast(key, vshape):
    def fn(lib, x, v):
        y = x * 1
        y[_key(lib, key)] = 2.5
        z = x * 2
        z[_key(lib, key)] = v  # broadcast value
        return y, z

    check_op(fn, [rand(3, 4, 5, dtype=np.float64), rand(*vshape[-1:], seed=2,
                                                        dtype=np.float64)], **F64)


def test_setitem_leading_ones_and_repeats():
    def fn(lib, x, v):
        y = x * 1
        y[0] = v  # (1, 4) into (4,): PyTorch drops leading ones
        y[[1, 1, 2]] = v[0, 0] * 3  # repeated positions get the same value
        return y

    check_op(fn, [rand(3, 4), rand(1, 4, seed=3)], **F32)


def test_setitem_gradient_matches_pytorch_example():
    x = kiln.ones(3, requires_grad=True)
    y = x * 1
    y[0] = 5
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0]
    assert y.tolist() == [5.0, 1.0, 1.0]


AUG_KEYS = [0, slice(1, 3), (slice(None), 1), tt([0, 2]), tt([1, 1, 2]),
            tt([True, False, True]), (tt([0, 0]), tt([1, 1]))]


@pytest.mark.parametrize("key", AUG_KEYS, ids=repr)
def test_setitem_augmented(key):
    def fn(lib, x, v):
        y = x * 1
        k = _key(lib, key)
        y[k] += v
        y[k] -= x[k]
        return y * x

    vshape = np.asarray(torch.zeros(3, 4)[_key(torch, key)].shape)
    check_op(fn, [rand(3, 4), rand(*vshape, seed=2)], **F32)


def test_setitem_augmented_multiply():
    def fn(lib, x, v):
        y = x * 1
        y[1:] *= v
        y[[0, 0]] /= v
        y[:, 1] /= x[:, 2]
        return y

    check_op(fn, [rand(3, 4), rand(4, seed=2)], **F32)


def test_setitem_augmented_without_grad():
    x = kiln.zeros(4)
    x[[0, 0, 2]] += 1  # read, add, write back: repeats count once, as in PyTorch
    x[1:3] += kiln.tensor([5.0, 6.0])
    assert x.tolist() == [1.0, 5.0, 7.0, 0.0]


def test_setitem_into_constant_records_value_grad():
    def fn(lib, v):
        y = lib.zeros(3, 4)
        y[1] = v
        y[[0, 2], 1:3] = v[:2] * 2
        return y

    check_op(fn, [rand(4)], **F32)


def test_setitem_dtypes():
    def fn(lib, a):
        y = a.clone()
        y[0] = 2.7  # truncated
        y[1] = T(lib, np.array([1.5, -2.5, 3.9], np.float32))  # basic: cast
        y[[2]] = 7.9
        return y

    check_op(fn, [np.zeros((3, 3), np.int64)], atol=0, rtol=0)

    def fn2(lib, a):
        y = a.clone()
        y[T(lib, np.array([True, False, True]))] = T(lib, np.int64(4))  # 0-d value: cast
        return y

    check_op(fn2, [rand(3, 2)], **F32)
    check_exception(lambda lib: T(lib, np.zeros(3, np.int64)).__setitem__(
        [0], T(lib, np.ones(1, np.float32))), match="dtypes match")
    check_exception(lambda lib: T(lib, np.zeros(3, np.float32)).__setitem__(
        [0], T(lib, np.ones(1, np.float64))), match="Float for the destination and Double")
    check_exception(lambda lib: T(lib, np.zeros((3, 4), np.float32)).__setitem__(
        0, T(lib, np.ones(3, np.float32))), match="expanded size")
    check_exception(lambda lib: T(lib, np.zeros((3, 4), np.float32)).__setitem__(
        0, T(lib, np.ones((2, 4), np.float32))), match="number of sizes")
    check_exception(lambda lib: T(lib, np.zeros(3, np.float32)).__setitem__(5, 1.0),
                    match="out of bounds")


def test_setitem_leaf_and_no_grad():
    check_exception(lambda lib: lib.zeros(3, requires_grad=True).__setitem__(0, 1.0),
                    match="leaf Variable")
    w = kiln.zeros(2, 3, requires_grad=True)
    with kiln.no_grad():
        w[0] = 1.0
        w[:, [2]] = kiln.tensor([[5.0], [6.0]])
    assert w.tolist() == [[1.0, 1.0, 5.0], [0.0, 0.0, 6.0]]
    assert w.requires_grad and w.is_leaf and w._version[0] == 2


def test_setitem_detects_saved_value_overwritten():
    x = kiln.ones(3, requires_grad=True)
    y = x * 1
    z = y * y  # saves y
    y[0] = 2.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


# -- double backward --------------------------------------------------------------------------------

def _grad_of(f):
    def fn(lib, x):
        (g,) = lib.autograd.grad(f(lib, x), x, create_graph=True)
        return g
    return fn


@pytest.mark.parametrize("f", [
    lambda lib, x: (x[1:, ::2] * x[1:, ::2] * x[:-1, 1::2]).sum(),
    lambda lib, x: (x[[0, 2, 2]] * x[[1, 1, 0]] * x[[2, 2, 2]]).sum(),
    lambda lib, x: (x[T(lib, [True, False, True])] * x[[0, 1]]).sum(),
    lambda lib, x: (lib.gather(x, 1, T(lib, [[0, 0], [3, 1], [2, 2]])) * x[:, 1:3] * x[:, :2]).sum(),
    lambda lib, x: (lib.index_select(x, 1, T(lib, [1, 1, 3])) * x[:, :3]).sum(),
], ids=["basic", "advanced", "mask", "gather", "index_select"])
def test_double_backward(f):
    check_op(_grad_of(f), [rand(3, 4, dtype=np.float64)], **F64)


def test_double_backward_setitem_and_scatter():
    def f(lib, x):
        y = x * x
        y[0, [1, 3]] = x[1, :2] * x[2, :2]
        s = lib.zeros(3, 4, dtype=x.dtype).scatter(1, T(lib, [[2, 0], [1, 3], [0, 0]]),
                                                   x[:, 1:3] * x[:, :2])
        return (y * y).sum() + (s * s).sum()

    check_op(_grad_of(f), [rand(3, 4, dtype=np.float64)], **F64)


# -- gather / scatter ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_gather(dt):
    tol = F32 if dt == np.float32 else F64
    x = rand(3, 4, dtype=dt)
    i = np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])
    check_op(lambda lib, x, i: lib.gather(x, 1, i), [x, i], **tol)
    check_op(lambda lib, x, i: x.gather(0, i), [x, np.array([[2, 2, 0, 1], [0, 1, 0, 0]])],
             **tol)
    check_op(lambda lib, x, i: lib.gather(x, -1, i), [x, np.array([[1], [0]])], **tol)  # smaller
    check_op(lambda lib, x, i: lib.gather(x, 1, i), [x, np.zeros((3, 0), np.int64)], **tol)
    check_op(lambda lib, x, i: lib.gather(x, 0, i), [rand(dtype=dt), np.array(0)], **tol)
    check_op(lambda lib, x, i: lib.gather(x, 0, i), [rand(3, dtype=dt), np.array(2)], **tol)
    x3 = rand(2, 3, 4, dtype=dt)
    i3 = np.random.default_rng(0).integers(0, 3, (2, 5, 4))
    check_op(lambda lib, x, i: lib.gather(x, 1, i), [x3, i3], **tol)
    check_op(lambda lib, x: lib.gather(x, 1, T(lib, np.array([[0, 2]], np.int32))), [x], **tol)


def test_gather_errors():
    x = np.zeros((3, 4), np.float32)
    check_exception(lambda lib: lib.gather(T(lib, x), 1, T(lib, [[0.0]])), match="gather")
    check_exception(lambda lib: lib.gather(T(lib, x), 1, T(lib, [[4]])), match="out of bounds")
    check_exception(lambda lib: lib.gather(T(lib, x), 1, T(lib, [[-1]])), match="out of bounds")
    check_exception(lambda lib: lib.gather(T(lib, x), 1, T(lib, [0])), match="dimensions")
    check_exception(lambda lib: lib.gather(T(lib, x), 2, T(lib, [[0]])), match="range")
    check_exception(lambda lib: lib.gather(T(lib, x), 1, T(lib, [[0]] * 4)), match="dimension 0")


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_scatter(dt):
    tol = F32 if dt == np.float32 else F64
    x, src = rand(3, 4, dtype=dt), rand(3, 4, seed=5, dtype=dt)
    perm = np.array([[0, 1], [2, 3], [3, 1]])  # distinct per row: no write conflicts
    check_op(lambda lib, x, s, i: lib.scatter(x, 1, i, s[:, :2]), [x, src, perm], **tol)
    # src larger than index: only its index-shaped corner is used (torch's backward rejects it)
    check_op(lambda lib, x, s, i: lib.scatter(x, 1, i, s), [x, src, perm], **tol,
             torch_fn=lambda lib, x, s, i: lib.scatter(x, 1, i, s[:, :2]))
    check_op(lambda lib, x, s, i: x.scatter(1, i, 2.5) * s, [x, src, perm], **tol)
    check_op(lambda lib, x, s, i: x.scatter(1, i, s[:2, :2]), [x, src, perm[:2]], **tol)
    rep = np.array([[0, 0, 0, 3], [1, 1, 2, 1]])  # repeats accumulate
    check_op(lambda lib, x, s, i: lib.scatter_add(x, 0, i[:, :3], s[:2, :3]), [x, src, rep],
             **tol)
    check_op(lambda lib, x, s, i: x.scatter_add(1, i, s[:2]), [x, src, rep], **tol)
    check_op(lambda lib, x, s, i: x.scatter(1, i, s, reduce="add"), [x, src, rep], grad=False,
             **tol)
    check_op(lambda lib, x, s, i: x.scatter(1, i, s, reduce="multiply"), [x, src, rep],
             grad=False, **tol)
    check_op(lambda lib, x, s, i: lib.scatter_add(x, 0, i, s), [rand(dtype=dt),
                                                                rand(dtype=dt), np.array(0)],
             **tol)


def test_scatter_inplace():
    def fn(lib, x, s):
        y = x * 1
        y.scatter_(1, T(lib, [[1, 0], [2, 3]]), s[:, :2])
        y.scatter_add_(0, T(lib, [[0, 0, 1, 1], [0, 1, 1, 1]]), s * 3)
        return y

    check_op(fn, [rand(2, 4), rand(2, 4, seed=4)], **F32)
    z = np.zeros((2, 3), np.int64)
    check_op(lambda lib, z: z.clone().scatter_(1, T(lib, [[2], [0]]), 7), [z], atol=0, rtol=0)


def test_scatter_errors():
    x = np.zeros((3, 4), np.float32)
    check_exception(lambda lib: T(lib, x).scatter(1, T(lib, [[0]]), T(lib, x.astype(np.float64))),
                    match="dtype")
    check_exception(lambda lib: T(lib, x).scatter_add(1, T(lib, [[0, 5]]), T(lib, x)),
                    match="out of bounds")
    check_exception(lambda lib: T(lib, x).scatter(1, T(lib, [[0, 1, 2]]), T(lib, x[:, :2])),
                    match="no larger")
    check_exception(lambda lib: T(lib, x).scatter(1, T(lib, [[0]]), T(lib, x), reduce="max"),
                    match="add or multiply")
    check_exception(lambda lib: T(lib, x).scatter(1, T(lib, [[0.0]]), T(lib, x)), match="index")


# -- index_select / index_add / index_fill / masked_select / take -------------------------------------

@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_index_select(dt):
    tol = F32 if dt == np.float32 else F64
    x = rand(3, 4, 2, dtype=dt)
    check_op(lambda lib, x, i: lib.index_select(x, 1, i), [x, np.array([3, 0, 3, 3])], **tol)
    check_op(lambda lib, x, i: x.index_select(-1, i), [x, np.array([1])], **tol)
    check_op(lambda lib, x, i: x.index_select(0, i), [x, np.array(2)], **tol)
    check_op(lambda lib, x, i: x.index_select(0, i), [x, np.zeros(0, np.int64)], **tol)
    check_op(lambda lib, x: x.index_select(0, T(lib, np.array([2, 2], np.int32))), [x], **tol)


def test_index_add_fill():
    x, s = rand(3, 4), rand(3, 2, seed=2)
    check_op(lambda lib, x, s, i: lib.index_add(x, 1, i, s), [x, s, np.array([3, 3])], **F32)
    check_op(lambda lib, x, s, i: x.index_add(1, i, s, alpha=-2.0), [x, s, np.array([0, 3])],
             **F32)
    check_op(lambda lib, x, s: x.index_add(0, T(lib, [2, 0, 2]), x * s[0, 0]), [x, s], **F32)

    def fill(lib, x, v):
        return x.index_fill(1, T(lib, [0, 2, 2]), v) * x.index_fill(0, T(lib, [1]), -1.5)

    check_op(fill, [x, rand(seed=3)], **F32)

    def inplace(lib, x, s):
        y = x * 1
        y.index_add_(1, T(lib, [1, 1]), s)
        y.index_fill_(0, T(lib, [2]), 0.5)
        return y

    check_op(inplace, [x, s], **F32)
    check_op(lambda lib, x: x.index_fill(0, T(lib, [-1, 0]), 2.0), [x], **F32)  # wraps
    check_exception(lambda lib: lib.zeros(3).index_add(0, T(lib, [-1]), lib.ones(1)),
                    match="index_add")
    check_exception(lambda lib: lib.zeros(3).index_fill(0, T(lib, [3]), 1.0), match="index")
    check_exception(lambda lib: lib.take(lib.zeros(3), T(lib, [5])), match="out of range")
    check_exception(lambda lib: lib.topk(T(lib, [True, False]), 1), match="bool")
    check_exception(lambda lib: lib.zeros(3, 4).index_add(0, T(lib, [0, 0]), lib.ones(3, 4)),
                    match="index_add")
    check_exception(lambda lib: lib.zeros(3, 4).index_select(0, T(lib, [[1]])), match="vector")
    check_exception(lambda lib: lib.zeros(3, 4).index_select(0, T(lib, [1.0])), match="index")
    check_exception(lambda lib: lib.zeros(3, 4).index_select(1, T(lib, [4])), match="bounds")


def test_index_put():
    x, v = rand(3, 4), rand(3, seed=2)

    def fn(lib, x, v):
        i, j = T(lib, [0, 2, 2]), T(lib, [1, 1, 1])
        a = lib.index_put(x, (i, j), v, accumulate=True)  # repeats add up
        b = x.index_put((T(lib, [2, 0]),), v[:1].reshape(1, 1) * 2)
        c = x * 1
        c.index_put_((T(lib, [True, False, True]), T(lib, [3, 0])), v[1:])
        c.index_put_([j], v.reshape(3, 1), accumulate=True)
        return a, b, c

    check_op(fn, [x, v], **F32)
    check_exception(lambda lib: lib.zeros(3).index_put((T(lib, [0]),), T(lib, [1])),
                    match="dtypes match")


def test_masked_select_take():
    x = rand(3, 4)
    m = np.random.default_rng(1).random((3, 4)) > 0.5
    check_op(lambda lib, x: lib.masked_select(x, T(lib, m)), [x], **F32)
    check_op(lambda lib, x: x.masked_select(T(lib, m[1])), [x], **F32)  # broadcast mask
    check_op(lambda lib, x: lib.masked_select(x[0], T(lib, m)), [x], **F32)  # broadcast input
    check_op(lambda lib, x: lib.masked_select(x, T(lib, np.zeros((3, 4), bool))), [x], **F32)
    check_op(lambda lib, x: lib.masked_select(x, T(lib, np.bool_(True))), [rand()], **F32)
    check_exception(lambda lib: lib.masked_select(T(lib, x), T(lib, m.astype(np.int64))),
                    match="BoolTensor")
    check_op(lambda lib, x: lib.take(x, T(lib, [[0, 11], [-1, 11]])), [x], **F32)
    check_op(lambda lib, x: lib.take_along_dim(x, T(lib, [[0], [3], [3]]), dim=1), [x], **F32)
    check_op(lambda lib, x: lib.take_along_dim(x, T(lib, [[0, 1]]), dim=1), [x], **F32)
    check_op(lambda lib, x: x.take_along_dim(T(lib, [5, 5, 0])), [x], **F32)


def test_nonzero_argwhere():
    a = np.array([[0, 1.5, 0], [2, 0, -1]], np.float32)
    check_op(lambda lib, x: lib.nonzero(x), [a], grad=False, atol=0, rtol=0)
    check_op(lambda lib, x: x.nonzero(as_tuple=True), [a], grad=False, atol=0, rtol=0)
    check_op(lambda lib, x: lib.argwhere(x), [a > 0], grad=False, atol=0, rtol=0)
    check_op(lambda lib, x: lib.nonzero(x), [np.zeros((2, 0, 3))], grad=False, atol=0, rtol=0)
    check_op(lambda lib, x: lib.nonzero(x), [np.array(3, np.float32)], grad=False, atol=0, rtol=0)
    check_op(lambda lib, x: lib.nonzero(x, as_tuple=True), [np.array(3, np.float32)], grad=False, atol=0,
             rtol=0)
    check_op(lambda lib, x: lib.nonzero(x, as_tuple=True), [np.array(0, np.float32)], grad=False, atol=0,
             rtol=0)


# -- sort / topk ----------------------------------------------------------------------------------------

def _distinct(*shape, dt=np.float32, seed=0):
    n = int(np.prod(shape))
    return np.random.default_rng(seed).permutation(n).reshape(shape).astype(dt) / 7 - 3


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_sort(dim, descending, dt):
    tol = F32 if dt == np.float32 else F64
    x = _distinct(4, 5, 3, dt=dt)
    check_op(lambda lib, x: lib.sort(x, dim=dim, descending=descending), [x], **tol)
    check_op(lambda lib, x: x.argsort(dim, descending=descending), [x], atol=0, rtol=0)


def test_sort_special():
    check_op(lambda lib, x: lib.sort(x), [rand()], **F32)
    check_op(lambda lib, x: lib.sort(x, 0), [rand(0, 3)], **F32)
    check_op(lambda lib, x: lib.argsort(x), [rand()], atol=0, rtol=0)
    ties = np.array([[1, 2, 1, 2, 0, 2], [3, 3, 3, 1, 1, 1]], np.float32)
    for desc in (False, True):  # stable: tie order is defined, indices compared too
        check_op(lambda lib, x, d=desc: lib.sort(x, descending=d, stable=True), [ties], **F32)
    out = kiln.sort(kiln.tensor(ties), descending=True)  # unstable: values only
    np.testing.assert_array_equal(out.values.numpy(), -np.sort(-ties, axis=-1))
    nan = np.array([3, np.nan, 1, -np.inf, np.nan], np.float32)
    for desc in (False, True):
        check_op(lambda lib, x, d=desc: lib.sort(x, descending=d, stable=True), [nan], grad=False,
                 **F32)
    check_op(lambda lib, x: lib.sort(x, stable=True), [np.array([True, False, True])],
             atol=0, rtol=0)
    check_op(lambda lib, x: lib.sort(x, descending=True, stable=True),
             [np.array([5, -1, 5, 2], np.int64)], atol=0, rtol=0)
    s = kiln.sort(kiln.tensor([2.0, 1.0]))
    assert isinstance(s, tuple) and s.values is s[0] and s.indices is s[1]


@pytest.mark.parametrize("k,dim,largest", [(1, -1, True), (3, -1, True), (2, 0, False),
                                           (0, 1, True), (7, -1, False), (4, 1, False),
                                           (40, -1, True), (3, -1, False)])
def test_topk(k, dim, largest):
    x = _distinct(4, 7) if k < 40 else _distinct(2, 300, seed=3)
    check_op(lambda lib, x: lib.topk(x, k, dim=dim, largest=largest), [x], **F32)
    check_op(lambda lib, x: x.topk(k, dim, largest, True), [x.astype(np.float64)], **F64)


def test_topk_special():
    check_op(lambda lib, x: lib.topk(x, 1), [rand()], **F32)
    nan = np.array([3, np.nan, 1, 7], np.float32)
    check_op(lambda lib, x: lib.topk(x, 2), [nan], grad=False, **F32)
    check_op(lambda lib, x: lib.topk(x, 2, largest=False), [nan], grad=False, **F32)
    ties = np.array([[1, 2, 1, 2, 0, 2, 2, 1, 0, 0] * 3], np.float32)
    for largest in (True, False):  # ties: values only
        got = kiln.topk(kiln.tensor(ties), 5, largest=largest)
        want = torch.topk(torch.tensor(ties), 5, largest=largest)
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
        np.testing.assert_array_equal(np.take_along_axis(ties, got.indices.numpy(), -1),
                                      want.values.numpy())
    check_exception(lambda lib: lib.topk(lib.zeros(3), 4), match="out of range")
    check_exception(lambda lib: lib.topk(lib.zeros(3), -1), match="out of range")
    check_exception(lambda lib: lib.topk(lib.zeros(3), 1, dim=1), match="range")


# -- one_hot / embedding ----------------------------------------------------------------------------------

def _one_hot(lib):
    return kiln.ops.index.one_hot if lib is kiln else torch.nn.functional.one_hot


def _embedding(lib):
    return kiln.ops.index.embedding if lib is kiln else torch.nn.functional.embedding


def test_one_hot():
    for a, n in [(np.array([0, 2, 1, 2]), -1), (np.array([[0, 3], [1, 1]]), 5),
                 (np.array(2), 3), (np.zeros(0, np.int64), 4), (np.zeros((2, 0), np.int64), 1)]:
        check_op(lambda lib, a, n=n: _one_hot(lib)(a, n), [a], atol=0, rtol=0)
    check_exception(lambda lib: _one_hot(lib)(T(lib, [-1, 2]), 4), match="non-negative")
    check_exception(lambda lib: _one_hot(lib)(T(lib, [5, 2]), 4), match="smaller than")
    check_exception(lambda lib: _one_hot(lib)(T(lib, [1.0]), 4), match="LongTensor")
    check_exception(lambda lib: _one_hot(lib)(T(lib, np.zeros(0, np.int64))),
                    match="empty tensor")


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_embedding(padding_idx, dt):
    tol = F32 if dt == np.float32 else F64
    w = rand(5, 3, dtype=dt)
    idx = np.array([[0, 2, 2, 4], [4, 4, 1, 2]])
    check_op(lambda lib, i, w: _embedding(lib)(i, w, padding_idx=padding_idx), [idx, w], **tol)
    check_op(lambda lib, i, w: _embedding(lib)(i, w, padding_idx), [np.array(4), w], **tol)
    check_op(lambda lib, w: _embedding(lib)(T(lib, np.array([3, 3], np.int32)), w), [w], **tol)
    check_op(lambda lib, w: _embedding(lib)(T(lib, np.zeros((0, 2), np.int64)), w), [w], **tol)

    def twice(lib, w):  # double backward through embedding_backward
        i = T(lib, idx)
        e = _embedding(lib)(i, w, padding_idx)
        (g,) = lib.autograd.grad((e * e).sum(), w, create_graph=True)
        return g * w

    check_op(twice, [w], **tol)


def test_embedding_max_norm_and_errors():
    w = rand(5, 3, low=-3, high=3)
    out = check_op(lambda lib, w: _embedding(lib)(T(lib, [0, 1, 1]), w.detach().clone(),
                                                  max_norm=1.0), [w], grad=False, **F32)
    assert out[0].shape == (3, 3)
    check_exception(lambda lib: _embedding(lib)(T(lib, [5]), lib.ones(5, 2)), match="range")
    check_exception(lambda lib: _embedding(lib)(T(lib, [-1]), lib.ones(5, 2)), match="range")
    check_exception(lambda lib: _embedding(lib)(T(lib, [1.0]), lib.ones(5, 2)),
                    match="embedding")
    check_exception(lambda lib: _embedding(lib)(T(lib, [1]), lib.ones(5, 2), padding_idx=5),
                    match="Padding_idx")


# -- multinomial --------------------------------------------------------------------------------------------

def test_multinomial_statistics():
    p = np.array([[0.1, 0.0, 0.6, 0.3], [1.0, 1.0, 0.0, 2.0]], np.float32)
    g = kiln.Generator().manual_seed(3)
    s = kiln.multinomial(kiln.tensor(p), 20000, replacement=True, generator=g)
    assert s.shape == (2, 20000) and s.dtype == kiln.int64
    for r in range(2):
        freq = np.bincount(s[r].numpy(), minlength=4) / 20000
        want = p[r] / p[r].sum()
        assert freq[want == 0].sum() == 0
        np.testing.assert_allclose(freq, want, atol=0.015)  # ~4.5 standard errors
    # Without replacement: distinct draws; first draw follows p; zero-probability last.
    s = kiln.tensor(np.tile(p[1], (4000, 1))).multinomial(4, generator=g).numpy()
    assert all(len(set(row)) == 4 for row in s[:50])
    assert (s[:, 3] == 2).all()
    np.testing.assert_allclose(np.bincount(s[:, 0], minlength=4) / 4000, p[1] / 4, atol=0.03)
    a = kiln.multinomial(kiln.tensor([0.2, 0.8]), 5, True, generator=kiln.Generator()
                         .manual_seed(1))
    b = kiln.multinomial(kiln.tensor([0.2, 0.8]), 5, True, generator=kiln.Generator()
                         .manual_seed(1))
    assert a.tolist() == b.tolist() and a.shape == (5,)
    mark_checked("multinomial")


def test_multinomial_errors():
    check_exception(lambda lib: lib.multinomial(lib.tensor([-1.0, 2.0]), 1), match="element < 0")
    check_exception(lambda lib: lib.multinomial(lib.tensor([1.0, 2.0]), 3), match="n_sample")
    check_exception(lambda lib: lib.multinomial(lib.tensor([0.0, 0.0]), 1), match="sum of")
    check_exception(lambda lib: lib.multinomial(lib.tensor([1, 2]), 1), match="floating")
    check_exception(lambda lib: lib.multinomial(lib.ones(2, 2, 2), 1), match="1 or 2 dim")
    check_exception(lambda lib: lib.multinomial(lib.ones(2), 0), match="n_sample <= 0")
