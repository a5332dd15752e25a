"""Convolutions, pooling and dropout against PyTorch: conv1d/conv2d over a grid of stride,
padding, dilation and groups (both im2col layouts), transposed convolutions with output_padding,
max/avg/adaptive pools with padding, ceil_mode and count_include_pad, ties and NaNs in max pools,
double backward, the errors for bad shapes, and dropout's statistics.

Tolerances: float32 convolutions here contract at most C*kh*kw = 72 products of values <= 2 and
the weight gradient sums over N*Ho*Wo positions (<= ~300), so 1e-4 absolute and relative; float64
1e-11.  Max pools pick values, so they are compared exactly."""

import numpy as np
import pytest
import torch

import kiln
from kiln.ops import conv as conv_mod
from tests.helpers import check_exception, check_op, mark_checked, rand

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")

F32 = {"atol": 1e-4, "rtol": 1e-4}
F64 = {"atol": 1e-11, "rtol": 1e-11}
TOL = {np.float32: F32, np.float64: F64}
EXACT = {"atol": 0, "rtol": 0}


def F(lib):
    return torch.nn.functional if lib is torch else kiln


def grad_of(fn, n_inputs):
    """The gradient of ``fn`` with respect to its inputs (weighted by ``w``), as a
    differentiable function: check_op on it compares second derivatives with PyTorch."""
    def g(lib, *args):
        ins, w = args[:n_inputs], args[n_inputs]
        return lib.autograd.grad((fn(lib, *ins) * w).sum(), ins, create_graph=True)

    return g


@pytest.fixture(params=["rows", "planes"])
def layout(request, monkeypatch):
    """Run a test with each im2col layout forced (grouped convolutions always use planes)."""
    rows = request.param == "rows"
    monkeypatch.setattr(conv_mod, "_rows_layout", lambda C, kw, Wo, groups: rows and groups == 1)
    return request.param


# -- conv2d --------------------------------------------------------------------------------------

CONV2D = [  # (C_in, C_out, H, W, kernel, kwargs)
    (3, 4, 7, 6, (3, 3), {}),
    (3, 4, 7, 6, (3, 2), {"padding": 1}),
    (3, 4, 7, 6, (3, 3), {"padding": (2, 0)}),
    (3, 4, 8, 9, (3, 3), {"stride": 2}),
    (3, 4, 8, 9, (3, 3), {"stride": (2, 3), "padding": 1}),
    (3, 4, 9, 8, (2, 3), {"dilation": 2}),
    (3, 4, 9, 8, (3, 3), {"dilation": (2, 1), "padding": (2, 1), "stride": 2}),
    (4, 6, 7, 7, (3, 3), {"groups": 2}),
    (4, 4, 7, 7, (3, 3), {"groups": 4, "padding": 1}),          # depthwise
    (6, 3, 8, 7, (2, 2), {"groups": 3, "stride": 2, "dilation": 2}),
    (3, 4, 7, 6, (3, 3), {"padding": "same"}),
    (3, 4, 7, 6, (2, 4), {"padding": "same"}),                  # odd total: extra at the end
    (3, 4, 9, 9, (2, 3), {"padding": "same", "dilation": (3, 2)}),
    (3, 4, 7, 6, (3, 3), {"padding": "valid"}),
    (1, 2, 5, 5, (5, 5), {}),                                    # kernel == input
    (2, 3, 4, 4, (1, 1), {}),                                    # 1x1
    (2, 3, 6, 6, (2, 2), {"stride": 3}),                         # stride > kernel: gaps
]


