"""Shape and layout ops against PyTorch: values, gradients, views, errors, double backward."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.ops.shape import basic_slice
from kiln.ops.shape import pad as kpad
from tests.helpers import check_exception, check_op, rand, randn

F32 = {"atol": 1e-6, "rtol": 1e-6}
F64 = {"atol": 1e-12, "rtol": 1e-12}


def tol(dtype):
    return F64 if dtype == np.float64 else F32


def both(dtype_list=(np.float32, np.float64)):
    return pytest.mark.parametrize("dt", dtype_list)


# -- reshape / view ------------------------------------------------------------------------------

@both()
@pytest.mark.parametrize("shape,new", [
    ((3, 4), (4, 3)), ((3, 4), (2, -1)), ((2, 3, 4), (-1,)), ((), (1,)), ((1,), ()),
    ((0, 3), (3, 0)), ((0, 3), (-1, 3)), ((2, 3), (3, 1, 2)), ((6,), (1, 6, 1)),
])
def test_reshape(shape, new, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: x.reshape(new), [x], **tol(dt))
    check_op(lambda lib, x: lib.reshape(x, new), [x], **tol(dt))
    check_op(lambda lib, x: x.reshape(*new) if new else x.reshape(()), [x], **tol(dt))


@both()
def test_reshape_non_contiguous(dt):
    x = rand(3, 4, dtype=dt)
    check_op(lambda lib, x: x.t().reshape(-1), [x], **tol(dt))
    check_op(lambda lib, x: x.t().reshape(2, 2, 3), [x], **tol(dt))
    check_op(lambda lib, x: x.t().reshape(4, 3, 1), [x], **tol(dt))
    check_op(lambda lib, x: x.permute(1, 0).reshape(6, 2).t().reshape(3, 4), [x], **tol(dt))


@both()
def test_view_and_friends(dt):
    x = rand(3, 4, dtype=dt)
    y = rand(2, 6, dtype=dt)
    check_op(lambda lib, x: x.view(2, 6), [x], **tol(dt))
    check_op(lambda lib, x: x.view(-1), [x], **tol(dt))
    check_op(lambda lib, x: x.view((4, 3)), [x], **tol(dt))
    check_op(lambda lib, x: x.t().view(4, 3, 1), [x], **tol(dt))  # viewable after transpose
    check_op(lambda lib, x: x.t().view(2, 2, 3), [x], **tol(dt))
    check_op(lambda lib, x, y: x.view_as(y) * y, [x, y], **tol(dt))
    check_op(lambda lib, x, y: x.t().reshape_as(y) + y, [x, y], **tol(dt))
    check_op(lambda lib, x: x.view(3, 4), [x], **tol(dt))


def test_reshape_errors():
    check_exception(lambda lib: lib.zeros(3, 4).reshape(3, 5),
                    match=r"shape '\[3, 5\]' is invalid for input of size 12")
    check_exception(lambda lib: lib.zeros(3, 4).view(3, 5),
                    match=r"shape '\[3, 5\]' is invalid for input of size 12")
    check_exception(lambda lib: lib.zeros(3, 4).reshape(-1, -1), match="only one dimension")
    check_exception(lambda lib: lib.zeros(3, 4).reshape(-2, 6), match="invalid shape dimension")
    check_exception(lambda lib: lib.zeros(3, 4).reshape(0, -1), match="invalid for input")
    check_exception(lambda lib: lib.zeros(0, 3).reshape(0, -1), match="ambiguous")
    check_exception(lambda lib: lib.zeros(3, 4).reshape(2.5, 2), match="reshape")
    check_exception(lambda lib: lib.zeros(3, 4).t().view(12), match="view size is not compatible")
    check_exception(lambda lib: lib.zeros(1, 4).expand(3, 4).view(12),
                    match="view size is not compatible")


@both()
def test_contiguous(dt):
    x = rand(3, 4, dtype=dt)
    out = check_op(lambda lib, x: x.t().contiguous(), [x], **tol(dt))[0]
    assert out.is_contiguous()
    a = kiln.tensor(x)
    assert a.contiguous() is a
    assert not a.t().is_contiguous() and a.t().contiguous().is_contiguous()
    check_op(lambda lib, x: x.unsqueeze(0).expand(2, 3, 4).contiguous() * 1.5, [x], **tol(dt))


@both()
@pytest.mark.parametrize("shape,s,e", [
    ((2, 3, 4), 0, -1), ((2, 3, 4), 1, 2), ((2, 3, 4), -3, -2), ((2, 3, 4), 1, 1),
    ((), 0, -1), ((), 0, 0), ((5,), 0, 0), ((2, 0, 3), 0, 1),
])
def test_flatten(shape, s, e, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.flatten(x, s, e), [x], **tol(dt))
    check_op(lambda lib, x: x.flatten(start_dim=s, end_dim=e), [x], **tol(dt))
    check_op(lambda lib, x: x.ravel(), [x], **tol(dt))
    check_op(lambda lib, x: x.mT.flatten() if x.ndim >= 2 else x.flatten(), [x], **tol(dt))


def test_flatten_errors():
    check_exception(lambda lib: lib.zeros(2, 3).flatten(1, 0), match="start_dim cannot come")
    check_exception(lambda lib: lib.zeros(2, 3).flatten(0, 3), match="flatten")


@both()
@pytest.mark.parametrize("shape,dim,sizes", [
    ((3, 12), 1, (3, 4)), ((3, 12), -1, (2, -1, 2)), ((12,), 0, (12,)), ((4, 0), 1, (2, 0)),
    ((6, 2), 0, [-1, 1, 3]),
])
def test_unflatten(shape, dim, sizes, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.unflatten(x, dim, sizes), [x], **tol(dt))
    check_op(lambda lib, x: x.unflatten(dim, sizes), [x], **tol(dt))


def test_unflatten_errors():
    check_exception(lambda lib: lib.zeros(3, 4).unflatten(1, (2, 5)),
                    match=r"Provided sizes \[2, 5\] don't multiply up to the size of dim 1 \(4\)")
    check_exception(lambda lib: lib.zeros(3, 4).unflatten(1, ()), match="non-empty")
    check_exception(lambda lib: lib.zeros(3, 4).unflatten(1, (-1, -1)), match="only one")
    check_exception(lambda lib: lib.zeros(3, 4).unflatten(2, (2, 2)), match="unflatten")


# -- permutations --------------------------------------------------------------------------------

@both()
def test_permute(dt):
    x = rand(2, 3, 4, dtype=dt)
    check_op(lambda lib, x: x.permute(2, 0, 1), [x], **tol(dt))
    check_op(lambda lib, x: x.permute((1, 2, 0)), [x], **tol(dt))
    check_op(lambda lib, x: x.permute([-1, -3, -2]), [x], **tol(dt))
    check_op(lambda lib, x: lib.permute(x, (2, 1, 0)), [x], **tol(dt))
    check_op(lambda lib, x: lib.permute(x, dims=(0, 2, 1)), [x], **tol(dt))
    check_op(lambda lib, x: x.permute(0, 1, 2), [x], **tol(dt))
    check_op(lambda lib, x: x.permute(()), [rand(dtype=dt)], **tol(dt))
    check_op(lambda lib, x: x.permute(1, 0), [rand(0, 3, dtype=dt)], **tol(dt))
    check_op(lambda lib, x: x.permute(1, 0).permute(1, 0) * x, [rand(3, 2, dtype=dt)], **tol(dt))


def test_permute_errors():
    check_exception(lambda lib: lib.zeros(3, 4).permute(1, 0, 2),
                    match=r"input.dim\(\) = 2 is not equal to len\(dims\) = 3")
    check_exception(lambda lib: lib.zeros(3, 4).permute(0),
                    match=r"input.dim\(\) = 2 is not equal to len\(dims\) = 1")
    check_exception(lambda lib: lib.zeros(3, 4).permute(0, 0), match="duplicate dims")
    check_exception(lambda lib: lib.zeros(3, 4).permute(0, 2), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(3, 4).permute(0, 1.0), match="permute")


@both()
def test_transpose_family(dt):
    x = rand(2, 3, 4, dtype=dt)
    m = rand(3, 5, dtype=dt)
    for fn in (lambda lib, x: x.transpose(0, 2), lambda lib, x: lib.transpose(x, -1, 1),
               lambda lib, x: x.transpose(1, 1), lambda lib, x: lib.swapaxes(x, 0, 1),
               lambda lib, x: x.swapdims(-1, 0), lambda lib, x: lib.swapdims(x, 2, 1),
               lambda lib, x: x.mT, lambda lib, x: x.mH):
        check_op(fn, [x], **tol(dt))
    for fn in (lambda lib, x: x.t(), lambda lib, x: lib.t(x), lambda lib, x: x.T,
               lambda lib, x: x.H, lambda lib, x: x.T.T + x):
        check_op(fn, [m], **tol(dt))
    for v in (rand(4, dtype=dt), rand(dtype=dt)):
        check_op(lambda lib, x: x.t(), [v], **tol(dt))
        check_op(lambda lib, x: x.transpose(0, -1), [v], **tol(dt))
    check_op(lambda lib, x: x.mT, [rand(dtype=dt)], **tol(dt))
    with pytest.warns(UserWarning):
        check_op(lambda lib, x: x.T, [x], **tol(dt))


def test_transpose_errors():
    check_exception(lambda lib: lib.zeros(2, 3).transpose(0, 2), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(2, 3, 4).t(), match=r"t\(\) expects a tensor with <= 2")
    check_exception(lambda lib: lib.zeros(3).mT, match="mT is only supported")
    check_exception(lambda lib: lib.zeros(2, 3, 4).H, match="H is only supported")


@both()
@pytest.mark.parametrize("src,dst", [(0, 2), (-1, 0), ((0, 1), (2, 0)), ([2], [1]), (1, 1),
                                     ((0, 1, 2), (2, 1, 0))])
def test_movedim(src, dst, dt):
    x = rand(2, 3, 4, dtype=dt)
    check_op(lambda lib, x: lib.movedim(x, src, dst), [x], **tol(dt))
    check_op(lambda lib, x: x.moveaxis(src, dst), [x], **tol(dt))


def test_movedim_errors():
    check_exception(lambda lib: lib.zeros(2, 3).movedim((0, 1), (0,)),
                    match="should contain the same number of dims")
    check_exception(lambda lib: lib.zeros(2, 3).movedim((0, 0), (0, 1)), match="repeated dim")
    check_exception(lambda lib: lib.zeros(2, 3).movedim((0, 1), (1, 1)), match="repeated dim")
    check_exception(lambda lib: lib.zeros(2, 3).movedim(0, 2), match="Dimension out of range")


# -- squeeze / unsqueeze / expand ----------------------------------------------------------------

@both()
@pytest.mark.parametrize("shape,dim", [
    ((1, 3, 1, 2), None), ((1, 3, 1, 2), 0), ((1, 3, 1, 2), -2), ((1, 3, 1, 2), 1),
    ((1, 3, 1, 2), (0, 2)), ((1, 3, 1, 2), (1, -2)), ((), None), ((), 0), ((), -1), ((), (0,)),
    ((1, 0, 1), None), ((1, 0, 1), (0, 1)), ((3,), None),
])
def test_squeeze(shape, dim, dt):
    x = rand(*shape, dtype=dt)
    if dim is None:
        check_op(lambda lib, x: x.squeeze(), [x], **tol(dt))
        check_op(lambda lib, x: lib.squeeze(x), [x], **tol(dt))
    else:
        check_op(lambda lib, x: x.squeeze(dim), [x], **tol(dt))
        check_op(lambda lib, x: lib.squeeze(x, dim=dim), [x], **tol(dt))


@both()
@pytest.mark.parametrize("shape,dim", [((2, 3), 0), ((2, 3), 2), ((2, 3), -1), ((2, 3), -3),
                                       ((), 0), ((), -1), ((0, 2), 1)])
def test_unsqueeze(shape, dim, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: x.unsqueeze(dim), [x], **tol(dt))
    check_op(lambda lib, x: lib.unsqueeze(x, dim), [x], **tol(dt))
    if len(shape) == 2:
        check_op(lambda lib, x: x.t().unsqueeze(dim), [x], **tol(dt))


def test_squeeze_unsqueeze_errors():
    check_exception(lambda lib: lib.zeros(2, 3).squeeze(2), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(2, 3).squeeze((0, 5)), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(()).squeeze((0, -1)), match="appears multiple times")
    check_exception(lambda lib: lib.zeros(2, 3).unsqueeze(3), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(2, 3).unsqueeze(-4), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(()).unsqueeze(2), match="Dimension out of range")


@both()
def test_expand_family(dt):
    x = rand(3, 1, dtype=dt)
    y = rand(2, 3, 4, dtype=dt)
    check_op(lambda lib, x: x.expand(3, 4), [x], **tol(dt))
    check_op(lambda lib, x: x.expand(2, -1, 5), [x], **tol(dt))
    check_op(lambda lib, x: x.expand((3, 1)), [x], **tol(dt))
    check_op(lambda lib, x, y: x.expand_as(y) * y, [x, y], **tol(dt))
    check_op(lambda lib, x: lib.broadcast_to(x, (2, 3, 0)), [x], **tol(dt))
    check_op(lambda lib, x: x.broadcast_to((4, 3, 6)), [x], **tol(dt))
    check_op(lambda lib, x: x.expand(()) * 2, [rand(dtype=dt)], **tol(dt))
    check_op(lambda lib, x: x.expand(2, 3), [rand(dtype=dt)], **tol(dt))
    check_op(lambda lib, x, y: lib.broadcast_tensors(x, y), [x, rand(4, dtype=dt)], **tol(dt))
    check_op(lambda lib, x, y: lib.broadcast_tensors(x, y)[1], [rand(2, 1, dtype=dt),
                                                                rand(1, 3, dtype=dt)], **tol(dt))
    assert tuple(kiln.broadcast_shapes((3, 1), (4,), ())) == tuple(
        torch.broadcast_shapes((3, 1), (4,), ()))


def test_expand_errors():
    check_exception(lambda lib: lib.zeros(3, 4).expand(2, 4), match="must match the existing")
    check_exception(lambda lib: lib.zeros(3, 4).expand(4), match="number of sizes provided")
    check_exception(lambda lib: lib.zeros(3, 4).expand(-1, 3, 4), match="-1 is not allowed")
    check_exception(lambda lib: lib.broadcast_to(lib.zeros(3), (4,)), match="must match")
    check_exception(lambda lib: lib.broadcast_tensors(lib.zeros(3), lib.zeros(4)),
                    match=r"size of tensor a \(3\) must match the size of tensor b \(4\)")
    check_exception(lambda lib: lib.broadcast_shapes((3,), (4,)), match="broadcast")


# -- slicing: narrow / split / chunk / unbind ----------------------------------------------------

@both()
@pytest.mark.parametrize("dim,start,length", [(0, 1, 2), (1, 0, 4), (-1, -3, 2), (0, 3, 0),
                                              (1, 4, 0), (0, -3, 3)])
def test_narrow(dim, start, length, dt):
    x = rand(3, 4, dtype=dt)
    check_op(lambda lib, x: x.narrow(dim, start, length), [x], **tol(dt))
    check_op(lambda lib, x: lib.narrow(x, dim, start, length), [x], **tol(dt))


def test_narrow_tensor_start_and_errors():
    x = rand(3, 4)
    check_op(lambda lib, x: x.narrow(0, lib.tensor(1), 2), [x], **F32)
    check_exception(lambda lib: lib.zeros(3, 4).narrow(0, 4, 1), match="start out of range")
    check_exception(lambda lib: lib.zeros(3, 4).narrow(0, -4, 1), match="start out of range")
    check_exception(lambda lib: lib.zeros(3, 4).narrow(0, 2, 5),
                    match=r"start \(2\) \+ length \(5\) exceeds dimension size \(3\)")
    check_exception(lambda lib: lib.zeros(3, 4).narrow(0, 1, -1), match="non-negative")
    check_exception(lambda lib: lib.zeros(()).narrow(0, 0, 1), match="0-dim")
    check_exception(lambda lib: lib.zeros(3, 4).narrow(2, 0, 1), match="Dimension out of range")


@both()
@pytest.mark.parametrize("shape,size,dim", [
    ((5, 3), 2, 0), ((5, 3), 5, 0), ((5, 3), 7, 0), ((5, 3), 1, -1), ((5, 3), [2, 3], 0),
    ((5, 3), (1, 0, 2), 1), ((0, 3), 2, 0), ((0, 3), 0, 0), ((0, 3), [0, 0], 0), ((4,), 2, 0),
])
def test_split(shape, size, dim, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: x.split(size, dim), [x], **tol(dt))
    check_op(lambda lib, x: lib.split(x, size, dim=dim), [x], **tol(dt))


def test_split_errors():
    check_exception(lambda lib: lib.zeros(3).split([2, 2]),
                    match=r"split_sizes to sum exactly to 3 .*split_sizes=\[2, 2\]")
    check_exception(lambda lib: lib.zeros(5).split([-1, 6]), match="non-negative")
    check_exception(lambda lib: lib.zeros(3).split(0), match="split_size can only be 0")
    check_exception(lambda lib: lib.zeros(3).split(-1), match="non-negative")
    check_exception(lambda lib: lib.zeros(()).split(1), match="at least a 1-dimensional")
    check_exception(lambda lib: lib.zeros(3).split(1, 1), match="Dimension out of range")


@both()
@pytest.mark.parametrize("n,chunks,dim", [(5, 4, 0), (6, 4, 0), (6, 3, 0), (6, 1, 0), (6, 8, 0),
                                          (0, 3, 0), (4, 2, -1)])
def test_chunk(n, chunks, dim, dt):
    x = rand(n, 4, dtype=dt) if dim == 0 else rand(3, n, dtype=dt)
    check_op(lambda lib, x: x.chunk(chunks, dim), [x], **tol(dt))
    check_op(lambda lib, x: lib.chunk(x, chunks, dim=dim), [x], **tol(dt))


def test_chunk_errors():
    check_exception(lambda lib: lib.zeros(5).chunk(0), match="greater than 0")
    check_exception(lambda lib: lib.zeros(5).chunk(-1), match="greater than 0")
    check_exception(lambda lib: lib.zeros(()).chunk(2), match="at least a 1-dimensional")


@both()
@pytest.mark.parametrize("shape,dim", [((3, 4), 0), ((3, 4), 1), ((3, 4), -1), ((2,), 0),
                                       ((0, 2), 1), ((2, 0), 0)])
def test_unbind(shape, dim, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: x.unbind(dim), [x], **tol(dt))
    check_op(lambda lib, x: lib.unbind(x, dim=dim), [x], **tol(dt))


def test_unbind_errors():
    check_exception(lambda lib: lib.zeros(()).unbind(), match="no dimensions")
    check_exception(lambda lib: lib.zeros(2, 3).unbind(2), match="Dimension out of range")


@pytest.mark.parametrize("arg,dim", [(3, 0), (2, 1), (4, -1), ([1, 3], 0), ((0, 2, 2), 1),
                                     ([-1], 0), ([2, 10], 1), ([3, 1], 0)])
def test_tensor_split(arg, dim):
    x = rand(5, 4)
    check_op(lambda lib, x: lib.tensor_split(x, arg, dim), [x], **F32)
    check_op(lambda lib, x: x.tensor_split(arg, dim=dim), [x], **F32)


def test_hsplit_vsplit_dsplit():
    x = rand(4, 6, 2)
    check_op(lambda lib, x: lib.hsplit(x, 3), [x], **F32)
    check_op(lambda lib, x: x.vsplit([1, 3]), [x], **F32)
    check_op(lambda lib, x: lib.dsplit(x, 2), [x], **F32)
    check_op(lambda lib, x: lib.hsplit(x, 2), [rand(6)], **F32)
    check_exception(lambda lib: lib.hsplit(lib.zeros(4, 6), 4), match="divisible")
    check_exception(lambda lib: lib.vsplit(lib.zeros(4), 2), match="at least 2")
    check_exception(lambda lib: lib.tensor_split(lib.zeros(4), 0), match="larger than 0")


def test_basic_slice_primitive():
    x = rand(5, 6, 3)
    check_op(lambda lib, x: basic_slice(x, (1, 0, 0), (4, 6, 3), (2, 3, 1)), [x],
             torch_fn=lambda lib, x: x[1:4:2, ::3], **F32)
    check_op(lambda lib, x: basic_slice(x, (4, 2, 1), (2, 6, 3), (1, 1, 1)), [x],
             torch_fn=lambda lib, x: x[4:2, 2:, 1:], **F32)
    k = kiln.tensor(x)
    assert basic_slice(k, (0, 0, 0), (5, 6, 3), (1, 1, 1)) is k


# -- joining -------------------------------------------------------------------------------------

@both()
@pytest.mark.parametrize("shapes,dim", [
    ([(2, 3), (4, 3)], 0), ([(2, 3), (2, 1), (2, 0), (2, 5)], 1), ([(2, 3), (2, 3)], -1),
    ([(3,)], 0), ([(0, 3), (2, 3)], 0), ([(2, 3, 4), (2, 1, 4)], -2), ([(0,), (0,)], 0),
])
def test_cat(shapes, dim, dt):
    xs = [rand(*s, seed=i, dtype=dt) for i, s in enumerate(shapes)]
    check_op(lambda lib, *xs: lib.cat(xs, dim), xs, **tol(dt))
    check_op(lambda lib, *xs: lib.cat(list(xs), dim=dim), xs, **tol(dt))
    check_op(lambda lib, *xs: lib.concat(xs, dim), xs, **tol(dt))
    check_op(lambda lib, *xs: lib.concatenate(xs, dim), xs, **tol(dt))


def test_cat_promotion_and_legacy_empty():
    a, b = rand(2, 3), rand(1, 3, dtype=np.float64)
    i = np.arange(6).reshape(2, 3)
    check_op(lambda lib, a, b: lib.cat([a, b]), [a, b], **F32)
    check_op(lambda lib, a, i: lib.cat([i, a, i]), [a, i], **F32)
    check_op(lambda lib, i, b: lib.cat([i, b], 1), [i, i > 2], **F32)
    bools = np.array([[True, False]])
    check_op(lambda lib, b, i: lib.cat([b, i.to(lib.int8)]), [bools, np.ones((1, 2), np.int8)],
             atol=0, rtol=0)
    # 1-D empty tensors are skipped whatever the other shapes (PyTorch's legacy rule), but they
    # still take part in dtype promotion and get a (0,)-shaped gradient
    e = np.zeros(0, np.float32)
    e64 = np.zeros(0, np.float64)
    check_op(lambda lib, a, e: lib.cat([a, e]), [a, e], **F32)
    check_op(lambda lib, e, a: lib.cat([e, a, e], 1), [e, a], **F32)
    check_op(lambda lib, a, e: lib.cat([a, e]), [a, e64], **F32)
    check_op(lambda lib, e, f: lib.cat([e, f]), [e, e64], **F32)
    check_op(lambda lib, a, e: lib.cat([a, e.detach()]), [a, e], **F32)


def test_cat_errors():
    check_exception(lambda lib: lib.cat([]), match="non-empty")
    check_exception(lambda lib: lib.cat([lib.zeros(3, 4), lib.zeros(3, 5)]),
                    match=r"Sizes of tensors must match except in dimension 0. Expected size 4 "
                          r"but got size 5 for tensor number 1 in the list")
    check_exception(lambda lib: lib.cat([lib.zeros(2, 3), lib.zeros(3, 3)], 1),
                    match=r"Expected size 2 but got size 3 for tensor number 1")
    check_exception(lambda lib: lib.cat([lib.zeros(3, 4), lib.zeros(3, 4, 1)]),
                    match="same number of dimensions: got 2 and 3")
    check_exception(lambda lib: lib.cat([lib.zeros(()), lib.zeros(())]),
                    match=r"zero-dimensional tensor \(at position 0\)")
    check_exception(lambda lib: lib.cat([lib.zeros(3, 4)], dim=2), match="Dimension out of range")
    check_exception(lambda lib: lib.cat(lib.zeros(3, 4)), match="tuple of Tensors")
    check_exception(lambda lib: lib.cat([lib.zeros(3), 1]), match="element 1")
    check_exception(lambda lib: lib.cat([lib.zeros(0), lib.zeros(2, 4)], dim=2),
                    match="Dimension out of range")


@both()
@pytest.mark.parametrize("shape,dim,n", [((2, 3), 0, 3), ((2, 3), 2, 2), ((2, 3), -1, 2),
                                         ((2, 3), -3, 1), ((), 0, 3), ((0, 2), 1, 2)])
def test_stack(shape, dim, n, dt):
    xs = [rand(*shape, seed=i, dtype=dt) for i in range(n)]
    check_op(lambda lib, *xs: lib.stack(xs, dim), xs, **tol(dt))
    check_op(lambda lib, *xs: lib.stack(list(xs), dim=dim), xs, **tol(dt))


def test_stack_errors_and_promotion():
    check_op(lambda lib, a, b: lib.stack([a, b], 2), [rand(2, 3), rand(2, 3, dtype=np.float64)],
             **F32)
    check_exception(lambda lib: lib.stack([]), match="non-empty")
    check_exception(lambda lib: lib.stack([lib.zeros(3, 4), lib.zeros(3, 5)]),
                    match=r"equal size, but got \[3, 4\] at entry 0 and \[3, 5\] at entry 1")
    check_exception(lambda lib: lib.stack([lib.zeros(3, 4)], 3), match="Dimension out of range")


@pytest.mark.parametrize("shapes", [[(), ()], [(3,), (2,)], [(2, 3), (2, 1)], [(2, 1, 2)] * 2,
                                    [(3,), (3,)], [(), (1,)]])
def test_hstack_vstack_dstack_column_stack(shapes):
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    for name in ("hstack", "vstack", "row_stack", "dstack", "column_stack"):
        same = len({s for s in shapes}) == 1
        if name != "hstack" and not same and not (name == "column_stack" and len(shapes[0]) == 2):
            continue
        check_op(lambda lib, *xs, name=name: getattr(lib, name)(xs), xs, **F32)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 3, 4), (2, 1, 1, 3)])
def test_atleast(shape):
    x = rand(*shape)
    for name in ("atleast_1d", "atleast_2d", "atleast_3d"):
        check_op(lambda lib, x, name=name: getattr(lib, name)(x), [x], **F32)
        check_op(lambda lib, x, name=name: getattr(lib, name)(x, x * 2), [x], **F32)
        check_op(lambda lib, x, name=name: getattr(lib, name)([x, x]), [x], **F32)


# -- flip / roll / repeat / tile / tril / triu ---------------------------------------------------

@both()
@pytest.mark.parametrize("shape,dims", [((3, 4), (0,)), ((3, 4), (0, 1)), ((2, 3, 4), (-1, 0)),
                                        ((3, 4), ()), ((), ()), ((), (0,)), ((0, 3), (1,))])
def test_flip(shape, dims, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.flip(x, dims), [x], **tol(dt))
    check_op(lambda lib, x: x.flip(*dims) if dims else x.flip(()), [x], **tol(dt))
    check_op(lambda lib, x: x.flip(list(dims)), [x], **tol(dt))


def test_fliplr_flipud_and_errors():
    x = rand(3, 4, 2)
    check_op(lambda lib, x: lib.fliplr(x), [x], **F32)
    check_op(lambda lib, x: x.flipud(), [x], **F32)
    check_op(lambda lib, x: x.flipud(), [rand(3)], **F32)
    check_exception(lambda lib: lib.fliplr(lib.zeros(3)), match="Input must be >= 2-d")
    check_exception(lambda lib: lib.flipud(lib.zeros(())), match="Input must be >= 1-d")
    check_exception(lambda lib: lib.zeros(2, 3).flip(0, 0), match="appears multiple times")
    check_exception(lambda lib: lib.zeros(2, 3).flip(2), match="Dimension out of range")
    check_exception(lambda lib: lib.flip(lib.zeros(2, 3), 1), match="tuple of ints")


@both()
@pytest.mark.parametrize("shape,shifts,dims", [
    ((3, 4), 1, 0), ((3, 4), -1, 1), ((3, 4), 5, -1), ((3, 4), (1, 2), (0, 1)),
    ((3, 4), 2, None), ((3, 4), -7, None), ((3, 4), 3, 0), ((3, 4), (1, 1), (0, 0)),
    ((), 1, None), ((0, 3), 1, 0), ((0, 3), 1, None), ((2, 3, 4), (1, -2), (2, 0)),
])
def test_roll(shape, shifts, dims, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.roll(x, shifts, dims), [x], **tol(dt))
    check_op(lambda lib, x: x.roll(shifts=shifts, dims=dims), [x], **tol(dt))


def test_roll_errors():
    check_exception(lambda lib: lib.zeros(3, 4).roll((1, 2), (0,)), match="must align")
    check_exception(lambda lib: lib.zeros(3, 4).roll((1, 2)), match="must align")
    check_exception(lambda lib: lib.zeros(3, 4).roll((), ()), match="required")
    check_exception(lambda lib: lib.zeros(3, 4).roll(1, 2), match="Dimension out of range")
    check_exception(lambda lib: lib.zeros(()).roll(1, 0), match="no dimensions")
    check_exception(lambda lib: lib.zeros(3, 4).roll(1, 0.5), match="roll")


@both()
@pytest.mark.parametrize("shape,sizes", [((2, 3), (2, 1)), ((2, 3), (1, 1)), ((2, 3), (3, 2, 2)),
                                         ((), (2, 3)), ((), ()), ((3,), (0, 2)),
                                         ((1, 3), (4, 1)), ((2, 0), (2, 2))])
def test_repeat(shape, sizes, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: x.repeat(*sizes) if sizes else x.repeat(()), [x], **tol(dt))
    check_op(lambda lib, x: x.repeat(sizes), [x], **tol(dt))
    check_op(lambda lib, x: x.repeat(list(sizes)), [x], **tol(dt))


@both()
@pytest.mark.parametrize("shape,dims", [((2, 3), (2,)), ((2, 3), (2, 2)), ((2, 3), (2, 1, 3)),
                                        ((), (3,)), ((3,), ()), ((2, 3), (1,))])
def test_tile(shape, dims, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.tile(x, dims), [x], **tol(dt))
    check_op(lambda lib, x: x.tile(dims), [x], **tol(dt))
    if dims:
        check_op(lambda lib, x: x.tile(*dims), [x], **tol(dt))


def test_repeat_errors_and_copy():
    check_exception(lambda lib: lib.zeros(2, 3).repeat(2), match="can not be smaller")
    check_exception(lambda lib: lib.zeros(2, 3).repeat(-1, 2), match="negative dimension")
    check_exception(lambda lib: lib.zeros(2, 3).repeat(2.5, 1), match="repeat")
    for lib in (kiln, torch):  # repeat always copies, even where a zero-stride view would do
        x = lib.zeros(1, 3)
        r = x.repeat(4, 1)
        r.add_(1)
        assert float(x.sum()) == 0.0 and float(r.sum()) == 12.0


@both()
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3), (2, 3, 4), (2, 2, 3, 3), (0, 3),
                                   (3, 0)])
@pytest.mark.parametrize("diagonal", [0, 1, -1, 2, -4, 7])
def test_tril_triu(shape, diagonal, dt):
    x = rand(*shape, dtype=dt)
    check_op(lambda lib, x: lib.tril(x, diagonal), [x], **tol(dt))
    check_op(lambda lib, x: x.triu(diagonal=diagonal), [x], **tol(dt))


def test_tril_triu_dtypes_and_errors():
    i = np.arange(12).reshape(3, 4)
    check_op(lambda lib, i: lib.tril(i, 1), [i], atol=0, rtol=0)
    check_op(lambda lib, b: lib.triu(b), [i > 3], atol=0, rtol=0)
    check_op(lambda lib, x: x.tril().triu(), [rand(4, 4)], **F32)
    check_exception(lambda lib: lib.tril(lib.zeros(3)), match="at least 2 dimensions")
    check_exception(lambda lib: lib.triu(lib.zeros(())), match="at least 2 dimensions")
    check_exception(lambda lib: lib.tril(lib.zeros(3, 3), 1.5), match="diagonal")


# -- pad -----------------------------------------------------------------------------------------

def _fpad(*args, **kwargs):
    return lambda lib, x: (kpad if lib is kiln else F.pad)(x, *args, **kwargs)


@both()
@pytest.mark.parametrize("shape,p,value", [
    ((2, 3, 4), (1, 2), None), ((2, 3, 4), (1, 2, 0, 1), 2.5), ((2, 3, 4), (1, 1, 1, 1, 1, 1), -1),
    ((2, 3, 4), (-1, 2), None), ((2, 3, 4), (-1, -2, 1, -1), 0.0), ((2, 3, 4), (0, 0), None),
    ((2, 3, 4), (-2, -2), None), ((3,), (2, 0), 1.0), ((), (), None), ((2, 0), (1, 1), 3.0),
    ((0, 2), (1, 1, 2, 0), None), ((2, 3), [1, 1], None),
])
def test_pad_constant(shape, p, value, dt):
    x = rand(*shape, dtype=dt)
    kw = {} if value is None else {"value": value}
    check_op(_fpad(p, **kw), [x], **tol(dt))
    check_op(_fpad(p, "constant", value), [x], **tol(dt))


def test_pad_constant_integer():
    i = np.arange(6).reshape(2, 3)
    check_op(_fpad((1, 1), value=2.5), [i], atol=0, rtol=0)
    check_op(_fpad((1, 1, 1, 0)), [i > 2], atol=0, rtol=0)


@both()
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("shape,p", [
    ((2, 5), (2, 1)), ((2, 3, 5), (0, 3)), ((2, 3, 5), (-1, 2)), ((2, 3, 5), (2, -2)),
    ((2, 4, 5), (1, 2, 2, 1)), ((1, 2, 4, 5), (3, 0, 0, 2)), ((2, 4, 5), (-1, 1, 1, -2)),
    ((1, 2, 3, 4, 4), (1, 1, 2, 0, 0, 2)), ((2, 3, 4, 4), (1, 2, 1, 0, 2, 1)),
    ((2, 3, 5), (0, 0)), ((0, 3, 5), (1, 1)), ((1, 2, 5), (-2, 3)), ((1, 2, 5), (3, -2)),
    ((1, 2, 5), (-4, 1)), ((1, 2, 5), (-1, -1)),
])
def test_pad_modes(mode, shape, p, dt):
    x = rand(*shape, dtype=dt)
    check_op(_fpad(p, mode=mode), [x], **tol(dt))


def test_pad_circular_to_empty():
    check_op(_fpad((-2, -2), mode="circular"), [rand(1, 2, 4)], **F32)
    check_exception(lambda lib: (kpad if lib is kiln else F.pad)(lib.zeros(1, 2, 4), (-2, -2),
                                                                  mode="reflect"),
                    match="too small")


def test_pad_errors():
    x = lambda lib: lib.zeros(2, 3, 4)
    P = lambda lib: kpad if lib is kiln else F.pad
    check_exception(lambda lib: P(lib)(x(lib), (1,)), match="divisible by 2")
    check_exception(lambda lib: P(lib)(x(lib), (1,) * 8), match="padding length 8 and input of "
                                                                  "dimension 3")
    check_exception(lambda lib: P(lib)(x(lib), (-3, -2)), match="negative output size")
    check_exception(lambda lib: P(lib)(x(lib), (1.5, 1)), match="must be tuple of ints")
    check_exception(lambda lib: P(lib)(x(lib), (1, 1), mode="foo"), match="Unrecognised padding")
    check_exception(lambda lib: P(lib)(x(lib), (1, 1), mode="reflect", value=2.0),
                    match="doesn't take in value")
    check_exception(lambda lib: P(lib)(x(lib), (4, 1), mode="reflect"),
                    match=r"padding \(4, 1\) at dimension 2 of input \[2, 3, 4\]")
    check_exception(lambda lib: P(lib)(x(lib), (5, 1), mode="circular"), match="more than once")
    check_exception(lambda lib: P(lib)(x(lib), (-3, -2), mode="circular"), match="empty dimension")
    check_exception(lambda lib: P(lib)(x(lib), (-3, -2), mode="reflect"), match="too small")
    check_exception(lambda lib: P(lib)(x(lib), (-3, -2, 0, 0), mode="replicate"),
                    match="too small")
    check_exception(lambda lib: P(lib)(x(lib), (1,) * 6, mode="reflect"),
                    match="Padding size 6 is not supported for 3D input")
    check_exception(lambda lib: P(lib)(lib.zeros(3), (1, 1), mode="replicate"),
                    match="not supported for 1D input")
    check_exception(lambda lib: P(lib)(lib.zeros(2, 0, 3), (1, 1), mode="reflect"),
                    match="other non-zero dimensions")


# -- views share storage and version ------------------------------------------------------------

VIEWS = [
    lambda x: x.reshape(4, 3), lambda x: x.view(-1), lambda x: x.t(), lambda x: x.T,
    lambda x: x.permute(1, 0), lambda x: x.transpose(0, 1), lambda x: x.unsqueeze(1),
    lambda x: x.unsqueeze(0).squeeze(0), lambda x: x.narrow(1, 1, 2), lambda x: x.split(2, 1)[1],
    lambda x: x.chunk(2, 0)[1], lambda x: x.unbind(1)[2], lambda x: x.flatten(),
    lambda x: x.movedim(0, 1), lambda x: x.unflatten(1, (2, 2)), lambda x: x.mT,
    lambda x: x.view_as(x), lambda x: x.t().view(4, 3, 1), lambda x: x.t().unsqueeze(0),
    lambda x: x.t().narrow(0, 1, 2).t(), lambda x: x.swapaxes(0, 1), lambda x: x.tensor_split(2)[0],
    lambda x: x.contiguous(),
]
COPIES = [
    lambda x: x.t().reshape(-1), lambda x: x.t().contiguous(), lambda x: x.flip(0),
    lambda x: x.roll(1, 0), lambda x: x.repeat(1, 1), lambda x: x.tile((1,)),
    lambda x: x.t().flatten(), lambda x: x.tril(), lambda x: x.ravel().mul(1),
    lambda x: x.t().ravel(),
]


@pytest.mark.parametrize("k", range(len(VIEWS)))
def test_views_share_storage(k):
    """Writing through a view under no_grad changes the base, exactly where PyTorch's does."""
    results = []
    for lib in (kiln, torch):
        x = lib.tensor(np.arange(12.0, dtype=np.float32).reshape(3, 4), requires_grad=True)
        v = VIEWS[k](x)
        with lib.no_grad():
            v.mul_(-1.0)
        assert x._version > 0 if lib is torch else x._version_counter > 0
        results.append(x.detach().numpy().copy())
    np.testing.assert_array_equal(results[0], results[1])
    assert (results[0] < 0).any()


