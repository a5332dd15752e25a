"""batch_norm, layer_norm and group_norm (functional and modules) against PyTorch: outputs,
input and parameter gradients, running statistics over several steps, state_dict keys, double
backward, and the errors of bad shapes and dtypes."""

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, check_op, randn

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}
TOL = {np.float32: F32, np.float64: F64}
FLOATS = [np.float32, np.float64]


# -- layer_norm ----------------------------------------------------------------------------------

LN_CASES = [((4, 6), (6,)), ((2, 3, 5), (5,)), ((2, 3, 5), (3, 5)), ((7,), (7,)),
            ((0, 4), (4,)), ((2, 0), (0,)), ((2, 3, 4, 2), (4, 2))]


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("case", LN_CASES, ids=str)
def test_layer_norm(dt, case):
    shape, ns = case
    x = randn(*shape, dtype=dt) * 2 + 0.5
    w, b = randn(*ns, seed=1, dtype=dt), randn(*ns, seed=2, dtype=dt)
    check_op(lambda lib, x, w, b: lib.nn.functional.layer_norm(x, ns, w, b, 1e-5), [x, w, b],
             **TOL[dt])
    check_op(lambda lib, x: lib.nn.functional.layer_norm(x, ns, eps=0.1), [x], **TOL[dt])
    check_op(lambda lib, x, w: lib.nn.functional.layer_norm(x, ns, w), [x, w], **TOL[dt])
    check_op(lambda lib, x, b: lib.nn.functional.layer_norm(x, ns, None, b), [x, b], **TOL[dt])


def test_layer_norm_constant_rows_and_non_contiguous_input():
    x = np.ones((3, 4), np.float32)  # zero variance: the output is 0, the gradient finite
    check_op(lambda lib, x: lib.nn.functional.layer_norm(x, (4,)), [x], **F32)
    x = randn(4, 3, 5)
    check_op(lambda lib, x: lib.nn.functional.layer_norm(x.transpose(0, 2), (4,)), [x], **F32)


def test_layer_norm_double_backward():
    def grads(lib, x, w, b, h):
        y = lib.nn.functional.layer_norm(x, (2, 3), w, b)
        return lib.autograd.grad((y * h).sum(), (x, w, b), create_graph=True)

    x, h = randn(4, 2, 3, dtype=np.float64), randn(4, 2, 3, seed=3, dtype=np.float64)
    w, b = randn(2, 3, seed=1, dtype=np.float64), randn(2, 3, seed=2, dtype=np.float64)
    check_op(grads, [x, w, b, h], **F64)

    def grads_plain(lib, x, h):
        y = lib.nn.functional.layer_norm(x, (3,))
        return lib.autograd.grad((y * h).sum(), x, create_graph=True)

    check_op(grads_plain, [randn(5, 3, dtype=np.float64), randn(5, 3, seed=1,
                                                                 dtype=np.float64)], **F64)


@pytest.mark.parametrize("kw", [{}, {"elementwise_affine": False}, {"bias": False},
                                {"eps": 1e-3}], ids=str)
def test_layer_norm_module(kw):
    tm, km = torch.nn.LayerNorm((3, 4), **kw), kiln.nn.LayerNorm((3, 4), **kw)
    assert list(km.state_dict()) == list(tm.state_dict())
    assert repr(km) == repr(tm)
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.randn(p.shape))
    km.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    check_module(km, tm, [randn(2, 3, 4)], F32)


def check_module(km, tm, inputs, tol):
    check_op(lambda lib, *xs: (km if lib is kiln else tm)(*xs), inputs, **tol)
    for (name, kp), (_, tp) in zip(km.named_parameters(), tm.named_parameters()):
        np.testing.assert_allclose(kp.grad.detach().numpy(), tp.grad.numpy(), err_msg=name,
                                   **tol)
        kp.grad, tp.grad = None, None


# -- group_norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 5), 3), ((3, 4), 2), ((2, 4, 3, 3), 4),
                                          ((2, 6), 6), ((2, 4, 3), 1)], ids=str)
def test_group_norm(dt, shape, groups):
    x = randn(*shape, dtype=dt)
    w, b = randn(shape[1], seed=1, dtype=dt), randn(shape[1], seed=2, dtype=dt)
    # groups of one element: PyTorch's gradient is rounding noise around 0 there
    grad = np.prod(shape[1:]) > groups
    check_op(lambda lib, x, w, b: lib.nn.functional.group_norm(x, groups, w, b), [x, w, b],
             grad=grad, **TOL[dt])
    check_op(lambda lib, x: lib.nn.functional.group_norm(x, groups, eps=0.01), [x], grad=grad,
             **TOL[dt])


@pytest.mark.parametrize("affine,bias", [(True, True), (False, True), (True, False)])
def test_group_norm_module(affine, bias):
    tm = torch.nn.GroupNorm(2, 6, affine=affine, bias=bias)
    km = kiln.nn.GroupNorm(2, 6, affine=affine, bias=bias)
    assert repr(km) == repr(tm)
    assert list(km.state_dict()) == list(tm.state_dict())
    if affine:
        with torch.no_grad():
            for p in tm.parameters():
                p.copy_(torch.randn(p.shape))
        km.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    check_module(km, tm, [randn(3, 6, 4)], F32)