@pytest.mark.parametrize("cin,cout,H,W,k,kw", CONV2D)
def test_conv2d(cin, cout, H, W, k, kw, layout):
    g = kw.get("groups", 1)
    x, w, b = rand(2, cin, H, W), rand(cout, cin // g, *k, seed=1), rand(cout, seed=2)
    check_op(lambda lib, x, w, b: F(lib).conv2d(x, w, b, **kw), [x, w, b], **F32)


@pytest.mark.parametrize("cin,cout,H,W,k,kw", CONV2D[::4])
def test_conv2d_float64_no_bias(cin, cout, H, W, k, kw, layout):
    g = kw.get("groups", 1)
    x = rand(2, cin, H, W, dtype=np.float64)
    w = rand(cout, cin // g, *k, seed=1, dtype=np.float64)
    check_op(lambda lib, x, w: F(lib).conv2d(x, w, **kw), [x, w], **F64)


def test_conv2d_unbatched_empty_integer():
    check_op(lambda lib, x, w: F(lib).conv2d(x, w, padding=1), [rand(3, 5, 5),
                                                                rand(2, 3, 3, 3, seed=1)], **F32)
    check_op(lambda lib, x, w: F(lib).conv2d(x, w), [rand(0, 3, 5, 5), rand(2, 3, 3, 3, seed=1)],
             **F32)
    x = (rand(1, 2, 5, 5) * 3).astype(np.int64)
    w = (rand(3, 2, 2, 2, seed=1) * 3).astype(np.int64)
    check_op(lambda lib, x, w: F(lib).conv2d(x, w, stride=2), [x, w], **EXACT)


def test_conv2d_lenet_shapes():
    """The benchmark's shapes (smaller batch): 1 -> 16 channels on 28x28, 16 -> 32 on 14x14."""
    check_op(lambda lib, x, w, b: F(lib).conv2d(x, w, b, padding=2),
             [rand(4, 1, 28, 28), rand(16, 1, 5, 5, seed=1), rand(16, seed=2)], **F32)
    check_op(lambda lib, x, w, b: F(lib).conv2d(x, w, b, padding=2),
             [rand(4, 16, 14, 14), rand(32, 16, 5, 5, seed=1) * 0.2, rand(32, seed=2)],
             atol=2e-4, rtol=1e-4)


def test_conv2d_keeps_float32():
    x = kiln.tensor(rand(2, 3, 6, 6), requires_grad=True)
    w = kiln.tensor(rand(4, 3, 3, 3, seed=1), requires_grad=True)
    y = kiln.conv2d(x, w, padding=1)
    y.sum().backward()
    assert {y.dtype, x.grad.dtype, w.grad.dtype} == {kiln.float32}


ROW_UNFOLD = [  # stride 1 along H: the row-unfold correlation (rows layout), incl. W stride
    (3, 4, 7, 9, (3, 3), {"stride": (1, 2), "padding": 1}),
    (3, 4, 7, 9, (2, 3), {"stride": (1, 3), "dilation": (2, 2), "padding": (1, 2)}),
    (5, 2, 6, 6, (1, 4), {"padding": (0, 3)}),
]


@pytest.mark.parametrize("cin,cout,H,W,k,kw", ROW_UNFOLD)
def test_conv2d_row_unfold(cin, cout, H, W, k, kw, monkeypatch):
    monkeypatch.setattr(conv_mod, "_rows_layout", lambda C, kw, Wo, groups: groups == 1)
    x, w, b = rand(2, cin, H, W), rand(cout, cin, *k, seed=1), rand(cout, seed=2)
    check_op(lambda lib, x, w, b: F(lib).conv2d(x, w, b, **kw), [x, w, b], **F32)


def test_conv2d_lenet_runs_row_unfold(monkeypatch):
    """The second LeNet conv: forward and input gradient both run the row-unfold correlation
    (the input gradient as a full correlation with the flipped kernel, no col2im)."""
    calls = []
    real = conv_mod._corr_rows
    monkeypatch.setattr(conv_mod, "_corr_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(conv_mod, "_direct", lambda *a: None)  # not kiln.jit.conv_direct
    x = kiln.tensor(rand(2, 16, 14, 14), requires_grad=True)
    w = kiln.tensor(rand(32, 16, 5, 5, seed=1), requires_grad=True)
    kiln.conv2d(x, w, padding=2).sum().backward()
    assert len(calls) == 2


# -- conv1d --------------------------------------------------------------------------------------

CONV1D = [
    (3, 4, 9, 3, {}),
    (3, 4, 9, 3, {"padding": 2, "stride": 2}),
    (3, 4, 11, 2, {"dilation": 3, "padding": 1}),
    (4, 6, 9, 3, {"groups": 2}),
    (3, 4, 9, 4, {"padding": "same"}),
    (3, 4, 9, 3, {"padding": "valid", "stride": 3}),
]


@pytest.mark.parametrize("cin,cout,L,k,kw", CONV1D)
def test_conv1d(cin, cout, L, k, kw, layout):
    g = kw.get("groups", 1)
    x, w, b = rand(2, cin, L), rand(cout, cin // g, k, seed=1), rand(cout, seed=2)
    check_op(lambda lib, x, w, b: F(lib).conv1d(x, w, b, **kw), [x, w, b], **F32)
    check_op(lambda lib, x, w: F(lib).conv1d(x, w, **kw), [x[0], w], **F32)  # unbatched


# -- transposed convolutions ---------------------------------------------------------------------

CONVT2D = [  # (C_in, C_out / groups, H, W, kernel, kwargs)
    (4, 3, 4, 5, (3, 3), {}),
    (4, 3, 4, 5, (3, 2), {"stride": 2}),
    (4, 3, 4, 5, (3, 3), {"stride": 2, "padding": 1, "output_padding": 1}),
    (4, 3, 4, 5, (3, 3), {"stride": (3, 2), "padding": (1, 0), "output_padding": (2, 1)}),
    (4, 3, 4, 5, (2, 3), {"stride": 3, "dilation": 2, "output_padding": 2}),
    (4, 3, 4, 5, (3, 3), {"dilation": 2, "output_padding": 1}),  # output_padding < dilation
    (4, 2, 4, 5, (3, 3), {"groups": 2, "stride": 2, "padding": 1}),
    (4, 1, 3, 3, (4, 4), {"groups": 4, "stride": 2, "padding": 1}),
    (4, 3, 8, 9, (3, 3), {"padding": (3, 1)}),   # crop beyond the kernel: negative correlation pad
    (4, 3, 6, 7, (3, 2), {"dilation": (1, 2), "padding": (2, 0)}),
]


@pytest.mark.parametrize("cin,cout,H,W,k,kw", CONVT2D)
def test_conv_transpose2d(cin, cout, H, W, k, kw, layout):
    g = kw.get("groups", 1)
    x, w, b = rand(2, cin, H, W), rand(cin, cout, *k, seed=1), rand(cout * g, seed=2)
    check_op(lambda lib, x, w, b: F(lib).conv_transpose2d(x, w, b, **kw), [x, w, b], **F32)
    check_op(lambda lib, x, w: F(lib).conv_transpose2d(x, w, **kw), [x[0], w], **F32)


def test_conv_transpose2d_float64():
    x, w = rand(2, 3, 4, 4, dtype=np.float64), rand(3, 2, 3, 3, seed=1, dtype=np.float64)
    check_op(lambda lib, x, w: F(lib).conv_transpose2d(x, w, stride=2, output_padding=1),
             [x, w], **F64)


@pytest.mark.parametrize("kw", [{}, {"stride": 2, "padding": 1, "output_padding": 1},
                                {"dilation": 2, "groups": 2}])
def test_conv_transpose1d(kw):
    x, w, b = rand(2, 4, 6), rand(4, 3, 3, seed=1), rand(3 * kw.get("groups", 1), seed=2)
    check_op(lambda lib, x, w, b: F(lib).conv_transpose1d(x, w, b, **kw), [x, w, b], **F32)


# -- double backward -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"padding": 1}, {"stride": 2, "padding": (1, 0)},
                                {"stride": 2, "dilation": 2}, {"groups": 2, "padding": 1}])
def test_conv2d_double_backward(kw, layout):
    x = rand(2, 4, 6, 7, dtype=np.float64)
    w = rand(4, 4 // kw.get("groups", 1), 3, 3, seed=1, dtype=np.float64)
    b = rand(4, seed=2, dtype=np.float64)
    out = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), **kw)
    gw = rand(*out.shape, seed=3, dtype=np.float64)
    check_op(grad_of(lambda lib, x, w, b: F(lib).conv2d(x, w, b, **kw), 3), [x, w, b, gw], **F64)


def test_conv_transpose2d_double_backward():
    x, w = rand(2, 3, 4, 4, dtype=np.float64), rand(3, 2, 3, 3, seed=1, dtype=np.float64)
    kw = {"stride": 2, "padding": 1, "output_padding": 1}
    gw = rand(2, 2, 8, 8, seed=3, dtype=np.float64)
    check_op(grad_of(lambda lib, x, w: F(lib).conv_transpose2d(x, w, **kw), 2), [x, w, gw], **F64)


# -- convolution errors --------------------------------------------------------------------------

def _conv_err(shape_x, shape_w, match=None, op="conv2d", **kw):
    return check_exception(lambda lib: getattr(F(lib), op)(lib.tensor(rand(*shape_x)),
                                                           lib.tensor(rand(*shape_w)), **kw),
                           match=match)


def test_conv_errors():
    e = _conv_err((1, 3, 8, 8), (4, 2, 3, 3))
    assert "expected input[1, 3, 8, 8] to have 2 channels, but got 3 channels" in str(e)
    _conv_err((3, 8), (4, 3, 3, 3), match="Expected 3D .unbatched. or 4D .batched. input to conv2d")
    _conv_err((1, 3, 4, 4), (4, 3, 5, 5), match="Kernel size can't be greater")
    _conv_err((1, 3, 4, 4), (4, 3, 3, 3), dilation=2, match="Kernel size can't be greater")
    _conv_err((1, 4, 8, 8), (4, 2, 3, 3), groups=3, match="divisible by 3")
    _conv_err((1, 3, 8, 8), (4, 3, 3, 3), stride=2, padding="same",
              match="not supported for strided")
    _conv_err((1, 3, 8, 8), (4, 3, 3, 3), padding="foo", match="Invalid padding string")
    _conv_err((1, 3, 8, 8), (4, 3, 3, 3), padding=-1, match="negative padding")
    _conv_err((1, 3, 8, 8), (4, 3, 3, 3), stride=0, match="non-positive stride")
    _conv_err((1, 3, 8), (4, 2, 3), op="conv1d", match="to have 2 channels, but got 3")
    _conv_err((1, 3, 8, 8), (4, 3, 3), op="conv1d", match="input to conv1d")
    _conv_err((1, 3, 8, 8), (4, 2, 3, 3), op="conv_transpose2d",
              match="to have 4 channels, but got 3")
    _conv_err((1, 3, 8, 8), (3, 2, 3, 3), op="conv_transpose2d", stride=2, output_padding=2,
              match="output padding must be smaller")
    check_exception(lambda lib: F(lib).conv2d(lib.tensor(rand(1, 3, 8, 8)),
                                              lib.tensor(rand(4, 3, 3, 3)),
                                              lib.tensor(rand(5))), match="4 elements")
    check_exception(lambda lib: F(lib).conv2d(lib.tensor(rand(1, 3, 8, 8)),
                                              lib.tensor(rand(4, 3, 3, 3)).double()),
                    match="expected scalar type Float but found Double")


# -- max pooling ---------------------------------------------------------------------------------

MAXPOOL = [
    {"kernel_size": 2},
    {"kernel_size": 2, "stride": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1)},
    {"kernel_size": 3, "stride": 2, "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": 2, "dilation": 2},
    {"kernel_size": (2, 3), "dilation": (2, 1), "padding": 1, "stride": 2, "ceil_mode": True},
    {"kernel_size": 4, "stride": 4, "ceil_mode": True},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", MAXPOOL)
def test_max_pool2d(kw, dtype):
    x = rand(2, 3, 9, 8, dtype=dtype)
    check_op(lambda lib, x: F(lib).max_pool2d(x, **kw), [x], **EXACT)
    check_op(lambda lib, x, kw=kw: F(lib).max_pool2d(x, return_indices=True, **kw), [x], **EXACT)
    check_op(lambda lib, x: F(lib).max_pool2d(x, **kw), [x[0]], **EXACT)  # unbatched


def test_max_pool2d_ties_go_to_the_first():
    x = np.random.default_rng(0).integers(0, 2, (2, 2, 6, 6)).astype(np.float32)
    x[0, 0] = 1.0  # every window all tied
    for kw in [{"kernel_size": 2}, {"kernel_size": 3, "stride": 1, "padding": 1},
               {"kernel_size": 3, "stride": 2, "ceil_mode": True}]:
        check_op(lambda lib, x, kw=kw: F(lib).max_pool2d(x, return_indices=True, **kw), [x],
                 **EXACT)
        check_op(lambda lib, x, kw=kw: F(lib).max_pool2d(x, **kw), [x], **EXACT)


def test_max_pool2d_nan_wins():
    x = rand(1, 2, 6, 6)
    x[0, 0, 1, 1] = x[0, 0, 4, 3] = x[0, 1, 2, 2] = x[0, 1, 3, 3] = np.nan
    for kw in [{"kernel_size": 2}, {"kernel_size": 3, "stride": 1}]:
        check_op(lambda lib, x, kw=kw: F(lib).max_pool2d(x, return_indices=True, **kw), [x],
                 **EXACT, grad=False)
        check_op(lambda lib, x, kw=kw: F(lib).max_pool2d(x, **kw), [x], **EXACT)


@pytest.mark.parametrize("kw", [{"kernel_size": 2}, {"kernel_size": (2, 3)},
                                {"kernel_size": (3, 2), "ceil_mode": True},  # no overhang
                                {"kernel_size": (1, 2), "stride": (1, 2)}])
def test_max_pool2d_tiled_indices(kw, monkeypatch):
    """Windows that tile the input (kernel == stride, no padding; odd sizes crop) take the
    one-scan index path: ties to the first, the last NaN wins, integers, gradients."""
    calls = []
    real = conv_mod._max_tiles_index
    monkeypatch.setattr(conv_mod, "_max_tiles_index",
                        lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(5)
    ties = rng.integers(0, 2, (2, 3, 9, 8)).astype(np.float32)
    nans = rand(2, 3, 9, 8)
    nans[rng.random(nans.shape) < 0.2] = np.nan
    ints = rng.integers(-3, 3, (2, 3, 9, 8))
    for x in (rand(2, 3, 9, 8), ties, ints):
        check_op(lambda lib, x: F(lib).max_pool2d(x, return_indices=True, **kw), [x], **EXACT)
    check_op(lambda lib, x: F(lib).max_pool2d(x, return_indices=True, **kw), [nans], **EXACT,
             grad=False)
    assert calls


def test_max_pool2d_integer_and_inf():
    x = (rand(1, 2, 6, 6) * 5).astype(np.int64)
    check_op(lambda lib, x: F(lib).max_pool2d(x, 3, 2, 1), [x], **EXACT)
    y = np.full((1, 1, 4, 4), -np.inf, np.float32)
    check_op(lambda lib, x: F(lib).max_pool2d(x, 3, 2, 1, return_indices=True), [y], **EXACT)


@pytest.mark.parametrize("kw", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1,
                                                      "ceil_mode": True},
                                {"kernel_size": 2, "dilation": 2, "return_indices": True}])
