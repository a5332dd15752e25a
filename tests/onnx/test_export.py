"""kiln.onnx.export: every exportable primitive and the workload models, run by ONNX Runtime
and compared with Kiln eager (float: max abs diff <= 1e-5 * max(1, max|out|); ints and bools
exact), idiomatic op types, dynamic batch, opsets, names and clear errors."""

import os

import numpy as np
import pytest

import kiln
import kiln.nn.functional as F
from kiln import nn
from tests.helpers import workload_forward

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kiln.onnx import export  # noqa: E402

RTOL = 1e-5


def _flat(obj):
    if isinstance(obj, kiln.Tensor):
        return [obj.numpy()]
    return [a for x in obj for a in _flat(x)]


def _arrays(inputs):
    return [t.numpy() if isinstance(t, kiln.Tensor) else np.asarray(t) for t in inputs]


def _compare(got, want, what=""):
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    if want.dtype.kind == "f":
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
        tol = RTOL * max(1.0, float(np.max(np.abs(want), initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=what)
    else:
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=what)
        assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"


def _run(path, model, arrays):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in model.graph.input]
    return sess.run(None, dict(zip(names, arrays)))


def check(fn, inputs, tmp_path, *, dynamic_dims=None, others=(), opset=None):
    """Export ``fn``, check the file, run it in ONNX Runtime on ``inputs`` (and on each tuple
    of ``others``) and compare with Kiln eager; returns the ModelProto."""
    path = tmp_path / "m.onnx"
    model = export(fn, tuple(inputs), path, dynamic_dims=dynamic_dims, opset=opset)
    onnx.checker.check_model(str(path), full_check=True)
    for case in (tuple(inputs),) + tuple(others):
        with kiln.no_grad():
            want = _flat(fn(*case))
        got = _run(path, model, _arrays(case))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"output {i}")
    return model


def op_types(model):
    """The model's operators, without the Constant nodes holding non-weight values."""
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


# -- every exportable primitive ----------------------------------------------------------------

rng = np.random.default_rng(0)


def f32(*shape, lo=-2.0, hi=2.0):
    return kiln.tensor(rng.uniform(lo, hi, shape).astype(np.float32))


def i64(*shape, lo=-5, hi=6):
    return kiln.tensor(rng.integers(lo, hi, shape), dtype=kiln.int64)


def boolean(*shape):
    return kiln.tensor(rng.random(shape) < 0.5)


POS = dict(lo=0.1, hi=3.0)
A, B = f32(3, 4), f32(3, 4)
IA, IB = i64(3, 4), i64(3, 4, lo=1, hi=5) * (1 - 2 * (i64(3, 4, lo=0, hi=2)))
DISTINCT = kiln.tensor(rng.permutation(12).reshape(3, 4).astype(np.float32))

