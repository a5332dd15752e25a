"""Identity, Linear and Bilinear layers."""

from __future__ import annotations

import math

from kiln import creation, dtypes
from kiln.nn import functional as F
from kiln.nn import init
from kiln.nn.modules.module import Module
from kiln.nn.parameter import Parameter
from kiln.tensor import Tensor

__all__ = ["Identity", "Linear", "Bilinear"]


def _shape_of(input, op: str) -> tuple:
    """The input's shape, with PyTorch's TypeError for anything that is not a tensor."""
    try:
        return input._data.shape
    except AttributeError:
        raise TypeError(f"{op}(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}") from None


def _float_dtype(dtype) -> dtypes.dtype:
    return dtypes.as_dtype(dtype) if dtype is not None else dtypes.get_default_dtype()


class Identity(Module):
    """Returns its input unchanged (arguments are accepted and ignored)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, input):
        return input


class Linear(Module):
    """``y = x @ weight.T + bias`` with ``weight`` of shape (out_features, in_features).

    >>> import kiln
    >>> kiln.nn.Linear(784, 256)
    Linear(in_features=784, out_features=256, bias=True)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        d = _float_dtype(dtype)
        self.weight = Parameter(creation.empty(out_features, in_features, dtype=d))
        if bias:
            self.bias = Parameter(creation.empty(out_features, dtype=d))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default: weight ~ kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)),
        and bias ~ U(+-1/sqrt(fan_in))."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        shape = _shape_of(input, "linear")
        if not shape or shape[-1] != self.in_features:
            raise RuntimeError(f"{self!r} expected input with last dimension "
                               f"{self.in_features}, got shape {list(shape)}")
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Bilinear(Module):
    """``y[..., o] = x1 @ weight[o] @ x2 + bias[o]`` with weight (out, in1, in2)."""

    def __init__(self, in1_features: int, in2_features: int, out_features: int,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in1_features = in1_features
        self.in2_features = in2_features
        self.out_features = out_features
        d = _float_dtype(dtype)
        self.weight = Parameter(creation.empty(out_features, in1_features, in2_features,
                                               dtype=d))
        if bias:
            self.bias = Parameter(creation.empty(out_features, dtype=d))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.weight.shape[1])
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:
        s1, s2 = _shape_of(input1, "bilinear"), _shape_of(input2, "bilinear")
        if (not s1 or s1[-1] != self.in1_features or not s2 or s2[-1] != self.in2_features
                or s1[:-1] != s2[:-1]):
            raise RuntimeError(
                f"{self!r} expected inputs of shapes [*, {self.in1_features}] and "
                f"[*, {self.in2_features}] with the same leading dimensions, got "
                f"{list(s1)} and {list(s2)}"
            )
        return F.bilinear(input1, input2, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in1_features={self.in1_features}, in2_features={self.in2_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")
