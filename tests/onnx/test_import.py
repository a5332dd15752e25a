"""kiln.onnx.load: hand-built and PyTorch-exported models against ONNX Runtime and PyTorch."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import kiln  # noqa: E402
from kiln.onnx.backend import KilnBackend  # noqa: E402

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _shape_model():
    """x (B, 4, 6) -> a chain of shape ops, reductions and Where; the Reshape target is computed
    from Shape(x) at run time, the weights are initializers."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w.weight")
    b = numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "b:0")
    idx = numpy_helper.from_array(np.array([2, 0, -1], np.int64), "idx")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(
            np.array(0, np.int64))),
        helper.make_node("Constant", [], ["minus1"], value_ints=[-1]),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
        helper.make_node("Constant", [], ["ax0"], value_ints=[0]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "w.weight"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "b:0"], ["h2"]),
        helper.make_node("Gather", ["h2", "idx"], ["g"], axis=2),
        helper.make_node("Slice", ["g", "st", "en", "axs", "stp"], ["sl"]),
        helper.make_node("Constant", [], ["st"], value_ints=[-1]),
        helper.make_node("Constant", [], ["en"], value_ints=[-100]),
        helper.make_node("Constant", [], ["axs"], value_ints=[1]),
        helper.make_node("Constant", [], ["stp"], value_ints=[-2]),
        helper.make_node("ReduceMean", ["sl"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Greater", ["sl", "m"], ["c"]),
        helper.make_node("Tanh", ["sl"], ["t"]),
        helper.make_node("Where", ["c", "sl", "t"], ["wh"]),
        helper.make_node("Reshape", ["wh", "target"], ["y"]),
    ]
    # the Constants are listed after their consumers above; ONNX needs topological order
    order = {n.output[0]: n for n in nodes}
    sorted_nodes, done = [], set()

    def visit(n):
        for i in n.input:
            if i in order and i not in done:
                visit(order[i])
        if n.output[0] not in done:
            done.add(n.output[0])
            sorted_nodes.append(n)

    for n in nodes:
        visit(n)
    return _model(sorted_nodes, [_vi("x", F32, ["B", 4, 6])], [_vi("y", F32, ["B", 9])],
                  [w, b, idx], opset=13)


def _x(batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, 4, 6)).astype(np.float32)


def test_hand_built_model_matches_onnxruntime_at_two_batch_sizes():
    model = _shape_model()
    onnx.checker.check_model(model, full_check=True)
    m = kiln.onnx.load(model)
    for batch in (2, 5):
        x = _x(batch)
        (want,) = _ort(model, {"x": x})
        got = m(kiln.tensor(x))
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(force=True), want, rtol=1e-5, atol=1e-6)


def test_initializers_float_are_parameters_integers_static():
    m = kiln.onnx.load(_shape_model())
    params = dict(m.named_parameters())
    assert set(params) == {"w_weight", "b_0"}
    assert all(isinstance(p, kiln.nn.Parameter) and p.requires_grad for p in params.values())
    assert m.onnx_names == {"w_weight": "w.weight", "b_0": "b:0"}
    assert m.input_names == ["x"] and m.output_names == ["y"]
    # the integer initializer and the Constants are static values, not state
    assert "idx" not in dict(m.named_buffers())


def test_state_dict_round_trip():
    model = _shape_model()
    a, b = kiln.onnx.load(model), kiln.onnx.load(model)
    with kiln.no_grad():
        a.w_weight.mul_(2.0)
        a.b_0.add_(1.0)
    x = kiln.tensor(_x())
    assert not np.allclose(a(x).numpy(force=True), b(x).numpy(force=True))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x).numpy(force=True), b(x).numpy(force=True))


def test_compiled_equals_eager():
    m = kiln.onnx.load(_shape_model())
    compiled = kiln.compile(m)
    with kiln.no_grad():
        for batch in (2, 3, 7, 2):
            x = kiln.tensor(_x(batch, seed=batch))
            np.testing.assert_allclose(compiled(x).numpy(), m(x).numpy(), rtol=1e-6, atol=1e-7)
    assert compiled.entries and not any(e.eager for e in compiled.entries), compiled.history


def _torch_mlp():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return torch, net