def test_max_pool1d(kw):
    check_op(lambda lib, x: F(lib).max_pool1d(x, **kw), [rand(2, 3, 11)], **EXACT)
    check_op(lambda lib, x: F(lib).max_pool1d(x, **kw), [rand(3, 11)], **EXACT)


def test_max_pool2d_double_backward():
    """max_pool's gradient is a scatter of the output gradient to the argmax positions; its
    own gradient (with respect to that output gradient) is the gather."""
    x = rand(2, 2, 6, 7, dtype=np.float64)
    for kw in [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1}]:
        out = torch.nn.functional.max_pool2d(torch.tensor(x), **kw)

        def fn(lib, w, kw=kw):
            xx = lib.tensor(x, requires_grad=True)
            (gx,) = lib.autograd.grad((F(lib).max_pool2d(xx, **kw) * w).sum(), xx,
                                      create_graph=True)
            return gx

        check_op(fn, [rand(*out.shape, seed=3, dtype=np.float64)], **F64)


# -- average pooling -----------------------------------------------------------------------------

AVGPOOL = [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
    {"kernel_size": (3, 2), "stride": (2, 3), "padding": (1, 1), "count_include_pad": False},
    {"kernel_size": 3, "stride": 2, "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False},
    {"kernel_size": 2, "divisor_override": 3},
    {"kernel_size": 3, "stride": 2, "padding": 1, "divisor_override": 2},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", AVGPOOL)
def test_avg_pool2d(kw, dtype):
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == np.float32 else F64
    x = rand(2, 3, 9, 8, dtype=dtype)
    check_op(lambda lib, x: F(lib).avg_pool2d(x, **kw), [x], **tol)
    check_op(lambda lib, x: F(lib).avg_pool2d(x, **kw), [x[0]], **tol)


def test_avg_pool2d_integer():
    x = (rand(1, 2, 6, 6) * 5).astype(np.int64)
    check_op(lambda lib, x: F(lib).avg_pool2d(x, 2), [x], **EXACT)
    check_op(lambda lib, x: F(lib).avg_pool2d(x, 3, 2, 1), [x], **EXACT)


@pytest.mark.parametrize("kw", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1,
                                                      "ceil_mode": True,
                                                      "count_include_pad": False}])
