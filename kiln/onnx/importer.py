"""ONNX in: ``kiln.onnx.load(model)`` turns an ONNX model into a Kiln ``nn.Module``.

Float initializers become ``nn.Parameter``s (so the model can be fine-tuned); integer and bool
initializers, ``Constant`` nodes and everything computed only from them are static NumPy values,
folded once at load time.  ``forward`` walks the nodes in order with the operators of
``kiln.onnx.ops``, which are written in Kiln ops: the module has autograd and runs under
``kiln.compile``.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import NamedTuple

import numpy as np

from kiln.grad_mode import STATE
from kiln.nn.modules.module import Module
from kiln.nn.parameter import Parameter
from kiln.onnx.control import CONTROL
from kiln.onnx._deps import require
from kiln.onnx.ops import OpContext, table
from kiln.tensor import Tensor, _make

ONNX_DOMAINS = ("", "ai.onnx")
# Ops whose result must not be frozen at load time even when their inputs are constants.
NOT_FOLDABLE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                          "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
# ONNX element types Kiln has (TensorProto enum name -> numpy dtype).
SUPPORTED_TYPES = {"FLOAT": np.float32, "DOUBLE": np.float64, "FLOAT16": np.float16,
                   "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                   "UINT8": np.uint8, "BOOL": np.bool_}
# Types Kiln lacks that are computed in a wider type: exact for uint16 and uint32 (and uint64
# values below 2**63); bfloat16 values are exact in float32, where they are computed (rounded
# once, at the graph outputs).  ``OnnxModule.to_declared`` casts outputs back.
WIDENED = {"UINT16": np.int32, "UINT32": np.int64, "UINT64": np.int64, "BFLOAT16": np.float32}


# -- reading the model ---------------------------------------------------------------------------

def read_model(model):
    """A ModelProto from a path, bytes or ModelProto, with clear errors for bad input."""
    onnx = require("onnx")
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(model))
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"kiln.onnx.load: the bytes are not a valid ONNX model ({e})") from e
        return _not_empty(proto, "the bytes")
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path):
            raise IsADirectoryError(f"kiln.onnx.load: {path!r} is a directory, not an ONNX file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"kiln.onnx.load: no such file: {path!r}")
        try:
            proto = onnx.load(path)
        except Exception as e:
            raise ValueError(f"kiln.onnx.load: {path!r} is not a valid ONNX model "
                             f"({type(e).__name__}: {e})") from e
        return _not_empty(proto, repr(path))
    raise TypeError("kiln.onnx.load expects a path, bytes or an onnx.ModelProto, "
                    f"got {type(model).__name__}")


def _not_empty(proto, what: str):
    """Protobuf parses empty input as an empty message: refuse a model with no opset or graph."""
    if not proto.opset_import or not proto.graph.output:
        raise ValueError(f"kiln.onnx.load: {what} is not a valid ONNX model (it declares no "
                         "opset or no graph outputs; empty or truncated?)")
    return proto


def type_name(elem_type: int) -> str:
    onnx = require("onnx")
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def np_dtype(elem_type: int, what: str, declared: bool = False):
    """The numpy dtype Kiln computes ONNX element type ``elem_type`` in (``declared``: the
    type itself); TypeError if Kiln lacks it."""
    name = type_name(elem_type)
    if name in WIDENED:
        if declared:
            from onnx import helper

            return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        return np.dtype(WIDENED[name])
    if name not in SUPPORTED_TYPES:
        raise TypeError(f"{what} has ONNX element type {name}, which Kiln does not support "
                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    return np.dtype(SUPPORTED_TYPES[name])


def to_array(tensor_proto, what: str) -> np.ndarray:
    """A TensorProto as a NumPy array of a Kiln dtype (external data already loaded)."""
    dt = np_dtype(tensor_proto.data_type, what)
    from onnx import numpy_helper

    return np.array(numpy_helper.to_array(tensor_proto)).astype(dt, copy=False)


def decode_attr(attr, node_name: str):
    """An AttributeProto's value: ints, floats, str, lists, NumPy arrays for tensors."""
    onnx = require("onnx")
    A = onnx.AttributeProto
    if attr.type == A.TENSOR:
        return to_array(attr.t, f"attribute {attr.name!r} of node {node_name!r}")
    if attr.type == A.TENSORS:
        return [to_array(t, f"attribute {attr.name!r} of node {node_name!r}") for t in attr.tensors]
    if attr.type in (A.GRAPH, A.GRAPHS, A.SPARSE_TENSOR, A.SPARSE_TENSORS, A.TYPE_PROTO,
                     A.TYPE_PROTOS):
        return attr  # left to the operator, which can refuse it by name
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [_text(v) for v in value]
    return value


