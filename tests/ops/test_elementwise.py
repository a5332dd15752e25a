"""Elementwise ops against PyTorch: values, dtypes and gradients (arithmetic, comparisons, math
functions, activations, clamp/where/masked_fill, in-place variants and operators)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import kiln
from tests.helpers import check_exception, check_op, rand

# kiln.ops.elementwise silences numpy's floating-point warnings (PyTorch gives none); pytest
# resets warning filters for each test, so restate it
pytestmark = pytest.mark.filterwarnings(r"ignore::RuntimeWarning:kiln\.ops\.elementwise")

F32 = {"atol": 1e-6, "rtol": 1e-5}
F64 = {"atol": 1e-12, "rtol": 1e-12}
TOL = {np.float32: F32, np.float64: F64}
DTYPES = [np.float32, np.float64]
SHAPES = [(), (0,), (5,), (3, 4), (2, 0, 3)]
PAIRS = [((), ()), ((3,), (3,)), ((2, 3), (3,)), ((2, 1), (1, 3)), ((), (2, 3)),
         ((4, 1, 3), (2, 1)), ((0, 3), (1, 3)), ((2, 3), ())]


def nnf(lib):
    """Activations live in torch.nn.functional and at kiln's top level."""
    return TF if lib is torch else kiln


def arr(values, dtype=np.float32):
    return np.array(values, dtype=dtype)


def signed(*shape, low, high, seed=0, dtype=np.float32):
    """Values with magnitude in [low, high] and random signs."""
    rng = np.random.default_rng(seed + 100)
    mag = rand(*shape, seed=seed, low=low, high=high, dtype=np.float64)
    return (mag * rng.choice([-1.0, 1.0], size=shape)).astype(dtype)


# -- unary ops: values and gradients over shapes and dtypes ----------------------------------------

