"""The graph IR: a typed SSA list of nodes, printable as text and checked by ``verify``.

A ``Graph`` has input nodes (op ``"input"``), constant nodes (op ``"const"``, the value in
``attrs["value"]``), primitive nodes (op = a primitive's registry name, attrs = its keyword
attributes) and fused nodes (op ``"fused"``, ``attrs["body"]`` = a sub-Graph whose inputs are
the fused node's inputs, in order, and whose single output is its result).  ``outputs`` maps
output names to nodes.  Nodes are kept in a valid execution order: every input of a node comes
before it.  Shapes hold ints, or ``Sym`` for a dynamic dimension (see ``kiln.graph.symbolic``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

_ids = itertools.count()


class Node:
    """One SSA value: ``op(inputs, **attrs) -> shape, dtype``; ``loc`` is the user's source."""

    __slots__ = ("id", "op", "inputs", "attrs", "shape", "dtype", "loc", "name", "kind")

    def __init__(self, op: str, inputs: tuple, attrs: dict, shape: tuple, dtype,
                 loc: str = "", name: str = "", kind: str = "") -> None:
        self.id = next(_ids)
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.loc = loc  # "file.py:12 (in fn)" for nodes traced from user code
        self.name = name  # inputs: the argument or captured tensor's name
        self.kind = kind  # inputs: "arg", "captured" or "lifted"

    def remapped(self, remap: dict) -> Node:
        """This node, or a copy reading ``remap.get(i, i)`` for each input ``i`` when a pass
        replaced one of them (passes never mutate nodes)."""
        inputs = tuple(remap.get(i, i) for i in self.inputs)
        if all(a is b for a, b in zip(inputs, self.inputs)):
            return self
        return Node(self.op, inputs, dict(self.attrs), self.shape, self.dtype, loc=self.loc,
                    name=self.name, kind=self.kind)

    def __repr__(self) -> str:
        return f"<node %{self.id} {self.op} {type_str(self)}>"


class Graph:
    """Inputs, nodes in execution order and named outputs."""

    def __init__(self) -> None:
        self.inputs: list[Node] = []
        self.nodes: list[Node] = []  # consts and computations, in execution order
        self.outputs: dict[str, Node] = {}

    # -- building --------------------------------------------------------------------------------
    def add_input(self, name: str, shape, dtype, kind: str = "arg") -> Node:
        n = Node("input", (), {}, shape, dtype, name=name, kind=kind)
        self.inputs.append(n)
        return n

    def add_const(self, value: np.ndarray, loc: str = "") -> Node:
        value = np.asarray(value)
        n = Node("const", (), {"value": value}, value.shape, value.dtype, loc=loc)
        self.nodes.append(n)
        return n

    def add(self, op: str, inputs, attrs: dict | None = None, shape=None, dtype=None,
            loc: str = "") -> Node:
        """Append a primitive node; shape and dtype default to the primitive's shape rule."""
        attrs = dict(attrs or {})
        if shape is None or dtype is None:
            shape, dtype = infer(op, inputs, attrs)
        n = Node(op, tuple(inputs), attrs, shape, dtype, loc=loc)
        self.nodes.append(n)
        return n

    def copy(self) -> Graph:
        """A shallow structural copy: same Node objects, new lists (passes build new graphs)."""
        g = Graph()
        g.inputs = list(self.inputs)
        g.nodes = list(self.nodes)
        g.outputs = dict(self.outputs)
        return g

    def rebuilt(self, nodes: list, remap: dict) -> Graph:
        """A copy with ``nodes`` as its body and outputs redirected through ``remap`` (a pass's
        old node -> new node map); inputs are kept."""
        g = self.copy()
        g.nodes = nodes
        g.outputs = {k: remap.get(v, v) for k, v in self.outputs.items()}
        return g

    # -- reading ---------------------------------------------------------------------------------
    def users(self) -> dict[Node, list[Node]]:
        """For every node, the nodes that read it (outputs are not listed)."""
        out: dict[Node, list[Node]] = {n: [] for n in itertools.chain(self.inputs, self.nodes)}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def counts(self) -> dict[str, int]:
        """Number of nodes per op (fused bodies count as one ``fused`` node)."""
        c: dict[str, int] = {}
        for n in self.nodes:
            c[n.op] = c.get(n.op, 0) + 1
        return c

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        return format_graph(self)


def infer(op: str, inputs, attrs: dict):
    """Output (shape, numpy dtype) of primitive ``op`` applied to ``inputs`` (Nodes)."""
    from kiln.graph.symbolic import has_sym
    from kiln.ops.registry import REGISTRY

    shapes = [n.shape for n in inputs]
    if any(has_sym(s) for s in shapes) or has_sym(attrs):
        raise ValueError(f"{op}: give shape and dtype explicitly for dynamic shapes")
    shape, dtype = REGISTRY[op].infer(shapes, [n.dtype for n in inputs], **attrs)
    return tuple(shape), np.dtype(dtype)