def _text(b: bytes):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def sanitize(name: str, taken: set) -> str:
    """A Module attribute name for ONNX value ``name`` (unique among ``taken``)."""
    s = re.sub(r"\W", "_", name) or "param"
    if s[0].isdigit():
        s = "p_" + s
    base, i = s, 1
    while s in taken:
        i += 1
        s = f"{base}_{i}"
    taken.add(s)
    return s


def node_label(node, index: int) -> str:
    return node.name or (node.output[0] if node.output else f"node{index}")


def running_statistics(graph) -> set:
    """Names of the initializers BatchNormalization nodes read as running mean and variance."""
    return {node.input[i] for node in graph.node if node.op_type == "BatchNormalization"
            for i in (3, 4) if len(node.input) > i}


# -- the module ----------------------------------------------------------------------------------

class OnnxModule(Module):
    """An ONNX graph as a Kiln module: call it with the graph inputs (positional or by name).

    Float initializers are parameters, except BatchNormalization's running statistics, which
    are buffers, and initializers holding infinities or NaNs (masks), which are constants;
    ``onnx_names`` maps each attribute name to its ONNX initializer name; ``input_names`` /
    ``output_names`` are the graph's.  One output returns a Tensor,
    several a tuple.
    """

    def __init__(self, proto):
        super().__init__()
        graph = proto.graph
        self.opset = _opset(proto)
        ops = table()
        check_ops(graph, ops)
        object.__setattr__(self, "_static", {})  # ONNX name -> NumPy value
        object.__setattr__(self, "_param_of", {})  # ONNX name -> attribute name
        self.onnx_names = {}
        taken: set = set()
        stats = running_statistics(graph)
        for init in graph.initializer:
            value = to_array(init, f"initializer {init.name!r}")
            if value.dtype.kind == "f" and np.isfinite(value).all():
                attr = sanitize(init.name, taken)
                if init.name in stats:  # as in nn.BatchNorm: state, not trained
                    self.register_buffer(attr, _make(value))
                else:
                    self.register_parameter(attr, Parameter(_make(value)))
                self._param_of[init.name] = attr
                self.onnx_names[attr] = init.name
            else:
                self._static[init.name] = value
        if graph.sparse_initializer:
            raise NotImplementedError("kiln.onnx.load: sparse initializers are not supported")
        known = set(self._static) | set(self._param_of)
        self.input_names = [i.name for i in graph.input if i.name not in known]
        self._input_types = {}  # the NumPy dtype Kiln computes each tensor input in
        self._input_shapes = {}  # declared shapes: ints, None for a named or unknown dimension
        for vi in graph.input:
            if vi.name not in known:
                self._input_types[vi.name] = _value_type(vi, "graph input")
                self._input_shapes[vi.name] = _declared_shape(vi)
        self.output_names = [o.name for o in graph.output]
        self.output_types = {}  # declared NumPy dtypes of the outputs, where the graph says
        for vo in graph.output:
            self.output_types[vo.name] = _value_type(vo, "graph output", declared=True)
        self._nodes = build_nodes(graph, ops, self.opset)
        self._fold()
        # the graph inputs as forward's parameters, for kiln.compile's and kiln.export's names
        P = inspect.Parameter
        taken_args: set = set()
        object.__setattr__(self, "__signature__", inspect.Signature(
            [P(sanitize(n, taken_args), P.POSITIONAL_OR_KEYWORD) for n in self.input_names]))

    def _fold(self) -> None:
        """Evaluate once the nodes whose inputs are all static; keep the rest for forward."""
        rest = []
        for node in self._nodes:
            if not node.control and node.op_type not in NOT_FOLDABLE and \
                    all(n == "" or n in self._static for n in node.ins):
                values = [self._static[n] if n else None for n in node.ins]
                self._static.update(zip(node.outs, _run_static(node, values, self.opset)))
            else:
                rest.append(node)
        self._nodes = rest

    def forward(self, *inputs, **by_name):
        env = dict(self._static)
        for onnx_name, attr in self._param_of.items():
            env[onnx_name] = getattr(self, attr)
        env.update(self._bind_inputs(inputs, by_name))
        run_nodes(self._nodes, env, self.opset)
        out = tuple(_tensor(env[n]) for n in self.output_names)
        return out[0] if len(out) == 1 else out

    def _bind_inputs(self, inputs, by_name) -> dict:
        from kiln.export.program import bind_by_name

        bound = bind_by_name("the ONNX model", self.input_names, inputs, by_name)
        for k, v in bound.items():
            bound[k] = _bind_value(k, v, self._input_types.get(k))
            _check_shape(k, bound[k], self._input_shapes.get(k))
        return bound

    def to_declared(self, outputs) -> list:
        """The outputs (as returned by ``forward``) as NumPy arrays of the declared ONNX types
        (undoing the widening of uint16/32/64 and bfloat16)."""
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [_declared(out, self.output_types.get(name))
                for name, out in zip(self.output_names, outputs)]

    def extra_repr(self) -> str:
        return (f"inputs={self.input_names}, outputs={self.output_names}, "
                f"nodes={len(self._nodes)}, opset={self.opset}")