UNARY = {
    "exp": (lambda lib, x: lib.exp(x), (-3, 3)),
    "expm1": (lambda lib, x: lib.expm1(x), (-3, 3)),
    "log": (lambda lib, x: lib.log(x), (0.1, 4)),
    "log1p": (lambda lib, x: lib.log1p(x), (-0.9, 3)),
    "log2": (lambda lib, x: lib.log2(x), (0.1, 4)),
    "sqrt": (lambda lib, x: lib.sqrt(x), (0.1, 4)),
    "rsqrt": (lambda lib, x: lib.rsqrt(x), (0.1, 4)),
    "sin": (lambda lib, x: lib.sin(x), (-4, 4)),
    "cos": (lambda lib, x: lib.cos(x), (-4, 4)),
    "tanh": (lambda lib, x: lib.tanh(x), (-4, 4)),
    "sigmoid": (lambda lib, x: lib.sigmoid(x), (-6, 6)),
    "erf": (lambda lib, x: lib.erf(x), (-3, 3)),
    "abs": (lambda lib, x: lib.abs(x), (-2, 2)),
    "neg": (lambda lib, x: lib.neg(x), (-2, 2)),
    "reciprocal": (lambda lib, x: lib.reciprocal(x), (0.2, 3)),
    "square": (lambda lib, x: lib.square(x), (-2, 2)),
    "sign": (lambda lib, x: lib.sign(x), (-2, 2)),
    "floor": (lambda lib, x: lib.floor(x), (-3, 3)),
    "ceil": (lambda lib, x: lib.ceil(x), (-3, 3)),
    "trunc": (lambda lib, x: lib.trunc(x), (-3, 3)),
    "round": (lambda lib, x: lib.round(x), (-3, 3)),
    "round_decimals": (lambda lib, x: lib.round(x, decimals=2), (-3, 3)),
    "round_neg_decimals": (lambda lib, x: lib.round(x * 100, decimals=-1), (-3, 3)),
    "relu": (lambda lib, x: lib.relu(x), (-2, 2)),
    "gelu": (lambda lib, x: nnf(lib).gelu(x), (-4, 4)),
    "gelu_tanh": (lambda lib, x: nnf(lib).gelu(x, approximate="tanh"), (-4, 4)),
    "silu": (lambda lib, x: nnf(lib).silu(x), (-4, 4)),
    "softplus": (lambda lib, x: nnf(lib).softplus(x), (-4, 4)),
    "softplus_beta": (lambda lib, x: nnf(lib).softplus(x, beta=2.0, threshold=3.0), (-4, 4)),
    "leaky_relu": (lambda lib, x: nnf(lib).leaky_relu(x, 0.2), (-2, 2)),
    "elu": (lambda lib, x: nnf(lib).elu(x), (-3, 3)),
    "elu_alpha": (lambda lib, x: nnf(lib).elu(x, alpha=1.5), (-3, 3)),
    "hardtanh": (lambda lib, x: nnf(lib).hardtanh(x, -0.5, 1.5), (-2, 2)),
    "relu6": (lambda lib, x: nnf(lib).relu6(x), (-2, 8)),
    "logsigmoid": (lambda lib, x: nnf(lib).logsigmoid(x), (-6, 6)),
    "clamp": (lambda lib, x: lib.clamp(x, -0.5, 0.7), (-2, 2)),
    "clamp_min": (lambda lib, x: lib.clamp(x, min=-0.5), (-2, 2)),
    "clamp_max": (lambda lib, x: x.clamp(max=0.5), (-2, 2)),
    "clip": (lambda lib, x: lib.clip(x, -1, 1), (-2, 2)),
    "pow_2": (lambda lib, x: x ** 2, (-2, 2)),
    "pow_3": (lambda lib, x: x ** 3, (-2, 2)),
    "pow_half": (lambda lib, x: x ** 0.5, (0.1, 3)),
    "pow_neg": (lambda lib, x: lib.pow(x, -1.5), (0.2, 3)),
    "rpow": (lambda lib, x: 2 ** x, (-2, 2)),
    "rpow_float": (lambda lib, x: 1.5 ** x, (-2, 2)),
    "pos_abs": (lambda lib, x: abs(+x), (-2, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, shape, dtype):
    fn, (low, high) = UNARY[name]
    check_op(fn, [rand(*shape, low=low, high=high, dtype=dtype)], **TOL[dtype])


METHODS = {
    "exp": lambda lib, x: x.exp(), "log": lambda lib, x: x.abs().log(),
    "sqrt": lambda lib, x: x.abs().sqrt(), "sigmoid": lambda lib, x: x.sigmoid(),
    "tanh": lambda lib, x: x.tanh(), "relu": lambda lib, x: x.relu(),
    "erf": lambda lib, x: x.erf(), "neg": lambda lib, x: -x, "abs": lambda lib, x: abs(x),
    "pow": lambda lib, x: x.pow(2), "clamp": lambda lib, x: x.clamp(min=0),
    "clip": lambda lib, x: x.clip(-1, 1), "floor": lambda lib, x: x.floor(),
    "round": lambda lib, x: x.round(decimals=1), "sign": lambda lib, x: x.sign(),
    "reciprocal": lambda lib, x: x.reciprocal(), "rsqrt": lambda lib, x: x.abs().rsqrt(),
    "square": lambda lib, x: x.square(), "expm1": lambda lib, x: x.expm1(),
    "log1p": lambda lib, x: x.abs().log1p(), "sin": lambda lib, x: x.sin(),
    "cos": lambda lib, x: x.cos(), "where": lambda lib, x: x.where(x > 0, -x),
    "masked_fill": lambda lib, x: x.masked_fill(x < 0, 0.5),
    "lerp": lambda lib, x: x.lerp(x * 2, 0.3), "maximum": lambda lib, x: x.maximum(x * 0.5),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tensor_methods(name):
    check_op(METHODS[name], [rand(3, 4, low=0.2, high=2) * arr([1, -1, 1, -1])], **F32)


# -- binary ops: broadcasting, dtypes, scalars on either side --------------------------------------

BINARY = {
    "add": (lambda lib, x, y: lib.add(x, y), None),
    "add_alpha": (lambda lib, x, y: lib.add(x, y, alpha=2.5), None),
    "sub": (lambda lib, x, y: lib.sub(x, y), None),
    "sub_alpha": (lambda lib, x, y: x.sub(y, alpha=-2), None),
    "mul": (lambda lib, x, y: lib.mul(x, y), None),
    "div": (lambda lib, x, y: lib.div(x, y), "nonzero"),
    "div_floor": (lambda lib, x, y: lib.div(x, y, rounding_mode="floor"), "nonzero"),
    "div_trunc": (lambda lib, x, y: lib.div(x, y, rounding_mode="trunc"), "nonzero"),
    "remainder": (lambda lib, x, y: lib.remainder(x, y), "nonzero"),
    "fmod": (lambda lib, x, y: lib.fmod(x, y), "nonzero"),
    "pow": (lambda lib, x, y: lib.pow(x, y), "positive"),
    "maximum": (lambda lib, x, y: lib.maximum(x, y), None),
    "minimum": (lambda lib, x, y: lib.minimum(x, y), None),
    "lerp": (lambda lib, x, y: lib.lerp(x, y, 0.3), None),
    "lerp_tensor": (lambda lib, x, y: lib.lerp(x, y, y * 0.5 + 0.5), None),
    "where": (lambda lib, x, y: lib.where(x > y, x, y * 2), None),
    "clamp_tensor": (lambda lib, x, y: lib.clamp(x, min=y, max=y + 1), None),
    "clamp_min_tensor": (lambda lib, x, y: x.clamp(min=y), None),
    "clamp_max_tensor": (lambda lib, x, y: lib.clamp(x, max=y), None),
    "op_add": (lambda lib, x, y: x + y, None),
    "op_sub": (lambda lib, x, y: x - y, None),
    "op_mul": (lambda lib, x, y: x * y, None),
    "op_div": (lambda lib, x, y: x / y, "nonzero"),
    "op_mod": (lambda lib, x, y: x % y, "nonzero"),
    "op_pow": (lambda lib, x, y: x ** y, "positive"),
}


def _binary_inputs(shape_a, shape_b, domain, dtype):
    if domain == "nonzero":
        return [rand(*shape_a, low=-3, high=3, dtype=dtype),
                signed(*shape_b, low=0.5, high=2, seed=1, dtype=dtype)]
    if domain == "positive":
        return [rand(*shape_a, low=0.3, high=2, dtype=dtype),
                rand(*shape_b, low=-2, high=2, seed=1, dtype=dtype)]
    return [rand(*shape_a, dtype=dtype), rand(*shape_b, seed=1, dtype=dtype)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shapes", PAIRS, ids=str)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, shapes, dtype):
    fn, domain = BINARY[name]
    check_op(fn, _binary_inputs(*shapes, domain, dtype), **TOL[dtype])


def test_floor_divide_operator():
    # torch.floor_divide has no backward; its values and div(rounding_mode='floor')'s zero
    # gradients are what kiln gives
    x, y = rand(3, 4), signed(4, low=0.5, high=2, seed=1)
    check_op(lambda lib, a, b: a // b, [x, y], **F32,
             torch_fn=lambda lib, a, b: lib.div(a, b, rounding_mode="floor"))
    check_op(lambda lib, a, b: lib.floor_divide(a, b), [x, y], **F32,
             torch_fn=lambda lib, a, b: lib.div(a, b, rounding_mode="floor"))
    check_op(lambda lib, a: 7 // a, [y], **F32, grad=False)


SCALAR_CASES = [
    lambda lib, x: x + 2, lambda lib, x: 2 + x, lambda lib, x: x - 2.5, lambda lib, x: 2.5 - x,
    lambda lib, x: x * 3, lambda lib, x: 3 * x, lambda lib, x: x / 2, lambda lib, x: 2 / x,
    lambda lib, x: x % 1.5, lambda lib, x: x ** 2, lambda lib, x: 2 ** x,
    lambda lib, x: x + True, lambda lib, x: lib.add(2, x), lambda lib, x: lib.mul(x, 0.5),
    lambda lib, x: lib.sub(x, 1, alpha=2), lambda lib, x: lib.where(x > 0, 1.0, x),
    lambda lib, x: lib.where(x > 0, x, 0), lambda lib, x: lib.clamp(x, 0.5),
    lambda lib, x: lib.remainder(x, -1.5), lambda lib, x: lib.fmod(x, -1.5),
    lambda lib, x: x.div(-0.7, rounding_mode="trunc"), lambda lib, x: lib.lerp(x, x * 3, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", range(len(SCALAR_CASES)))
def test_python_scalars(case, dtype):
    x = signed(2, 3, low=0.3, high=2, dtype=dtype)
    check_op(SCALAR_CASES[case], [x], **TOL[dtype])


def test_scalar_remainder():
    # PyTorch has no derivative for remainder(Scalar, Tensor); kiln's is -g * floor(5 / x)
    x = signed(2, 3, low=0.3, high=2)
    check_op(lambda lib, x: 5 % x, [x], **F32, grad=False)
    check_op(lambda lib, x: 5 % x, [x], **F32,
             torch_fn=lambda lib, x: 5 - x * lib.div(5, x, rounding_mode="floor"))


# -- dtype promotion -------------------------------------------------------------------------------

def ints(*shape, low=-5, high=6, seed=0, dtype=np.int64):
    return np.random.default_rng(seed).integers(low, high, shape).astype(dtype)


def nonzero_ints(*shape, seed=1, dtype=np.int64):
    v = ints(*shape, low=1, high=4, seed=seed, dtype=dtype)
    return v * np.where(np.random.default_rng(seed).random(shape) < 0.5, -1, 1).astype(dtype)


BOOLS = np.array([True, False, True, True])
PROMOTION = [
    ("int/int", lambda lib, a, b: a / b, [ints(2, 3), nonzero_ints(3)]),
    ("int+2.5", lambda lib, a: a + 2.5, [ints(2, 3)]),
    ("int/2", lambda lib, a: a / 2, [ints(4)]),
    ("int*true", lambda lib, a: a * True, [ints(4)]),
    ("f16+f64 0-d", lambda lib, a, b: a + b, [rand(3, dtype=np.float16),
                                                np.array(0.5, np.float64)]),
    ("f16+2.5", lambda lib, a: a + 2.5, [rand(3, dtype=np.float16)]),
    ("i32*i64 0-d", lambda lib, a, b: a * b, [ints(3, dtype=np.int32), np.array(7)]),
    ("i64*f32 0-d", lambda lib, a, b: a * b, [ints(3), np.array(0.5, np.float32)]),
    ("i8+u8", lambda lib, a, b: a + b, [ints(3, dtype=np.int8), ints(3, low=0, dtype=np.uint8)]),
    ("u8*2", lambda lib, a: a * 2, [ints(3, low=0, high=100, dtype=np.uint8)]),
    ("u8-1", lambda lib, a: a - 1, [ints(3, low=0, high=3, dtype=np.uint8)]),
    ("bool+bool", lambda lib, a, b: a + b, [BOOLS, ~BOOLS]),
    ("bool*bool", lambda lib, a, b: a * b, [BOOLS, ~BOOLS]),
    ("bool+int", lambda lib, a, b: a + b, [BOOLS, ints(4)]),
    ("bool*f32", lambda lib, a, b: a * b, [BOOLS, rand(4)]),
    ("int//int", lambda lib, a, b: a // b, [ints(3, 4), nonzero_ints(4)]),
    ("int%int", lambda lib, a, b: a % b, [ints(3, 4), nonzero_ints(4)]),
    ("int fmod", lambda lib, a, b: lib.fmod(a, b), [ints(3, 4), nonzero_ints(4)]),
    ("int trunc", lambda lib, a, b: lib.div(a, b, rounding_mode="trunc"),
     [ints(3, 4), nonzero_ints(4)]),
    ("int floor", lambda lib, a, b: lib.div(a, b, rounding_mode="floor"),
     [ints(3, 4), nonzero_ints(4)]),
    ("5//int", lambda lib, a: 5 // a, [nonzero_ints(4)]),
    ("int**2", lambda lib, a: a ** 2, [ints(4)]),
    ("int**int", lambda lib, a, b: a ** b, [arr([2, -1, -1, 1, 0, 3], np.int64),
                                            arr([-1, -3, -2, -5, 2, 2], np.int64)]),
    ("int**2.5", lambda lib, a: a ** 2.5, [ints(4, low=0)]),
    ("2**int", lambda lib, a: 2 ** a, [ints(4, low=0)]),
    ("2.5**int", lambda lib, a: 2.5 ** a, [ints(4)]),
    ("bool**2", lambda lib, a: a ** 2, [BOOLS]),
    ("exp(i8)", lambda lib, a: lib.exp(a), [ints(4, dtype=np.int8)]),
    ("sqrt(bool)", lambda lib, a: lib.sqrt(a), [BOOLS]),
    ("sigmoid(int)", lambda lib, a: lib.sigmoid(a), [ints(4)]),
    ("tanh(int)", lambda lib, a: a.tanh(), [ints(4)]),
    ("erf(int)", lambda lib, a: lib.erf(a), [ints(4)]),
    ("reciprocal(int)", lambda lib, a: lib.reciprocal(a), [nonzero_ints(4)]),
    ("abs(i8)", lambda lib, a: lib.abs(a), [ints(4, dtype=np.int8)]),
    ("sign(int)", lambda lib, a: lib.sign(a), [ints(5)]),
    ("sign(bool)", lambda lib, a: lib.sign(a), [BOOLS]),
    ("floor(int)", lambda lib, a: lib.floor(a), [ints(4)]),
    ("round(int)", lambda lib, a: lib.round(a), [ints(4)]),
    ("trunc(int)", lambda lib, a: a.trunc(), [ints(4)]),
    ("neg(int)", lambda lib, a: -a, [ints(4)]),
    ("clamp(int, 0.5)", lambda lib, a: lib.clamp(a, min=0.5), [ints(4)]),
    ("clamp(int, f32 0-d)", lambda lib, a, b: lib.clamp(a, min=b),
     [ints(4), np.array(0.5, np.float32)]),
    ("clamp(int, 0, 3)", lambda lib, a: lib.clamp(a, 0, 3), [ints(5)]),
    ("clamp(bool, 0, 1)", lambda lib, a: lib.clamp(a, 0, 1), [BOOLS]),
    ("relu(int)", lambda lib, a: lib.relu(a), [ints(5)]),
    ("hardtanh(int)", lambda lib, a: nnf(lib).hardtanh(a), [ints(5)]),
    ("relu6(int)", lambda lib, a: nnf(lib).relu6(a), [ints(5, high=9)]),
    ("maximum(int, f32)", lambda lib, a, b: lib.maximum(a, b), [ints(4), rand(4)]),
    ("maximum(bool, bool)", lambda lib, a, b: lib.maximum(a, b), [BOOLS, ~BOOLS]),
    ("minimum(int, int)", lambda lib, a, b: lib.minimum(a, b), [ints(3, 4), ints(4, seed=2)]),
    ("where(int, 2.5)", lambda lib, a: lib.where(a > 0, a, 2.5), [ints(5)]),
    ("where(1, 2)", lambda lib, a: lib.where(a > 0, 1, 2), [ints(5)]),
    ("where(1, 2.5)", lambda lib, a: lib.where(a > 0, 1, 2.5), [ints(5)]),
    ("where(0-d f64, f16)", lambda lib, a, b, c: lib.where(a > 0, b, c),
     [ints(3), np.array(1.5), rand(3, dtype=np.float16)]),
    ("masked_fill(int, 2.5)", lambda lib, a: a.masked_fill(a > 0, 2.5), [ints(5)]),
    ("masked_fill(f32, int 0-d)", lambda lib, a, v: a.masked_fill(a > 0, v),
     [rand(5), np.array(3)]),
    ("square(int)", lambda lib, a: lib.square(a), [ints(4)]),
    ("u8/-3", lambda lib, a: a / -3, [ints(3, low=0, high=255, dtype=np.uint8)]),
    ("i16 0-d / u8", lambda lib, a, b: a / b, [np.array(-4, np.int16),
                                              ints(3, low=1, high=9, dtype=np.uint8)]),
    ("u8+300 wraps", lambda lib, a: a + 300, [ints(3, low=0, high=255, dtype=np.uint8)]),
    ("i8*1000 wraps", lambda lib, a: a * 1000, [ints(3, dtype=np.int8)]),
    ("u8<-3", lambda lib, a: (a < -3, a == -6, a + (-3)),
     [np.array([1, 250], np.uint8)]),
    ("u8 clamp -3", lambda lib, a: a.clamp(min=-3), [np.array([1, 250], np.uint8)]),
    ("int +=", lambda lib, a: _iadd(a, 3), [ints(4)]),
]


def _iadd(a, v):
    a += v
    return a


@pytest.mark.parametrize("case", PROMOTION, ids=[c[0] for c in PROMOTION])
def test_dtype_promotion(case):
    _, fn, inputs = case
    check_op(fn, inputs, atol=1e-6, rtol=1e-5, grad=False)


@pytest.mark.parametrize("pair", [(np.float32, np.float64), (np.float16, np.float32),
                                  (np.float64, np.float16)], ids=str)
def test_mixed_float_gradients(pair):
    # the cast inserted by promotion passes the gradient back in each input's own dtype
    a, b = rand(2, 3, dtype=pair[0]), rand(3, seed=1, dtype=pair[1])
    check_op(lambda lib, x, y: x * y + x, [a, b], atol=1e-3, rtol=1e-3)
    check_op(lambda lib, x, y: x * y, [a, np.array(1.5, pair[1])], atol=1e-3, rtol=1e-3)


# -- comparisons and logic -------------------------------------------------------------------------

def small_ints_as(dtype, *shape, seed=0):
    return ints(*shape, low=-2, high=3, seed=seed).astype(dtype)


@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge", "greater", "less_equal",
                                "not_equal"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((), (2, 2)),
                                    ((0, 2), (2,))], ids=str)
def test_comparisons(op, shapes):
    a = small_ints_as(np.float32, *shapes[0])
    b = small_ints_as(np.float32, *shapes[1], seed=1)
    check_op(lambda lib, x, y: getattr(lib, op)(x, y), [a, b], atol=0, rtol=0, grad=False)
    check_op(lambda lib, x, y: getattr(x, op)(y), [a, b.astype(np.int64)], atol=0, rtol=0,
             grad=False)


COMPARE_OPS = [
    lambda lib, x, y: x == y, lambda lib, x, y: x != y, lambda lib, x, y: x < y,
    lambda lib, x, y: x <= y, lambda lib, x, y: x > y, lambda lib, x, y: x >= y,
    lambda lib, x, y: x == 1, lambda lib, x, y: 1 < x, lambda lib, x, y: 0.5 >= y,
    lambda lib, x, y: y == 1.5, lambda lib, x, y: x.eq(y) | (x > 0),
]


@pytest.mark.parametrize("case", range(len(COMPARE_OPS)))
def test_comparison_operators(case):
    a = small_ints_as(np.int64, 3, 4)
    b = small_ints_as(np.float32, 4, seed=1) + arr([0, 0.5, 0, 0])
    check_op(COMPARE_OPS[case], [a, b], atol=0, rtol=0, grad=False)


def test_eq_with_other_objects():
    for lib in (kiln, torch):
        t = lib.tensor([1, 2])
        assert (t == None) is False
        assert (t != None) is True
        assert (t == "a") is False
    # tensors stay hashable with __eq__ overridden
    t = kiln.tensor([1.0])
    assert {t: 1}[t] == 1


def test_softplus_large_threshold_is_stable():
    # PyTorch computes log1p(exp(800)) = inf when the threshold is not crossed; kiln's
    # log-add-exp gives the finite limit
    x = kiln.tensor([-800.0, 0.0, 800.0], dtype=kiln.float64, requires_grad=True)
    y = kiln.softplus(x, threshold=1000.0)
    y.sum().backward()
    assert y.tolist() == [0.0, math.log(2.0), 800.0]
    assert x.grad.tolist() == [0.0, 0.5, 1.0]


LOGIC = [
    ("logical_not", lambda lib, a, b: lib.logical_not(a)),
    ("logical_and", lambda lib, a, b: lib.logical_and(a, b)),
    ("logical_or", lambda lib, a, b: a.logical_or(b)),
    ("logical_xor", lambda lib, a, b: lib.logical_xor(a, b)),
]


@pytest.mark.parametrize("dtypes", [(np.bool_, np.bool_), (np.float32, np.int64),
                                    (np.int32, np.bool_)], ids=str)
@pytest.mark.parametrize("case", LOGIC, ids=[c[0] for c in LOGIC])
def test_logical(case, dtypes):
    a = ints(3, 4, low=0, high=2).astype(dtypes[0])
    b = ints(4, low=-1, high=2, seed=1).astype(dtypes[1])
    check_op(case[1], [a, b], atol=0, rtol=0, grad=False)


BITWISE = [
    ("and", lambda lib, a, b: a & b), ("or", lambda lib, a, b: a | b),
    ("xor", lambda lib, a, b: a ^ b), ("not", lambda lib, a, b: ~a),
    ("and_fn", lambda lib, a, b: lib.bitwise_and(a, b)),
    ("or_fn", lambda lib, a, b: lib.bitwise_or(a, b)),
    ("xor_fn", lambda lib, a, b: lib.bitwise_xor(a, b)),
    ("not_fn", lambda lib, a, b: lib.bitwise_not(a)),
    ("and_scalar", lambda lib, a, b: a & 6), ("ror_scalar", lambda lib, a, b: 5 | a),
    ("xor_true", lambda lib, a, b: a ^ True),
]


@pytest.mark.parametrize("dtypes", [(np.bool_, np.bool_), (np.int64, np.int64),
                                    (np.int32, np.bool_), (np.uint8, np.int8)], ids=str)
@pytest.mark.parametrize("case", BITWISE, ids=[c[0] for c in BITWISE])
def test_bitwise(case, dtypes):
    a = ints(3, 4, low=0, high=8).astype(dtypes[0])
    b = ints(4, low=0, high=8, seed=1).astype(dtypes[1])
    check_op(case[1], [a, b], atol=0, rtol=0, grad=False)


SPECIAL = arr([0.0, -1.5, np.nan, np.inf, -np.inf, 3.0, -0.0])


@pytest.mark.parametrize("op", ["isnan", "isinf", "isfinite"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64, np.bool_],
                         ids=str)
def test_nan_inf_predicates(op, dtype):
    x = SPECIAL.astype(dtype) if np.dtype(dtype).kind == "f" else np.array([0, 1, 1], dtype)
    check_op(lambda lib, a: getattr(lib, op)(a), [x], atol=0, rtol=0, grad=False)
    check_op(lambda lib, a: getattr(a, op)(), [x.reshape(-1, 1)[:0]], atol=0, rtol=0, grad=False)


def test_equal():
    cases = [([1, 2], [1.0, 2.0]), ([1.0, 2.0], [1.0, 2.5]), ([1, 2], [1, 2, 3]),
             ([[1, 2]], [1, 2]), ([np.nan], [np.nan]), ([], []), (3.0, 3.0), ([True], [1])]
    for a, b in cases:
        expected = torch.equal(torch.tensor(a), torch.tensor(b))
        assert kiln.equal(kiln.tensor(a), kiln.tensor(b)) is expected, (a, b)
        assert kiln.tensor(a).equal(kiln.tensor(b)) is expected


ISCLOSE = [
    ({}, arr([1.0, 2.0, np.inf, np.nan, 1e-9, -np.inf, 100.0]),
     arr([1.0 + 1e-6, 2.1, np.inf, np.nan, 0.0, np.inf, 100.001])),
    ({"equal_nan": True}, arr([np.nan, 1.0]), arr([np.nan, np.nan])),
    ({"rtol": 0.0, "atol": 0.0}, arr([1.0, 2.0]), arr([1.0, 2.0 + 1e-6])),
    ({"rtol": 0.1, "atol": 0.5}, arr([1.0, 2.0, 10.0]), arr([1.4, 3.0, 11.0])),
    ({"atol": 2}, np.array([1, 5, -3]), np.array([1, 8, -1])),
    ({"rtol": 0.5}, np.array([1, 5, -3]), np.array([2, 8, -1])),
    ({}, np.array([True, False]), np.array([True, True])),
    ({"rtol": 1e-10, "atol": 1e-12}, np.array([1.0, 1.0 + 1e-11]), np.array([1.0, 1.0])),
]


@pytest.mark.parametrize("case", range(len(ISCLOSE)))
def test_isclose_allclose(case):
    kw, a, b = ISCLOSE[case]
    check_op(lambda lib, x, y: lib.isclose(x, y, **kw), [a, b], atol=0, rtol=0, grad=False)
    check_op(lambda lib, x, y: x.isclose(y[None], **kw), [a, b], atol=0, rtol=0, grad=False)
    for x, y in [(a, b), (a, a)]:
        expected = torch.allclose(torch.tensor(x), torch.tensor(y), **kw)
        assert kiln.allclose(kiln.tensor(x), kiln.tensor(y), **kw) is expected


# -- exact values and kinks ------------------------------------------------------------------------

KINKS = [
    ("relu at 0", lambda lib, x: lib.relu(x), [arr([-1.0, 0.0, 1.0, -0.0, 0.0])]),
    ("abs at 0", lambda lib, x: lib.abs(x), [arr([-1.0, 0.0, 2.0, -0.0])]),
    ("sign at 0 and nan", lambda lib, x: lib.sign(x), [arr([-1.0, 0.0, 2.0, np.nan, -np.inf])]),
    ("sqrt at 0", lambda lib, x: lib.sqrt(x), [arr([0.0, 1.0, 4.0])]),
    ("rsqrt at 0", lambda lib, x: lib.rsqrt(x), [arr([0.0, 1.0, 4.0])]),
    ("log at 0", lambda lib, x: lib.log(x), [arr([0.0, 1.0, 4.0])]),
    ("reciprocal at 0", lambda lib, x: lib.reciprocal(x), [arr([0.0, 1.0, -4.0])]),
    ("maximum ties", lambda lib, x, y: lib.maximum(x, y),
     [arr([1.0, 2.0, 3.0, np.nan, 1.0]), arr([1.0, 1.0, 4.0, 1.0, np.nan])]),
    ("minimum ties", lambda lib, x, y: lib.minimum(x, y),
     [arr([1.0, 2.0, 3.0, np.nan, 1.0]), arr([1.0, 1.0, 4.0, 1.0, np.nan])]),
    ("maximum ties broadcast", lambda lib, x, y: lib.maximum(x, y),
     [arr([[1.0, 2.0], [0.0, 3.0]]), arr([1.0, 3.0])]),
    ("clamp scalar bounds", lambda lib, x: lib.clamp(x, 1, 3),
     [arr([0.0, 1.0, 2.0, 3.0, 5.0, np.nan])]),
    ("clamp min>max", lambda lib, x: lib.clamp(x, 3, 1), [arr([0.0, 1.0, 2.0, 3.0, 5.0])]),
    ("clamp min only", lambda lib, x: lib.clamp(x, min=1), [arr([0.0, 1.0, 2.0, np.nan])]),
    ("clamp max only", lambda lib, x: lib.clamp(x, max=1), [arr([0.0, 1.0, 2.0, np.nan])]),
    ("clamp tensors", lambda lib, x, lo, hi: lib.clamp(x, lo, hi),
     [arr([0.0, 1.0, 2.0, 3.0, 5.0]), arr([1.0] * 5), arr([3.0] * 5)]),
    ("clamp tensors min>max", lambda lib, x, lo, hi: lib.clamp(x, lo, hi),
     [arr([0.0, 1.0, 2.0, 3.0, 5.0]), arr([3.0] * 5), arr([1.0] * 5)]),
    ("clamp tensors min==max", lambda lib, x, lo, hi: lib.clamp(x, lo, hi),
     [arr([0.0, 2.0, 3.0, 5.0]), arr([3.0] * 4), arr([3.0] * 4)]),
    ("clamp nan bound", lambda lib, x, lo: lib.clamp(x, min=lo),
     [arr([0.0, 1.0, 2.0, 1.0, np.nan]), arr([1.0, 1.0, 1.0, np.nan, 1.0])]),
    ("clamp max tensor", lambda lib, x, hi: lib.clamp(x, max=hi),
     [arr([0.0, 1.0, 2.0]), arr([1.0, 1.0, 1.0])]),
    ("clamp broadcast bound", lambda lib, x, lo: lib.clamp(x, min=lo),
     [arr([[0.0, 1.0, 2.0], [3.0, 1.0, -1.0]]), arr([1.0, 1.0, 2.5])]),
    ("hardtanh bounds", lambda lib, x: nnf(lib).hardtanh(x),
     [arr([-2.0, -1.0, 0.0, 1.0, 2.0, np.nan])]),
    ("relu6 bounds", lambda lib, x: nnf(lib).relu6(x), [arr([-2.0, 0.0, 1.0, 6.0, 7.0])]),
    ("leaky_relu at 0", lambda lib, x: nnf(lib).leaky_relu(x, 0.1), [arr([-2.0, 0.0, 1.0])]),
    ("leaky_relu negative slope", lambda lib, x: nnf(lib).leaky_relu(x, -0.5),
     [arr([-2.0, 0.0, 1.0])]),
    ("leaky_relu slope above 1", lambda lib, x: nnf(lib).leaky_relu(x, 3.0),
     [arr([-2.0, 0.0, 1.0, np.nan])]),
    ("elu at 0", lambda lib, x: nnf(lib).elu(x), [arr([-2.0, 0.0, 1.0, -1e-6])]),
    ("elu alpha at 0", lambda lib, x: nnf(lib).elu(x, 2.0), [arr([-2.0, 0.0, 1.0])]),
    ("softplus threshold", lambda lib, x: nnf(lib).softplus(x, beta=2, threshold=5),
     [arr([-2.0, 0.0, 2.5, 2.6, 100.0])]),
    ("pow base 0", lambda lib, x: x ** 2, [arr([0.0, -0.0, 1.0])]),
    ("pow base 0 half", lambda lib, x: x ** 0.5, [arr([0.0, 1.0])]),
    ("pow exponent 0", lambda lib, x: x ** 0, [arr([0.0, 1.0, -2.0])]),
    ("pow exponent -1", lambda lib, x: x ** -1.0, [arr([0.0, 1.0, -2.0])]),
    ("pow exponent 1", lambda lib, x: x ** 1, [arr([0.0, 1.0, -2.0])]),
    ("pow tensor base 0", lambda lib, x, y: x ** y,
     [arr([0.0, 0.0, 0.0, 2.0, -2.0, 0.0]), arr([2.0, 0.0, -1.0, 0.5, 0.5, 0.5])]),
    ("rpow base 0", lambda lib, y: 0.0 ** y, [arr([2.0, 0.0, -1.0])]),
    ("rpow base 2", lambda lib, y: 2.0 ** y, [arr([2.0, 0.0, -1.0])]),
    ("pow negative base", lambda lib, x: x ** (1 / 3), [arr([-8.0, 8.0])]),
    ("where ties", lambda lib, x, y: lib.where(x >= y, x, y),
     [arr([1.0, 2.0, 3.0]), arr([1.0, 3.0, 2.0])]),
    ("round half even", lambda lib, x: lib.round(x), [arr([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])]),
    ("round decimals", lambda lib, x: lib.round(x, decimals=1),
     [arr([0.25, 0.35, 1.2345, -2.55, 125.0])]),
    ("floor ceil trunc", lambda lib, x: (lib.floor(x), lib.ceil(x), lib.trunc(x)),
     [arr([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, np.inf])]),
    ("remainder signs", lambda lib, x, y: lib.remainder(x, y),
     [arr([-3.0, 3.0, -3.0, 3.0, 0.0]), arr([2.0, 2.0, -2.0, -2.0, 2.0])]),
    ("fmod signs", lambda lib, x, y: lib.fmod(x, y),
     [arr([-3.0, 3.0, -3.0, 3.0]), arr([2.0, 2.0, -2.0, -2.0])]),
    ("float division by 0", lambda lib, x, y: (x / y, x // y, lib.remainder(x, y)),
     [arr([1.0, -1.0, 0.0]), arr([0.0, 0.0, 0.0])]),
    ("lerp weights", lambda lib, x, y, w: lib.lerp(x, y, w),
     [arr([1.0, 2.0, 3.0]), arr([3.0, 5.0, -1.0]), arr([0.2, 0.7, 1.0])]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", KINKS, ids=[c[0] for c in KINKS])
def test_kinks_and_exact_values(case, dtype):
    _, fn, inputs = case
    inputs = [x.astype(dtype) for x in inputs]
    torch_fn = None
    if case[0] == "float division by 0":
        torch_fn = lambda lib, x, y: (x / y, lib.div(x, y, rounding_mode="floor"),
                                      lib.remainder(x, y))
    check_op(fn, inputs, **TOL[dtype], torch_fn=torch_fn)


LARGE = arr([-800.0, -100.0, -30.0, -21.0, -1e-8, 0.0, 1e-8, 2.5, 30.0, 100.0, 800.0])
STABLE = {
    "sigmoid": lambda lib, x: lib.sigmoid(x),
    "tanh": lambda lib, x: lib.tanh(x),
    "logsigmoid": lambda lib, x: nnf(lib).logsigmoid(x),
    "softplus": lambda lib, x: nnf(lib).softplus(x),
    "gelu": lambda lib, x: nnf(lib).gelu(x),
    "gelu_tanh": lambda lib, x: nnf(lib).gelu(x, approximate="tanh"),
    "silu": lambda lib, x: nnf(lib).silu(x),
    "elu": lambda lib, x: nnf(lib).elu(x),
    "erf": lambda lib, x: lib.erf(x),
    "exp": lambda lib, x: lib.exp(x),
    "expm1": lambda lib, x: lib.expm1(x),
    "log1p": lambda lib, x: lib.log1p(x.abs()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(STABLE))
def test_large_inputs_stay_finite(name, dtype):
    """Activations at large |x|: no spurious NaN or inf in values or gradients."""
    out = check_op(STABLE[name], [LARGE.astype(dtype)], **TOL[dtype])[0]
    if name not in ("exp",):
        assert not np.isnan(out.detach().numpy()).any()


BIG = {
    "erf": lambda lib, x: lib.erf(x),
    "gelu": lambda lib, x: nnf(lib).gelu(x),
    "sigmoid": lambda lib, x: lib.sigmoid(x),
    "softplus": lambda lib, x: nnf(lib).softplus(x, beta=2.0, threshold=4.0),
    "logsigmoid": lambda lib, x: nnf(lib).logsigmoid(x),
    "elu": lambda lib, x: nnf(lib).elu(x),
    "leaky_relu": lambda lib, x: nnf(lib).leaky_relu(x),
    "clamp": lambda lib, x: lib.clamp(x, -1.0, 1.5),
    "sign": lambda lib, x: lib.sign(x),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(BIG))
def test_large_arrays(name, dtype):
    """Sizes past the small-array and chunking thresholds of the kernels (erf's in particular)."""
    x = rand(130, 131, low=-5, high=5, dtype=dtype)
    # PyTorch's float32 gelu(inf) is NaN (its float64 one, and kiln's, are inf)
    x[0, :4] = [np.nan, 50.0 if name == "gelu" else np.inf, -np.inf, 0.0]
    torch_fn = None
    if name == "gelu" and dtype == np.float32:
        # PyTorch's float32 gelu uses a cruder erf than torch.erf (errors up to 1e-6 near
        # x = -3.5, where 1 + erf cancels); compare with its float64 result instead
        torch_fn = lambda lib, x: TF.gelu(x.double()).float()
    check_op(BIG[name], [x], **TOL[dtype], torch_fn=torch_fn)


F16 = {
    "exp": lambda lib, x: lib.exp(x), "sigmoid": lambda lib, x: lib.sigmoid(x),
    "tanh": lambda lib, x: lib.tanh(x), "erf": lambda lib, x: lib.erf(x),
    "relu": lambda lib, x: lib.relu(x), "gelu": lambda lib, x: nnf(lib).gelu(x),
    "silu": lambda lib, x: nnf(lib).silu(x), "clamp": lambda lib, x: x.clamp(-0.5, 0.5),
    "mul": lambda lib, x: x * x + 1, "pow": lambda lib, x: x ** 2,
}


@pytest.mark.parametrize("size", [5, 100], ids=str)
@pytest.mark.parametrize("name", sorted(F16))
def test_float16(name, size):
    check_op(F16[name], [rand(size, dtype=np.float16)], atol=2e-3, rtol=2e-3)


# -- erf: accuracy and speed -----------------------------------------------------------------------

def test_erf_accuracy():
    grid = np.concatenate([np.linspace(-7, 7, 200001), np.logspace(-300, 1, 2000),
                           -np.logspace(-300, 1, 2000), [0.0, -0.0, 1.0, -1.0, 6.0, 1e300]])
    for dtype, rtol, tiny in [(np.float32, 1e-6, 1e-37), (np.float64, 1e-12, 1e-300)]:
        with np.errstate(over="ignore"):  # 1e300 becomes inf in float32
            x = grid.astype(dtype)
        got = kiln.erf(kiln.tensor(x)).numpy().astype(np.float64)
        want = torch.erf(torch.tensor(x)).numpy().astype(np.float64)
        ok = np.abs(got - want) <= rtol * np.abs(want) + tiny
        assert ok.all(), (dtype, x[~ok][:5], got[~ok][:5], want[~ok][:5])
    special = kiln.erf(kiln.tensor([np.inf, -np.inf, np.nan])).numpy()
    assert special[0] == 1 and special[1] == -1 and np.isnan(special[2])


# -- where, masked_fill ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 1), (1, 4), (4,)),
                                    ((4,), (3, 4), ()), ((), (2, 3), (2, 3)),
                                    ((0, 2), (2,), (1, 2))], ids=str)
def test_where(shapes, dtype):
    c = np.asarray(rand(*shapes[0], seed=5) > 0)
    x, y = rand(*shapes[1], dtype=dtype), rand(*shapes[2], seed=1, dtype=dtype)
    check_op(lambda lib, c, x, y: lib.where(c, x, y), [c, x, y], **TOL[dtype])
    check_op(lambda lib, c, x, y: x.where(c, y), [c, x, y], **TOL[dtype])


def test_where_single_argument():
    c = np.array([[True, False, True], [False, False, True]])
    k = kiln.where(kiln.tensor(c))
    t = torch.where(torch.tensor(c))
    assert len(k) == len(t)
    for a, b in zip(k, t):
        assert a.dtype == kiln.int64 and a.tolist() == b.tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), (3, 1)),
                                    ((4,), (3, 4)), ((), ()), ((0, 3), (3,))], ids=str)
def test_masked_fill(shapes, dtype):
    x = rand(*shapes[0], dtype=dtype)
    m = np.asarray(rand(*shapes[1], seed=3) > 0)
    check_op(lambda lib, x, m: lib.masked_fill(x, m, -1.5), [x, m], **TOL[dtype])
    check_op(lambda lib, x, m, v: x.masked_fill(m, v), [x, m, np.array(2.5, dtype)],
             **TOL[dtype])
    # a value of another dtype is cast to the input's, and still gets its gradient
    check_op(lambda lib, x, m, v: x.masked_fill(m, v), [x, m, np.array(0.25, np.float64)],
             **TOL[dtype])


# -- in-place ops ----------------------------------------------------------------------------------

def _chain(*ops):
    """``x * 1`` (a non-leaf) modified by the in-place ops, each ``op(lib, y, *others)``."""
    def fn(lib, x, *others):
        y = x * 1
        for op in ops:
            out = op(lib, y, *others)
            assert out is y
        return y

    return fn


MASK = np.array([True, False, True, False])
INPLACE = [
    ("add_", _chain(lambda lib, y, o: y.add_(o)), 1),
    ("add_ alpha", _chain(lambda lib, y, o: y.add_(o, alpha=-2)), 1),
    ("add_ scalar", _chain(lambda lib, y: y.add_(2.5)), 0),
    ("sub_", _chain(lambda lib, y, o: y.sub_(o)), 1),
    ("mul_", _chain(lambda lib, y, o: y.mul_(o)), 1),
    ("mul_ twice", _chain(lambda lib, y, o: y.mul_(o), lambda lib, y, o: y.mul_(o)), 1),
    ("div_", _chain(lambda lib, y, o: y.div_(o)), 1),
    ("div_ floor", _chain(lambda lib, y, o: y.div_(o, rounding_mode="floor")), 1),
    ("pow_ scalar", _chain(lambda lib, y: y.pow_(2)), 0),
    ("pow_ tensor", _chain(lambda lib, y, o: y.abs_().pow_(o)), 1),
    ("remainder_", _chain(lambda lib, y, o: y.remainder_(o)), 1),
    ("clamp_", _chain(lambda lib, y: y.clamp_(min=-0.5, max=0.5)), 0),
    ("clamp_ tensor", _chain(lambda lib, y, o: y.clamp_(min=o)), 1),
    ("clip_", _chain(lambda lib, y: y.clip_(max=0.3)), 0),
    ("relu_", _chain(lambda lib, y: y.relu_()), 0),
    ("relu_ fn", _chain(lambda lib, y: lib.relu_(y)), 0),
    ("sigmoid_", _chain(lambda lib, y: y.sigmoid_()), 0),
    ("tanh_", _chain(lambda lib, y: y.tanh_()), 0),
    ("exp_", _chain(lambda lib, y: y.exp_()), 0),
    ("add_ then exp_", _chain(lambda lib, y: y.add_(-1), lambda lib, y: y.exp_()), 0),
    ("neg_", _chain(lambda lib, y: y.neg_()), 0),
    ("abs_", _chain(lambda lib, y: y.abs_()), 0),
    ("abs_ log_ exp_", _chain(lambda lib, y: y.abs_(), lambda lib, y: y.log_(),
                              lambda lib, y: y.exp_()), 0),
    ("sqrt_", _chain(lambda lib, y: y.abs_(), lambda lib, y: y.sqrt_()), 0),
    ("sin_ cos_", _chain(lambda lib, y: y.sin_(), lambda lib, y: y.cos_()), 0),
    ("floor_ sign_", _chain(lambda lib, y: y.floor_(), lambda lib, y: y.sign_()), 0),
    ("reciprocal_", _chain(lambda lib, y: y.reciprocal_()), 0),
    ("masked_fill_", _chain(lambda lib, y: y.masked_fill_(lib.tensor(MASK), 2.0)), 0),
    ("masked_fill_ value", _chain(lambda lib, y, v: y.masked_fill_(lib.tensor(MASK), v)), 1),
    ("zero_", _chain(lambda lib, y: y.zero_()), 0),
    ("fill_", _chain(lambda lib, y: y.fill_(2.5)), 0),
    ("fill_ tensor", _chain(lambda lib, y, v: y.fill_(v)), 1),
    ("copy_", _chain(lambda lib, y, o: y.copy_(o)), 1),
    ("copy_ then add_", _chain(lambda lib, y, o: y.copy_(o), lambda lib, y, o: y.add_(o)), 1),
    ("lerp_", _chain(lambda lib, y, o: y.lerp_(o, 0.25)), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", INPLACE, ids=[c[0] for c in INPLACE])
def test_inplace(case, dtype):
    name, fn, n_other = case
    x = signed(3, 4, low=0.2, high=2, dtype=dtype)
    others = []
    if n_other:
        if name.startswith(("masked_fill_", "fill_")):
            others = [np.array(1.25, dtype)]
        elif name.startswith(("div_", "remainder_")):
            others = [signed(4, low=0.5, high=2, seed=1, dtype=dtype)]
        else:
            others = [rand(4, seed=1, dtype=dtype)]
    check_op(fn, [x] + others, **TOL[dtype])


def test_copy_broadcast_and_cast():
    # src broadcast to self's shape and cast to self's dtype; the gradient goes to src only
    x, src = rand(2, 3), rand(3, seed=1, dtype=np.float64)
    check_op(lambda lib, x, s: (x * 1).copy_(s), [x, src], atol=1e-6, rtol=1e-5)
    check_op(lambda lib, s: lib.zeros(2, 3).copy_(s), [src], atol=1e-6, rtol=1e-5)
    check_op(lambda lib, s: lib.zeros(3, dtype=lib.int64).copy_(s * 3), [src], atol=0, rtol=0,
             grad=False)
    check_op(lambda lib, s: lib.zeros(3).copy_(s > 0), [src], atol=0, rtol=0, grad=False)


def test_inplace_into_plain_tensor_with_grad_operand():
    # a tensor without grad updated in place by one that has it joins the graph
    w = rand(4)
    check_op(lambda lib, w: lib.ones(4).mul_(w), [w], **F32)
    check_op(lambda lib, w: lib.ones(4).add_(w).mul_(w), [w], **F32)
    check_op(lambda lib, w: lib.ones(4).pow_(w), [w], **F32)
    check_op(lambda lib, v: lib.zeros(4).masked_fill_(lib.tensor(MASK), v),
             [np.array(1.5, np.float32)], **F32)
    check_op(lambda lib, v: lib.ones(4).fill_(v), [np.array(1.5, np.float32)], **F32)
    check_op(lambda lib, w: lib.ones(4).clamp_(min=w), [w], **F32)


def _augmented_float(lib, x, y):
    z = x * 1
    z += y
    z *= y
    z -= 0.5
    z /= 2
    z **= 2
    z %= 1.5
    return z


def _augmented_int(lib, a):
    z = a * 1
    z += 3
    z //= 2
    z %= 5
    z **= 2
    z &= 6
    z |= 1
    z ^= 3
    z *= -1
    return z


def test_augmented_assignment():
    check_op(_augmented_float, [rand(3, 4), rand(4, seed=1)], **F32)
    check_op(_augmented_float, [rand(3, 4, dtype=np.float64), rand(4, seed=1, dtype=np.float64)],
             **F64)
    check_op(_augmented_int, [ints(3, 4)], atol=0, rtol=0, grad=False)

    def bool_ops(lib, a, b):
        z = a & True
        z |= b
        z ^= a
        z &= b
        return z

    check_op(bool_ops, [BOOLS, ~BOOLS], atol=0, rtol=0, grad=False)
    # augmented assignment works in place (same object, version bumped)
    x = kiln.ones(3)
    before, ident = x._version_counter, id(x)
    x += 1
    x **= 2
    assert id(x) == ident and x._version_counter == before + 2 and x.tolist() == [4.0] * 3


def test_inplace_autograd_errors():
    def modified_output(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x.exp()
        y.add_(1)
        y.sum().backward()

    check_exception(modified_output, match="modified by an inplace operation")

    def modified_input(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x * 1
        z = y * y
        y.mul_(2)
        z.sum().backward()

    check_exception(modified_input, match="modified by an inplace operation")

    def saved_result_modified(lib):  # exp_ and sqrt_ save their result, which mul_ overwrites
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x * 1
        y.exp_().mul_(2)
        y.sum().backward()

    check_exception(saved_result_modified, match="modified by an inplace operation")

    def saved_result_modified_twice(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x * 1
        y.sqrt_().log_()
        y.sum().backward()

    check_exception(saved_result_modified_twice, match="modified by an inplace operation")
    check_exception(lambda lib: lib.tensor([1.0], requires_grad=True).add_(1), match="leaf")
    check_exception(lambda lib: lib.tensor([1.0], requires_grad=True).relu_(), match="leaf")
    check_exception(lambda lib: lib.tensor([1.0], requires_grad=True).copy_(lib.ones(1)),
                    match="leaf")
    check_exception(lambda lib: lib.tensor([1.0], requires_grad=True).zero_(), match="leaf")
    check_exception(lambda lib: lib.tensor([1.0], requires_grad=True)
                    .masked_fill_(lib.tensor([True]), 0.0), match="leaf")


def test_inplace_allowed_cases():
    for lib in (kiln, torch):
        # y = x * 1; y.add_(1): fine, gradient 1
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x * 1
        y.add_(1)
        y.sum().backward()
        assert x.grad.tolist() == [1.0, 1.0]
        # pow's VJP for the base does not read its output, so modifying it is fine
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        y = x ** 2
        y.add_(1)
        y.sum().backward()
        assert x.grad.tolist() == [2.0, 4.0]
        # a leaf under no_grad (an optimizer step)
        w = lib.tensor([1.0, 2.0], requires_grad=True)
        with lib.no_grad():
            w.sub_(0.5)
            w.mul_(2).clamp_(max=2.5)
        assert w.tolist() == [1.0, 2.5] and w.requires_grad and w.is_leaf
        w.grad = lib.ones(2)
        w.grad.zero_()
        assert w.grad.tolist() == [0.0, 0.0]


INPLACE_ERRORS = [
    ("int add_ float", lambda lib: lib.tensor([1, 2]).add_(1.5), "add_"),
    ("int div_", lambda lib: lib.tensor([1, 2]).div_(2), "div_"),
    ("int exp_", lambda lib: lib.tensor([1, 2]).exp_(), "exp_"),
    ("int sigmoid_", lambda lib: lib.tensor([1, 2]).sigmoid_(), "sigmoid_"),
    ("int clamp_ float", lambda lib: lib.tensor([1, 5]).clamp_(min=0.5), "clamp_"),
    ("int pow_ float", lambda lib: lib.tensor([1, 5]).pow_(0.5), "pow_"),
    ("bool neg_", lambda lib: lib.tensor([True]).neg_(), "Negation"),
    ("shape add_", lambda lib: lib.zeros(3).add_(lib.ones(2, 3)), r"shape \[3\].*\[2, 3\]"),
    ("shape copy_", lambda lib: lib.zeros(2).copy_(lib.ones(3)),
     r"size of tensor a \(2\) must match the size of tensor b \(3\)"),
    ("masked_fill_ mask bigger", lambda lib: lib.zeros(2).masked_fill_(
        lib.tensor([[True], [False]]), 1.0), r"shape \[2\].*\[2, 2\]"),
    ("masked_fill_ non-bool mask", lambda lib: lib.zeros(2).masked_fill_(lib.tensor([1, 0]), 1.0),
     "masked_fill_ only supports boolean masks"),
    ("fill_ 1-d", lambda lib: lib.zeros(2).fill_(lib.ones(2)), "fill_ only supports 0-dim"),
    ("int //= 0", lambda lib: lib.tensor([1, 2]).__ifloordiv__(0), "ZeroDivisionError"),
]


@pytest.mark.parametrize("case", INPLACE_ERRORS, ids=[c[0] for c in INPLACE_ERRORS])
def test_inplace_exceptions(case):
    check_exception(case[1], match=case[2])


def test_inplace_integer_and_no_grad_values():
    check_op(lambda lib, a: (a * 1).pow_(2), [ints(4)], atol=0, rtol=0, grad=False)
    check_op(lambda lib, a: (a * 1).relu_().neg_().abs_(), [ints(4)], atol=0, rtol=0, grad=False)
    check_op(lambda lib, a: (a * 1).masked_fill_(a > 0, 2.7), [ints(4)], atol=0, rtol=0,
             grad=False)
    check_op(lambda lib, a: (a * 1).fill_(2.7), [ints(4)], atol=0, rtol=0, grad=False)
    check_op(lambda lib, a: (a * 1).clamp_(-1, 2), [ints(4)], atol=0, rtol=0, grad=False)
    check_op(lambda lib, a: (a * 1).floor_().round_(), [ints(4)], atol=0, rtol=0, grad=False)


# -- errors ----------------------------------------------------------------------------------------

ERRORS = [
    ("add shapes", lambda lib: lib.ones(2, 3) + lib.ones(2, 4),
     (r"^add: The size of tensor a \(3\) must match the size of tensor b \(4\) at "
      r"non-singleton dimension 1")),
    ("mul shapes 3d", lambda lib: lib.ones(2, 3, 4) * lib.ones(5, 4),
     (r"mul: The size of tensor a \(3\) must match the size of tensor b \(5\) at "
      r"non-singleton dimension 1")),
    ("sub shapes", lambda lib: lib.sub(lib.ones(5, 4), lib.ones(2, 3, 4)),
     (r"sub: The size of tensor a \(5\) must match the size of tensor b \(3\) at "
      r"non-singleton dimension 1")),
    ("where shapes", lambda lib: lib.where(lib.tensor([True, False]), lib.ones(2), lib.ones(3)),
     r"where: The size of tensor a \(2\) must match the size of tensor b \(3\)"),
    ("clamp shapes", lambda lib: lib.clamp(lib.ones(2), min=lib.ones(3)),
     r"clamp: The size of tensor a \(2\) must match the size of tensor b \(3\)"),
    ("maximum shapes", lambda lib: lib.maximum(lib.ones(2), lib.ones(3)), r"maximum: The size"),
    ("pow shapes", lambda lib: lib.ones(2) ** lib.ones(3), r"pow: The size"),
    ("eq shapes", lambda lib: lib.ones(2) == lib.ones(3), r"eq: The size"),
    ("masked_fill shapes", lambda lib: lib.ones(2).masked_fill(lib.tensor([True] * 3), 1.0),
     r"masked_fill: The size"),
    ("lerp shapes", lambda lib: lib.lerp(lib.ones(2), lib.ones(3), 0.5), r"lerp: The size"),
    ("bool neg", lambda lib: -lib.tensor([True]), "Negation"),
    ("bool sub", lambda lib: lib.tensor([True]) - lib.tensor([False]), "Subtraction"),
    ("bool sub scalar", lambda lib: lib.tensor([True]) - True, "Subtraction"),
    ("bool pos", lambda lib: +lib.tensor([True]), r"`\+` operator"),
    ("bool - int", lambda lib: lib.tensor([True]) - lib.tensor([2]), "with a bool tensor"),
    ("int - True", lambda lib: lib.tensor([2]) - True, "with a bool tensor"),
    ("float sub_ bool", lambda lib: lib.ones(2).sub_(lib.tensor([True, False])),
     "with a bool tensor"),
    ("bool // bool", lambda lib: lib.tensor([True]) // lib.tensor([True]), "div_floor"),
    ("bool % bool", lambda lib: lib.tensor([True]) % lib.tensor([True]), "remainder"),
    ("bool ** bool", lambda lib: lib.tensor([True]) ** lib.tensor([True]), "pow"),
    ("bool pow_ 2", lambda lib: lib.tensor([True]).pow_(2), "can't be cast"),
    ("hardtanh bool", lambda lib: nnf(lib).hardtanh(lib.tensor([True])), "Bool inputs"),
    ("float &=", lambda lib: lib.ones(2).__iand__(1), "bitwise_and"),
    ("int // 0", lambda lib: lib.tensor([1, 2]) // 0, "ZeroDivisionError"),
    ("int % 0", lambda lib: lib.tensor([1, 2]) % lib.tensor([1, 0]), "ZeroDivisionError"),
    ("int fmod 0", lambda lib: lib.fmod(lib.tensor([1, 2]), 0), "ZeroDivisionError"),
    ("int trunc 0", lambda lib: lib.div(lib.tensor([1]), 0, rounding_mode="trunc"),
     "ZeroDivisionError"),
    ("int ** -1", lambda lib: lib.tensor([1, 2]) ** -1, "negative integer powers"),
    ("rounding_mode", lambda lib: lib.div(lib.ones(2), 2, rounding_mode="bad"), "rounding_mode"),
    ("exp(float)", lambda lib: lib.exp(2.0), "exp"),
    ("sigmoid(list)", lambda lib: lib.sigmoid([1.0]), "sigmoid"),
    ("maximum scalar", lambda lib: lib.maximum(lib.ones(2), 2), "maximum"),
    ("add string", lambda lib: lib.ones(2) + "a", ""),
    ("add None", lambda lib: lib.ones(2) + None, ""),
    ("lt None", lambda lib: lib.ones(2) < None, ""),
    ("logical_and scalar", lambda lib: lib.logical_and(lib.ones(2), 1), "logical_and"),
    ("equal scalar", lambda lib: lib.equal(lib.ones(1), 1.0), "equal"),
    ("where int cond", lambda lib: lib.where(lib.tensor([1, 0]), 1.0, 2.0),
     "where expected condition to be a boolean tensor"),
    ("masked_fill int mask", lambda lib: lib.ones(2).masked_fill(lib.tensor([1, 0]), 2.0),
     "masked_fill.* only supports boolean masks"),
    ("masked_fill 1-d value", lambda lib: lib.ones(2).masked_fill(lib.tensor([True, False]),
                                                                   lib.ones(1)),
     "0-dimensional value tensor"),
    ("isclose dtypes", lambda lib: lib.isclose(lib.ones(1), lib.ones(1, dtype=lib.float64)),
     "isclose: Float did not match Double"),
    ("allclose dtypes", lambda lib: lib.allclose(lib.tensor([1]), lib.tensor([1.0])),
     "did not match"),
    ("isclose rtol", lambda lib: lib.isclose(lib.ones(1), lib.ones(1), rtol=-1), "rtol"),
    ("clamp no bounds", lambda lib: lib.clamp(lib.ones(2)), "At least one of 'min' or 'max'"),
    ("clamp string bound", lambda lib: lib.clamp(lib.ones(2), min="a"), "clamp"),
    ("gelu approximate", lambda lib: nnf(lib).gelu(lib.ones(1), approximate="bad"),
     "approximate argument must be either none or tanh"),
    ("hardtanh bounds", lambda lib: nnf(lib).hardtanh(lib.ones(1), 2.0, 1.0),
     "min_val cannot be greater than max_val"),
    ("gelu int", lambda lib: nnf(lib).gelu(lib.tensor([1])), "not implemented for 'Long'"),
    ("softplus int", lambda lib: nnf(lib).softplus(lib.tensor([1])), "not implemented"),
    ("elu int", lambda lib: nnf(lib).elu(lib.tensor([1])), "not implemented"),
    ("leaky_relu int", lambda lib: nnf(lib).leaky_relu(lib.tensor([1])), "not implemented"),
    ("relu bool", lambda lib: lib.relu(lib.tensor([True])), "Boolean inputs not supported"),
    ("abs bool", lambda lib: lib.abs(lib.tensor([True])), "not implemented for 'Bool'"),
    ("floor bool", lambda lib: lib.floor(lib.tensor([True])), "not implemented for 'Bool'"),
    ("round int decimals", lambda lib: lib.round(lib.tensor([1]), decimals=1),
     "not implemented for 'Long'"),
    ("bitwise float", lambda lib: lib.ones(2) & lib.ones(2), "bitwise_and"),
    ("bitwise_not float", lambda lib: lib.bitwise_not(lib.ones(2)), "bitwise_not"),
    ("invert float", lambda lib: ~lib.ones(2), "only implemented on integer and Boolean"),
    ("lerp int", lambda lib: lib.lerp(lib.tensor([1]), lib.tensor([2]), 0.5), "not implemented"),
    ("lerp end dtype", lambda lib: lib.lerp(lib.ones(1), lib.ones(1, dtype=lib.float64), 0.5),
     "expected dtype float for `end` but got dtype double"),
    ("lerp weight dtype", lambda lib: lib.lerp(lib.ones(1), lib.ones(1),
                                               lib.ones(1, dtype=lib.float64)),
     "for `weight`"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_exceptions(case):
    check_exception(case[1], match=case[2] or None)


def test_broadcast_message_names_shapes():
    err = check_exception(lambda lib: lib.ones(2, 3) + lib.ones(2, 4))
    assert "float32[2, 3]" in str(err) and "float32[2, 4]" in str(err)


# -- double backward -------------------------------------------------------------------------------

def _double_backward(lib, fn, arrays):
    xs = [lib.tensor(a, requires_grad=True) for a in arrays]
    y = fn(lib, *xs)
    w = lib.tensor(np.linspace(0.5, 1.5, y.numel()).reshape(tuple(y.shape)).astype(arrays[0].dtype))
    grads = lib.autograd.grad((y * w).sum(), xs, create_graph=True)
    v = [lib.tensor(np.linspace(-1, 1, a.size).reshape(a.shape).astype(a.dtype)) for a in arrays]
    total = sum((g * vi).sum() for g, vi in zip(grads, v))
    second = lib.autograd.grad(total, xs, allow_unused=True, materialize_grads=True)
    return [g.detach().numpy() for g in grads], [g.detach().numpy() for g in second]


DOUBLE = {
    "mul": (lambda lib, x, y: x * y, 2),
    "div": (lambda lib, x, y: x / y, 2),
    "exp": (lambda lib, x: lib.exp(x), 1),
    "log": (lambda lib, x: lib.log(x), 1),
    "sqrt": (lambda lib, x: lib.sqrt(x), 1),
    "rsqrt": (lambda lib, x: lib.rsqrt(x), 1),
    "sin_cos": (lambda lib, x: lib.sin(x) * lib.cos(x), 1),
    "tanh": (lambda lib, x: lib.tanh(x), 1),
    "sigmoid": (lambda lib, x: lib.sigmoid(x), 1),
    "erf": (lambda lib, x: lib.erf(x), 1),
    "gelu": (lambda lib, x: nnf(lib).gelu(x), 1),
    "gelu_tanh": (lambda lib, x: nnf(lib).gelu(x, approximate="tanh"), 1),
    "softplus": (lambda lib, x: nnf(lib).softplus(x, beta=1.5), 1),
    "logsigmoid": (lambda lib, x: nnf(lib).logsigmoid(x), 1),
    "silu": (lambda lib, x: nnf(lib).silu(x), 1),
    "elu": (lambda lib, x: nnf(lib).elu(x), 1),
    "pow_scalar": (lambda lib, x: x ** 3, 1),
    "pow_tensor": (lambda lib, x, y: x ** y, 2),
    "rpow": (lambda lib, x: 2.0 ** x, 1),
    "maximum": (lambda lib, x, y: lib.maximum(x, y) * x, 2),
    "clamp": (lambda lib, x: lib.clamp(x, 0.5, 1.5) * x, 1),
    "where": (lambda lib, x, y: lib.where(x > y, x * x, y * x), 2),
    "relu": (lambda lib, x: lib.relu(x) * x, 1),
    "remainder": (lambda lib, x, y: lib.remainder(x * x, y), 2),
    "expm1_log1p": (lambda lib, x: lib.expm1(x) * lib.log1p(x), 1),
}


@pytest.mark.parametrize("name", sorted(DOUBLE))
def test_double_backward(name):
    fn, n = DOUBLE[name]
    arrays = [rand(2, 3, low=0.3, high=2, dtype=np.float64)]
    if n == 2:
        arrays.append(rand(3, seed=1, low=0.3, high=2, dtype=np.float64))
    k_first, k_second = _double_backward(kiln, fn, arrays)
    t_first, t_second = _double_backward(torch, fn, arrays)
    for k, t in zip(k_first + k_second, t_first + t_second):
        np.testing.assert_allclose(k, t, atol=1e-10, rtol=1e-10)


def test_top_level_names():
    for name in ["relu", "gelu", "silu", "softplus", "leaky_relu", "elu", "hardtanh", "relu6",
                 "logsigmoid", "sigmoid", "tanh", "erf", "clamp", "clip", "where", "masked_fill",
                 "lerp", "maximum", "minimum", "isclose", "allclose", "equal", "floor_divide",
                 "remainder", "pow", "abs", "sign", "reciprocal", "rsqrt", "logical_xor"]:
        assert callable(getattr(kiln, name)), name
    assert math.isclose(kiln.sigmoid(kiln.tensor(0.0)).item(), 0.5)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(3, 4), (), (0,)])
def test_activation_backward_primitives_double_backward(name, shape):
    """The fused *_backward primitives: first and second derivatives against torch."""
    def act(lib, x):
        if name == "gelu_tanh":
            return lib.nn.functional.gelu(x, approximate="tanh")
        return getattr(lib.nn.functional, name)(x) if name == "gelu" else getattr(lib, name)(x)

    def grad_of(lib, x):
        y = act(lib, x)
        (g,) = lib.autograd.grad((y * y * y).sum(), x, create_graph=True)
        return g

    a = np.random.default_rng(3).uniform(-3, 3, shape)
    check_op(act, [a], atol=1e-12, rtol=1e-10)
    check_op(grad_of, [a], atol=1e-10, rtol=1e-9)
