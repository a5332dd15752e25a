"""Graph rewrites before ONNX emission: decomposed sequences back to single ONNX ops.

Each pattern looks at one node (its inputs already rewritten) and may return a replacement
node with a pseudo-op that ``export_ops`` emits as one ONNX op:

- ``gemm``: ``add(matmul(x, w), b)`` on 2-D ``x`` and a bias over the last dimension -> Gemm.
- ``batch_norm``: eval-mode BatchNorm's arithmetic (``x * scale + shift`` with
  ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``) ->
  BatchNormalization on the original parameters.
- ``conv_transpose2d`` with a bias: ``add(conv_transpose2d(x, w), reshape(b, (1, C, 1, 1)))``
  -> ConvTranspose with its bias input.
- ``onnx_gather``: an ``index`` or ``embedding`` along one dimension, without the wrap-around
  of negative indices Kiln adds (ONNX Gather takes negative indices itself) -> Gather.

Nodes left unused after the rewrites are dropped.
"""

from __future__ import annotations

import numpy as np

from kiln.graph.ir import Graph, Node


def _new(op: str, inputs, attrs: dict, like: Node) -> Node:
    return Node(op, tuple(inputs), attrs, like.shape, like.dtype, loc=like.loc)


def _const_value(n: Node):
    return n.attrs["value"] if n.op == "const" else None


def _is_const(n: Node, value) -> bool:
    v = _const_value(n)
    return v is not None and v.size == 1 and float(v.reshape(())) == value


def _operands(n: Node, op: str):
    """``(a, b)`` for a binary ``op`` node, else None."""
    return n.inputs if n.op == op and len(n.inputs) == 2 else None


def unwrap_negative(i: Node, size=None) -> Node:
    """``i`` for ``where(i < 0, i + size, i)`` (Kiln's negative-index wrap), else ``i``."""
    if i.op != "where":
        return i
    cond, wrapped, plain = i.inputs
    ops = _operands(wrapped, "add")
    lt = _operands(cond, "lt")
    if ops is None or lt is None or lt[0] is not plain or not _is_const(lt[1], 0):
        return i
    if ops[0] is not plain or _const_value(ops[1]) is None:
        return i
    if size is not None and not _is_const(ops[1], size):
        return i
    return plain


def _gemm(n: Node, users: dict):
    ops = _operands(n, "add")
    if ops is None or len(n.shape) != 2:
        return None
    for mm, b in (ops, ops[::-1]):
        if mm.op != "matmul" or mm.attrs.get("ta") or len(users.get(mm, ())) != 1:
            continue
        x, w = mm.inputs
        if len(x.shape) == 2 and len(w.shape) == 2 and tuple(b.shape) in ((n.shape[1],), (1,)):
            if b.dtype == n.dtype and tuple(mm.shape) == tuple(n.shape):
                return _new("gemm", (x, w, b), {"tb": bool(mm.attrs.get("tb"))}, n)
    return None


def _rsqrt_of(n: Node):
    """``(var, eps)`` for ``1 / sqrt(var + eps)``."""
    ops = _operands(n, "div")
    if ops is None or not _is_const(ops[0], 1.0) or ops[1].op != "sqrt":
        return None
    add = _operands(ops[1].inputs[0], "add")
    if add is None or _const_value(add[1]) is None or add[1].attrs["value"].size != 1:
        return None
    return add[0], float(add[1].attrs["value"].reshape(()))


def _per_channel(n: Node, c: int, rank: int):
    """The 1-D tensor ``t`` of ``reshape(t, (1, c, 1, ...))`` or ``(c, 1, ...)``, else None."""
    wants = ((1, c) + (1,) * (rank - 2), (c,) + (1,) * (rank - 2))
    if n.op == "reshape" and tuple(n.shape) in wants and tuple(n.inputs[0].shape) == (c,):
        return n.inputs[0]
    return None


