"""Capture by tracing: run a function once, eagerly, and record every primitive as a graph node.

The function runs on real tensors (so shapes, validations and Python control flow behave
exactly as in eager mode) while ``dispatch.apply`` reports each primitive to the active
``Tracer``.  Tensors the function did not compute are either the function's arguments (graph
inputs), tensors that existed before the call (parameters, buffers, optimizer state: *captured*
inputs, read at every run) or constants made during the trace.  In-place writes to captured
tensors and the ``.grad`` that backward leaves on parameters become graph outputs that the
compiled function writes back after each run, so the graph stays functional while the user's
code keeps PyTorch's in-place style.
"""

from __future__ import annotations

import os
import sys
import weakref

import numpy as np

from kiln.grad_mode import STATE
from kiln.graph.ir import Graph, Node

_KILN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class TraceError(RuntimeError):
    """Something in the traced function cannot be captured as a static graph."""


def user_frame(depth: int = 1):
    """The innermost stack frame outside the kiln package (the user's code), or None."""
    f = sys._getframe(depth)
    while f is not None and f.f_code.co_filename.startswith(_KILN_DIR):
        f = f.f_back
    return f


def user_location(depth: int = 2) -> str:
    """``file.py:12`` for the user's innermost frame (empty when there is none)."""
    f = user_frame(depth)
    if f is None:
        return ""
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


