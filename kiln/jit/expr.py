"""Elementwise kernels from expressions: one native loop computes every output in one pass.

A kernel is written as Python arithmetic on ``Expr`` values (``x * sigmoid(x)``) and compiled
once into a function over a range of output elements.  Inputs are float32 (or bool) arrays,
C-contiguous, each laid out against the output viewed as ``(rows, C)``:

- ``full``: the output's shape (element ``i``);
- ``scalar``: one element, used everywhere;
- ``row``: one row of C values repeated for every row (a bias of shape ``(C,)``);
- ``col``: one value per row (a per-row statistic of shape ``(rows, 1)``).

``layout`` finds that view for a set of broadcast input shapes.
"""

from __future__ import annotations

import ctypes
import itertools
import math

import numpy as np
from llvmlite import ir

from kiln.jit import engine, mathlib, parallel
from kiln.jit.engine import F32, I1, I8, I64, address

KINDS = ("full", "scalar", "row", "col")
_DTYPES = {"f": np.dtype(np.float32), "b": np.dtype(np.bool_)}
_names = itertools.count()


class Expr:
    """A node of an elementwise expression: ``op`` over ``args``; ``kind`` 'f' (float32) or 'b'."""

    __slots__ = ("op", "args", "value", "kind")

    def __init__(self, op: str, args=(), value=None, kind: str = "f") -> None:
        self.op, self.args, self.value, self.kind = op, tuple(args), value, kind

    def __add__(self, o): return _bin("add", self, o)
    def __radd__(self, o): return _bin("add", o, self)
    def __sub__(self, o): return _bin("sub", self, o)
    def __rsub__(self, o): return _bin("sub", o, self)
    def __mul__(self, o): return _bin("mul", self, o)
    def __rmul__(self, o): return _bin("mul", o, self)
    def __truediv__(self, o): return _bin("div", self, o)
    def __rtruediv__(self, o): return _bin("div", o, self)
    def __neg__(self): return Expr("neg", (self,))
    def __lt__(self, o): return _cmp("<", self, o)
    def __le__(self, o): return _cmp("<=", self, o)
    def __gt__(self, o): return _cmp(">", self, o)
    def __ge__(self, o): return _cmp(">=", self, o)
    __hash__ = object.__hash__


def lift(v) -> Expr:
    """An Expr for ``v`` (a Python number becomes a float32 constant)."""
    if isinstance(v, Expr):
        return v
    if isinstance(v, bool):
        return Expr("const", value=bool(v), kind="b")
    return Expr("const", value=float(np.float32(v)))


def _bin(op, a, b) -> Expr:
    return Expr(op, (lift(a), lift(b)))


def _cmp(op, a, b) -> Expr:
    return Expr("cmp", (lift(a), lift(b)), value=op, kind="b")


def eq(a, b) -> Expr: return _cmp("==", a, b)
def ne(a, b) -> Expr: return _cmp("!=", a, b)
def where(c, a, b) -> Expr: return Expr("where", (lift(c), lift(a), lift(b)))
def minimum(a, b) -> Expr: return _bin("min", a, b)
def maximum(a, b) -> Expr: return _bin("max", a, b)
def to_float(c) -> Expr: return Expr("to_float", (lift(c),))
def logical_not(c) -> Expr: return Expr("not", (lift(c),), kind="b")


def _unary(name):
    def f(x) -> Expr:
        return Expr(name, (lift(x),))
    f.__name__ = name
    return f


exp, log, tanh, sigmoid, sqrt, fabs = (_unary(n) for n in
                                       ("exp", "log", "tanh", "sigmoid", "sqrt", "abs"))


def layout(in_shapes, out_shape) -> tuple[int, list[str]] | None:
    """``(k, kinds)``: the output viewed as ``(prod(out[:k]), prod(out[k:]))`` and each input's
    kind, or None when some input broadcasts in a way no single split describes."""
    out = tuple(out_shape)
    nd = len(out)
    splits = set(range(nd + 1))
    per_input = []
    for s in in_shapes:
        s = (1,) * (nd - len(s)) + tuple(s)
        if s == out:
            per_input.append(None)
            continue
        if math.prod(s) == 1:
            per_input.append("scalar")
            continue
        ok = {}
        for k in range(nd + 1):
            if all(d == 1 for d in s[:k]) and s[k:] == out[k:]:
                ok[k] = "row"
            elif s[:k] == out[:k] and all(d == 1 for d in s[k:]):
                ok[k] = "col"
        splits &= set(ok)
        per_input.append(ok)
    if not splits:
        return None
    # the widest rows that fit: most elements per inner loop
    k = min(splits, key=lambda k: (-math.prod(out[k:]) if k < nd else 0, k))
    kinds = ["full" if p is None else p if isinstance(p, str) else p[k] for p in per_input]
    return k, kinds


