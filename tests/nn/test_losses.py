"""Loss functions against torch.nn.functional and torch.nn: values and gradients of input (and
target, where PyTorch differentiates it) for every option, float32 and float64, double
backward, the module classes, and the exceptions of bad targets."""

import warnings

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, rand, randn

F32 = {"atol": 1e-6, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}
TOL = {np.float32: F32, np.float64: F64}
FLOATS = [np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]


def _t(lib, v):
    """Constant (non-differentiable) tensors built inside the compared function."""
    return None if v is None else lib.tensor(v)


def targets(shape, n_classes, seed=0, ignore=None):
    t = np.random.default_rng(seed).integers(0, n_classes, shape)
    if ignore is not None:
        t.reshape(-1)[::3] = ignore
    return t


# -- cross_entropy and nll_loss with class indices -----------------------------------------------

# (input shape, target shape); C is dim 1 (dim 0 for the unbatched (C,) input)
CLASS_SHAPES = [((6, 5), (6,)), ((5,), ()), ((5,), (1,)), ((2, 4, 3), (2, 3)),
                ((2, 3, 2, 2), (2, 2, 2)), ((0, 4), (0,))]


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shapes", CLASS_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_class_indices(dt, shapes, reduction):
    xs, ts = shapes
    c = xs[1] if len(xs) > 1 else xs[0]
    x = np.asarray(randn(*xs, dtype=dt) * 3)
    t = targets(ts, c)
    w = rand(c, seed=5, low=0.2, high=2.0, dtype=dt)
    grad = ts != (1,)  # PyTorch's backward fails for a (C,) input with a (1,) target
    kws = ({}, {"weight": w}, {"label_smoothing": 0.25}, {"weight": w, "label_smoothing": 0.1})
    for kw in kws if grad else kws[:2]:  # and so does its forward with label smoothing
        def f(lib, x, t, kw=kw):
            k = {**kw, "weight": _t(lib, kw.get("weight"))}
            return lib.nn.functional.cross_entropy(x, t, reduction=reduction, **k)
        check_op(f, [x, t], grad=grad, **TOL[dt])


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 2, 7])
def test_cross_entropy_ignore_index(dt, reduction, ignore_index):
    x = randn(9, 4, dtype=dt)
    t = targets((9,), 4, ignore=ignore_index if ignore_index != 7 else None)
    w = rand(4, seed=3, low=0.5, high=1.5, dtype=dt)
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.3}, {"weight": w, "label_smoothing": 0.2}):
        def f(lib, x, t, kw=kw):
            k = {**kw, "weight": _t(lib, kw.get("weight"))}
            return lib.nn.functional.cross_entropy(x, t, ignore_index=ignore_index,
                                                   reduction=reduction, **k)
        check_op(f, [x, t], **TOL[dt])
        if dt == np.float64:  # and with spatial dims
            x4, t4 = randn(2, 4, 3, dtype=dt), targets((2, 3), 4, ignore=ignore_index)
            check_op(f, [x4, t4], **TOL[dt])


def test_cross_entropy_every_target_ignored_and_extreme_logits():
    x = randn(4, 3)
    t = np.full(4, -100)
    for red in REDUCTIONS:  # mean of nothing: nan, as PyTorch
        check_op(lambda lib, x, t, red=red: lib.nn.functional.cross_entropy(x, t, reduction=red),
                 [x, t], grad=False, **F32)
    big = np.array([[1000.0, -1000.0, 0.0], [-50.0, 60.0, 70.0]], np.float32)
    check_op(lambda lib, x, t: lib.nn.functional.cross_entropy(x, t, reduction="none"),
             [big, np.array([1, 0])], **F32)


