"""Kiln as an ONNX backend (``onnx.backend.base.Backend``), for the ONNX backend test suite.

>>> from kiln.onnx.backend import KilnBackend
>>> rep = KilnBackend.prepare("model.onnx")            # doctest: +SKIP
>>> outputs = rep.run([x])                             # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from kiln.grad_mode import no_grad
from kiln.onnx._deps import require
from kiln.onnx.importer import load, read_model

require("onnx")
import onnx.backend.base as _base  # noqa: E402 - after the clear install error


class KilnBackendRep(_base.BackendRep):
    """A loaded model; ``run(inputs)`` returns the outputs as a list of NumPy arrays."""

    def __init__(self, module):
        self.module = module

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            args, named = (), inputs
        elif isinstance(inputs, (list, tuple)):
            args, named = tuple(inputs), {}
        else:
            args, named = (inputs,), {}
        with no_grad():
            out = self.module(*args, **named)
        return self.module.to_declared(out)


class KilnBackend(_base.Backend):
    """Runs ONNX models with Kiln on the CPU."""

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        if not cls.supports_device(device):
            raise ValueError(f"Kiln runs ONNX models on the CPU only, not on {device!r}")
        return KilnBackendRep(load(read_model(model)))

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        """Run one NodeProto on NumPy inputs, through a one-node model."""
        onnx = require("onnx")
        helper = onnx.helper
        names = [n for n in node.input if n]
        arrays = [np.asarray(x) for x in inputs]
        graph_inputs = [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in zip(names, arrays)]
        graph_outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
        graph = helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return cls.prepare(model, device).run(arrays)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper().startswith("CPU")


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
run_node = KilnBackend.run_node
supports_device = KilnBackend.supports_device
