"""``ExportedProgram``: a loaded artifact's graph run by the codegen executor, with its inputs
checked at every call."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kiln.graph.compiled import _unflatten
from kiln.graph.ir import Graph
from kiln.graph.symbolic import Sym
from kiln.tensor import Tensor, _make


class InputSpec(NamedTuple):
    """One tensor input: its name, shape (a ``str`` for a dynamic dimension) and dtype."""

    name: str
    shape: tuple
    dtype: object  # a kiln dtype


def _dims_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class ExportedProgram:
    """A program read by ``kiln.load_exported``: call it with tensors or numpy arrays
    (positionally, or by input name) to get kiln tensors back, in the structure the exported
    function returned.  Outputs are not connected to autograd.

    Wrong inputs raise naming the input: ``TypeError`` for a missing, unexpected or non-tensor
    argument, ``RuntimeError`` for a wrong rank, dimension or dtype (as PyTorch's kernels do).
    """

    def __init__(self, graph: Graph, weights: list, structure, name: str, meta: dict) -> None:
        from kiln.backends.codegen import Executor
        from kiln.backends.kernels import writes_out
        from kiln.dtypes import from_numpy_dtype
        from kiln.export.trace import passes
        from kiln.graph.passes.memory import aliased_input, plan

        self.graph = graph  # as stored: optimized, not fused
        self.name = name
        self.kiln_version = meta.get("kiln_version")
        self.format_version = meta.get("format_version")
        self._args = [n for n in graph.inputs if n.kind == "arg"]
        self._weights = weights
        self._structure = structure
        self.input_specs = [
            InputSpec(n.name, tuple(str(d) if isinstance(d, Sym) else d for d in n.shape),
                      from_numpy_dtype(n.dtype))
            for n in self._args]
        self.output_names = list(graph.outputs)
        g = graph
        for p in passes(before_fuse=False):
            g = p(g)
        # an output that is (a view of) an input or a weight is copied: the caller owns it
        root = {n: n for n in g.inputs}
        for n in g.nodes:
            a = aliased_input(n)
            root[n] = n if a is None else root[a]
        self._copy = {k for k, n in g.outputs.items() if root[n].op == "input"}
        self._run = Executor(g, plan(g, writes_out, {}, returned=list(g.outputs)),
                             f"exported {name}", check_inputs=False)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.input_specs)
        return f"<kiln ExportedProgram {self.name}({ins}) -> {', '.join(self.output_names)}>"

    @property
    def source(self) -> str:
        """The generated Python code that runs the graph."""
        return self._run.source

    def __call__(self, *args, **kwargs):
        arrays = self._bind(args, kwargs)
        self._check(arrays)
        outs = self._run(arrays + self._weights)
        flat = [_make(outs[k].copy() if k in self._copy else outs[k]) for k in self.output_names]
        return _unflatten(self._structure, iter(flat))

    # -- checking the inputs ----------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict) -> list:
        names = [n.name for n in self._args]
        given = bind_by_name(self.name, names, args, kwargs)
        arrays = []
        for k in names:
            v = given[k]
            if isinstance(v, Tensor):
                v = v._data
            elif not isinstance(v, np.ndarray):
                raise TypeError(f"{self.name}: input {k!r} must be a kiln.Tensor or a numpy "
                                f"array, got {type(v).__name__}")
            arrays.append(v)
        return arrays

    def _check(self, arrays: list) -> None:
        env: dict = {}  # dynamic dimension -> (value, the input it came from)
        for n, spec, a in zip(self._args, self.input_specs, arrays):
            want = _dims_text(spec.shape)
            if a.ndim != len(n.shape):
                raise RuntimeError(f"{self.name}: input {n.name!r} must have {len(n.shape)} "
                                   f"dimension(s) {want}, got {a.ndim} with shape "
                                   f"{_dims_text(a.shape)}")
            if a.dtype != n.dtype:
                raise RuntimeError(f"{self.name}: input {n.name!r} must have dtype {spec.dtype}, "
                                   f"got {a.dtype.name}")
            for ax, (d, s) in enumerate(zip(n.shape, a.shape)):
                if not isinstance(d, Sym):
                    if d != s:
                        raise RuntimeError(f"{self.name}: input {n.name!r} dimension {ax} must be "
                                           f"{d} (shape {want}), got {s} (shape "
                                           f"{_dims_text(a.shape)})")
                    continue
                v, r = divmod(s - d.add, d.mul)
                if r or v < 1:
                    raise RuntimeError(f"{self.name}: input {n.name!r} dimension {ax} is {d} "
                                       f"(shape {want}), which cannot be {s}")
                seen = env.setdefault(d.name, (v, n.name))
                if seen[0] != v:
                    raise RuntimeError(f"{self.name}: input {n.name!r} dimension {ax} gives "
                                       f"{d.name} = {v}, but input {seen[1]!r} gave "
                                       f"{d.name} = {seen[0]}")


def bind_by_name(who: str, names: list, args: tuple, kwargs: dict) -> dict:
    """{input name: value} from positional and keyword arguments, as a Python call binds them:
    TypeError naming ``who`` for too many, unknown, repeated or missing inputs."""
    if len(args) > len(names):
        raise TypeError(f"{who}: takes {len(names)} input(s) ({', '.join(names)}) but "
                        f"{len(args)} were given")
    given = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{who}: got an unexpected input {k!r} (inputs: {', '.join(names)})")
        if k in given:
            raise TypeError(f"{who}: got multiple values for input {k!r}")
        given[k] = v
    missing = [k for k in names if k not in given]
    if missing:
        raise TypeError(f"{who}: missing input(s) {', '.join(map(repr, missing))}")
    return given
