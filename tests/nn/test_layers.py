"""Every layer of kiln.nn against torch.nn on the same weights (copied from torch through
load_state_dict with numpy arrays) and inputs: outputs, input gradients and the gradient of every
parameter, in train and eval modes; plus reprs and the errors of bad constructor arguments and
badly shaped inputs."""

import math
import warnings

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception, rand

F32 = {"atol": 1e-5, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-10}


def _tensor(lib, x, grad=True):
    t = lib.tensor(x)
    if grad and x.dtype.kind == "f":
        t.requires_grad_(True)
    return t


def check_layer(make, inputs, *, atol, rtol, dtype=None, train=True, seed=0, call=None,
                grad=True):
    """Build the layer with ``make(lib)`` in both libraries, copy torch's state into kiln,
    run ``call(module, *inputs)`` (default ``module(*inputs)``) and compare the output, the
    input gradients and every parameter gradient.  Returns (kiln module, torch module)."""
    torch.manual_seed(seed)
    tm, km = make(torch), make(kiln)
    if dtype == np.float64:
        tm.double()
        km.double()
    result = km.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    assert not result.missing_keys and not result.unexpected_keys
    assert [n for n, _ in km.named_parameters()] == [n for n, _ in tm.named_parameters()]
    tm.train(train)
    km.train(train)
    call = call or (lambda m, *xs: m(*xs))
    t_in = [_tensor(torch, x, grad) for x in inputs]
    k_in = [_tensor(kiln, x, grad) for x in inputs]
    t_out, k_out = call(tm, *t_in), call(km, *k_in)
    assert isinstance(k_out, kiln.Tensor)
    assert tuple(k_out.shape) == tuple(t_out.shape), (k_out.shape, t_out.shape)
    assert str(k_out.dtype).split(".")[-1] == str(t_out.dtype).split(".")[-1]
    np.testing.assert_allclose(k_out.detach().numpy(), t_out.detach().numpy(), atol=atol,
                               rtol=rtol, err_msg="forward differs")
    if not grad or not t_out.requires_grad:
        return km, tm
    w = np.random.default_rng(seed + 1).uniform(0.5, 1.5, tuple(t_out.shape))
    w = w.astype(t_out.detach().numpy().dtype)
    (t_out * torch.tensor(w)).sum().backward()
    (k_out * kiln.tensor(w)).sum().backward()
    for i, (k, t) in enumerate(zip(k_in, t_in, strict=True)):
        if t.requires_grad:
            assert k.grad is not None, f"no gradient for input {i}"
            np.testing.assert_allclose(k.grad.numpy(), t.grad.numpy(), atol=atol, rtol=rtol,
                                       err_msg=f"gradient of input {i} differs")
    for (name, kp), (_, tp) in zip(km.named_parameters(), tm.named_parameters(), strict=True):
        if tp.grad is None:
            assert kp.grad is None or not np.any(kp.grad.numpy()), name
            continue
        assert kp.grad is not None, f"no gradient for {name}"
        np.testing.assert_allclose(kp.grad.numpy(), tp.grad.numpy(), atol=atol, rtol=rtol,
                                   err_msg=f"gradient of {name} differs")
    return km, tm


def same_repr(make):
    assert repr(make(kiln)) == repr(make(torch))


# -- Linear, Bilinear, Identity, Flatten ----------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 7), (7,), (2, 3, 7), (0, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias):
    make = lambda lib: lib.nn.Linear(7, 5, bias=bias)  # noqa: E731
    check_layer(make, [rand(*shape)], **F32)
    check_layer(make, [rand(*shape, dtype=np.float64)], dtype=np.float64, **F64)
    same_repr(make)


def test_linear_bad_input_names_the_layer():
    e = check_exception(lambda lib: lib.nn.Linear(784, 256)(lib.zeros(64, 100)))
    assert str(e) == ("Linear(in_features=784, out_features=256, bias=True) expected input with "
                      "last dimension 784, got shape [64, 100]")
    check_exception(lambda lib: lib.nn.Linear(3, 2)(lib.tensor(1.0)), match="Linear")
    check_exception(lambda lib: lib.nn.Linear(3, 2)([1.0, 2.0, 3.0]), match="Tensor")


