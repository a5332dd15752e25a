"""The fast executor: a graph compiled to one generated Python function with out= buffers.

torch.fx style: one statement per node (a fused node is a few inline ufunc statements), kernels,
impls and constants bound as globals of the generated code, results written into buffers that
the memory plan assigns and that are allocated once per set of dynamic-dimension values.  The
source is registered with ``linecache`` so tracebacks show the generated lines, and an error
raised while running a node is re-raised naming that node and the user's line.
"""

from __future__ import annotations

import itertools
import keyword
import linecache
import math
from types import SimpleNamespace

import numpy as np

from kiln.backends.kernels import (FRESH, OUT_KERNELS, UFUNCS, UNSAFE, kernel_accepts,
                                   native_kernel)
from kiln.graph.ir import Graph, Node, format_node, type_str
from kiln.graph.symbolic import Sym, has_sym, rebuild, resolve

_counter = itertools.count(1)

# Non-view primitives whose impl may return (a view of) an input: their results are treated as
# sharing memory with their inputs when deciding whether a buffer may be overwritten.
_MAY_ALIAS = frozenset({"copy", "roll", "gather", "pick_along", "pool_gather"})


def _empty_plan() -> SimpleNamespace:
    return SimpleNamespace(slot_of={}, slots=[], free_after={}, inplace={})


# -- helpers bound into the generated code -------------------------------------------------------

def _copyto(target: np.ndarray, value) -> np.ndarray:
    np.copyto(target, value)
    return target


def _fresh(value: np.ndarray, buffers: tuple) -> np.ndarray:
    """``value``, or a copy of it when it may share memory with one of ``buffers``."""
    for b in buffers:
        if np.may_share_memory(value, b):
            return value.copy()
    return value


class Executor:
    """Runs ``graph`` through generated code; ``plan`` is a memory plan (None: no buffers).

    ``ex(arrays)`` takes one array per graph input, in order, and returns {output name: array}.
    ``ex.source`` is the generated code.  Outputs are fresh arrays, except results planned in
    place, which are the updated input arrays themselves.
    """

    def __init__(self, graph: Graph, plan=None, name: str = "graph",
                 check_inputs: bool = True) -> None:
        self.graph = graph
        self.plan = plan if plan is not None else _empty_plan()
        ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "graph"
        if ident[0].isdigit() or keyword.iskeyword(ident):
            ident = "g_" + ident
        self.filename = f"<kiln-compiled {name} #{next(_counter)}>"
        gen = _Gen(graph, self.plan, ident, check_inputs)
        self.source = gen.build()
        self.fallbacks = gen.fallbacks  # nodes whose planned buffer could not be used, and why
        self._lines = gen.line_node
        self._nodes_text = gen.node_text
        self._envs: dict = {}
        self._bufspec = gen.bufspec
        self._symnames = gen.symnames
        glb = gen.globals
        glb["_envs"] = self._envs
        glb["_alloc"] = self._alloc
        glb["_bad_inputs"] = self._bad_inputs
        if not self._symnames:
            for i, b in enumerate(self._alloc(())):
                glb[f"b{i}"] = b
        lines = self.source.splitlines(True)
        linecache.cache[self.filename] = (len(self.source), None, lines, self.filename)
        exec(compile(self.source, self.filename, "exec"), glb)
        self._fn = glb[ident]
        self._n_inputs = len(graph.inputs)

    def __call__(self, arrays: list) -> dict:
        if len(arrays) != self._n_inputs:
            raise ValueError(f"graph takes {self._n_inputs} inputs, got {len(arrays)}")
        try:
            return self._fn(*arrays)
        except Exception as e:
            err = self._explain(e)
            if err is None:
                raise
            raise err from e

    @property
    def buffers(self) -> dict:
        """{tuple of dynamic-dimension values: tuple of buffer arrays} allocated so far."""
        return dict(self._envs)

    def _alloc(self, key: tuple) -> tuple:
        env = dict(zip(self._symnames, key))
        bufs = tuple(np.empty(resolve(shape, env), dtype) for shape, dtype in self._bufspec)
        self._envs[key] = bufs
        return bufs

    def _bad_inputs(self, *arrays) -> None:
        """Raise naming the first input whose shape or dtype is not the graph's."""
        from kiln.backends.interpreter import bind_dims

        env = bind_dims(self.graph, arrays)
        for n, a in zip(self.graph.inputs, arrays):
            want = tuple(resolve(n.shape, env))
            if a.shape != want or a.dtype != n.dtype:
                raise RuntimeError(
                    f"{self.filename}: input {n.name or f'%{n.id}'} must be {type_str(n)} "
                    f"(here {n.dtype.name}{list(want)}), got {a.dtype.name}{list(a.shape)}")
        raise RuntimeError(f"{self.filename}: inputs do not match the graph")  # unreachable

    def _explain(self, e: Exception):
        """The exception to raise for ``e``: naming the node whose generated line failed."""
        tb, line = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                line = tb.tb_lineno
            tb = tb.tb_next
        node = self._lines.get(line)
        if node is None:
            return None
        where = node.loc or "unknown location (no user source recorded)"
        msg = (f"{e}\n  while running graph node {self._nodes_text[node]}\n"
               f"  from user code: {where}\n"
               f"  generated code: {self.filename}, line {line}")
        try:
            err = type(e)(msg)
        except Exception:
            err = None
        if err is None or str(err) != msg:
            err = RuntimeError(f"{type(e).__name__}: {msg}")
        return err