CASES = {
    # unary elementwise
    "abs": (kiln.abs, [A]), "neg": (kiln.neg, [A]), "exp": (kiln.exp, [A]),
    "log": (kiln.log, [f32(3, 4, **POS)]), "sqrt": (kiln.sqrt, [f32(3, 4, **POS)]),
    "sin": (kiln.sin, [A]), "cos": (kiln.cos, [A]), "tanh": (kiln.tanh, [A]),
    "sigmoid": (kiln.sigmoid, [A]), "erf": (kiln.erf, [A]), "relu": (F.relu, [A]),
    "ceil": (kiln.ceil, [A]), "floor": (kiln.floor, [A]), "sign": (kiln.sign, [A]),
    "trunc": (kiln.trunc, [A]), "round": (kiln.round, [A * 3]),
    "round_decimals": (lambda x: kiln.round(x, decimals=1), [A]),
    "expm1": (kiln.expm1, [A]), "log1p": (kiln.log1p, [f32(3, 4, **POS)]),
    "log2": (kiln.log2, [f32(3, 4, **POS)]),
    "isnan": (lambda x: kiln.isnan(kiln.log(x)), [A]),
    "isinf": (lambda x: kiln.isinf(x / kiln.floor(x)), [A]),
    "isfinite": (lambda x: kiln.isfinite(kiln.log(x)), [A]),
    "logical_not": (kiln.logical_not, [boolean(3, 4)]),
    "bitwise_not": (kiln.bitwise_not, [IA]),
    "gelu": (F.gelu, [A]), "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), [A]),
    "softplus": (lambda x: F.softplus(x, beta=2.0, threshold=3.0), [A * 3]),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), [A]), "elu": (F.elu, [A]),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 0.7), [A]),
    "clamp": (lambda x: kiln.clamp(x, -0.5, 0.5), [A]),
    "clamp_min": (lambda x: kiln.clamp(x, min=0.1), [A]),
    "clamp_max": (lambda x: kiln.clamp(x, max=0.1), [A]),
    "cast": (lambda x: (x * 3).to(kiln.int64), [A]),
    "clone": (lambda x: x.clone() + 1, [A]),
    "contiguous": (lambda x: x.t().contiguous(), [A]),
    # binary elementwise (with broadcasting)
    "add": (kiln.add, [A, f32(4)]), "sub": (kiln.sub, [A, B]), "mul": (kiln.mul, [A, f32(3, 1)]),
    "div": (kiln.div, [A, f32(3, 4, **POS)]), "pow": (kiln.pow, [f32(3, 4, **POS), B]),
    "maximum": (kiln.maximum, [A, B]), "minimum": (kiln.minimum, [A, B]),
    "eq": (kiln.eq, [IA, IB]), "ne": (kiln.ne, [IA, IB]), "lt": (kiln.lt, [A, B]),
    "le": (kiln.le, [IA, IB]), "gt": (kiln.gt, [A, B]), "ge": (kiln.ge, [IA, IB]),
    "logical_and": (kiln.logical_and, [boolean(3, 4), boolean(3, 4)]),
    "logical_or": (kiln.logical_or, [boolean(3, 4), boolean(3, 4)]),
    "logical_xor": (kiln.logical_xor, [boolean(3, 4), boolean(3, 4)]),
    "bitwise_and": (kiln.bitwise_and, [IA, IB]), "bitwise_or": (kiln.bitwise_or, [IA, IB]),
    "bitwise_xor": (kiln.bitwise_xor, [IA, IB]),
    "bitwise_bool": (lambda a, b: (a & b, a | b, a ^ b, ~a), [boolean(3, 4), boolean(3, 4)]),
    "fmod": (kiln.fmod, [A * 3, f32(3, 4, **POS)]), "fmod_int": (kiln.fmod, [IA, IB]),
    "remainder": (kiln.remainder, [A * 3, B]), "remainder_int": (kiln.remainder, [IA, IB]),
    "floor_divide": (kiln.floor_divide, [A * 3, B]),
    "floor_divide_int": (kiln.floor_divide, [IA, IB]),
    "trunc_divide": (lambda a, b: kiln.div(a, b, rounding_mode="trunc"), [A * 3, B]),
    "trunc_divide_int": (lambda a, b: kiln.div(a, b, rounding_mode="trunc"), [IA, IB]),
    "where": (lambda c, a, b: kiln.where(c, a, b), [boolean(3, 4), A, f32(4)]),
    # reductions
    "sum": (lambda x: (x.sum(), x.sum(1, keepdim=True)), [A]),
    "mean": (lambda x: (x.mean(), x.mean(0)), [A]),
    "amax": (lambda x: (x.amax(), x.amax(1)), [A]), "amin": (lambda x: x.amin(0), [A]),
    "logsumexp": (lambda x: kiln.logsumexp(x, 1), [A]),
    "all": (lambda x: (x.all(), x.all(1)), [boolean(3, 4)]),
    "any": (lambda x: (x.any(), x.any(0)), [boolean(3, 4)]),
    "count_nonzero": (lambda x: kiln.count_nonzero(x), [IA]),
    "prod": (lambda x: (x.prod(), x.prod(1)), [A]),
    "argmax": (lambda x: (x.argmax(), x.argmax(1), x.argmax(0, keepdim=True)), [DISTINCT]),
    "argmin": (lambda x: (x.argmin(), x.argmin(1)), [DISTINCT]),
    "var": (lambda x: (x.var(), x.var(1, keepdim=True)), [A]),
    "std": (lambda x: x.std(0, correction=0), [A]),
    "norm": (lambda x: (x.norm(), x.norm(1, dim=1), x.norm(float("inf"), dim=0),
                        x.norm(3, dim=1)), [A]),
    "softmax": (lambda x: F.softmax(x, dim=1), [A]),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3),
                  [f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3)]),
    "attention_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                         [f32(2, 3, 5, 16), f32(2, 3, 7, 16), f32(2, 3, 7, 16)]),
    "attention_packed": (lambda x: F.scaled_dot_product_attention(
        *(t.reshape(2, 5, 2, 4).transpose(1, 2) for t in x.split(8, dim=2)), is_causal=True),
        [f32(2, 5, 24)]),
    "log_softmax": (lambda x: F.log_softmax(x, dim=0), [A]),
    "cumsum": (lambda x: kiln.cumsum(x, 1), [A]),
    "pick_along": (lambda x: x.max(1).values, [DISTINCT]),
    # linear algebra, convolution, pooling, normalization, losses
    "matmul": (kiln.matmul, [f32(2, 3, 4), f32(4, 5)]),
    "matmul_t": (lambda a, b: a @ b.t(), [f32(3, 4), f32(5, 4)]),
    "linear": (F.linear, [f32(3, 4), f32(5, 4), f32(5)]),
    "linear_3d": (F.linear, [f32(2, 3, 4), f32(5, 4), f32(5)]),
    "einsum": (lambda x: kiln.einsum("ij->ji", x) * 2, [A]),
    "einsum2": (lambda a, b: kiln.einsum("bij,bjk->bik", a, b), [f32(2, 3, 4), f32(2, 4, 5)]),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
               [f32(2, 3, 9, 9), f32(4, 3, 3, 3), f32(4)]),
    "conv2d_groups": (lambda x, w: F.conv2d(x, w, groups=2, dilation=2),
                      [f32(1, 4, 9, 9), f32(6, 2, 3, 3)]),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1),
                         [f32(1, 3, 5, 5), f32(3, 2, 3, 3)]),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, stride=2, padding=1), [f32(2, 3, 8, 8)]),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), [f32(2, 3, 8, 8)]),
    "avg_pool2d_pad": (lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                       [f32(2, 3, 8, 8)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (4,), w, b), [f32(2, 3, 4), f32(4), f32(4)]),
    "layer_norm_plain": (lambda x: F.layer_norm(x, (3, 4)), [f32(2, 3, 4)]),
    "cross_entropy": (F.cross_entropy, [f32(5, 4), i64(5, lo=0, hi=4)]),
    "nll_loss": (lambda x, t: F.nll_loss(x, t, reduction="sum"), [f32(5, 4), i64(5, lo=0, hi=4)]),
    "binary_cross_entropy": (F.binary_cross_entropy, [f32(3, 4, lo=0.05, hi=0.95),
                                                      f32(3, 4, lo=0.0, hi=1.0)]),
    # shapes
    "reshape": (lambda x: (x.reshape(4, 3), x[:0].reshape(0, 2, 2)), [A]),
    "permute": (lambda x: x.permute(2, 0, 1), [f32(2, 3, 4)]),
    "expand": (lambda x: x.expand(2, 3, 4), [f32(3, 1)]),
    "cat": (lambda a, b: kiln.cat([a, b], 1), [A, f32(3, 2)]),
    "flip": (lambda x: kiln.flip(x, (0, 1)), [A]),
    "roll": (lambda x: kiln.roll(x, (1, -1), (0, 1)), [A]),
    "tril": (lambda x: kiln.tril(x, 1), [A]), "triu": (lambda x: kiln.triu(x, -1), [A]),
    "pad": (lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), [A]),
    # indexing
    "index_view": (lambda x: (x[1], x[:, 1:3], x[None, ::2], x[1:, -1], x[..., 2]), [A]),
    "index": (lambda x, i: (x[i], x[:, i]), [A, kiln.tensor([2, 0, -1])]),
    "index_2d": (lambda x, i, j: x[i, j], [A, kiln.tensor([2, 0]), kiln.tensor([1, 3])]),
    "index_inner": (lambda x, i, j: (x[:, i, j], x[i, :, j]),
                    [f32(3, 3, 4, 5), kiln.tensor([[2, 0]]), kiln.tensor([1, 3])]),
    "embedding": (lambda i, w: F.embedding(i, w), [i64(2, 3, lo=0, hi=5), f32(5, 4)]),
    "gather": (lambda x, i: kiln.gather(x, 1, i), [A, i64(3, 2, lo=0, hi=4)]),
    "scatter": (lambda x, i, s: kiln.scatter(x, 1, i, s),
                [A, kiln.tensor([[0], [3], [1]]), f32(3, 2)]),
    "scatter_add": (lambda x, i, s: kiln.scatter_add(x, 1, i, s),
                    [A, i64(3, 5, lo=0, hi=4), f32(3, 5)]),
    "argsort": (lambda x: tuple(kiln.sort(x, 1, descending=True)), [DISTINCT]),
    "argtopk": (lambda x: tuple(kiln.topk(x, 2, dim=1)), [DISTINCT]),
    "one_hot": (lambda i: F.one_hot(i, 6), [i64(2, 3, lo=0, hi=6)]),
    "index_put": (lambda x, i, v: _setitem(x, i, v), [A, kiln.tensor([2, 0]), f32(2, 4)]),
    "copy": (lambda x, v: _copy(x, v), [A, f32(4)]),
}


