"""Memory planning: reusable ``out=`` buffers, frees at last use and in-place state updates.

The plan is for an executor that runs ``g.nodes`` in order.  Its contract:

- a node in ``slot_of`` writes its result into buffer ``slot_of[node]`` (allocated once with
  ``slots[k]``'s shape and dtype) and that buffer is its value; the slot is the buffer of one
  of the node's own inputs only where ``overwrite_ok(node, position)`` allows it (an
  elementwise or fused node reading, at a position its kernel reads before writing, a value
  of the same shape and dtype whose last reader it is: ``x = a + b`` then lands in ``a``'s
  buffer, which is still in cache); otherwise kernels may use ``out`` as scratch;
- a node in ``inplace`` writes its result into the storage of the graph input
  ``inplace[node]``, which may be one of the node's own inputs of identical shape; the
  executor then skips copying that update back.  The kernel must give the right answer when
  ``out`` is that input: true for one ufunc call; a multi-step or fused kernel must read all of
  its inputs before it first writes ``out`` (e.g. write ``out=`` only in its last step);
- every other node's result is whatever its kernel returns (fresh, or a view for view ops);
- after running node ``n`` the executor may drop its references to ``free_after[n]``;
- the values in ``copy_before_update`` (outputs or update values) are, or are views of, a
  state input that is updated: the executor replaces them with copies before it writes the
  updates back, so that the write-back cannot change them.

Aliasing: the value of a view primitive shares its first input's storage, and a few other
primitives may return an input (``_RETURNS_INPUT``); the planner follows these chains, so a
buffer stays busy while any alias of it is live, and no alias of a buffer is ever an output
the user receives.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Collection

from kiln.graph.ir import Graph, GraphError, Node

_FOREVER = float("inf")

# Non-view primitives whose impl may return (a view of) one of its inputs, by position: copy
# returns its source; roll with no shifts and the gathers on some layouts return their data.
_RETURNS_INPUT = {"copy": 1, "roll": 0, "gather": 0, "pick_along": 0, "pool_gather": 0}


@dataclass
class MemoryPlan:
    """Where each node's result lives and when values may be dropped (see the module doc)."""

    slot_of: dict = field(default_factory=dict)  # Node -> buffer slot it writes into (out=)
    slots: list = field(default_factory=list)  # slot -> (shape, numpy dtype); shape may hold Sym
    # Node -> [values last read by it]; a value that nothing reads is listed under itself
    free_after: dict = field(default_factory=dict)
    inplace: dict = field(default_factory=dict)  # Node -> graph input whose storage it writes
    # Outputs and update values that share storage with an updated input: the executor copies
    # them before it writes the updates back, which would otherwise change them.
    copy_before_update: list = field(default_factory=list)


def aliased_input(n: Node) -> Node | None:
    """The input whose storage ``n``'s value may share, or None when the value is fresh."""
    from kiln.ops.registry import REGISTRY

    if n.op == "fused":
        body = n.attrs["body"]
        v = next(iter(body.outputs.values()))
        while v.op != "input":  # follow the alias chain inside the body to a body input
            v = aliased_input(v)
            if v is None:
                return None
        return n.inputs[body.inputs.index(v)]
    prim = REGISTRY.get(n.op)
    if prim is None or not n.inputs:
        return None
    if prim.is_view:
        return n.inputs[0]
    k = _RETURNS_INPUT.get(n.op)
    return None if k is None else n.inputs[k]


def _storage_roots(g: Graph) -> dict[Node, Node]:
    """For every value, the value that owns its storage (itself unless it is an alias)."""
    root: dict[Node, Node] = {n: n for n in g.inputs}
    for n in g.nodes:
        a = aliased_input(n)
        root[n] = n if a is None else root[a]
    return root


def _default_alias_safe(n: Node) -> bool:
    from kiln.ops.registry import REGISTRY

    prim = REGISTRY.get(n.op)
    return n.op == "fused" or (prim is not None and "elementwise" in prim.traits)


def _default_overwrite_ok(n: Node, position: int) -> bool:
    """An elementwise or fused node may write over its input at ``position`` when the
    executor's kernel reads that input before it writes ``out`` (every ufunc does; the
    multi-step kernels list the positions they read late in ``kernels.UNSAFE``)."""
    from kiln.backends.kernels import UNSAFE

    if n.op == "fused":
        # codegen keeps the input alive through the body; only the last op must write ``out``
        # directly, which it cannot when it reads the input late (it would need a copy)
        body = n.attrs["body"]
        last = next(iter(body.outputs.values()))
        mine = body.inputs[position]
        late = UNSAFE.get(last.op, ())
        return not any(x is mine and q in late for q, x in enumerate(last.inputs))
    if not _default_alias_safe(n):
        return False
    unsafe = UNSAFE.get(n.op)
    return unsafe is not None and position not in unsafe