class Kernel:
    """A compiled elementwise kernel for one expression and one choice of input kinds."""

    def __init__(self, outputs, in_kinds, in_dtypes, name: str | None = None,
                 noalias: bool = False, batch: Batch | None = None) -> None:
        """``noalias``: promise that no input overlaps an output except element for element
        (an output written in place of a full input it reads). Reading element i before writing
        element i keeps the vectorized loop correct there; without the promise LLVM checks for
        overlap at run time and sends in-place calls to its scalar loop (2x slower).
        ``batch``: build into its module; ``fn`` is set when the batch is compiled."""
        self.outputs = [lift(o) for o in outputs]
        self.noalias = noalias
        self.in_kinds = tuple(in_kinds)
        self.in_dtypes = tuple(in_dtypes)
        self.name = name or f"k{next(_names)}"
        self.cost = _cost(self.outputs)
        self.fn = None
        n_ptr = len(self.outputs) + len(self.in_kinds)
        self.signature = (ctypes.c_int64,) * 3 + (ctypes.c_void_p,) * n_ptr
        if batch is not None:
            try:
                self._build(batch.module)
            except Exception:
                batch.module.globals.pop(self.name, None)  # the other kernels stay valid
                raise
            return
        mod = engine.new_module(self.name)
        self._build(mod)
        self.fn = engine.compile_module(mod, {self.name: self.signature})[self.name]

    def __call__(self, outs, ins, cols: int | None = None) -> None:
        """Compute into ``outs`` (C-contiguous, the output shape) from ``ins`` (C-contiguous, laid
        out as declared); the row length ``cols`` comes from the first output and the declared
        kinds unless the caller knows it already."""
        n = outs[0].size
        if n == 0:
            return
        if cols is None:
            cols = self._cols(outs[0].shape, ins)
        ptrs = tuple(map(address, outs)) + tuple(map(address, ins))
        parallel.run(self.fn, n, (cols,) + ptrs, work_per_item=self.cost)

    def _cols(self, shape, ins) -> int:
        for kind, a in zip(self.in_kinds, ins):
            if kind == "row":
                return a.size
            if kind == "col":
                return math.prod(shape) // a.size
        return max(math.prod(shape), 1)

    # -- code generation ---------------------------------------------------------------------
    def _build(self, mod: ir.Module) -> None:
        ptr8 = I8.as_pointer()
        out_types = [F32.as_pointer() if o.kind == "f" else ptr8 for o in self.outputs]
        in_types = [F32.as_pointer() if d == "f" else ptr8 for d in self.in_dtypes]
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64, I64] + out_types
                                              + in_types), self.name)
        if self.noalias:
            for a in fn.args[3:]:
                a.add_attribute("noalias")
        start, stop, cols = fn.args[:3]
        outs = fn.args[3:3 + len(out_types)]
        ins = fn.args[3 + len(out_types):]
        entry = fn.append_basic_block("entry")
        row_bb = fn.append_basic_block("row")
        inner_bb = fn.append_basic_block("inner")
        next_bb = fn.append_basic_block("next_row")
        done = fn.append_basic_block("done")
        b = ir.IRBuilder(entry)
        first_row = b.udiv(start, cols)
        b.cbranch(b.icmp_signed("<", start, stop), row_bb, done)

        b.position_at_end(row_bb)
        pos = b.phi(I64, "pos")
        r = b.phi(I64, "r")
        pos.add_incoming(start, entry)
        r.add_incoming(first_row, entry)
        row_base = b.mul(r, cols)
        row_end = b.add(row_base, cols)
        seg_end = b.select(b.icmp_signed("<", row_end, stop), row_end, stop)
        # per-row values: scalars and per-row (col) inputs are loaded once per row
        fixed, shifted = {}, {}
        for k, (kind, p) in enumerate(zip(self.in_kinds, ins)):
            if kind == "scalar":
                fixed[k] = self._load(b, p, ir.Constant(I64, 0), k)
            elif kind == "col":
                fixed[k] = self._load(b, p, r, k)
            elif kind == "row":
                shifted[k] = b.gep(p, [b.neg(row_base)])
        b.branch(inner_bb)

        b.position_at_end(inner_bb)
        i = b.phi(I64, "i")
        i.add_incoming(pos, row_bb)
        values = {}
        for k in range(len(ins)):
            if k in fixed:
                values[k] = fixed[k]
            else:
                values[k] = self._load(b, shifted.get(k, ins[k]), i, k)
        memo: dict = {}
        for o, p in zip(self.outputs, outs):
            v = _emit(b, o, values, memo)
            if o.kind == "b":
                v = b.zext(v, I8)
            b.store(v, b.gep(p, [i]))
        i_next = b.add(i, ir.Constant(I64, 1))
        i.add_incoming(i_next, inner_bb)
        b.cbranch(b.icmp_signed("<", i_next, seg_end), inner_bb, next_bb)

        b.position_at_end(next_bb)
        pos.add_incoming(seg_end, next_bb)
        r.add_incoming(b.add(r, ir.Constant(I64, 1)), next_bb)
        b.cbranch(b.icmp_signed("<", seg_end, stop), row_bb, done)
        b.position_at_end(done)
        b.ret_void()

    def _load(self, b, ptr, idx, k):
        v = b.load(b.gep(ptr, [idx]))
        return b.icmp_unsigned("!=", v, ir.Constant(I8, 0)) if self.in_dtypes[k] == "b" else v


