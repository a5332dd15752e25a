"""Native kernels compiled at run time with llvmlite (optional: ``pip install "kiln[jit]"``).

Kiln's ops are numpy calls; numpy makes one pass over memory per call and uses one core. A few
hot operations (GELU and its gradient, fused elementwise groups of compiled graphs, row-wise
normalisations) run far faster as one native loop split over the machine's cores. This package
builds such loops with llvmlite (LLVM as a PyPI wheel: no system compiler), vectorised for the
host CPU. Without llvmlite, or with ``KILN_JIT=0``, every op keeps its numpy implementation;
results agree with it to float32 rounding (a few ulp in exp-based functions).
"""

from __future__ import annotations

import os

_available: bool | None = None


def available() -> bool:
    """True when native kernels are on: llvmlite imports and ``KILN_JIT`` is not ``0``."""
    global _available
    if _available is None:
        if os.environ.get("KILN_JIT", "1") == "0":
            _available = False
        else:
            try:
                import llvmlite.binding  # noqa: F401
            except ImportError:
                _available = False
            else:
                _available = True
    return _available