@pytest.mark.parametrize("k", range(len(COPIES)))
def test_copies_do_not_share_storage(k):
    for lib in (kiln, torch):
        x = lib.tensor(np.arange(12.0, dtype=np.float32).reshape(3, 4))
        c = COPIES[k](x)
        c.mul_(-1.0)
        assert (x.numpy() >= 0).all(), lib.__name__


def test_pad_and_cat_outputs_are_fresh():
    x = kiln.ones(2, 3)
    for out in (kpad(x, (0, 0)), kpad(x, (-1, 0)), kpad(x, (0, 0), mode="reflect"),
                kiln.cat([x]), kiln.stack([x])):
        out.mul_(0.0)
        assert float(x.sum()) == 6.0


def test_inplace_on_base_invalidates_saved_view():
    """The view shares the base's version counter, so backward notices the overwrite."""
    for lib in (kiln, torch):
        x = lib.ones(2, 3, requires_grad=True)
        y = x * 1.0
        v = y.t()
        z = v * v
        with lib.no_grad():
            y.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


# -- double backward -----------------------------------------------------------------------------

DOUBLE = [
    (lambda lib, x: x.permute(2, 0, 1), (2, 3, 4)),
    (lambda lib, x: x.reshape(6, 4).t(), (2, 3, 4)),
    (lambda lib, x: x.narrow(1, 1, 2), (2, 3, 4)),
    (lambda lib, x: lib.cat([x, x.narrow(1, 0, 1) * 2], 1), (2, 3, 4)),
    (lambda lib, x: lib.stack(x.unbind(2), 0), (2, 3, 4)),
    (lambda lib, x: x.split(2, -1)[1], (2, 3, 4)),
    (lambda lib, x: x.expand(5, 2, 3, 4), (2, 3, 4)),
    (lambda lib, x: x.tril(1), (2, 3, 4)),
    (lambda lib, x: x.triu(-1), (2, 3, 4)),
    (lambda lib, x: x.flip(0, 2), (2, 3, 4)),
    (lambda lib, x: x.roll(1, 1), (2, 3, 4)),
    (lambda lib, x: x.repeat(2, 1, 1, 2), (2, 3, 4)),
    (lambda lib, x: x.t().contiguous(), (3, 4)),
    (lambda lib, x: (kpad if lib is kiln else F.pad)(x, (1, -1, 2, 0), value=0.5), (2, 3, 4)),
    (lambda lib, x: (kpad if lib is kiln else F.pad)(x, (2, 1), mode="reflect"), (2, 3, 4)),
    (lambda lib, x: (kpad if lib is kiln else F.pad)(x, (1, 2), mode="replicate"), (2, 3, 4)),
    (lambda lib, x: (kpad if lib is kiln else F.pad)(x, (1, 2), mode="circular"), (2, 3, 4)),
]