# -- the code generator --------------------------------------------------------------------------

class _Gen:
    """Builds the source text, its globals and the line -> node table for one graph."""

    def __init__(self, g: Graph, plan, ident: str, check_inputs: bool) -> None:
        self.g, self.plan, self.ident, self.check_inputs = g, plan, ident, check_inputs
        self.globals: dict = {"__name__": "kiln.backends.generated", "_np": np,
                              "_copyto": _copyto, "_fresh": _fresh, "_arr": np.asarray,
                              "_empty": np.empty}
        self.lines: list[str] = []
        self.line_node: dict[int, Node] = {}
        self.node_text: dict[Node, str] = {}
        self.fallbacks: list[tuple[Node, str]] = []
        self.bufspec = [(tuple(s), np.dtype(d)) for s, d in plan.slots]
        self.names: dict[Node, str] = {}
        self.storage: dict[Node, frozenset] = {}
        self.holders: dict[tuple, list[Node]] = {}
        self.symnames: list[str] = []
        self.temp_pool: dict[str, tuple] = {}  # buffer name -> (shape, dtype) of temporaries
        self.outputs = set(g.outputs.values())
        # values sharing storage with an updated input: copied before any write into it
        self.copy_first = set(getattr(plan, "copy_before_update", ()))
        users = g.users()
        index = {n: i for i, n in enumerate(g.nodes)}
        end = len(g.nodes)
        self.last_use = {n: max((index[u] for u in us), default=-1) for n, us in users.items()}
        for n in self.outputs:
            self.last_use[n] = end
        self.display = {n: n.name or f"%{n.id}" for n in g.inputs}

    # -- small pieces of source ------------------------------------------------------------------
    def emit(self, text: str, node: Node | None = None) -> None:
        self.lines.append(text)
        if node is not None:
            self.line_node[len(self.lines)] = node

    def bind(self, name: str, value) -> str:
        self.globals[name] = value
        return name

    def sym(self, s: Sym) -> str:
        if s.name not in self.symnames:
            raise ValueError(f"dynamic dimension {s.name!r} is not the size of any input's dim")
        v = f"d_{s.name}"
        if s.mul != 1:
            v = f"{s.mul} * {v}"
        if s.add:
            v = f"{v} {'+' if s.add > 0 else '-'} {abs(s.add)}"
        return v if s.mul == 1 and not s.add else f"({v})"

    def lit(self, v, name: str) -> str:
        """Source for attribute value ``v``: a literal, a Sym expression, or a bound global."""
        if isinstance(v, Sym):
            return self.sym(v)
        if v is None or isinstance(v, (bool, str)):
            return repr(v)
        if type(v) is int:
            return repr(v)
        if type(v) is float and math.isfinite(v):
            return repr(v)
        if type(v) in (tuple, list) and (has_sym(v) or all(self._plain(x) for x in v)):
            parts = [self.lit(x, f"{name}_{i}") for i, x in enumerate(v)]
            if type(v) is list:
                return f"[{', '.join(parts)}]"
            return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
        if isinstance(v, (tuple, list)) and has_sym(v):  # e.g. kiln.ops.index.Slice(0, B, 1)
            parts = [self.lit(x, f"{name}_{i}") for i, x in enumerate(v)]
            return (f"{self.bind('rebuild', rebuild)}({self.bind(name + '_like', v)}, "
                    f"[{', '.join(parts)}])")
        if has_sym(v):
            raise NotImplementedError(f"attribute {name}: cannot emit {v!r} with dynamic dims")
        return self.bind(name, v)

    def _plain(self, v) -> bool:
        if v is None or isinstance(v, (bool, str)) or type(v) is int:
            return True
        if type(v) is float:
            return math.isfinite(v)
        return type(v) in (tuple, list) and all(self._plain(x) for x in v)

    def shape_src(self, shape) -> str:
        return self.lit(tuple(shape), "shape")

    def attrs_src(self, n: Node) -> str:
        return "".join(f", {k}={self.lit(v, f'c{n.id}_{k}')}" for k, v in n.attrs.items())

    def comment(self, n: Node, extra: str = "", typed: Node | None = None) -> str:
        text = f"  # %{n.id} {n.op}{extra} {type_str(typed or n)}"
        return text + (f" @ {n.loc}" if n.loc else "")

    def new_buffer(self, shape, dtype) -> str:
        self.bufspec.append((tuple(shape), np.dtype(dtype)))
        return f"b{len(self.bufspec) - 1}"

    # -- storage and aliasing ---------------------------------------------------------------------
    def set_storage(self, n: Node, keys) -> None:
        keys = frozenset(keys)
        self.storage[n] = keys
        for k in keys:
            self.holders.setdefault(k, []).append(n)

    def clobbers(self, key, n: Node, i: int, unsafe) -> str | None:
        """Why writing node ``n`` (at index ``i``) into buffer ``key`` would destroy a value
        still needed, or None."""
        for u in self.holders.get(key, ()):
            if u in self.outputs:
                return f"%{u.id} (a graph output) lives in that buffer"
            if self.last_use[u] > i:
                return f"%{u.id} lives in that buffer and is read later"
            if any(p in unsafe and x is u for p, x in enumerate(n.inputs)):
                return f"%{u.id} lives in that buffer and the kernel reads it after writing"
        return None

    # -- the whole function -----------------------------------------------------------------------
    def build(self) -> str:
        g = self.g
        params = []
        for i, n in enumerate(g.inputs):
            self.names[n] = f"a{i}"
            params.append(f"a{i}")
            self.set_storage(n, [("a", i)])
        sig = ", ".join(f"{self.display[n]}: {type_str(n)}" for n in g.inputs)
        self.emit(f"def {self.ident}({', '.join(params)}):")
        self.emit(f"    # graph({sig})")
        self._bind_dims()
        for n in g.inputs:
            if n in self.copy_first:
                self._copy_now(n)
        body_start = len(self.lines)
        for i, n in enumerate(g.nodes):
            self.node_text[n] = format_node(n, self.display).strip().split("\n")[0]
            if n.op == "fused":
                self._fused(n, i)
            else:
                self._node(n, i)
            if n in self.copy_first:
                self._copy_now(n)
            self._free(n, i)
        self._return()
        # buffers are unpacked after the node loop, when the fused temporaries are known
        if self.symnames:
            key = f"({', '.join(f'd_{s}' for s in self.symnames)},)"
            names = ", ".join(f"b{i}" for i in range(len(self.bufspec)))
            pre = [f"    _bufs = _envs.get({key})",
                   "    if _bufs is None:",
                   f"        _bufs = _alloc({key})"]
            if self.bufspec:
                pre.append(f"    {names}{',' if len(self.bufspec) == 1 else ''} = _bufs")
            self.lines[body_start:body_start] = pre
            self.line_node = {k + (len(pre) if k > body_start else 0): v
                              for k, v in self.line_node.items()}
        header = f"# kiln-compiled {self.ident}: {len(g.nodes)} nodes, {len(self.bufspec)} buffers"
        self.lines.insert(0, header)
        self.line_node = {k + 1: v for k, v in self.line_node.items()}
        return "\n".join(self.lines) + "\n"

    def _bind_dims(self) -> None:
        g = self.g
        for i, n in enumerate(g.inputs):
            for ax, d in enumerate(n.shape):
                if isinstance(d, Sym) and d.name not in self.symnames:
                    self.symnames.append(d.name)
                    src = f"a{i}.shape[{ax}]"
                    if d.add:
                        src = f"({src} - {d.add})" if d.add > 0 else f"({src} + {-d.add})"
                    if d.mul != 1:
                        src = f"{src} // {d.mul}"
                    self.emit(f"    d_{d.name} = {src}")
        if not self.check_inputs or not g.inputs:
            return
        conds = []
        for i, n in enumerate(g.inputs):
            conds.append(f"a{i}.shape != {self.shape_src(n.shape)}")
            conds.append(f"a{i}.dtype != {self.bind(f'dt_a{i}', n.dtype)}")
        args = ", ".join(f"a{i}" for i in range(len(g.inputs)))
        self.emit(f"    if {' or '.join(conds)}:")
        self.emit(f"        _bad_inputs({args})")

    def _target(self, n: Node, i: int):
        """(source name, storage key, kind) of the array node ``n`` writes into, or None."""
        plan = self.plan
        if n in plan.inplace:
            src = plan.inplace[n]
            k = self.g.inputs.index(src)
            return f"a{k}", ("a", k), "inplace"
        slot = plan.slot_of.get(n)
        if slot is not None:
            if self.bufspec[slot] != (tuple(n.shape), n.dtype):
                self.fallbacks.append((n, f"slot {slot} is {self.bufspec[slot]}, not the node's"))
                return None
            return f"b{slot}", ("b", slot), "slot"
        return None

    def _node(self, n: Node, i: int) -> None:
        v = self.names[n] = f"v{n.id}"
        if n.op == "const":
            c = self.bind(f"c{n.id}", n.attrs["value"])
            self.emit(f"    {v} = {c}{self.comment(n)}", n)
            self.set_storage(n, [("c", n.id)])
            return
        args = ", ".join(self.names[x] for x in n.inputs)
        attrs = self.attrs_src(n)
        target = self._target(n, i)
        if target is not None and kernel_accepts(n):
            out, key, kind = target
            why = self.clobbers(key, n, i, UNSAFE[n.op])
            if why is None:
                self.emit(f"    {v} = {self._kernel_call(n, args, attrs, out)}{self.comment(n)}",
                          n)
                self.set_storage(n, [key])
                return
            if kind == "inplace" and self.clobbers(key, n, i, ()) is not None:
                name = self.display[self.g.inputs[key[1]]]
                raise ValueError(f"memory plan writes %{n.id} into input {name} but {why}")
            self.fallbacks.append((n, why))  # in place: the impl's result is copied in
        elif target is not None and target[2] == "slot":
            self.fallbacks.append((n, "no out-kernel accepts this node"))
        elif target is None and n.op in FRESH and kernel_accepts(n):
            fresh = f"_empty({self.shape_src(n.shape)}, {self.bind(f'dt_{n.id}', n.dtype)})"
            self.emit(f"    {v} = {self._kernel_call(n, args, attrs, fresh)}{self.comment(n)}",
                      n)
            self.set_storage(n, [("f", n.id)])
            return
        impl = self.bind(f"impl_{n.op}", _impl(n.op))
        call = f"{impl}({args}{attrs})"
        if target is not None and target[2] == "inplace":
            out, key, _ = target
            why = self.clobbers(key, n, i, ())
            if why is not None:
                raise ValueError(f"memory plan writes %{n.id} into an input but {why}")
            self.emit(f"    {v} = _copyto({out}, {call}){self.comment(n)}", n)
            self.set_storage(n, [key])
            return
        if n.shape == ():
            call = f"_arr({call})"  # numpy returns scalars for 0-d results
        self.emit(f"    {v} = {call}{self.comment(n)}", n)
        keys = {("f", n.id)}
        if n.op in _MAY_ALIAS or _is_view(n.op):
            for x in n.inputs:
                keys |= self.storage[x]
        self.set_storage(n, keys)

    def _kernel_call(self, n: Node, args: str, attrs: str, out: str) -> str:
        native = native_kernel(n)
        if native is not None:
            return f"{self.bind(native.__name__, native)}({out}, {args})"
        uf = UFUNCS.get(n.op)
        if uf is not None:
            ufunc, extra = uf
            f = self.bind(f"u_{ufunc.__name__}", ufunc)
            extra_src = "".join(f", {e!r}" for e in extra)
            return f"{f}({args}{extra_src}, out={out})"
        k = self.bind(f"k_{n.op}", OUT_KERNELS[n.op])
        return f"{k}({out}, {args}{attrs})"

    def _copy_now(self, n: Node) -> None:
        """Replace ``n``'s value by a copy: an updated input's storage is about to change."""
        v = self.names[n] = f"v{n.id}" if n.op != "input" else f"{self.names[n]}_copy"
        src = self.names[n] if n.op != "input" else v[:-len("_copy")]
        self.emit(f"    {v} = {src}.copy()  # %{n.id}: kept before its storage is updated", n)
        for keys in self.holders.values():
            if n in keys:
                keys.remove(n)
        self.set_storage(n, [("f", n.id)])

    def _free(self, n: Node, i: int) -> None:
        dead = []
        for u in self.plan.free_after.get(n, ()):
            # only values this function alone holds are worth a del: buffers and inputs stay
            if (u in self.names and u not in self.outputs and self.last_use.get(u, -1) <= i
                    and ("f", u.id) in self.storage.get(u, ())):
                dead.append(self.names[u])
        if dead:
            self.emit(f"    del {', '.join(dead)}")

    def _return(self) -> None:
        items = []
        for name, n in self.g.outputs.items():
            v = self.names[n]
            keys = self.storage[n]
            inplace = self.plan.inplace.get(n)
            if (n.op == "input" and n not in self.copy_first) or (
                    inplace is not None and keys == {("a", self.g.inputs.index(inplace))}):
                pass
            elif any(k[0] == "c" for k in keys):
                v = f"{v}.copy()"
            else:
                bufs = sorted({f"b{k[1]}" for k in keys if k[0] == "b"})
                if bufs:
                    v = f"_fresh({v}, ({', '.join(bufs)},))"
            items.append(f"{name!r}: {v}")
        self.emit(f"    return {{{', '.join(items)}}}")

    # -- fused nodes: the body inline, intermediates in the output buffer or temporaries ------
    def _jit_fused(self, n: Node, v: str, out: str, key, tag: str) -> bool:
        """Emit fused ``n`` as one native kernel call (kiln.jit), if the JIT is on and can."""
        from kiln import jit

        if not jit.available():
            return False
        from kiln.backends.jit_fused import runner

        run = runner(n, {p for p, x in enumerate(n.inputs) if key in self.storage[x]})
        if run is None:
            return False
        args = "".join(f", {self.names[x]}" for x in n.inputs)
        self.emit(f"    {v} = {self.bind(f'jf{n.id}', run)}({out}{args}){self.comment(n, tag)}",
                  n)
        self.set_storage(n, [key])
        return True

    def _fused(self, n: Node, i: int) -> None:
        body: Graph = n.attrs["body"]
        out_node = next(iter(body.outputs.values()))
        v = self.names[n] = f"v{n.id}"
        label = n.attrs.get("ops", "")
        tag = f" [{label}]" if label else ""
        target = self._target(n, i)
        if target is not None:
            out, key, kind = target
            why = self.clobbers(key, n, i, ())
            if why is not None:
                if kind == "inplace":
                    raise ValueError(f"memory plan writes fused %{n.id} into an input but {why}")
                self.fallbacks.append((n, why))
                target = None
        if target is None:
            out, key = v, ("f", n.id)
            self.emit(f"    {v} = _empty({self.shape_src(n.shape)}, "
                      f"{self.bind(f'dt_{n.id}', n.dtype)}){self.comment(n, tag)}", n)
        if self._jit_fused(n, v, out, key, tag):
            return

        # liveness inside the body, over the nodes the output needs
        needed = {out_node}
        for b in reversed(body.nodes):
            if b in needed:
                needed.update(b.inputs)
        live = [b for b in body.nodes if b in needed]
        pos = {b: p for p, b in enumerate(live)}
        last = {}
        for p, b in enumerate(live):
            for x in b.inputs:
                last[x] = p
        last[out_node] = len(live)

        names = {bi: self.names[x] for bi, x in zip(body.inputs, n.inputs)}
        # what each buffer holds now: the output buffer may hold outer inputs (in place, reuse)
        held: dict[str, list] = {out: [bi for bi, x in zip(body.inputs, n.inputs)
                                       if key in self.storage[x]]}
        shapes = dict(self.temp_pool)  # temporaries of earlier fused nodes are free again
        shapes[out] = (tuple(n.shape), n.dtype)
        temps = [out] + list(self.temp_pool)

        def free(buf: str, b: Node, p: int, unsafe) -> bool:
            for u in held.get(buf, ()):
                if last.get(u, -1) > p:
                    return False
                if last.get(u, -1) == p and any(q in unsafe and x is u
                                                for q, x in enumerate(b.inputs)):
                    return False
            return True

        for b in live:
            p = pos[b]
            c = self.comment(n, f": %{b.id} {b.op}", b)
            if b.op == "const":
                names[b] = self.bind(f"c{b.id}", b.attrs["value"])
                continue
            args = ", ".join(names[x] for x in b.inputs)
            attrs = self.attrs_src(b)
            if not kernel_accepts(b):
                impl = self.bind(f"impl_{b.op}", _impl(b.op))
                call = f"{impl}({args}{attrs})"
                if b is out_node:
                    self.emit(f"    {v} = _copyto({out}, {call}){c}", n)
                else:
                    names[b] = f"f{n.id}_{b.id}"
                    self.emit(f"    {names[b]} = {call}{c}", n)
                continue
            unsafe = UNSAFE[b.op]
            sig = (tuple(b.shape), b.dtype)
            if b is out_node and free(out, b, p, unsafe):
                self.emit(f"    {v} = {self._kernel_call(b, args, attrs, out)}{c}", n)
                continue
            buf = None
            # the output buffer is no place for a value the last op reads after writing it
            late = UNSAFE.get(out_node.op, ()) if kernel_accepts(out_node) else ()
            read_late = any(x is b and q in late for q, x in enumerate(out_node.inputs))
            for t in temps:
                if shapes[t] == sig and free(t, b, p, unsafe) and not (t == out and read_late):
                    buf = t
                    break
            if buf is None:
                buf = self.new_buffer(*sig)
                shapes[buf] = self.temp_pool[buf] = sig
                temps.append(buf)
            self.emit(f"    {self._kernel_call(b, args, attrs, buf)}{c}", n)
            held[buf] = [b]
            names[b] = buf
            if b is out_node:  # the output buffer still held a value the kernel reads
                self.emit(f"    {v} = _copyto({out}, {buf}){c}", n)
        if out_node not in pos:  # the body returns one of its inputs or a constant
            self.emit(f"    {v} = _copyto({out}, {names[out_node]}){self.comment(n, tag)}", n)
        self.set_storage(n, [key])


def _impl(op: str):
    from kiln.ops.registry import REGISTRY

    if op not in REGISTRY:
        raise ValueError(f"unknown primitive {op!r}")
    return REGISTRY[op].impl


def _is_view(op: str) -> bool:
    from kiln.ops.registry import REGISTRY

    return REGISTRY[op].is_view
