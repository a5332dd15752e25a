"""The reference interpreter: runs a graph node by node with each primitive's numpy impl.

It is slow and simple on purpose: passes and the fast executor are tested against it.
"""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph
from kiln.graph.symbolic import Sym, has_sym, resolve


def bind_dims(g: Graph, arrays: list) -> dict:
    """Values of the dynamic dimensions, read from the input arrays' shapes."""
    env: dict = {}
    for n, a in zip(g.inputs, arrays):
        for d, s in zip(n.shape, np.shape(a)):
            if isinstance(d, Sym) and d.name not in env:
                env[d.name] = (s - d.add) // d.mul
    return env


def run(g: Graph, arrays: list, env: dict | None = None) -> dict:
    """Execute ``g`` on ``arrays`` (one per graph input, in order); return {output name: array}."""
    from kiln.ops.registry import REGISTRY

    if len(arrays) != len(g.inputs):
        raise ValueError(f"graph takes {len(g.inputs)} inputs, got {len(arrays)}")
    if env is None:
        env = bind_dims(g, arrays)
    vals = {n: np.asarray(a) for n, a in zip(g.inputs, arrays)}
    for n in g.nodes:
        if n.op == "const":
            vals[n] = n.attrs["value"]
        elif n.op == "fused":
            body = n.attrs["body"]
            vals[n] = next(iter(run(body, [vals[i] for i in n.inputs], env).values()))
        else:
            attrs = resolve(n.attrs, env) if has_sym(n.attrs) else n.attrs
            out = REGISTRY[n.op].impl(*[vals[i] for i in n.inputs], **attrs)
            vals[n] = out if type(out) is np.ndarray else np.asarray(out)
    return {name: vals[n] for name, n in g.outputs.items()}
