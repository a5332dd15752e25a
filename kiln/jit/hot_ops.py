"""GELU and its gradient as one native pass each (exact and tanh forms, float32 only).

The formulas and the order of every rounding step are those of the numpy kernels in
``kiln.ops.elementwise`` (``_gelu32``, ``_gelu_backward32`` and the tanh branches of ``_gelu``
and ``_gelu_backward``): Phi(x) = sigmoid(x Q(x^2)) with the same fitted Q and the same cap on
x^2.  Only exp and tanh differ (mathlib's, about 1 ulp), so results agree with numpy to a few
ulp.  Each function returns None when the arrays are not float32 (the caller keeps numpy).
"""

from __future__ import annotations

import numpy as np

from kiln.jit import expr as X
from kiln.ops.elementwise import (
    _GELU32_NEG_Q,
    _GELU32_Z_MAX,
    _GELU_TANH_BETA,
    _GELU_TANH_KAPPA,
    _INV_SQRT_2PI,
)


def _horner(z, coefs):
    p = z * coefs[0] + coefs[1]
    for c in coefs[2:]:
        p = p * z + c
    return p


def _phi_neg_logit(x, x_sq):
    """``-x Q(x^2)``: Phi(x) = 1 / (1 + exp(it))."""
    return _horner(X.minimum(x_sq, _GELU32_Z_MAX), _GELU32_NEG_Q) * x


def _gelu_exact(x):
    return x / (X.exp(_phi_neg_logit(x, x * x)) + 1.0)


def _gelu_backward_exact(g, x):
    x_sq = x * x
    x_pdf = X.exp(x_sq * -0.5) * x * _INV_SQRT_2PI
    cdf = 1.0 / (X.exp(_phi_neg_logit(x, x_sq)) + 1.0)
    return (cdf + x_pdf) * g


def _gelu_tanh(x):
    t = X.tanh((x * x * x * _GELU_TANH_KAPPA + x) * _GELU_TANH_BETA)
    return (t + 1.0) * x * 0.5


def _gelu_backward_tanh(g, x):
    x_sq = x * x
    t = X.tanh((x_sq * _GELU_TANH_KAPPA + 1.0) * x * _GELU_TANH_BETA)
    d_inner = (x_sq * (3 * _GELU_TANH_KAPPA) + 1.0) * _GELU_TANH_BETA
    left = (1.0 - t * t) * d_inner * x * 0.5
    return ((t + 1.0) * 0.5 + left) * g


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