NEEDS_OPSET = {"bitwise_and": 18, "bitwise_or": 18, "bitwise_xor": 18, "bitwise_not": 18}


def _setitem(x, i, v):
    y = x.clone()
    y[i] = v
    return y


def _copy(x, v):
    y = x * 2
    y.copy_(v)
    return y


@pytest.mark.parametrize("opset", [17, 20, onnx.defs.onnx_opset_version()])
@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive(name, opset, tmp_path):
    fn, inputs = CASES[name]
    if opset < NEEDS_OPSET.get(name, 0):
        with pytest.raises(RuntimeError, match=rf"primitive '{name}' .* opset {opset}: ONNX's "
                                               rf"Bitwise\w+ needs opset 18 or newer"):
            export(fn, tuple(inputs), tmp_path / "m.onnx", opset=opset)
        assert not (tmp_path / "m.onnx").exists()
        return
    m = check(fn, inputs, tmp_path, opset=opset)
    assert m.opset_import[0].version == opset


def test_every_exportable_primitive_has_a_case():
    from kiln.onnx.export_ops import EMIT
    from kiln.ops.registry import REGISTRY

    exportable = {k for k in EMIT if k in REGISTRY}
    covered = set()
    for fn, inputs in CASES.values():
        covered |= _primitives(fn, inputs)
    missing = exportable - covered - {"index_view_backward"}
    assert not missing, f"no test case uses {sorted(missing)}"


