"""Native kernels compiled at run time with llvmlite (optional: ``pip install "kiln[jit]"``).

Kiln's ops are numpy calls; numpy makes one pass over memory per call and uses one core. A few
hot operations (GELU, layer norm, softmax, max pooling, convolution gathers, the eager optimizer
updates, compiled graphs' fused elementwise groups) run faster as one native loop split over
the machine's cores. This package builds such loops with llvmlite (LLVM as a PyPI wheel: no
system compiler), vectorised for the host CPU. Without llvmlite, with ``KILN_JIT=0``, or when
LLVM cannot start, every op keeps its numpy implementation; results agree with it bitwise or to
a few ulp in exp-based functions (docs/jit.md).
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
                from kiln.jit import engine

                engine.target_machine()  # loads LLVM's shared library: may fail on odd systems
            except Exception:
                _available = False
            else:
                _available = True
    return _available