def test_cross_entropy_uint8_targets_and_double_backward():
    x = randn(5, 4, dtype=np.float64)
    t = targets((5,), 4).astype(np.uint8)
    check_op(lambda lib, x, t: lib.nn.functional.cross_entropy(x, t), [x, t], **F64)

    for red in REDUCTIONS:
        t = targets((6,), 4, ignore=-100)

        def grad_of(lib, x, w, red=red, t=t):
            loss = lib.nn.functional.cross_entropy(x, lib.tensor(t), reduction=red)
            (gx,) = lib.autograd.grad((loss * w).sum(), x, create_graph=True)
            return gx

        w = rand(*((6,) if red == "none" else ()), seed=2, dtype=np.float64)
        check_op(grad_of, [randn(6, 4, dtype=np.float64), w], **F64)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shapes", CLASS_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss(dt, shapes, reduction):
    xs, ts = shapes
    c = xs[1] if len(xs) > 1 else xs[0]
    x = randn(*xs, dtype=dt)
    w = rand(c, seed=5, low=0.2, high=2.0, dtype=dt)
    for ignore in (-100, 1):
        t = targets(ts, c, ignore=ignore if ts else None)
        for weight in (None, w):
            def f(lib, x, t, weight=weight, ignore=ignore):
                return lib.nn.functional.nll_loss(x, t, _t(lib, weight), ignore_index=ignore,
                                                  reduction=reduction)
            check_op(f, [x, t], grad=ts != (1,), **TOL[dt])


def test_nll_loss_double_backward():
    t = targets((5,), 3, ignore=-100)
    wt = rand(3, seed=4, low=0.5, high=2, dtype=np.float64)
    for red in REDUCTIONS:
        def grad_of(lib, x, w, red=red):
            logp = x.log_softmax(1)
            loss = lib.nn.functional.nll_loss(logp, lib.tensor(t), lib.tensor(wt), reduction=red)
            (gx,) = lib.autograd.grad((loss * w).sum(), x, create_graph=True)
            return gx

        w = rand(*((5,) if red == "none" else ()), seed=2, dtype=np.float64)
        check_op(grad_of, [randn(5, 3, dtype=np.float64), w], **F64)


# -- cross_entropy with class probabilities ------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(5, 4), (4,), (2, 3, 4), (0, 3)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probabilities(dt, shape, reduction):
    x = randn(*shape, dtype=dt)
    cdim = 1 if len(shape) > 1 else 0
    p = rand(*shape, seed=3, low=0, high=1, dtype=dt)
    p = p / np.maximum(p.sum(cdim, keepdims=True), 1e-3)
    w = rand(shape[cdim], seed=4, low=0.5, high=2, dtype=dt)
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.4}):
        def f(lib, x, p, kw=kw):
            k = {**kw, "weight": _t(lib, kw.get("weight"))}
            return lib.nn.functional.cross_entropy(x, p, reduction=reduction, **k)
        check_op(f, [x, p], **TOL[dt])


# -- regression losses ---------------------------------------------------------------------------

def _pair(shape, dt, seed=0):
    x = rand(*shape, seed=seed, dtype=dt)
    y = rand(*shape, seed=seed + 1, dtype=dt)
    if x.size > 2:  # exact ties and kinks: d = 0, |d| = 1 (beta, delta) and |d| = 0.5
        x.reshape(-1)[:3] = [0.25, 1.5, -0.5]
        y.reshape(-1)[:3] = [0.25, 0.5, 0.0]
    return x, y


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_losses(dt, shape, reduction):
    x, y = _pair(shape, dt)
    w = rand(*shape, seed=9, low=0.5, high=2, dtype=dt)
    cases = [
        lambda F, x, y: F.mse_loss(x, y, reduction=reduction),
        lambda F, x, y: F.l1_loss(x, y, reduction=reduction),
        lambda F, x, y: F.smooth_l1_loss(x, y, reduction=reduction),
        lambda F, x, y: F.smooth_l1_loss(x, y, reduction=reduction, beta=0.5),
        lambda F, x, y: F.smooth_l1_loss(x, y, reduction=reduction, beta=0.0),
        lambda F, x, y: F.smooth_l1_loss(x, y, reduction=reduction, beta=2.5),
        lambda F, x, y: F.huber_loss(x, y, reduction=reduction),
        lambda F, x, y: F.huber_loss(x, y, reduction=reduction, delta=0.5),
        lambda F, x, y: F.huber_loss(x, y, reduction=reduction, delta=3.0),
    ]
    for case in cases:
        check_op(lambda lib, x, y, case=case: case(lib.nn.functional, x, y), [x, y], **TOL[dt])
    for name in ("mse_loss", "l1_loss", "huber_loss"):  # elementwise weights
        def f(lib, x, y, name=name):
            return getattr(lib.nn.functional, name)(x, y, reduction=reduction,
                                                    weight=lib.tensor(w))
        check_op(f, [x, y], **TOL[dt])