def test_avg_pool1d(kw):
    check_op(lambda lib, x: F(lib).avg_pool1d(x, **kw), [rand(2, 3, 11)], atol=1e-6, rtol=1e-6)


def test_avg_pool2d_double_backward():
    x = rand(2, 2, 7, 6, dtype=np.float64)
    kw = {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
          "count_include_pad": False}
    out = torch.nn.functional.avg_pool2d(torch.tensor(x), **kw)
    check_op(grad_of(lambda lib, x: F(lib).avg_pool2d(x, **kw) ** 2, 1),
             [x, rand(*out.shape, seed=3, dtype=np.float64)], **F64)


# -- adaptive average pooling --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 3, (4, 5), (None, 3), (9, 8), (5, None), (7, 6), (0, 2)])
def test_adaptive_avg_pool2d(size, dtype):
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == np.float32 else F64
    x = rand(2, 3, 9, 8, dtype=dtype)
    grad = size != (0, 2)  # PyTorch's backward rejects an empty output
    check_op(lambda lib, x: F(lib).adaptive_avg_pool2d(x, size), [x], grad=grad, **tol)
    check_op(lambda lib, x: F(lib).adaptive_avg_pool2d(x, size), [x[0]], grad=grad, **tol)


def test_adaptive_avg_pool1d():
    check_op(lambda lib, x: F(lib).adaptive_avg_pool1d(x, 4), [rand(2, 3, 11)], atol=1e-6,
             rtol=1e-6)
    check_op(lambda lib, x: F(lib).adaptive_avg_pool1d(x, 3), [rand(3, 12)], atol=1e-6, rtol=1e-6)


