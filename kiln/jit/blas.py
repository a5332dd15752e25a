"""float32 matrix products on kiln.jit's threads: rows (or, for a wide result, columns) of the
result split over the worker pool, each part one single-threaded call to numpy's own OpenBLAS
(``cblas_sgemm``).

Left to itself, OpenBLAS runs its own thread pool, whose idle threads keep polling for ~0.1 s
after each product: inside a training step they hold the second core while kiln.jit's kernels
want it, and the native kernels that follow a product ran at half speed (a gelu backward took
560 us after a matmul, 290 us alone).  With one pool for both, products and kernels take turns.
OpenBLAS is told to stay single-threaded only on the calling thread and only for the call
(``openblas_set_num_threads_local``), so numpy's own products elsewhere are unchanged.  Results
agree with numpy's to float32 rounding, not bitwise: OpenBLAS picks its kernel by size (a small
part may take its small-matrix kernel), as its own threaded splits do.

Only numpy's bundled OpenBLAS (the ``scipy_openblas64_`` library of numpy's wheels, 0.3.27 or
newer) is used; with any other BLAS ``matmul`` returns None and numpy does the product.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from llvmlite import ir

from kiln.jit import engine, parallel
from kiln.jit.engine import F32, I32, I64, address, i64

_SGEMM, _LOCAL = "scipy_cblas_sgemm64_", "openblas_set_num_threads_local"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# parallel.run's unit is one memory-bound float32 add; OpenBLAS does ~15 multiply-adds meanwhile
_MACS_PER_UNIT = 15
# OpenBLAS runs products below 4 * 65536 multiply-adds on the calling thread (its
# GEMM_MULTITHREAD_THRESHOLD): those stay with numpy, which calls it with less overhead
MIN_MACS = 1 << 18
# Products below this many multiply-adds run whole on the calling thread.  Split by columns
# when the result is wide (each part then packs only its columns of op(B)), the mlp's 4-13M
# products run as fast as numpy's two OpenBLAS threads (64x784 @ 784x256: 140 us, 225 us on one
# thread) and its eager step went from 2.03 to 1.97 ms in an interleaved A/B
SPLIT_MACS = 1 << 20
_F32 = np.dtype(np.float32)
_fn = None  # the compiled part kernel, False when numpy's OpenBLAS is not found


def _openblas_symbols() -> dict | None:
    """Addresses of sgemm and the thread-local thread count in numpy's bundled OpenBLAS."""
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so"))):
        try:
            lib = ctypes.CDLL(path)
            return {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                    for name in (_SGEMM, _LOCAL)}
        except (OSError, AttributeError):
            continue
    return None


