"""Reductions: sum, mean, prod, amax/amin, argmax/argmin, var/std, logsumexp, cumsum, all/any,
softmax and log_softmax."""

from __future__ import annotations

import numpy as np

from kiln.ops.registry import primitive
from kiln.tensor import Tensor, normalize_dim

__all__ = ["sum"]


def reduce_dims(dim, ndim: int, op: str) -> tuple:
    """Normalize ``dim`` (None, int or sequence) to a sorted tuple of axes."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, (tuple, list)):
        axes = tuple(sorted({normalize_dim(d, ndim, op) for d in dim}))
        return axes if axes or ndim == 0 else tuple(range(ndim))
    return (normalize_dim(dim, ndim, op),)


@primitive("sum", traits={"reduce"})
def _sum(x, axes, keepdims):
    return np.sum(x, axis=axes, keepdims=keepdims)


@_sum.def_vjp
def _sum_vjp(g, node):
    x = node.inputs[0]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    if not keepdims:
        g = g.reshape(_kept_shape(x.shape, axes))
    return (g.expand(x.shape),)


def _kept_shape(shape, axes) -> tuple:
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def sum(input: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:  # noqa: A001
    """Sum over ``dim`` (all dims by default); bool and integer inputs sum as int64.

    >>> import kiln
    >>> kiln.tensor([[1., 2.], [3., 4.]]).sum(dim=0)
    tensor([4., 6.])
    """
    if dtype is not None:
        input = input.to(dtype)
    elif input._data.dtype.kind in "biu" and input._data.dtype != np.int64:
        input = input.to(np.int64)
    axes = reduce_dims(dim, input.ndim, "sum")
    return _sum(input, axes=axes, keepdims=bool(keepdim))


def sum_to(g: Tensor, shape: tuple) -> Tensor:
    """Sum ``g`` down to ``shape`` (the reverse of broadcasting): gradients of broadcast inputs."""
    gshape = g._data.shape
    if gshape == tuple(shape):
        return g
    lead = len(gshape) - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, s in enumerate(shape) if s == 1 and gshape[i + lead] != 1
    )
    out = _sum(g, axes=axes, keepdims=True) if axes else g
    return out.reshape(shape)


TENSOR_METHODS = {"sum": sum}