def test_bilinear():
    make = lambda lib: lib.nn.Bilinear(3, 4, 5)  # noqa: E731
    check_layer(make, [rand(6, 3), rand(6, 4, seed=1)], **F32)
    check_layer(make, [rand(2, 6, 3), rand(2, 6, 4, seed=1)], **F32)
    check_layer(lambda lib: lib.nn.Bilinear(3, 4, 2, bias=False), [rand(5, 3),
                                                                    rand(5, 4, seed=1)], **F32)
    same_repr(make)
    check_exception(lambda lib: lib.nn.Bilinear(2, 3, 4)(lib.zeros(2, 3), lib.zeros(2, 3)))


def test_identity_flatten_unflatten():
    x = rand(2, 3, 4, 5)
    check_layer(lambda lib: lib.nn.Identity(3, k=1), [x], **F32)
    for args in [(), (0,), (2, 3), (1, -2), (-3, -1)]:
        check_layer(lambda lib: lib.nn.Flatten(*args), [x], **F32)
        same_repr(lambda lib: lib.nn.Flatten(*args))
    for dim, sizes in [(1, (3, 1)), (-1, [5, 1]), (3, (-1, 5)), (0, (1, 2))]:
        check_layer(lambda lib: lib.nn.Unflatten(dim, sizes), [x], **F32)
        same_repr(lambda lib: lib.nn.Unflatten(dim, sizes))
    check_exception(lambda lib: lib.nn.Unflatten(1, 3), match="tuple of ints")
    check_exception(lambda lib: lib.nn.Unflatten(1, (2, 1.5)), match="tuple of ints")
    check_exception(lambda lib: lib.nn.Flatten()(lib.zeros(3)))


# -- activations ----------------------------------------------------------------------------------

ACTIVATIONS = [
    lambda lib: lib.nn.ReLU(), lambda lib: lib.nn.ReLU6(), lambda lib: lib.nn.GELU(),
    lambda lib: lib.nn.GELU(approximate="tanh"), lambda lib: lib.nn.SiLU(),
    lambda lib: lib.nn.Tanh(), lambda lib: lib.nn.Sigmoid(), lambda lib: lib.nn.LeakyReLU(),
    lambda lib: lib.nn.LeakyReLU(0.2), lambda lib: lib.nn.ELU(), lambda lib: lib.nn.ELU(0.5),
    lambda lib: lib.nn.Softplus(), lambda lib: lib.nn.Softplus(beta=2.0, threshold=3.0),
    lambda lib: lib.nn.Hardtanh(), lambda lib: lib.nn.Hardtanh(-0.5, 2.0),
    lambda lib: lib.nn.LogSigmoid(), lambda lib: lib.nn.Softmax(dim=1),
    lambda lib: lib.nn.Softmax(dim=-1), lambda lib: lib.nn.LogSoftmax(dim=1),
    lambda lib: lib.nn.LogSoftmax(dim=0), lambda lib: lib.nn.Softmin(dim=1),
    lambda lib: lib.nn.SELU(), lambda lib: lib.nn.CELU(), lambda lib: lib.nn.CELU(0.5),
    lambda lib: lib.nn.Mish(), lambda lib: lib.nn.Hardsigmoid(), lambda lib: lib.nn.Hardswish(),
    lambda lib: lib.nn.Softsign(), lambda lib: lib.nn.Tanhshrink(),
    lambda lib: lib.nn.Threshold(0.5, -2.0), lambda lib: lib.nn.Hardshrink(),
    lambda lib: lib.nn.Softshrink(1.0), lambda lib: lib.nn.GLU(), lambda lib: lib.nn.GLU(0),
    lambda lib: lib.nn.PReLU(), lambda lib: lib.nn.PReLU(6, init=0.1),
]


