"""The primitives defined in kiln.nn (fused cross-entropy, nll_loss, binary_cross_entropy,
layer_norm and their backward primitives) against PyTorch, here so that the shape-rule check of
tests/ops runs on them; first and second derivatives."""

import numpy as np
import pytest

from tests.helpers import check_op, rand, randn

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}
REDUCTIONS = ["mean", "sum", "none"]


def _second(fn, n_diff):
    """``fn``'s first derivatives w.r.t. its first ``n_diff`` inputs, differentiable again."""
    def g(lib, *xs):
        out = fn(lib, *xs)
        w = xs[-1]
        return lib.autograd.grad((out * w).sum(), xs[:n_diff], create_graph=True)
    return g


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_and_nll_loss(reduction):
    t = np.array([0, 3, -100, 2, 1])
    w = rand(4, seed=3, low=0.5, high=2, dtype=np.float64)
    x = randn(5, 4, dtype=np.float64)
    weight = rand(*((5,) if reduction == "none" else ()), seed=4, dtype=np.float64)

    def ce(lib, x, wt):
        return lib.nn.functional.cross_entropy(x, lib.tensor(t), reduction=reduction)

    def nll(lib, x, wt):
        logp = x.log_softmax(1)
        return lib.nn.functional.nll_loss(logp, lib.tensor(t), lib.tensor(w),
                                          reduction=reduction)

    for fn in (ce, nll):
        check_op(fn, [x, weight], **F64)
        check_op(_second(fn, 1), [x, weight], **F64)
    x32 = randn(6, 3)
    check_op(lambda lib, x: lib.nn.functional.cross_entropy(x, lib.tensor([0, 1, 2, 2, 1, 0]),
                                                            reduction=reduction), [x32], **F32)


def test_binary_cross_entropy():
    p = rand(2, 3, seed=1, low=0.05, high=0.95, dtype=np.float64)
    y = rand(2, 3, seed=2, low=0, high=1, dtype=np.float64)
    check_op(lambda lib, p, y: lib.nn.functional.binary_cross_entropy(p, y, reduction="none"),
             [p, y], **F64)
    # PyTorch's second derivative is a different formula: agreement to rounding, not to 1e-10
    check_op(_second(lambda lib, p, y: lib.nn.functional.binary_cross_entropy(p, y), 2),
             [p, y], atol=1e-12, rtol=1e-8)
    def zero_d(lib, p):
        return lib.nn.functional.binary_cross_entropy(p, lib.tensor(0.25, dtype=lib.float64))

    check_op(zero_d, [np.array(0.5)], **F64)


@pytest.mark.parametrize("affine", ["wb", "w", "b", ""])
def test_layer_norm(affine):
    x = randn(3, 2, 4, dtype=np.float64)
    w, b = randn(4, seed=1, dtype=np.float64), randn(4, seed=2, dtype=np.float64)
    h = randn(3, 2, 4, seed=3, dtype=np.float64)

    params = [v for k, v in (("w", w), ("b", b)) if k in affine]

    def ln(lib, x, *rest):
        ps = dict(zip([k for k in "wb" if k in affine], rest))
        return lib.nn.functional.layer_norm(x, (4,), ps.get("w"), ps.get("b"))

    check_op(ln, [x, *params, h], **F64)
    if affine != "b":  # PyTorch's double backward fails with a bias and no weight
        check_op(_second(ln, 1 + len(params)), [x, *params, h], **F64)
    check_op(lambda lib, x: lib.nn.functional.layer_norm(x, (2, 4), eps=1e-3), [randn(2, 4)],
             **F32)
    check_op(lambda lib, x: lib.nn.functional.layer_norm(x, (2, 4)), [randn(0, 2, 4)], **F32)
