"""The ONNX neural-network operators of kiln.onnx.ops.nn / rnn, one node at a time, against
ONNX Runtime (float32, tolerance 1e-5 relative to the output's scale), plus gradients through
imported Conv + BatchNormalization + Gemm against PyTorch."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

import kiln  # noqa: E402
from kiln.onnx.ops import OpContext, table  # noqa: E402

OPS = table()
OPSET = 22
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
         np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.float64): TensorProto.DOUBLE}


def run_ort(op, inputs, attrs, out_types, opset, reference=False):
    """Run a one-node model with ONNX Runtime (or onnx's reference evaluator, for the few ops
    ONNX Runtime lacks)."""
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"out{i}" for i in range(len(out_types))]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, _ELEM[x.dtype], x.shape)
         for n, x in zip(names, inputs) if x is not None],
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(outs, out_types)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    if reference:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, {n: x for n, x in zip(names, inputs) if n})
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: x for n, x in zip(names, inputs) if x is not None})


def run_kiln(op, inputs, attrs, n_out, opset, grad=False):
    vals = [None if x is None else kiln.tensor(x, requires_grad=grad) if x.dtype.kind == "f"
            else x for x in inputs]
    ctx = OpContext(op, "node0", dict(attrs), opset, n_out, inputs=vals)
    out = OPS[op](ctx, *vals)
    return (out if isinstance(out, tuple) else (out,)), vals


def _np(v):
    return v.numpy() if isinstance(v, kiln.Tensor) else np.asarray(v)


def check(op, inputs, attrs=None, out_types=(TensorProto.FLOAT,), opset=OPSET, reference=False):
    attrs = attrs or {}
    want = run_ort(op, inputs, attrs, out_types, opset, reference)
    got, _ = run_kiln(op, inputs, attrs, len(out_types), opset)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = _np(g)
        assert g.shape == w.shape, (op, g.shape, w.shape)
        scale = max(1.0, float(np.abs(w).max())) if w.size and w.dtype.kind == "f" else 1.0
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def rnd(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


# -- matrix products ---------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 2)),
                                   ((2, 1, 3, 4), (5, 4, 2)), ((3,), (3,))])
def test_matmul(sa, sb):
    check("MatMul", [rnd(*sa), rnd(*sb, seed=1)])


@pytest.mark.parametrize("attrs,sc", [({}, (5,)), ({"transB": 1}, (5,)),
                                      ({"transA": 1, "alpha": 0.5, "beta": 2.0}, (3, 5)),
                                      ({"transA": 1, "transB": 1}, (1, 5)), ({"transB": 1}, None),
                                      ({"transB": 1, "beta": 0.5}, ())])
def test_gemm(attrs, sc):
    a = rnd(4, 3) if attrs.get("transA") else rnd(3, 4)
    b = rnd(5, 4, seed=1) if attrs.get("transB") else rnd(4, 5, seed=1)
    check("Gemm", [a, b, None if sc is None else rnd(*sc, seed=2)], attrs)


def test_einsum():
    check("Einsum", [rnd(2, 3, 4), rnd(2, 4, 5, seed=1)], {"equation": "bij, bjk -> bik"})


# -- convolution -------------------------------------------------------------------------------

CONV = [
    ((1, 3, 7, 7), (4, 3, 3, 3), {}),
    ((2, 4, 8, 9), (6, 2, 3, 2), {"group": 2, "strides": [2, 1], "pads": [1, 0, 2, 1]}),
    ((1, 2, 9, 9), (3, 2, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((1, 2, 7, 8), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 2, 7, 8), (3, 2, 4, 4), {"auto_pad": "SAME_LOWER"}),
    ((1, 2, 7, 8), (3, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 3]}),
    ((2, 3, 10), (4, 3, 3), {"pads": [1, 2], "strides": [2]}),
    ((1, 2, 5, 6, 7), (3, 2, 2, 3, 3), {"pads": [1, 0, 1, 1, 1, 0], "strides": [2, 1, 2]}),
    ((1, 4, 5, 6, 5), (4, 1, 3, 1, 2), {"group": 4, "dilations": [2, 1, 1]}),
]


@pytest.mark.parametrize("sx,sw,attrs", CONV)
@pytest.mark.parametrize("bias", [False, True])
def test_conv(sx, sw, attrs, bias):
    check("Conv", [rnd(*sx), rnd(*sw, seed=1), rnd(sw[0], seed=2) if bias else None], attrs)


CONV_T = [
    ((1, 3, 4, 4), (3, 2, 3, 3), {}),
    ((1, 4, 3, 5), (4, 1, 3, 2), {"group": 2, "strides": [2, 3], "pads": [1, 0, 0, 1]}),
    ((1, 2, 4, 4), (2, 3, 3, 3), {"strides": [2, 2], "output_padding": [1, 1],
                                  "pads": [1, 1, 1, 1]}),
    ((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [8, 7]}),
    ((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 5, 5), (2, 3, 2, 2), {"dilations": [2, 2]}),
    ((2, 3, 6), (3, 2, 3), {"strides": [2], "pads": [1, 2]}),
    ((1, 2, 3, 4, 3), (2, 2, 2, 3, 2), {"strides": [2, 1, 2], "pads": [1, 0, 1, 0, 1, 0]}),
    ((1, 4, 3, 3, 3), (4, 1, 3, 2, 2), {"group": 2, "dilations": [2, 1, 1], "strides": [3, 1, 1],
                                        "output_padding": [1, 0, 0]}),
]


@pytest.mark.parametrize("sx,sw,attrs", CONV_T)
def test_conv_transpose(sx, sw, attrs):
    cout = sw[1] * attrs.get("group", 1)
    check("ConvTranspose", [rnd(*sx), rnd(*sw, seed=1), rnd(cout, seed=2)], attrs)


# -- pooling -----------------------------------------------------------------------------------

POOL = [
    ((1, 2, 7, 7), {"kernel_shape": [3, 3]}),
    ((1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 3, 8, 9), {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 2, 1],
                    "ceil_mode": 1}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 2], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "auto_pad": "VALID", "strides": [2, 3]}),
    ((1, 2, 6, 6), {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}),
    ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2], "strides": [1, 2, 2],
                       "pads": [0, 1, 1, 1, 1, 0]}),
]


@pytest.mark.parametrize("sx,attrs", POOL)
def test_max_pool(sx, attrs):
    check("MaxPool", [rnd(*sx)], attrs)


@pytest.mark.parametrize("attrs", [{"kernel_shape": [3, 3], "dilations": [2, 2]},
                                   {"kernel_shape": [2, 2], "dilations": [2, 1], "ceil_mode": 1,
                                    "strides": [2, 2], "pads": [1, 0, 1, 0]}])
def test_max_pool_dilated(attrs):
    check("MaxPool", [rnd(1, 2, 9, 8)], attrs)


@pytest.mark.parametrize("sx,attrs", [POOL[1], POOL[2], POOL[3], POOL[8], POOL[9]])
def test_max_pool_indices(sx, attrs):
    check("MaxPool", [rnd(*sx)], attrs, out_types=(TensorProto.FLOAT, TensorProto.INT64))


@pytest.mark.parametrize("sx,attrs", POOL)
@pytest.mark.parametrize("include", [0, 1])
def test_average_pool(sx, attrs, include):
    check("AveragePool", [rnd(*sx)], dict(attrs, count_include_pad=include))


@pytest.mark.parametrize("sx,attrs", [POOL[1], POOL[3], POOL[8]])
def test_lp_pool(sx, attrs):
    check("LpPool", [rnd(*sx)], dict(attrs, p=3))


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 7), (1, 2, 3, 4, 5)])
def test_global_pools(op, shape):
    check(op, [rnd(*shape)])


def test_global_lp_pool():  # neither ONNX Runtime nor onnx's reference runs it: NumPy oracle
    x = rnd(2, 3, 4, 5)
    got, _ = run_kiln("GlobalLpPool", [x], {"p": 3}, 1, OPSET)
    want = (np.abs(x.astype(np.float64)) ** 3).sum(axis=(2, 3), keepdims=True) ** (1 / 3)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5)


# -- normalization -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 3), (2, 3, 5)])
def test_batch_norm_inference(shape):
    c = shape[1]
    var = np.abs(rnd(c, seed=4)) + 0.5
    check("BatchNormalization", [rnd(*shape), rnd(c, seed=1), rnd(c, seed=2), rnd(c, seed=3),
                                 var], {"epsilon": 1e-3})


def test_batch_norm_training_outputs():
    var = np.abs(rnd(3, seed=4)) + 0.5
    check("BatchNormalization", [rnd(2, 3, 4, 5), rnd(3, seed=1), rnd(3, seed=2),
                                 rnd(3, seed=3), var], {"training_mode": 1, "momentum": 0.8},
          out_types=(TensorProto.FLOAT,) * 3)


@pytest.mark.parametrize("axis,n_out", [(-1, 1), (1, 1), (-2, 3), (0, 1)])
def test_layer_norm(axis, n_out):
    x = rnd(2, 3, 4)
    ns = x.shape[axis:]
    check("LayerNormalization", [x, rnd(*ns, seed=1), rnd(*ns, seed=2)],
          {"axis": axis, "epsilon": 1e-4}, out_types=(TensorProto.FLOAT,) * n_out)


def test_layer_norm_broadcast_scale_no_bias():
    check("LayerNormalization", [rnd(2, 3, 4), rnd(1, 4, seed=1)], {"axis": -2})


def test_instance_and_group_norm():
    check("InstanceNormalization", [rnd(2, 3, 4, 5), rnd(3, seed=1), rnd(3, seed=2)])
    check("GroupNormalization", [rnd(2, 6, 4, 5), rnd(6, seed=1), rnd(6, seed=2)],
          {"num_groups": 3, "epsilon": 1e-4}, opset=21)


@pytest.mark.parametrize("p,axis", [(1, -1), (2, 1)])
def test_lp_normalization(p, axis):
    check("LpNormalization", [rnd(2, 3, 4)], {"p": p, "axis": axis})


def test_mvn_and_lrn():
    check("MeanVarianceNormalization", [rnd(2, 3, 4, 5)])
    check("MeanVarianceNormalization", [rnd(2, 3, 4, 5)], {"axes": [1, 3]})
    check("LRN", [rnd(2, 5, 4, 3)], {"size": 3, "alpha": 1e-2, "beta": 0.6, "bias": 2.0})
    check("LRN", [rnd(2, 7, 4, 3)], {"size": 5})


# -- softmax and activations -------------------------------------------------------------------

@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("axis,opset", [(-1, 13), (1, 13), (1, 11), (0, 11), (2, 11)])
def test_softmax_family(op, axis, opset):
    check(op, [rnd(2, 3, 4)], {"axis": axis}, opset=opset)


ACT = [("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Elu", {"alpha": 0.7}), ("Selu", {}),
       ("Selu", {"alpha": 2.0, "gamma": 3.0}), ("Celu", {"alpha": 1.5}), ("Gelu", {}),
       ("Gelu", {"approximate": "tanh"}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
       ("HardSwish", {}), ("Softplus", {}), ("Softsign", {}), ("Mish", {}),
       ("ThresholdedRelu", {"alpha": 0.5}), ("Shrink", {"lambd": 0.6, "bias": 0.2}),
       ("Swish", {"alpha": 0.8})]


@pytest.mark.parametrize("op,attrs", ACT)
def test_activation(op, attrs):
    check(op, [rnd(3, 4, 5) * 3], attrs, opset=24 if op == "Swish" else OPSET)


def test_prelu_and_dropout():
    check("PRelu", [rnd(2, 3, 4), rnd(3, 1, seed=1)])
    check("Dropout", [rnd(3, 4)])
    check("Dropout", [rnd(3, 4), np.array(0.3, np.float32)],
          out_types=(TensorProto.FLOAT, TensorProto.BOOL))


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_space(mode):
    check("DepthToSpace", [rnd(2, 8, 3, 4)], {"blocksize": 2, "mode": mode})
    check("SpaceToDepth", [rnd(2, 3, 4, 6)], {"blocksize": 2})


# -- errors ------------------------------------------------------------------------------------

def test_unsupported_geometry_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="Conv: 4-D"):
        run_kiln("Conv", [rnd(1, 1, 3, 3, 3, 3), rnd(1, 1, 2, 2, 2, 2)], {}, 1, OPSET)


# -- recurrent ---------------------------------------------------------------------------------

def _rnn_inputs(op, direction, layout, seq_lens, init, peep=False, T=4, N=3, In=5, H=6):
    g = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    D = 2 if direction == "bidirectional" else 1
    x = rnd(N, T, In) if layout else rnd(T, N, In)
    state = (N, D, H) if layout else (D, N, H)
    ins = [x, rnd(D, g * H, In, seed=1) * 0.5, rnd(D, g * H, H, seed=2) * 0.5,
           rnd(D, 2 * g * H, seed=3) * 0.5,
           np.array([T, 2, 3][:N], np.int32) if seq_lens else None,
           rnd(*state, seed=4) if init else None]
    if op == "LSTM":
        ins += [rnd(*state, seed=5) if init else None, rnd(D, 3 * H, seed=6) if peep else None]
    attrs = {"hidden_size": H, "direction": direction, "layout": layout}
    outs = (TensorProto.FLOAT,) * (3 if op == "LSTM" else 2)
    return ins, attrs, outs


RNN_CASES = [("forward", 0, False, False), ("reverse", 0, False, True),
             ("bidirectional", 0, False, True), ("bidirectional", 1, False, True),
             ("forward", 0, True, True), ("bidirectional", 0, True, False)]


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction,layout,seq_lens,init", RNN_CASES)
def test_recurrent(op, direction, layout, seq_lens, init):
    ins, attrs, outs = _rnn_inputs(op, direction, layout, seq_lens, init)
    if seq_lens:  # ONNX Runtime takes sequence_lens as int32; Kiln reads it as a static value
        ins[4] = ins[4].astype(np.int32)
    _ELEM.setdefault(np.dtype(np.int32), TensorProto.INT32)
    if not layout:
        check(op, ins, attrs, out_types=outs)
        return
    # ONNX Runtime has no batch-first layout: compare with its layout-0 run, transposed
    ins0 = [x if x is None or i not in (0, 5, 6) else np.ascontiguousarray(np.swapaxes(x, 0, 1))
            for i, x in enumerate(ins)]
    want = run_ort(op, ins0, dict(attrs, layout=0), outs, OPSET)
    got, _ = run_kiln(op, ins, attrs, len(outs), OPSET)
    want = [np.transpose(want[0], (2, 0, 1, 3))] + [np.swapaxes(w, 0, 1) for w in want[1:]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,extra", [
    ("LSTM", {"clip": 0.5}), ("LSTM", {"input_forget": 1}),
    ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Tanh"],
              "activation_alpha": [0.3, 0.2], "activation_beta": [0.4]}),
    ("GRU", {"linear_before_reset": 1}), ("GRU", {"clip": 0.4}),
    ("RNN", {"activations": ["Relu"]}),
])
def test_recurrent_options(op, extra):
    ins, attrs, outs = _rnn_inputs(op, "forward", 0, False, True, peep=op == "LSTM")
    check(op, ins, dict(attrs, **extra), out_types=outs)


# -- gradients -----------------------------------------------------------------------------------

def test_conv_batchnorm_gemm_gradients_match_pytorch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x, w, b = rnd(2, 3, 8, 8), rnd(4, 3, 3, 3, seed=1), rnd(4, seed=2)
    scale, shift, mean, var = rnd(4, seed=3), rnd(4, seed=4), rnd(4, seed=5), rnd(4, seed=6) ** 2
    gw, gb = rnd(5, 24, seed=7), rnd(5, seed=8)
    params = [x, w, b, scale, shift, gw, gb]
    kx, kw, kb, ks, ksh, kgw, kgb = [kiln.tensor(p, requires_grad=True) for p in params]
    km, kv = kiln.tensor(mean), kiln.tensor(var)

    def node(op, *ins, n=1, **attrs):
        return OPS[op](OpContext(op, op, attrs, OPSET, n, inputs=list(ins)), *ins)

    y = node("Conv", kx, kw, kb, pads=[1, 0, 2, 1], strides=[1, 1])
    y = node("BatchNormalization", y, ks, ksh, km, kv, epsilon=1e-3)
    y = node("Relu", y)
    y = node("MaxPool", y, kernel_shape=[3, 3], strides=[3, 3], pads=[0, 0, 1, 1])
    y = node("Gemm", y.reshape(2, 24), kgw, kgb, transB=1, alpha=0.5)
    loss = (node("Softmax", y, axis=-1) * kiln.tensor(rnd(2, 5, seed=9))).sum()
    loss.backward()

    tx, tw, tb, ts, tsh, tgw, tgb = [torch.tensor(p, requires_grad=True) for p in params]
    t = tf.conv2d(tf.pad(tx, (0, 1, 1, 2)), tw, tb)
    t = tf.batch_norm(t, torch.tensor(mean), torch.tensor(var), ts, tsh, False, eps=1e-3)
    t = tf.max_pool2d(tf.pad(tf.relu(t), (0, 1, 0, 1), value=-float("inf")), 3, 3)
    t = 0.5 * (t.reshape(2, 24) @ tgw.T) + tgb
    tloss = (torch.softmax(t, -1) * torch.tensor(rnd(2, 5, seed=9))).sum()
    tloss.backward()
    np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-5)
    for k, t in zip([kx, kw, kb, ks, ksh, kgw, kgb], [tx, tw, tb, ts, tsh, tgw, tgb]):
        np.testing.assert_allclose(k.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_recurrent_gradients_match_finite_differences(op):
    ins, attrs, _ = _rnn_inputs(op, "bidirectional", 0, False, True, T=3, N=2, In=3, H=2)
    ins = [None if v is None else v.astype(np.float64) for v in ins]
    _ELEM.setdefault(np.dtype(np.float64), TensorProto.DOUBLE)
    got, vals = run_kiln(op, ins, attrs, 1, OPSET, grad=True)
    got[0].sum().backward()
    w = ins[1]
    eps, num = 1e-6, np.zeros_like(w)
    for i in np.ndindex(w.shape):
        for sign in (1, -1):
            wp = w.copy()
            wp[i] += sign * eps
            out, _ = run_kiln(op, ins[:1] + [wp] + ins[2:], attrs, 1, OPSET)
            num[i] += sign * out[0].numpy().sum() / (2 * eps)
    np.testing.assert_allclose(vals[1].grad.numpy(), num, rtol=1e-5, atol=1e-7)


# -- kiln.compile --------------------------------------------------------------------------------

COMPILED = [
    ("Conv", [(1, 2, 6, 6), (3, 2, 3, 3)], {"pads": [1, 0, 1, 2]}, 1),
    ("Conv", [(1, 2, 4, 5, 4), (3, 2, 2, 2, 2)], {"strides": [2, 1, 1]}, 1),
    ("ConvTranspose", [(1, 2, 3, 3), (2, 3, 3, 3)], {"strides": [2, 2], "pads": [1, 0, 0, 1]}, 1),
    ("MaxPool", [(1, 2, 7, 7)], {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}, 2),
    ("AveragePool", [(1, 2, 7, 7)], {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}, 1),
    ("LayerNormalization", [(2, 3, 4), (3, 4), (3, 4)], {"axis": 1}, 3),
    ("LSTM", [(3, 2, 4), (1, 8, 4), (1, 8, 2)], {"hidden_size": 2}, 3),
    ("GRU", [(3, 2, 4), (2, 6, 4), (2, 6, 2)], {"hidden_size": 2, "direction": "bidirectional"},
     2),
]


@pytest.mark.parametrize("op,shapes,attrs,n_out", COMPILED)
def test_compiled_matches_eager(op, shapes, attrs, n_out):
    def fn(*xs):
        return OPS[op](OpContext(op, op, attrs, OPSET, n_out, inputs=list(xs)), *xs)

    compiled = kiln.compile(fn)
    for seed in (0, 10, 20):  # the first call traces; later ones replay with new values
        xs = [kiln.tensor(rnd(*s, seed=seed + i)) for i, s in enumerate(shapes)]
        with kiln.no_grad():
            want, got = fn(*xs), compiled(*xs)
        for g, w in zip(got, want):
            np.testing.assert_allclose(_np(g), _np(w), rtol=1e-6, atol=1e-6)


# -- resize ------------------------------------------------------------------------------------

RESIZE = [
    ({"mode": "linear"}, [1, 1, 2, 1.5], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, [1, 1, 0.6, 2.5], None),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     [1, 1, 3, 2], None),
    ({"mode": "nearest"}, None, [2, 3, 7, 3]),
    ({"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, [1, 1, 1.7, 0.8], None),
    ({"mode": "linear", "antialias": 1}, [1, 1, 0.5, 0.4], None),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel", "axes": [3, 2],
      "keep_aspect_ratio_policy": "not_larger"}, None, [9, 9]),
]


@pytest.mark.parametrize("attrs,scales,sizes", RESIZE)
def test_resize(attrs, scales, sizes):
    sc = None if scales is None else np.array(scales, np.float32)
    sz = None if sizes is None else np.array(sizes, np.int64)
    check("Resize", [rnd(2, 3, 5, 6), None, sc, sz], attrs)


def test_resize_crop_and_resize_extrapolates():
    roi = np.array([0, 0, -0.2, 0.3, 1, 1, 0.9, 1.4], np.float32)
    check("Resize", [rnd(1, 2, 5, 6), roi, None, np.array([1, 2, 4, 5], np.int64)],
          {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
           "extrapolation_value": 7.0})


def test_rms_norm():
    check("RMSNormalization", [rnd(2, 3, 4), rnd(3, 4, seed=1)], {"axis": 1, "epsilon": 1e-3},
          opset=23)


# -- attention ---------------------------------------------------------------------------------

def test_attention_4d_causal_with_mask_and_past():
    q, k, v = rnd(2, 4, 3, 8), rnd(2, 2, 3, 8, seed=1), rnd(2, 2, 3, 6, seed=2)
    past_k, past_v = rnd(2, 2, 4, 8, seed=3), rnd(2, 2, 4, 6, seed=4)
    mask = rnd(3, 7, seed=5)
    check("Attention", [q, k, v, mask, past_k, past_v], {"is_causal": 1, "scale": 0.3},
          out_types=(TensorProto.FLOAT,) * 3, opset=23)


def test_attention_3d_gqa_bool_mask_softcap():
    q, k, v = rnd(2, 5, 16), rnd(2, 5, 8, seed=1), rnd(2, 5, 8, seed=2)
    mask = np.random.default_rng(0).random((2, 1, 5, 5)) > 0.3
    mask[..., 0] = True
    check("Attention", [q, k, v, mask], {"q_num_heads": 4, "kv_num_heads": 2, "softcap": 2.0},
          opset=23)


def test_attention_qk_output_modes():
    q, k, v = rnd(1, 2, 3, 4), rnd(1, 2, 5, 4, seed=1), rnd(1, 2, 5, 4, seed=2)
    for mode in (0, 2, 3):
        check("Attention", [q, k, v, rnd(3, 5, seed=3)], {"qk_matmul_output_mode": mode},
              out_types=(TensorProto.FLOAT,) * 4, opset=23, reference=True)


# -- losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs", [{}, {"reduction": "sum", "ignore_index": 2},
                                   {"reduction": "none", "ignore_index": -1}])
@pytest.mark.parametrize("weighted", [False, True])
def test_losses(attrs, weighted):
    target = np.array([[0, 2, 1], [3, -1, 2]], np.int64) if attrs.get("ignore_index") == -1 \
        else np.array([[0, 2, 1], [3, 3, 2]], np.int64)
    w = rnd(4, seed=2) ** 2 if weighted else None
    check("NegativeLogLikelihoodLoss", [rnd(2, 4, 3), target, w], attrs)
    check("SoftmaxCrossEntropyLoss", [rnd(2, 4, 3), target, w], attrs,
          out_types=(TensorProto.FLOAT,) * 2)


def test_cross_entropy_gradient_matches_pytorch():
    torch = pytest.importorskip("torch")
    x, target, w = rnd(5, 4), np.array([0, 3, 1, 1, 2]), rnd(4, seed=1) ** 2
    got, vals = run_kiln("SoftmaxCrossEntropyLoss", [x, target, w], {"ignore_index": 1}, 1,
                         OPSET, grad=True)
    got[0].backward()
    tx = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.cross_entropy(tx, torch.tensor(target), torch.tensor(w),
                                             ignore_index=1)
    want.backward()
    np.testing.assert_allclose(got[0].item(), want.item(), rtol=1e-5)
    np.testing.assert_allclose(vals[0].grad.numpy(), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


# -- newer operators (onnx's reference evaluator where ONNX Runtime lacks them) -------------------

def test_max_unpool():
    x = rnd(1, 2, 6, 6)
    y, idx = run_ort("MaxPool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]},
                     (TensorProto.FLOAT, TensorProto.INT64), OPSET)
    check("MaxUnpool", [y, idx], {"kernel_shape": [2, 2], "strides": [2, 2]})
    # with output_shape, ONNX Runtime and the ONNX reference (and node tests) disagree: Kiln
    # follows the reference
    check("MaxUnpool", [y, idx, np.array([1, 2, 7, 7], np.int64)],
          {"kernel_shape": [2, 2], "strides": [2, 2]}, reference=True)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding(interleaved):
    x, cos, sin = rnd(2, 3, 5, 8), rnd(10, 3, seed=1), rnd(10, 3, seed=2)
    pos = np.array([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], np.int64)
    check("RotaryEmbedding", [x, cos, sin, pos],
          {"interleaved": interleaved, "rotary_embedding_dim": 6}, opset=23)
    check("RotaryEmbedding", [rnd(2, 5, 12), rnd(2, 5, 2, seed=1), rnd(2, 5, 2, seed=2)],
          {"interleaved": interleaved, "num_heads": 3}, opset=23)


def test_swiglu_causal_conv_linear_attention():
    check("SwiGLU", [rnd(3, 4), rnd(3, 4, seed=1)], {"alpha": 1.3}, opset=26, reference=True)
    check("CausalConvWithState", [rnd(2, 3, 6), rnd(3, 1, 3, seed=1), rnd(3, seed=2),
                                  rnd(2, 3, 2, seed=3)], {"activation": "silu"},
          out_types=(TensorProto.FLOAT,) * 2, opset=26, reference=True)
    q, k, v = rnd(2, 4, 8), rnd(2, 4, 4, seed=1), rnd(2, 4, 6, seed=2)
    decay, beta = -np.abs(rnd(2, 4, 1, seed=3)), np.abs(rnd(2, 4, 1, seed=4))
    check("LinearAttention", [q, k, v, rnd(2, 1, 4, 6, seed=5), decay, beta],
          {"q_num_heads": 2, "kv_num_heads": 1}, out_types=(TensorProto.FLOAT,) * 2,
          opset=26, reference=True)


def test_group_norm_opset18_per_group_scale():
    check("GroupNormalization", [rnd(2, 6, 4), rnd(3, seed=1), rnd(3, seed=2)],
          {"num_groups": 3}, opset=18, reference=True)


# -- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("align", [0, 1])
def test_affine_grid(align):
    theta = rnd(2, 2, 3)
    check("AffineGrid", [theta, np.array([2, 3, 4, 5], np.int64)], {"align_corners": align},
          opset=20)
    check("AffineGrid", [rnd(1, 3, 4), np.array([1, 1, 2, 3, 4], np.int64)],
          {"align_corners": align}, opset=20)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample(mode, padding, align):
    grid = np.random.default_rng(3).uniform(-1.4, 1.4, (2, 3, 4, 2)).astype(np.float32)
    check("GridSample", [rnd(2, 3, 5, 6), grid],
          {"mode": mode, "padding_mode": padding, "align_corners": align}, opset=20)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_grid_sample_3d(mode):
    grid = np.random.default_rng(4).uniform(-1.2, 1.2, (1, 2, 3, 4, 3)).astype(np.float32)
    check("GridSample", [rnd(1, 2, 3, 4, 5), grid], {"mode": mode}, opset=20)


def test_grid_sample_gradients_match_pytorch():
    torch = pytest.importorskip("torch")
    x = rnd(1, 2, 5, 6)
    grid = np.random.default_rng(5).uniform(-1.1, 1.1, (1, 3, 4, 2)).astype(np.float32)
    got, vals = run_kiln("GridSample", [x, grid], {"padding_mode": "border"}, 1, 20, grad=True)
    (got[0] * got[0]).sum().backward()
    tx, tg = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
    want = torch.nn.functional.grid_sample(tx, tg, padding_mode="border", align_corners=False)
    (want * want).sum().backward()
    np.testing.assert_allclose(got[0].detach().numpy(), want.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(vals[0].grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vals[1].grad.numpy(), tg.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_col2im():
    x = rnd(2, 3 * 2 * 3, 12)
    check("Col2Im", [x, np.array([5, 6], np.int64), np.array([2, 3], np.int64)],
          {"strides": [1, 2], "pads": [1, 0, 0, 1], "dilations": [2, 1]}, opset=18)


def test_deform_conv():
    x, w = rnd(2, 4, 6, 7), rnd(6, 2, 3, 2, seed=1)
    attrs = {"group": 2, "offset_group": 2, "pads": [1, 0, 1, 1], "strides": [2, 1],
             "dilations": [1, 2]}
    oh, ow = (6 + 2 - 3) // 2 + 1, (7 + 1 - 3) // 1 + 1
    offset = rnd(2, 2 * 2 * 3 * 2, oh, ow, seed=2)
    mask = np.abs(rnd(2, 2 * 3 * 2, oh, ow, seed=3))
    check("DeformConv", [x, w, offset, rnd(6, seed=4), mask], attrs, opset=22, reference=True)
    # with zero offsets and no mask it is a plain convolution (ONNX Runtime's Conv)
    zero = np.zeros_like(offset)
    got, _ = run_kiln("DeformConv", [x, w, zero], attrs, 1, 22)
    want = run_ort("Conv", [x, w], {k: v for k, v in attrs.items() if k != "offset_group"},
                   (TensorProto.FLOAT,), OPSET)[0]
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm,ratio", [("half_pixel", 0), ("output_half_pixel", 2)])
def test_roi_align(mode, ctm, ratio):
    x = rnd(2, 3, 10, 12)
    rois = np.array([[0, 0, 9, 9], [2.5, 1.2, 11.5, 5.5], [-1, 3, 4, 12.5]], np.float32)
    check("RoiAlign", [x, rois, np.array([0, 1, 1], np.int64)],
          {"mode": mode, "coordinate_transformation_mode": ctm, "sampling_ratio": ratio,
           "output_height": 3, "output_width": 4, "spatial_scale": 0.9}, opset=16)


def test_attention_gradients_match_pytorch():
    torch = pytest.importorskip("torch")
    q, k, v = rnd(2, 4, 5, 8), rnd(2, 2, 5, 8, seed=1), rnd(2, 2, 5, 8, seed=2)
    got, vals = run_kiln("Attention", [q, k, v], {"is_causal": 1}, 1, 23, grad=True)
    (got[0] * got[0]).sum().backward()
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                            enable_gqa=True)
    (want * want).sum().backward()
    np.testing.assert_allclose(got[0].detach().numpy(), want.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    for kt, tt in zip(vals, (tq, tk, tv)):
        np.testing.assert_allclose(kt.grad.numpy(), tt.grad.numpy(), rtol=1e-4, atol=1e-5)
