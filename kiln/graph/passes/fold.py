"""Constant folding: evaluate at compile time the nodes whose inputs are all constants."""

from __future__ import annotations

import math

import numpy as np

from kiln.graph.ir import Graph, Node
from kiln.graph.passes.dce import is_random
from kiln.graph.symbolic import has_sym

# Results with more elements than this are computed at run time instead: a folded constant is
# stored in the graph (and in saved artifacts), and a broadcast or arange-like result can be
# far larger than the constants it came from.
FOLD_LIMIT = 100_000


def _fold_value(n: Node, args: list):
    """``n``'s value computed from constant ``args``, or None when it must not be folded."""
    from kiln.ops.registry import REGISTRY

    prim = REGISTRY.get(n.op)
    if prim is None or is_random(n) or has_sym(n.attrs) or has_sym(n.shape):
        return None
    if math.prod(n.shape) > FOLD_LIMIT:
        return None
    try:
        # A floating-point warning (overflow, 0/0, log(0); underflow aside) or an error (integer
        # division by zero) is left to run time, so folding never changes what a run reports.
        with np.errstate(all="raise", under="ignore"):
            out = prim.impl(*args, **n.attrs)
    except Exception:
        return None
    # A fresh contiguous array: the impl may return a view of a constant (reshape, expand).
    out = np.array(out, copy=True, order="C")
    if out.shape != n.shape or out.dtype != n.dtype:
        return None  # the node's recorded type wins; leave it to run time
    return out


def fold(g: Graph) -> Graph:
    """A copy of ``g`` where every non-random primitive node whose inputs are all constants is
    replaced by a constant holding its value (with the node's ``loc``).

    Folding cascades through chains of such nodes.  Not folded: random nodes, fused nodes,
    nodes with a ``Sym`` in their attrs or shape, results with more than ``FOLD_LIMIT``
    elements, and nodes whose evaluation warns or fails (left to run time).  The constants
    they read stay in the graph until ``dce`` removes the unused ones.

    >>> import numpy as np
    >>> from kiln.graph.ir import Graph
    >>> g = Graph()
    >>> g.outputs["y"] = g.add("neg", [g.add_const(np.float32(2.0))])
    >>> fold(g).outputs["y"].attrs["value"]
    array(-2., dtype=float32)
    """
    new: dict[Node, Node] = {}
    nodes: list[Node] = []
    for n in g.nodes:
        inputs = tuple(new.get(i, i) for i in n.inputs)
        m = n
        if n.op not in ("const", "fused") and all(i.op == "const" for i in inputs):
            value = _fold_value(n, [i.attrs["value"] for i in inputs])
            if value is not None:
                m = Node("const", (), {"value": value}, value.shape, value.dtype, loc=n.loc)
        if m is n:
            m = n.remapped(new)
        if m is not n:
            new[n] = m
        nodes.append(m)
    return g.rebuilt(nodes, new)
