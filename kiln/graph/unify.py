"""Merge two traces of one function at different batch sizes into one graph with a ``Sym``."""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph, Node
from kiln.graph.symbolic import CannotUnify, rebuild, unify_value


def unify(a: Graph, b: Graph, name: str, n1: int, n2: int) -> Graph:
    """A graph equal to ``a`` (traced at size ``n1``) and ``b`` (at ``n2``) where they agree, and
    with ``Sym(name, ...)`` where they differ by a linear function of the size; raises
    CannotUnify when they differ in any other way (different ops, constants, structure)."""
    if len(a.inputs) != len(b.inputs) or len(a.nodes) != len(b.nodes):
        raise CannotUnify("the traces have different lengths")
    if list(a.outputs) != list(b.outputs):
        raise CannotUnify("the traces have different outputs")
    g = Graph()
    new: dict = {}
    for x, y in zip(a.inputs, b.inputs):
        if (x.kind, x.name, x.dtype) != (y.kind, y.name, y.dtype):
            raise CannotUnify(f"input {x.name} differs")
        n = g.add_input(x.name, unify_value(x.shape, y.shape, name, n1, n2), x.dtype, x.kind)
        new[x] = n
        new[y] = n
    pos_a = {n: i for i, n in enumerate(a.inputs)}
    pos_b = {n: i for i, n in enumerate(b.inputs)}
    pos_a.update({n: len(a.inputs) + i for i, n in enumerate(a.nodes)})
    pos_b.update({n: len(b.inputs) + i for i, n in enumerate(b.nodes)})
    for x, y in zip(a.nodes, b.nodes):
        if x.op != y.op or x.dtype != y.dtype or len(x.inputs) != len(y.inputs):
            raise CannotUnify(f"%{x.id} {x.op} vs %{y.id} {y.op}")
        if [pos_a[i] for i in x.inputs] != [pos_b[i] for i in y.inputs]:
            raise CannotUnify(f"%{x.id} {x.op} reads different values")
        if x.op == "const":
            va, vb = x.attrs["value"], y.attrs["value"]
            if va.shape != vb.shape or not np.array_equal(va, vb, equal_nan=True):
                n = _uniform_const(x, va, vb, name, n1, n2)
                g.nodes += [n.inputs[0], n]
                new[x] = n
                new[y] = n
                continue
            attrs = x.attrs
        else:
            attrs = _unify_attrs(x.attrs, y.attrs, name, n1, n2)
        n = Node(x.op, [new[i] for i in x.inputs], attrs,
                 unify_value(x.shape, y.shape, name, n1, n2), x.dtype, loc=x.loc)
        g.nodes.append(n)
        new[x] = n
        new[y] = n
    for k in a.outputs:
        if pos_a[a.outputs[k]] != pos_b[b.outputs[k]]:
            raise CannotUnify(f"output {k} differs")
        g.outputs[k] = new[a.outputs[k]]
    return g


def _uniform_const(x: Node, va, vb, name, n1, n2) -> Node:
    """Two constants that differ only in a batch-sized shape and hold one repeated value (the
    zero initial state ``zeros(layers, B, H)`` of an RNN): a scalar constant expanded to the
    symbolic shape.  Anything else (``arange(B)``, a value that depends on the size) raises."""
    why = f"constant %{x.id} differs between the traces"
    if va.shape == vb.shape:
        raise CannotUnify(f"{why} (same shape {va.shape}, different values)")
    try:
        shape = unify_value(tuple(va.shape), tuple(vb.shape), name, n1, n2)
    except CannotUnify:
        raise CannotUnify(f"{why} (shapes {va.shape} and {vb.shape} are not a linear function "
                          f"of the batch size)") from None
    if va.size == 0 or vb.size == 0:
        raise CannotUnify(f"{why} (an empty constant)")
    s = va.reshape(-1)[:1].reshape(())
    if not (np.array_equal(va, np.broadcast_to(s, va.shape), equal_nan=True) and
            np.array_equal(vb, np.broadcast_to(s, vb.shape), equal_nan=True)):
        raise CannotUnify(f"{why} (shapes {va.shape} and {vb.shape}; its elements are not one "
                          "value repeated in both traces, e.g. an arange of the batch size)")
    c = Node("const", (), {"value": np.array(s)}, (), va.dtype, loc=x.loc)
    return Node("expand", [c], {"shape": shape}, shape, va.dtype, loc=x.loc)


def _unify_attrs(x, y, name, n1, n2):
    """Attributes may hold arrays, slices and dtypes as well as numbers and tuples."""
    if isinstance(x, dict):
        if not isinstance(y, dict) or x.keys() != y.keys():
            raise CannotUnify("attributes differ")
        return {k: _unify_attrs(x[k], y[k], name, n1, n2) for k in x}
    if isinstance(x, (tuple, list)):
        if type(x) is not type(y) or len(x) != len(y):
            raise CannotUnify(f"{x!r} vs {y!r}")
        return rebuild(x, [_unify_attrs(p, q, name, n1, n2) for p, q in zip(x, y)])
    if isinstance(x, np.ndarray):
        if not isinstance(y, np.ndarray) or x.shape != y.shape or not np.array_equal(x, y):
            raise CannotUnify("array attributes differ")
        return x
    if isinstance(x, slice):
        if not isinstance(y, slice):
            raise CannotUnify(f"{x!r} vs {y!r}")
        return slice(*_unify_attrs((x.start, x.stop, x.step), (y.start, y.stop, y.step),
                                   name, n1, n2))
    if isinstance(x, np.dtype) or x is Ellipsis:
        if x != y:
            raise CannotUnify(f"{x!r} vs {y!r}")
        return x
    return unify_value(x, y, name, n1, n2)


def difference(a: Graph, b: Graph) -> str:
    """'' when ``a`` and ``b`` are the same graph (ops, wiring, attributes, shapes, constants,
    symbols), else the first difference."""
    if len(a.inputs) != len(b.inputs) or len(a.nodes) != len(b.nodes):
        return "different lengths"
    pos_a = {n: i for i, n in enumerate(a.inputs + a.nodes)}
    pos_b = {n: i for i, n in enumerate(b.inputs + b.nodes)}
    for x, y in zip(a.inputs + a.nodes, b.inputs + b.nodes):
        if (x.op, x.kind, x.name, x.dtype) != (y.op, y.kind, y.name, y.dtype):
            return f"%{x.id} {x.op} vs %{y.id} {y.op}"
        if [pos_a[i] for i in x.inputs] != [pos_b[i] for i in y.inputs]:
            return f"%{x.id} {x.op} reads different values"
        if not _same(x.shape, y.shape) or not _same(x.attrs, y.attrs):
            return f"%{x.id} {x.op}{x.loc and ' at ' + x.loc}: {x.shape} {x.attrs} vs {y.shape} " \
                   f"{y.attrs}"[:300]
    if [pos_a[n] for n in a.outputs.values()] != [pos_b[n] for n in b.outputs.values()]:
        return "different outputs"
    return ""


def _same(x, y) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y))
    if isinstance(x, np.ndarray):
        return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
    if isinstance(x, slice):
        return _same((x.start, x.stop, x.step), (y.start, y.stop, y.step))
    if isinstance(x, float):
        return x == y or (x != x and y != y)
    return x == y