def _export_torch(torch, net, x, tmp_path):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.tensor(x),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "B"}})
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gradients_match_pytorch_for_an_imported_mlp(tmp_path):
    torch, net = _torch_mlp()
    x = np.random.default_rng(3).standard_normal((4, 5)).astype(np.float32)
    m = kiln.onnx.load(_export_torch(torch, net, x, tmp_path))
    assert len(list(m.parameters())) == 4
    out = m(kiln.tensor(x))
    (out * out).sum().backward()
    tout = net(torch.tensor(x))
    (tout * tout).sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), tout.detach().numpy(), rtol=1e-5, atol=1e-6)
    grads = {m.onnx_names[k]: p.grad.numpy() for k, p in m.named_parameters()}
    assert set(grads) == {n for n, _ in net.named_parameters()}
    for name, p in net.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fine_tuning_an_imported_model_lowers_the_loss(tmp_path):
    torch, net = _torch_mlp()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = rng.standard_normal((16, 3)).astype(np.float32)
    m = kiln.onnx.load(_export_torch(torch, net, x, tmp_path))
    opt = kiln.optim.SGD(m.parameters(), lr=0.1)
    xt, yt = kiln.tensor(x), kiln.tensor(y)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((m(xt) - yt) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_training_step_matches_eager(tmp_path):
    torch, net = _torch_mlp()
    rng = np.random.default_rng(5)
    x = kiln.tensor(rng.standard_normal((8, 5)).astype(np.float32))
    y = kiln.tensor(rng.standard_normal((8, 3)).astype(np.float32))
    path = _export_torch(torch, net, x.numpy(), tmp_path)
    losses = {}
    for mode in ("eager", "compiled"):
        m = kiln.onnx.load(path)
        opt = kiln.optim.Adam(m.parameters(), lr=1e-2)

        def step():
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        run = kiln.compile(step) if mode == "compiled" else step
        losses[mode] = [run().item() for _ in range(5)]
        if mode == "compiled":
            assert run.entries and not any(e.eager for e in run.entries), run.history
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)
    assert losses["eager"][-1] < losses["eager"][0]


@pytest.mark.parametrize("op", ["Atan", "Asin", "Acos", "Tan", "Sinh", "Cosh", "Asinh", "Acosh",
                                "Atanh"])
def test_composed_math_ops_values_and_gradients(op):
    # Kiln has no primitive for these: they are compositions, checked against ONNX Runtime
    # (values) and PyTorch (gradients)
    torch = pytest.importorskip("torch")
    model = _model([helper.make_node(op, ["x"], ["y"])], [_vi("x", F32, [9])],
                   [_vi("y", F32, [9])])
    low = 1.05 if op == "Acosh" else -0.95
    high = 3.0 if op == "Acosh" else 0.95
    x = np.concatenate([np.linspace(low, high, 8), [0.0 if low < 0 else 2.0]]).astype(np.float32)
    (want,) = _ort(model, {"x": x})
    xt = kiln.tensor(x, requires_grad=True)
    y = kiln.onnx.load(model)(xt)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=2e-6, atol=1e-6)
    y.sum().backward()
    tx = torch.tensor(x, requires_grad=True)
    getattr(torch, op.lower())(tx).sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_loads_from_path_and_bytes(tmp_path):
    model = _shape_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = kiln.tensor(_x())
    want = kiln.onnx.load(model)(x).numpy(force=True)
    for src in (str(path), path, model.SerializeToString()):
        np.testing.assert_array_equal(kiln.onnx.load(src)(x).numpy(force=True), want)


def test_inputs_by_name_and_multiple_outputs():
    nodes = [helper.make_node("Sub", ["a", "b"], ["d"]),
             helper.make_node("Split", ["d"], ["p", "q"], axis=0)]
    model = _model(nodes, [_vi("a", F32, [4]), _vi("b", F32, [4])],
                   [_vi("p", F32, [2]), _vi("q", F32, [2])])
    a = np.arange(4, dtype=np.float32)
    b = np.ones(4, np.float32)
    m = kiln.onnx.load(model)
    p, q = m(b=kiln.tensor(b), a=kiln.tensor(a))
    want = _ort(model, {"a": a, "b": b})
    np.testing.assert_array_equal(p.numpy(), want[0])
    np.testing.assert_array_equal(q.numpy(), want[1])


