"""Dead code elimination: drop the nodes whose value reaches no graph output."""

from __future__ import annotations

from kiln.graph.ir import Graph, Node


def is_random(n: Node) -> bool:
    """True if ``n`` draws random numbers: a primitive with the ``random`` trait, or a fused node
    whose body holds one.  Such nodes advance the generator, so passes must not drop, merge or
    evaluate them ahead of time."""
    from kiln.ops.registry import REGISTRY

    if n.op == "fused":
        return any(is_random(m) for m in n.attrs["body"].nodes)
    prim = REGISTRY.get(n.op)
    return prim is not None and "random" in prim.traits


def dce(g: Graph) -> Graph:
    """A copy of ``g`` without the nodes (computations and constants) that no output needs.

    Graph inputs always stay, so the signature does not change.  Random nodes stay even when
    their value is unused, together with what they read: eager mode would still have drawn
    their numbers, so removing them would shift every later draw of the generator and the
    compiled function would stop matching eager.  Fused bodies are not entered.

    >>> import numpy as np
    >>> from kiln.graph.ir import Graph
    >>> g = Graph()
    >>> x = g.add_input("x", (2,), np.float32)
    >>> unused = g.add("neg", [x])
    >>> g.outputs["y"] = g.add("exp", [x])
    >>> dce(g).counts()
    {'exp': 1}
    """
    live = set(g.outputs.values())
    # Nodes are in execution order, so one backward sweep sees every user before its inputs.
    for n in reversed(g.nodes):
        if n in live or is_random(n):
            live.add(n)
            live.update(n.inputs)
    out = g.copy()
    out.nodes = [n for n in g.nodes if n in live]
    return out