_MATH = {"exp": mathlib.exp, "log": mathlib.log, "tanh": mathlib.tanh,
         "sigmoid": mathlib.sigmoid, "sqrt": mathlib.sqrt, "abs": mathlib.fabs}
_COST = {"exp": 12, "log": 14, "tanh": 18, "sigmoid": 14, "div": 4, "sqrt": 4}


def register_unary(name: str, emit, cost: int):
    """Make ``emit(builder, value) -> value`` (float32 IR) an elementwise op named ``name`` of
    about ``cost`` element-operations; returns the function that applies it to an Expr."""
    _MATH[name] = emit
    _COST[name] = cost
    return _unary(name)


def _cost(outputs) -> int:
    seen, stack, total = set(), list(outputs), 0
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        total += _COST.get(e.op, 1)
        stack.extend(e.args)
    return total


def _emit(b: ir.IRBuilder, e: Expr, inputs: dict, memo: dict):
    if id(e) in memo:
        return memo[id(e)]
    op = e.op
    if op == "input":
        v = inputs[e.value]
    elif op == "const":
        v = ir.Constant(I1, int(e.value)) if e.kind == "b" else ir.Constant(F32, e.value)
    else:
        a = [_emit(b, x, inputs, memo) for x in e.args]
        if op == "add":
            v = b.fadd(*a)
        elif op == "sub":
            v = b.fsub(*a)
        elif op == "mul":
            v = b.fmul(*a)
        elif op == "div":
            v = b.fdiv(*a)
        elif op == "neg":
            v = b.fneg(a[0])
        elif op in ("min", "max"):
            # numpy's minimum/maximum propagate NaN; minnum/maxnum would drop it
            x, y = a
            pick = b.fcmp_ordered("<" if op == "min" else ">", x, y)
            v = b.select(pick, x, y)
            v = b.select(mathlib.is_nan(b, x), x, v)
        elif op == "cmp":
            v = (b.fcmp_unordered("!=", *a) if e.value == "!=" else b.fcmp_ordered(e.value, *a))
        elif op == "where":
            v = b.select(*a)
        elif op == "to_float":
            v = b.uitofp(a[0], F32)
        elif op == "not":
            v = b.xor(a[0], ir.Constant(I1, 1))
        elif op in _MATH:
            v = _MATH[op](b, a[0])
        else:
            raise ValueError(f"no native code for elementwise op {op!r}")
    memo[id(e)] = v
    return v


def inputs(n: int, dtypes: str | None = None) -> list[Expr]:
    """``n`` input placeholders (``dtypes`` a string of 'f'/'b' per input, default all float)."""
    dtypes = dtypes or "f" * n
    return [Expr("input", value=k, kind=dtypes[k]) for k in range(n)]


_cache: dict = {}


class Batch:
    """Kernels built into one IR module and compiled together: one optimization pipeline and
    one engine instead of one each (each costs ~10 ms and ~120 KB that LLVM keeps).  They join
    the shared cache once compiled, so no other caller meets a kernel without code."""

    def __init__(self, name: str) -> None:
        self.module = engine.new_module(name)
        self.pending: dict = {}  # cache key -> Kernel built into the module

    def compile(self) -> None:
        """Compile the kernels built so far and set their ``fn``."""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        fns = engine.compile_module(self.module,
                                    {k.name: k.signature for k in pending.values()})
        for key, k in pending.items():
            k.fn = fns[k.name]
            _cache.setdefault(key, k)


def kernel(key, n_in: int, build, in_kinds=None, in_dtypes: str | None = None,
           noalias: bool = False, batch: Batch | None = None) -> Kernel:
    """The compiled kernel for ``build(*inputs)`` (an Expr or a tuple of them), once per key
    (``noalias``: see Kernel).  With ``batch``, a kernel not compiled yet is built into the
    batch's module and gets its ``fn`` when the batch is compiled."""
    in_kinds = tuple(in_kinds or ("full",) * n_in)
    in_dtypes = in_dtypes or "f" * n_in
    full = (key, in_kinds, in_dtypes, noalias)
    k = _cache.get(full)
    if k is None and batch is not None:
        k = batch.pending.get(full)
    if k is None:
        outs = build(*inputs(n_in, in_dtypes))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        name = f"{key}_{len(_cache) + (len(batch.pending) if batch else 0)}"
        k = Kernel(outs, in_kinds, in_dtypes, name=name, noalias=noalias, batch=batch)
        (_cache if batch is None else batch.pending)[full] = k
    return k


def output_dtype(e: Expr) -> np.dtype:
    return _DTYPES[e.kind]
