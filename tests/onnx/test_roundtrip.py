"""Round trips through ONNX files, and the export benchmark's smoke test.

- PyTorch -> ONNX -> Kiln: a small ResNet-style CNN (BatchNorm in eval mode) and a transformer
  encoder, exported with ``torch.onnx.export`` (the dynamo exporter, PyTorch's default, and the
  legacy TorchScript exporter without constant folding, which keeps BatchNormalization nodes and
  PyTorch's parameter names), loaded with ``kiln.onnx.load``: PyTorch's outputs, the same under
  ``kiln.compile``, PyTorch's gradients, other batch sizes (``dynamic_axes``), fine-tuning
  eagerly and compiled; and a PyTorch LSTM (ONNX LSTM nodes).
- Kiln -> ONNX -> Kiln: the mlp, cnn and gpt workloads, an LSTM and a BatchNorm model give the
  original model's outputs (and, for the modules, its gradients); a dynamic batch dimension
  works at other sizes in Kiln and ONNX Runtime.

Tolerance (float32), for outputs and gradients: max abs diff <= 1e-5 * max(1, max |expected|).
Exports from PyTorch are cached per module (the dynamo exporter takes seconds).
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import kiln  # noqa: E402
import kiln.onnx  # noqa: E402
from kiln import nn  # noqa: E402
from tests.helpers import workload_forward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
RTOL = 1e-5


def assert_close(got, want, what="output", rtol=RTOL):
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    err = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} > {rtol * scale:.3g}"


def op_types(path) -> set:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# -- PyTorch models ------------------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(c)
        self.c2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(x + self.b2(self.c2(h)))


class ResNet(torch.nn.Module):
    """conv-bn-relu stem, max pool, one residual block, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.MaxPool2d(2))
        self.block = Block(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


class Encoder(torch.nn.Module):
    """A linear embedding, two post-LN TransformerEncoderLayers (batch_first), a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(16, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)))


def _perturb(model, seed):
    """Distinct values for every parameter and BatchNorm statistic: the encoder's layers start
    as copies and BatchNorm as ones/zeros, which the exporters would deduplicate or fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype.is_floating_point:
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            if name.endswith("running_var"):
                t.abs_().add_(0.5)
    return model.eval()


TORCH_MODELS = {"resnet": (ResNet, (2, 3, 16, 16)), "encoder": (Encoder, (2, 7, 16))}
# dynamo: PyTorch's default exporter (opset 18+, BatchNorm folded into Conv).  legacy: the
# TorchScript exporter without constant folding: BatchNormalization nodes, parameter names kept.
EXPORTERS = {"dynamo": dict(dynamo=True),
             "legacy": dict(dynamo=False, do_constant_folding=False)}
CASES = [(m, e) for m in TORCH_MODELS for e in EXPORTERS]


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    """``get(model, exporter) -> (torch model, .onnx path, input)``, each exported once."""
    cache = {}
    tmp = tmp_path_factory.mktemp("torch_onnx")

    def get(name, exporter):
        if (name, exporter) not in cache:
            cls, shape = TORCH_MODELS[name]
            torch.manual_seed(0)
            model = _perturb(cls(), 1)
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
            path = tmp / f"{name}_{exporter}.onnx"
            with warnings.catch_warnings():  # the exporters' deprecation and tracer notes
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), input_names=["x"],
                                  output_names=["y"], verbose=False, **EXPORTERS[exporter])
            cache[name, exporter] = (model, path, x)
        return cache[name, exporter]

    return get


@pytest.mark.parametrize("name,exporter", CASES)
def test_torch_model_gives_pytorch_outputs(torch_export, name, exporter):
    model, path, x = torch_export(name, exporter)
    with torch.no_grad():
        want = model(x)
    m = kiln.onnx.load(path)
    assert isinstance(m, nn.Module)
    with kiln.no_grad():
        assert_close(m(kiln.tensor(x.numpy())), want)


def test_torch_exports_are_the_intended_graphs(torch_export):
    # the cases cover what they claim: BatchNorm kept by legacy, folded by dynamo; attention
    assert {"Conv", "BatchNormalization", "MaxPool", "GlobalAveragePool", "Gemm", "Add"} <= \
        op_types(torch_export("resnet", "legacy")[1])
    assert "BatchNormalization" not in op_types(torch_export("resnet", "dynamo")[1])
    assert {"MatMul", "Softmax", "LayerNormalization"} <= \
        op_types(torch_export("encoder", "dynamo")[1])