# -- pooling errors ------------------------------------------------------------------------------

def test_pool_errors():
    x = rand(1, 3, 8, 8)
    check_exception(lambda lib: F(lib).max_pool2d(lib.tensor(x), 2, padding=2),
                    match="pad should be at most half of effective kernel size")
    check_exception(lambda lib: F(lib).avg_pool2d(lib.tensor(x), 2, padding=2),
                    match="pad should be at most half")
    check_exception(lambda lib: F(lib).max_pool2d(lib.tensor(rand(1, 3, 2, 2)), 3),
                    match="Output size is too small")
    check_exception(lambda lib: F(lib).avg_pool2d(lib.tensor(rand(1, 3, 2, 2)), 3),
                    match="Output size is too small")
    check_exception(lambda lib: F(lib).max_pool2d(lib.tensor(rand(8)), 2),
                    match="3D or 4D")
    check_exception(lambda lib: F(lib).adaptive_avg_pool2d(lib.tensor(rand(8, 8)), 2),
                    match="Expected 3D or 4D tensor")


# -- dropout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics(p):
    """A random primitive: checked by its statistics, not value for value."""
    n = 200_000
    x = kiln.ones(n, requires_grad=True)
    y = kiln.dropout(x, p)
    out = y.detach().numpy()
    kept = out != 0
    assert y.dtype == kiln.float32
    np.testing.assert_allclose(out[kept], 1 / (1 - p), rtol=1e-6)
    # the kept fraction is Binomial(n, 1-p)/n: 6 standard deviations
    sd = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 6 * sd
    y.backward(kiln.ones(n))
    np.testing.assert_array_equal(x.grad.numpy(), out)  # d(x*mask)/dx = mask
    # different calls draw different masks; the seed makes them repeatable
    assert not np.array_equal((kiln.dropout(x, p).detach().numpy() != 0), kept)
    kiln.manual_seed(3)
    a = kiln.dropout(x, p).detach().numpy()
    kiln.manual_seed(3)
    np.testing.assert_array_equal(kiln.dropout(x, p).detach().numpy(), a)
    mark_checked("dropout_mask")