@pytest.mark.parametrize("make", ACTIVATIONS)
def test_activations(make):
    x = rand(4, 6, low=-4, high=4)
    x[0] = [0.0, -1.0, 1.0, 6.0, -0.5, 0.5]  # kinks: 0, the hardtanh/relu6/shrink bounds
    x[1, :3] = [3.0, -3.0, 1.0]  # hardswish/hardsigmoid bounds
    check_layer(make, [x], **F32)
    f64 = F64
    if type(make(kiln)).__name__ == "Hardsigmoid":
        # PyTorch's CPU kernel multiplies float64 gradients by 1/6 rounded to float32 (relative
        # error 3e-8); Kiln uses the float64 1/6
        f64 = {"atol": 1e-12, "rtol": 6e-8}
    check_layer(make, [x.astype(np.float64)], dtype=np.float64, **f64)
    check_layer(make, [rand(4, 6, 2, seed=2)], train=False, **F32)
    same_repr(make)


@pytest.mark.parametrize("make", [
    lambda lib: lib.nn.ReLU(inplace=True), lambda lib: lib.nn.LeakyReLU(0.1, inplace=True),
    lambda lib: lib.nn.ELU(inplace=True), lambda lib: lib.nn.Hardtanh(inplace=True),
    lambda lib: lib.nn.ReLU6(True), lambda lib: lib.nn.SiLU(inplace=True),
    lambda lib: lib.nn.SELU(inplace=True), lambda lib: lib.nn.CELU(inplace=True),
    lambda lib: lib.nn.Mish(inplace=True), lambda lib: lib.nn.Hardswish(inplace=True),
    lambda lib: lib.nn.Hardsigmoid(inplace=True), lambda lib: lib.nn.Threshold(0.1, 2.0, True)])
def test_inplace_activations_after_a_linear_layer(make):
    net = lambda lib: lib.nn.Sequential(lib.nn.Linear(5, 6), make(lib),  # noqa: E731
                                        lib.nn.Linear(6, 3))
    check_layer(net, [rand(4, 5)], **F32)
    same_repr(make)
    k = kiln.tensor(rand(3, 4))
    out = make(kiln)(k)
    assert out is k  # overwrote its input


def test_softmax_without_dim_warns_and_picks_torchs_dim():
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        for cls in ("Softmax", "LogSoftmax"):
            x = rand(*shape)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                check_layer(lambda lib: getattr(lib.nn, cls)(), [x], **F32)
            assert sum("Implicit dimension" in str(m.message) for m in w) == 2
    same_repr(lambda lib: lib.nn.Softmax())


def test_activation_argument_errors():
    check_exception(lambda lib: lib.nn.Hardtanh(1.0, 0.0), match="must be greater")
    check_exception(lambda lib: lib.nn.GLU()(lib.zeros(2, 3)), match="even")
    check_exception(lambda lib: lib.nn.GLU(2)(lib.zeros(2, 4)))
    check_exception(lambda lib: lib.nn.PReLU(3)(lib.zeros(2, 4)), match="channel")
    check_exception(lambda lib: lib.nn.Softshrink(-1.0)(lib.zeros(2)), match="lambda")


# -- convolutions ---------------------------------------------------------------------------------

CONV2D = [
    dict(), dict(stride=2), dict(padding=1), dict(padding=(2, 0), stride=(1, 2)),
    dict(dilation=2, padding=2), dict(groups=2), dict(bias=False), dict(padding="same"),
    dict(padding="valid"), dict(padding="same", dilation=(1, 2)),
]


@pytest.mark.parametrize("kw", CONV2D)
def test_conv2d(kw):
    make = lambda lib: lib.nn.Conv2d(4, 6, 3, **kw)  # noqa: E731
    check_layer(make, [rand(2, 4, 9, 8)], atol=1e-5, rtol=1e-4)
    same_repr(make)


