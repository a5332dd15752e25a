"""Products against PyTorch: matmul in every rank combination with broadcast batches, mm/bmm/mv/
dot/outer/inner/addmm/baddbmm, linear, einsum and tensordot; values, dtypes, gradients, double
backward and the errors raised for mismatched shapes and dtypes.

Tolerances: float32 products here contract at most ~16 terms of size <= 2, so 1e-5 absolute and
relative covers the rounding of any summation order; float64 1e-12."""

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, rand

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-12}
TOL = {np.float32: F32, np.float64: F64}
FLOATS = [np.float32, np.float64]


def F(lib):
    return torch.nn.functional if lib is torch else kiln


def grad_of(fn, n_inputs=2):
    """The gradient of ``fn`` with respect to all its inputs (weighted by ``w``), as a
    differentiable function: check_op on it compares second derivatives with PyTorch."""
    def g(lib, *args):
        ins, w = args[:n_inputs], args[n_inputs]
        return lib.autograd.grad((fn(lib, *ins) * w).sum(), ins, create_graph=True)

    return g


# -- matmul --------------------------------------------------------------------------------------

MATMUL_SHAPES = [
    ((3,), (3,)),
    ((3,), (3, 4)),
    ((2, 3), (3,)),
    ((2, 3), (3, 4)),
    ((3,), (2, 3, 4)),
    ((2, 2, 3), (3,)),
    ((5, 2, 3), (3, 4)),          # batched @ matrix: one gemm over all rows
    ((2, 3), (5, 3, 4)),          # matrix @ batched: the gradient of the matrix sums the batch
    ((5, 2, 3), (5, 3, 4)),
    ((5, 1, 2, 3), (4, 3, 2)),    # broadcast batch dims on both sides
    ((1, 2, 3), (4, 3, 2)),
    ((2, 1, 2, 3), (1, 3, 3, 1)),
    ((0, 3), (3, 4)),             # empty
    ((2, 0), (0, 3)),             # empty contraction: zeros
    ((3, 0, 2, 3), (3, 2)),
    ((2, 3, 0), (0, 4)),
    ((2, 3, 0), (2, 0, 4)),
    ((1, 1), (1, 1)),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul(sa, sb, dtype):
    a, b = rand(*sa, dtype=dtype), rand(*sb, seed=1, dtype=dtype)
    check_op(lambda lib, a, b: lib.matmul(a, b), [a, b], **TOL[dtype])
    check_op(lambda lib, a, b: a @ b, [a, b], **TOL[dtype])


def test_rmatmul_and_method():
    a, b = rand(2, 3), rand(3, 4, seed=1)
    check_op(lambda lib, a, b: b.__rmatmul__(a), [a, b], **F32)
    check_op(lambda lib, a, b: a.matmul(b), [a, b], **F32)


def test_matmul_transposed_and_strided_operands():
    a, b = rand(4, 3), rand(5, 4, seed=1)
    # a.T is a non-contiguous view; the product must not care
    check_op(lambda lib, a, b: lib.matmul(a.T, b.T), [a, b], **F32)
    check_op(lambda lib, a, b: lib.matmul(a[::2], b[::2].T), [a, b[:, :3]], **F32)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_matmul_integers(dtype):
    a = (rand(2, 3) * 3).astype(dtype)
    b = (rand(3, 4, seed=1) * 3).astype(dtype)
    check_op(lambda lib, a, b: a @ b, [a, b], atol=0, rtol=0)
    check_op(lambda lib, a, b: lib.matmul(a, b), [a[0], b], atol=0, rtol=0)


def test_matmul_keeps_float32():
    x = kiln.tensor(rand(2, 3), requires_grad=True)
    w = kiln.tensor(rand(3, 4, seed=1), requires_grad=True)
    y = x @ w
    y.sum().backward()
    assert y.dtype == kiln.float32 and x.grad.dtype == kiln.float32 and w.grad.dtype == kiln.float32


@pytest.mark.parametrize("sa,sb", [((2, 3), (4, 5)), ((3,), (4,)), ((3,), (4, 5)), ((2, 3), (4,)),
                                   ((2, 2, 3), (4,)), ((3,), (2, 4, 5)), ((2, 2, 3), (2, 4, 5)),
                                   ((2, 2, 3), (4, 5)), ((5, 2, 3), (2, 3, 4))])
def test_matmul_shape_errors(sa, sb):
    a, b = rand(*sa), rand(*sb)
    check_exception(lambda lib: lib.matmul(lib.tensor(a), lib.tensor(b)),
                    match=r"cannot be multiplied|size mismatch|inconsistent|Expected size|"
                          r"must match")


def test_matmul_error_messages():
    e = check_exception(lambda lib: lib.tensor(rand(2, 3)) @ lib.tensor(rand(4, 5)))
    assert str(e) == "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"
    e = check_exception(lambda lib: lib.tensor(rand(2, 3)) @ lib.tensor(rand(3, 4)).double())
    assert str(e) == "expected m1 and m2 to have the same dtype, but got: float != double"
    check_exception(lambda lib: lib.matmul(lib.tensor(1.0), lib.tensor(rand(3))), match="1D")
    check_exception(lambda lib: lib.tensor(rand(2, 3)) @ 2)
    check_exception(lambda lib: lib.ones(2, 3, dtype=lib.bool) @ lib.ones(3, 2, dtype=lib.bool),
                    match="Bool")


# -- mm, bmm, mv, dot, outer, inner, addmm, baddbmm, addmv ---------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
def test_mm_bmm_mv_dot(dtype):
    tol = TOL[dtype]
    check_op(lambda lib, a, b: lib.mm(a, b), [rand(2, 3, dtype=dtype), rand(3, 4, seed=1,
                                                                          dtype=dtype)], **tol)
    check_op(lambda lib, a, b: a.bmm(b), [rand(4, 2, 3, dtype=dtype), rand(4, 3, 5, seed=1,
                                                                            dtype=dtype)], **tol)
    check_op(lambda lib, a, b: lib.mv(a, b), [rand(2, 3, dtype=dtype), rand(3, seed=1,
                                                                          dtype=dtype)], **tol)
    check_op(lambda lib, a, b: lib.dot(a, b), [rand(5, dtype=dtype), rand(5, seed=1,
                                                                        dtype=dtype)], **tol)
    check_op(lambda lib, a, b: lib.dot(a, b), [rand(0, dtype=dtype), rand(0, seed=1,
                                                                        dtype=dtype)], **tol)


def test_outer_inner():
    check_op(lambda lib, a, b: lib.outer(a, b), [rand(3), rand(4, seed=1)], **F32)
    check_op(lambda lib, a, b: a.outer(b), [rand(3, dtype=np.float64), rand(4, seed=1)], **F32)
    check_op(lambda lib, a, b: lib.outer(a, b), [rand(3), np.arange(4)], **F32)  # promotes
    check_op(lambda lib, a, b: lib.inner(a, b), [rand(2, 3), rand(4, 3, seed=1)], **F32)
    check_op(lambda lib, a, b: lib.inner(a, b), [rand(3), rand(3, seed=1)], **F32)
    check_op(lambda lib, a, b: lib.inner(a, b), [rand(2, 5, 3), rand(3, seed=1)], **F32)
    check_op(lambda lib, a, b: lib.inner(a, b), [rand(), rand(2, 3, seed=1)], **F32)


@pytest.mark.parametrize("beta,alpha", [(1, 1), (0.5, 2.0), (0, 1)])
def test_addmm_baddbmm_addmv(beta, alpha):
    kw = {"beta": beta, "alpha": alpha}
    # beta=0 ignores input (NaNs included); PyTorch then reports a zero gradient for it and
    # kiln none, so only values are compared there
    grad = beta != 0
    nan = np.full(4, np.nan, np.float32)
    check_op(lambda lib, i, a, b: lib.addmm(i, a, b, **kw),
             [rand(4) if grad else nan, rand(2, 3, seed=1), rand(3, 4, seed=2)], grad=grad, **F32)
    check_op(lambda lib, i, a, b: lib.baddbmm(i, a, b, **kw),
             [rand(2, 1, 4), rand(2, 2, 3, seed=1), rand(2, 3, 4, seed=2)], grad=grad, **F32)
    check_op(lambda lib, i, a, b: lib.addmv(i, a, b, **kw),
             [rand(2), rand(2, 3, seed=1), rand(3, seed=2)], grad=grad, **F32)


def test_product_errors():
    r = rand
    check_exception(lambda lib: lib.mm(lib.tensor(r(2, 2, 3)), lib.tensor(r(3, 4))),
                    match="self must be a matrix")
    check_exception(lambda lib: lib.mm(lib.tensor(r(2, 3)), lib.tensor(r(4, 4))),
                    match=r"\(2x3 and 4x4\)")
    check_exception(lambda lib: lib.bmm(lib.tensor(r(2, 3)), lib.tensor(r(3, 4))),
                    match="batch1 must be a 3D tensor")
    check_exception(lambda lib: lib.bmm(lib.tensor(r(2, 2, 3)), lib.tensor(r(3, 3, 4))),
                    match=r"\[2, 3\] but got: \[3, 3\]")
    check_exception(lambda lib: lib.mv(lib.tensor(r(2, 3)), lib.tensor(r(4))),
                    match="size mismatch")
    check_exception(lambda lib: lib.mv(lib.tensor(r(2, 3)), lib.tensor(r(3, 1))),
                    match="vector")
    check_exception(lambda lib: lib.dot(lib.tensor(r(3)), lib.tensor(r(4))),
                    match="inconsistent tensor size")
    check_exception(lambda lib: lib.dot(lib.tensor(r(3, 1)), lib.tensor(r(3))),
                    match="1D tensors expected")
    check_exception(lambda lib: lib.dot(lib.tensor(r(3)), lib.tensor(r(3)).double()),
                    match="Float and Double")
    check_exception(lambda lib: lib.outer(lib.tensor(r(3, 1)), lib.tensor(r(3))),
                    match="1-D argument self")
    check_exception(lambda lib: lib.inner(lib.tensor(r(3, 2)), lib.tensor(r(3))),
                    match="last dimension must match")


# -- linear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("xshape", [(4, 3), (3,), (2, 5, 3), (0, 3), (2, 1, 4, 3), (2, 0, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(xshape, with_bias, dtype):
    x, w, b = rand(*xshape, dtype=dtype), rand(6, 3, seed=1, dtype=dtype), rand(6, seed=2,
                                                                               dtype=dtype)
    if with_bias:
        check_op(lambda lib, x, w, b: F(lib).linear(x, w, b), [x, w, b], **TOL[dtype])
    else:
        check_op(lambda lib, x, w: F(lib).linear(x, w), [x, w], **TOL[dtype])


def test_linear_vector_weight_and_broadcast_bias():
    check_op(lambda lib, x, w: F(lib).linear(x, w), [rand(4, 3), rand(3, seed=1)], **F32)
    check_op(lambda lib, x, w, b: F(lib).linear(x, w, b), [rand(2, 4, 3), rand(5, 3, seed=1),
                                                           rand(4, 5, seed=2)], **F32)
    check_op(lambda lib, x, w, b: F(lib).linear(x, w, b), [rand(4, 3), rand(5, 3, seed=1),
                                                           rand(1, seed=2)], **F32)


def test_linear_errors():
    check_exception(lambda lib: F(lib).linear(lib.tensor(rand(2, 3)), lib.tensor(rand(4, 5))),
                    match=r"\(2x3 and 5x4\)")
    check_exception(lambda lib: F(lib).linear(lib.tensor(rand(2, 3)), lib.tensor(rand(4, 3)),
                                              lib.tensor(rand(5))), match="expanded size")
    check_exception(lambda lib: F(lib).linear(lib.tensor(rand(2, 3)),
                                              lib.tensor(rand(4, 3)).double()),
                    match="same dtype")


# -- einsum, tensordot ---------------------------------------------------------------------------

EINSUM = [
    ("ij,jk->ik", [(2, 3), (3, 4)]),            # matrix product
    ("ij,jk", [(2, 3), (3, 4)]),                # implicit output
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 4)]),   # batch matmul
    ("bij,bkj->bik", [(2, 2, 3), (2, 4, 3)]),
    ("ij->ji", [(2, 3)]),                       # transpose
    ("ij->", [(2, 3)]),                         # full sum
    ("ijk->kj", [(2, 3, 4)]),                   # sum + transpose
    ("i,j->ij", [(2,), (3,)]),                  # outer
    ("i,i->", [(4,), (4,)]),                    # dot
    ("ij,ij->i", [(3, 4), (3, 4)]),             # row-wise dot
    ("ij,ij->ij", [(3, 4), (3, 4)]),            # Hadamard
    ("ij,kl->ijkl", [(2, 3), (2, 2)]),
    ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),  # attention scores
    ("bhqk,bhkd->bqhd", [(2, 2, 3, 5), (2, 2, 5, 4)]),
    ("ij,k->i", [(2, 3), (4,)]),                # letters summed within one operand
    ("...ij,...jk->...ik", [(5, 2, 3), (5, 3, 4)]),   # ellipsis
    ("...ij,jk", [(2, 5, 2, 3), (3, 4)]),
    ("i...->...", [(3, 2, 4)]),
    ("b...,b...->b", [(2, 3, 4), (2, 3, 4)]),
    ("...,...", [(2, 3), (3,)]),                # broadcast ellipsis
    ("i,i->i", [(1,), (3,)]),                   # a size-1 subscript broadcasts
    ("ii->i", [(3, 3)]),                        # diagonal
    ("ii", [(3, 3)]),                           # trace
    ("iij->j", [(3, 3, 2)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),  # three operands: pairwise
    ("abc,cd,ad->b", [(2, 3, 4), (4, 5), (2, 5)]),
    ("i,i,i->", [(3,), (3,), (3,)]),
    ("Ab,bC->AC", [(2, 3), (3, 2)]),            # upper-case subscripts
    (" i j , j k -> i k ", [(2, 3), (3, 4)]),   # spaces
    ("ij,jk->ik", [(0, 3), (3, 4)]),            # empty
    ("ij,jk->ik", [(2, 0), (0, 4)]),
    ("ij,jk", [(2, 3), (3, 0)]),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("eq,shapes", EINSUM)
def test_einsum(eq, shapes, dtype):
    ins = [rand(*s, seed=i, dtype=dtype) for i, s in enumerate(shapes)]
    check_op(lambda lib, *ops: lib.einsum(eq, *ops), ins, **TOL[dtype])


def test_einsum_list_operands_and_integers():
    check_op(lambda lib, a, b: lib.einsum("ij,jk->ik", [a, b]), [rand(2, 3), rand(3, 4, seed=1)],
             **F32)
    a = (rand(2, 3) * 3).astype(np.int64)
    check_op(lambda lib, a: lib.einsum("ij->j", a), [a], atol=0, rtol=0)


def test_einsum_errors():
    r = rand
    check_exception(lambda lib: lib.einsum("ij,jk->ik", lib.tensor(r(2, 3)), lib.tensor(r(4, 5))),
                    match="subscript j has size 4 for operand 1")
    check_exception(lambda lib: lib.einsum("ij,jk", lib.tensor(r(2, 3))),
                    match="fewer operands")
    check_exception(lambda lib: lib.einsum("ij->", lib.tensor(r(2, 3)), lib.tensor(r(3))),
                    match="more operands")
    check_exception(lambda lib: lib.einsum("ij->ik", lib.tensor(r(2, 3))),
                    match="output subscript k does not appear")
    check_exception(lambda lib: lib.einsum("ij->ii", lib.tensor(r(2, 2))),
                    match="appears more than once")
    check_exception(lambda lib: lib.einsum("ijk->ij", lib.tensor(r(2, 3))),
                    match="does not match the number of dimensions")
    check_exception(lambda lib: lib.einsum("i1->i", lib.tensor(r(2, 3))),
                    match="invalid subscript")
    check_exception(lambda lib: lib.einsum("ij,jk->ik", lib.tensor(r(2, 3)),
                                           lib.tensor(r(3, 4)).double()),
                    match="expected scalar type Float but found Double")


@pytest.mark.parametrize("dims,sb", [(2, (3, 4, 5)), (1, (4, 5)), (0, (2, 3)),
                                     (([1, 0], [0, 1]), (3, 2, 4)), (([2], [0]), (4, 2))])
def test_tensordot(dims, sb):
    check_op(lambda lib, a, b: lib.tensordot(a, b, dims=dims), [rand(2, 3, 4), rand(*sb, seed=1)],
             **F32)


def test_tensordot_errors():
    a, b = rand(2, 3), rand(3, 2)
    check_exception(lambda lib: lib.tensordot(lib.tensor(a), lib.tensor(b), dims=(1, 0)))
    check_exception(lambda lib: lib.tensordot(lib.tensor(a), lib.tensor(b), dims=-1),
                    match="dims >= 0")
    check_exception(lambda lib: lib.tensordot(lib.tensor(a), lib.tensor(b), dims=([0], [0])),
                    match="contracted dimensions need to match")


# -- double backward -----------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((2, 3), (3, 4)), ((5, 2, 3), (3, 4)), ((2, 3), (5, 3, 4)),
                                   ((3,), (2, 3, 4)), ((2, 1, 2, 3), (3, 3, 2))])