def test_regression_losses_broadcast_with_a_warning():
    x, y = rand(3, 1), rand(4, seed=1)
    for name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"):
        with pytest.warns(UserWarning, match="target size"):
            check_op(lambda lib, x, y, name=name: getattr(lib.nn.functional, name)(x, y),
                     [x, y], **F32)
    # an integer target is promoted to the input's dtype
    check_op(lambda lib, x: lib.nn.functional.mse_loss(x, lib.tensor([1, 2, 3])),
             [rand(3)], **F32)


def test_regression_double_backward():
    for name in ("mse_loss", "smooth_l1_loss", "huber_loss"):
        def grad_of(lib, x, y, name=name):
            loss = getattr(lib.nn.functional, name)(x, y)
            (gx,) = lib.autograd.grad(loss, x, create_graph=True)
            return gx * gx
        check_op(grad_of, list(_pair((6,), np.float64)), **F64)


# -- binary cross-entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(), (6,), (3, 4), (0, 2)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy(dt, shape, reduction):
    p = rand(*shape, seed=1, low=0.02, high=0.98, dtype=dt)
    y = rand(*shape, seed=2, low=0, high=1, dtype=dt)
    w = rand(*shape[1:], seed=3, low=0.5, high=2, dtype=dt)
    for weight in (None, w):
        def f(lib, p, y, weight=weight):
            return lib.nn.functional.binary_cross_entropy(p, y, _t(lib, weight),
                                                          reduction=reduction)
        check_op(f, [p, y], **TOL[dt])


def test_binary_cross_entropy_at_zero_and_one():
    # log clamped at -100 and the gradient's denominator clamped at 1e-12, as PyTorch
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.5], np.float64)
    y = np.array([0.0, 1.0, 1.0, 0.0, 0.5], np.float64)
    check_op(lambda lib, p, y: lib.nn.functional.binary_cross_entropy(p, y, reduction="none"),
             [p, y], grad=False, **F64)
    check_op(lambda lib, p: lib.nn.functional.binary_cross_entropy(p, lib.tensor(y)), [p],
             **F64)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(), (6,), (3, 4), (0, 4)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_logits(dt, shape, reduction):
    x = np.asarray(randn(*shape, seed=1, dtype=dt) * 4)
    if x.size > 2:
        x.reshape(-1)[:2] = [60.0, -60.0]  # saturated logits stay finite
    y = rand(*shape, seed=2, low=0, high=1, dtype=dt)
    w = rand(*shape, seed=3, low=0.5, high=2, dtype=dt)
    pw = rand(*shape[-1:], seed=4, low=0.5, high=3, dtype=dt)
    for weight, pos_weight in ((None, None), (w, None), (None, pw), (w, pw)):
        def f(lib, x, y, weight=weight, pos_weight=pos_weight):
            return lib.nn.functional.binary_cross_entropy_with_logits(
                x, y, _t(lib, weight), reduction=reduction, pos_weight=_t(lib, pos_weight))
        check_op(f, [x, y], **TOL[dt])


def test_binary_cross_entropy_double_backward():
    def grad_of(lib, p, y):
        loss = lib.nn.functional.binary_cross_entropy(p, y)
        (gp,) = lib.autograd.grad(loss, p, create_graph=True)
        return gp

    p = rand(5, seed=1, low=0.1, high=0.9, dtype=np.float64)
    check_op(grad_of, [p, rand(5, seed=2, low=0, high=1, dtype=np.float64)], **F64)

    def grad_of_logits(lib, x, y):
        loss = lib.nn.functional.binary_cross_entropy_with_logits(x, y)
        (gx,) = lib.autograd.grad(loss, x, create_graph=True)
        return gx

    check_op(grad_of_logits, [randn(5, dtype=np.float64), rand(5, seed=2, low=0, high=1,
                                                                 dtype=np.float64)], **F64)


# -- module classes ------------------------------------------------------------------------------

