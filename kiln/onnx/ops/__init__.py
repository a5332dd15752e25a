"""ONNX operators written in Kiln ops: the importer's table, by op type.

Each operator is a function ``fn(ctx, *inputs)`` registered with ``@onnx_op("Relu", ...)``.
``inputs`` follow the node's input list; an omitted optional input is ``None``.  An input is a
Kiln ``Tensor`` (computed at run time) or a NumPy array (a static value: an integer
initializer, a ``Constant``, or anything computed only from static values, such as
``Shape`` of a tensor).  Operators that need a value while building the computation (a
Reshape's shape, Slice's starts, a Resize's scales) read it with ``ctx.static(i)``.  The function
returns a Tensor, a NumPy array (static result) or a tuple of them, one per node output.
Because they are written in Kiln ops, imported models have autograd and run under
``kiln.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPS: dict = {}


def table() -> dict:
    """The full table: imports every operator module of this package (each registers its ops)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return OPS


def onnx_op(*op_types: str):
    """Register the decorated function as the implementation of the given ONNX op types."""
    def register(fn):
        for op_type in op_types:
            if op_type in OPS:
                raise ValueError(f"ONNX op {op_type} is registered twice")
            OPS[op_type] = fn
        return fn
    return register


@dataclass
class OpContext:
    """What an operator sees of its node besides the inputs."""

    op_type: str
    name: str  # the node's name (or its first output's name when unnamed)
    attrs: dict  # attribute name -> decoded value (int, float, str, bytes, lists, numpy arrays)
    opset: int  # the model's opset version for the node's domain
    n_outputs: int
    inputs: list = field(default_factory=list)  # the input values, as passed to the op

    def attr(self, key: str, default=None):
        return self.attrs.get(key, default)

    def static(self, i: int):
        """Input ``i`` as a NumPy array, for values needed while building the computation."""
        import numpy as np

        from kiln.tensor import Tensor

        x = self.inputs[i] if i < len(self.inputs) else None
        if x is None or isinstance(x, np.ndarray):
            return x
        if isinstance(x, Tensor):
            from kiln.grad_mode import STATE
            from kiln.nn.parameter import Parameter

            if isinstance(x, Parameter):  # a float initializer in a static slot (Resize scales)
                return x._data.copy()  # read directly: also while kiln.compile traces
            if STATE.tracer is not None:
                raise ValueError(f"ONNX node {self.name!r} ({self.op_type}): input {i} must be "
                                 "known before the model runs (a constant or computed from "
                                 "shapes), but it is computed from the model's inputs, which "
                                 "kiln.compile cannot trace; run this model eagerly")
            return x.detach().numpy()  # a float initializer (Parameter) read as a static value
        return np.asarray(x)
