"""``kiln.compile``: trace a function into a graph, optimize it, cache it and replay it.

A compiled function keeps a small cache of entries, one per input signature (tensor shapes and
dtypes, the non-tensor arguments, grad mode, the training flag of every module it called, the
optimizer settings it read and which parameters had a ``.grad``).  A call whose signature
matches an entry runs that entry's executor on the arrays of the arguments and of the captured
tensors, writes in-place updates back and returns fresh tensors.  A call that matches nothing
runs the function eagerly once under the tracer (so its side effects happen exactly as in eager
mode) and keeps the graph for the next calls; the reason is recorded in ``history``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings

import numpy as np

from kiln.grad_mode import STATE
from kiln.graph.capture import Tracer, TraceError, user_location
from kiln.graph.ir import Graph, format_graph
from kiln.graph.symbolic import CannotUnify, Sym
from kiln.tensor import Tensor, _make

__all__ = ["compile", "CompiledFunction", "RecompileError", "TraceError"]

MAX_ENTRIES = 8


class RecompileError(RuntimeError):
    """``strict=True``: a call needed a new graph."""


def compile(fn=None, *, dynamic: bool | None = None, strict: bool = False,  # noqa: A001
            backend: str = "codegen"):
    """Compile ``fn`` (a function of tensors, or a module) into a static graph.

    Usable as ``kiln.compile(fn)``, ``@kiln.compile`` or ``@kiln.compile(strict=True)``.
    ``dynamic``: None detects a changing batch dimension and then serves every batch size with
    one graph; True does the same without counting it as a recompile; False compiles each shape
    separately.  ``strict=True`` raises ``RecompileError`` instead of recompiling.
    ``backend``: "codegen" (generated code, the fast executor) or "interpreter" (the reference).

    >>> import kiln
    >>> f = kiln.compile(lambda x: (x * 2).relu().sum())
    >>> f(kiln.tensor([1.0, -3.0, 2.0])).item()
    6.0
    """
    if backend not in ("codegen", "interpreter"):
        raise ValueError(f"kiln.compile: unknown backend {backend!r} (codegen or interpreter)")
    if fn is None:
        return functools.partial(compile, dynamic=dynamic, strict=strict, backend=backend)
    if isinstance(fn, CompiledFunction):
        return fn
    if not callable(fn):
        raise TypeError(f"kiln.compile expects a function or a module, got {type(fn).__name__}")
    return CompiledFunction(fn, dynamic=dynamic, strict=strict, backend=backend)


# -- argument structure ----------------------------------------------------------------------

def _positional_params(fn) -> list:
    """Names of ``fn``'s positional parameters (a module's ``forward``'s), up to ``*args``."""
    if not inspect.isfunction(fn) and not inspect.ismethod(fn) and \
            getattr(fn, "__signature__", None) is None:  # an object may state its own
        fn = getattr(fn, "forward", fn)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names


def _arg_paths(args, kwargs) -> list:
    """The tensor arguments' paths: ``args[0]``, ``kwargs['mask']``, ``args[1][0]``..."""
    names: list = []
    _flatten((args, kwargs), "", [], names)
    return [("args" if n.startswith("[0]") else "kwargs") + n[3:] for n in names]


def _flatten(obj, path: str, leaves: list, names: list | None):
    """A hashable description of ``obj`` with tensors replaced by slots (appended to leaves,
    and their paths to ``names`` when it is a list)."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        if names is not None:
            names.append(path)
        return "T"
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__,
                tuple(_flatten(x, f"{path}[{i}]", leaves, names) for i, x in enumerate(obj)))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _flatten(v, f"{path}[{k!r}]", leaves, names))
                              for k, v in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str, complex)):
        return ("const", type(obj).__name__, obj)
    return ("object", id(obj))  # modules and other objects: the same object, by identity


_NO_KWARGS = ("dict", ())


def _unflatten(spec, it):
    if spec == "T":
        return next(it)
    kind = spec[0]
    if kind in ("tuple", "list"):
        items = [_unflatten(s, it) for s in spec[1]]
        return tuple(items) if kind == "tuple" else items
    if kind == "namedtuple":
        return spec[2](*(_unflatten(s, it) for s in spec[1]))
    if kind == "dict":
        return {k: _unflatten(s, it) for k, s in spec[1]}
    if kind == "const":
        return spec[2]
    raise AssertionError(f"unexpected output spec {spec!r}")


def _out_spec(obj, leaves: list):
    """Like _flatten for return values: objects other than tensors and plain data are refused."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return "T"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # kiln.sort's (values, indices)...
        return ("namedtuple", tuple(_out_spec(x, leaves) for x in obj), type(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_out_spec(x, leaves) for x in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _out_spec(v, leaves)) for k, v in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str, complex)):
        return ("const", type(obj).__name__, obj)
    raise TraceError(
        f"a compiled function must return tensors, numbers, None or tuples/lists/dicts of "
        f"them; got {type(obj).__name__}"
    )


