"""float32 exp, log, tanh and friends as straight-line IR, so the loop vectorizer can widen them.

LLVM's own ``llvm.exp.f32`` becomes a call to libm's scalar expf, which stops vectorization;
these are the Cephes single-precision algorithms (range reduction, a short polynomial, the
exponent set through the float's bits), accurate to about 1 ulp over float32's range.  Every
function takes and returns an ``ir.Value`` of type float inside the builder's current block.
"""

from __future__ import annotations

from llvmlite import ir

from kiln.jit.engine import F32, I32, intrinsic

LOG2E = 1.44269504088896341
# ln 2 split in two: k * LN2_HI is exact for the |k| <= 128 that occur, so r loses no bits
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
EXP_HI = 88.7228390520683  # exp overflows float32 above this
EXP_LO = -87.3365447505531  # below this exp(x) is subnormal: flushed to 0 (error < 1.2e-38)
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
          1.6666665459e-1, 5.0000001201e-1)
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
          3.3333331174e-1)
_TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
           -3.33332819422e-1)
SQRT_HALF = 0.707106781186547524


def const(v: float) -> ir.Constant:
    return ir.Constant(F32, float(v))


def horner(b: ir.IRBuilder, x, coeffs):
    """coeffs[0] x^(n-1) + ... + coeffs[-1], highest power first."""
    p = const(coeffs[0])
    for c in coeffs[1:]:
        p = b.fadd(b.fmul(p, x), const(c))
    return p


def _call(b: ir.IRBuilder, name: str, *args):
    fn = intrinsic(b.module, f"llvm.{name}.f32", F32, [F32] * len(args))
    return b.call(fn, list(args))


def fmin(b, x, y):
    return _call(b, "minnum", x, y)


def fmax(b, x, y):
    return _call(b, "maxnum", x, y)


def fabs(b, x):
    return _call(b, "fabs", x)


def sqrt(b, x):
    return _call(b, "sqrt", x)


def rint(b, x):
    return _call(b, "rint", x)


def copysign(b, mag, sign):
    return _call(b, "copysign", mag, sign)


def is_nan(b, x):
    return b.fcmp_unordered("uno", x, x)


def exp(b: ir.IRBuilder, x):
    """e**x: inf above 88.72, 0 below -87.34 (no subnormal results), NaN stays NaN."""
    # inputs below EXP_LO compute exp(0) and are replaced by 0 at the end: clamping them to
    # EXP_LO instead would build a subnormal 2**-126 * p, which the CPU handles ~100x slower
    low = b.fcmp_ordered("<", x, const(EXP_LO))
    t = b.select(low, const(0.0), fmin(b, x, const(EXP_HI)))
    k = rint(b, b.fmul(t, const(LOG2E)))
    r = b.fsub(t, b.fmul(k, const(LN2_HI)))
    r = b.fsub(r, b.fmul(k, const(LN2_LO)))
    p = b.fmul(b.fmul(horner(b, r, _EXP_P), r), r)
    p = b.fadd(b.fadd(p, r), const(1.0))
    # 2**k through the exponent bits; k is in [-126, 128]: 2**128 is built as 2 * 2**127
    ki = b.fptosi(k, I32)
    half = b.ashr(ki, ir.Constant(I32, 1))
    s1 = b.bitcast(b.shl(b.add(half, ir.Constant(I32, 127)), ir.Constant(I32, 23)), F32)
    s2 = b.bitcast(b.shl(b.add(b.sub(ki, half), ir.Constant(I32, 127)), ir.Constant(I32, 23)),
                   F32)
    y = b.fmul(b.fmul(p, s1), s2)
    y = b.select(b.fcmp_ordered(">", x, const(EXP_HI)), const(float("inf")), y)
    y = b.select(low, const(0.0), y)
    return b.select(is_nan(b, x), x, y)


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
    """tanh: an odd polynomial below |x| = 0.625, 1 - 2 / (e**2|x| + 1) above it."""
    ax = fabs(b, x)
    z = b.fmul(x, x)
    small = b.fadd(x, b.fmul(b.fmul(x, z), horner(b, z, _TANH_P)))
    e = exp(b, b.fmul(ax, const(2.0)))
    big = b.fsub(const(1.0), b.fdiv(const(2.0), b.fadd(e, const(1.0))))
    big = copysign(b, big, x)
    y = b.select(b.fcmp_ordered("<", ax, const(0.625)), small, big)
    return b.select(is_nan(b, x), x, y)


def sigmoid(b: ir.IRBuilder, x):
    """1 / (1 + e**-x), as PyTorch computes it (0 for x below -88)."""
    return b.fdiv(const(1.0), b.fadd(const(1.0), exp(b, b.fneg(x))))