def _primitives(fn, inputs):
    from kiln.export.trace import capture

    cap = capture(fn, tuple(inputs))
    return {n.op for n in cap.graph.nodes}


# -- models ------------------------------------------------------------------------------------

def _initializer_names(model):
    return {t.name for t in model.graph.initializer}


def test_mlp_dynamic_batch(tmp_path):
    fn, W = workload_forward("mlp")
    x = kiln.tensor(W.infer_data("mlp", 4))
    others = [(kiln.tensor(W.infer_data("mlp", b)),) for b in (1, 7)]
    m = check(fn, [x], tmp_path, dynamic_dims={"x": {0: "batch"}}, others=others)
    assert op_types(m) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {"p['fc1.w']", "p['fc3.b']"} <= _initializer_names(m)


def test_cnn_dynamic_batch(tmp_path):
    fn, W = workload_forward("cnn")
    x = kiln.tensor(W.infer_data("cnn", 2))
    others = [(kiln.tensor(W.cnn_data(b, seed=b)[0]),) for b in (1, 5)]
    m = check(fn, [x], tmp_path, dynamic_dims={0: {0: "batch"}}, others=others)
    ops = op_types(m)
    assert ops.count("Conv") == 2 and ops.count("MaxPool") == 2
    assert "Gather" not in ops and "GatherND" not in ops  # no im2col-like gathers
    assert ops.count("Gemm") == 2


def test_gpt(tmp_path):
    fn, W = workload_forward("gpt")
    tok = W.gpt_data()[0]
    x = kiln.tensor(tok[:2])
    other = (kiln.tensor(np.ascontiguousarray(tok[2:4])),)
    m = check(fn, [x], tmp_path, others=[other])
    ops = set(op_types(m))
    assert {"LayerNormalization", "Softmax", "Gelu", "Gather", "MatMul", "Where"} <= ops
    assert not {"Erf", "ReduceMean", "Less"} & ops  # no decomposed gelu/norm, no index wrap


class _LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def test_lstm(tmp_path):
    kiln.manual_seed(0)
    m = _LSTMModel().eval()
    check(m, [f32(2, 5, 4)], tmp_path, others=[(f32(2, 5, 4),)])