# -- cache entries -----------------------------------------------------------------------------

class Entry:
    """One compiled graph and everything needed to check, run and write back a call."""

    def __init__(self) -> None:
        self.spec = None  # argument structure (with non-tensor constants)
        self.shapes: tuple = ()  # per tensor argument; may contain Sym
        self.dtypes: tuple = ()
        self.grad_enabled = True
        self.modules: list = []  # (module, training)
        self.groups: list = []  # (param group, its lifted keys, snapshot)
        self.grad_none: list = []  # leaves whose .grad must be None at call time
        self.captured: list = []  # tensors read at every call, in graph input order
        self.captured_types: list = []  # (shape, dtype) per captured tensor
        # index in captured -> the leaf (or argument index) whose .grad that tensor was: backward
        # outside the function makes a new .grad each step, so it is read through the leaf
        self.grad_of: dict = {}
        self.lifted: list = []  # (dict, key, index or None)
        self.out_spec = None
        self.out_names: list = []
        self.updates: list = []  # (tensor, output name)
        self.grads: list = []  # (leaf, output name)
        self.zeroed: list = []  # leaves whose .grad is set to None
        self.traced: Graph | None = None  # the graph as captured
        self.graph: Graph | None = None  # after optimization
        self.run = None  # the executor: list of arrays -> {name: array}
        self.eager = False  # this signature runs eagerly (see reason)
        self.copied: set = set()  # outputs to copy at every call (constants)
        self.reason = ""
        self.sizes: dict = {}  # symbol -> the sizes it was traced at
        self.first = None  # dynamic: (the trace at the first size, that size)
        self.verified: set = set()  # dynamic: batch sizes checked to fit the graph

    # signature checks ---------------------------------------------------------------------------
    def bind_shapes(self, shapes, dtypes) -> dict | None:
        """The dynamic dimensions' values (``{"B": 40}``; ``{}`` for a static entry) when
        ``shapes`` and ``dtypes`` match this entry, else None."""
        if dtypes != self.dtypes or len(shapes) != len(self.shapes):
            return None
        if not self.sizes:
            return {} if shapes == self.shapes else None
        env: dict = {}
        for got, want in zip(shapes, self.shapes):
            if len(got) != len(want):
                return None
            for g, w in zip(got, want):
                if isinstance(w, Sym):
                    v, r = divmod(g - w.add, w.mul)
                    if r or env.setdefault(w.name, v) != v or v < 1:
                        return None
                elif g != w:
                    return None
        return env

    def mismatch(self, leaves: list) -> str:
        """Why the guards other than argument shapes fail now ('' when they hold)."""
        if STATE.grad_enabled != self.grad_enabled:
            return f"grad mode changed {self.grad_enabled} -> {STATE.grad_enabled}"
        for m, training in self.modules:
            if m.training != training:
                return f"{type(m).__name__}.training changed {training} -> {m.training}"
        for g, keys, snap in self.groups:
            now = _group_snapshot(g, keys)
            if now != snap:
                diff = [(k, v, w) for (k, v), (_, w) in zip(snap, now) if v != w]
                if not diff or diff[0][0] == "params":
                    return "optimizer setting 'params' changed"
                k, v, w = diff[0]
                return f"optimizer setting {k!r} changed {v!r} -> {w!r}"
        for leaf in self.grad_none:
            if _target(leaf, leaves).grad is not None:
                return "a parameter's .grad was not None (gradients accumulate)"
        for t, (shape, dtype) in zip(self.live(leaves), self.captured_types):
            if t is None:
                return "a parameter's .grad that the function reads was None"
            if t._data.shape != shape or t._data.dtype != dtype:
                return f"a captured tensor changed to {t._data.dtype}{list(t._data.shape)}"
        return ""


    def live(self, leaves: list) -> list:
        """The captured tensors to read at this call (a parameter's current ``.grad``)."""
        if not self.grad_of:
            return self.captured
        out = list(self.captured)
        for i, leaf in self.grad_of.items():
            out[i] = _target(leaf, leaves).grad
        return out

    def captured_keys(self) -> list:
        """What each captured input stands for, comparable between two traces."""
        keys = [id(t) for t in self.captured]
        for i, leaf in self.grad_of.items():
            keys[i] = ("grad", leaf if type(leaf) is int else id(leaf))
        return keys


