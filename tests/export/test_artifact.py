"""kiln.export / load_exported: artifacts run in a fresh process, inputs are checked, the file
format is versioned and loading never runs code from the file."""

import json
import os
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

import kiln
from kiln import nn
from kiln.export import InvalidArtifact, export, load_exported
from tests.helpers import workload_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kiln.__file__)))
ATOL = 1e-6


def _flat(obj):
    if isinstance(obj, kiln.Tensor):
        return [obj.numpy()]
    return [a for x in obj for a in _flat(x)]


def _models():
    """name -> (model, example, dynamic_dims, [new inputs]); fresh inputs at two batch sizes
    for dynamic models, two fresh draws of the example's shape for the static ones."""
    mlp, W = workload_forward("mlp")
    cnn, _ = workload_forward("cnn")
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True).eval()
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                       nn.Linear(144, 5)).eval()
    with kiln.no_grad():  # statistics that are not the defaults
        bn[1].running_mean.copy_(kiln.randn(4))
        bn[1].running_var.copy_(kiln.rand(4) + 0.5)
    r = kiln.randn
    return {
        "mlp": (mlp, kiln.tensor(W.mlp_data(4)[0]), {"x": {0: "batch"}},
                [kiln.tensor(W.mlp_data(7)[0]), kiln.tensor(W.mlp_data(1)[0])]),
        "cnn": (cnn, kiln.tensor(W.cnn_data(3)[0]), {0: {0: "batch"}},
                [kiln.tensor(W.cnn_data(5)[0]), kiln.tensor(W.cnn_data(2)[0])]),
        "bn": (bn, r(2, 3, 8, 8), {"input": {0: "n"}}, [r(3, 3, 8, 8), r(6, 3, 8, 8)]),
        "encoder": (enc, r(2, 5, 16), None, [r(2, 5, 16), r(2, 5, 16)]),
        "lstm": (lstm, r(2, 5, 8), None, [r(2, 5, 8), r(2, 5, 8)]),
    }