def plan(g: Graph, writes_out: Callable[[Node], bool], updates: dict,
         alias_safe: Callable[[Node], bool] | None = None,
         returned: Collection[str] | None = None,
         overwrite_ok: Callable[[Node, int], bool] | None = _default_overwrite_ok
         ) -> MemoryPlan:
    """Plan buffers for running ``g``: which nodes write into reusable slots, which may
    overwrite a state input in place, and when each value is last read.

    ``writes_out(node)``: the executor's kernel for ``node`` can write into a given buffer.
    ``updates``: {graph input: node computing its new value}, copied back after the run.
    ``alias_safe(node)``: its kernel is correct when ``out`` is one of its same-shape inputs
    (default: elementwise and fused nodes); only such a node may update a state input it reads.
    ``returned``: names of the outputs handed to the user (default: all).  Those must be fresh
    arrays; the other outputs (e.g. update values listed so that dead-code removal keeps them)
    are only kept alive until the end of the run.
    ``overwrite_ok(node, position)``: the node's result may go into the buffer of its input at
    ``position`` when that value dies at the node (None: never; see the module doc).
    """
    alias_safe = alias_safe or _default_alias_safe
    pos: dict[Node, float] = {n: -1 for n in g.inputs}
    pos.update({n: k for k, n in enumerate(g.nodes)})
    for p, n in updates.items():
        if pos.get(p) != -1 or n not in pos:
            raise GraphError(f"update of %{p.id} by %{n.id}: not an input and a value of the graph")
    names = g.outputs if returned is None else returned
    outputs = {g.outputs[k] for k in names}
    pinned = set(g.outputs.values()) | set(updates.values())  # needed after the last node runs

    last_read: dict[Node, float] = {n: -1 for n in pos}
    for n in g.nodes:
        for i in n.inputs:
            last_read[i] = pos[n]

    result = MemoryPlan()
    for v, t in last_read.items():
        if v in pinned:
            continue
        if t >= 0:
            result.free_after.setdefault(g.nodes[t], []).append(v)
        elif v.op != "input":  # a dead computation: drop it as soon as it is made
            result.free_after.setdefault(v, []).append(v)

    # A storage is busy until the last read of any of its aliases; pinned ones stay busy.
    root = _storage_roots(g)
    busy_until: dict[Node, float] = {}
    escapes: set = set()  # storages a returned output aliases
    for v, r in root.items():
        end = _FOREVER if v in pinned else max(last_read[v], pos[v])
        busy_until[r] = max(busy_until.get(r, -1), end)
        if v in outputs:
            escapes.add(r)

    updated = set(updates)
    values = dict.fromkeys([*g.outputs.values(), *updates.values()])  # ordered, no repeats
    result.copy_before_update = [v for v in values if root[v] in updated]

    def computes_fresh(n: Node) -> bool:
        return (n.op not in ("input", "const") and root[n] is n and n not in escapes
                and writes_out(n))

    for p, n in updates.items():
        if (computes_fresh(n) and n not in result.inplace and n.shape == p.shape
                and n.dtype == p.dtype and busy_until[p] <= pos[n]):
            reads = [i for i in n.inputs if root[i] is p]
            # n may still read p itself (p - lr * g), but not through a view of p.
            if not reads or (alias_safe(n) and all(i is p for i in reads)):
                result.inplace[n] = p

    free: dict[tuple, list[int]] = {}  # (shape, dtype) -> free slots
    releases: list[tuple] = []  # heap of (busy until, slot)
    held_until: dict[int, float | None] = {}  # slot -> when its current value dies
    for k, n in enumerate(g.nodes):
        while releases and releases[0][0] < k:
            t, s = heapq.heappop(releases)
            # skip entries of values whose slot was handed on to a reader that overwrote them
            # (or a second entry of the same release when that reader is dead on arrival)
            if held_until[s] == t:
                held_until[s] = None
                free.setdefault(result.slots[s], []).append(s)
        if not computes_fresh(n) or n in result.inplace:
            continue
        key = (n.shape, n.dtype)
        s = _dying_input_slot(n, k, key, result.slot_of, busy_until, root, overwrite_ok)
        if s is None and free.get(key):
            s = free[key].pop()
        elif s is None:
            s = len(result.slots)
            result.slots.append(key)
        result.slot_of[n] = s
        held_until[s] = busy_until[n]
        heapq.heappush(releases, (busy_until[n], s))
    return result


def _dying_input_slot(n: Node, k: int, key: tuple, slot_of: dict, busy_until: dict,
                      root: dict, overwrite_ok) -> int | None:
    """The slot of an input of ``n`` (node ``k``) whose storage dies at ``n`` and that ``n``
    may overwrite at every position that reads it (directly or through a view), or None."""
    if overwrite_ok is None:
        return None
    for i in n.inputs:
        s = slot_of.get(i)
        # a value in a slot owns its storage, and busy_until covers all of its aliases
        if (s is not None and busy_until[i] == k and (i.shape, i.dtype) == key
                and all(overwrite_ok(n, q) for q, x in enumerate(n.inputs) if root[x] is i)):
            return s
    return None
