"""Reverse-mode autodiff: graph nodes, the iterative backward walk, grad(), custom Functions."""

from __future__ import annotations

import heapq
import itertools
import weakref

import numpy as np

from kiln.grad_mode import STATE
from kiln.tensor import Tensor, _make

__all__ = ["Function", "backward", "grad", "Node"]

_FREED = (
    "Trying to backward through the graph a second time (or directly access saved tensors after "
    "they have already been freed). Saved intermediate values of the graph are freed when you "
    "call .backward() or autograd.grad(). Specify retain_graph=True if you need to backward a "
    "second time or if you need to access saved tensors after calling backward."
)


_sequence = itertools.count()  # creation order: consumers always come after their inputs


class Node:
    """One recorded primitive application: the tape entry, as data (``grad_fn`` in PyTorch)."""

    __slots__ = ("prim", "inputs", "attrs", "seq", "edges", "versions", "_out", "out_data",
                 "out_version", "hooks", "retains", "__weakref__")

    def __init__(self, prim, inputs: tuple, attrs: dict):
        self.prim = prim
        self.inputs = inputs
        self.attrs = attrs
        self.seq = next(_sequence)
        self.edges = tuple([x._node if x._node is not None else (x if x._rg else None)
                            for x in inputs])
        # optional trailing inputs (a missing bias) may be absent from ``inputs``
        self.versions = tuple([inputs[k]._version[0] for k in prim.save if k < len(inputs)]
                              ) if prim.save else ()
        self._out = None  # weak reference to the output tensor (a strong one would be a cycle)
        self.out_data = None  # the output's array, for when that tensor object is gone
        self.out_version = 0
        self.hooks = None
        self.retains = None

    @property
    def needs(self) -> tuple:
        """For each input, whether its gradient is wanted (VJPs skip the others)."""
        return tuple([e is not None for e in self.edges])

    def save_output(self, out: Tensor) -> None:
        self._out = weakref.ref(out)
        self.out_data = out._data
        self.out_version = out._version[0]

    @property
    def out(self) -> Tensor:
        """The output tensor, for VJPs that reuse it (exp, sigmoid, ...)."""
        if self.out_data is None:
            raise RuntimeError(_FREED)
        t = self._out()
        if t is None:  # the tensor object died; its values are still here
            t = _make(self.out_data)
            t._version = [self.out_version]
        if t._version[0] != self.out_version:
            raise _modified_error(self, t, self.out_version)
        return t

    def name(self) -> str:
        return "".join(p.capitalize() for p in self.prim.name.split("_")) + "Backward0"

    def __repr__(self) -> str:
        return f"<{self.name()} object>"

    @property
    def next_functions(self) -> tuple:
        return tuple((e, 0) for e in self.edges)

    def retain(self, tensor: Tensor) -> None:
        self.retains = weakref.ref(tensor)

    def register_hook(self, hook):
        if self.hooks is None:
            self.hooks = []
        self.hooks.append(hook)
        return HookHandle(self.hooks, hook)

    def _check_saved(self) -> None:
        if self.inputs is None:
            raise RuntimeError(_FREED)
        for k, v in zip(self.prim.save, self.versions):
            if self.inputs[k]._version[0] != v:
                raise _modified_error(self, self.inputs[k], v)


def _modified_error(node, t, expected) -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: [{t.dtype.name} {list(t.shape)}], used by {node.name()}, is at version "
        f"{t._version[0]}; expected version {expected} instead. Hint: clone the tensor before "
        "modifying it in place."
    )


class HookHandle:
    """Returned by ``register_hook``; ``remove()`` takes the hook off."""

    __slots__ = ("_hooks", "_hook")

    def __init__(self, hooks: list, hook):
        self._hooks = hooks
        self._hook = hook

    def remove(self) -> None:
        try:
            self._hooks.remove(self._hook)
        except ValueError:
            pass


# -- the backward walk ---------------------------------------------------------------------------

def _root_grads(outputs, grad_outputs):
    outputs = _as_tuple(outputs)
    if grad_outputs is None:
        grad_outputs = (None,) * len(outputs)
    grad_outputs = _as_tuple(grad_outputs)
    if len(grad_outputs) != len(outputs):
        raise RuntimeError(
            f"grad_outputs has {len(grad_outputs)} entries but outputs has {len(outputs)}"
        )
    roots = []
    for i, (out, g) in enumerate(zip(outputs, grad_outputs)):
        if not isinstance(out, Tensor):
            raise TypeError(f"outputs[{i}] must be a Tensor, got {type(out).__name__}")
        if not out._rg:
            raise RuntimeError(
                f"element {i} of tensors does not require grad and does not have a grad_fn"
            )
        if g is None:
            if out._data.size != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = _make(np.ones_like(out._data))
        elif not isinstance(g, Tensor):
            g = _make(np.asarray(g, dtype=out._data.dtype))
        if g._data.shape != out._data.shape:
            raise RuntimeError(
                f"Mismatch in shape: grad_output[{i}] has a shape of {g.shape} and output[{i}] "
                f"has a shape of {out.shape}."
            )
        if g._data.dtype != out._data.dtype:
            g = g.to(out.dtype)
        roots.append((out, g))
    return roots


