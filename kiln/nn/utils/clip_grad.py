"""Gradient clipping: clip_grad_norm_, clip_grad_value_, get_total_norm, clip_grads_with_norm_."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np

from kiln import dtypes
from kiln.grad_mode import STATE
from kiln.tensor import Tensor, _make

__all__ = ["clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "get_total_norm",
           "clip_grads_with_norm_"]


def _as_list(tensors) -> list:
    if isinstance(tensors, Tensor):
        return [tensors]
    return list(tensors)


def _vector_norm(a: np.ndarray, p: float) -> float:
    """The p-norm of ``a`` seen as one vector, accumulated in float64."""
    a = np.abs(a, dtype=np.float64) if a.dtype != np.float64 else np.abs(a)
    if a.size == 0:
        return 0.0
    if p == math.inf:
        return float(a.max())
    if p == -math.inf:
        return float(a.min())
    if p == 0:
        return float(np.count_nonzero(a))
    if p == 1:
        return float(a.sum())
    if p == 2:
        return float(np.sqrt(np.vdot(a.ravel(), a.ravel())))
    return float(np.sum(a ** p) ** (1.0 / p))


def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach=None) -> Tensor:
    """The p-norm of all ``tensors`` taken together (the norm of their norms), as a 0-d
    tensor of their (promoted) dtype."""
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return _make(np.array(0.0, dtypes.get_default_dtype().np))
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = dtypes.promote_types(dt, t.dtype)
    if STATE.tracer is not None:
        return _traced_total_norm(tensors, norm_type, error_if_nonfinite, dt)
    norms = np.array([_vector_norm(t._data, norm_type) for t in tensors])
    total = _vector_norm(norms, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return _make(np.array(total, dt.np))


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: Tensor, foreach=None) -> None:
    """Scale every gradient by ``min(max_norm / (total_norm + 1e-6), 1)`` in place."""
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return
    if STATE.tracer is not None:  # inside kiln.compile: the same formula as graph ops
        tn = total_norm if isinstance(total_norm, Tensor) else _make(np.asarray(total_norm))
        coef = (tn.double() + 1e-6).reciprocal().mul(float(max_norm)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return
    tn = total_norm._data if isinstance(total_norm, Tensor) else np.asarray(total_norm)
    coef = np.float64(max_norm) / (tn.astype(np.float64) + 1e-6)
    coef = min(float(coef), 1.0) if not np.isnan(coef) else float(coef)
    for g in grads:
        np.multiply(g._data, np.asarray(coef, g._data.dtype), out=g._data, casting="unsafe")
        g._version[0] += 1


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """Rescale the gradients of ``parameters`` so that their total ``norm_type``-norm is at
    most ``max_norm``; returns the total norm before clipping.

    >>> import kiln
    >>> p = kiln.nn.Parameter(kiln.zeros(2))
    >>> p.grad = kiln.tensor([3.0, 4.0])
    >>> kiln.nn.utils.clip_grad_norm_([p], 1.0)
    tensor(5.)
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


def clip_grad_norm(parameters, max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """Deprecated alias of ``clip_grad_norm_``."""
    warnings.warn("`kiln.nn.utils.clip_grad_norm` is now deprecated in favor of "
                  "`kiln.nn.utils.clip_grad_norm_`.", FutureWarning, stacklevel=2)
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place."""
    clip_value = float(clip_value)
    for p in _as_list(parameters):
        g = p.grad
        if g is not None and STATE.tracer is not None:
            g.clamp_(-clip_value, clip_value)
        elif g is not None:
            np.clip(g._data, -clip_value, clip_value, out=g._data, casting="unsafe")
            g._version[0] += 1


def _traced_total_norm(tensors, p: float, error_if_nonfinite: bool, dt) -> Tensor:
    """get_total_norm in graph ops (float64 accumulation, as the eager path)."""
    from kiln.ops.shape import stack

    if error_if_nonfinite:
        raise RuntimeError(
            "clip_grad_norm_(error_if_nonfinite=True) inside kiln.compile would need the norm's "
            "value in Python; pass error_if_nonfinite=False (or clip outside the compiled "
            "function)"
        )
    norms = stack([t.double().norm(p) for t in tensors])
    return norms.norm(p).to(dt)
