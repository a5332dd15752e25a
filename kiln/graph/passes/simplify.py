"""Algebraic simplification: rewrites that give bit-identical results in floating point."""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph, Node

_NUMERIC = "iuf"  # numpy kinds on which neg and sub are defined (bool raises)


def _same_type(x: Node, n: Node) -> bool:
    """``x`` can stand for ``n``: the same shape and dtype (no broadcasting, no promotion)."""
    return x.shape == n.shape and x.dtype == n.dtype


def _const(c: Node, dtype):
    """The value of ``c`` when it is a constant of ``dtype``, else None."""
    if c.op != "const" or c.dtype != dtype:
        return None
    return c.attrs["value"]


def _is_ones(c: Node, dtype) -> bool:
    v = _const(c, dtype)
    return v is not None and bool(np.all(v == 1))


def _is_zero(c: Node, dtype, negative: bool) -> bool:
    """All zeros; for floats, all of the given sign: x + (-0.0) and x - (+0.0) are exactly x
    for every x, while x + 0.0 turns -0.0 into +0.0 and x - (-0.0) does too."""
    v = _const(c, dtype)
    if v is None or not np.all(v == 0):
        return False
    return v.dtype.kind != "f" or bool(np.all(np.signbit(v) == negative))


def _binary(n: Node):
    """``n`` (mul, div, add or sub) is one of its operands when the other is a neutral constant.

    ``_same_type`` rejects a neutral constant that broadcasts the operand to a bigger shape.
    ``div`` only for floats: on integers its result is a float although its shape rule
    gives the input dtype.
    """
    a, b = n.inputs
    if n.op == "mul":
        if _is_ones(b, a.dtype) and _same_type(a, n):
            return a
        if _is_ones(a, b.dtype) and _same_type(b, n):
            return b
    elif n.op == "div":
        if a.dtype.kind == "f" and _is_ones(b, a.dtype) and _same_type(a, n):
            return a
    elif n.op == "add":
        if _is_zero(b, a.dtype, negative=True) and _same_type(a, n):
            return a
        if _is_zero(a, b.dtype, negative=True) and _same_type(b, n):
            return b
    elif n.op == "sub":
        if a.dtype.kind in _NUMERIC and _is_zero(b, a.dtype, negative=False) and _same_type(a, n):
            return a
    return None


def _rewrite(n: Node):
    """A node equal to ``n`` (an existing one or a new one), or None if no rule applies."""
    if n.op in ("mul", "div", "add", "sub"):
        return _binary(n)
    if n.op == "neg":
        (x,) = n.inputs
        if x.op == "neg" and x.dtype.kind in _NUMERIC and _same_type(x.inputs[0], n):
            return x.inputs[0]  # negation flips the sign bit; integers wrap both ways
        return None
    if n.op == "cast":
        (x,) = n.inputs
        return x if np.dtype(n.attrs["dtype"]) == x.dtype and _same_type(x, n) else None
    if n.op == "expand":
        (x,) = n.inputs
        return x if _same_type(x, n) else None
    if n.op == "reshape":
        (x,) = n.inputs
        if x.op == "reshape":  # both reshapes read the elements in C order: one is enough
            x = x.inputs[0]
            n = Node("reshape", (x,), dict(n.attrs), n.shape, n.dtype, loc=n.loc)
        return x if _same_type(x, n) else n
    if n.op == "permute":
        (x,) = n.inputs
        ndim = len(x.shape)
        dims = tuple(d % ndim for d in n.attrs["dims"]) if ndim else ()
        if x.op == "permute":  # output dim i is x's dim dims[i], which is its input's inner[..]
            inner = tuple(d % ndim for d in x.attrs["dims"])
            x = x.inputs[0]
            dims = tuple(inner[d] for d in dims)
            n = Node("permute", (x,), {"dims": dims}, n.shape, n.dtype, loc=n.loc)
        return x if dims == tuple(range(ndim)) and _same_type(x, n) else n
    return None


def simplify(g: Graph) -> Graph:
    """A copy of ``g`` with exact algebraic identities applied.

    Rules, each only when the result has the node's own shape and dtype: ``x*1``, ``1*x``,
    ``x/1`` (floats), ``x + (-0.0)``, ``x - 0.0`` (``x + 0`` and ``0 + x`` for integers and
    bools only, since ``-0.0 + 0.0`` is ``+0.0``), ``neg(neg(x))``, ``cast`` to x's dtype,
    ``expand`` or ``reshape`` to x's shape and identity ``permute`` become ``x``;
    ``reshape(reshape(x))`` becomes one reshape and ``permute(permute(x))`` one permute.
    A "1" or "0" is a constant of x's dtype whose elements all are that value.

    A rewritten node's users and outputs read its replacement.  Nodes it read may become
    dead (the constant, the inner ``neg``): run ``dce`` after.

    >>> import numpy as np
    >>> from kiln.graph.ir import Graph
    >>> g = Graph()
    >>> x = g.add_input("x", (2,), np.float32)
    >>> g.outputs["y"] = g.add("mul", [x, g.add_const(np.ones(2, np.float32))])
    >>> simplify(g).outputs["y"] is x
    True
    """
    new: dict[Node, Node] = {}
    nodes: list[Node] = []
    known = set(g.inputs)
    for n in g.nodes:
        m = n.remapped(new)
        r = _rewrite(m) if m.op not in ("const", "fused") else None
        if r is not None:
            m = r
        if m is not n:
            new[n] = m
        if m not in known:  # a rewrite to an existing node adds no node
            known.add(m)
            nodes.append(m)
    out = g.copy()
    out.nodes = nodes
    out.outputs = {k: new.get(v, v) for k, v in g.outputs.items()}
    return out