def _kernel():
    """``void gemm_part(i64 p0, i64 p1, i64 cols, i64 ta, i64 tb, i64 m, i64 n, i64 k, A, lda,
    B, ldb, C, ldc)``: rows [p0, p1) of C = op(A) @ op(B), or its columns [p0, p1) when
    ``cols``, as one single-threaded sgemm; False when numpy's OpenBLAS is not found."""
    global _fn
    if _fn is None:
        syms = _openblas_symbols()
        if syms is None:
            _fn = False
            return _fn
        import llvmlite.binding as llvm

        for name, addr in syms.items():
            llvm.add_symbol(name, addr)
        mod = engine.new_module("gemm_part")
        p8 = ir.IntType(8).as_pointer()
        pf = F32.as_pointer()
        sgemm = ir.Function(mod, ir.FunctionType(ir.VoidType(), [
            I32, I32, I32, I64, I64, I64, F32, pf, I64, pf, I64, F32, pf, I64]), _SGEMM)
        local = ir.Function(mod, ir.FunctionType(I32, [I32]), _LOCAL)
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64] * 8 + [p8, I64, p8, I64, p8,
                                                                          I64]), "gemm_part")
        p0, p1, cols, ta, tb, m, n, k, a, lda, b_, ldb, c, ldc = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        a, b_, c = (b.bitcast(p, pf) for p in (a, b_, c))
        by_cols = b.icmp_unsigned("!=", cols, i64(0))
        a_t, b_t = (b.icmp_unsigned("!=", t, i64(0)) for t in (ta, tb))
        # row p0 of op(A) is column p0 of A when A is transposed; likewise column p0 of op(B)
        a_off = b.select(by_cols, i64(0), b.select(a_t, p0, b.mul(p0, lda)))
        b_off = b.select(by_cols, b.select(b_t, b.mul(p0, ldb), p0), i64(0))
        c_off = b.select(by_cols, p0, b.mul(p0, ldc))
        rows = b.select(by_cols, m, b.sub(p1, p0))
        width = b.select(by_cols, b.sub(p1, p0), n)
        trans, no_trans = ir.Constant(I32, _TRANS), ir.Constant(I32, _NO_TRANS)
        prev = b.call(local, [ir.Constant(I32, 1)])
        b.call(sgemm, [ir.Constant(I32, _ROW_MAJOR), b.select(a_t, trans, no_trans),
                       b.select(b_t, trans, no_trans), rows, width, k, ir.Constant(F32, 1.0),
                       b.gep(a, [a_off]), lda, b.gep(b_, [b_off]), ldb, ir.Constant(F32, 0.0),
                       b.gep(c, [c_off]), ldc])
        b.call(local, [prev])
        b.ret_void()
        L, P = ctypes.c_int64, ctypes.c_void_p
        _fn = engine.compile_module(mod, {"gemm_part": (L,) * 8 + (P, L, P, L, P, L)})[
            "gemm_part"]
    return _fn


def _operand(x: np.ndarray):
    """(transposed, leading dimension) of a 2-D float32 operand as BLAS reads it, or None."""
    if x.strides[1] == 4 and x.strides[0] % 4 == 0 and x.strides[0] >= 4 * max(1, x.shape[1]):
        return False, x.strides[0] // 4
    if x.strides[0] == 4 and x.strides[1] % 4 == 0 and x.strides[1] >= 4 * max(1, x.shape[0]):
        return True, x.strides[1] // 4
    return None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """``a @ b`` for 2-D float32 arrays (each row-major or a transposed view), split by rows or
    columns over kiln.jit's threads, into ``out`` when given (through a temporary when ``out``
    is strided or overlaps an operand); None (nothing written) when the arrays do not qualify
    or OpenBLAS is not numpy's."""
    if (a.dtype != _F32 or b.dtype != _F32 or a.ndim != 2 or b.ndim != 2
            or min(a.shape[0], b.shape[1]) < 2 or a.shape[1] == 0):
        return None  # a row or column result is numpy's gemv, whose sums round differently
    (m, k), n = a.shape, b.shape[1]
    if m * n * k < MIN_MACS or b.shape[0] != k:
        return None
    pa, pb = _operand(a), _operand(b)
    if pa is None or pb is None:
        return None
    fn = _kernel()
    if not fn:
        return None
    target = out
    if out is not None and (out.dtype != _F32 or out.shape != (m, n) or out.strides[1] != 4
                            or out.strides[0] % 4 or out.strides[0] < 4 * n
                            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        target = None  # written through a temporary
    if target is None:
        target = np.empty((m, n), _F32)
    args = (int(pa[0]), int(pb[0]), m, n, k, address(a), pa[1], address(b), pb[1],
            address(target), target.strides[0] // 4)
    if m * n * k < SPLIT_MACS:
        fn(0, m, 0, *args)
    elif m >= n:
        parallel.run(fn, m, (0,) + args, work_per_item=max(1, n * k // _MACS_PER_UNIT), align=16)
    else:  # each part packs only its own columns of op(B), not all of it
        parallel.run(fn, n, (1,) + args, work_per_item=max(1, m * k // _MACS_PER_UNIT), align=16)
    if out is not None and target is not out:
        np.copyto(out, target, casting="unsafe")
        return out
    return target