def test_conv2d_unbatched_float64_rectangular_kernel():
    make = lambda lib: lib.nn.Conv2d(3, 2, (2, 3), padding=(1, 1))  # noqa: E731
    check_layer(make, [rand(3, 6, 7)], atol=1e-5, rtol=1e-4)
    check_layer(make, [rand(2, 3, 6, 7, dtype=np.float64)], dtype=np.float64, **F64)
    check_layer(lambda lib: lib.nn.Conv2d(3, 2, 4, padding="same"), [rand(1, 3, 6, 7)],
                atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv2d_padding_modes(mode):
    make = lambda lib: lib.nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)  # noqa: E731
    check_layer(make, [rand(2, 2, 5, 6)], atol=1e-5, rtol=1e-4)
    same_repr(make)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding="same"),
                                dict(dilation=2, groups=3, bias=False)])
def test_conv1d(kw):
    make = lambda lib: lib.nn.Conv1d(3, 6, 3, **kw)  # noqa: E731
    check_layer(make, [rand(2, 3, 11)], atol=1e-5, rtol=1e-4)
    check_layer(make, [rand(3, 11)], atol=1e-5, rtol=1e-4)
    same_repr(make)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2), dict(stride=2, padding=1, output_padding=1),
                                dict(groups=2, bias=False), dict(dilation=2, stride=(1, 2))])
def test_conv_transpose2d(kw):
    make = lambda lib: lib.nn.ConvTranspose2d(4, 6, 3, **kw)  # noqa: E731
    check_layer(make, [rand(2, 4, 5, 6)], atol=1e-5, rtol=1e-4)
    same_repr(make)


def test_conv_transpose2d_output_size():
    make = lambda lib: lib.nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)  # noqa: E731
    for size in [(9, 11), [10, 12], (1, 3, 10, 11)]:
        check_layer(make, [rand(1, 2, 5, 6)], atol=1e-5, rtol=1e-4,
                    call=lambda m, x: m(x, output_size=size))
    check_exception(lambda lib: lib.nn.ConvTranspose2d(2, 3, 3, stride=2)(
        lib.zeros(1, 2, 5, 6), output_size=(20, 20)), match="output size")


def test_conv_constructor_errors_match_torch():
    check_exception(lambda lib: lib.nn.Conv2d(3, 4, 3, groups=2), match="divisible")
    check_exception(lambda lib: lib.nn.Conv2d(4, 3, 3, groups=2), match="divisible")
    check_exception(lambda lib: lib.nn.Conv2d(4, 4, 3, groups=0), match="positive")
    check_exception(lambda lib: lib.nn.Conv2d(4, 4, 3, padding="full"), match="padding")
    check_exception(lambda lib: lib.nn.Conv2d(4, 4, 3, stride=2, padding="same"), match="same")
    check_exception(lambda lib: lib.nn.Conv2d(4, 4, 3, padding_mode="wrap"), match="padding_mode")
    check_exception(lambda lib: lib.nn.ConvTranspose2d(4, 4, 3, padding_mode="reflect"),
                    match="zeros")


def test_conv_bad_input_names_the_layer():
    e = check_exception(lambda lib: lib.nn.Conv2d(3, 8, 3)(lib.zeros(2, 5, 8, 8)))
    assert str(e).startswith("Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1)) expected input")
    assert "[2, 5, 8, 8]" in str(e)
    check_exception(lambda lib: lib.nn.Conv2d(3, 8, 3)(lib.zeros(2, 3)), match="Conv2d")
    check_exception(lambda lib: lib.nn.Conv1d(3, 8, 3)(lib.zeros(2, 3, 4, 4)), match="Conv1d")
    check_exception(lambda lib: lib.nn.ConvTranspose2d(2, 3, 3)(lib.zeros(1, 3, 4, 4)),
                    match="ConvTranspose2d")