def test_matmul_double_backward(sa, sb):
    a, b = rand(*sa, dtype=np.float64), rand(*sb, seed=1, dtype=np.float64)
    out = np.matmul(a, b)
    w = rand(*out.shape, seed=2, dtype=np.float64)
    check_op(grad_of(lambda lib, a, b: a @ b), [a, b, w], **F64)


def test_linear_double_backward():
    x, wt, b = (rand(2, 4, 3, dtype=np.float64), rand(5, 3, seed=1, dtype=np.float64),
                rand(5, seed=2, dtype=np.float64))
    w = rand(2, 4, 5, seed=3, dtype=np.float64)
    check_op(grad_of(lambda lib, x, wt, b: F(lib).linear(x, wt, b), 3), [x, wt, b, w], **F64)


@pytest.mark.parametrize("eq,shapes", [("bij,bkj->bik", [(2, 2, 3), (2, 4, 3)]),
                                       ("ij,k->i", [(2, 3), (4,)]), ("ii->i", [(3, 3)]),
                                       ("ijk->kj", [(2, 3, 4)]),
                                       ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)])])
def test_einsum_double_backward(eq, shapes):
    ins = [rand(*s, seed=i, dtype=np.float64) for i, s in enumerate(shapes)]
    out = np.einsum(eq, *ins)
    w = rand(*out.shape, seed=9, dtype=np.float64)
    check_op(grad_of(lambda lib, *ops: lib.einsum(eq, *ops), len(ins)), ins + [w], **F64)
