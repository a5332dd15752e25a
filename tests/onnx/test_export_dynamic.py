"""kiln.onnx.export with a dynamic batch for RNNs (a zero initial state whose shape follows the
batch: a scalar constant Expanded to a shape computed from the input's Shape) and GPTs (a causal
mask cached on the first call, exported as an initializer).  ONNX Runtime runs the file at two
batch sizes other than the traced ones; oracle: eager Kiln, max abs diff <= 1e-5 * max(1,
max|out|)."""


import numpy as np
import pytest

import kiln
from kiln import nn
from kiln.nn import attention

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kiln.onnx import export  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_outputs_close, example_module, flat_arrays, workload_forward)



def _check(model, example, inputs, tmp_path):
    """Export with dimension 0 of the first input dynamic; run at each of ``inputs``."""
    path = str(tmp_path / "m.onnx")
    proto = export(model, example, path, dynamic_dims={0: {0: "batch"}})
    onnx.checker.check_model(proto, full_check=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for x in inputs:
        with kiln.no_grad():
            want = flat_arrays(model(kiln.tensor(x)))
        got = sess.run(None, {name: x})
        assert_outputs_close(got, want)
    return proto


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 5, bidirectional=True)
        self.rnn = nn.RNN(10, 3, batch_first=True)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, hg = self.gru(y.transpose(0, 1))
        r, hr = self.rnn(z.transpose(0, 1))
        return r, h, c, hg, hr


def _f32(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def test_lstm_dynamic_batch(tmp_path):
    model = nn.LSTM(6, 10, num_layers=2, batch_first=True).eval()
    proto = _check(model, kiln.tensor(_f32(3, 5, 6)), [_f32(2, 5, 6), _f32(7, 5, 6)], tmp_path)
    assert any(n.op_type == "Expand" for n in proto.graph.node)


def test_recurrent_stack_dynamic_batch(tmp_path):
    model = _Recurrent().eval()
    _check(model, kiln.tensor(_f32(3, 6, 4)), [_f32(1, 6, 4), _f32(9, 6, 4)], tmp_path)


def test_gpt_workload_dynamic_batch(tmp_path):
    fwd, W = workload_forward("gpt")
    tok = W.train_data("gpt")[0]
    attention._CAUSAL.clear()  # the mask is made during the first trace
    _check(fwd, kiln.tensor(tok[:2]), [tok[:3], tok[:5]], tmp_path)


def test_char_gpt_dynamic_batch(tmp_path):
    mod = example_module("char_gpt")
    cfg = mod.GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=32)
    model = mod.GPT(cfg).eval()
    rng = np.random.default_rng(0)
    attention._CAUSAL.clear()
    _check(model, kiln.tensor(rng.integers(0, 30, (4, 16))),
           [rng.integers(0, 30, (2, 16)), rng.integers(0, 30, (7, 16))], tmp_path)


def test_batch_dependent_constant_refused(tmp_path):
    class Ramp(nn.Module):
        def forward(self, x):
            return x * kiln.arange(x.shape[0], dtype=kiln.float32)[:, None]

    with pytest.raises(RuntimeError, match=r"could not make batch dynamic.*not one value "
                                           r"repeated"):
        export(Ramp(), kiln.randn(3, 2), str(tmp_path / "r.onnx"),
               dynamic_dims={0: {0: "batch"}})


def test_capture_errors_name_kiln_onnx_export(tmp_path):
    with pytest.raises(ValueError, match=r"^kiln\.onnx\.export: dynamic_dims names 'nope'"):
        kiln.onnx.export(kiln.nn.Linear(3, 2), (kiln.randn(2, 3),), tmp_path / "m.onnx",
                         dynamic_dims={"nope": {0: "batch"}})
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("export", ["kiln", "onnx"])
def test_a_size_not_linear_in_the_batch_is_refused(tmp_path, export):
    fn = {"kiln": kiln.export, "onnx": kiln.onnx.export}[export]
    with pytest.raises(RuntimeError, match="could not make b dynamic: at size 11"):
        fn(lambda x: x[: x.shape[0] // 2] * 1.0, (kiln.randn(4, 3),), tmp_path / "m",
           dynamic_dims={0: {0: "b"}})
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("export", ["kiln", "onnx"])
def test_export_into_a_missing_directory_names_it(tmp_path, export):
    fn = {"kiln": kiln.export, "onnx": kiln.onnx.export}[export]
    with pytest.raises(FileNotFoundError, match="directory .*nope.* does not exist"):
        fn(kiln.nn.Linear(3, 2), (kiln.randn(2, 3),), tmp_path / "nope" / "m.bin")


def test_dynamic_dims_may_use_the_new_input_names(tmp_path):
    m = kiln.onnx.export(kiln.nn.Linear(3, 2), (kiln.randn(2, 3),), tmp_path / "m.onnx",
                         input_names=["img"], dynamic_dims={"img": {0: "batch"}})
    assert m.graph.input[0].name == "img"
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