# -- batch_norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 4)], ids=str)
def test_batch_norm_functional(dt, shape):
    x = randn(*shape, dtype=dt) * 3 + 1
    w, b = randn(3, seed=1, dtype=dt), randn(3, seed=2, dtype=dt)
    rm, rv = randn(3, seed=3, dtype=dt), np.abs(randn(3, seed=4, dtype=dt)) + 0.5
    for training in (True, False):
        stats = {}

        def f(lib, x, w, b, training=training, stats=stats):
            m, v = lib.tensor(rm), lib.tensor(rv)
            out = lib.nn.functional.batch_norm(x, m, v, w, b, training=training, momentum=0.3)
            stats[lib] = (m.numpy(), v.numpy())
            return out

        check_op(f, [x, w, b], **TOL[dt])
        for a, c in zip(stats[kiln], stats[torch]):
            np.testing.assert_allclose(a, c, **TOL[dt])
    check_op(lambda lib, x: lib.nn.functional.batch_norm(x, None, None, training=True), [x],
             **TOL[dt])


BN_CONFIGS = [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
              {"momentum": 0.5, "eps": 1e-3}, {"bias": False}]


@pytest.mark.parametrize("cfg", BN_CONFIGS, ids=str)
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)),
                                       ("BatchNorm2d", (2, 3, 4, 3))], ids=str)
def test_batch_norm_modules(cfg, cls, shape):
    torch.manual_seed(0)
    tm, km = getattr(torch.nn, cls)(3, **cfg), getattr(kiln.nn, cls)(3, **cfg)
    assert list(km.state_dict()) == list(tm.state_dict())
    assert repr(km) == repr(tm)
    if tm.affine:
        with torch.no_grad():
            for p in tm.parameters():
                p.copy_(torch.randn(p.shape))
    km.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    for step in range(3):  # train steps: batch statistics, running stats updated
        check_module(km, tm, [randn(*shape, seed=step) * (step + 1) + step], F32)
        for (name, kb), (_, tb) in zip(km.named_buffers(), tm.named_buffers()):
            np.testing.assert_allclose(kb.numpy(), tb.numpy(), err_msg=name, **F32)
    km.eval()
    tm.eval()
    check_module(km, tm, [randn(*shape, seed=9)], F32)
    if tm.track_running_stats:  # one sample: fine in eval mode with running statistics
        x1 = randn(1, *shape[1:])
        check_op(lambda lib, x: (km if lib is kiln else tm)(x), [x1], grad=False, **F32)


def test_batch_norm_double_backward():
    def grads(lib, x, w):
        y = lib.nn.functional.batch_norm(x, None, None, w, None, training=True)
        return lib.autograd.grad((y * y * y).sum(), (x, w), create_graph=True)

    check_op(grads, [randn(5, 3, 2, dtype=np.float64), randn(3, seed=1, dtype=np.float64)],
             **F64)


# -- errors --------------------------------------------------------------------------------------

ERRORS = [
    (lambda lib: lib.nn.functional.layer_norm(lib.ones(2, 3), (4,)), "normalized_shape"),
    (lambda lib: lib.nn.functional.layer_norm(lib.ones(2, 3), (3,), lib.ones(4)), "weight"),
    (lambda lib: lib.nn.functional.layer_norm(lib.ones(2, 3), ()), "normalized_shape"),
    (lambda lib: lib.nn.functional.layer_norm(lib.ones(2, 3, dtype=lib.int64), (3,)),
     "not implemented"),
    (lambda lib: lib.nn.functional.layer_norm(lib.ones(2, 3, dtype=lib.float64), (3,),
                                              lib.ones(3)), "mixed dtype"),
    (lambda lib: lib.nn.functional.group_norm(lib.ones(2, 6, 3), 4), "divisible"),
    (lambda lib: lib.nn.functional.group_norm(lib.ones(6), 3), "at least 2 dimensions"),
    (lambda lib: lib.nn.functional.group_norm(lib.ones(2, 6, 3), 3, lib.ones(5)), "weight"),
    (lambda lib: lib.nn.GroupNorm(4, 6), "divisible"),
    (lambda lib: lib.nn.GroupNorm(3, 6)(lib.ones(2, 9)), r"\[2, 9\]"),
    (lambda lib: lib.nn.functional.batch_norm(lib.ones(1, 3), lib.zeros(3), lib.ones(3),
                                              training=True), "more than 1 value"),
    (lambda lib: lib.nn.functional.batch_norm(lib.ones(4, 3), lib.zeros(2), lib.ones(3),
                                              training=True), "running_mean"),
    (lambda lib: lib.nn.functional.batch_norm(lib.ones(4, 3), None, None), "must be defined"),
    (lambda lib: lib.nn.functional.batch_norm(lib.ones(4, 3, dtype=lib.int64), lib.zeros(3),
                                              lib.ones(3), training=True), "not implemented"),
    (lambda lib: lib.nn.functional.batch_norm(lib.ones(4, 3, dtype=lib.float64), lib.zeros(3),
                                              lib.ones(3), training=True), "mixed dtype"),
    (lambda lib: lib.nn.BatchNorm1d(3)(lib.ones(2, 3, 4, 5)), "2D or 3D"),
    (lambda lib: lib.nn.BatchNorm2d(3)(lib.ones(3, 4, 5)), "4D"),
    (lambda lib: lib.nn.BatchNorm1d(3)(lib.ones(2, 4)), r"\[2, 4\]"),
    (lambda lib: lib.nn.BatchNorm1d(3)(lib.ones(1, 3)), "more than 1 value"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    fn, match = ERRORS[i]
    check_exception(fn, match=match)
