"""Per-primitive ONNX emitters: ``EMIT[primitive name](em, node, inputs) -> output name``.

``em`` is the ``Emitter``, ``node`` the Kiln graph node (its attrs, shape and dtype) and
``inputs`` the ONNX names of its inputs.  Pseudo-ops made by ``export_patterns`` (``gemm``,
``batch_norm``, ``onnx_gather``) have entries too.  Primitives with no entry cannot be
exported; the error says why for those in ``BACKWARD``, ``RANDOM`` and ``NO_ONNX``.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.graph.symbolic import Sym
from kiln.onnx.export_emit import ExportError

EMIT: dict = {}

BACKWARD = {"tanh_backward", "sigmoid_backward", "relu_backward", "gelu_backward",
            "layer_norm_backward", "cross_entropy_backward", "nll_loss_backward",
            "avg_pool2d_backward", "conv2d_weight", "pool_scatter", "index_view_backward",
            "embedding_backward", "put_along", "softmax_backward", "attention_backward",
            "attention_packed_backward"}
RANDOM = {"dropout_mask", "multinomial"}
NO_ONNX = {  # more on why a primitive has no emitter
    "cumprod": "ONNX has CumSum but no cumulative product",
    "max_pool2d_indices": "MaxPool's Indices count over the whole tensor, PyTorch's per plane: "
                          "export max_pool2d without return_indices",
    "pool_gather": "it reads max_pool2d's indices",
}

_INT64_MAX = np.iinfo(np.int64).max


def emits(*names):
    def register(fn):
        for name in names:
            EMIT[name] = fn
        return fn
    return register


def _floating(n) -> bool:
    return n.dtype.kind == "f"


# -- elementwise ----------------------------------------------------------------------------------

_UNARY = {"abs": "Abs", "neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sin": "Sin",
          "cos": "Cos", "tanh": "Tanh", "sigmoid": "Sigmoid", "erf": "Erf", "relu": "Relu",
          "ceil": "Ceil", "floor": "Floor", "sign": "Sign", "isnan": "IsNaN",
          "logical_not": "Not", "isinf": "IsInf"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
           "maximum": "Max", "minimum": "Min", "eq": "Equal", "lt": "Less",
           "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "logical_and": "And",
           "logical_or": "Or", "logical_xor": "Xor", "where": "Where"}
_BITWISE = {"bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor",
            "bitwise_not": "BitwiseNot"}
_BOOL_BITWISE = {"bitwise_and": "And", "bitwise_or": "Or", "bitwise_xor": "Xor",
                 "bitwise_not": "Not"}  # ONNX's Bitwise* take integers only


def _simple(table):
    def emit(em, n, x):
        if n.dtype == np.bool_ and n.op in _BOOL_BITWISE:
            return em.op(_BOOL_BITWISE[n.op], x)
        if n.op in _BITWISE:
            em.need(18, table[n.op])
        return em.op(table[n.op], x)
    return emit


for _t in (_UNARY, _BINARY, _BITWISE):
    emits(*_t)(_simple(_t))


@emits("ne")
def _ne(em, n, x):
    return em.op("Not", [em.op("Equal", x)])


@emits("isfinite")
def _isfinite(em, n, x):
    if n.inputs[0].dtype.kind != "f":
        return em.op("Equal", [x[0], x[0]])  # integers are always finite
    bad = em.op("Or", [em.op("IsInf", x), em.op("IsNaN", x)])
    return em.op("Not", [bad])


@emits("clone", "contiguous")
def _identity(em, n, x):
    return x[0]


@emits("copy")
def _copy(em, n, x):
    if tuple(n.inputs[1].shape) == tuple(n.shape):
        return x[1]
    return em.op("Expand", [x[1], em.ints(n.shape)])


@emits("cast")
def _cast(em, n, x):
    return em.op("Cast", x, to=em.tensor_type(n.dtype))


@emits("expm1")
def _expm1(em, n, x):
    return em.op("Sub", [em.op("Exp", x), em.scalar_like(1, n)])


@emits("log1p")
def _log1p(em, n, x):
    return em.op("Log", [em.op("Add", [x[0], em.scalar_like(1, n)])])


@emits("log2")
def _log2(em, n, x):
    return em.op("Div", [em.op("Log", x), em.scalar_like(math.log(2), n)])


def _trunc_name(em, n, v):
    return em.op("Mul", [em.op("Sign", [v]), em.op("Floor", [em.op("Abs", [v])])])


@emits("trunc")
def _trunc(em, n, x):
    return x[0] if not _floating(n) else _trunc_name(em, n, x[0])


@emits("round")
def _round(em, n, x):
    d = n.attrs.get("decimals", 0)
    if not d:
        return em.op("Round", x)
    s = em.scalar_like(10.0 ** d, n)
    return em.op("Div", [em.op("Round", [em.op("Mul", [x[0], s])]), s])


@emits("fmod")
def _fmod(em, n, x):
    return em.op("Mod", x, fmod=1)


@emits("remainder")
def _remainder(em, n, x):
    if not _floating(n):
        return em.op("Mod", x, fmod=0)
    q = em.op("Floor", [em.op("Div", x)])
    return em.op("Sub", [x[0], em.op("Mul", [q, x[1]])])


@emits("floor_divide")
def _floor_divide(em, n, x):
    if _floating(n):
        return em.op("Floor", [em.op("Div", x)])
    # exact for integers: a - (a mod b) is a multiple of b (Mod fmod=0 has the divisor's sign)
    return em.op("Div", [em.op("Sub", [x[0], em.op("Mod", x, fmod=0)]), x[1]])


@emits("trunc_divide")
def _trunc_divide(em, n, x):
    q = em.op("Div", x)
    return _trunc_name(em, n, q) if _floating(n) else q


@emits("clamp")
def _clamp(em, n, x):
    out = x[0]
    if n.attrs["has_min"]:
        out = em.op("Max", [out, x[1]])
    if n.attrs["has_max"]:
        out = em.op("Min", [out, x[2]])
    return out


@emits("hardtanh")
def _hardtanh(em, n, x):
    lo, hi = n.attrs["min_val"], n.attrs["max_val"]
    return em.op("Clip", [x[0], em.scalar_like(lo, n), em.scalar_like(hi, n)])


@emits("leaky_relu")
def _leaky_relu(em, n, x):
    return em.op("LeakyRelu", x, alpha=float(n.attrs["negative_slope"]))


@emits("elu")
def _elu(em, n, x):
    return em.op("Elu", x, alpha=float(n.attrs["alpha"]))


@emits("softplus")
def _softplus(em, n, x):
    beta, threshold = n.attrs["beta"], n.attrs["threshold"]
    bx = x[0] if beta == 1 else em.op("Mul", [x[0], em.scalar_like(beta, n)])
    soft = em.op("Softplus", [bx])
    if beta != 1:
        soft = em.op("Div", [soft, em.scalar_like(beta, n)])
    big = em.op("Greater", [bx, em.scalar_like(threshold, n)])
    return em.op("Where", [big, x[0], soft])


@emits("gelu")
def _gelu(em, n, x):
    approximate = n.attrs.get("approximate", "none")
    if em.opset >= 20:
        return em.op("Gelu", x, approximate=approximate)
    c = lambda v: em.scalar_like(v, n)  # noqa: E731
    if approximate == "tanh":
        cube = em.op("Mul", [em.op("Mul", [x[0], x[0]]), x[0]])
        inner = em.op("Add", [x[0], em.op("Mul", [cube, c(0.044715)])])
        t = em.op("Tanh", [em.op("Mul", [inner, c(math.sqrt(2 / math.pi))])])
        half = em.op("Mul", [x[0], c(0.5)])
        return em.op("Mul", [half, em.op("Add", [t, c(1.0)])])
    e = em.op("Erf", [em.op("Mul", [x[0], c(1 / math.sqrt(2))])])
    return em.op("Mul", [em.op("Mul", [x[0], c(0.5)]), em.op("Add", [e, c(1.0)])])


@emits("binary_cross_entropy")
def _bce(em, n, x):
    c = lambda v: em.scalar_like(v, n)  # noqa: E731
    lx = em.op("Max", [em.op("Log", [x[0]]), c(-100.0)])
    l1 = em.op("Max", [em.op("Log", [em.op("Sub", [c(1.0), x[0]])]), c(-100.0)])
    pos = em.op("Mul", [x[1], lx])
    neg = em.op("Mul", [em.op("Sub", [c(1.0), x[1]]), l1])
    return em.op("Neg", [em.op("Add", [pos, neg])])


# -- reductions -----------------------------------------------------------------------------------

def _axes(n, key="axes"):
    a = n.attrs.get(key)
    return tuple(range(len(n.inputs[0].shape))) if a is None else tuple(a)


def _reduce(op_type, since=18):
    def emit(em, n, x):
        return em.axes_arg(op_type, x[0], _axes(n), since, keepdims=int(n.attrs["keepdims"]))
    return emit


emits("sum")(_reduce("ReduceSum", since=13))
emits("mean")(_reduce("ReduceMean"))
emits("amax")(_reduce("ReduceMax"))
emits("amin")(_reduce("ReduceMin"))
emits("logsumexp")(_reduce("ReduceLogSumExp"))


@emits("all", "any")
def _all_any(em, n, x):
    v = em.op("Cast", x, to=em.tensor_type(np.int32))
    op_type = "ReduceMin" if n.op == "all" else "ReduceMax"
    r = em.axes_arg(op_type, v, _axes(n), 18, keepdims=int(n.attrs["keepdims"]))
    return em.op("Cast", [r], to=em.tensor_type(np.bool_))


@emits("count_nonzero")
def _count_nonzero(em, n, x):
    zero = em.const(np.zeros((), n.inputs[0].dtype))
    nz = em.op("Cast", [em.op("Not", [em.op("Equal", [x[0], zero])])],
               to=em.tensor_type(np.int64))
    return em.axes_arg("ReduceSum", nz, _axes(n), 13, keepdims=0)


@emits("prod")
def _prod(em, n, x):
    axis = n.attrs["axis"]
    if axis is None:
        flat = em.op("Reshape", [x[0], em.ints([-1])])
        return em.axes_arg("ReduceProd", flat, (0,), 18, keepdims=0)
    return em.axes_arg("ReduceProd", x[0], (axis,), 18, keepdims=int(n.attrs["keepdims"]))


@emits("argmax", "argmin")
def _argmax(em, n, x):
    op_type = "ArgMax" if n.op == "argmax" else "ArgMin"
    axis = n.attrs["axis"]
    if axis is None:
        flat = em.op("Reshape", [x[0], em.ints([-1])])
        out = em.op(op_type, [flat], axis=0, keepdims=0)
        if n.attrs["keepdims"]:
            out = em.op("Reshape", [out, em.ints(n.shape)])
        return out
    return em.op(op_type, x, axis=int(axis), keepdims=int(n.attrs["keepdims"]))


@emits("var", "std")
def _var(em, n, x):
    axes = _axes(n)
    mean = em.axes_arg("ReduceMean", x[0], axes, 18, keepdims=1)
    d = em.op("Sub", [x[0], mean])
    ss = em.axes_arg("ReduceSum", em.op("Mul", [d, d]), axes, 13,
                     keepdims=int(n.attrs["keepdims"]))
    shape = n.inputs[0].shape
    count = [shape[a] for a in axes]
    correction = n.attrs["correction"]
    if any(isinstance(c, Sym) for c in count):  # over the dynamic dimension
        total = em.op("ReduceProd", [em.ints(count)], keepdims=0) if em.opset >= 18 else \
            em.op("ReduceProd", [em.ints(count)], keepdims=0, axes=[0])
        dof = em.op("Sub", [em.op("Cast", [total], to=em.tensor_type(n.dtype)),
                            em.scalar_like(correction, n)])
        dof = em.op("Max", [dof, em.scalar_like(0, n)])
    else:
        dof = em.scalar_like(max(int(np.prod(count)) - correction, 0), n)
    out = em.op("Div", [ss, dof])
    return em.op("Sqrt", [out]) if n.op == "std" else out


@emits("norm")
def _norm(em, n, x):
    ord_, axes, keep = n.attrs["ord"], _axes(n), int(n.attrs["keepdims"])
    if ord_ == 2:
        return em.axes_arg("ReduceL2", x[0], axes, 18, keepdims=keep)
    if ord_ == 1:
        return em.axes_arg("ReduceL1", x[0], axes, 18, keepdims=keep)
    a = em.op("Abs", x)
    if ord_ == math.inf:
        return em.axes_arg("ReduceMax", a, axes, 18, keepdims=keep)
    if ord_ == -math.inf:
        return em.axes_arg("ReduceMin", a, axes, 18, keepdims=keep)
    if ord_ == 0:
        nz = em.op("Cast", [em.op("Not", [em.op("Equal", [a, em.scalar_like(0, n)])])],
                   to=em.tensor_type(n.dtype))
        return em.axes_arg("ReduceSum", nz, axes, 13, keepdims=keep)
    p = em.op("Pow", [a, em.scalar_like(ord_, n)])
    s = em.axes_arg("ReduceSum", p, axes, 13, keepdims=keep)
    return em.op("Pow", [s, em.scalar_like(1.0 / ord_, n)])


@emits("softmax", "log_softmax")
def _softmax(em, n, x):
    return em.op("Softmax" if n.op == "softmax" else "LogSoftmax", x, axis=int(n.attrs["axis"]))


@emits("cumsum")
def _cumsum(em, n, x):
    axis = em.const(np.array(n.attrs["axis"], np.int64))
    return em.op("CumSum", [x[0], axis], exclusive=int(n.attrs["exclusive"]),
                 reverse=int(n.attrs["reverse"]))


# -- linear algebra, convolution, pooling ---------------------------------------------------------

def _swap_last(em, v, ndim):
    perm = list(range(ndim))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return em.op("Transpose", [v], perm=perm)


@emits("matmul")
def _matmul(em, n, x):
    a, b = x
    if n.attrs.get("ta"):
        a = _swap_last(em, a, len(n.inputs[0].shape))
    if n.attrs.get("tb"):
        b = _swap_last(em, b, len(n.inputs[1].shape))
    return em.op("MatMul", [a, b])


def _attention_of(em, n, q, k, v, L, S, k_rank):
    """softmax(scale q k^T, causal: keys j > i set to -inf) v from MatMul, Softmax and Where."""
    scores = em.op("Mul", [em.op("MatMul", [q, _swap_last(em, k, k_rank)]),
                           em.scalar_like(n.attrs["scale"], n)])
    if n.attrs["causal"]:
        ones = em.op("ConstantOfShape", [em.ints([L, S])],
                     value=em.onnx.numpy_helper.from_array(np.ones(1, n.dtype)))
        seen = em.op("Greater", [em.op("Trilu", [ones], upper=0), em.scalar_like(0, n)])
        scores = em.op("Where", [seen, scores, em.scalar_like(-np.inf, n)])
    return em.op("MatMul", [em.op("Softmax", [scores], axis=-1), v])


@emits("attention")
def _attention(em, n, x):
    return _attention_of(em, n, *x, n.inputs[0].shape[-2], n.inputs[1].shape[-2],
                         len(n.inputs[1].shape))


@emits("attention_packed")
def _attention_packed(em, n, x):
    """The heads of x (batch..., T, 3HD): Reshape to (batch..., T, 3, H, D), Gather each of q,
    k, v, Transpose to (batch..., H, T, D); then attention."""
    rank = len(n.inputs[0].shape)
    t, heads = n.inputs[0].shape[-2], n.attrs["heads"]
    d = n.shape[-1]
    y = em.op("Reshape", [x[0], em.const(np.array([0] * (rank - 1) + [3, heads, d], np.int64))])
    perm = list(range(rank - 2)) + [rank - 1, rank - 2, rank]  # (.., T, H, D) -> (.., H, T, D)
    q, k, v = (em.op("Transpose", [em.op("Gather", [y, em.const(np.array(i, np.int64))],
                                          axis=rank - 1)], perm=perm) for i in range(3))
    return _attention_of(em, n, q, k, v, t, t, rank + 1)


@emits("linear")
def _linear(em, n, x):
    if len(n.inputs[0].shape) == 2:
        return em.op("Gemm", x, transB=1)
    out = em.op("MatMul", [x[0], em.op("Transpose", [x[1]], perm=[1, 0])])
    return em.op("Add", [out, x[2]]) if len(x) > 2 else out


@emits("gemm")  # export_patterns: matmul(x2d, w) + b
def _gemm(em, n, x):
    return em.op("Gemm", x, transB=int(n.attrs.get("tb", False)))


@emits("einsum", "einsum2")
def _einsum(em, n, x):
    return em.op("Einsum", x, equation=n.attrs["equation"])


def _pads(padding):
    pt, pb, pl, pr = padding
    return [pt, pl, pb, pr]


@emits("conv2d")
def _conv2d(em, n, x):
    a = n.attrs
    return em.op("Conv", x, strides=list(a["stride"]), pads=_pads(a["padding"]),
                 dilations=list(a["dilation"]), group=int(a["groups"]),
                 kernel_shape=list(n.inputs[1].shape[2:]))


@emits("conv_transpose2d")
def _conv_transpose2d(em, n, x):
    a = n.attrs
    return em.op("ConvTranspose", x, strides=list(a["stride"]), pads=_pads(a["padding"]),
                 dilations=list(a["dilation"]), group=int(a["groups"]),
                 kernel_shape=list(n.inputs[1].shape[2:]))


@emits("max_pool2d")
def _max_pool2d(em, n, x):
    a = n.attrs
    pads, ceil = _pool_pads(n, a["dilation"], exact_if_padded=True)
    return em.op("MaxPool", x, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                 pads=pads, dilations=list(a["dilation"]), ceil_mode=ceil)


@emits("avg_pool2d")
def _avg_pool2d(em, n, x):
    a = n.attrs
    if a["divisor_override"] is not None:
        raise ExportError("avg_pool2d with divisor_override")
    pads, ceil = _pool_pads(n, (1, 1), exact_if_padded=not a["count_include_pad"])
    return em.op("AveragePool", x, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                 pads=pads, ceil_mode=ceil, count_include_pad=int(a["count_include_pad"]))


def _pool_pads(n, dilation, exact_if_padded: bool):
    """(pads, ceil_mode) for ONNX.  With ceil_mode, ONNX counts a last window that starts in
    the right padding, which PyTorch (and Kiln) drop: there, floor mode with more end padding
    gives Kiln's output size (exact when padded elements do not count: max, or an average
    without count_include_pad)."""
    a = n.attrs
    ph, pw = a["padding"]
    pads, ceil = [ph, pw, ph, pw], int(a["ceil_mode"])
    if not ceil:
        return pads, ceil
    ends = []
    for size, out, k, s, p, d in zip(n.inputs[0].shape[-2:], n.shape[-2:], a["kernel"],
                                     a["stride"], (ph, pw), dilation):
        span = (k - 1) * d + 1
        if -(-(size + 2 * p - span) // s) + 1 == out:
            ends.append(p)
        elif not exact_if_padded:
            raise ExportError("avg_pool2d with ceil_mode=True and count_include_pad=True where "
                              "ONNX's ceil_mode would add a window that starts in the padding")
        else:
            ends.append((out - 1) * s + span - size - p)
    if ends == [ph, pw]:
        return pads, ceil
    return [ph, pw, ends[0], ends[1]], 0


@emits("batch_norm")  # export_patterns: the eval-mode BatchNorm arithmetic
def _batch_norm(em, n, x):
    return em.op("BatchNormalization", x, epsilon=float(n.attrs["eps"]))


@emits("layer_norm")
def _layer_norm(em, n, x):
    a, k = n.attrs, n.attrs["k"]
    norm_shape = n.inputs[0].shape[-k:]
    ins = [x[0]]
    i = 1
    if a["has_weight"]:
        ins.append(x[i])
        i += 1
    else:
        ins.append(em.const(np.ones(norm_shape, n.dtype)))
    if a["has_bias"]:
        ins.append(x[i])
    return em.op("LayerNormalization", ins, axis=-k, epsilon=float(a["eps"]))


# -- losses ---------------------------------------------------------------------------------------

def _loss_attrs(n):
    attrs = {"reduction": n.attrs["reduction"]}
    if n.attrs.get("ignore_index") is not None:
        attrs["ignore_index"] = int(n.attrs["ignore_index"])
    return attrs


@emits("cross_entropy")
def _cross_entropy(em, n, x):
    return em.op("SoftmaxCrossEntropyLoss", x, **_loss_attrs(n))


@emits("nll_loss")
def _nll_loss(em, n, x):
    return em.op("NegativeLogLikelihoodLoss", x, **_loss_attrs(n))


# -- shapes ---------------------------------------------------------------------------------------

@emits("reshape")
def _reshape(em, n, x):
    shape = list(n.attrs["shape"])
    syms = [i for i, d in enumerate(shape) if isinstance(d, Sym)]
    if len(syms) == 1:
        shape[syms[0]] = -1  # the one unknown dimension: inferred from the element count
    allowzero = 1 if 0 in shape else None  # else a 0 means "copy the input's dimension"
    return em.op("Reshape", [x[0], em.ints(shape)], allowzero=allowzero)


@emits("permute")
def _permute(em, n, x):
    return em.op("Transpose", x, perm=[int(d) for d in n.attrs["dims"]])


@emits("expand")
def _expand(em, n, x):
    return em.op("Expand", [x[0], em.ints(n.attrs["shape"])])


@emits("cat")
def _cat(em, n, x):
    return em.op("Concat", x, axis=int(n.attrs["dim"]))


@emits("flip")
def _flip(em, n, x):
    dims = [int(d) for d in n.attrs["dims"]]
    k = len(dims)
    return em.op("Slice", [x[0], em.ints([-1] * k), em.ints([-_INT64_MAX] * k), em.ints(dims),
                           em.ints([-1] * k)])


def _slice(em, v, axis, start, stop, step=1):
    return em.op("Slice", [v, em.ints([start]), em.ints([stop]), em.ints([axis]),
                           em.ints([step])])


@emits("roll")
def _roll(em, n, x):
    out = x[0]
    for s, d in zip(n.attrs["shifts"], n.attrs["dims"]):
        size = n.shape[d]
        if isinstance(size, Sym):
            raise ExportError("roll along the dynamic dimension")
        s %= size
        if s:
            tail = _slice(em, out, d, size - s, _INT64_MAX)
            head = _slice(em, out, d, 0, size - s)
            out = em.op("Concat", [tail, head], axis=int(d))
    return out


@emits("tril", "triu")
def _trilu(em, n, x):
    k = em.const(np.array(n.attrs["diagonal"], np.int64))
    return em.op("Trilu", [x[0], k], upper=int(n.op == "triu"))


@emits("pad")
def _pad(em, n, x):
    widths = n.attrs["widths"]
    pads = [lo for lo, _ in widths] + [hi for _, hi in widths]
    value = em.const(np.array(n.attrs["value"], n.dtype))
    return em.op("Pad", [x[0], em.ints(pads), value], mode="constant")


# -- indexing -------------------------------------------------------------------------------------

@emits("index_view")
def _index_view(em, n, x):
    index = n.attrs["index"]
    shape = n.inputs[0].shape
    starts, stops, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    din, dout = 0, 0
    for item in index:
        if item is None:
            unsqueeze.append(dout)
            dout += 1
            continue
        if isinstance(item, tuple):  # Slice(start, stop, step)
            start, stop, step = item
            if not (start == 0 and step == 1 and (stop == shape[din])):
                starts.append(start)
                stops.append(_INT64_MAX if stop == shape[din] else stop)
                axes.append(din)
                steps.append(step)
            dout += 1
        else:
            starts.append(item)
            stops.append(Sym(item.name, item.mul, item.add + 1) if isinstance(item, Sym)
                         else item + 1)
            axes.append(din)
            steps.append(1)
            squeeze.append(din)
        din += 1
    out = x[0]
    if axes:
        out = em.op("Slice", [out, em.ints(starts), em.ints(stops), em.ints(axes),
                              em.ints(steps)])
    if squeeze:
        out = em.op("Squeeze", [out, em.ints(squeeze)])
    if unsqueeze:
        out = em.op("Unsqueeze", [out, em.ints(unsqueeze)])
    return out


@emits("index")
def _index(em, n, x):
    dims = tuple(n.attrs["dims"])
    if len(dims) == 1:
        return em.op("Gather", [x[0], em.op("Squeeze", [x[1], em.ints([0])])], axis=dims[0])
    # GatherND on x with the indexed dimensions moved first, the index components last
    ndim, k = len(n.inputs[0].shape), len(dims)
    rest = [d for d in range(ndim) if d not in dims]
    src = x[0]
    if list(dims) + rest != list(range(ndim)):
        src = em.op("Transpose", [src], perm=list(dims) + rest)
    r = len(n.inputs[1].shape) - 1
    out = em.op("GatherND", [src, em.op("Transpose", [x[1]], perm=list(range(1, r + 1)) + [0])])
    first = dims[0]
    if dims == tuple(range(first, first + k)) and first > 0:
        # adjacent indexed dimensions: numpy puts the index dimensions where they were
        perm = list(range(r, r + first)) + list(range(r)) + list(range(r + first, ndim - k + r))
        out = em.op("Transpose", [out], perm=perm)
    return out


@emits("embedding")
def _embedding(em, n, x):
    return em.op("Gather", x, axis=0)


@emits("onnx_gather")  # export_patterns: index/embedding along one dimension
def _onnx_gather(em, n, x):
    return em.op("Gather", x, axis=int(n.attrs["axis"]))


@emits("gather")
def _gather(em, n, x):
    return em.op("GatherElements", x, axis=int(n.attrs["dim"]))


@emits("scatter")
def _scatter(em, n, x):
    red = n.attrs.get("reduce")
    reduction = {None: None, "add": "add", "multiply": "mul"}
    if red not in reduction:
        raise ExportError(f"scatter with reduce={red!r}")
    src = x[2]
    if tuple(n.inputs[2].shape) != tuple(n.inputs[1].shape):
        ishape = n.inputs[1].shape
        src = em.op("Slice", [src, em.ints([0] * len(ishape)), em.ints(ishape),
                              em.ints(range(len(ishape)))])
    return em.op("ScatterElements", [x[0], x[1], src], axis=int(n.attrs["dim"]),
                 reduction=reduction[red])


@emits("pick_along")
def _pick_along(em, n, x):
    axis = int(n.attrs["axis"])
    idx = x[1] if n.attrs["keepdims"] else em.op("Unsqueeze", [x[1], em.ints([axis])])
    out = em.op("GatherElements", [x[0], idx], axis=axis)
    return out if n.attrs["keepdims"] else em.op("Squeeze", [out, em.ints([axis])])


def _topk_indices(em, n, v, k, axis, largest):
    _, idx = em.op("TopK", [v, em.ints([k])], n_out=2, axis=axis, largest=int(largest),
                   sorted=1)
    return idx


@emits("argtopk")
def _argtopk(em, n, x):
    a = n.attrs
    return _topk_indices(em, n, x[0], a["k"], int(a["dim"]), a["largest"])


@emits("argsort")
def _argsort(em, n, x):
    a = n.attrs
    size = n.inputs[0].shape[a["dim"]]
    if isinstance(size, Sym):
        raise ExportError("argsort along the dynamic dimension")
    return _topk_indices(em, n, x[0], size, int(a["dim"]), a["descending"])


@emits("one_hot")
def _one_hot(em, n, x):
    depth = em.const(np.array(n.attrs["num_classes"], np.int64))
    values = em.const(np.array([0, 1], np.int64))
    return em.op("OneHot", [x[0], depth, values], axis=-1)


@emits("index_put")
def _index_put(em, n, x):
    a = n.attrs
    if a["index"] or a["accumulate"] or tuple(a["dims"]) != (0,):
        raise ExportError("index_put other than x[idx] = v along dimension 0")
    idx = em.op("Unsqueeze", [em.op("Squeeze", [x[2], em.ints([0])]), em.ints([-1])])
    ishape = n.inputs[2].shape[1:]
    upd_shape = tuple(ishape) + tuple(n.shape[1:])
    vals = x[1]
    if tuple(n.inputs[1].shape) != upd_shape:
        vals = em.op("Expand", [vals, em.ints(upd_shape)])
    return em.op("ScatterND", [x[0], idx, vals])