# -- text form -------------------------------------------------------------------------------

_SHORT = {"float32": "f32", "float64": "f64", "float16": "f16", "int64": "i64", "int32": "i32",
          "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool"}


def type_str(n: Node) -> str:
    return f"{_SHORT.get(n.dtype.name, n.dtype.name)}[{','.join(str(d) for d in n.shape)}]"


def _attr_str(v: Any) -> str:
    if isinstance(v, np.ndarray):
        if v.size <= 4:
            return np.array2string(v, separator=",", threshold=4).replace("\n", "")
        return f"<{v.dtype.name}{list(v.shape)}>"
    if isinstance(v, Graph):
        return f"<{len(v.nodes)} nodes>"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_node(n: Node, names: dict) -> str:
    ref = names.get
    if n.op == "const":
        body = f"const {_attr_str(n.attrs['value'])}"
    else:
        args = [ref(i, f"%{i.id}") for i in n.inputs]
        args += [f"{k}={_attr_str(v)}" for k, v in n.attrs.items() if k != "body"]
        body = f"{n.op}({', '.join(args)})"
    line = f"  %{n.id}: {type_str(n)} = {body}"
    if n.loc:
        line = f"{line:<72}  # {n.loc}"
    if n.op == "fused":
        inner = format_graph(n.attrs["body"], indent="      ")
        line += "\n" + inner
    return line


def format_graph(g: Graph, indent: str = "") -> str:
    """The graph as text: a signature line, one line per node, and the outputs."""
    names = {n: n.name or f"%{n.id}" for n in g.inputs}
    sig = ", ".join(f"{names[n]}: {type_str(n)}" for n in g.inputs)
    lines = [f"graph({sig}) {{"]
    lines += [format_node(n, names) for n in g.nodes]
    outs = ", ".join(f"{k}={names.get(v, f'%{v.id}')}" for k, v in g.outputs.items())
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(indent + line for line in lines)


# -- checking ------------------------------------------------------------------------------------

class GraphError(Exception):
    """A graph that breaks the IR's invariants (a bug in a pass, not in user code)."""


def verify(g: Graph) -> None:
    """Check the invariants: known ops, inputs defined before use, SSA, outputs defined, and
    (where shapes are concrete) every node's shape and dtype equal to its shape rule's."""
    from kiln.graph.symbolic import has_sym
    from kiln.ops.registry import REGISTRY

    defined: set = set()
    for n in g.inputs:
        if n.op != "input":
            raise GraphError(f"graph input %{n.id} has op {n.op!r}")
        if n in defined:
            raise GraphError(f"input %{n.id} listed twice")
        defined.add(n)
    for n in g.nodes:
        if n in defined:
            raise GraphError(f"%{n.id} ({n.op}) appears twice")
        for i in n.inputs:
            if i not in defined:
                raise GraphError(f"%{n.id} ({n.op}) reads %{i.id} before it is defined")
        if n.op == "const":
            v = n.attrs.get("value")
            if not isinstance(v, np.ndarray) or v.shape != n.shape or v.dtype != n.dtype:
                raise GraphError(f"const %{n.id}: value does not match {type_str(n)}")
        elif n.op == "fused":
            body = n.attrs.get("body")
            if not isinstance(body, Graph) or len(body.inputs) != len(n.inputs):
                raise GraphError(f"fused %{n.id}: body must be a Graph with one input per input")
            if len(body.outputs) != 1:
                raise GraphError(f"fused %{n.id}: body must have exactly one output")
            verify(body)
        elif n.op not in REGISTRY:
            raise GraphError(f"%{n.id}: unknown primitive {n.op!r}")
        elif not (any(has_sym(i.shape) for i in n.inputs) or has_sym(n.attrs)):
            try:
                shape, dtype = REGISTRY[n.op].infer([i.shape for i in n.inputs],
                                                    [i.dtype for i in n.inputs], **n.attrs)
            except Exception as e:
                raise GraphError(f"%{n.id} ({n.op}): shape rule failed: {e}") from None
            if tuple(shape) != n.shape or np.dtype(dtype) != n.dtype:
                raise GraphError(
                    f"%{n.id} ({n.op}): recorded {type_str(n)} but the shape rule gives "
                    f"{np.dtype(dtype).name}{list(shape)}"
                )
        defined.add(n)
    for name, n in g.outputs.items():
        if n not in defined:
            raise GraphError(f"output {name!r} is %{n.id}, which is not in the graph")
