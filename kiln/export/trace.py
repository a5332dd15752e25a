"""Export-time capture: a model's optimized, unfused graph, its weights and its signature.

The model runs through ``kiln.compile`` under ``kiln.no_grad()`` in its current mode.  With a
dynamic dimension it runs a second time with that dimension one larger (the example repeated
or cut along it), so that the compiled function merges the two traces into one graph where the
dimension is a symbol.  The graph is then optimized with the compile pipeline up to (not
including) fusion: fusion is the loader's job, so the artifact stays a list of primitives.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from kiln.graph.ir import Graph
from kiln.graph.symbolic import CannotUnify
from kiln.tensor import Tensor, _make


@dataclass
class Captured:
    """What the artifact stores: graph inputs are the tensor arguments, then the weights."""

    graph: Graph
    weights: list  # numpy arrays, one per graph input after the arguments
    structure: object  # the output structure (compile's out_spec)
    out_names: list
    dims: dict = field(default_factory=dict)  # dynamic dimension -> {"traced_at": [n1, n2, n3]}
    sym_names: dict = field(default_factory=dict)  # compile's symbol -> the user's name
    name: str = "graph"


def passes(before_fuse: bool) -> list:
    """The compile pipeline's passes before fusion (export) or from fusion on (load)."""
    from kiln.graph.optimize import PIPELINE

    names = [m for m, _ in PIPELINE]
    cut = names.index("fuse") if "fuse" in names else len(names)
    chosen = PIPELINE[:cut] if before_fuse else PIPELINE[cut:]
    return [getattr(importlib.import_module(f"kiln.graph.passes.{m}"), f) for m, f in chosen]