def _value_type(vi, what: str, declared: bool = False):
    """The element dtype of a graph input/output (a tensor, a sequence of tensors or an
    optional of either); None when the graph does not say."""
    t = vi.type
    while True:
        kind = t.WhichOneof("value")
        if kind == "sequence_type":
            t = t.sequence_type.elem_type
        elif kind == "optional_type":
            t = t.optional_type.elem_type
        elif kind == "tensor_type":
            elem = t.tensor_type.elem_type
            return np_dtype(elem, f"{what} {vi.name!r}", declared) if elem else None
        elif kind is None:
            return None
        else:
            raise TypeError(f"{what} {vi.name!r} has type {kind}, which Kiln does not support "
                            "(tensors, sequences and optionals are)")


def _declared_shape(vi):
    """A tensor input's declared shape (None for a symbolic dimension), or None if not given."""
    t = vi.type
    if t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in t.tensor_type.shape.dim)


def _check_shape(name, v, want) -> None:
    if want is None or not isinstance(v, Tensor):
        return
    got = v._data.shape
    if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        dims = ", ".join("?" if w is None else str(w) for w in want)
        raise ValueError(f"ONNX model input {name!r} must have shape ({dims}) "
                         f"('?': any size), got {tuple(got)}")


def _bind_value(name, v, want):
    """A model input as Kiln values: a Tensor, a list of them (sequence) or None (empty
    optional); NumPy arrays of widened types are converted, dtypes checked."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_bind_value(name, x, want) for x in v]
    if not isinstance(v, Tensor):
        v = np.asarray(v)
        if want is not None and v.dtype != want and _widened(v.dtype):
            v = v.astype(want)
        v = _make(v)
    if want is not None and v._data.dtype != want:
        raise TypeError(f"ONNX model input {name!r} must have dtype {want}, got {v._data.dtype}")
    return v


def _declared(out, want):
    """An output as NumPy (lists for sequences, None for an empty optional), in the declared
    ONNX type."""
    if out is None:
        return None
    if isinstance(out, list):
        return [_declared(x, want) for x in out]
    a = np.asarray(out._data if isinstance(out, Tensor) else out)
    return a if want is None or a.dtype == want else a.astype(want)


def _widened(dt) -> bool:
    """A NumPy dtype Kiln computes in a wider type (uint16/32/64, bfloat16)."""
    return dt in (np.uint16, np.uint32, np.uint64) or dt.name == "bfloat16"


def _opset(proto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ONNX_DOMAINS:
            return imp.version
    return 1 if proto.ir_version < 3 else 21


class Node(NamedTuple):
    """One ONNX node ready to run (``control``: If/Loop/Scan, which see the enclosing scope)."""

    fn: object
    op_type: str
    name: str
    attrs: dict
    ins: list
    outs: list
    control: bool


def build_nodes(graph, ops, opset) -> list:
    """The nodes of ``graph``; the subgraphs of control-flow nodes become ``SubGraph``s."""
    nodes = []
    for i, node in enumerate(graph.node):
        name = node_label(node, i)
        control = node.op_type in CONTROL
        attrs = {}
        for a in node.attribute:
            if control and a.type == a.GRAPH:
                attrs[a.name] = SubGraph(a.g, ops, opset)
            else:
                attrs[a.name] = decode_attr(a, name)
        fn = CONTROL[node.op_type] if control else ops[node.op_type]
        nodes.append(Node(fn, node.op_type, name, attrs, list(node.input), list(node.output),
                          control))
    return nodes


def check_ops(graph, ops) -> None:
    """Refuse, listing every one, nodes from other domains and op types Kiln lacks."""
    foreign, unknown, kinds = [], [], set()

    def walk(g):
        for i, node in enumerate(g.node):
            label = f"{node_label(node, i)!r} ({node.op_type})"
            if node.domain not in ONNX_DOMAINS:
                foreign.append(f"{label} in domain {node.domain!r}")
            elif node.op_type not in ops and node.op_type not in CONTROL:
                unknown.append(label)
                kinds.add(node.op_type)
            for a in node.attribute:
                if a.type == a.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(graph)
    _check_dataflow(graph, set())
    if foreign:
        raise NotImplementedError("kiln.onnx.load: nodes from unsupported operator domains "
                                  f"(only the default ONNX domain is): {', '.join(foreign)}")
    if unknown:
        raise NotImplementedError(f"kiln.onnx.load: unsupported ONNX op types {sorted(kinds)}; "
                                  f"nodes: {', '.join(unknown)}")


def _check_dataflow(graph, outer: set) -> None:
    """Every node input must be defined before it is used (ONNX graphs are sorted)."""
    defined = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined:
                raise ValueError(f"kiln.onnx.load: input {name!r} of node "
                                 f"{node_label(node, i)!r} ({node.op_type}) is not a graph "
                                 "input, an initializer or the output of an earlier node")
        for a in node.attribute:
            for sub in ([a.g] if a.type == a.GRAPH else []) + list(a.graphs):
                _check_dataflow(sub, defined)
        defined.update(n for n in node.output if n)
    missing = [o.name for o in graph.output if o.name not in defined]
    if missing:
        raise ValueError(f"kiln.onnx.load: graph outputs {missing} are not computed by any node")


def run_nodes(nodes, env: dict, opset: int) -> None:
    """Run ``nodes`` in order, reading and writing values by name in ``env``."""
    ndarray = np.ndarray
    for node in nodes:
        values = [env[n] if n else None for n in node.ins]
        ctx = OpContext(node.op_type, node.name, node.attrs, opset, len(node.outs), values)
        if node.control:
            results = _as_tuple(_call(node.fn, ctx, values, env), ctx)
        elif all(v is None or type(v) is ndarray for v in values):
            results = _run_static(node, values, opset)
        else:
            results = _as_tuple(_call(node.fn, ctx, values), ctx)
        for o, r in zip(node.outs, results):
            if o:
                env[o] = r


class SubGraph:
    """The body of an If/Loop/Scan: run with the enclosing scope's values visible."""

    def __init__(self, graph, ops, opset):
        self.static = {t.name: to_array(t, f"initializer {t.name!r}") for t in graph.initializer}
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.nodes = build_nodes(graph, ops, opset)
        self.opset = opset

    def run(self, scope: dict, inputs) -> list:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the subgraph takes {len(self.input_names)} inputs, "
                             f"got {len(inputs)}")
        env = dict(scope)
        env.update(self.static)
        env.update(zip(self.input_names, inputs))
        run_nodes(self.nodes, env, self.opset)
        return [env[n] for n in self.output_names]