def _as_tuple(x):
    if isinstance(x, Tensor) or x is None:
        return (x,)
    return tuple(x)


def _add(a, b):
    return b if a is None else a + b


def _run(roots, retain_graph, create_graph, targets=None):
    """Propagate gradients from ``roots`` ([(tensor, grad)]).

    Nodes are visited newest first: a node is created after all of its inputs, so by the time
    it is popped every consumer has already sent its gradient (PyTorch orders by sequence
    number the same way).  With ``targets`` (tensors), return their gradients instead of
    accumulating into leaves' ``.grad``.
    """
    node_grads: dict = {}
    leaf_grads: dict = {}  # id(leaf) -> [leaf, grad]
    heap: list = []
    # deliveries of each gradient array (by its base array): a leaf adopts an array that went
    # to it alone as its .grad; one that went elsewhere too (add's VJP passes g to both sides,
    # a root gradient belongs to the caller) is copied
    given: dict = {}
    for out, g in roots:
        given[_base_id(g._data)] = 2
        n = out._node
        if n is None:
            slot = leaf_grads.setdefault(id(out), [out, None])
            slot[1] = _add(slot[1], g)
        elif n in node_grads:
            node_grads[n] = node_grads[n] + g
        else:
            node_grads[n] = g
            heapq.heappush(heap, (-n.seq, n))

    wanted_nodes = useful = None
    if targets is not None:
        wanted_nodes = {t._node: t for t in targets if t._node is not None}
        useful = _nodes_leading_to([n for _, n in heap], targets)
    captured: dict = {}
    plain = targets is None
    owned: dict = {}  # gradient arrays this walk created (kept alive so ids stay unique)

    tracer = STATE.tracer
    while heap:
        n = heapq.heappop(heap)[1]
        g = node_grads.pop(n)
        if tracer is not None:  # graph nodes made by this VJP are located at n's forward line
            tracer.backward_of(n)
        if plain and n.hooks is None and n.retains is None:
            if n.inputs is None or n.versions:  # freed, or saved inputs to verify
                n._check_saved()
            if n.prim.grad_into is not None and _grad_into(n, g, node_grads, heap, owned,
                                                            create_graph or tracer is not None):
                grads = ()  # already delivered
            else:
                grads = n.prim.vjp(g, n)
        else:
            grads = _node_backward(n, g, create_graph, wanted_nodes, useful, captured)
        for e, gi in zip(n.edges, grads):
            if gi is None or e is None:
                continue
            a = gi._data
            k = id(a) if a.base is None else _base_id(a)
            given[k] = given.get(k, 0) + 1
            if type(e) is Node:
                prev = node_grads.get(e)
                if prev is None:
                    node_grads[e] = gi
                    heapq.heappush(heap, (-e.seq, e))
                else:
                    node_grads[e] = _sum_grads(prev, gi, owned, create_graph)
            else:
                slot = leaf_grads.get(id(e))
                if slot is None:
                    leaf_grads[id(e)] = [e, gi]
                else:
                    slot[1] = _sum_grads(slot[1], gi, owned, create_graph)
        if not retain_graph and (n.versions or n.out_data is not None):
            n.inputs = None  # free saved values, as PyTorch does
            n.out_data = None

    if tracer is not None:
        tracer.backward_of(None)
    for leaf, g in leaf_grads.values():
        hooked = False
        if leaf._hooks:
            for hook in leaf._hooks:
                new = hook(g)
                if new is not None:
                    g, hooked = new, True  # the hook may keep what it returned
        if targets is not None:
            captured[id(leaf)] = g
        else:
            _accumulate(leaf, g, create_graph,
                        hooked or given.get(_base_id(g._data), 0) > 1)
    return captured