@pytest.mark.parametrize("name,exporter", CASES)
def test_torch_model_compiled_equals_eager(torch_export, name, exporter):
    _, path, x = torch_export(name, exporter)
    m = kiln.onnx.load(path)
    xk = kiln.tensor(x.numpy())
    with kiln.no_grad():
        eager = m(xk)
        fast = kiln.compile(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to eager mode warns
            fast(xk)  # the tracing call
        again = fast(kiln.tensor(x.numpy() * 0.5))  # replayed: not the traced values
        assert_close(again, m(kiln.tensor(x.numpy() * 0.5)), "compiled (replay)", rtol=1e-6)
        assert_close(fast(xk), eager, "compiled", rtol=1e-6)


@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_model_gradients_match_pytorch(torch_export, name):
    # the legacy files keep PyTorch's parameter names, so gradients can be matched by name
    model, path, x = torch_export(name, "legacy")
    r = np.random.default_rng(3).standard_normal(model(x).shape).astype(np.float32)
    model.zero_grad()
    (model(x) * torch.from_numpy(r)).sum().backward()
    want = {k: p.grad for k, p in model.named_parameters()}
    m = kiln.onnx.load(path)
    (m(kiln.tensor(x.numpy())) * kiln.tensor(r)).sum().backward()
    got = {m.onnx_names[k]: p.grad for k, p in m.named_parameters()}
    assert set(want) <= set(got), f"parameters missing: {set(want) - set(got)}"
    for k in want:
        assert got[k] is not None, f"no gradient reached {k}"
        assert_close(got[k], want[k], f"gradient of {k}", rtol=1e-5)


@pytest.mark.parametrize("name,exporter", CASES)
def test_torch_model_finetunes(torch_export, name, exporter):
    model, path, x = torch_export(name, exporter)
    m = kiln.onnx.load(path)
    params = list(m.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    assert not any("running" in m.onnx_names[k] for k, _ in m.named_parameters())
    with torch.no_grad():
        out = model(x)
    target = kiln.tensor(np.random.default_rng(4).standard_normal(out.shape).astype(np.float32))
    xk = kiln.tensor(x.numpy())
    opt = kiln.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(xk), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_model_trains_compiled_as_eager(torch_export, name):
    _, path, x = torch_export(name, "dynamo")
    xk = kiln.tensor(x.numpy())

    def losses(compiled):
        m = kiln.onnx.load(path)
        target = kiln.tensor(np.random.default_rng(5).standard_normal(
            tuple(m(xk).shape)).astype(np.float32))
        opt = kiln.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)

        def step(xk, target):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(xk), target)
            loss.backward()
            opt.step()
            return loss

        if not compiled:
            return [step(xk, target).item() for _ in range(4)]
        step = kiln.compile(step)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to eager mode warns
            return [step(xk, target).item() for _ in range(4)]

    eager = losses(False)
    assert eager[-1] < eager[0], eager
    np.testing.assert_allclose(losses(True), eager, rtol=1e-5)


@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_dynamic_batch(tmp_path, name):
    cls, shape = TORCH_MODELS[name]
    torch.manual_seed(0)
    model = _perturb(cls(), 1)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), input_names=["x"],
                          output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    m = kiln.onnx.load(path)
    for batch in (1, 5):
        x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        with kiln.no_grad():
            assert_close(m(kiln.tensor(x.numpy())), want, f"batch {batch}")


class TorchLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 12, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_torch_lstm(tmp_path):
    # the legacy exporter writes ONNX LSTM nodes (weights regrouped into ONNX's gate order)
    torch.manual_seed(0)
    model = TorchLSTM().eval()
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(9))
    path = tmp_path / "lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
    assert "LSTM" in op_types(path)
    with torch.no_grad():
        want = model(x)
    m = kiln.onnx.load(path)
    out = m(kiln.tensor(x.numpy()))
    assert_close(out.detach(), want)
    out.sum().backward()
    assert all(p.grad is not None and np.abs(p.grad.numpy()).max() > 0
               for p in m.parameters())


# -- Kiln -> ONNX -> Kiln ------------------------------------------------------------------------

def _workload(wl):
    model, W = workload_forward(wl)

    if wl == "gpt":
        x = np.random.default_rng(5).integers(0, W.GPT["vocab"], size=(2, W.GPT["T"]))
    else:
        x = W.infer_data(wl, 3)
    return model, x


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _lstm():
    kiln.manual_seed(0)
    return LSTMModel().eval(), np.random.default_rng(6).standard_normal((3, 5, 6), np.float32)


def _convbn():
    kiln.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    bn = model[1]
    bn.running_mean.copy_(kiln.randn(4) * 0.3)
    bn.running_var.copy_(kiln.rand(4) + 0.5)
    return model.eval(), np.random.default_rng(7).standard_normal((2, 3, 8, 8), np.float32)


KILN_MODELS = {"mlp": lambda: _workload("mlp"), "cnn": lambda: _workload("cnn"),
               "gpt": lambda: _workload("gpt"), "lstm": _lstm, "convbn": _convbn}


