"""kiln.nn.functional: the functional forms of the layers, under torch.nn.functional's names and
signatures.  Most are the ops of kiln.ops re-exported (their signatures are already
torch.nn.functional's); the rest are compositions of those ops."""

from __future__ import annotations

import warnings

from kiln.ops.conv import (  # noqa: F401
    adaptive_avg_pool1d,
    adaptive_avg_pool2d,
    avg_pool1d,
    avg_pool2d,
    conv1d,
    conv2d,
    conv_transpose1d,
    conv_transpose2d,
    dropout,
    dropout1d,
    dropout2d,
    dropout3d,
    max_pool1d,
    max_pool2d,
)
from kiln.ops.elementwise import (  # noqa: F401
    _assign_from,
    elu,
    gelu,
    hardtanh,
    leaky_relu,
    logsigmoid,
    relu,
    relu6,
    sigmoid,
    silu,
    softplus,
    tanh,
)
from kiln.ops.elementwise import where as _where
from kiln.ops.index import embedding, one_hot  # noqa: F401
from kiln.ops.linalg import linear  # noqa: F401
from kiln.ops.reduce import log_softmax as _log_softmax
from kiln.ops.reduce import softmax as _softmax
from kiln.ops.shape import pad  # noqa: F401
from kiln.tensor import Tensor, normalize_dim

# -- softmax family: ``dim`` is optional here, as in torch.nn.functional ------------------------

def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  "to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype=None) -> Tensor:
    """``exp(input) / sum(exp(input), dim)``; without ``dim``, PyTorch's legacy choice (with
    its deprecation warning)."""
    if dim is None:
        dim = _softmax_dim("softmax", input.ndim, _stacklevel)
    return _softmax(input, dim, dtype=dtype)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype=None) -> Tensor:
    """``log(softmax(input, dim))``, computed stably."""
    if dim is None:
        dim = _softmax_dim("log_softmax", input.ndim, _stacklevel)
    return _log_softmax(input, dim, dtype=dtype)


def softmin(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype=None) -> Tensor:
    """``softmax(-input, dim)``."""
    if dim is None:
        dim = _softmax_dim("softmin", input.ndim, _stacklevel)
    return _softmax(-input, dim, dtype=dtype)


# -- more activations, as compositions (their kinks follow PyTorch's backward formulas) ---------

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _maybe_inplace(input: Tensor, fn, inplace: bool, op: str) -> Tensor:
    return _assign_from(input, fn, op) if inplace else fn(input)


def _float_input(input, op: str) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"{op}\" not implemented for '{input.dtype}'")
    return input


