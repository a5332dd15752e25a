"""Batched products of small float32 matrices (attention's ``q @ k^T`` and ``att @ v``).

NumPy runs a batched product as a loop of BLAS calls, one per matrix, which costs more in call
overhead than the arithmetic when the matrices are small (64 x 32 x 64), and runs on one core.
This kernel does the whole batch in one call, split over threads by batch element.  Per element,
``op(B)`` is read in place when its rows are contiguous (else packed once into a stack tile,
zero-padded to whole vectors), and blocks of C's rows are kept in vector registers while K runs:
one broadcast element of ``op(A)`` times one vector of ``op(B)`` per fused multiply-add.  Each
output element is a float32 sum over k in increasing order (fused multiply-adds, like BLAS).

Operands are any strided views (``ta``/``tb`` transposes are views): the strides inside a matrix
are compiled in, the batch offsets (with broadcasting) are passed as int64 arrays.  At the gpt's
attention shapes (64 products of 64x32x64, six layouts) two threads take 77-98 us a product
against numpy's 128-249 us."""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
from llvmlite import ir

from kiln.jit import engine, parallel
from kiln.jit.engine import F32, I64, address, i64

MAX_DIM = 128  # largest M, K or N handled (the packed tile of op(B) lives on the stack)
# Smaller batches (in multiply-adds) stay with numpy: each new shape or layout costs a ~60 ms
# compile, which a few small products never repay
MIN_MACS = 1 << 18
_F32 = np.dtype(np.float32)
_P = ctypes.c_void_p
_cache: dict = {}


@functools.lru_cache(maxsize=None)
def _shape_regs() -> tuple:
    """(lanes per vector, vector registers usable for accumulators) on this CPU."""
    if engine.has_avx512():
        return 16, 24
    return 8, 12


