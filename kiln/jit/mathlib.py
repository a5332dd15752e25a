"""float32 exp, log, tanh and friends as straight-line IR, so the loop vectorizer can widen them.

LLVM's own ``llvm.exp.f32`` becomes a call to libm's scalar expf, which stops vectorization;
these follow the Cephes single-precision algorithms (range reduction, a short polynomial, the
exponent set through the float's bits), accurate to about 1 ulp over float32's range, with
explicit fma (IR has no contraction without fast-math flags) and few operations per element:
the vector loops are bound by instruction throughput, not by latency or memory.  Every
function takes and returns an ``ir.Value`` of type float inside the builder's current block
(``exp`` also a vector of floats, for kernels that hold their own vectors).
"""

from __future__ import annotations

from llvmlite import ir

from kiln.jit.engine import F32, I32, intrinsic

LOG2E = 1.44269504088896341
# ln 2 split in two: k * LN2_HI is exact for the |k| <= 128 that occur, so r loses no bits
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
EXP_HI = 88.72283172607422  # the largest float32 whose exp is finite
EXP_LO = -87.33654022216797  # the smallest float32 whose exp is normal: below it, 0
# 1.5 * 2**23: adding it rounds a float below 2**22 to an integer, held in the low mantissa bits
_ROUNDER = 12582912.0
# (e**r - 1 - r) / r**2 on |r| <= ln(2) / 2, weighted minimax: e**r - 1 to 1.3e-8 relative
_EXP_Q = (1.3882518978789449e-3, 8.366533555090427e-3, 4.166720062494278e-2,
          1.666654348373413e-1, 4.999999701976776e-1)
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
          3.3333331174e-1)
_TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
           -3.33332819422e-1)
SQRT_HALF = 0.707106781186547524


def const(v: float, ty=F32) -> ir.Constant:
    """``v`` as a float, or splat over a float vector type ``ty``."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [float(v)] * ty.count)
    return ir.Constant(F32, float(v))


def _int_const(v: int, ty) -> ir.Constant:
    """``v`` as an i32, or splat over i32 lanes matching the float vector type ``ty``."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ir.VectorType(I32, ty.count), [v] * ty.count)
    return ir.Constant(I32, v)


def horner(b: ir.IRBuilder, x, coeffs):
    """coeffs[0] x^(n-1) + ... + coeffs[-1], highest power first (one fma per step)."""
    p = const(coeffs[0], x.type)
    for c in coeffs[1:]:
        p = fma(b, p, x, const(c, x.type))
    return p


def _call(b: ir.IRBuilder, name: str, *args):
    ty = args[0].type
    suffix = f"v{ty.count}f32" if isinstance(ty, ir.VectorType) else "f32"
    fn = intrinsic(b.module, f"llvm.{name}.{suffix}", ty, [ty] * len(args))
    return b.call(fn, list(args))


def fma(b, x, y, z):
    """x * y + z, rounded once."""
    return _call(b, "fma", x, y, z)


def fmax(b, x, y):
    return _call(b, "maxnum", x, y)


def fabs(b, x):
    return _call(b, "fabs", x)


def sqrt(b, x):
    return _call(b, "sqrt", x)


def copysign(b, mag, sign):
    return _call(b, "copysign", mag, sign)


def is_nan(b, x):
    return b.fcmp_unordered("uno", x, x)


def _reduce(b: ir.IRBuilder, x):
    """x = k ln(2) + r with |r| <= ln(2) / 2: (r, k << 23 as an i32)."""
    # k = rint(x log2(e)) in one fma: adding _ROUNDER leaves k in the low mantissa bits of s
    ty = x.type
    s = fma(b, x, const(LOG2E, ty), const(_ROUNDER, ty))
    k = b.fsub(s, const(_ROUNDER, ty))
    r = fma(b, k, const(-LN2_HI, ty), x)
    r = fma(b, k, const(-LN2_LO, ty), r)
    return r, b.shl(b.bitcast(s, _int_const(0, ty).type), _int_const(23, ty))