def selu(input: Tensor, inplace: bool = False) -> Tensor:
    """``scale * elu(input, alpha)`` with the self-normalising constants."""
    _float_input(input, "selu")
    return _maybe_inplace(input, lambda x: elu(x, _SELU_ALPHA) * _SELU_SCALE, inplace, "selu_")


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """``max(0, x) + min(0, alpha * (exp(x / alpha) - 1))``."""
    _float_input(input, "celu")
    if alpha == 0:
        raise RuntimeError("ZeroDivisionError: celu alpha must not be 0")
    return _maybe_inplace(input, lambda x: elu(x / alpha) * alpha, inplace, "celu_")


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """``input * tanh(softplus(input))``."""
    _float_input(input, "mish")
    return _maybe_inplace(input, lambda x: x * tanh(softplus(x)), inplace, "mish_")


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(input + 3) / 6``; no gradient at -3 and 3 (PyTorch's)."""
    _float_input(input, "hardsigmoid")
    return _maybe_inplace(input, lambda x: relu6(x + 3.0) / 6.0, inplace, "hardsigmoid_")


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """``input * relu6(input + 3) / 6``."""
    _float_input(input, "hardswish")

    def fn(x):
        # the branches are split where PyTorch's backward splits them: slope 0 at -3, 1 at 3
        return _where(x <= -3.0, 0.0, _where(x < 3.0, x * (x + 3.0) / 6.0, x))

    return _maybe_inplace(input, fn, inplace, "hardswish_")


def softsign(input: Tensor) -> Tensor:
    """``input / (1 + |input|)``."""
    _float_input(input, "softsign")
    return input / (input.abs() + 1.0)


def tanhshrink(input: Tensor) -> Tensor:
    """``input - tanh(input)``."""
    _float_input(input, "tanhshrink")
    return input - tanh(input)


def threshold(input: Tensor, threshold: float, value: float, inplace: bool = False) -> Tensor:
    """``input`` where ``input > threshold``, else ``value``."""
    _float_input(input, "threshold")

    def fn(x):
        return _where(x > threshold, x, value)

    return _maybe_inplace(input, fn, inplace, "threshold_")


def hardshrink(input: Tensor, lambd: float = 0.5) -> Tensor:
    """``input`` where ``|input| > lambd``, else 0."""
    _float_input(input, "hardshrink")
    return _where(input.abs() > lambd, input, 0.0)


def softshrink(input: Tensor, lambd: float = 0.5) -> Tensor:
    """``input - lambd`` above ``lambd``, ``input + lambd`` below ``-lambd``, else 0."""
    _float_input(input, "softshrink")
    if lambd < 0:
        raise RuntimeError(f"lambda must be greater or equal to 0, but found to be {lambd}.")
    return _where(input > lambd, input - lambd, _where(input < -lambd, input + lambd, 0.0))


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """``a * sigmoid(b)`` where ``a, b`` are the two halves of ``input`` along ``dim``."""
    _float_input(input, "glu")
    if input.ndim == 0:
        raise RuntimeError("glu does not support scalars because halving size must be even")
    d = normalize_dim(dim, input.ndim, "glu")
    size = input.shape[d]
    if size % 2:
        raise RuntimeError(f"Halving dimension must be even, but dimension {d} is size {size}")
    a, b = input.chunk(2, d)
    return a * sigmoid(b)


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """``input`` where positive, ``weight * input`` elsewhere; ``weight`` has one entry or one
    per channel (dim 1)."""
    _float_input(input, "prelu")
    n = weight.numel()
    if n != 1:
        if input.ndim < 2 or input.shape[1] != n:
            raise RuntimeError(
                f"Mismatch of parameter numbers and input channel size. Found parameter numbers "
                f"= {n} and channel size = {input.shape[1] if input.ndim >= 2 else 1}.")
        weight = weight.reshape((n,) + (1,) * (input.ndim - 2))
    elif weight.ndim != 0:
        weight = weight.reshape(())
    return _where(input > 0, input, weight * input)


# -- linear --------------------------------------------------------------------------------------

def bilinear(input1: Tensor, input2: Tensor, weight: Tensor,
             bias: Tensor | None = None) -> Tensor:
    """``y[..., o] = sum_ij input1[..., i] * weight[o, i, j] * input2[..., j] + bias[o]``."""
    out_f, in1, in2 = weight.shape
    if input1.shape[-1] != in1 or input2.shape[-1] != in2:
        raise RuntimeError(f"bilinear(): input sizes {list(input1.shape)} and "
                           f"{list(input2.shape)} do not match weight size {list(weight.shape)}")
    lead = tuple(input1.shape[:-1])
    # One gemm: (rows, in1) @ (in1, out*in2), then contract in2 against input2.
    w = weight.permute(1, 0, 2).reshape(in1, out_f * in2)
    t = (input1.reshape(-1, in1) @ w).reshape(-1, out_f, in2)
    y = (t * input2.reshape(-1, 1, in2)).sum(-1).reshape(*lead, out_f)
    return y if bias is None else y + bias


# == Losses, normalization, attention ============================================================
# Their functionals live in their own modules under kiln/nn/ (loss.py, normalization.py, ...);
# add one import line per module here, e.g.:
#     from kiln.nn.loss import cross_entropy, nll_loss, mse_loss  # noqa: E402,F401
from kiln.nn.loss import (  # noqa: E402,F401
    binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, huber_loss, l1_loss,
    mse_loss, nll_loss, smooth_l1_loss,
)
from kiln.nn.normalization import batch_norm, group_norm, layer_norm  # noqa: E402,F401
from kiln.nn.attention import scaled_dot_product_attention  # noqa: E402,F401
# == end of losses, normalization, attention =====================================================