# -- pooling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda lib: lib.nn.MaxPool2d(2), lambda lib: lib.nn.MaxPool2d(3, stride=2, padding=1),
    lambda lib: lib.nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True),
    lambda lib: lib.nn.MaxPool2d(2, dilation=2),
    lambda lib: lib.nn.AvgPool2d(2), lambda lib: lib.nn.AvgPool2d(3, stride=2, padding=1),
    lambda lib: lib.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    lambda lib: lib.nn.AvgPool2d((2, 3), ceil_mode=True),
    lambda lib: lib.nn.AdaptiveAvgPool2d(1), lambda lib: lib.nn.AdaptiveAvgPool2d((3, 2)),
    lambda lib: lib.nn.AdaptiveAvgPool2d((None, 4)), lambda lib: lib.nn.AdaptiveAvgPool2d(5),
])
def test_pooling_2d(make):
    x = rand(2, 3, 9, 10)
    x[0, 0, :2, :2] = 1.0  # ties inside a window: the gradient goes where torch sends it
    check_layer(make, [x], **F32)
    check_layer(make, [rand(3, 8, 7)], **F32)
    check_layer(make, [rand(1, 2, 9, 10, dtype=np.float64)], dtype=np.float64, **F64)
    same_repr(make)


@pytest.mark.parametrize("make", [
    lambda lib: lib.nn.MaxPool1d(2), lambda lib: lib.nn.MaxPool1d(3, 2, 1, ceil_mode=True),
    lambda lib: lib.nn.AvgPool1d(3, 2, 1), lambda lib: lib.nn.AvgPool1d(2, ceil_mode=True),
    lambda lib: lib.nn.AdaptiveAvgPool1d(3), lambda lib: lib.nn.AdaptiveAvgPool1d(1),
])
def test_pooling_1d(make):
    check_layer(make, [rand(2, 3, 11)], **F32)
    check_layer(make, [rand(3, 10)], **F32)
    same_repr(make)


def test_conv_transpose1d():
    make = lambda lib: lib.nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1)  # noqa: E731
    check_layer(make, [rand(2, 4, 7)], atol=1e-5, rtol=1e-4)
    check_layer(make, [rand(2, 4, 7)], atol=1e-5, rtol=1e-4,
                call=lambda m, x: m(x, output_size=[14]))
    same_repr(make)


def test_pooling_bad_input_names_the_layer():
    check_exception(lambda lib: lib.nn.MaxPool2d(2)(lib.zeros(2)), match="MaxPool2d")
    check_exception(lambda lib: lib.nn.AdaptiveAvgPool2d(2)(lib.zeros(2)),
                    match="AdaptiveAvgPool2d")


# -- dropout --------------------------------------------------------------------------------------

def test_dropout_eval_is_identity_and_repr():
    check_layer(lambda lib: lib.nn.Dropout(0.3), [rand(4, 5)], train=False, **F32)
    check_layer(lambda lib: lib.nn.Dropout(0.0), [rand(4, 5)], train=True, **F32)
    same_repr(lambda lib: lib.nn.Dropout())
    same_repr(lambda lib: lib.nn.Dropout(0.2, inplace=True))
    check_exception(lambda lib: lib.nn.Dropout(1.5), match="between 0 and 1")
    check_exception(lambda lib: lib.nn.Dropout(-0.1), match="between 0 and 1")


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_train_statistics_and_gradient(p):
    d = kiln.nn.Dropout(p)
    x = kiln.tensor(rand(200, 250, low=0.5, high=1.5), requires_grad=True)
    y = d(x)
    yv, xv = y.detach().numpy(), x.detach().numpy()
    kept = yv != 0
    n = kept.size
    assert abs((1 - kept.mean()) - p) < 6 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(yv[kept], xv[kept] / (1 - p), rtol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), kept / (1 - p), rtol=1e-6)
    d.eval()
    np.testing.assert_array_equal(d(x).detach().numpy(), xv)
    one = kiln.nn.Dropout(1.0)(x)
    assert not np.any(one.detach().numpy())


