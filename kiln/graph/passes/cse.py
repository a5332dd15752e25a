"""Common subexpression elimination: compute each distinct (op, inputs, attrs) once."""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph, Node
from kiln.graph.passes.dce import is_random
from kiln.graph.symbolic import Sym

CONST_MERGE_LIMIT = 64  # constants with at most this many elements are merged by value


class Unkeyable(Exception):
    """An attribute value that ``attr_key`` cannot turn into a hashable key."""


def attr_key(v):
    """A hashable key for an attribute value; equal keys mean equal values to the primitive.

    Types are part of the key (``1``, ``1.0`` and ``True`` differ) and floats compare by
    their bits (``0.0`` and ``-0.0`` differ, NaN equals NaN).  Raises ``Unkeyable`` for
    values of other kinds.

    >>> attr_key((1, None)) == attr_key((1, None)), attr_key(1) == attr_key(1.0)
    (True, False)
    """
    if v is None or v is Ellipsis:
        return (repr(v),)
    if isinstance(v, (bool, int, str)):
        return (type(v).__name__, v)
    if isinstance(v, float):
        return ("float", v.hex())
    if isinstance(v, complex):
        return ("complex", v.real.hex(), v.imag.hex())
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.hasobject:
            raise Unkeyable(type(v).__name__)
        return (type(v).__name__, a.dtype.str, a.shape, a.tobytes())
    if isinstance(v, np.dtype):
        return ("dtype", v.str)
    if isinstance(v, type):  # np.float32 and friends given as a dtype
        return ("type", v.__module__, v.__qualname__)
    if isinstance(v, Sym):
        return ("sym", v.name, v.mul, v.add)
    if isinstance(v, slice):
        return ("slice", attr_key(v.start), attr_key(v.stop), attr_key(v.step))
    if isinstance(v, (tuple, list)):  # the type tells kiln.ops.index.Slice from a tuple
        return (type(v),) + tuple(attr_key(x) for x in v)
    if isinstance(v, dict):
        return ("dict", frozenset((attr_key(k), attr_key(x)) for k, x in v.items()))
    raise Unkeyable(type(v).__name__)


def _node_key(n: Node):
    """The key under which ``n`` (inputs already rewritten) may be merged, or None."""
    if n.op == "const":
        value = n.attrs["value"]
        if value.size > CONST_MERGE_LIMIT or value.dtype.hasobject:
            return None
        return ("const", value.dtype.str, value.shape, value.tobytes())
    if n.op == "fused" or is_random(n):
        return None
    try:
        attrs = attr_key(n.attrs)
    except Unkeyable:
        return None
    return (n.op, tuple(id(i) for i in n.inputs), attrs, attr_key(n.shape), n.dtype.str)


def cse(g: Graph) -> Graph:
    """A copy of ``g`` where nodes with the same op, the same input nodes and equal attrs are
    computed once, and small equal constants (same dtype, shape and bytes) are stored once.

    The first occurrence is kept and later ones read it; outputs follow.  Random nodes are
    never merged (each draw is its own), nor fused nodes, nor nodes with an attribute that
    ``attr_key`` cannot key.

    >>> import numpy as np
    >>> from kiln.graph.ir import Graph
    >>> g = Graph()
    >>> x = g.add_input("x", (2,), np.float32)
    >>> g.outputs["y"] = g.add("mul", [g.add("exp", [x]), g.add("exp", [x])])
    >>> cse(g).counts()
    {'exp': 1, 'mul': 1}
    """
    new: dict[Node, Node] = {}  # node of g -> the node that replaces it
    seen: dict = {}  # key -> first node with it
    # Keys hold input ids: every node keyed stays referenced by ``nodes`` while seen lives.
    nodes: list[Node] = []
    for n in g.nodes:
        m = n.remapped(new)
        key = _node_key(m)
        if key is not None:
            first = seen.setdefault(key, m)
            if first is not m:
                new[n] = first
                continue
        if m is not n:
            new[n] = m
        nodes.append(m)
    return g.rebuilt(nodes, new)