def exp(b: ir.IRBuilder, x):
    """e**x: inf above EXP_HI, 0 below EXP_LO (no subnormal results), NaN stays NaN."""
    ty = x.type
    r, kbits = _reduce(b, x)
    p = horner(b, r, _EXP_Q + (1.0, 1.0))
    # p * 2**k: k added to p's exponent field (p is in [0.7, 1.5], so for x in [EXP_LO, EXP_HI]
    # the sum is a normal float); out of that range the bits are garbage, replaced below
    y = b.bitcast(b.add(b.bitcast(p, kbits.type), kbits), ty)
    # x + inf: inf above the range, NaN for NaN
    y = b.select(b.fcmp_ordered("<=", x, const(EXP_HI, ty)), y,
                 b.fadd(x, const(float("inf"), ty)))
    return b.select(b.fcmp_ordered("<", x, const(EXP_LO, ty)), const(0.0, ty), y)


def _exp_shifted(b: ir.IRBuilder, x, shifts):
    """e**x + c for each c in ``shifts``, for x in [-30, 0] (or NaN), each rounded once:
    2**k q + (2**k + c) with q = e**r - 1."""
    r, kbits = _reduce(b, x)
    q = fma(b, b.fmul(r, r), horner(b, r, _EXP_Q), r)
    scale = b.bitcast(b.add(kbits, ir.Constant(I32, 127 << 23)), F32)
    return [fma(b, q, scale, b.fadd(scale, const(c)) if c else scale) for c in shifts]


def log(b: ir.IRBuilder, x):
    """Natural log: -inf at 0, NaN below 0 and for NaN, inf at inf; subnormals handled."""
    tiny = b.fcmp_ordered("<", x, const(1.1754943508222875e-38))
    xs = b.select(tiny, b.fmul(x, const(8388608.0)), x)  # 2**23 lifts subnormals to normal
    bits = b.bitcast(xs, I32)
    e = b.sub(b.lshr(bits, ir.Constant(I32, 23)), ir.Constant(I32, 126))
    e = b.select(tiny, b.sub(e, ir.Constant(I32, 23)), e)
    m = b.bitcast(b.or_(b.and_(bits, ir.Constant(I32, 0x007FFFFF)),
                        ir.Constant(I32, 0x3F000000)), F32)  # mantissa in [0.5, 1)
    small = b.fcmp_ordered("<", m, const(SQRT_HALF))
    e = b.select(small, b.sub(e, ir.Constant(I32, 1)), e)
    m = b.fsub(b.select(small, b.fadd(m, m), m), const(1.0))
    z = b.fmul(m, m)
    y = b.fmul(b.fmul(horner(b, m, _LOG_P), m), z)
    ef = b.sitofp(e, F32)
    y = b.fadd(y, b.fmul(ef, const(LN2_LO)))
    y = b.fsub(y, b.fmul(z, const(0.5)))
    y = b.fadd(b.fadd(m, y), b.fmul(ef, const(LN2_HI)))
    y = b.select(b.fcmp_ordered("==", x, const(float("inf"))), x, y)
    y = b.select(b.fcmp_ordered("==", x, const(0.0)), const(float("-inf")), y)
    return b.select(b.fcmp_unordered("<", x, const(0.0)), const(float("nan")), y)


def tanh(b: ir.IRBuilder, x):
    """tanh: an odd polynomial below |x| = 0.625, 1 - 2 e / (1 + e) with e = e**(-2|x|) above
    it (so nothing overflows), given the sign of x."""
    ax = fabs(b, x)
    lo = const(-30.0)  # e**-30 rounds to 0 next to 1
    t = b.fmul(ax, const(-2.0))
    t = b.select(b.fcmp_ordered(">", lo, t), lo, t)  # keeps NaN
    e, d = _exp_shifted(b, t, (0.0, 1.0))
    big = b.fsub(const(1.0), b.fdiv(b.fadd(e, e), d))
    z = b.fmul(x, x)
    small = fma(b, b.fmul(x, z), horner(b, z, _TANH_P), x)
    return copysign(b, b.select(b.fcmp_ordered("<", ax, const(0.625)), small, big), x)


def sigmoid(b: ir.IRBuilder, x):
    """1 / (1 + e**-x), as PyTorch computes it (0 for x below -88)."""
    return b.fdiv(const(1.0), b.fadd(const(1.0), exp(b, b.fneg(x))))