RUNNER = """
import json, sys
import numpy as np
import kiln
from kiln.export import load_exported
man = json.load(open("manifest.json"))
for name, files in man.items():
    prog = load_exported(name + ".kiln")
    for k, f in enumerate(files):
        out = prog(np.load(f, allow_pickle=False))
        flat, stack = [], [out]
        while stack:
            o = stack.pop(0)
            if isinstance(o, kiln.Tensor):
                flat.append(o.numpy())
            else:
                assert isinstance(o, tuple), type(o)
                stack = list(o) + stack
        np.savez(f"{name}.out{k}.npz", *flat)
assert "bench" not in sys.modules and "tests" not in sys.modules
print("ok", sorted(m for m in sys.modules if m.startswith("kiln.export")))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    kiln.manual_seed(1)
    models = _models()
    manifest, refs = {}, {}
    for name, (model, example, dyn, news) in models.items():
        export(model, example, str(d / f"{name}.kiln"), dynamic_dims=dyn)
        files = []
        for k, x in enumerate(news):
            np.save(d / f"{name}.in{k}.npy", x.numpy())
            files.append(f"{name}.in{k}.npy")
            with kiln.no_grad():
                refs[(name, k)] = _flat(model(x))
        manifest[name] = files
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, models, manifest, refs


def test_fresh_process_matches_eager(exported):
    d, models, manifest, refs = exported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ROOT  # Kiln only: the models' code (this file, bench/) is not on it
    proc = subprocess.run([sys.executable, "-c", RUNNER], cwd=d, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
    for name, files in manifest.items():
        for k in range(len(files)):
            with np.load(d / f"{name}.out{k}.npz", allow_pickle=False) as z:
                got = [z[f"arr_{i}"] for i in range(len(z.files))]
            want = refs[(name, k)]
            assert len(got) == len(want), name
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype, name
                np.testing.assert_allclose(g, w, rtol=0, atol=ATOL, err_msg=f"{name} call {k}")


def test_signature(exported):
    d = exported[0]
    mlp = load_exported(d / "mlp.kiln")
    (spec,) = mlp.input_specs
    assert (spec.name, spec.shape, spec.dtype) == ("x", ("batch", 784), kiln.float32)
    assert mlp.output_names == ["out0"] and mlp.format_version == 1
    assert mlp.kiln_version == kiln.__version__
    bn = load_exported(d / "bn.kiln")
    assert bn.input_specs[0].name == "input" and bn.input_specs[0].shape == ("n", 3, 8, 8)
    lstm = load_exported(d / "lstm.kiln")
    out, (h, c) = lstm(kiln.randn(2, 5, 8))  # the structure nn.LSTM returns
    assert (tuple(out.shape), tuple(h.shape), tuple(c.shape)) == ((2, 5, 12), (2, 2, 12),
                                                                  (2, 2, 12))
    # weights are stored by their names in an ordinary safetensors file
    from safetensors import safe_open

    with safe_open(str(d / "bn.kiln"), framework="np") as st:
        assert {"model.0.weight", "model.1.running_mean", "model.4.bias"} <= set(st.keys())


def test_call_forms_and_outputs_owned(exported):
    d = exported[0]
    prog = load_exported(d / "mlp.kiln")
    x = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
    a, b = prog(x), prog(x=kiln.tensor(x))
    assert isinstance(a, kiln.Tensor) and a.dtype == kiln.float32
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    a.add_(1.0)  # the caller owns the result: the next call is unaffected
    np.testing.assert_array_equal(prog(x).numpy(), b.numpy())


def test_outputs_aliasing_inputs_are_copied(tmp_path):
    w = kiln.randn(3, 4)
    path = str(tmp_path / "alias.kiln")
    export(lambda x: (x.reshape(-1), w.t(), x + 1), kiln.randn(2, 3), path)
    prog = load_exported(path)
    x = kiln.randn(2, 3)
    before = x.numpy().copy()
    flat, wt, _ = prog(x)
    flat.mul_(0.0)
    wt.mul_(0.0)
    np.testing.assert_array_equal(x.numpy(), before)
    np.testing.assert_array_equal(prog(x)[1].numpy(), w.t().numpy())


@pytest.mark.parametrize("call, cls, parts", [
    (lambda p, x: p(y=x), TypeError, ["unexpected input 'y'", "inputs: x"]),
    (lambda p, x: p(), TypeError, ["missing input(s) 'x'"]),
    (lambda p, x: p(x, x), TypeError, ["takes 1 input(s) (x) but 2 were given"]),
    (lambda p, x: p(x, x=x), TypeError, ["multiple values for input 'x'"]),
    (lambda p, x: p(x.tolist()), TypeError, ["input 'x'", "numpy array, got list"]),
    (lambda p, x: p(x[None]), RuntimeError,
     ["input 'x'", "must have 2 dimension(s) (batch, 784)", "got 3 with shape (1, 3, 784)"]),
    (lambda p, x: p(x[:, :100]), RuntimeError,
     ["input 'x' dimension 1 must be 784", "got 100"]),
    (lambda p, x: p(x.double()), RuntimeError,
     ["input 'x' must have dtype kiln.float32", "got float64"]),
    (lambda p, x: p(x[:0]), RuntimeError, ["input 'x' dimension 0 is batch", "cannot be 0"]),
])
def test_bad_inputs_name_the_input(exported, call, cls, parts):
    prog = load_exported(exported[0] / "mlp.kiln")
    x = kiln.randn(3, 784)
    with pytest.raises(cls) as err:
        call(prog, x)
    for p in parts:
        assert p in str(err.value), str(err.value)


def test_shared_dynamic_dim_must_agree(tmp_path):
    path = str(tmp_path / "two.kiln")
    export(lambda a, b: a * b, (kiln.randn(4, 2), kiln.randn(4, 2)), path,
           dynamic_dims={"a": {0: "batch"}, "b": {0: "batch"}})
    prog = load_exported(path)
    assert prog(kiln.ones(6, 2), kiln.ones(6, 2)).shape == (6, 2)
    with pytest.raises(RuntimeError, match="input 'b' dimension 0 gives batch = 5, but input "
                                           "'a' gave batch = 6"):
        prog(kiln.ones(6, 2), kiln.ones(5, 2))


# -- export-time errors ---------------------------------------------------------------------------

def test_refuses_what_cannot_be_dynamic(tmp_path):
    with pytest.raises(RuntimeError, match="could not make batch dynamic: the traces at sizes "
                                           "4 and 5 differ"):
        export(lambda x: x * x.shape[0], kiln.randn(4, 3), str(tmp_path / "a.kiln"),
               dynamic_dims={"x": {0: "batch"}})
    assert not os.path.exists(tmp_path / "a.kiln")
    with pytest.raises(ValueError, match="only dimension 0"):
        export(lambda x: x + 1, kiln.randn(4, 3), str(tmp_path / "b.kiln"),
               dynamic_dims={"x": {1: "n"}})
    with pytest.raises(ValueError, match="'y', which is not a tensor input \\(inputs: x\\)"):
        export(lambda x: x + 1, kiln.randn(4, 3), str(tmp_path / "b.kiln"),
               dynamic_dims={"y": {0: "n"}})


def test_refuses_state_updates(tmp_path):
    bn = nn.BatchNorm1d(3)  # training mode: running statistics change at every call
    with pytest.raises(RuntimeError, match="writes to state.*running_mean.*model.eval"):
        export(bn, kiln.randn(4, 3), str(tmp_path / "bn.kiln"))


def test_batch_of_one_example(tmp_path):
    path = str(tmp_path / "one.kiln")
    lin = nn.Linear(3, 2)
    export(lin, kiln.randn(1, 3), path, dynamic_dims={0: {0: "batch"}})
    prog = load_exported(path)
    x = kiln.randn(5, 3)
    with kiln.no_grad():
        np.testing.assert_allclose(prog(x).numpy(), lin(x).numpy(), rtol=0, atol=ATOL)


def test_encoder_dynamic_batch(tmp_path):
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    export(enc, kiln.randn(2, 5, 16), str(tmp_path / "e.kiln"), dynamic_dims={0: {0: "b"}})
    prog = load_exported(str(tmp_path / "e.kiln"))
    x = kiln.randn(3, 5, 16)
    with kiln.no_grad():
        np.testing.assert_allclose(prog(x).numpy(), enc(x).numpy(), rtol=0, atol=ATOL)


def test_lstm_dynamic_batch(tmp_path):
    lstm = nn.LSTM(8, 12, batch_first=True).eval()
    export(lstm, kiln.randn(2, 5, 8), str(tmp_path / "l.kiln"), dynamic_dims={0: {0: "b"}})
    prog = load_exported(str(tmp_path / "l.kiln"))
    x = kiln.randn(3, 5, 8)
    with kiln.no_grad():
        np.testing.assert_allclose(prog(x)[0].numpy(), lstm(x)[0].numpy(), rtol=0, atol=ATOL)


# -- the file format ------------------------------------------------------------------------------

def _rewrite(src, dst, edit=None, edit_tensors=None, fix_crc=True):
    """Copy an artifact, changing its JSON document (and re-sealing its checksum)."""
    import safetensors.numpy as stnp
    from safetensors import safe_open

    with safe_open(str(src), framework="np") as st:
        meta = dict(st.metadata())
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    doc = json.loads(meta["kiln.export"])
    if edit:
        edit(doc)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(doc)
    meta["kiln.export"] = text
    if fix_crc:
        meta["kiln.export.crc32"] = str(zlib.crc32(text.encode()))
    stnp.save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


def test_format_version_checked(exported, tmp_path):
    src = exported[0] / "mlp.kiln"
    newer = _rewrite(src, tmp_path / "newer.kiln", _set("format_version", 7), fix_crc=False)
    with pytest.raises(InvalidArtifact) as err:
        load_exported(newer)
    msg = str(err.value)
    assert "format version 7" in msg and "newer Kiln" in msg and "reads format version 1" in msg
    odd = _rewrite(src, tmp_path / "odd.kiln", _set("format_version", "one"))
    with pytest.raises(InvalidArtifact, match="unknown format version 'one'"):
        load_exported(odd)
    other = _rewrite(src, tmp_path / "other.kiln", _set("format", "onnx"))
    with pytest.raises(InvalidArtifact, match="unknown format 'onnx'"):
        load_exported(other)
    ckpt = tmp_path / "ckpt.safetensors"
    kiln.save({"w": kiln.ones(2)}, ckpt)
    with pytest.raises(InvalidArtifact, match="not a Kiln exported program.*use kiln.load"):
        load_exported(ckpt)


def _node(doc, op):
    return next(n for n in doc["graph"]["nodes"] if n["op"] == op)


def test_unknown_op_named(exported, tmp_path):
    def edit(doc):
        _node(doc, "matmul")["op"] = "frobnicate"
    bad = _rewrite(exported[0] / "mlp.kiln", tmp_path / "op.kiln", edit)
    with pytest.raises(InvalidArtifact, match="unknown operation 'frobnicate'"):
        load_exported(bad)


@pytest.mark.parametrize("field, value, expect", [
    ("attrs", {"ta=__import__('os').system('echo pwned'),tb": False}, "is not an identifier"),
    ("loc", "x\nimport os; os.system('echo pwned')", "expected printable text"),
    ("attrs", {"ta": {"$pickle": "gASV"}}, "unknown tag '\\$pickle'"),
    ("inputs", [0, 999], "not an earlier value"),
    ("dtype", "object", "unsupported dtype 'object'"),
])
def test_crafted_graph_refused(exported, tmp_path, field, value, expect):
    def edit(doc):
        _node(doc, "matmul")[field] = value
    bad = _rewrite(exported[0] / "mlp.kiln", tmp_path / "bad.kiln", edit)
    with pytest.raises(InvalidArtifact, match=expect):
        load_exported(bad)


def test_crafted_dimension_name_refused(exported, tmp_path):
    def edit(doc):
        doc["graph"]["inputs"][0]["shape"][0] = {"$sym": ["os.system('x')", 1, 0]}
    bad = _rewrite(exported[0] / "mlp.kiln", tmp_path / "sym.kiln", edit)
    with pytest.raises(InvalidArtifact, match="bad dimension"):
        load_exported(bad)


def test_corruption_detected(exported, tmp_path):
    src = exported[0] / "mlp.kiln"

    def flip(tensors):
        k = sorted(tensors)[0]
        tensors[k] = tensors[k].copy()
        tensors[k].reshape(-1)[0] += 1
    bad = _rewrite(src, tmp_path / "t.kiln", edit_tensors=flip)
    with pytest.raises(InvalidArtifact, match="checksum mismatch: the data is corrupt"):
        load_exported(bad)
    bad = _rewrite(src, tmp_path / "h.kiln", _set("name", "renamed"), fix_crc=False)
    with pytest.raises(InvalidArtifact, match="checksum mismatch: the header is corrupt"):
        load_exported(bad)
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "missing.kiln")


def test_attribute_values_round_trip():
    from kiln.export.graph_json import Decoder, Encoder
    from kiln.graph.symbolic import Sym
    from kiln.ops.index import Slice

    values = [None, True, 3, -0.0, 1e-300, float("nan"), float("inf"), "mean", (1, (2,)), [1],
              {"a": 1, 2: (3,)}, Sym("batch", 2, 1), Slice(0, Sym("batch"), 1),
              slice(None, 4, 2), Ellipsis, np.dtype("int8"), np.arange(6.0).reshape(2, 3),
              np.float32(1.5), kiln.Size([2, 3]), np.arange(40, dtype=np.int16)]
    enc = Encoder()
    text = json.dumps([enc.value(v, "v") for v in values], allow_nan=False)
    dec = Decoder(enc.tensors, "test")
    back = [dec.value(v, "v") for v in json.loads(text)]
    for a, b in zip(values, back):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        elif isinstance(a, float) and a != a:
            assert b != b
        else:
            assert a == b and type(a if not isinstance(a, kiln.Size) else ()) is type(b), (a, b)
    assert np.signbit(back[3])


def test_loading_never_unpickles(exported, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading an exported program")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    prog = load_exported(exported[0] / "cnn.kiln")
    assert prog(kiln.randn(2, 1, 28, 28)).shape == (2, 10)
    here = os.path.dirname(os.path.abspath(sys.modules["kiln.export"].__file__))
    for fname in os.listdir(here):
        if fname.endswith(".py"):
            src = open(os.path.join(here, fname)).read()
            # (a method named eval, as in "model.eval()" in a message, is not the builtin)
            assert not re.search(r"(?<![.\w])(eval|exec|__import__)\s*\(|\bpickle\b", src), \
                fname