def _group_snapshot(group: dict, lifted: frozenset = frozenset()) -> tuple:
    """The settings of a parameter group that a graph depends on. A lifted setting (read at
    every call) counts only by which of its values are zero, as that can decide the graph's
    structure (SGD keeps no momentum buffer when momentum is 0); the learning rate not at all."""
    out = [("params", tuple(id(p) for p in group["params"]))]
    for k, v in group.items():
        if k in ("params", "lr") or isinstance(v, Tensor):
            continue
        out.append((k, _Lifted(v) if k in lifted else v))
    return tuple(out)


class _Lifted:
    """A lifted setting in a snapshot: equal to another when the same values are zero."""

    def __init__(self, value) -> None:
        self.value = value
        self.zeros = _zeros(value)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Lifted) and self.zeros == other.zeros

    def __repr__(self) -> str:
        return repr(self.value)


def _zeros(v):
    """Which of a setting's values are zero (a number, or a tuple such as betas)."""
    if isinstance(v, (tuple, list)):
        return tuple(_zeros(x) for x in v)
    return "tensor" if isinstance(v, Tensor) else v == 0


# -- the compiled function -----------------------------------------------------------------------

class CompiledFunction:
    """The callable ``kiln.compile`` returns; see ``kiln.compile``."""

    def __init__(self, fn, *, dynamic=None, strict=False, backend="codegen") -> None:
        self.fn = fn
        self.dynamic = dynamic
        self.strict = strict
        self.backend = backend
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn
        self.entries: list[Entry] = []
        self.history: list[str] = []  # one line per compile, with its reason
        self._warned = False
        self.misfit = None  # (batch size, why) of the last size the dynamic graph did not fit
        self._escapes = 0
        self._counter = 0
        self._params = _positional_params(fn)

    def __getattr__(self, name):  # kiln.compile(model).eval(), .parameters(), ...
        return getattr(self.__dict__["fn"], name)

    def __repr__(self) -> str:
        return f"<kiln.compile of {self.__name__}: {len(self.entries)} graph(s)>"

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if STATE.tracer is not None:  # called from inside another trace: just inline it
            return self.fn(*args, **kwargs)
        if not kwargs and all(type(a) is Tensor for a in args):  # the common call, cheaply
            leaves = list(args)
            spec = (("tuple", ("T",) * len(args)), _NO_KWARGS)
        else:
            leaves = []
            spec = (_flatten(args, "args", leaves, None), _flatten(kwargs, "kwargs", leaves, None))
        shapes = tuple(t._data.shape for t in leaves)
        dtypes = tuple(t._data.dtype for t in leaves)
        for e in self.entries:
            env = e.bind_shapes(shapes, dtypes) if e.spec == spec else None
            if env is not None and not e.mismatch(leaves):
                if e.eager:
                    return self.fn(*args, **kwargs)
                if env and env["B"] not in e.verified:
                    return self._check_size(e, env["B"], args, kwargs, spec, leaves, shapes,
                                            dtypes)
                return self._run(e, leaves)
        return self._compile(args, kwargs, spec, leaves, _arg_paths(args, kwargs), shapes,
                             dtypes)

    def _check_size(self, e: Entry, b: int, args, kwargs, spec, leaves, shapes, dtypes):
        """A batch size the dynamic graph was not traced at: trace this call (it runs eagerly)
        and keep serving the size from the dynamic graph only if this trace unifies with the
        first one into the same graph; otherwise the size gets its own graph.  This catches
        shapes that are not linear in the batch size (``x[:n // 2]``)."""
        from kiln.graph.unify import difference, unify

        result, new = self._trace(args, kwargs, spec, leaves, _arg_paths(args, kwargs), shapes,
                                  dtypes)
        if new is None or new.eager:
            return result
        first, n1 = e.first
        try:
            why = difference(e.traced, unify(first, new.traced, "B", n1, b))
        except CannotUnify as err:
            why = str(err)
        if not why and new.captured_keys() != e.captured_keys():
            why = "it reads different tensors"
        if not why:
            e.verified.add(b)
            return result
        self.misfit = (b, why)
        self._add(new)
        line = (f"recompiled {self.__name__}: batch size {b} does not fit the dynamic graph "
                f"traced at {sorted(e.verified)} ({why})")
        self.history.append(line)
        _debug(1, line)
        return result

    def _run(self, e: Entry, leaves: list):
        arrays = [t._data for t in leaves]
        captured = e.live(leaves)
        arrays += [t._data for t in captured]
        arrays += [np.array(d[k] if i is None else d[k][i], np.float64)
                   for d, k, i in e.lifted]
        outs = e.run(arrays)
        swap = {id(t): c for t, c in zip(e.captured, captured) if t is not c}
        for t, name in e.updates:
            if type(t) is int:
                t = leaves[t]
            elif swap:
                t = swap.get(id(t), t)
            a = outs[name]
            if a is not t._data:
                np.copyto(t._data, a, casting="unsafe")
            t._version[0] += 1
        for leaf in e.zeroed:
            _target(leaf, leaves).grad = None
        for leaf, name in e.grads:
            _target(leaf, leaves).grad = _make(outs[name])
        return _unflatten(e.out_spec, iter([_make(outs[n]) if n not in e.copied else
                                            _make(np.array(outs[n])) for n in e.out_names]))

    # -- compiling ---------------------------------------------------------------------------------
    def _compile(self, args, kwargs, spec, leaves, names, shapes, dtypes):
        where = user_location(3)
        reason, merge = self._why(spec, shapes, dtypes, leaves)
        if self.entries and self.strict and not (merge is not None and self.dynamic):
            raise RecompileError(f"kiln.compile(strict=True): {self.__name__} would recompile: "
                                 f"{reason} at {where}")
        result, entry = self._trace(args, kwargs, spec, leaves, names, shapes, dtypes)
        if entry is None:
            return result
        if merge is not None and not entry.eager:
            merged = self._merge(merge, entry)
            if merged is not None:
                self.entries.remove(merge)
                entry = merged
                reason += "; dimension 0 is now dynamic (one graph serves every size)"
        self._add(entry)
        line = f"compiled {self.__name__}" if not self.history else \
            f"recompiled {self.__name__}: {reason}"
        line += f" at {where}" if where else ""
        if entry.eager:
            line += f" (runs eagerly: {entry.reason})"
        self.history.append(line)
        _debug(1, line if entry.eager else f"{line}: {len(entry.traced.nodes)} nodes traced -> "
               f"{len(entry.graph.nodes)} after optimization")
        recompiles = len(self.history) - 1
        if recompiles >= 2 and not self._warned and not (merge is not None and self.dynamic):
            self._warned = True
            warnings.warn(f"kiln.compile: {line} (repeated recompiles are slow; see "
                          f"{self.__name__}.explain())", stacklevel=3)
        return result

    def _why(self, spec, shapes, dtypes, leaves):
        """A readable reason for a cache miss, and an entry it could merge with (batch size)."""
        if not self.entries:
            return "first call", None
        e = self.entries[0]
        if e.spec != spec:
            return "the non-tensor arguments or the argument structure changed", None
        if e.dtypes != dtypes:
            i = next(i for i, (a, b) in enumerate(zip(e.dtypes, dtypes)) if a != b)
            return f"{self._arg_name(i)} changed dtype {e.dtypes[i]} -> {dtypes[i]}", None
        if e.bind_shapes(shapes, dtypes) is None:
            diffs = [i for i, (a, b) in enumerate(zip(e.shapes, shapes)) if a != b]
            i = diffs[0]
            text = (f"{self._arg_name(i)} changed shape {_shape_str(e.shapes[i])} -> "
                    f"{_shape_str(shapes[i])}")
            merge = None
            if self.dynamic is not False and not e.sizes and not e.eager and not e.mismatch(leaves):
                merge = _batch_change(e.shapes, shapes)
                merge = e if merge else None
            return text, merge
        return e.mismatch(leaves) or "a guard failed", None

    def _arg_name(self, i: int) -> str:
        return self._leaf_names[i] if i < len(getattr(self, "_leaf_names", [])) else f"arg {i}"

    def _trace(self, args, kwargs, spec, leaves, names, shapes, dtypes):
        self._counter += 1
        tracer = Tracer(self.__name__)
        self._leaf_names = [self._nice(n) for n in names]
        for t, n in zip(leaves, self._leaf_names):
            tracer.add_arg(t, n)
        grad_mode = STATE.grad_enabled
        STATE.tracer = tracer
        try:
            result = self.fn(*args, **kwargs)
        finally:
            STATE.tracer = None
        out_leaves: list = []
        out_spec = _out_spec(result, out_leaves)
        e = Entry()
        e.spec, e.shapes, e.dtypes, e.grad_enabled = spec, shapes, dtypes, grad_mode
        e.modules = [(m, m.training) for m in tracer.modules.values()]
        e.lifted = [(d, k, i) for d, k, i, _, _ in tracer.lifted]
        lifted = {id(g): frozenset(k for d, k, _ in e.lifted if d is g)
                  for g in tracer.groups.values()}
        e.groups = [(g, lifted[id(g)], _group_snapshot(g, lifted[id(g)]))
                    for g in tracer.groups.values()]
        e.out_spec = out_spec
        if grad_mode and not tracer.saw_backward and any(t._rg for t in out_leaves):
            self._run_eagerly(e, "its outputs require grad and it does not call backward; "
                                 "compile the whole training step, or call it under "
                                 "kiln.no_grad() for inference")
            return result, e
        g = tracer.graph
        STATE.tracer = tracer  # node_of may meet constants made by the function
        try:
            for i, t in enumerate(out_leaves):
                g.outputs[f"out{i}"] = tracer.node_of(t)
                e.out_names.append(f"out{i}")
            grad_nodes = [(leaf, tracer.node_of(leaf.grad)) for leaf in tracer.grads.values()]
        finally:
            STATE.tracer = None
        arg_index = {id(t): i for i, t in enumerate(leaves)}

        def target(t):  # arguments are addressed by position: each call passes new ones
            return arg_index.get(id(t), t)

        e.grad_none = [target(leaf) for leaf in tracer.grad_none.values()]
        e.zeroed = [target(p) for k, p in tracer.zeroed.items() if k not in tracer.grads]
        detached = [_make(t._data) for t in out_leaves]
        allowed = {id(leaf.grad) for leaf, _ in grad_nodes}
        for t in out_leaves:
            while t is not None:
                allowed.add(id(t))
                t = t._base
        out_leaves = result = t = None
        escaped = tracer.settle(allowed)
        result = _unflatten(out_spec, iter(detached))
        self._name_inputs(tracer, args)
        for leaf, n in grad_nodes:
            name = f"grad:{self._param_name(tracer, leaf)}"
            g.outputs[name] = n
            e.grads.append((target(leaf), name))
        for key, (t, n) in tracer.mutated.items():
            inp = tracer.captured[key][1] if key in tracer.captured else tracer.args[key][1]
            name = f"update:{inp.name}"
            g.outputs[name] = n
            e.updates.append((target(t), name))
        captured = [n for n in g.inputs if n.kind == "captured"]
        by_node = {n: t for t, n in tracer.captured.values()}
        e.captured = [by_node[n] for n in captured]
        e.captured_types = [(t._data.shape, t._data.dtype) for t in e.captured]
        grad_owner = {id(leaf.grad): leaf for leaf in list(e.captured) + leaves
                      if leaf.grad is not None}
        e.grad_of = {i: target(grad_owner[id(t)]) for i, t in enumerate(e.captured)
                     if id(t) in grad_owner}
        g.inputs = ([n for n in g.inputs if n.kind == "arg"] + captured +
                    [n for n in g.inputs if n.kind == "lifted"])
        e.traced = g
        if escaped:
            self._escapes += 1
            if self._escapes < 2:
                return result, None  # perhaps one-time initialisation: trace again next call
            self._run_eagerly(e, "it keeps tensors it computes (in a list, a global or an "
                                 "attribute), which a compiled graph could not update; return "
                                 "them instead")
        return result, e

    def _run_eagerly(self, e: Entry, reason: str) -> None:
        e.eager, e.reason = True, reason
        warnings.warn(f"kiln.compile: {self.__name__} {reason}; running it eagerly",
                      stacklevel=5)

    def _merge(self, old: Entry, new: Entry):
        """One entry for both batch sizes, or None when the traces differ in other ways."""
        from kiln.graph.unify import unify

        pairs = _batch_change(old.shapes, new.shapes)
        (n1, n2), = pairs
        try:
            g = unify(old.traced, new.traced, "B", n1, n2)
        except CannotUnify:
            return None
        if (old.captured_keys() != new.captured_keys()
                or old.out_names != new.out_names):
            return None
        new.first = (old.traced, n1)
        new.traced = g
        new.shapes = tuple(tuple(n.shape) for n in g.inputs[:len(new.shapes)])
        new.sizes = {"B": (n1, n2)}
        new.verified = {n1, n2}
        return new

    def _add(self, e: Entry) -> None:
        """Build ``e``'s executor and cache it first (dropping the oldest beyond MAX_ENTRIES)."""
        self._finish(e)
        self.entries.insert(0, e)
        if len(self.entries) > MAX_ENTRIES:
            self.entries.pop()

    def _finish(self, e: Entry) -> None:
        """Optimize the traced graph and build its executor."""
        if e.eager:
            return
        from kiln.graph.optimize import optimize

        e.graph, e.stats = optimize(e.traced)
        # a constant output is the same array at every call: hand out copies of it (also a
        # constant expanded to a batch-sized shape, a read-only view, by unify)
        e.copied = {k for k in e.out_names if e.graph.outputs[k].op == "const" or (
            e.graph.outputs[k].op == "expand" and e.graph.outputs[k].inputs[0].op == "const")}
        e.run = _executor(e.graph, _updates_map(e, e.graph), self.backend,
                          self.__name__)

    # -- names -------------------------------------------------------------------------------------
    def _nice(self, path: str) -> str:
        """args[0] -> x (the parameter's name), for messages and the printed graph."""
        if path.startswith("args[") and self._params:
            end = path.index("]")
            i = int(path[5:end])
            if i < len(self._params):
                return self._params[i] + path[end + 1:]
        if path.startswith("kwargs['"):
            end = path.index("']")
            return path[8:end] + path[end + 2:]
        return path

    def _roots(self, args) -> list:
        """(name, object) pairs the function can reach by name, for naming captured tensors:
        its closure and the globals it uses, one level into the functions among them too."""
        fn = self.fn
        roots = []
        if not inspect.isfunction(fn) and not inspect.ismethod(fn):
            roots.append(("model" if hasattr(fn, "parameters") else "self", fn))
        if inspect.ismethod(fn):
            roots.append(("self", fn.__self__))
        roots += _names_in(fn)
        roots += [r for _, f in list(roots) if inspect.isfunction(f) for r in _names_in(f)]
        roots += [(p, a) for p, a in zip(self._params, args)]
        return roots

    def _name_inputs(self, tracer: Tracer, args) -> None:
        names: dict = {}
        for root, obj in self._roots(args):
            if hasattr(obj, "named_parameters") and hasattr(obj, "named_buffers"):
                for k, p in obj.named_parameters():
                    names.setdefault(id(p), f"{root}.{k}")
                    if p.grad is not None:
                        names.setdefault(id(p.grad), f"{root}.{k}.grad")
                for k, b in obj.named_buffers():
                    names.setdefault(id(b), f"{root}.{k}")
            elif isinstance(obj, Tensor):
                names.setdefault(id(obj), root)
            elif isinstance(obj, (dict, list, tuple)):  # e.g. a dict of parameter tensors
                items = obj.items() if isinstance(obj, dict) else enumerate(obj)
                for k, v in items:
                    if isinstance(v, Tensor):
                        names.setdefault(id(v), f"{root}[{k!r}]")
        for root, obj in self._roots(args):
            state = getattr(obj, "state", None)
            if isinstance(state, dict) and hasattr(obj, "param_groups"):
                for p, st in state.items():
                    for k, v in st.items() if isinstance(st, dict) else ():
                        if isinstance(v, Tensor):
                            names.setdefault(id(v), f"{root}.state[{names.get(id(p), '?')}].{k}")
        self._names = names
        used = set()
        for i, (t, n) in enumerate(tracer.captured.values()):
            name = names.get(id(t), f"captured{i}")
            while name in used:
                name += "'"
            used.add(name)
            n.name = name

    def _param_name(self, tracer, leaf) -> str:
        return getattr(self, "_names", {}).get(id(leaf), f"param{id(leaf) % 10000}")

    # -- looking at it ---------------------------------------------------------------------------
    def graph(self, optimized: bool = True) -> Graph:
        """The most recently used graph (as traced, or after optimization)."""
        for e in self.entries:
            if not e.eager:
                return e.graph if optimized else e.traced
        raise RuntimeError(f"{self.__name__} has no compiled graph yet: call it first")

    def explain(self) -> str:
        """Every cached graph after optimization, node counts before/after, and the history."""
        parts = [f"kiln.compile of {self.__name__}: {len(self.entries)} cached graph(s)"]
        for i, e in enumerate(self.entries):
            sig = ", ".join(f"{n}{_shape_str(s)}" for n, s in
                            zip(getattr(self, "_leaf_names", []), e.shapes))
            if e.eager:
                parts.append(f"\n[{i}] ({sig}) runs eagerly: {e.reason}")
                continue
            parts.append(f"\n[{i}] ({sig}) nodes: {len(e.traced.nodes)} traced -> "
                         f"{len(e.graph.nodes)} after optimization "
                         f"({', '.join(f'{k} {v}' for k, v in e.stats.items())})")
            parts.append(format_graph(e.graph))
        parts.append("\nhistory:")
        parts += [f"  {h}" for h in self.history]
        return "\n".join(parts)


