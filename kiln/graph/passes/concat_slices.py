"""Sums of slice gradients that tile a tensor become one concatenation (q, k, v of attention).

The gradient of ``qkv.split(C, dim=2)`` arrives as ``index_view_backward`` nodes (each a zero
tensor with one slab written) added together: three zero fills, three slab copies and two full
additions.  When the slabs tile one dimension exactly, the sum is ``cat`` of the slab values
plus ``0.0``: every element is its own slab's value with zeros added, and ``v + 0.0`` is exactly
what any number of those additions give (``-0.0`` becomes ``+0.0``, everything else is kept), so
the result is bitwise unchanged.
"""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph, Node
from kiln.graph.symbolic import has_sym


def _slab(index: tuple, shape: tuple):
    """(dim, start, stop) when ``index`` selects ``start:stop`` of one dimension of ``shape``
    and all of every other, else None."""
    from kiln.ops.index import Slice

    if len(index) > len(shape) or any(type(i) is not Slice for i in index):
        return None
    cut = [(k, a, b) for k, (a, b, s) in enumerate(index)
           if (a, b, s) != (0, shape[k], 1)]
    if len(cut) != 1 or index[cut[0][0]][2] != 1:
        return None
    return cut[0]


def _tree(root: Node, users: dict, outputs: set):
    """(internal adds, index_view_backward leaves) of the sum rooted at ``root``, or None."""
    def only_here(n: Node) -> bool:
        return len(users[n]) == 1 and n not in outputs

    adds, leaves, stack = [], [], [root]
    while stack:
        m = stack.pop()
        if m.op == "add" and (m is root or only_here(m)):
            if any(i.shape != root.shape or i.dtype != root.dtype for i in m.inputs):
                return None  # a broadcasting or promoting add is not a plain sum
            adds.append(m)
            stack.extend(m.inputs)
        elif (m.op == "index_view_backward" and m is not root and only_here(m)
              and m.shape == root.shape and m.dtype == root.dtype):
            leaves.append(m)
        else:
            return None
    return adds, leaves


def _tiling(leaves: list, shape: tuple):
    """(dim, leaves in order) when the leaves' slabs tile one dimension of ``shape``."""
    slabs = []
    for leaf in leaves:
        s = _slab(leaf.attrs["index"], shape)
        if s is None:
            return None
        d, a, b = s
        region = shape[:d] + (b - a,) + shape[d + 1:]
        if leaf.inputs[0].shape != region or leaf.inputs[0].dtype != leaf.dtype:
            return None
        slabs.append((d, a, b, leaf))
    if len({d for d, _, _, _ in slabs}) != 1:
        return None
    slabs.sort(key=lambda t: t[1])
    d = slabs[0][0]
    end = 0
    for _, a, b, _ in slabs:
        if a != end:
            return None
        end = b
    return (d, [leaf for _, _, _, leaf in slabs]) if end == shape[d] else None


def concat_slices(g: Graph) -> Graph:
    """A copy of ``g`` where each sum of ``index_view_backward`` nodes whose slabs tile one
    dimension is ``add(cat(slab values), 0.0)``; ``g`` is not modified.

    Only float sums of single-use nodes with concrete shapes are rewritten.

    >>> from kiln.ops.index import Slice
    >>> g = Graph()
    >>> a, b = g.add_input("a", (2, 1), np.float32), g.add_input("b", (2, 2), np.float32)
    >>> full = lambda i: {"shape": (2, 3), "index": (Slice(0, 2, 1), i)}
    >>> ga = g.add("index_view_backward", [a], full(Slice(0, 1, 1)))
    >>> gb = g.add("index_view_backward", [b], full(Slice(1, 3, 1)))
    >>> g.outputs["g"] = g.add("add", [ga, gb])
    >>> concat_slices(g).counts()
    {'cat': 1, 'const': 1, 'add': 1}
    """
    users = g.users()
    outputs = set(g.outputs.values())
    rewrite: dict[Node, tuple] = {}  # root add -> (dim, leaves in order)
    gone: set = set()
    for n in reversed(g.nodes):
        if (n.op != "add" or n in gone or n.dtype.kind != "f" or has_sym(n.shape)):
            continue
        found = _tree(n, users, outputs)
        if found is None:
            continue
        adds, leaves = found
        tiled = _tiling(leaves, n.shape)
        if tiled is None:
            continue
        rewrite[n] = tiled
        gone.update(adds)
        gone.update(leaves)
    if not rewrite:
        return g
    remap: dict[Node, Node] = {}
    out = Graph()
    out.inputs = list(g.inputs)
    for n in g.nodes:
        if n in rewrite:
            d, leaves = rewrite[n]
            cat = Node("cat", tuple(remap.get(x.inputs[0], x.inputs[0]) for x in leaves),
                       {"dim": d}, n.shape, n.dtype, loc=n.loc)
            zero = Node("const", (), {"value": np.zeros((), n.dtype)}, (), n.dtype, loc=n.loc)
            remap[n] = Node("add", (cat, zero), {}, n.shape, n.dtype, loc=n.loc)
            out.nodes += [cat, zero, remap[n]]
            continue
        if n in gone:
            continue
        m = n.remapped(remap)
        if m is not n:
            remap[n] = m
        out.nodes.append(m)
    out.outputs = {k: remap.get(v, v) for k, v in g.outputs.items()}
    return out
