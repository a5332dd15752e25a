"""The one dispatch point: every primitive runs here, and here autograd records it."""

from __future__ import annotations

import numpy as np

from kiln import dtypes
from kiln.autograd import Node
from kiln.grad_mode import STATE
from kiln.tensor import Tensor, _make

_ndarray = np.ndarray
_new_tensor = Tensor.__new__
_STATE = STATE

# Test and debug hooks: each is called as fn(prim, inputs, attrs, out) after every primitive.
OBSERVERS: list = []


def apply(prim, inputs: tuple, attrs: dict) -> Tensor:
    """Run ``prim`` on tensors ``inputs`` and, when a gradient is wanted, record a graph node."""
    try:
        if len(inputs) == 2:
            out = prim.impl(inputs[0]._data, inputs[1]._data, **attrs)
        elif len(inputs) == 1:
            out = prim.impl(inputs[0]._data, **attrs)
        else:
            out = prim.impl(*[t._data for t in inputs], **attrs)
    except Exception as e:  # numpy's message, re-raised naming the op, shapes and dtypes
        raise op_error(prim, inputs, e) from None
    if type(out) is not _ndarray:
        out = np.asarray(out)
    t = _new_tensor(Tensor)  # _make(out), inlined: this is the hottest path in eager mode
    t._data = out
    t._rg = False
    t._node = None
    t.grad = None
    t._hooks = None
    if prim.is_view:
        src = inputs[0]
        t._version = src._version
        t._base = src if src._base is None else src._base
    else:
        t._version = [0]
        t._base = None
    if _STATE.grad_enabled and prim.vjp is not None:
        for x in inputs:
            if x._rg:
                if out.dtype.kind == "f":
                    _record(prim, inputs, attrs, t)
                break
    if _STATE.tracer is not None:
        _STATE.tracer.record(prim, inputs, attrs, t)
    if OBSERVERS:
        for fn in OBSERVERS:
            fn(prim, inputs, attrs, t)
    return t


def _record(prim, inputs, attrs, out) -> None:
    node = Node(prim, inputs, attrs)
    if prim.save_out:
        node.save_output(out)
    out._node = node
    out._rg = True


def apply_inplace(prim, target: Tensor, others: tuple, attrs: dict) -> Tensor:
    """``target.op_(...)``: compute ``prim(target, *others)`` and write it into target's storage.

    Autograd sees an out-of-place op whose result takes over ``target``'s place in the graph;
    the version counter lets backward detect values that were overwritten after being saved.
    """
    recording = STATE.grad_enabled and (target._rg or any(o._rg for o in others))
    if recording:
        check_inplace_allowed(target)
        src = target
        if 0 in prim.save:  # the VJP reads target's old value, which is about to be overwritten
            from kiln.ops.elementwise import clone

            src = clone(target)
        result = apply(prim, (src, *others), attrs)
    else:
        fast = prim.inplace_impl
        if fast is not None and STATE.tracer is None and target._data.flags.writeable and all(
                o._data.dtype == target._data.dtype for o in others):
            try:  # write straight into target's storage: no temporary, no copy
                fast(target._data, *[o._data for o in others], **attrs)
            except ValueError:
                pass  # e.g. the result would not fit target's shape: the general path explains
            else:
                target._version[0] += 1
                return target
        prev, STATE.grad_enabled = STATE.grad_enabled, False
        try:
            result = apply(prim, (target, *others), attrs)
        finally:
            STATE.grad_enabled = prev
    write_into(target, result, prim.name)
    if recording and result._node is not None:
        node = result._node
        target._node = node
        target._rg = True
        if prim.save_out:
            node.save_output(target)
    return target


def check_inplace_allowed(target: Tensor) -> None:
    """PyTorch's errors for in-place ops that would corrupt the autograd graph."""
    if target._node is None and target._rg:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation."
        )
    base = target._base
    if base is not None and (base._rg or target._rg):
        raise RuntimeError(
            "in-place operation on a view of a tensor that requires grad is not supported by "
            "kiln; apply the op out of place, or assign through indexing (x[idx] = value)"
        )


def write_into(target: Tensor, result: Tensor, op: str) -> None:
    """Copy ``result`` into ``target``'s storage with PyTorch's shape and casting rules."""
    src_dt, dst_dt = result.dtype, target.dtype
    if src_dt._category > dst_dt._category:
        raise RuntimeError(
            f"{op}: result type {src_dt.name} can't be cast to the desired output type "
            f"{dst_dt.name}"
        )
    if result._data.shape != target._data.shape:
        try:
            np.broadcast_to(result._data, target._data.shape)
        except ValueError:
            raise RuntimeError(
                f"{op}: output with shape {list(target._data.shape)} doesn't match the "
                f"broadcast shape {list(result._data.shape)}"
            ) from None
    if not target._data.flags.writeable:
        raise RuntimeError(
            f"{op}: cannot write into this tensor: it is a read-only view (from expand or "
            "broadcasting); call .clone() first"
        )
    if STATE.tracer is not None:
        STATE.tracer.on_write(target, result, op)
    np.copyto(target._data, result._data, casting="unsafe")
    target._version[0] += 1


def op_error(prim, inputs, exc: Exception) -> Exception:
    """Turn an exception from inside an impl into one naming the op, shapes and dtypes."""
    described = ", ".join(describe(t) for t in inputs)
    if isinstance(exc, ValueError) and "elementwise" in prim.traits and len(inputs) > 1:
        # numpy's "operands could not be broadcast" becomes PyTorch's sentence about sizes
        from kiln.ops.elementwise import broadcast_mismatch  # only on this error path

        mismatch = broadcast_mismatch([t._data.shape for t in inputs])
        if mismatch is not None:
            return RuntimeError(f"{prim.name}: {mismatch} (inputs: {described})")
    cls = IndexError if isinstance(exc, IndexError) else RuntimeError
    return cls(f"{prim.name}: {exc} (inputs: {described})")


def describe(t: Tensor) -> str:
    """``f32[2, 3]``-style summary of a tensor's dtype and shape for error messages."""
    return f"{dtypes._FROM_NP[t._data.dtype].name}{list(t._data.shape)}"