def _module_cases():
    w3 = rand(3, seed=7, low=0.5, high=2)
    c3, t3 = randn(5, 3), targets((5,), 3, ignore=-100)
    p, y = rand(5, 3, seed=1, low=0.05, high=0.95), rand(5, 3, seed=2, low=0, high=1)
    a, b = _pair((5, 3), np.float32)
    return [
        ("CrossEntropyLoss", {}, c3, t3),
        ("CrossEntropyLoss", {"weight": w3, "label_smoothing": 0.1, "reduction": "sum"}, c3, t3),
        ("CrossEntropyLoss", {"ignore_index": 1, "reduction": "none"}, c3,
         targets((5,), 3, ignore=1)),
        ("NLLLoss", {"weight": w3}, c3, t3),
        ("NLLLoss", {"reduction": "none"}, c3, t3),
        ("MSELoss", {}, a, b), ("MSELoss", {"reduction": "sum"}, a, b),
        ("L1Loss", {"reduction": "none"}, a, b),
        ("SmoothL1Loss", {"beta": 0.5}, a, b), ("HuberLoss", {"delta": 0.5}, a, b),
        ("BCELoss", {"weight": w3}, p, y),
        ("BCEWithLogitsLoss", {"pos_weight": w3, "reduction": "sum"}, a, y),
        ("BCEWithLogitsLoss", {"weight": w3}, a, y),
    ]


@pytest.mark.parametrize("case", _module_cases(), ids=lambda c: f"{c[0]}{sorted(c[1])}")
def test_loss_modules(case):
    name, kw, x, t = case

    def make(lib):
        k = {key: (lib.tensor(v) if isinstance(v, np.ndarray) else v) for key, v in kw.items()}
        return getattr(lib.nn, name)(**k)

    km, tm = make(kiln), make(torch)
    assert km.reduction == tm.reduction
    assert sorted(km.state_dict()) == sorted(tm.state_dict())
    check_op(lambda lib, x, t: (km if lib is kiln else tm)(x, t), [x, t], **F32)