def _batch_norm(n: Node, users: dict, extra: list):
    ops = _operands(n, "add")
    if ops is None or len(n.shape) < 2 or n.dtype.kind != "f" or not isinstance(n.shape[1], int):
        return None
    c, rank = n.shape[1], len(n.shape)
    for scaled, shift_r in (ops, ops[::-1]):
        mul = _operands(scaled, "mul")
        shift = _per_channel(shift_r, c, rank)
        if mul is None or shift is None or len(users.get(scaled, ())) != 1:
            continue
        for x, scale_r in (mul, mul[::-1]):
            scale = _per_channel(scale_r, c, rank)
            if scale is None or tuple(x.shape) != tuple(n.shape):
                continue
            found = _bn_params(scale, shift)
            if found is None:
                continue
            var, eps, weight, mean, bias = found
            if weight is None:
                weight = Node("const", (), {"value": np.ones(c, n.dtype)}, (c,), n.dtype)
                extra.append(weight)
            if bias is None:
                bias = Node("const", (), {"value": np.zeros(c, n.dtype)}, (c,), n.dtype)
                extra.append(bias)
            return _new("batch_norm", (x, weight, bias, mean, var), {"eps": eps}, n)
    return None


def _bn_params(scale: Node, shift: Node):
    """``(var, eps, weight, mean, bias)`` if scale/shift are BatchNorm's eval arithmetic."""
    weight = None
    rs = _rsqrt_of(scale)
    if rs is None:
        ops = _operands(scale, "mul")
        if ops is None:
            return None
        for a, b in (ops, ops[::-1]):
            rs = _rsqrt_of(a)
            if rs is not None:
                weight = b
                break
        if rs is None:
            return None
    var, eps = rs
    bias = None
    ops = _operands(shift, "add")
    if ops is not None:
        shift, bias = ops
    ops = _operands(shift, "mul")
    if ops is None or ops[1] is not scale or ops[0].op != "neg":
        return None
    mean = ops[0].inputs[0]
    for t in (var, weight, mean, bias):
        if t is not None and (tuple(t.shape) != tuple(scale.shape) or t.dtype != scale.dtype):
            return None
    return var, eps, weight, mean, bias


def _conv_transpose_bias(n: Node, users: dict):
    ops = _operands(n, "add")
    if ops is None or len(n.shape) != 4 or not isinstance(n.shape[1], int):
        return None
    for ct, r in (ops, ops[::-1]):
        b = _per_channel(r, n.shape[1], 4)
        if ct.op == "conv_transpose2d" and len(ct.inputs) == 2 and b is not None and \
                len(users.get(ct, ())) == 1 and tuple(ct.shape) == tuple(n.shape):
            return _new("conv_transpose2d", ct.inputs + (b,), dict(ct.attrs), n)
    return None


def _gather(n: Node):
    if n.op == "embedding":
        w, i = n.inputs
        return _new("onnx_gather", (w, unwrap_negative(i, w.shape[0])), {"axis": 0}, n)
    if n.op != "index" or len(n.attrs["dims"]) != 1:
        return None
    x, idx = n.inputs
    axis = n.attrs["dims"][0]
    if idx.op == "reshape" and idx.shape[:1] == (1,) and \
            tuple(idx.shape[1:]) == tuple(idx.inputs[0].shape):
        i = unwrap_negative(idx.inputs[0], x.shape[axis])
        return _new("onnx_gather", (x, i), {"axis": axis}, n)
    return None


def rewrite(g: Graph) -> Graph:
    """``g`` with the patterns above replaced by pseudo-op nodes, and unused nodes dropped."""
    original = g.users()
    back: dict = {}  # rewritten node -> the node it stands for in g
    users = _Users(original, back)
    remap: dict = {}
    nodes: list = []
    for orig in g.nodes:
        n = orig.remapped(remap) if orig.op != "const" else orig
        extra: list = []
        new = (_gemm(n, users) or _batch_norm(n, users, extra) or
               _conv_transpose_bias(n, users) or _gather(n))
        if new is not None:
            nodes.extend(extra)
            n = new
        if n is not orig:
            remap[orig] = n
            back[n] = orig
        nodes.append(n)
    return _dce(g.rebuilt(nodes, remap))


class _Users:
    """``users.get(node)`` for nodes of the graph being rewritten (looked up in the original)."""

    def __init__(self, original: dict, back: dict) -> None:
        self.original, self.back = original, back

    def get(self, n, default=()):
        return self.original.get(self.back.get(n, n), default)


def _dce(g: Graph) -> Graph:
    live = set(g.outputs.values())
    keep = []
    for n in reversed(g.nodes):
        if n in live:
            keep.append(n)
            live.update(n.inputs)
    g = g.copy()
    g.nodes = keep[::-1]
    return g
