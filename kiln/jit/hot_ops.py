"""GELU and its gradient as one native pass each (exact and tanh forms, float32 only).

The formulas are those of the numpy kernels in ``kiln.ops.elementwise`` (``_gelu32``,
``_gelu_backward32`` and the tanh branches of ``_gelu`` and ``_gelu_backward``): Phi(x) =
sigmoid(x Q(x^2)) with the same fitted Q and the same cap on x^2; the tanh form's
(1 + tanh(u)) / 2 taken as sigmoid(2u) (one exp instead of tanh's exp and polynomial).  They
are written directly in IR, registered as unary ops of kiln.jit.expr (fma, plain min: 25%
faster than the same formulas as Exprs).  Results agree with numpy to a few ulp of the terms
involved.  Each function returns None when the arrays are not float32 (the caller keeps numpy).
"""

from __future__ import annotations

import numpy as np

from kiln.jit import expr as X
from kiln.jit import mathlib as M
from kiln.ops.elementwise import (
    _GELU32_NEG_Q,
    _GELU32_Z_MAX,
    _GELU_TANH_BETA,
    _GELU_TANH_KAPPA,
    _INV_SQRT_2PI,
)


def _neg_logit(b, x, z):
    """``-x Q(min(z, cap))`` with z = x^2: Phi(x) = 1 / (1 + exp(it)).  A NaN x gives NaN (the
    cap drops a NaN z, x carries it)."""
    cap = M.const(_GELU32_Z_MAX)
    z = b.select(b.fcmp_ordered("<", z, cap), z, cap)
    return b.fmul(M.horner(b, z, _GELU32_NEG_Q), x)


def _ir_gelu(b, x):
    """x Phi(x) = x / (1 + exp(-x Q(x^2)))."""
    e = M.exp(b, _neg_logit(b, x, b.fmul(x, x)))
    return b.fdiv(x, b.fadd(e, M.const(1.0)))


def _ir_gelu_grad(b, x):
    """Phi(x) + x phi(x)."""
    z = b.fmul(x, x)
    x_pdf = b.fmul(b.fmul(M.exp(b, b.fmul(z, M.const(-0.5))), x), M.const(_INV_SQRT_2PI))
    cdf = b.fdiv(M.const(1.0), b.fadd(M.exp(b, _neg_logit(b, x, z)), M.const(1.0)))
    return b.fadd(cdf, x_pdf)


def _gelu_backward_exact(g, x):
    return _gelu_erf_grad(x) * g


def _neg_2u(b, x, z):
    """-2 u with u = beta (x + kappa x^3): 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2 u))."""
    inner = M.fma(b, z, M.const(_GELU_TANH_KAPPA), M.const(1.0))
    return b.fmul(b.fmul(inner, x), M.const(-2.0 * _GELU_TANH_BETA))


def _ir_gelu_tanh(b, x):
    """x (1 + tanh(u)) / 2 as x / (1 + exp(-2 u)): one exp, no cancellation for negative x
    (NaN at -inf, -0 below, as the tanh form gives)."""
    e = M.exp(b, _neg_2u(b, x, b.fmul(x, x)))
    return b.fdiv(x, b.fadd(e, M.const(1.0)))


def _ir_gelu_tanh_grad(b, x):
    """s + x 2u' s (1 - s) with s = 1 / (1 + e), e = exp(-2 u), s (1 - s) = e s^2 (taken as 0
    past e = 2**64, where it is below 2**-64 and e s^2 would be inf * 0)."""
    z = b.fmul(x, x)
    e = M.exp(b, _neg_2u(b, x, z))
    s = b.fdiv(M.const(1.0), b.fadd(e, M.const(1.0)))
    ds = b.fmul(b.fmul(e, s), s)
    ds = b.select(b.fcmp_ordered("<", e, M.const(2.0 ** 64)), ds, M.const(0.0))
    du2 = b.fmul(M.fma(b, z, M.const(3 * _GELU_TANH_KAPPA), M.const(1.0)),
                 M.const(2.0 * _GELU_TANH_BETA))
    return M.fma(b, b.fmul(du2, x), ds, s)


# the IR above as elementwise ops (cost: the per-element work estimate parallel.run uses)
_gelu_exact = X.register_unary("gelu_erf", _ir_gelu, 30)
_gelu_erf_grad = X.register_unary("gelu_erf_grad", _ir_gelu_grad, 48)
_gelu_tanh = X.register_unary("gelu_tanh", _ir_gelu_tanh, 24)
_gelu_tanh_grad = X.register_unary("gelu_tanh_grad", _ir_gelu_tanh_grad, 32)


def _gelu_backward_tanh(g, x):
    return _gelu_tanh_grad(x) * g


_FORWARD = {"none": _gelu_exact, "tanh": _gelu_tanh}
_BACKWARD = {"none": _gelu_backward_exact, "tanh": _gelu_backward_tanh}


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray | None:
    """GELU of a float32 array in one pass, or None for other dtypes."""
    if x.dtype != np.float32 or approximate not in _FORWARD:
        return None
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, np.float32)
    X.kernel(f"gelu_{approximate}", 1, _FORWARD[approximate])([out], [x])
    return out


def gelu_backward(g: np.ndarray, x: np.ndarray, approximate: str = "none") -> np.ndarray | None:
    """``g * gelu'(x)`` for float32 arrays of one shape in one pass, or None otherwise."""
    if (x.dtype != np.float32 or g.dtype != np.float32 or g.shape != x.shape
            or approximate not in _BACKWARD):
        return None
    g, x = np.ascontiguousarray(g), np.ascontiguousarray(x)
    out = np.empty(x.shape, np.float32)
    X.kernel(f"gelu_backward_{approximate}", 2, _BACKWARD[approximate])([out], [g, x])
    return out
