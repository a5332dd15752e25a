"""kiln.nn.functional: the functional forms of the layers, under torch.nn.functional's names and
signatures (mostly the ops of kiln.ops, re-exported; thin wrappers where the signatures
differ, e.g. the ``inplace`` flags)."""

from __future__ import annotations

import warnings

from kiln.ops.elementwise import (  # noqa: F401 - torch.nn.functional's signatures already
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
from kiln.ops.index import embedding, one_hot  # noqa: F401
from kiln.ops.linalg import linear  # noqa: F401
from kiln.ops.reduce import log_softmax as _log_softmax
from kiln.ops.reduce import softmax as _softmax
from kiln.ops.shape import pad  # noqa: F401
from kiln.tensor import Tensor

# DEV ONLY (replaced by direct imports before hand-off): kiln.ops.conv is still landing.
import importlib as _importlib


class _Missing:
    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        raise NotImplementedError(f"kiln.ops.{self._mod}.{name} has not landed yet")


def _mod(name):
    try:
        return _importlib.import_module(f"kiln.ops.{name}")
    except ImportError:
        return _Missing(name)


_conv = _mod("conv")


# -- activations ---------------------------------------------------------------------------------

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


# -- linear and convolution ----------------------------------------------------------------------

def bilinear(input1: Tensor, input2: Tensor, weight: Tensor,
             bias: Tensor | None = None) -> Tensor:
    """``y[..., o] = sum_ij input1[..., i] * weight[o, i, j] * input2[..., j] + bias[o]``."""
    out_f, in1, in2 = weight.shape
    lead = tuple(input1.shape[:-1])
    # One matmul: (..., in1) @ (in1, out*in2), then contract in2 against input2.
    w = weight.permute(1, 0, 2).reshape(in1, out_f * in2)
    t = (input1.reshape(-1, in1) @ w).reshape(-1, out_f, in2)
    y = (t * input2.reshape(-1, 1, in2)).sum(-1).reshape(*lead, out_f)
    return y if bias is None else y + bias


# -- dropout -------------------------------------------------------------------------------------

def dropout(input: Tensor, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> Tensor:
    return _conv.dropout(input, p, training, inplace)


def conv1d(*args, **kwargs):
    return _conv.conv1d(*args, **kwargs)


def conv2d(*args, **kwargs):
    return _conv.conv2d(*args, **kwargs)


def conv_transpose2d(*args, **kwargs):
    return _conv.conv_transpose2d(*args, **kwargs)


def max_pool2d(*args, **kwargs):
    return _conv.max_pool2d(*args, **kwargs)


def avg_pool2d(*args, **kwargs):
    return _conv.avg_pool2d(*args, **kwargs)


def adaptive_avg_pool2d(*args, **kwargs):
    return _conv.adaptive_avg_pool2d(*args, **kwargs)


# == Losses, normalization, attention ============================================================
# Their functionals live in their own modules under kiln/nn/ (loss.py, normalization.py, ...);
# add one import line per module here, e.g.:
#     from kiln.nn.loss import cross_entropy, nll_loss, mse_loss  # noqa: E402,F401
from kiln.nn.loss import (  # noqa: E402,F401
    binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, huber_loss, l1_loss,
    mse_loss, nll_loss, smooth_l1_loss,
)
from kiln.nn.normalization import batch_norm, group_norm, layer_norm  # noqa: E402,F401
# == end of losses, normalization, attention =====================================================
