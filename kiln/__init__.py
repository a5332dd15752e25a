"""Kiln: a deep-learning framework with PyTorch's eager API, compiled graphs and export."""

from kiln import _malloc  # noqa: F401 - first: sets how freed array memory is kept
from kiln import dtypes as _dtypes
from kiln.dtypes import (
    bool_ as bool,  # noqa: A001 - PyTorch's name
    dtype,
    float16,
    float32,
    float64,
    get_default_dtype,
    int8,
    int16,
    int32,
    int64,
    set_default_dtype,
    uint8,
)
from kiln.dtypes import promote_types, result_type as _result_type
from kiln.grad_mode import enable_grad, inference_mode, is_grad_enabled, no_grad, set_grad_enabled
from kiln.tensor import Size, Tensor, device
from kiln import ops as _ops  # noqa: F401 - attaches the operations to Tensor
from kiln.creation import *  # noqa: F401,F403
from kiln.random import *  # noqa: F401,F403
from kiln.ops.elementwise import *  # noqa: F401,F403
from kiln.ops.reduce import *  # noqa: F401,F403
from kiln.ops.shape import *  # noqa: F401,F403
from kiln.ops.index import *  # noqa: F401,F403
from kiln.ops.linalg import *  # noqa: F401,F403
from kiln.ops.conv import *  # noqa: F401,F403
from kiln import autograd  # noqa: E402
from kiln import nn  # noqa: E402
from kiln import optim  # noqa: E402
from kiln.serialization import save, load  # noqa: E402
from kiln import utils  # noqa: E402
from kiln.graph.compiled import compile  # noqa: E402,A004 - PyTorch's name
from kiln.export import export, load_exported  # noqa: E402
from kiln import onnx  # noqa: E402 - light: imports the onnx package only when used

half, double, float, long, int, short = float16, float64, float32, int64, int32, int16  # noqa: A001

__version__ = "0.1.0"


def is_tensor(obj) -> bool:
    """True for Kiln tensors (and Parameters)."""
    return isinstance(obj, Tensor)


def numel(input: Tensor) -> int:
    return input.numel()


def result_type(tensor1, tensor2) -> dtype:
    """The dtype an operation on the two operands would produce (PyTorch's promotion)."""
    return _result_type(tensor1, tensor2)