def _target(t, leaves: list):
    """A tensor an entry writes to: its own (parameter, state) or, given as the argument's
    position (an int), this call's argument."""
    return leaves[t] if type(t) is int else t


def _updates_map(e: Entry, g: Graph | None = None) -> dict:
    """captured input node -> node of its new value, in ``g`` (default: the traced graph)."""
    g = g or e.traced
    nodes = [n for n in g.inputs if n.kind == "captured"]
    index = {id(t): i for i, t in enumerate(e.captured)}
    return {g.inputs[t] if type(t) is int else nodes[index[id(t)]]: g.outputs[name]
            for t, name in e.updates}


def _names_in(fn) -> list:
    """The closure variables and used globals of a Python function, as (name, value)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    out = []
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            out.append((name, cell.cell_contents))
        except ValueError:  # a cell not filled yet
            pass
    glb = getattr(fn, "__globals__", {})
    return out + [(n, glb[n]) for n in code.co_names if n in glb]


def _batch_change(old_shapes, new_shapes) -> list:
    """[(n1, n2)] when the shapes differ only in dimension 0, all from n1 to n2."""
    pairs = set()
    for a, b in zip(old_shapes, new_shapes):
        if len(a) != len(b) or tuple(a[1:]) != tuple(b[1:]):
            return []
        if a and a[0] != b[0]:
            pairs.add((a[0], b[0]))
    return list(pairs) if len(pairs) == 1 else []


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _executor(g: Graph, updates: dict, backend: str, name: str):
    if backend == "interpreter":
        from kiln.backends.interpreter import run

        return functools.partial(run, g)
    from kiln.backends.codegen import Executor
    from kiln.backends.kernels import writes_out
    from kiln.graph.passes.memory import plan

    # update values are written back into their tensors; everything else reaches the user
    returned = [k for k in g.outputs if not k.startswith("update:")]
    with _kernels_together(name):
        ex = Executor(g, plan(g, writes_out, updates, returned=returned), name,
                      check_inputs=False)
    _debug(3, ex.source)
    return ex


def _kernels_together(name: str):
    """A graph's new native kernels compiled as one module (kiln.jit), when the JIT is on."""
    from kiln import jit

    if not jit.available():
        return contextlib.nullcontext()
    from kiln.backends.jit_fused import one_module

    return one_module(name)


def _debug(level: int, text: str) -> None:
    try:
        wanted = int(os.environ.get("KILN_DEBUG", "0") or 0)
    except ValueError:
        wanted = 0
    if wanted >= level:
        print(f"[kiln] {text}")