def test_dropout_float64_and_feature_dropout():
    x = kiln.ones(4, 64, 3, 3, dtype=kiln.float64)
    y = kiln.dropout(x, 0.25).numpy()
    assert y.dtype == np.float64 and set(np.unique(y)) <= {0.0, 1 / 0.75}
    z = kiln.dropout2d(x, 0.5).numpy()
    per_channel = z.reshape(4, 64, 9)
    assert (per_channel == per_channel[..., :1]).all()  # whole channels kept or zeroed
    assert 0 < (per_channel[..., 0] == 0).mean() < 1
    assert kiln.dropout1d(kiln.ones(3, 5, 7), 0.5).shape == (3, 5, 7)
    assert kiln.dropout3d(kiln.ones(2, 3, 2, 2, 2), 0.5).shape == (2, 3, 2, 2, 2)
    mark_checked("dropout_mask")


def test_dropout_edge_cases():
    x = rand(3, 4)
    # eval mode and p=0 are the identity; p=1 zeroes everything (gradient zero too)
    check_op(lambda lib, x: F(lib).dropout(x, 0.5, training=False), [x], **EXACT)
    check_op(lambda lib, x: F(lib).dropout(x, 0.0), [x], **EXACT)
    check_op(lambda lib, x: F(lib).dropout(x, 1.0), [x], **EXACT)
    check_op(lambda lib, x: F(lib).dropout(x * 1, 1.0, inplace=True), [x], **EXACT)
    t = kiln.tensor(rand(1000))
    before = t.numpy().copy()
    out = kiln.dropout(t, 0.5, inplace=True)
    assert out is t and ((t.numpy() == 0) | np.isclose(t.numpy(), 2 * before)).all()
    check_exception(lambda lib: F(lib).dropout(lib.tensor(x), 1.5),
                    match="dropout probability has to be between 0 and 1, but got 1.5")
    check_exception(lambda lib: F(lib).dropout(lib.tensor(x), -0.1), match="between 0 and 1")
    mark_checked("dropout_mask")


