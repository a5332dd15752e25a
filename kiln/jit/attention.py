"""Fused scaled-dot-product attention for small heads: ``softmax(scale q k^T) v`` (optionally
causal) and its gradients, one head (batch element) at a time, heads split over threads.

Composed of separate ops, a head's attention writes and rereads its (L, S) scores several
times (product, mask, softmax, product, and as many again backward) and spends more on call
overhead than arithmetic at gpt sizes (64 x 64 scores, head dim 32).  Here a head's scores
live in one stack tile, transposed (a row per key, a vector holds one key's scores for several
queries, so the softmax over keys needs no horizontal reductions): the forward computes them,
turns them into probabilities in place and multiplies by v; the backward recomputes them
(only the output is kept), then forms dv = p^T do, ds = p * (do v^T - rowsum(do * o)) and
dq = scale ds k, dk = scale ds^T q.  With a causal mask, the softmax and the products after it
skip the keys or queries that are masked out.

The products are register-blocked as in kiln/jit/bmm.py: a block of rows of the result stays
in vector registers while one broadcast element of the left operand multiplies one vector of
the right operand's row per fused multiply-add, sums in increasing k order (float32, as
BLAS).  q (and do) are transposed into tiles a block of vectors at a time, in registers.  exp
is kiln/jit/mathlib.py's, on vectors.

Operands are (batch..., rows, dim) views whose last dimension is contiguous; row strides are
compiled in, per-head offsets (with batch broadcasting) are passed as a table.  Heads of up to
MAX_DIM keys, queries and channels, channels a multiple of the vector width; anything else is
for the caller's numpy path (``fits``).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
from llvmlite import ir

from kiln.jit import bmm, engine, mathlib, parallel
from kiln.jit.engine import F32, I32, I64, address, i64

MAX_DIM = 128  # largest L, S, E and Ev (the tiles of scores and transposed q, do are on the stack)
_F32 = np.dtype(np.float32)
_P = ctypes.c_void_p
_L = ctypes.c_int64
_REASSOC = ("reassoc",)
# column vectors of a register block: with AVX-512's 24 accumulators, 6 rows x 4 vectors
_BLOCK_VECS = 4
_cache: dict = {}


class _Emit:
    """IR helpers for one kernel: vector loads and stores, splats, register-blocked products."""

    def __init__(self, b: ir.IRBuilder):
        self.b = b
        self.lanes, self.regs = bmm._shape_regs()
        self.vec = ir.VectorType(F32, self.lanes)
        self.fma = engine.intrinsic(b.module, f"llvm.fma.v{self.lanes}f32", self.vec,
                                    [self.vec] * 3)
        self.zero = ir.Constant(self.vec, [0.0] * self.lanes)

    def vload(self, ptr, at):
        return self.b.load(self.b.bitcast(self.b.gep(ptr, [at]), self.vec.as_pointer()), align=4)

    def vstore(self, v, ptr, at):
        self.b.store(v, self.b.bitcast(self.b.gep(ptr, [at]), self.vec.as_pointer()), align=4)

    def splat(self, x):
        """The scalar ``x`` (a float or an i32) in every lane."""
        return engine.splat(self.b, x, self.lanes)

    def at(self, ptr, *terms):
        """``ptr + sum(a * c)`` for (i64 value or int, int) pairs ``terms``."""
        b = self.b
        off = i64(0)
        for x, c in terms:
            x = i64(x) if isinstance(x, int) else x
            off = b.add(off, b.mul(x, i64(c)) if c != 1 else x)
        return b.gep(ptr, [off])

    def product(self, m: int, n: int, krange, a_row, ak: int, b_row, store):
        """For rows i in [0, m) and vectors of columns c in [0, n): the sum over kk of
        ``A[i, kk] * B[kk, c:c + lanes]``, handed to ``store(i, c, acc)``.

        ``krange(i0, rows)`` -> (lo, hi): the kk range a block of rows needs (ints or i64);
        ``a_row(i)`` -> pointer to A[i, 0], A[i, kk] ``ak`` floats further per kk;
        ``b_row(kk)`` -> pointer to B[kk, 0], whose row has ``n`` (a multiple of lanes)
        readable floats.  Rows left over after the register blocks go one at a time (less
        code to compile than another unrolled block)."""
        b, lanes = self.b, self.lanes
        nv = n // lanes
        for first in range(0, nv, _BLOCK_VECS):
            cv = min(_BLOCK_VECS, nv - first)
            mr = max(1, min(m, self.regs // cv))

            def rows(i0, count, first=first, cv=cv):
                lo, hi = krange(i0, count)
                starts = [a_row(b.add(i0, i64(r))) for r in range(count)]

                def step(kk, accs):
                    row = b_row(kk)
                    at = b.mul(kk, i64(ak)) if ak != 1 else kk
                    bv = [self.vload(row, i64((first + v) * lanes)) for v in range(cv)]
                    out = []
                    for r in range(count):
                        x = self.splat(b.load(b.gep(starts[r], [at])))
                        out += [b.call(self.fma, [x, bv[v], accs[r * cv + v]])
                                for v in range(cv)]
                    return out

                accs = engine.loop(b, lo, hi, step, [self.zero] * (count * cv))
                for r in range(count):
                    for v in range(cv):
                        store(b.add(i0, i64(r)), (first + v) * lanes, accs[r * cv + v])

            if m >= mr:
                engine.loop(b, 0, m // mr, lambda blk, _, mr=mr, rows=rows: rows(
                    b.mul(blk, i64(mr)), mr) or [], [])
            if m % mr:
                engine.loop(b, m - m % mr, m, lambda i, _, rows=rows: rows(i, 1) or [], [])

    def min_(self, x, y):
        return self.b.select(self.b.icmp_signed("<", x, y), x, y)


def _pack_t(e: _Emit, src, ld: int, rows: int, cols: int, tile, tld: int):
    """tile[c * tld + r] = src[r * ld + c] for c < cols (a multiple of lanes) and r < tld (a
    multiple of lanes), zero for r >= rows: lanes x lanes blocks transposed in registers."""
    b, n = e.b, e.lanes

    def block(r0, c0, count):
        vs = [e.vload(src, b.add(b.mul(b.add(r0, i64(r)), i64(ld)), c0)) if r < count
              else e.zero for r in range(n)]
        for c, v in enumerate(engine.transpose(b, vs)):
            e.vstore(v, tile, b.add(b.mul(b.add(c0, i64(c)), i64(tld)), r0))

    def col_blocks(r0, count):
        engine.loop(b, 0, cols // n, lambda cb, _: block(r0, b.mul(cb, i64(n)), count) or [], [])

    if rows >= n:
        engine.loop(b, 0, rows // n, lambda rb, _: col_blocks(b.mul(rb, i64(n)), n) or [], [])
    if rows % n:
        col_blocks(i64(rows - rows % n), rows % n)


def _probabilities(e: _Emit, k, qt, pt, mtile, L, S, E, lpad, sk, causal, scale):
    """pt[j, i] = the probability that query i gives key j: softmax over j of scale k[j] q[i]
    (transposed scores: a vector holds one key's scores for ``lanes`` queries, so the softmax
    over keys is vertical, with no horizontal reductions); zero where masked.  ``mtile``
    (lpad floats) holds each query's max score."""
    b, lanes = e.b, e.lanes
    sc = e.splat(ir.Constant(F32, scale))
    e.product(S, lpad, lambda j0, n: (0, E), lambda j: e.at(k, (j, sk)), 1,
              lambda kk: e.at(qt, (kk, lpad)),
              lambda j, c, acc: e.vstore(b.fmul(acc, sc), pt, b.add(b.mul(j, i64(lpad)),
                                                                    i64(c))))
    nv = lpad // lanes
    ivec = ir.VectorType(I32, lanes)
    ninf = mathlib.const(float("-inf"), e.vec)

    iota = ir.Constant(ivec, list(range(lanes)))

    def scores(j, c):
        """Key j's scaled scores for queries [c, c + lanes) (c an i64), -inf where the mask
        hides them."""
        x = e.vload(pt, b.add(b.mul(j, i64(lpad)), c))
        if not causal:
            return x
        queries = b.add(iota, e.splat(b.trunc(c, I32)))
        return b.select(b.icmp_signed(">=", queries, e.splat(b.trunc(j, I32))), x, ninf)

    # one pass for every query vector's max: independent chains
    maxes = engine.loop(b, 0, S, lambda j, acc: [
        mathlib.fmax(b, acc[v], scores(j, i64(v * lanes))) for v in range(nv)], [ninf] * nv)
    for v in range(nv):
        e.vstore(maxes[v], mtile, i64(v * lanes))

    def column(v, _):  # one query vector at a time: one copy of the exp code
        c = b.mul(v, i64(lanes))
        # keys past lim are hidden from every query of the vector
        lim = e.min_(b.add(c, i64(lanes)), i64(S)) if causal else i64(S)
        m = e.vload(mtile, c)

        def ex(j, acc):
            y = mathlib.exp(b, b.fsub(scores(j, c), m))
            e.vstore(y, pt, b.add(b.mul(j, i64(lpad)), c))
            return [b.fadd(acc[0], y, flags=_REASSOC)]

        inv = b.fdiv(mathlib.const(1.0, e.vec), engine.loop(b, i64(0), lim, ex, [e.zero])[0])

        def norm(j, _):
            at = b.add(b.mul(j, i64(lpad)), c)
            e.vstore(b.fmul(e.vload(pt, at), inv), pt, at)
            return []

        engine.loop(b, i64(0), lim, norm, [])
        engine.loop(b, lim, i64(S), lambda j, _: e.vstore(e.zero, pt, b.add(
            b.mul(j, i64(lpad)), c)) or [], [])
        return []

    engine.loop(b, 0, nv, column, [])