def _base_id(a: np.ndarray) -> int:
    """The id of the array that owns ``a``'s memory."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return id(a)


def _grad_into(n, g, node_grads, heap, owned, recording: bool) -> bool:
    """Send node ``n``'s gradient to its (single, non-leaf) input through ``prim.grad_into``;
    False (use the VJP) when a graph is being recorded or the input is not a plain node."""
    e = n.edges[0] if len(n.edges) == 1 else None
    if recording or type(e) is not Node or n.inputs is None:
        return False
    prev = node_grads.get(e)
    acc = None
    if prev is not None:
        acc = prev._data
        if id(acc) not in owned or acc.dtype != g._data.dtype:  # someone else's array: copy it
            acc = np.array(acc, dtype=np.result_type(acc, g._data))
    new = n.prim.grad_into(acc, g._data, n)
    owned[id(new)] = new
    if prev is None:
        heapq.heappush(heap, (-e.seq, e))
    node_grads[e] = prev if prev is not None and new is prev._data else _make(new)
    return True


def _sum_grads(acc: Tensor, g: Tensor, owned: dict, create_graph: bool) -> Tensor:
    """acc + g; without create_graph, add into a buffer this walk owns instead of dispatching."""
    if create_graph or STATE.tracer is not None:  # traced: the sum must be a graph node
        return acc + g
    a = acc._data
    if id(a) in owned:
        np.add(a, g._data, out=a)
        return acc
    out = _make(np.asarray(np.add(a, g._data)))  # asarray: 0-d adds give numpy scalars
    owned[id(out._data)] = out._data
    return out


def _node_backward(n, g, create_graph, wanted_nodes, useful, captured):
    """Hooks, retained grads and captures for node ``n``, then its VJP: the input gradients."""
    if n.hooks:
        for hook in n.hooks:
            new = hook(g)
            if new is not None:
                g = new
    if n.retains is not None:
        t = n.retains()
        if t is not None:
            t.grad = g if create_graph else g.detach()
    if wanted_nodes is not None:
        if n in wanted_nodes:
            captured[id(wanted_nodes[n])] = g
        if n not in useful:
            return (None,) * len(n.edges)
    n._check_saved()
    grads = n.prim.vjp(g, n)
    if len(grads) != len(n.edges):
        raise RuntimeError(
            f"{n.name()}: backward returned {len(grads)} gradients for {len(n.edges)} inputs"
        )
    return grads


def _nodes_leading_to(starts, targets) -> set:
    """Nodes reachable from ``starts`` through which some target is reached."""
    goal_nodes = {t._node for t in targets if t._node is not None}
    goal_leaves = {id(t) for t in targets if t._node is None}
    seen = set(starts)
    stack = list(starts)
    while stack:
        for e in stack.pop().edges:
            if type(e) is Node and e not in seen:
                seen.add(e)
                stack.append(e)
    useful = set(goal_nodes)
    for n in sorted(seen, key=lambda n: n.seq):  # inputs before consumers
        if n in useful:
            continue
        for e in n.edges:
            if (e in useful) if type(e) is Node else (e is not None and id(e) in goal_leaves):
                useful.add(n)
                break
    return useful


def _accumulate(leaf: Tensor, g: Tensor, create_graph: bool, shared: bool = True) -> None:
    """Add ``g`` into ``leaf.grad``; a first gradient that no one else holds (``shared``
    False) becomes ``.grad`` without a copy."""
    if g._data.shape != leaf._data.shape:
        raise RuntimeError(
            f"gradient for a tensor of shape {list(leaf.shape)} has shape {list(g.shape)}"
        )
    if create_graph:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    elif STATE.tracer is not None:  # traced: ``.grad`` is set from a graph output after each run
        STATE.tracer.on_grad(leaf, g)
    elif leaf.grad is None:
        a = g._data
        if (shared or a.dtype != leaf._data.dtype or not a.flags.writeable
                or not a.flags.c_contiguous):
            a = np.array(a, dtype=leaf._data.dtype)  # own copy
        leaf.grad = _make(a)
    else:
        np.add(leaf.grad._data, g._data, out=leaf.grad._data, casting="unsafe")


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """Accumulate gradients of ``tensors`` into the ``.grad`` of the leaves they depend on."""
    roots = _root_grads(tensors, grad_tensors)
    if retain_graph is None:
        retain_graph = create_graph
    prev = STATE.grad_enabled
    STATE.grad_enabled = bool(create_graph)
    try:
        if inputs is None:
            _run(roots, retain_graph, create_graph)
        else:
            targets = _as_tuple(inputs)
            grads = _run(roots, retain_graph, create_graph, targets)
            for t in targets:
                if id(t) in grads:
                    _accumulate(t, grads[id(t)], create_graph)
    finally:
        STATE.grad_enabled = prev


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=None, materialize_grads=False):
    """Gradients of ``outputs`` with respect to ``inputs``, returned instead of accumulated.

    >>> import kiln
    >>> x = kiln.tensor(3.0, requires_grad=True)
    >>> (dx,) = kiln.autograd.grad(x ** 3, x, create_graph=True)
    >>> kiln.autograd.grad(dx, x)[0]   # d2/dx2 x^3 = 6x
    tensor(18.)
    """
    targets = _as_tuple(inputs)
    for i, t in enumerate(targets):
        if not isinstance(t, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(t).__name__}")
        if not t._rg:
            raise RuntimeError("One of the differentiated Tensors does not require grad")
    roots = _root_grads(outputs, grad_outputs)
    if retain_graph is None:
        retain_graph = create_graph
    prev = STATE.grad_enabled
    STATE.grad_enabled = bool(create_graph)
    try:
        got = _run(roots, retain_graph, create_graph, targets)
    finally:
        STATE.grad_enabled = prev
    result = []
    for t in targets:
        g = got.get(id(t))
        if g is None:
            if materialize_grads:
                g = _make(np.zeros_like(t._data))
            elif not allow_unused:
                raise RuntimeError(
                    "One of the differentiated Tensors appears to not have been used in the "
                    "graph. Set allow_unused=True if this is the desired behavior."
                )
        elif not create_graph:
            g = g.detach()
        result.append(g)
    return tuple(result)


# -- user-defined functions ----------------------------------------------------------------------

class FunctionCtx:
    """The ``ctx`` passed to a custom Function's forward and backward."""

    def __init__(self):
        self.saved_tensors = ()
        self.needs_input_grad = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors) -> None:
        self._non_diff = {id(t) for t in tensors}

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value


