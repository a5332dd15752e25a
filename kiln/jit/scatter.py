"""``out[rows[k]] += vals[k]`` for k in order: the accumulating row scatter behind an embedding's
gradient (kiln.ops.index's ``_rows_add``), as one native loop instead of ``np.add.at``.

The adds happen in the order ``np.add.at`` makes them (row k before row k + 1, one float32 add
each), so results are bitwise equal.  Threads split the columns, which keeps that order.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir

from kiln.jit import engine, parallel
from kiln.jit.engine import F32, I64, address, loop

_fn = None


def _kernel():
    global _fn
    if _fn is None:
        mod = engine.new_module("rows_add")
        pf = F32.as_pointer()
        # void rows_add(i64 c0, i64 c1, i64 n, i64 d, float* out, i64* rows, float* vals):
        # columns [c0, c1) of every row
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64, I64, I64, pf,
                                                              I64.as_pointer(), pf]), "rows_add")
        c0, c1, n, d, out, rows, vals = fn.args
        for a in (out, rows, vals):
            a.add_attribute("noalias")
        b = ir.IRBuilder(fn.append_basic_block("entry"))

        def row(k):
            dst = b.gep(out, [b.mul(b.load(b.gep(rows, [k])), d)])
            src = b.gep(vals, [b.mul(k, d)])

            def col(j):
                p = b.gep(dst, [j])
                b.store(b.fadd(b.load(p), b.load(b.gep(src, [j]))), p)

            loop(b, c0, c1, col)

        loop(b, 0, n, row)
        b.ret_void()
        L, P = ctypes.c_int64, ctypes.c_void_p
        _fn = engine.compile_module(mod, {"rows_add": (L, L, L, L, P, P, P)})["rows_add"]
    return _fn


def rows_add(out: np.ndarray, rows: np.ndarray, vals: np.ndarray) -> bool:
    """``out[rows] += vals`` with repeats accumulating, for float32 ``out`` (R, D) and ``vals``
    (len(rows), D), both C-contiguous, and int64 ``rows`` already in [0, R).  Returns False
    (nothing done) when the arrays do not qualify."""
    if (out.dtype != np.float32 or vals.dtype != np.float32 or rows.dtype != np.int64
            or out.ndim != 2 or vals.shape != (rows.size, out.shape[1])
            or not (out.flags.c_contiguous and vals.flags.c_contiguous
                    and rows.flags.c_contiguous)):
        return False
    d = out.shape[1]
    parallel.run(_kernel(), d, (rows.size, d, address(out), address(rows),
                                address(vals)), work_per_item=rows.size, align=16)
    return True