def test_batchnorm_eval_is_one_op(tmp_path):
    kiln.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with kiln.no_grad():  # non-trivial running statistics
        model[1].running_mean.copy_(f32(4))
        model[1].running_var.copy_(f32(4, **POS))
        model[1].weight.copy_(f32(4))
        model[1].bias.copy_(f32(4))
    model.eval()
    others = [(f32(b, 3, 8, 8),) for b in (1, 6)]
    m = check(model, [f32(2, 3, 8, 8)], tmp_path, dynamic_dims={"input": {0: "N"}},
              others=others)
    assert op_types(m) == ["Conv", "BatchNormalization", "Relu", "AveragePool", "Reshape",
                           "Gemm"]
    weights = {n for n in _initializer_names(m) if not n.startswith("const")}
    assert weights == set(model.state_dict()) - {"1.num_batches_tracked"}


def test_batchnorm1d_without_affine(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, affine=False))
    with kiln.no_grad():
        model[1].running_mean.copy_(f32(5))
        model[1].running_var.copy_(f32(5, **POS))
    model.eval()
    m = check(model, [f32(4, 3)], tmp_path)
    assert "BatchNormalization" in op_types(m)


def test_dynamic_shape_arithmetic(tmp_path):
    # reshape with a multiple of the batch, expand to the batch, slices ending at it
    def fn(x, y):
        h = x.reshape(-1, 4) * 2
        e = y.expand(x.shape[0], 3, 4)
        return h, e + x[:, 1:].sum(1, keepdim=True), x[1:], x.var(0), x[-1]

    x, y = f32(2, 3, 4), f32(1, 4)
    others = [(f32(b, 3, 4), y) for b in (1, 9)]
    m = check(fn, [x, y], tmp_path, dynamic_dims={"x": {0: "b"}}, others=others)
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in m.graph.output]
    assert dims == [["3*b", 4], ["b", 3, 4], ["b-1", 3, 4], [3, 4], [3, 4]]


# -- opsets, names, the returned model ---------------------------------------------------------

def test_opset_17_gelu_formula(tmp_path):
    fn = lambda x: (F.gelu(x), F.gelu(x, approximate="tanh"))  # noqa: E731
    m = check(fn, [A], tmp_path, opset=17)
    assert m.opset_import[0].version == 17
    assert "Gelu" not in op_types(m) and "Erf" in op_types(m)


def test_opset_18_reduce_axes(tmp_path):
    fn = lambda x: (x.mean(1), x.amax(0), x.var(1))  # noqa: E731
    for opset in (17, 18):
        m = check(fn, [A], tmp_path, opset=opset)
        assert m.opset_import[0].version == opset


def test_default_opset_and_bad_opsets(tmp_path):
    m = export(F.relu, (A,), tmp_path / "m.onnx")
    assert m.opset_import[0].version == 20
    for bad in (16, onnx.defs.onnx_opset_version() + 1):
        with pytest.raises(ValueError, match=f"opset {bad} is not supported"):
            export(F.relu, (A,), tmp_path / "m.onnx", opset=bad)
    with pytest.raises(TypeError, match="opset must be an int"):
        export(F.relu, (A,), tmp_path / "m.onnx", opset="20")


def test_names_and_returned_model(tmp_path):
    path = tmp_path / "m.onnx"
    m = export(lambda a, b: (a + b, a), (A, B), path, input_names=["left", "right"],
               output_names=["total", "same"])
    assert isinstance(m, onnx.ModelProto)
    assert onnx.load(str(path)) == m
    assert [i.name for i in m.graph.input] == ["left", "right"]
    assert [o.name for o in m.graph.output] == ["total", "same"]
    total, same = _run(path, m, [A.numpy(), B.numpy()])
    _compare(total, (A + B).numpy())
    _compare(same, A.numpy())
    with pytest.raises(ValueError, match="input_names must be 2"):
        export(lambda a, b: a + b, (A, B), path, input_names=["x"])
    with pytest.raises(ValueError, match="duplicates"):
        export(lambda a, b: (a, b), (A, B), path, output_names=["y", "y"])


def test_same_value_twice_as_output(tmp_path):
    check(lambda x: (F.relu(x), F.relu(x), x), [A], tmp_path)


# -- errors --------------------------------------------------------------------------------------

def test_unsupported_primitive_names_it_and_the_line(tmp_path):
    path = tmp_path / "m.onnx"

    def fn(x):
        return kiln.cumprod(x, 1)  # the line the error names

    line = fn.__code__.co_firstlineno + 1
    with pytest.raises(RuntimeError, match=rf"primitive 'cumprod' at \S*test_export.py:{line}\b"
                                           r".* has no ONNX equivalent in opset 20"):
        export(fn, (A,), path)
    assert not path.exists()
    assert not [p for p in os.listdir(tmp_path)]  # no temporary file either