@pytest.mark.parametrize("name,shape", [("Dropout1d", (40, 50, 3)), ("Dropout2d", (40, 50, 2, 2)),
                                        ("Dropout3d", (40, 50, 1, 2, 2))])
def test_channel_dropout(name, shape):
    p = 0.3
    d = getattr(kiln.nn, name)(p)
    x = kiln.ones(*shape, requires_grad=True)
    y = d(x)
    v = y.detach().numpy().reshape(shape[0], shape[1], -1)
    zero_channels = np.all(v == 0, axis=-1)
    assert np.all(zero_channels | np.all(np.isclose(v, 1 / (1 - p)), axis=-1))
    n = zero_channels.size
    assert abs(zero_channels.mean() - p) < 6 * math.sqrt(p * (1 - p) / n)
    d.eval()
    assert d(x) is x or np.array_equal(d(x).detach().numpy(), x.detach().numpy())
    same_repr(lambda lib: getattr(lib.nn, name)(0.2))


def test_dropout_inside_a_model_follows_train_and_eval():
    make = lambda lib: lib.nn.Sequential(lib.nn.Linear(6, 8), lib.nn.Dropout(0.5),  # noqa: E731
                                         lib.nn.Linear(8, 2))
    check_layer(make, [rand(5, 6)], train=False, **F32)
    k = make(kiln)
    x = kiln.tensor(rand(50, 6))
    k.train()
    a, b = k(x).detach().numpy(), k(x).detach().numpy()
    assert not np.allclose(a, b)  # a new mask each call
    k.eval()
    np.testing.assert_array_equal(k(x).detach().numpy(), k(x).detach().numpy())


# -- embedding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(padding_idx=2), dict(padding_idx=-1)])
def test_embedding(kw):
    idx = np.array([[0, 2, 4], [2, 9, 1]], np.int64)
    make = lambda lib: lib.nn.Embedding(10, 4, **kw)  # noqa: E731
    km, _ = check_layer(make, [idx], **F32)
    if "padding_idx" in kw:
        assert not np.any(km.weight.grad.numpy()[kw["padding_idx"]])
    check_layer(make, [np.array(3, np.int64)], **F32)
    check_layer(make, [idx.astype(np.int32)], **F32)
    same_repr(make)


def test_embedding_max_norm_renormalises_rows_like_torch():
    idx = np.array([1, 3, 3, 5], np.int64)
    make = lambda lib: lib.nn.Embedding(8, 4, max_norm=1.0)  # noqa: E731
    km, tm = check_layer(make, [idx], **F32)
    np.testing.assert_allclose(km.weight.detach().numpy(), tm.weight.detach().numpy(),
                               atol=1e-6, rtol=1e-6)
    same_repr(lambda lib: lib.nn.Embedding(10, 3, padding_idx=0, max_norm=1.0,
                                           scale_grad_by_freq=True))


def test_embedding_from_pretrained_and_errors():
    w = kiln.tensor(rand(5, 3))
    e = kiln.nn.Embedding.from_pretrained(w)
    assert not e.weight.requires_grad and np.shares_memory(e.weight.detach().numpy(), w.numpy())
    out = e(kiln.tensor([4, 0]))
    np.testing.assert_array_equal(out.numpy(), w.numpy()[[4, 0]])
    e2 = kiln.nn.Embedding.from_pretrained(w, freeze=False, padding_idx=1)
    assert e2.weight.requires_grad and e2.padding_idx == 1
    assert np.any(e2.weight.detach().numpy()[1])  # the given row is kept
    check_exception(lambda lib: lib.nn.Embedding.from_pretrained(lib.zeros(3)),
                    match="2-dimensional")
    check_exception(lambda lib: lib.nn.Embedding(3, 2, padding_idx=3), match="Padding_idx")
    check_exception(lambda lib: lib.nn.Embedding(3, 2, padding_idx=-4), match="Padding_idx")
    check_exception(lambda lib: lib.nn.Embedding(3, 2)(lib.tensor([5])))
    check_exception(lambda lib: lib.nn.Embedding(3, 2)(lib.zeros(2)))