@pytest.mark.parametrize("name", list(KILN_MODELS))
def test_kiln_onnx_kiln(tmp_path, name):
    model, x = KILN_MODELS[name]()
    xk = kiln.tensor(x)
    with kiln.no_grad():
        want = model(xk)
    path = tmp_path / f"{name}.onnx"
    kiln.onnx.export(model, (xk,), path)
    m = kiln.onnx.load(path)
    with kiln.no_grad():
        assert_close(m(xk), want)
        assert_close(model(xk), want, "the original after export")  # export changed nothing


@pytest.mark.parametrize("name", ["lstm", "convbn"])
def test_kiln_onnx_kiln_gradients(tmp_path, name):
    # a module's initializers keep its parameter names: gradients can be matched by name
    model, x = KILN_MODELS[name]()
    xk = kiln.tensor(x)
    path = tmp_path / f"{name}.onnx"
    kiln.onnx.export(model, (xk,), path)
    m = kiln.onnx.load(path)
    r = kiln.tensor(np.random.default_rng(9).standard_normal(
        tuple(model(xk).shape)).astype(np.float32))
    (model(xk) * r).sum().backward()
    (m(xk) * r).sum().backward()
    got = {m.onnx_names[k]: p.grad for k, p in m.named_parameters()}
    for k, p in model.named_parameters():
        assert k in got, f"{k} is not an initializer of the exported file: {sorted(got)}"
        assert_close(got[k], p.grad.numpy(), f"gradient of {k}")


def test_dynamic_batch_in_kiln_and_onnxruntime(tmp_path):
    model, _ = _convbn()
    path = tmp_path / "dyn.onnx"
    example = kiln.tensor(np.random.default_rng(8).standard_normal((2, 3, 8, 8), np.float32))
    kiln.onnx.export(model, (example,), path, dynamic_dims={"input": {0: "batch"}})
    (inp,) = onnx.load(str(path)).graph.input
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = kiln.onnx.load(path)
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8), np.float32)
        with kiln.no_grad():
            want = model(kiln.tensor(x))
            assert_close(m(kiln.tensor(x)), want, f"Kiln at batch {batch}")
        assert_close(sess.run(None, {inp.name: x})[0], want, f"ORT at batch {batch}")


# -- the export benchmark ------------------------------------------------------------------------

def test_export_bench_quick(tmp_path):
    out = tmp_path / "export.md"
    cp = subprocess.run([sys.executable, os.path.join(BENCH, "export_bench.py"), "--quick",
                         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    text = out.read_text()
    assert text == cp.stdout.rstrip("\n") + "\n" or text in cp.stdout
    rows = [ln for ln in text.splitlines() if ln.startswith("| mlp |")]
    assert len(rows) == 3, text  # the export row, then batch 1 and batch 256
    assert rows[1].startswith("| mlp | 1 |") and rows[2].startswith("| mlp | 256 |")
    assert "## Errors" not in text
    assert "onnxruntime" in text and "cores" in text


def test_kiln_gpt_round_trip_keeps_only_weights_trainable(tmp_path):
    """The attention scale and the -inf mask fill are Constant nodes in Kiln's export, and an
    initializer holding infinities is a constant on import: only the weights are parameters."""
    model, x = _workload("gpt")
    W = workload_forward("gpt")[1]
    path = tmp_path / "gpt.onnx"
    kiln.onnx.export(model, (kiln.tensor(x),), path)
    m = kiln.onnx.load(path)
    assert len(list(m.parameters())) == len(W.params("gpt"))


def test_an_initializer_holding_infinities_is_a_constant(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    mask = np.triu(np.full((3, 3), -np.inf, np.float32), 1)
    w = np.ones((3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["a"]), helper.make_node("Mul", ["a", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
        [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(w, "w")])
    m = kiln.onnx.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [m.onnx_names[k] for k, _ in m.named_parameters()] == ["w"]
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_array_equal(m(kiln.tensor(x)).detach().numpy(), x + mask)


def test_an_imported_module_re_exports_with_its_input_names(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    kiln.onnx.export(model, (kiln.randn(2, 3),), tmp_path / "a.onnx",
                     dynamic_dims={"input": {0: "batch"}})
    imported = kiln.onnx.load(tmp_path / "a.onnx")
    again = kiln.onnx.export(imported, (kiln.randn(2, 3),), tmp_path / "b.onnx",
                             dynamic_dims={"input": {0: "batch"}})
    assert [i.name for i in again.graph.input] == ["input"]
    x = kiln.randn(5, 3)
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"))
    assert_close(sess.run(None, {"input": x.numpy()})[0], model(x), "re-exported")