def test_failed_export_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    export(F.relu, (A,), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cumprod"):
        export(lambda x: kiln.cumprod(x, 0), (A,), path)
    assert path.read_bytes() == before


def test_random_and_backward_primitives_say_why(tmp_path):
    drop = nn.Dropout(0.5)  # training mode: a random mask
    with pytest.raises(RuntimeError, match="'dropout_mask' .* draws random numbers"):
        export(drop, (A,), tmp_path / "m.onnx")

    def grad_fn(x):
        x = x.detach().requires_grad_()
        with kiln.enable_grad():
            y = kiln.tanh(x).sum()
            (g,) = kiln.autograd.grad(y, x)
        return g

    with pytest.raises(RuntimeError, match="'tanh_backward' .* backward-pass primitive"):
        export(grad_fn, (A,), tmp_path / "m.onnx")


def _module_cases():
    kiln.manual_seed(0)
    return {
        "transformer_encoder": (nn.TransformerEncoder(nn.TransformerEncoderLayer(
            16, 4, 32, batch_first=True, activation="gelu", norm_first=True), 2), [f32(2, 5, 16)]),
        "multihead_attention": (nn.MultiheadAttention(16, 4, batch_first=True),
                                [f32(2, 5, 16), f32(2, 3, 16), f32(2, 3, 16)]),
        "gru": (nn.GRU(4, 6, batch_first=True), [f32(2, 5, 4)]),
        "rnn": (nn.RNN(4, 6), [f32(5, 2, 4)]),
        "conv_transpose": (nn.ConvTranspose2d(3, 2, 3, stride=2), [f32(1, 3, 5, 5)]),
        "conv1d": (nn.Conv1d(3, 2, 3, padding=1), [f32(2, 3, 7)]),
        "group_norm": (nn.GroupNorm(2, 4), [f32(2, 4, 3, 3)]),
        "embedding": (nn.Embedding(10, 4), [kiln.tensor([[1, 2], [3, 9]])]),
        "max_pool_ceil": (nn.MaxPool2d(3, 2, ceil_mode=True), [f32(1, 3, 8, 8)]),
        "adaptive_avg_pool": (nn.AdaptiveAvgPool2d((2, 2)), [f32(1, 3, 8, 8)]),
    }


MODULES = _module_cases()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module(name, tmp_path):
    model, inputs = MODULES[name]
    m = check(model.eval(), inputs, tmp_path)
    if name == "conv_transpose":
        assert op_types(m) == ["ConvTranspose"]  # the bias is ConvTranspose's input


def test_transformer_encoder_dynamic_batch(tmp_path):
    model, (x,) = MODULES["transformer_encoder"]
    others = [(f32(b, 5, 16),) for b in (1, 4)]
    m = check(model.eval(), [x], tmp_path, dynamic_dims={0: {0: "batch"}}, others=others)
    assert {"LayerNormalization", "Softmax", "Gelu", "MatMul"} <= set(op_types(m))


@pytest.mark.parametrize("pool", [
    lambda a: F.max_pool2d(a, 2, 2, 1, ceil_mode=True),
    lambda a: F.avg_pool2d(a, 2, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda a: F.max_pool2d(a, 3, 2, 0, ceil_mode=True),
    lambda a: F.avg_pool2d(a, 3, 2, 1, ceil_mode=True)])
def test_ceil_mode_pools_where_onnx_counts_another_window(tmp_path, pool):
    """Width 5, kernel 2, stride 2, padding 1: ONNX's ceil_mode would add a 4th window that
    starts in the padding; PyTorch and Kiln have 3."""
    x = kiln.randn(1, 3, 4, 5)
    m = export(pool, (x,), tmp_path / "p.onnx")
    sess = ort.InferenceSession(m.SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, pool(x).numpy(), rtol=1e-6, atol=1e-6)


def test_ceil_mode_average_counting_padding_is_refused_where_onnx_differs(tmp_path):
    with pytest.raises(RuntimeError, match="ceil_mode=True and count_include_pad=True"):
        export(lambda a: F.avg_pool2d(a, 2, 2, 1, ceil_mode=True), (kiln.randn(1, 3, 4, 5),),
               tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()