# -- whole models ---------------------------------------------------------------------------------

def mlp(lib):
    nn = lib.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4), nn.LogSoftmax(dim=1))


def cnn(lib):
    nn = lib.nn
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding="same", bias=False), nn.SiLU(), nn.AvgPool2d(2),
        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlp_and_cnn_models_match_torch(dtype):
    tol = F32 if dtype == np.float32 else F64
    check_layer(mlp, [rand(5, 3, 4, dtype=dtype)], dtype=dtype, train=False, **tol)
    check_layer(cnn, [rand(2, 2, 8, 8, dtype=dtype)], dtype=dtype,
                atol=1e-5 if dtype == np.float32 else 1e-12, rtol=1e-4 if dtype == np.float32
                else 1e-10)
    assert repr(mlp(kiln)) == repr(mlp(torch))
    assert repr(cnn(kiln)) == repr(cnn(torch))


def test_training_steps_match_torch():
    """A few SGD steps written by hand on both libraries keep the weights equal."""
    torch.manual_seed(1)
    tm, km = cnn(torch), cnn(kiln)
    km.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    x = rand(4, 2, 8, 8)
    for _ in range(3):
        for m, lib in ((tm, torch), (km, kiln)):
            m.zero_grad()
            (m(lib.tensor(x)) ** 2).mean().backward()
            with lib.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
    for (name, kp), (_, tp) in zip(km.named_parameters(), tm.named_parameters(), strict=True):
        np.testing.assert_allclose(kp.detach().numpy(), tp.detach().numpy(), atol=2e-6,
                                   rtol=1e-5, err_msg=name)


# -- the functional namespace ---------------------------------------------------------------------

F_NAMES = ["relu", "gelu", "silu", "softplus", "leaky_relu", "elu", "hardtanh", "relu6",
           "logsigmoid", "sigmoid", "tanh", "softmax", "log_softmax", "softmin", "linear",
           "bilinear", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "max_pool1d",
           "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "dropout", "dropout1d", "dropout2d", "dropout3d", "embedding", "one_hot", "pad", "selu",
           "celu", "mish", "hardsigmoid", "hardswish", "softsign", "tanhshrink", "threshold",
           "hardshrink", "softshrink", "glu", "prelu"]


def test_functional_namespace_has_torchs_names():
    missing = [n for n in F_NAMES if not callable(getattr(kiln.nn.functional, n, None))]
    assert not missing
    assert all(callable(getattr(torch.nn.functional, n)) for n in F_NAMES)


@pytest.mark.parametrize("fn", [
    lambda lib, x, w: lib.nn.functional.linear(x, w),
    lambda lib, x, w: lib.nn.functional.softmax(x, dim=0, dtype=lib.float64),
    lambda lib, x, w: lib.nn.functional.log_softmax(x, -1),
    lambda lib, x, w: lib.nn.functional.pad(x, (1, 2), value=0.5),
    lambda lib, x, w: lib.nn.functional.bilinear(x, x, w.reshape(2, 3, 3)),
    lambda lib, x, w: lib.nn.functional.prelu(x, w[0, :1]),
    lambda lib, x, w: lib.nn.functional.hardswish(x, inplace=False),
])
def test_functional_calls_match_torch(fn):
    from tests.helpers import check_op

    x = rand(4, 3)
    x[0] = [3.0, -3.0, 0.0]
    check_op(fn, [x, rand(6, 3, seed=5)], atol=1e-6, rtol=1e-5)


def test_functional_integer_helpers_match_torch():
    from tests.helpers import check_op

    idx = np.array([[1, 0, 3], [2, 2, 0]], np.int64)
    check_op(lambda lib, i: lib.nn.functional.one_hot(i, 5), [idx], atol=0, rtol=0)
    check_op(lambda lib, i, w: lib.nn.functional.embedding(i, w, padding_idx=0),
             [idx, rand(4, 3)], atol=1e-7, rtol=1e-7)
