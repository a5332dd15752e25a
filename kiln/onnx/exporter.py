"""``kiln.onnx.export``: a model or function of tensors -> an ONNX file.

The function is captured as ``kiln.export`` captures it (``kiln.export.trace.capture``: traced
under ``no_grad``, optimized, not fused), decomposed sequences are matched back to single
ONNX ops (``export_patterns``), and each primitive is written by its emitter
(``export_ops``).  The model is checked with ``onnx.checker.check_model(full_check=True)``
before the file is written (atomically), so a failed export never leaves a broken file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kiln.graph.symbolic import Sym
from kiln.onnx._deps import require
from kiln.onnx.export_emit import Emitter, ExportError
from kiln.serialization import write_atomic

DEFAULT_OPSET = 20  # Gelu is in opset 20; ONNX Runtime runs it everywhere we test
MIN_OPSET = 17  # LayerNormalization


def export(model_or_fn, example_inputs, path, *, opset=None, dynamic_dims=None,
           input_names=None, output_names=None):
    """Trace ``model_or_fn`` on ``example_inputs`` and write it to ``path`` as ONNX.

    ``dynamic_dims`` (``{"x": {0: "batch"}}``) makes dimension 0 of those inputs a named
    dynamic dimension; ``input_names``/``output_names`` rename the graph's inputs (tensor
    arguments, in order) and outputs (``dynamic_dims`` may use the new input names).  Returns
    the ``onnx.ModelProto`` that was written.
    """
    from kiln.export.trace import capture

    onnx = require("onnx")
    opset = _opset(onnx, opset)
    if dynamic_dims and input_names:  # keys may use the new names: to positions
        dynamic_dims = {input_names.index(k) if k in input_names else k: v
                        for k, v in dynamic_dims.items()}
    cap = capture(model_or_fn, example_inputs, dynamic_dims, who="kiln.onnx.export")
    prefix = "model." if _is_module(model_or_fn) else ""
    model = build_model(onnx, cap, opset, input_names, output_names, weight_prefix=prefix)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # ValidationError or shape inference's InferenceError
        raise ExportError(f"kiln.onnx.export: the ONNX model Kiln built does not pass "
                          f"onnx.checker (a Kiln bug; nothing was written): {e}") from None
    data = model.SerializeToString()
    write_atomic(os.fspath(path), lambda tmp: Path(tmp).write_bytes(data))
    return model


def _is_module(fn) -> bool:
    import inspect

    return hasattr(fn, "parameters") and not (inspect.isfunction(fn) or inspect.ismethod(fn))


def _opset(onnx, opset) -> int:
    top = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, top)
    if type(opset) is not int:
        raise TypeError(f"kiln.onnx.export: opset must be an int, got {type(opset).__name__}")
    if not MIN_OPSET <= opset <= top:
        raise ValueError(f"kiln.onnx.export: opset {opset} is not supported: use "
                         f"{MIN_OPSET}..{top} (this onnx package's newest is {top})")
    return opset


def _names(given, default: list, what: str) -> list:
    if given is None:
        return list(default)
    given = list(given)
    if len(given) != len(default) or not all(isinstance(s, str) and s for s in given):
        raise ValueError(f"kiln.onnx.export: {what} must be {len(default)} non-empty strings "
                         f"(the graph has {', '.join(default)}), got {given!r}")
    if len(set(given)) != len(given):
        raise ValueError(f"kiln.onnx.export: {what} has duplicates: {given!r}")
    return given


def _dim(d, sym_names: dict):
    if isinstance(d, Sym):
        return repr(Sym(sym_names.get(d.name, d.name), d.mul, d.add))
    return int(d)


def _value_info(onnx, em, name, n, sym_names):
    shape = [_dim(d, sym_names) for d in n.shape]
    return onnx.helper.make_tensor_value_info(name, em.tensor_type(n.dtype), shape)


def build_model(onnx, cap, opset: int, input_names=None, output_names=None,
                weight_prefix: str = ""):
    """The ``onnx.ModelProto`` of a ``kiln.export.trace.Captured`` at ``opset``.  Initializers
    keep the weights' graph input names, less ``weight_prefix`` (``"model."`` for a module:
    its ``state_dict`` keys)."""
    import kiln
    from kiln.onnx.export_patterns import rewrite

    g = rewrite(cap.graph)
    em = Emitter(onnx, opset)
    args = [n for n in cap.graph.inputs if n.kind == "arg"]
    in_names = _names(input_names, [n.name for n in args], "input_names")
    out_names = _names(output_names, list(cap.graph.outputs), "output_names")
    em.taken.update(in_names)
    em.taken.update(out_names)

    inputs = []
    for n, name in zip(args, in_names):
        em.names[n] = name
        inputs.append(_value_info(onnx, em, name, n, cap.sym_names))
        for axis, d in enumerate(n.shape):
            if isinstance(d, Sym):
                em.sym_sources.append((name, axis, d))
    weights = [n for n in cap.graph.inputs if n.kind != "arg"]
    for n, value in zip(weights, cap.weights):
        name = n.name or "weight"
        if weight_prefix and name.startswith(weight_prefix):
            name = name[len(weight_prefix):]
        em.names[n] = em.init(np.asarray(value, n.dtype), name)

    for n in g.nodes:
        if n.op == "const":
            em.names[n] = em.const(n.attrs["value"])
            continue
        em.names[n] = _emit(em, n)

    done: set = set()
    outputs = [_output(em, name, n, cap.sym_names, done)
               for name, n in zip(out_names, g.outputs.values())]
    graph = onnx.helper.make_graph(em.nodes, cap.name, inputs, outputs, initializer=em.inits)
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="kiln",
                                   producer_version=kiln.__version__)
    model.ir_version = onnx.helper.find_min_ir_version_for(opsets)
    return model


def _where(n) -> str:
    return f"at {n.loc}" if n.loc else "(no source location)"


def _emit(em, n) -> str:
    from kiln.onnx.export_ops import BACKWARD, EMIT, NO_ONNX, RANDOM

    fn = EMIT.get(n.op)
    if fn is None:
        if n.op in BACKWARD:
            why = ("is a backward-pass primitive and cannot be exported: export an inference "
                   "function (no .backward() inside it)")
        elif n.op in RANDOM:
            why = ("draws random numbers and cannot be exported: call model.eval() (dropout) or "
                   "pass the random values in as inputs")
        else:
            why = f"has no ONNX equivalent in opset {em.opset}"
            if n.op in NO_ONNX:
                why += f" ({NO_ONNX[n.op]})"
        raise ExportError(f"kiln.onnx.export: primitive {n.op!r} {_where(n)} {why}")
    try:
        return fn(em, n, [em[i] for i in n.inputs])
    except ExportError as e:
        raise ExportError(f"kiln.onnx.export: primitive {n.op!r} {_where(n)} cannot be "
                          f"exported to ONNX opset {em.opset}: {e}") from None


def _output(em, name: str, n, sym_names, done: set):
    """Name the value of ``n`` ``name``: rename the node that made it (unless it is an input,
    an initializer or already another output), else add an Identity."""
    value = em[n]
    producer = next((p for p in em.nodes if value in p.output), None)
    if producer is not None and value not in done:
        for p in em.nodes:
            for k, v in enumerate(p.input):
                if v == value:
                    p.input[k] = name
        for k, v in enumerate(producer.output):
            if v == value:
                producer.output[k] = name
        for m, v in em.names.items():
            if v == value:
                em.names[m] = name
    else:
        em.nodes.append(em.onnx.helper.make_node("Identity", [value], [name],
                                                 name=em.fresh("Identity_out")))
    done.add(name)
    return _value_info(em.onnx, em, name, n, sym_names)