def _leaves(obj, out: list) -> None:
    """Tensors of ``obj`` in kiln.compile's argument order (depth first, dicts in order)."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _leaves(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _leaves(x, out)


def _map_leaves(obj, fn):
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_leaves(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    return obj


def example_args(example_inputs, who: str = "kiln.export") -> tuple:
    """The positional arguments: a tensor (or array) alone, or a tuple/list of arguments."""
    if isinstance(example_inputs, (Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"{who}: example_inputs must be a tensor or a tuple of arguments, "
                        f"got {type(example_inputs).__name__}")
    return tuple(_make(np.asarray(a)) if isinstance(a, np.ndarray) else a
                 for a in example_inputs)


def _dynamic_spec(dynamic_dims, names: list, leaves: list, who: str) -> tuple[str, list]:
    """(dimension name, [leaf index]) from ``{input: {0: "batch"}}`` (input: name or index)."""
    if not isinstance(dynamic_dims, dict):
        raise TypeError(f"{who}: dynamic_dims must be a dict like {{'x': {{0: 'batch'}}}}, "
                        f"got {type(dynamic_dims).__name__}")
    dim_names, chosen = set(), []
    for key, dims in dynamic_dims.items():
        if type(key) is int and -len(names) <= key < len(names):
            i = key % len(names)
        elif isinstance(key, str) and key in names:
            i = names.index(key)
        else:
            raise ValueError(f"{who}: dynamic_dims names {key!r}, which is not a tensor "
                             f"input (inputs: {', '.join(names)})")
        if not isinstance(dims, dict) or not dims:
            raise TypeError(f"{who}: dynamic_dims[{key!r}] must be a dict like "
                            f"{{0: 'batch'}}, got {dims!r}")
        ndim = leaves[i].ndim
        for d, dim_name in dims.items():
            if type(d) is not int or not -ndim <= d < ndim:
                raise ValueError(f"{who}: dynamic_dims[{key!r}]: {d!r} is not a dimension "
                                 f"of {names[i]} (shape {tuple(leaves[i].shape)})")
            if d % ndim != 0:
                raise ValueError(f"{who}: dynamic_dims[{key!r}]: only dimension 0 (the "
                                 f"batch dimension) can be dynamic, got dimension {d}")
            if not isinstance(dim_name, str) or not dim_name.isidentifier():
                raise ValueError(f"{who}: dynamic dimension name {dim_name!r} must be an "
                                 f"identifier")
            dim_names.add(dim_name)
        chosen.append(i)
    if len(dim_names) > 1:
        raise ValueError(f"{who}: one dynamic dimension is supported (dimension 0 of the "
                         f"inputs that have it), got {sorted(dim_names)}")
    sizes = {leaves[i].shape[0] for i in chosen}
    if len(sizes) > 1:
        desc = ", ".join(f"{names[i]} has {leaves[i].shape[0]}" for i in chosen)
        raise ValueError(f"{who}: inputs sharing the dynamic dimension must have the same "
                         f"size in the example ({desc})")
    return dim_names.pop(), sorted(set(chosen))


def capture(fn, example_inputs, dynamic_dims=None, who: str = "kiln.export") -> Captured:
    """Trace ``fn`` on the example inputs (twice with a dynamic dimension) into a Captured."""
    from kiln.graph.compiled import CompiledFunction
    from kiln.grad_mode import no_grad

    args = example_args(example_inputs, who)
    cf = CompiledFunction(fn, dynamic=True if dynamic_dims else False)
    try:
        with no_grad():
            cf(*args)
            e = _usable(cf, who)
            names = [n.name for n in e.traced.inputs if n.kind == "arg"]
            sym_names: dict = {}
            dims: dict = {}
            if dynamic_dims:
                leaves: list = []
                _leaves(args, leaves)
                dim, chosen = _dynamic_spec(dynamic_dims, names, leaves, who)
                n0 = leaves[chosen[0]].shape[0]
                if n0 < 1:
                    raise ValueError(f"{who}: the example's dynamic dimension {dim} is 0")
                n1 = max(n0, 2)  # size 1 is special (broadcasting): never trace at it
                n2 = n1 + 1
                picks = {id(leaves[i]) for i in chosen}

                def resize(n):
                    def f(t):
                        if id(t) not in picks:
                            return t
                        return _make(np.take(t._data, np.arange(n) % n0, axis=0))
                    return f

                if n1 != n0:
                    cf.entries.clear()
                    cf(*_map_leaves(args, resize(n1)))
                cf(*_map_leaves(args, resize(n2)))
                e = _usable(cf, who)
                if not e.sizes:
                    raise RuntimeError(f"{who}: could not make {dim} dynamic: "
                                       f"{_why_not(cf, n1, n2)}")
                n3 = 2 * n2 + 1  # a third, farther size checks the graph is linear in it
                cf(*_map_leaves(args, resize(n3)))
                if cf.misfit is not None:
                    raise RuntimeError(f"{who}: could not make {dim} dynamic: at size {n3} the "
                                       f"graph differs from the one traced at {n1} and {n2} "
                                       f"({cf.misfit[1]}): a size computed from {dim} that is "
                                       "not linear in it (such as n // 2)")
                sym_names = {s: dim for s in e.sizes}
                dims = {dim: {"traced_at": [n1, n2, n3]}}
            return _finish(cf, e, names, sym_names, dims, who)
    finally:
        cf.entries.clear()  # the artifact holds its own graph; drop the executors


def _usable(cf, who: str):
    if not cf.entries:
        raise RuntimeError(f"{who}: {cf.__name__} could not be captured as a graph: it "
                           "keeps tensors it computes (in a list, a global or an attribute)")
    e = cf.entries[0]
    if e.eager:
        raise RuntimeError(f"{who}: {cf.__name__} cannot be exported: {e.reason}")
    return e


def _why_not(cf, n1: int, n2: int) -> str:
    from kiln.graph.unify import unify

    if len(cf.entries) < 2:
        return "the second trace did not run"
    try:
        unify(cf.entries[1].traced, cf.entries[0].traced, "B", n1, n2)
    except CannotUnify as err:
        return (f"the traces at sizes {n1} and {n2} differ in more than that dimension "
                f"({err}); the model may branch on the size, read a constant that depends on "
                "it, or cache tensors between calls")
    return "the traces could not be merged (their captured tensors or outputs differ)"


def _finish(cf, e, names: list, sym_names: dict, dims: dict, who: str) -> Captured:
    if e.updates:
        state = ", ".join(name[len("update:"):] for _, name in e.updates)
        raise RuntimeError(f"{who}: {cf.__name__} writes to state while it runs ({state}); "
                           "an exported program is read-only: call model.eval() (BatchNorm "
                           "statistics) or export a function without in-place state updates")
    if len(set(names)) != len(names):
        raise RuntimeError(f"{who}: tensor inputs with the same name: {names}")
    g = e.traced.copy()
    for n, name in zip([n for n in g.inputs if n.kind == "arg"], names):
        n.name = name
    g.outputs = {k: v for k, v in g.outputs.items() if k in e.out_names}
    for p in passes(before_fuse=True):
        g = p(g)
    values = {}
    captured = [n for n in e.traced.inputs if n.kind == "captured"]
    for n, t in zip(captured, e.captured):
        values[n] = t._data
    lifted = [n for n in e.traced.inputs if n.kind == "lifted"]
    for n, (d, k) in zip(lifted, e.lifted):
        values[n] = np.array(d[k], np.float64)
    # only the weights something reads are kept; every argument stays (the caller passes it)
    read = {i for n in g.nodes for i in n.inputs} | set(g.outputs.values())
    g.inputs = [n for n in g.inputs if n.kind == "arg" or n in read]
    weights = [values[n] for n in g.inputs if n.kind != "arg"]
    return Captured(g, weights, _plain(e.out_spec), list(e.out_names), dims, sym_names,
                    cf.__name__)


def _plain(spec):
    """The output structure as data: named tuples (kiln.sort's result) become tuples."""
    if spec == "T" or spec[0] == "const":
        return spec
    if spec[0] == "dict":
        return ("dict", tuple((k, _plain(s)) for k, s in spec[1]))
    kind = "tuple" if spec[0] == "namedtuple" else spec[0]
    return (kind, tuple(_plain(s) for s in spec[1]))