def test_legacy_size_average_and_reduce():
    x, y = _pair((4,), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sa, rd in ((False, None), (None, False), (True, True)):
            def f(lib, x, y, sa=sa, rd=rd):
                return lib.nn.functional.mse_loss(x, y, size_average=sa, reduce=rd)
            check_op(f, [x, y], **F32)
            assert kiln.nn.L1Loss(sa, rd).reduction == torch.nn.L1Loss(sa, rd).reduction


def test_invalid_reduction_is_rejected_when_called():
    km, tm = kiln.nn.MSELoss(reduction="bad"), torch.nn.MSELoss(reduction="bad")
    x = rand(3)
    check_exception(lambda lib: (km if lib is kiln else tm)(lib.tensor(x), lib.tensor(x)),
                    match="not a valid value for reduction")


# -- errors --------------------------------------------------------------------------------------

def _ce(lib, x, t, **kw):
    return lib.nn.functional.cross_entropy(lib.tensor(x), lib.tensor(t), **kw)


def _nll(lib, x, t, **kw):
    return lib.nn.functional.nll_loss(lib.tensor(x), lib.tensor(t), **kw)


X = randn(4, 3)
T = np.array([0, 1, 2, 0])

ERRORS = [
    # (fn, message) -- the exception class must be PyTorch's
    (lambda lib: _ce(lib, X, T.astype(np.int32)), "Long or Byte"),
    (lambda lib: _ce(lib, X, T.astype(bool)), "Long or Byte"),
    (lambda lib: _ce(lib, X, np.array([0, 1, 3, 0])), "out of bounds"),
    (lambda lib: _ce(lib, X, np.array([0, -1, 2, 0])), "out of bounds"),
    (lambda lib: _ce(lib, X, np.array([0, 1, 2])), "batch_size"),
    (lambda lib: _ce(lib, X, np.array([[0, 1, 2, 0]])), "batch_size"),
    (lambda lib: _ce(lib, X, np.array(1)), "batch_size"),
    (lambda lib: _ce(lib, X, rand(4, 2)), "multi-target"),
    (lambda lib: _ce(lib, X, rand(3)), "batch_size"),
    (lambda lib: _ce(lib, randn(3), np.array([1, 2])), "1D target must have size 1"),
    (lambda lib: _ce(lib, randn(2, 3, 4), np.zeros((2, 5), np.int64)), "target size"),
    (lambda lib: _ce(lib, randn(2, 3, 4), np.zeros(2, np.int64)), "target size"),
    (lambda lib: _ce(lib, np.array(1.0, np.float32), np.array(0)), "floating point"),
    (lambda lib: _ce(lib, np.array(1.0, np.float32), np.array([0])), "range"),
    (lambda lib: _ce(lib, X, np.ones((4, 3), np.int64)), "floating point"),
    (lambda lib: _ce(lib, X, rand(4, 3), ignore_index=1), "ignore_index"),
    (lambda lib: _ce(lib, X, T, reduction="bad"), "valid value for reduction"),
    (lambda lib: _ce(lib, X, T, label_smoothing=1.5), "label_smoothing"),
    (lambda lib: _ce(lib, X, T, weight=lib.ones(2)), "weight tensor"),
    (lambda lib: _ce(lib, X, T, weight=lib.ones(1, 3)), "weight tensor"),
    (lambda lib: _ce(lib, X, rand(4, 3), weight=lib.ones(2)), "weight tensor"),
    (lambda lib: _ce(lib, X, T, weight=lib.ones(3, dtype=lib.float64)), "Float"),
    (lambda lib: _ce(lib, np.ones((4, 3), np.int64), T), "not implemented"),
    (lambda lib: _nll(lib, X, np.array([0, 1, 2])), "batch_size"),
    (lambda lib: _nll(lib, X, rand(4)), "Long or Byte"),
    (lambda lib: _nll(lib, np.array(1.0, np.float32), np.array(0)), "dimensions"),
    (lambda lib: _nll(lib, X, np.array([0, 1, 3, 0])), "out of bounds"),
    (lambda lib: _nll(lib, randn(2, 3, 4), rand(2, 4)), "Long or Byte"),
    (lambda lib: lib.nn.functional.mse_loss(lib.ones(3), lib.ones(2)), "size"),
    (lambda lib: lib.nn.functional.mse_loss(lib.ones(3, dtype=lib.int64),
                                            lib.ones(3, dtype=lib.int64)), "not implemented"),
    (lambda lib: lib.nn.functional.l1_loss(lib.ones(3, dtype=lib.int64),
                                           lib.ones(3, dtype=lib.int64)), "dtype"),
    (lambda lib: lib.nn.functional.huber_loss(lib.ones(3, dtype=lib.int64),
                                              lib.ones(3, dtype=lib.int64)), "not implemented"),
    (lambda lib: lib.nn.functional.smooth_l1_loss(lib.ones(3), lib.ones(3), beta=-1.0), "beta"),
    (lambda lib: lib.nn.functional.huber_loss(lib.ones(3), lib.ones(3), delta=0.0), "delta"),
    (lambda lib: lib.nn.functional.binary_cross_entropy(lib.tensor([1.5]), lib.tensor([1.0])),
     "between 0 and 1"),
    (lambda lib: lib.nn.functional.binary_cross_entropy(lib.tensor([float("nan")]),
                                                        lib.tensor([1.0])), "between 0 and 1"),
    (lambda lib: lib.nn.functional.binary_cross_entropy(lib.ones(3) / 2, lib.ones(2)), "size"),
    (lambda lib: lib.nn.functional.binary_cross_entropy(lib.ones(3) / 2,
                                                        lib.ones(3, dtype=lib.int64)), "dtype"),
    (lambda lib: lib.nn.functional.binary_cross_entropy(lib.ones(2, 3) / 2, lib.ones(2, 3) / 2,
                                                        weight=lib.ones(2)), "size"),
    (lambda lib: lib.nn.functional.binary_cross_entropy_with_logits(lib.ones(3, 1), lib.ones(3)),
     "size"),
    (lambda lib: lib.nn.functional.binary_cross_entropy_with_logits(
        lib.ones(3), lib.ones(3, dtype=lib.int64)), "cast"),
    (lambda lib: lib.nn.functional.binary_cross_entropy_with_logits(
        lib.ones(2, 3), lib.ones(2, 3), pos_weight=lib.ones(2)), "size"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    fn, match = ERRORS[i]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_exception(fn, match=match)