class Tracer:
    """Records primitives applied while a function runs; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name  # the compiled function's name, for messages
        self.graph = Graph()
        self.values: dict = {}  # id(tensor) -> Node holding its current value
        # Tensors are tracked by id.  Computed tensors are not kept alive (the trace must not
        # hold every activation of a training step at once): a weak reference's callback drops
        # a tensor's (or array's) entry when it dies, before its id can be reused.
        self._watch_refs: list = []
        self.traced: list = []  # weak references to tensors computed in the trace
        self.keep: list = []  # tensors kept alive on purpose (parameters whose .grad is set)
        self.arrays: dict = {}  # id(ndarray) -> Node: detach() and friends alias a value
        self.created: dict = {}  # id(tensor) -> tensor made during the trace outside primitives
        self.pending: dict = {}  # id(tensor) -> (tensor, input Node) for created tensors used
        # id(array) -> pending Node whose value is still that array itself (not yet written)
        self.unwritten: dict = {}
        self.zeros: set = set()  # pending Nodes whose first value was all zero bytes
        self.captured: dict = {}  # id(tensor) -> (tensor, input Node): pre-existing tensors
        self.mutated: dict = {}  # id(tensor) -> (tensor, Node): final values of in-place writes
        self.args: dict = {}  # id(tensor) -> (tensor, input Node) for the arguments
        self.grads: dict = {}  # id(leaf) -> leaf whose .grad backward set during the trace
        self.zeroed: dict = {}  # id(leaf) -> leaf whose .grad was set to None by zero_grad
        self.grad_none: dict = {}  # id(leaf) -> leaf whose .grad must be None at call time
        self.lifted: list = []  # (dict, key, index, input Node, tensor): read at each run
        self.modules: dict = {}  # id(module) -> module called (their .training is guarded)
        self.module_stack: list = []
        self.groups: dict = {}  # id(param group) -> group (its hyper-parameters are guarded)
        self.saw_backward = False
        self._bwd_loc = None  # while backward runs: the location of the forward node
        # autograd Node -> location of the op that made it (weak: nodes hold saved tensors)
        self._node_locs = weakref.WeakKeyDictionary()

    # -- inputs ------------------------------------------------------------------------------------
    def add_arg(self, t, name: str) -> Node:
        """Register a tensor argument of the traced function as a graph input."""
        n = self.graph.add_input(name, t._data.shape, t._data.dtype, kind="arg")
        self._bind(t, n)
        self.args[id(t)] = (t, n)
        return n

    def lift(self, owner: dict, key: str, index: int | None = None):
        """A 0-d float64 tensor standing for ``owner[key]`` (``owner[key][index]`` for a tuple
        such as Adam's betas), read afresh at every run (so a scheduler can change a compiled
        optimizer's learning rate or momentum without a recompile)."""
        from kiln.tensor import _make

        for d, k, i, _, t in self.lifted:
            if d is owner and k == key and i == index:
                return t
        value = owner[key] if index is None else owner[key][index]
        prev, STATE.tracer = STATE.tracer, None
        try:
            t = _make(np.array(value, np.float64))
        finally:
            STATE.tracer = prev
        name = key if index is None else f"{key}[{index}]"
        n = self.graph.add_input(name, (), np.float64, kind="lifted")
        self.lifted.append((owner, key, index, n, t))
        self._bind(t, n)
        if isinstance(owner, dict) and "params" in owner:
            self.groups[id(owner)] = owner
        return t

    def _bind(self, t, n: Node) -> None:
        self.values[id(t)] = n
        self._watch(t, self.values)
        a = t._data
        if id(a) not in self.arrays:
            self._watch(a, self.arrays)
        self.arrays[id(a)] = n

    def _watch(self, obj, table: dict) -> None:
        """Forget ``table[id(obj)]`` when ``obj`` dies."""
        key = id(obj)
        self._watch_refs.append(weakref.ref(obj, lambda _r: table.pop(key, None)))

    def node_of(self, t) -> Node:
        """The graph value of tensor ``t``, registering it as an input if it is new."""
        n = self.values.get(id(t))
        if n is not None:
            return n
        if id(t) in self.created:  # made during the trace: a constant, or new state (finalize)
            n = Node("input", (), {}, t._data.shape, t._data.dtype, name="", kind="created")
            # its value when first read: copied only before a write (_keep_first) or when it
            # ends as a constant (settle), not when it is state that lives on
            n.attrs = {"value": t._data}
            self.unwritten[id(t._data)] = n
            self.pending[id(t)] = (t, n)
            # in the inputs where it was first read (as a later trace, where it exists before
            # the call, would capture it) until settle decides whether it is state or constant
            self.graph.inputs.append(n)
        else:
            n = self.graph.add_input("", t._data.shape, t._data.dtype, kind="captured")
            self.captured[id(t)] = (t, n)
        self._bind(t, n)
        return n

    # -- hooks called by kiln's eager code while tracing -----------------------------------------
    def record(self, prim, inputs, attrs, out) -> None:
        """dispatch.apply ran ``prim``: append a node computing ``out``."""
        ins = [self.node_of(x) for x in inputs]
        n = Node(prim.name, ins, dict(attrs), out._data.shape, out._data.dtype, loc=self.loc())
        self.graph.nodes.append(n)
        self._bind(out, n)
        self.traced.append(weakref.ref(out))
        if out._node is not None:
            self._node_locs[out._node] = n.loc

    def on_make(self, t) -> None:
        """A tensor was made from an array outside the primitives (constants, detach, ...)."""
        a = t._data
        n = self.arrays.get(id(a))
        if n is not None:  # the same array as a traced value (detach, Node.out): an alias
            self.values[id(t)] = n
            self._watch(t, self.values)
            self.traced.append(weakref.ref(t))
            return
        base = a.base
        while isinstance(base, np.ndarray):
            if id(base) in self.arrays:
                self.unsupported(
                    "an internal kiln function built a tensor from a view of traced data "
                    "outside the primitive system; please report this as a kiln bug")
            base = base.base
        self.created[id(t)] = t  # kept: constants are read when the graph is finished

    def on_read(self, t, what: str) -> None:
        """Python code asks for the value of ``t`` (``.item()``, ``bool()``, ...)."""
        if id(t) in self.created and id(t) not in self.mutated:
            n = self.values.get(id(t))
            if n is None or n.kind == "created":
                return  # a constant made during the trace: its value is the same at every run
        raise TraceError(
            f"{self._where()}{what} reads the value of a tensor inside kiln.compile "
            f"(tracing {self.name}). A compiled function is traced once and replayed, so "
            "Python code cannot depend on tensor values. Instead: return the tensor and read "
            "it outside the compiled function, use tensor ops for data-dependent choices "
            "(kiln.where(cond, a, b), masks), or run this function eagerly."
        )

    def on_write(self, target, result, op: str) -> None:
        """An in-place op wrote ``result`` into ``target`` (dispatch.write_into)."""
        if target._base is not None:
            self.unsupported(
                f"{op}: an in-place write into a view (a slice, reshape or detach() of another "
                "tensor) cannot be captured; write through the base tensor (x[idx] = value) or "
                "use the out-of-place op")
        n = self.node_of(result)
        if n.dtype != target._data.dtype:
            n = self._add("cast", [n], {"dtype": target._data.dtype}, n.shape, target._data.dtype)
        if n.shape != target._data.shape:
            n = self._add("expand", [n], {"shape": target._data.shape}, target._data.shape,
                          n.dtype)
        self.node_of(target)  # make sure its old value is known (captured or constant)
        self._keep_first(target._data)
        self.values[id(target)] = n
        self.arrays[id(target._data)] = n
        if id(target) in self.captured or id(target) in self.created or id(target) in self.args:
            self.mutated[id(target)] = (target, n)

    def on_grad(self, leaf, g) -> None:
        """Backward accumulates ``g`` into ``leaf.grad`` (the eager path, made traceable)."""
        from kiln.tensor import _make

        if leaf.grad is None:
            if id(leaf) not in self.zeroed:
                self.grad_none[id(leaf)] = leaf  # eager would have added to an existing grad
            n = self.node_of(g)
            if n.dtype != leaf._data.dtype:
                n = self._add("cast", [n], {"dtype": leaf._data.dtype}, n.shape, leaf._data.dtype)
            prev, STATE.tracer = STATE.tracer, None
            try:
                t = _make(np.array(g._data, dtype=leaf._data.dtype))
            finally:
                STATE.tracer = prev
            self._bind(t, n)
            leaf.grad = t
        else:
            from kiln.grad_mode import no_grad

            with no_grad():
                leaf.grad.add_(g)
        self.grads[id(leaf)] = leaf
        self.keep.append(leaf)

    def on_zero_grad(self, p) -> None:
        """``p.grad = None`` by zero_grad: the compiled function does the same at each run."""
        self.zeroed[id(p)] = p
        self.grads.pop(id(p), None)
        self.keep.append(p)

    def backward_of(self, node) -> None:
        """Backward is running ``node``'s VJP (None when the walk ends)."""
        self.saw_backward = True
        self._bwd_loc = None if node is None else self._node_locs.get(node, "")

    def call_module(self, module, args, kwargs):
        """Module.__call__ while tracing: note the module (its mode is guarded) and its name."""
        self.modules[id(module)] = module
        self.module_stack.append(type(module).__name__)
        try:
            return module._call(args, kwargs)
        finally:
            self.module_stack.pop()

    def unsupported(self, message: str):
        raise TraceError(f"{self._where()}{message} (tracing {self.name} for kiln.compile)")

    # -- helpers -------------------------------------------------------------------------------
    def _keep_first(self, a: np.ndarray) -> None:
        """``a`` is about to be written in place: the created input whose value it is keeps a
        copy (all zero bytes, as an optimizer's new state, cost nothing until settle)."""
        n = self.unwritten.pop(id(a), None)
        if n is None:
            return
        if a.flags.c_contiguous and not a.reshape(-1).view(np.uint8).any():
            n.attrs = {"value": np.broadcast_to(np.zeros((), a.dtype), a.shape)}
            self.zeros.add(n)
        else:
            n.attrs = {"value": a.copy()}

    def _add(self, op, inputs, attrs, shape, dtype) -> Node:
        n = Node(op, inputs, attrs, shape, dtype, loc=self.loc())
        self.graph.nodes.append(n)
        return n

    def loc(self) -> str:
        """Where the node being recorded comes from, for printing and error messages."""
        if self._bwd_loc is not None:
            return f"backward of {self._bwd_loc}" if self._bwd_loc else "backward"
        where = user_location(3)
        if self.module_stack:
            return f"nn.{self.module_stack[-1]} @ {where}"
        return where

    def _where(self) -> str:
        f = user_frame(2)
        if f is None:
            return ""
        return f"{f.f_code.co_filename}:{f.f_lineno}: "

    # -- the result ------------------------------------------------------------------------------
    def settle(self, allowed_ids: set) -> list:
        """End the trace: decide what tensors made during it are, and find escapes.

        Call after the caller has dropped its own references to traced tensors other than
        ``allowed_ids`` (the outputs handed back, the new ``.grad``s).  Tensors made during the
        trace become constants (their value when first read), except those still referenced
        afterwards: that is state created on the first call (an optimizer's ``exp_avg``, written
        in place) or a tensor cached for later calls (a causal mask kept in a dict), which
        later traces capture as inputs since it exists before them; it is read by reference
        from the next run on, so every trace has the same inputs.  Returns weak
        references to tensors computed in the trace that are still alive although the graph
        cannot update them (stored in a list, a global or an attribute)."""
        import gc

        states = {key: (weakref.ref(t), n) for key, (t, n) in self.pending.items()}
        # the graph outputs follow the order of the writes, whatever settles here: a later trace
        # (where this state already exists) must list them the same way for unify to merge them
        order = list(self.mutated)
        mutated = {key: self.mutated.pop(key) for key in states if key in self.mutated}
        mutated = {key: (weakref.ref(t), n) for key, (t, n) in mutated.items()}
        self._node_locs = weakref.WeakKeyDictionary()
        refs = []
        for r in self.traced:
            t = r()
            if t is None:
                continue
            n = self.values.get(id(t))
            if (n is not None and n.op != "const" and n.kind not in ("arg", "captured",
                                                                       "lifted", "created")
                    and id(t) not in allowed_ids and id(t) not in self.created
                    and id(t) not in self.captured and id(t) not in self.args):
                refs.append(r)
        t = None  # noqa: F841 - drop the loop's reference before testing liveness
        self.keep, self.traced, self._watch_refs = [], [], []
        self.values, self.arrays, self.created = {}, {}, {}
        lazy = self.zeros.union(self.unwritten.values())
        self.pending, self.unwritten, self.zeros = {}, {}, set()
        if any(r() is not None for r in refs) or any(w() is not None for w, _ in states.values()):
            gc.collect()  # in-place ops leave reference cycles between a tensor and its node
        consts = []
        for key, (w, n) in states.items():
            t = w()
            if t is not None:  # state that lives on: read it by reference from the next run
                n.kind = "captured"
                n.attrs = {}
                self.captured[key] = (t, n)
                if key in mutated:
                    self.mutated[key] = (t, mutated[key][1])
            else:  # a temporary (perhaps written in place): its first value is a constant
                n.op, n.kind = "const", ""
                if n in lazy:  # its own array now, not a view of zeros or of another's data
                    n.attrs = {"value": np.array(n.attrs["value"])}
                consts.append(n)
        t = None  # noqa: F841
        self.mutated = {key: self.mutated[key] for key in order if key in self.mutated}
        self.graph.nodes[:0] = consts
        self.graph.inputs = [n for n in self.graph.inputs if n.op == "input"]
        pos = {n: i for i, n in enumerate(self.graph.inputs)}
        self.captured = dict(sorted(self.captured.items(), key=lambda kv: pos[kv[1][1]]))
        return [r for r in refs if r() is not None]
