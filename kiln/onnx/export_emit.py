"""The ONNX graph under construction: nodes, initializers (weights), constants, fresh names
and shape tensors.

``Emitter`` is what the per-primitive emitters (``export_ops``) write into.  Values are named
by strings; Kiln graph nodes map to the name of the ONNX value holding them.  Shapes may hold
``Sym`` (a dynamic dimension ``k*B + c``): ``Emitter.ints`` turns such a list into an int64
tensor computed from the ``Shape`` of an input that carries the dimension.
"""

from __future__ import annotations

import numpy as np

from kiln.graph.symbolic import Sym, has_sym


class ExportError(RuntimeError):
    """A graph that cannot be written as ONNX (an unsupported primitive or attribute)."""


class Emitter:
    """ONNX nodes and initializers for one graph, at one opset."""

    def __init__(self, onnx, opset: int) -> None:
        self.onnx = onnx
        self.opset = opset
        self.nodes: list = []  # onnx NodeProto
        self.inits: list = []  # onnx TensorProto
        self.names: dict = {}  # kiln Node -> onnx value name
        self.taken: set = set()
        self.sym_sources: list = []  # (onnx input name, axis, Sym) for dynamic dimensions
        self._consts: dict = {}
        self._sym_values: dict = {}

    # -- names -----------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = hint or "v"
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def __getitem__(self, n) -> str:
        return self.names[n]

    # -- building --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        """Append an ``op_type`` node; returns its output name (a list when ``n_out > 1``)."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(self.onnx.helper.make_node(
            op_type, list(inputs), outs, name=self.fresh(f"{op_type}_n"), **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, array: np.ndarray, name: str) -> str:
        """An initializer named ``name`` (made unique) holding ``array``."""
        name = self.fresh(name)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, value, dtype=None) -> str:
        """A ``Constant`` node (shared between equal small constants); initializers are kept for
        weights, so that an importer can tell what is trainable."""
        a = np.asarray(value, dtype)
        key = (a.dtype.str, a.shape, a.tobytes()) if a.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh("const")
        self.nodes.append(self.onnx.helper.make_node(
            "Constant", [], [name], name=self.fresh("Constant_n"),
            value=self.onnx.numpy_helper.from_array(np.asarray(a, order="C"), name)))
        if key is not None:
            self._consts[key] = name
        return name

    def scalar_like(self, value, n) -> str:
        """A 0-d constant of kiln node ``n``'s dtype."""
        return self.const(np.array(value, n.dtype))

    # -- integer vectors that may hold a dynamic dimension ---------------------------------------
    def ints(self, values) -> str:
        """An int64 1-D tensor of ``values`` (ints or ``Sym``)."""
        values = list(values)
        if not has_sym(values):
            return self.const(np.array(values, np.int64).reshape(len(values)))
        parts, run = [], []
        for v in values:
            if isinstance(v, Sym):
                if run:
                    parts.append(self.const(np.array(run, np.int64)))
                    run = []
                parts.append(self.sym(v))
            else:
                run.append(int(v))
        if run:
            parts.append(self.const(np.array(run, np.int64)))
        return parts[0] if len(parts) == 1 else self.op("Concat", parts, axis=0)

    def sym(self, s: Sym) -> str:
        """A 1-element int64 tensor holding the value of ``s`` at run time."""
        if s in self._sym_values:
            return self._sym_values[s]
        base = Sym(s.name)
        if base not in self._sym_values:
            src = next((x for x in self.sym_sources if x[2].name == s.name), None)
            if src is None:
                raise ExportError(f"no input carries the dynamic dimension {s.name}")
            inp, axis, d = src
            v = self.op("Shape", [inp], start=axis, end=axis + 1)
            if d.add:
                v = self.op("Sub", [v, self.const(np.array([d.add], np.int64))])
            if d.mul != 1:
                v = self.op("Div", [v, self.const(np.array([d.mul], np.int64))])
            self._sym_values[base] = v
        v = self._sym_values[base]
        if s.mul != 1:
            v = self.op("Mul", [v, self.const(np.array([s.mul], np.int64))])
        if s.add:
            v = self.op("Add", [v, self.const(np.array([s.add], np.int64))])
        self._sym_values[s] = v
        return v

    def axes_arg(self, op_type: str, x: str, axes, since: int, **attrs) -> str:
        """A reduction-style op whose ``axes`` became an input at opset ``since``."""
        if axes is None:
            return self.op(op_type, [x], **attrs)
        axes = [int(a) for a in axes]
        if self.opset >= since:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64))], **attrs)
        return self.op(op_type, [x], axes=axes, **attrs)

    def need(self, opset: int, op_type: str) -> None:
        """Raise unless the target opset has ``op_type`` (added in ``opset``)."""
        if self.opset < opset:
            raise ExportError(f"ONNX's {op_type} needs opset {opset} or newer")

    def tensor_type(self, dtype) -> int:
        return self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