def test_float_initializer_in_a_static_slot_runs_eager_and_compiled():
    # Range reads its (float) inputs while building the computation: initializers that are
    # Parameters are read directly, also while kiln.compile traces
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("start", 0.5), ("limit", 3.0), ("delta", 0.5))]
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Mul", ["x", "r"], ["y"])]
    model = _model(nodes, [_vi("x", F32, [5])], [_vi("y", F32, [5])], inits)
    x = np.linspace(-1, 1, 5).astype(np.float32)
    (want,) = _ort(model, {"x": x})
    m = kiln.onnx.load(model)
    compiled = kiln.compile(m)
    with kiln.no_grad():
        np.testing.assert_allclose(m(kiln.tensor(x)).numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(compiled(kiln.tensor(x)).numpy(), want, rtol=1e-6)


def _loop_model():
    """y = x * 2**n by a Loop (n an input), then an If on a shape-derived condition."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"]),
         helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0)],
        "body", [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []),
                 _vi("acc_in", F32, [3])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("acc_out", F32, [3]), _vi("total", F32, [])])
    then_g = helper.make_graph([helper.make_node("Neg", ["acc"], ["t"])], "then", [],
                               [_vi("t", F32, [3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["acc"], ["e"])], "else", [],
                               [_vi("e", F32, [3])])
    nodes = [
        helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["n", "true", "x"], ["acc", "totals"], body=body),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("ReduceSum", ["s"], ["s3"], keepdims=0),
        helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(
            np.array(3, np.int64))),
        helper.make_node("Equal", ["s3", "three"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    return _model(nodes, [_vi("x", F32, [3]), _vi("n", TensorProto.INT64, [])],
                  [_vi("y", F32, [3]), _vi("totals", F32, None)], opset=13)


def test_loop_and_if_match_onnxruntime_and_give_gradients():
    model = _loop_model()
    x = np.array([1.0, -2.0, 0.5], np.float32)
    n = np.array(3, np.int64)
    want = _ort(model, {"x": x, "n": n})
    m = kiln.onnx.load(model)
    xt = kiln.tensor(x, requires_grad=True)
    y, totals = m(xt, kiln.tensor(n))
    np.testing.assert_allclose(y.detach().numpy(), want[0], rtol=1e-6)
    np.testing.assert_allclose(totals.detach().numpy(), want[1], rtol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(xt.grad.numpy(), np.full(3, -8.0, np.float32))


# -- errors --------------------------------------------------------------------------------------

def test_unknown_ops_are_all_listed_with_their_nodes():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("NoSuchOp", ["a"], ["b"], name="first_bad"),
             helper.make_node("AlsoMissing", ["b"], ["y"], name="second_bad")]
    model = _model(nodes, [_vi("x", F32, [2])], [_vi("y", F32, [2])])
    with pytest.raises(NotImplementedError) as e:
        kiln.onnx.load(model)
    msg = str(e.value)
    assert "AlsoMissing" in msg and "NoSuchOp" in msg
    assert "'first_bad' (NoSuchOp)" in msg and "'second_bad' (AlsoMissing)" in msg


def test_foreign_domain_is_refused():
    node = helper.make_node("FusedGemm", ["x"], ["y"], domain="com.microsoft", name="fg")
    graph = helper.make_graph([node], "g", [_vi("x", F32, [2])], [_vi("y", F32, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(NotImplementedError, match="'fg' \\(FusedGemm\\) in domain 'com.microsoft'"):
        kiln.onnx.load(model)


def test_undefined_values_are_named_at_load_time():
    nodes = [helper.make_node("Add", ["x", "nowhere"], ["y"], name="adder")]
    model = _model(nodes, [_vi("x", F32, [2])], [_vi("y", F32, [2])])
    with pytest.raises(ValueError, match="input 'nowhere' of node 'adder' \\(Add\\)"):
        kiln.onnx.load(model)


def test_missing_file_and_malformed_bytes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        kiln.onnx.load(str(tmp_path / "absent.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 definitely not protobuf \xff\xff")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        kiln.onnx.load(str(bad))
    with pytest.raises(TypeError, match="path, bytes or an onnx.ModelProto"):
        kiln.onnx.load(42)


def test_unsupported_dtype_is_named():
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [_vi("x", TensorProto.FLOAT8E4M3FN, [2])],
                   [_vi("y", TensorProto.FLOAT8E4M3FN, [2])])
    with pytest.raises(TypeError, match="graph input .x. has ONNX element type FLOAT8E4M3FN"):
        kiln.onnx.load(model)


def test_wrong_inputs_are_clear_errors():
    m = kiln.onnx.load(_shape_model())
    x = kiln.tensor(_x())
    with pytest.raises(TypeError, match="takes 1 input"):
        m(x, x)
    with pytest.raises(TypeError, match="the ONNX model: missing input"):
        m()
    with pytest.raises(TypeError, match="unexpected input .z."):
        m(z=x)
    with pytest.raises(TypeError, match="must have dtype float32"):
        m(kiln.tensor(_x().astype(np.float64)))


def test_runtime_errors_name_the_node():
    model = _model([helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")],
                   [_vi("x", F32, [2, 3]), _vi("s", TensorProto.INT64, [2])],
                   [_vi("y", F32, None)])
    m = kiln.onnx.load(model)
    with pytest.raises(RuntimeError, match="bad_reshape"):
        m(kiln.ones(2, 3), kiln.tensor(np.array([4, 4])))


# -- the backend ---------------------------------------------------------------------------------

def test_backend_prepare_run_and_run_node():
    model = _shape_model()
    assert KilnBackend.supports_device("CPU") and not KilnBackend.supports_device("CUDA")
    x = _x(3)
    (got,) = KilnBackend.prepare(model).run([x])
    (want,) = _ort(model, {"x": x})
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    node = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    v = np.linspace(-3, 3, 7).astype(np.float32)
    (y,) = KilnBackend.run_node(node, [v, np.float32(-1), np.float32(2)])
    np.testing.assert_array_equal(y, np.clip(v, -1, 2))


def test_unsigned_types_round_trip_through_the_backend():
    model = _model([helper.make_node("Add", ["a", "b"], ["y"])],
                   [_vi("a", TensorProto.UINT32, [3]), _vi("b", TensorProto.UINT32, [3])],
                   [_vi("y", TensorProto.UINT32, [3])])
    a = np.array([1, 2, 4_000_000_000], np.uint32)
    b = np.array([3, 4, 500_000_000], np.uint32)
    (got,) = KilnBackend.prepare(model).run([a, b])
    (want,) = _ort(model, {"a": a, "b": b})
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)


def test_batchnorm_statistics_are_buffers_not_parameters():
    rng = np.random.default_rng(3)
    arrays = {"scale": rng.random(3) + 0.5, "bias": rng.standard_normal(3),
              "mean": rng.standard_normal(3), "var": rng.random(3) + 0.5}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])
    model = _model([node], [_vi("x", F32, [2, 3, 4])], [_vi("y", F32, [2, 3, 4])], inits)
    m = kiln.onnx.load(model)
    assert {m.onnx_names[k] for k, _ in m.named_parameters()} == {"scale", "bias"}
    assert {m.onnx_names[k] for k, _ in m.named_buffers()} == {"mean", "var"}
    assert set(m.state_dict()) == set(m.onnx_names)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    y = m(kiln.tensor(x))
    np.testing.assert_allclose(y.detach().numpy(), _ort(model, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)
    y.sum().backward()  # gradients reach the parameters; the statistics stay fixed
    assert all(p.grad is not None for p in m.parameters())


def test_empty_input_and_directories_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        kiln.onnx.load(b"")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        kiln.onnx.load(empty)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        kiln.onnx.load(tmp_path)


def test_input_shapes_are_checked_against_the_declared_ones():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = _model([node], [helper.make_tensor_value_info("x", F32, ["N", 3])],
                   [_vi("y", F32, ["N", 3])])
    m = kiln.onnx.load(model)
    assert m(kiln.ones(5, 3)).shape == (5, 3)
    with pytest.raises(ValueError, match=r"input 'x' must have shape \(\?, 3\).*got \(2, 4\)"):
        m(kiln.ones(2, 4))
    with pytest.raises(ValueError, match="got \\(3,\\)"):
        m(kiln.ones(3))