@pytest.mark.parametrize("k", range(len(DOUBLE)))
def test_double_backward(k):
    fn, shape = DOUBLE[k]
    x0 = randn(*shape, dtype=np.float64)
    got = []
    for lib in (kiln, torch):
        x = lib.tensor(x0, requires_grad=True)
        y = fn(lib, x)
        w = lib.tensor(np.linspace(0.5, 1.5, int(np.prod(tuple(y.shape)))).reshape(tuple(y.shape)))
        loss = (y * y * w).sum()
        (g,) = lib.autograd.grad(loss, x, create_graph=True)
        w2 = lib.tensor(np.linspace(-1.0, 1.0, x0.size).reshape(shape))
        (gg,) = lib.autograd.grad((g * g * w2).sum(), x)
        got.append((g.detach().numpy(), gg.detach().numpy()))
    np.testing.assert_allclose(got[0][0], got[1][0], **F64)
    np.testing.assert_allclose(got[0][1], got[1][1], **F64)


def test_basic_slice_gradient_as_a_forward_op():
    """The gradient of a strided basic slice (an index_view) as a forward op, and its own
    gradient."""
    def fn(lib, x):
        y = basic_slice(x, (1, 0), (5, 6), (2, 3)) if lib is kiln else x[1:5:2, ::3]
        return lib.autograd.grad((y * y).sum(), x, create_graph=True)[0]

    check_op(fn, [randn(5, 6, dtype=np.float64)], **F64)
    check_op(fn, [randn(5, 6)], **F32)


def test_basic_slice_double_backward():
    """Gradient of the slice gradient (index_put into zeros, whose VJP is index_view again)."""
    x0 = randn(5, 6, dtype=np.float64)
    got = []
    for lib in (kiln, torch):
        x = lib.tensor(x0, requires_grad=True)
        y = basic_slice(x, (1, 0), (5, 6), (2, 3)) if lib is kiln else x[1:5:2, ::3]
        (g,) = lib.autograd.grad((y * y).sum(), x, create_graph=True)
        (gg,) = lib.autograd.grad((g * g * x).sum(), x)
        got.append((g.detach().numpy(), gg.detach().numpy()))
    np.testing.assert_allclose(got[0][0], got[1][0], **F64)
    np.testing.assert_allclose(got[0][1], got[1][1], **F64)