class _CustomPrim:
    """Stands in for a registered primitive in the Node of a custom Function call."""

    __slots__ = ("name", "save", "save_out", "fn")
    grad_into = None

    def __init__(self, fn_cls):
        self.name = fn_cls.__name__
        self.save = ()
        self.save_out = False
        self.fn = fn_cls

    def vjp(self, g, node):
        ctx, positions, nargs = node.attrs["ctx"], node.attrs["positions"], node.attrs["nargs"]
        grads = self.fn.backward(ctx, g)
        grads = grads if isinstance(grads, tuple) else (grads,)
        if len(grads) != nargs:
            raise RuntimeError(
                f"function {self.name}.backward returned an incorrect number of gradients "
                f"(expected {nargs}, got {len(grads)})"
            )
        out = []
        for pos, x in zip(positions, node.inputs):
            gx = grads[pos]
            if gx is not None and not isinstance(gx, Tensor):
                raise TypeError(f"{self.name}.backward must return Tensors or None")
            if gx is not None and gx.shape != x.shape:
                raise RuntimeError(
                    f"Function {self.name}.backward returned an invalid gradient at index {pos} - "
                    f"got {list(gx.shape)} but expected shape compatible with {list(x.shape)}"
                )
            out.append(gx)
        return tuple(out)


class Function:
    """A differentiable operation with a hand-written backward, as ``torch.autograd.Function``.

    >>> import kiln
    >>> class Cube(kiln.autograd.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.save_for_backward(x)
    ...         return x ** 3
    ...     @staticmethod
    ...     def backward(ctx, g):
    ...         (x,) = ctx.saved_tensors
    ...         return g * 3 * x ** 2
    >>> x = kiln.tensor(2.0, requires_grad=True)
    >>> Cube.apply(x).backward(); x.grad
    tensor(12.)
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError("a Function subclass must define forward(ctx, ...)")

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("a Function subclass must define backward(ctx, grad)")

    @classmethod
    def apply(cls, *args):
        ctx = FunctionCtx()
        positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        tensors = tuple(args[i] for i in positions)
        ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a._rg for a in args)
        prev = STATE.grad_enabled
        STATE.grad_enabled = False
        try:
            out = cls.forward(ctx, *args)
        finally:
            STATE.grad_enabled = prev
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{cls.__name__}.forward must return a single Tensor in kiln, "
                f"got {type(out).__name__}"
            )
        if any(t is out for t in tensors):
            out = out.detach()
        if prev and any(t._rg for t in tensors) and id(out) not in getattr(ctx, "_non_diff", ()):
            prim = cls.__dict__.get("_kiln_prim")
            if prim is None:
                prim = _CustomPrim(cls)
                cls._kiln_prim = prim
            node = Node(prim, tensors, {"ctx": ctx, "positions": positions, "nargs": len(args)})
            out._node = node
            out._rg = True
        return out