@pytest.mark.parametrize("cin,cout,hw,k,attrs", [
    (1, 16, 28, 5, {"stride": (1, 1), "padding": (2, 2, 2, 2), "dilation": (1, 1), "groups": 1}),
    (16, 32, 14, 5, {"stride": (1, 1), "padding": (2, 2, 2, 2), "dilation": (1, 1), "groups": 1}),
    (16, 8, 13, 3, {"stride": (2, 2), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}),
    (8, 6, 11, 3, {"stride": (2, 1), "padding": (1, 0, 1, 1), "dilation": (1, 2), "groups": 2}),
])
def test_conv_chunked_over_the_batch_equals_one_chunk(monkeypatch, cin, cout, hw, k, attrs):
    """Large batches run a few images at a time (conv2d and the stride-1 conv_transpose2d);
    forcing chunks of one or two images gives the whole-batch results bitwise."""
    x = rand(7, cin, hw, hw)
    w = rand(cout, cin // attrs["groups"], k, k, seed=1)
    b = rand(cout, seed=2)
    whole = conv_mod._conv2d.impl(x, w, b, **attrs)
    whole_nb = conv_mod._conv2d.impl(x, w, **attrs)
    g = rand(*whole.shape, seed=3)
    t_attrs = dict(attrs, padding=conv_mod._exact_pads(attrs["padding"], hw, hw,
                                                       *whole.shape[2:], k, k, attrs["stride"],
                                                       attrs["dilation"]))
    whole_t = conv_mod._conv_transpose2d.impl(g, w, **t_attrs)
    for chunk in (1, 2 * whole[0].size * k * k):
        monkeypatch.setattr(conv_mod, "_WHOLE_BATCH", 0)
        monkeypatch.setattr(conv_mod, "_PLANES_WHOLE", 0)
        monkeypatch.setattr(conv_mod, "_CHUNK_ELEMS", chunk)
        monkeypatch.setattr(conv_mod, "_PLANES_CHUNK", chunk)
        np.testing.assert_array_equal(conv_mod._conv2d.impl(x, w, b, **attrs), whole)
        np.testing.assert_array_equal(conv_mod._conv2d.impl(x, w, **attrs), whole_nb)
        np.testing.assert_array_equal(conv_mod._conv_transpose2d.impl(g, w, **t_attrs), whole_t)
