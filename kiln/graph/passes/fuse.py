"""Elementwise fusion: merge single-use chains and trees of elementwise nodes into fused nodes."""

from __future__ import annotations

from kiln.graph.ir import Graph, Node

# ``copy``'s impl returns its source array itself (a value, not a computation): a fused group
# ending in it would alias one of its inputs, which the memory planner must be able to see.
_NOT_FUSED = frozenset({"copy"})


def fusible(n: Node) -> bool:
    """True if ``n`` may join a fused group: a deterministic elementwise primitive."""
    from kiln.ops.registry import REGISTRY

    prim = REGISTRY.get(n.op)
    return (prim is not None and "elementwise" in prim.traits and "random" not in prim.traits
            and not prim.is_view and n.op not in _NOT_FUSED)


def _groups(g: Graph) -> dict[Node, list[Node]]:
    """{group root: members in execution order} for every group of two or more nodes."""
    users = g.users()
    outputs = set(g.outputs.values())
    taken: set = set()
    groups: dict[Node, list[Node]] = {}
    # Nodes are in execution order: walking backwards meets every consumer before its producers,
    # so each group grows from its last node (the root) towards its inputs.
    for root in reversed(g.nodes):
        if root in taken or not fusible(root):
            continue
        taken.add(root)
        members, stack = {root}, [root]
        while stack:
            m = stack.pop()
            for i in m.inputs:
                # One distinct user (so nothing is computed twice) and not an output (so the
                # group has one result); ``mul(t, t)`` still counts as one user of ``t``.
                if (i not in taken and fusible(i) and i not in outputs
                        and set(users[i]) == {m}):
                    taken.add(i)
                    members.add(i)
                    stack.append(i)
        if len(members) > 1:
            groups[root] = members
    pos = {n: k for k, n in enumerate(g.nodes)}
    return {r: sorted(ms, key=pos.__getitem__) for r, ms in groups.items()}


def _fused_node(members: list[Node], remap: dict) -> Node:
    """One ``fused`` node computing ``members`` (the last one is the result)."""
    inside = set(members)
    body = Graph()
    ext: list[Node] = []  # the fused node's inputs, in order of first use
    local: dict[Node, Node] = {}
    for m in members:
        for i in m.inputs:
            if i not in inside and i not in local:
                local[i] = body.add_input(f"in{len(ext)}", i.shape, i.dtype)
                ext.append(i)
    for m in members:
        local[m] = Node(m.op, tuple(local[i] for i in m.inputs), dict(m.attrs), m.shape, m.dtype,
                        loc=m.loc)
        body.nodes.append(local[m])
    root = members[-1]
    body.outputs = {"out": local[root]}
    attrs = {"body": body, "ops": "+".join(m.op for m in members)}
    return Node("fused", tuple(remap.get(i, i) for i in ext), attrs, root.shape, root.dtype,
                loc=root.loc)


def fuse(g: Graph) -> Graph:
    """A copy of ``g`` where each group of elementwise nodes that feed only each other is one
    ``fused`` node, placed where the group's last node was.

    A node joins its consumer's group when it has exactly one user and is not a graph output,
    so every group has one result and no value is computed twice.  ``g`` is not modified: nodes
    that read a replaced node are copied.  Fused bodies run the same primitives in the same
    order, so the interpreter's results are bitwise unchanged.

    >>> import numpy as np
    >>> g = Graph()
    >>> x = g.add_input("x", (3,), np.float32)
    >>> g.outputs["y"] = g.add("tanh", [g.add("add", [g.add("mul", [x, x]), x])])
    >>> f = fuse(g)
    >>> f.counts(), f.nodes[0].attrs["ops"]
    ({'fused': 1}, 'mul+add+tanh')
    """
    groups = _groups(g)
    member_of = {m: r for r, ms in groups.items() for m in ms}
    remap: dict[Node, Node] = {}  # old node -> the node that now holds its value
    out = Graph()
    out.inputs = list(g.inputs)
    for n in g.nodes:
        root = member_of.get(n)
        if root is not None:
            if n is root:
                remap[n] = _fused_node(groups[root], remap)
                out.nodes.append(remap[n])
            continue  # the other members live inside the body
        m = n.remapped(remap)
        if m is not n:
            remap[n] = m
        out.nodes.append(m)
    out.outputs = {k: remap.get(v, v) for k, v in g.outputs.items()}
    return out