def _build(mod, name, m, k, n, sa, sb):
    """``void name(start, stop, A, B, C, offa, offb)``: C[e] = op(A)[e] @ op(B)[e] for batch
    elements e in [start, stop); ``sa`` = (row, col) strides of op(A) and ``sb`` of op(B), in
    elements; C is contiguous (batch, m, n)."""
    lanes, regs = _shape_regs()
    vec = ir.VectorType(F32, lanes)
    nv = -(-n // lanes)
    npad = nv * lanes
    direct = sb[1] == 1 and n % lanes == 0
    mr = max(1, min(m, regs // nv))
    fma = engine.intrinsic(mod, f"llvm.fma.v{lanes}f32", vec, [vec, vec, vec])
    i8p = ir.IntType(8).as_pointer()
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64] + [i8p] * 5), name)
    for arg in fn.args[2:]:
        arg.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    start, stop = fn.args[:2]
    pa, pb, pc = (b.bitcast(p, F32.as_pointer()) for p in fn.args[2:5])
    offa, offb = (b.bitcast(p, I64.as_pointer()) for p in fn.args[5:7])
    tile = None
    if not direct:
        tile = b.alloca(F32, k * npad)
        tile.align = 64
        if npad > n:  # the padding columns stay zero
            def pad(kk, _):
                row = b.gep(tile, [b.mul(kk, i64(npad))])
                for j in range(n, npad):
                    b.store(ir.Constant(F32, 0.0), b.gep(row, [i64(j)]))
                return []
            engine.loop(b, 0, k, pad, [])
    zero = ir.Constant(vec, [0.0] * lanes)
    work = fn.append_basic_block("work")
    done = fn.append_basic_block("done")
    b.cbranch(b.icmp_signed("<", start, stop), work, done)
    b.position_at_end(work)

    def element(e, _):
        a0 = b.gep(pa, [b.load(b.gep(offa, [e]))])
        b0 = b.gep(pb, [b.load(b.gep(offb, [e]))])
        c0 = b.gep(pc, [b.mul(e, i64(m * n))])
        if direct:
            bsrc, ldb = b0, sb[0]
        else:
            _pack(b, b0, tile, k, n, npad, sb)
            bsrc, ldb = tile, npad

        def rows(i0, r_count):
            def step(kk, accs):
                bk = b.gep(bsrc, [b.mul(kk, i64(ldb))])
                bv = [b.load(b.bitcast(b.gep(bk, [i64(v * lanes)]), vec.as_pointer()),
                             align=4) for v in range(nv)]
                out = []
                for r in range(r_count):
                    idx = b.add(b.mul(b.add(i0, i64(r)), i64(sa[0])), b.mul(kk, i64(sa[1])))
                    x = b.load(b.gep(a0, [idx]))
                    xs = engine.splat(b, x, lanes)
                    out += [b.call(fma, [xs, bv[v], accs[r * nv + v]]) for v in range(nv)]
                return out

            accs = engine.loop(b, 0, k, step, [zero] * (r_count * nv))
            for r in range(r_count):
                crow = b.gep(c0, [b.mul(b.add(i0, i64(r)), i64(n))])
                for v in range(nv):
                    acc = accs[r * nv + v]
                    if (v + 1) * lanes <= n:
                        ptr = b.bitcast(b.gep(crow, [i64(v * lanes)]), vec.as_pointer())
                        b.store(acc, ptr, align=4)
                    else:
                        for j in range(n - v * lanes):
                            b.store(b.extract_element(acc, i64(j)),
                                    b.gep(crow, [i64(v * lanes + j)]))

        def block(blk, _):
            rows(b.mul(blk, i64(mr)), mr)
            return []

        if m >= mr:
            engine.loop(b, 0, m // mr, block, [])
        if m % mr:
            rows(i64(m - m % mr), m % mr)
        return []

    engine.loop(b, start, stop, element, [])
    b.branch(done)
    b.position_at_end(done)
    b.ret_void()


def _pack(b, src, tile, k, n, npad, sb):
    """tile[kk * npad + j] = op(B)[kk, j]; the inner loop runs along the source's smaller
    stride, so that one side of the copy is contiguous."""
    def copy(kk, j):
        x = b.load(b.gep(src, [b.add(b.mul(kk, i64(sb[0])), b.mul(j, i64(sb[1])))]))
        b.store(x, b.gep(tile, [b.add(b.mul(kk, i64(npad)), j)]))

    k_inner = abs(sb[0]) < abs(sb[1])

    def outer(o, _):
        def inner(i, _):
            copy(i, o) if k_inner else copy(o, i)
            return []
        engine.loop(b, 0, k if k_inner else n, inner, [])
        return []

    engine.loop(b, 0, n if k_inner else k, outer, [])


def _kernel(m, k, n, sa, sb):
    """The compiled kernel for these sizes and strides; None once engine.SHAPE_KERNELS are."""
    def build():
        name = "bmm_" + "_".join(str(abs(x)) + ("n" if x < 0 else "")
                                 for x in (m, k, n) + sa + sb)
        mod = engine.new_module(name)
        _build(mod, name, m, k, n, sa, sb)
        return engine.compile_module(mod, {name: (ctypes.c_int64,) * 2 + (_P,) * 5})[name]

    return engine.shape_kernel(_cache, (m, k, n, sa, sb), build)


@functools.lru_cache(maxsize=256)
def _offsets(batch: tuple, strides: tuple) -> np.ndarray:
    """Element offsets of each batch element (C order) for batch strides (0 where broadcast)."""
    off = np.zeros((), np.int64)
    for size, st in zip(batch, strides):
        off = (off[..., None] + np.arange(size, dtype=np.int64) * st)
    off = np.ascontiguousarray(off.reshape(-1))
    off.flags.writeable = False
    return off


def _batch_strides(x: np.ndarray, batch: tuple) -> tuple:
    nb = x.ndim - 2
    lead = len(batch) - nb
    st = [0] * lead
    for d in range(nb):
        st.append(0 if x.shape[d] == 1 else x.strides[d] // 4)
    return tuple(st)


def fits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``matmul(a, b)`` takes the native path: float32, a batch of at least 2 small
    matrices (M, K, N <= MAX_DIM), strides whole elements."""
    if a.dtype != _F32 or b.dtype != _F32 or max(a.ndim, b.ndim) < 3:
        return False
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if not (0 < m <= MAX_DIM and 0 < k <= MAX_DIM and 0 < n <= MAX_DIM) or b.shape[-2] != k:
        return False
    return all(s % 4 == 0 for s in a.strides + b.strides)


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None):
    """``np.matmul(a, b)`` for (..., M, K) and (..., K, N) float32 views (any strides, batch dims
    broadcast), into ``out`` when given; None (nothing written) when they do not fit (``fits``,
    a batch of >= 2 and MIN_MACS, a C-contiguous ``out`` of the right shape that overlaps neither
    operand)."""
    if not fits(a, b):
        return None
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        return None
    nbatch = math.prod(batch)
    if nbatch < 2:
        return None
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if nbatch * m * n * k < MIN_MACS:
        return None
    shape = batch + (m, n)
    if out is not None and (out.shape != shape or out.dtype != _F32
                            or not out.flags.c_contiguous or np.may_share_memory(out, a)
                            or np.may_share_memory(out, b)):
        return None
    sa = (a.strides[-2] // 4, a.strides[-1] // 4)
    sb = (b.strides[-2] // 4, b.strides[-1] // 4)
    fn = _kernel(m, k, n, sa, sb)
    if fn is None:
        return None
    if out is None:
        out = np.empty(shape, _F32)
    offa = _offsets(batch, _batch_strides(a, batch))
    offb = _offsets(batch, _batch_strides(b, batch))
    # in parallel.run's units (one memory-bound add): ~24 multiply-adds from cache, vectorized
    parallel.run(fn, nbatch, (address(a), address(b), address(out), address(offa),
                              address(offb)), work_per_item=m * n * k // 24 + 1)
    return out
