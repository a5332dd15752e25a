"""A compiled graph's fused elementwise group as one native kernel (kiln.jit.expr).

``runner(node, aliased)`` turns a ``fused`` node into ``run(out, *inputs)``, which writes the
group's result into ``out`` in one pass over memory instead of one numpy call per body node, or
returns None when some body node has no exact native form (the executor then keeps its numpy
statements).  Only operations whose float32 results are bitwise equal to numpy's are mapped, so
a compiled graph computes the same bits with or without the JIT.  Body nodes of shape ``()``
(an optimizer's bias corrections in float64) run first through their numpy impls and enter the
kernel as scalars.  Kernels are compiled when the graph is compiled and shared by every group
with the same body structure and input layouts; inside ``one_module`` the new kernels of a
graph are compiled together.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import weakref

import numpy as np

from kiln.backends.codegen import _impl
from kiln.backends.kernels import OUT_KERNELS, UFUNCS, _broadcast_ok, kernel_accepts
from kiln.graph.ir import Graph, Node
from kiln.graph.symbolic import has_sym, resolve
from kiln.jit import expr as X
from kiln.jit import parallel

# Groups with fewer output elements times array operations stay with numpy: a kernel call
# costs ~3 us of Python and ctypes, about what two numpy passes over 32k float32 elements take
# (measured 2.5 us at 8k elements, 8-9 us at 32k; a native pass: ~1 us at 32k, in cache).
MIN_WORK = 65536
# Below this many element-operations a kernel runs on the calling thread.  Measured in
# interleaved A/Bs once the workers spun ~2 ms between jobs (they used to fall asleep between
# the optimizer's updates and wake ~90 us late): 1M instead of 8M made the compiled mlp step 9%
# faster (its Adam update of fc1.w, sqrt and two divisions per element, is compute-bound) and
# left the gpt's unchanged.
PARALLEL_WORK = 1 << 20
# A dynamic dimension is laid out as if it were this large (any size > 1 gives the same kinds).
_GENERIC = 10007

_F32, _BOOL = np.dtype(np.float32), np.dtype(np.bool_)
_CODE = {_F32: "f", _BOOL: "b"}


def _emitter(b: Node, consts: dict):
    """``f(args) -> Expr`` computing body node ``b`` exactly as its numpy impl, or None.
    ``consts``: {body value: float} for the 0-d constants (pow reads its exponent)."""

    ins = [x.dtype for x in b.inputs]
    f32 = b.dtype == _F32 and all(d == _F32 for d in ins)
    op = b.op
    if f32 and op in ("add", "sub", "mul", "div") and len(ins) == 2:
        return {"add": lambda a: a[0] + a[1], "sub": lambda a: a[0] - a[1],
                "mul": lambda a: a[0] * a[1], "div": lambda a: a[0] / a[1]}[op]
    if f32 and op in ("neg", "abs", "sqrt", "relu") and len(ins) == 1:
        # numpy's maximum(x, 0) returns its second operand on ties (+0.0 for -0.0) and keeps
        # NaN: exactly expr.maximum
        return {"neg": lambda a: -a[0], "abs": lambda a: X.fabs(a[0]),
                "sqrt": lambda a: X.sqrt(a[0]), "relu": lambda a: X.maximum(a[0], 0.0)}[op]
    if f32 and op in ("maximum", "minimum"):
        return (lambda a: X.maximum(a[0], a[1])) if op == "maximum" else \
            (lambda a: X.minimum(a[0], a[1]))
    if f32 and op == "relu_backward":
        return lambda a: X.where(a[1] > 0.0, a[0], 0.0)
    if op == "pow" and f32 and b.inputs[1].shape == ():
        e = consts.get(b.inputs[1])
        if e is None:
            return None
        if e == 2.0:
            return lambda a: a[0] * a[0]  # np.square
        if e == 0.5:
            return lambda a: X.sqrt(a[0])
        return None
    if (op in ("eq", "ne", "lt", "le", "gt", "ge") and b.dtype == _BOOL
            and all(d == _F32 for d in ins)):
        return {"eq": lambda a: X.eq(a[0], a[1]), "ne": lambda a: X.ne(a[0], a[1]),
                "lt": lambda a: a[0] < a[1], "le": lambda a: a[0] <= a[1],
                "gt": lambda a: a[0] > a[1], "ge": lambda a: a[0] >= a[1]}[op]
    if op == "where" and ins[0] == _BOOL and ins[1] == ins[2] == b.dtype and b.dtype in _CODE:
        kind = _CODE[b.dtype]
        return lambda a: X.Expr("where", (a[0], a[1], a[2]), kind=kind)
    if op == "logical_not" and b.dtype == _BOOL and ins == [_BOOL]:
        return lambda a: X.logical_not(a[0])
    if op in ("logical_and", "logical_or") and b.dtype == _BOOL and ins == [_BOOL, _BOOL]:
        if op == "logical_and":
            return lambda a: X.Expr("where", (a[0], a[1], X.lift(False)), kind="b")
        return lambda a: X.Expr("where", (a[0], X.lift(True), a[1]), kind="b")
    if op == "cast" and len(ins) == 1 and b.dtype in _CODE and ins[0] in _CODE:
        src, dst = ins[0], b.dtype
        if src == dst:
            return lambda a: a[0]
        if dst == _F32:
            return lambda a: X.to_float(a[0])
        return lambda a: X.ne(a[0], 0.0)  # astype(bool): nonzero, and NaN is True
    return None


def _live(body: Graph) -> list[Node]:
    out = next(iter(body.outputs.values()))
    needed = {out}
    for b in reversed(body.nodes):
        if b in needed:
            needed.update(b.inputs)
    return [b for b in body.nodes if b in needed]


def _generic(shape) -> tuple:
    """``shape`` with every dynamic dimension replaced by one large size."""
    if not has_sym(shape):
        return tuple(shape)
    env = {d.name: _GENERIC for d in shape if hasattr(d, "name")}
    return tuple(resolve(tuple(shape), env))


# -- array addresses: a cached lookup (~0.2 us) for the arrays a graph passes at every call ---

_addresses: dict[int, tuple] = {}


def _address(a: np.ndarray) -> int:
    e = _addresses.get(id(a))
    if e is not None and e[0]() is a:
        return e[1]
    p = X.address(a)
    key = id(a)
    _addresses[key] = (weakref.ref(a, lambda _, k=key: _addresses.pop(k, None)), p)
    return p


class _Runner:
    """``run(out, *inputs)``: the 0-d prologue in numpy, then one kernel call over ``out``."""

    def __init__(self, kernel, split, kinds, outer, tail, prologue, slots) -> None:
        self.kernel, self.cost = kernel, kernel.cost  # kernel.fn: set once it is compiled
        self.split = split if any(k in ("row", "col") for k in kinds) else None
        self.outer = outer  # [(kernel input, outer input, may alias out, is full)]
        self.tail = tail  # constants, then 0-d buffers: the values after the outer inputs
        self.prologue = prologue  # [(value index or None, fn, [value index], kwargs)]
        self.slots = slots  # [(value index, 0-d array the kernel reads)]: impl results
        self.ptrs = [0] * len(kinds)  # kernel input addresses; fixed ones filled in by runner
        self._keep = []

    def __call__(self, out, *inputs):
        n = out.size
        if n == 0:
            return out
        if self.prologue:
            vals = [*inputs, *self.tail]
            for i, fn, idx, kw in self.prologue:
                r = fn(*[vals[j] for j in idx], **kw)
                if i is not None:  # an impl's result: no buffer of its own
                    vals[i] = np.asarray(r)
            for i, slot in self.slots:
                slot[()] = vals[i]
        ptrs = self.ptrs[:]
        keep = []  # copies made for this call
        cache = _addresses
        for k, j, aliased, full in self.outer:
            a = inputs[j]
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
                keep.append(a)
            elif aliased and a is not out and np.may_share_memory(a, out) and not (
                    full and a.ctypes.data == out.ctypes.data and a.strides == out.strides):
                # reading element i before writing element i is safe; any other overlap is not
                a = a.copy()
                keep.append(a)
            e = cache.get(id(a))
            ptrs[k] = e[1] if e is not None and e[0]() is a else _address(a)
        target = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
        cols = n if self.split is None else math.prod(out.shape[self.split:])
        args = (cols, _address(target), *ptrs)
        if n * self.cost < PARALLEL_WORK:
            self.kernel.fn(0, n, *args)
        else:
            parallel.run(self.kernel.fn, n, args, work_per_item=self.cost)
        if target is not out:
            np.copyto(out, target)
        return out


_open = threading.local()  # .batch: the X.Batch of one_module in this thread


@contextlib.contextmanager
def one_module(name: str):
    """Compile the kernels that ``runner`` makes inside into one module, on leaving."""
    if getattr(_open, "batch", None) is not None:  # nested: the outer one compiles
        yield
        return
    batch = _open.batch = X.Batch(f"fused_{name}")
    try:
        yield
    finally:
        _open.batch = None
        batch.compile()


def runner(node: Node, aliased=frozenset()):
    """A native ``run(out, *inputs)`` for fused ``node``, or None when it cannot be one.

    ``aliased``: positions of the node's inputs that may share memory with ``out``.
    """
    body: Graph = node.attrs["body"]
    out_node = next(iter(body.outputs.values()))
    out_shape = _generic(node.shape)
    if out_node.op in ("input", "const") or node.shape == () or node.dtype not in _CODE:
        return None
    live = _live(body)
    index = {bi: k for k, bi in enumerate(body.inputs)}  # every value's index
    consts = []
    for b in live:
        if b.op == "const":
            index[b] = len(index)
            consts.append(b.attrs["value"])
    prologue, emit, tail = [], {}, list(consts)
    scalars = {x: float(x.attrs["value"]) for x in live if x.op == "const" and x.shape == ()}
    scalars.update((bi, float(x.attrs["value"])) for bi, x in zip(body.inputs, node.inputs)
                   if x.op == "const" and x.shape == ())
    for b in live:
        if b.op == "const":
            continue
        if b.shape == ():
            if any(x.shape != () for x in b.inputs):
                return None
            index[b] = len(index)
            prologue.append(_step(b, index, tail))
            continue
        f = _emitter(b, scalars)
        if f is None or not _broadcast_ok(b):
            return None
        emit[b] = f
    if math.prod(out_shape) * len(emit) < MIN_WORK:
        return None
    # kernel inputs: the values kernel nodes read that are not kernel nodes themselves
    leaves: list[Node] = []
    key = []
    for b in live:
        if b not in emit:
            continue
        args = []
        for x in b.inputs:
            if x in emit:
                args.append(f"n{live.index(x)}")
                continue
            if x.dtype not in _CODE:
                return None
            if x not in leaves:
                leaves.append(x)
            args.append(f"i{leaves.index(x)}")
        extra = f"^{scalars[b.inputs[1]]}" if b.op == "pow" else ""
        key.append(f"{b.op}{extra}:{b.dtype.char}({','.join(args)})")

    lay = X.layout([_generic(x.shape) for x in leaves], out_shape)
    if lay is None:
        return None
    split, kinds = lay
    dtypes = "".join(_CODE[x.dtype] for x in leaves)

    def build(*xs):
        vals = {x: xs[k] for k, x in enumerate(leaves)}
        for b in live:
            if b in emit:
                vals[b] = emit[b]([vals[x] for x in b.inputs])
        return vals[out_node]

    name = "fz_" + hashlib.sha1(";".join(key).encode()).hexdigest()[:12]
    try:
        # overlaps other than element for element are copied first by _Runner
        k = X.kernel(name, len(kinds), build, kinds, dtypes, noalias=True,
                     batch=getattr(_open, "batch", None))
    except Exception:  # noqa: BLE001 - a group the code generator cannot build keeps numpy
        return None
    n_in = len(body.inputs)
    outer, slots, fixed = [], [], {}
    for p, x in enumerate(leaves):
        s = index[x]
        if s < n_in:
            outer.append((p, s, s in aliased, kinds[p] == "full"))
        elif tail[s - n_in] is not None:  # a constant or a prologue buffer
            fixed[p] = np.ascontiguousarray(tail[s - n_in])
        else:
            fixed[p] = np.empty((), x.dtype)
            slots.append((s, fixed[p]))
    run = _Runner(k, split, kinds, outer, tail, prologue, slots)
    for p, a in fixed.items():
        run.ptrs[p] = a.ctypes.data
        run._keep.append(a)
    return run


def _step(b: Node, index: dict, tail: list) -> tuple:
    """A prologue step for 0-d node ``b``: its out-kernel into a buffer of its own (as the numpy
    path computes it), else its impl; appends the buffer (or None) to ``tail``."""
    idx = [index[x] for x in b.inputs]
    if kernel_accepts(b):
        buf = np.empty((), b.dtype)
        tail.append(buf)
        if b.op in UFUNCS:
            ufunc, extra = UFUNCS[b.op]
            if extra:
                return None, lambda *a: ufunc(*a, *extra, out=buf), idx, {}
            return None, ufunc, idx, {"out": buf}
        kern = OUT_KERNELS[b.op]
        return None, lambda *a, **kw: kern(buf, *a, **kw), idx, dict(b.attrs)
    tail.append(None)
    return index[b], _impl(b.op), idx, dict(b.attrs)