def _call(fn, ctx, values, scope=None):
    try:
        return fn(ctx, *values) if scope is None else fn(ctx, scope)
    except Exception as e:
        where = f"ONNX node {ctx.name!r} ({ctx.op_type}): "
        if str(e).startswith(where):  # the operator named its node already
            raise
        msg = where + str(e)
        try:
            err = type(e)(msg)
        except Exception:
            err = RuntimeError(msg)
        raise err.with_traceback(e.__traceback__) from e


def _as_tuple(result, ctx) -> tuple:
    # a tuple holds one value per output; a list from a one-output op is a sequence value
    if not (isinstance(result, tuple) or isinstance(result, list) and ctx.n_outputs > 1):
        result = (result,)
    if len(result) < ctx.n_outputs:
        raise RuntimeError(f"ONNX node {ctx.name!r} ({ctx.op_type}) gave {len(result)} outputs "
                           f"for {ctx.n_outputs}")
    return tuple(result)


def _run_static(entry, values, opset) -> tuple:
    """Run a node on static inputs outside autograd and tracing; NumPy results."""
    fn, op_type, name, attrs, ins, outs = entry[:6]
    tracer, grad = STATE.tracer, STATE.grad_enabled
    STATE.tracer, STATE.grad_enabled = None, False
    try:
        args = [_as_kiln(v) for v in values]
        ctx = OpContext(op_type, name, attrs, opset, len(outs), args)
        results = _as_tuple(_call(fn, ctx, args), ctx)
        return tuple(_static_value(r) for r in results)
    finally:
        STATE.tracer, STATE.grad_enabled = tracer, grad


def _as_kiln(v):
    """A static value as Kiln values (lists stay lists, None stays None)."""
    if v is None or isinstance(v, list):
        return None if v is None else [_as_kiln(x) for x in v]
    return _make(v)


def _static_value(r):
    if r is None or isinstance(r, list):
        return None if r is None else [_static_value(x) for x in r]
    return np.asarray(r._data if isinstance(r, Tensor) else r)


def _tensor(v):
    """A graph output as returned by forward: Tensors (lists of them for sequences)."""
    if isinstance(v, list):
        return [_tensor(x) for x in v]
    return _make(np.array(v)) if isinstance(v, np.ndarray) else v


def load(model) -> OnnxModule:
    """An ``OnnxModule`` running an ONNX model (a path, bytes or ``onnx.ModelProto``)."""
    proto = read_model(model)
    if proto.functions:  # model-local functions (torch.onnx's dynamo exporter makes them)
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    return OnnxModule(proto)
