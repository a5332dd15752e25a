"""Shape and layout ops: reshape/view, expand, permute/transpose, squeeze/unsqueeze, flatten,
cat/stack/split/chunk, tril/triu, pad."""

from __future__ import annotations

import numbers

import numpy as np

from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Tensor

__all__ = ["reshape"]


def _size_args(shape, op: str) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    for s in shape:
        if not isinstance(s, numbers.Integral):
            raise TypeError(f"{op}(): argument 'shape' must be a sequence of ints, "
                            f"got {type(s).__name__}")
    return tuple(int(s) for s in shape)


def infer_reshape(old: tuple, new: tuple, op: str = "reshape") -> tuple:
    """Resolve a -1 in ``new`` and check the element count, with PyTorch's message."""
    size = 1
    for s in old:
        size *= s
    unknown = [i for i, s in enumerate(new) if s == -1]
    if len(unknown) > 1:
        raise RuntimeError(f"{op}: only one dimension can be inferred")
    known = 1
    for s in new:
        if s != -1:
            if s < 0:
                raise RuntimeError(f"{op}: invalid shape dimension {s}")
            known *= s
    if unknown:
        if known == 0 or size % known:
            raise RuntimeError(f"shape '{list(new)}' is invalid for input of size {size}")
        new = new[: unknown[0]] + (size // known,) + new[unknown[0] + 1:]
    elif known != size:
        raise RuntimeError(f"shape '{list(new)}' is invalid for input of size {size}")
    return new


@primitive("reshape", traits={"view"})
def _reshape(x, shape):
    return x.reshape(shape)


@_reshape.def_vjp
def _reshape_vjp(g, node):
    return (g.reshape(node.inputs[0].shape),)


def reshape(input: Tensor, *shape) -> Tensor:
    """The same data with a new shape; one dimension may be -1.

    >>> import kiln
    >>> kiln.arange(6).reshape(2, -1).shape
    kiln.Size([2, 3])
    """
    new = infer_reshape(input._data.shape, _size_args(shape, "reshape"))
    if new == input._data.shape:
        return input
    return _reshape(input, shape=new)


@primitive("expand", traits={"view"})
def _expand(x, shape):
    return np.broadcast_to(x, shape)


@_expand.def_vjp
def _expand_vjp(g, node):
    return (sum_to(g, node.inputs[0].shape),)


def expand(input: Tensor, *sizes) -> Tensor:
    """Broadcast to a larger shape without copying; -1 keeps a dimension."""
    sizes = _size_args(sizes, "expand")
    shape = input._data.shape
    if len(sizes) < len(shape):
        raise RuntimeError(
            f"expand: the number of sizes provided ({len(sizes)}) must be greater or equal to "
            f"the number of dimensions in the tensor ({len(shape)})"
        )
    lead = len(sizes) - len(shape)
    out = []
    for i, s in enumerate(sizes):
        old = shape[i - lead] if i >= lead else None
        if s == -1:
            if old is None:
                raise RuntimeError("expand: -1 is not allowed in a leading, non-existing dimension")
            s = old
        elif old is not None and old != s and old != 1:
            raise RuntimeError(
                f"The expanded size of the tensor ({s}) must match the existing size ({old}) at "
                f"non-singleton dimension {i}.  Target sizes: {list(sizes)}.  Tensor sizes: "
                f"{list(shape)}"
            )
        out.append(s)
    out = tuple(out)
    if out == shape:
        return input
    return _expand(input, shape=out)


TENSOR_METHODS = {"reshape": reshape, "expand": expand}