def _head_function(mod, name, n_ptr):
    """``void name(i64 start, i64 stop, i64* offsets, float* x n_ptr)`` (the offsets table holds
    n_ptr element offsets per head) and a builder at its entry."""
    i8p = ir.IntType(8).as_pointer()
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, I64] + [i8p] * (n_ptr + 1)),
                     name)
    for a in fn.args[2:]:
        a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b


def _heads(b, fn, n_ptr, body):
    """Loop over heads [start, stop): ``body(bases)`` with each operand's base pointer."""
    start, stop = fn.args[:2]
    offs = b.bitcast(fn.args[2], I64.as_pointer())
    ptrs = [b.bitcast(p, F32.as_pointer()) for p in fn.args[3:]]

    def head(h, _):
        row = b.mul(h, i64(n_ptr))
        bases = [b.gep(p, [b.load(b.gep(offs, [b.add(row, i64(j))]))])
                 for j, p in enumerate(ptrs)]
        body(bases)
        return []

    engine.loop(b, start, stop, head, [])
    b.ret_void()


def _tile(b, n: int):
    t = b.alloca(F32, n)
    t.align = 64
    return t


def _build_forward(mod, name, L, S, E, Ev, strides, causal, scale):
    """``name(start, stop, offsets, q, k, v, o)``: o = attention(q, k, v) per head."""
    sq, sk, sv, so = strides
    fn, b = _head_function(mod, name, 4)
    e = _Emit(b)
    lpad = -(-L // e.lanes) * e.lanes
    qt, pt, mtile = _tile(b, E * lpad), _tile(b, S * lpad), _tile(b, lpad)

    def body(bases):
        q, k, v, o = bases
        _pack_t(e, q, sq, L, E, qt, lpad)
        _probabilities(e, k, qt, pt, mtile, L, S, E, lpad, sk, causal, scale)
        # o = p v; a causal block of queries reads keys up to its last query only
        e.product(L, Ev, _upto(e, S) if causal else _all(S),
                  lambda i: e.at(pt, (i, 1)), lpad, lambda j: e.at(v, (j, sv)),
                  lambda i, c, acc: e.vstore(acc, o, b.add(b.mul(i, i64(so)), i64(c))))

    _heads(b, fn, 4, body)


def _all(n: int):
    return lambda i0, count: (0, n)


def _upto(e: _Emit, n: int):
    """The k range of a block of rows i0.. under a causal mask: [0, min(n, i0 + count))."""
    return lambda i0, count: (0, e.min_(e.b.add(i0, i64(count)), i64(n)))


def _from(e: _Emit, n: int):
    """The k range of a block of key rows j0.. under a causal mask: queries [min(j0, n), n)."""
    return lambda j0, count: (e.min_(j0, i64(n)), i64(n))


def _build_backward(mod, name, L, S, E, Ev, strides, causal, scale):
    """``name(start, stop, offsets, q, k, v, o, do, dq, dk, dv)``: the gradients per head."""
    sq, sk, sv, so, sdo, sdq, sdk, sdv = strides
    fn, b = _head_function(mod, name, 8)
    e = _Emit(b)
    lpad = -(-L // e.lanes) * e.lanes
    qt, dot, pt = _tile(b, E * lpad), _tile(b, Ev * lpad), _tile(b, S * lpad)
    rowdot, mtile = _tile(b, lpad), _tile(b, lpad)
    for c in range(L, lpad):  # padding queries: finite values that meet zero probabilities
        b.store(ir.Constant(F32, 0.0), b.gep(rowdot, [i64(c)]))
    sc = e.splat(ir.Constant(F32, scale))
    queries = _from(e, L) if causal else _all(L)
    keys = _upto(e, S) if causal else _all(S)

    def body(bases):
        q, k, v, o, do, dq, dk, dv = bases
        _pack_t(e, q, sq, L, E, qt, lpad)
        _pack_t(e, do, sdo, L, Ev, dot, lpad)
        _probabilities(e, k, qt, pt, mtile, L, S, E, lpad, sk, causal, scale)

        def dot_row(i, _):  # rowsum(do * o)
            terms = [b.fmul(e.vload(do, b.add(b.mul(i, i64(sdo)), i64(c))),
                            e.vload(o, b.add(b.mul(i, i64(so)), i64(c))))
                     for c in range(0, Ev, e.lanes)]
            b.store(engine.hsum(b, terms), b.gep(rowdot, [i]))
            return []

        engine.loop(b, 0, L, dot_row, [])
        # dv = p^T do
        e.product(S, Ev, queries, lambda j: e.at(pt, (j, lpad)), 1,
                  lambda i: e.at(do, (i, sdo)),
                  lambda j, c, acc: e.vstore(acc, dv, b.add(b.mul(j, i64(sdv)), i64(c))))

        # pt becomes scale * ds^T = scale * p^T * (v do^T - rowdot), block by block
        def to_ds(j, c, acc):
            at = b.add(b.mul(j, i64(lpad)), i64(c))
            d = e.vload(rowdot, i64(c))
            e.vstore(b.fmul(b.fmul(e.vload(pt, at), b.fsub(acc, d)), sc), pt, at)

        e.product(S, lpad, _all(Ev), lambda j: e.at(v, (j, sv)), 1,
                  lambda kk: e.at(dot, (kk, lpad)), to_ds)
        # dq = ds k
        e.product(L, E, keys, lambda i: e.at(pt, (i, 1)), lpad,
                  lambda j: e.at(k, (j, sk)),
                  lambda i, c, acc: e.vstore(acc, dq, b.add(b.mul(i, i64(sdq)), i64(c))))
        # dk = ds^T q
        e.product(S, E, queries, lambda j: e.at(pt, (j, lpad)), 1,
                  lambda i: e.at(q, (i, sq)),
                  lambda j, c, acc: e.vstore(acc, dk, b.add(b.mul(j, i64(sdk)), i64(c))))

    _heads(b, fn, 8, body)


def _kernel(kind, L, S, E, Ev, strides, causal, scale):
    key = (kind, L, S, E, Ev, strides, causal, scale)

    def build():
        name = f"attention_{kind}_{len(_cache)}"
        mod = engine.new_module(name)
        (_build_forward if kind == "fwd" else _build_backward)(
            mod, name, L, S, E, Ev, strides, causal, scale)
        n = 4 if kind == "fwd" else 8
        return engine.compile_module(mod, {name: (_L, _L) + (_P,) * (n + 1)},
                                     explicit_vectors=True)[name]

    return engine.shape_kernel(_cache, key, build)


def fits(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> bool:
    """Whether the native kernels take these operands: float32 (..., L, E), (..., S, E) and
    (..., S, Ev) with 1 <= L, S <= MAX_DIM, E and Ev multiples of the vector width up to
    MAX_DIM, whole-element strides (the callers check that the batch dims broadcast)."""
    lanes = bmm._shape_regs()[0]
    if any(x.dtype != _F32 or x.ndim < 2 for x in (q, k, v)):
        return False
    (L, E), (S, E2), (S2, Ev) = q.shape[-2:], k.shape[-2:], v.shape[-2:]
    if E != E2 or S != S2 or not (0 < L <= MAX_DIM and 0 < S <= MAX_DIM):
        return False
    if not all(0 < d <= MAX_DIM and d % lanes == 0 for d in (E, Ev)):
        return False
    return all(s % 4 == 0 for x in (q, k, v) for s in x.strides)


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` with a contiguous last dimension (copied when it is not)."""
    return x if x.strides[-1] == 4 else np.ascontiguousarray(x)


def _heads_inner(batch: tuple, rows: int, dim: int) -> np.ndarray:
    """An empty (batch..., rows, dim) float32 array laid out (batch[:-1]..., rows, batch[-1],
    dim): after ``transpose(-3, -2)`` the heads of a row are adjacent, so merging them into
    one feature axis is a view (the layout PyTorch's CPU attention returns too)."""
    if not batch:
        return np.empty((rows, dim), _F32)
    return np.empty(batch[:-1] + (rows, batch[-1], dim), _F32).swapaxes(-3, -2)


def _table(batch: tuple, arrays) -> np.ndarray:
    """(heads, len(arrays)) int64 element offsets of each head's matrix in each array."""
    cols = [bmm._offsets(batch, bmm._batch_strides(x, batch)) for x in arrays]
    return np.ascontiguousarray(np.stack(cols, axis=1))


def _row_strides(arrays) -> tuple:
    return tuple(x.strides[-2] // 4 for x in arrays)


def forward(q, k, v, causal: bool, scale: float):
    """The attention output (batch..., L, Ev) float32 (heads-inner layout), or None when the
    operands do not fit or the kernel cache is full."""
    if not fits(q, k, v):
        return None
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        return None
    q, k, v = _rows(q), _rows(k), _rows(v)
    (L, E), S, Ev = q.shape[-2:], k.shape[-2], v.shape[-1]
    out = _heads_inner(batch, L, Ev)
    arrays = (q, k, v, out)
    fn = _kernel("fwd", L, S, E, Ev, _row_strides(arrays), bool(causal), float(scale))
    if fn is None:
        return None
    heads = math.prod(batch)
    if heads == 0:
        return out
    table = _table(batch, arrays)
    parallel.run(fn, heads, (address(table),) + tuple(address(x) for x in arrays),
                 work_per_item=L * S * (E + Ev) // 16 + 1)
    return out


def backward(q, k, v, o, g, causal: bool, scale: float, outs) -> bool:
    """Write dq, dk and dv (over the full broadcast batch: the caller sums broadcast dims away)
    into ``outs`` (three float32 arrays, last dimension contiguous); False (nothing written)
    when the operands do not fit."""
    if not fits(q, k, v) or o.dtype != _F32 or g.dtype != _F32:
        return False
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        return False
    (L, E), S, Ev = q.shape[-2:], k.shape[-2], v.shape[-1]
    shapes = (batch + (L, E), batch + (S, E), batch + (S, Ev))
    if (o.shape != batch + (L, Ev) or g.shape != o.shape
            or any(x.shape != s or x.dtype != _F32 or x.strides[-1] != 4
                   for x, s in zip(outs, shapes))):
        return False
    q, k, v, o, g = (_rows(x) for x in (q, k, v, o, g))
    arrays = (q, k, v, o, g) + tuple(outs)
    fn = _kernel("bwd", L, S, E, Ev, _row_strides(arrays), bool(causal), float(scale))
    if fn is None:
        return False
    heads = math.prod(batch)
    if heads:
        table = _table(batch, arrays)
        parallel.run(fn, heads, (address(table),) + tuple(address(x) for x in arrays),
                     work_per_item=L * S * (2 * E + 3 * Ev) // 16 + 1)
    return True
