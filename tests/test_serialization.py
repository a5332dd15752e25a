"""kiln.save / kiln.load: safetensors round trips, PyTorch interop, atomic writes, corrupt files."""

import io
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

import kiln

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
          np.bool_]


def _arr(shape, dtype, seed=0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)


def _same(a, b):
    if isinstance(a, kiln.Tensor):
        assert isinstance(b, kiln.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a._data, b._data, equal_nan=a._data.dtype.kind == "f")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_preserves_dtypes_shapes_values(tmp_path, dtype):
    sd = {
        "scalar": kiln.from_numpy(_arr((), dtype)),
        "vector": kiln.from_numpy(_arr((5,), dtype, 1)),
        "matrix": kiln.from_numpy(_arr((3, 4), dtype, 2)),
        "empty": kiln.from_numpy(_arr((0, 3), dtype)),
        "transposed": kiln.from_numpy(_arr((3, 4, 2), dtype, 3).transpose(2, 0, 1)),
    }
    path = tmp_path / "sd.safetensors"
    kiln.save(sd, path)
    back = kiln.load(path)
    _same(sd, back)
    assert all(t._data.flags.writeable for t in back.values())


def test_state_dict_keys_order_and_grad_tensors(tmp_path):
    w = kiln.ones(2, 2, requires_grad=True)
    sd = {"layer.weight": w, "layer.bias": kiln.zeros(2), "a": kiln.ones(1)}
    kiln.save(sd, str(tmp_path / "m.safetensors"))
    back = kiln.load(str(tmp_path / "m.safetensors"), map_location="cpu", weights_only=True)
    assert list(back) == ["layer.weight", "layer.bias", "a"]
    assert not back["layer.weight"].requires_grad
    _same({k: v.detach() for k, v in sd.items()}, back)


def _adam_like_state():
    """What torch.optim.Adam(...).state_dict() looks like after a few steps (4 parameters)."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    state = {i: {"step": torch.tensor(2.0),
                 "exp_avg": torch.tensor(rng.standard_normal(s).astype(np.float32)),
                 "exp_avg_sq": torch.tensor(rng.random(s).astype(np.float32))}
             for i, s in enumerate(shapes)}
    group = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1,
             "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
             "differentiable": False, "fused": None, "params": [0, 1, 2, 3]}
    return {"state": state, "param_groups": [group]}


def _to_kiln(obj):
    if isinstance(obj, torch.Tensor):
        return kiln.from_numpy(obj.detach().numpy().copy())
    if isinstance(obj, dict):
        return {k: _to_kiln(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_kiln(v) for v in obj)
    return obj


def test_optimizer_state_dict_round_trips(tmp_path):
    sd = _to_kiln(_adam_like_state())
    assert isinstance(next(iter(sd["state"])), int)  # int keys, tuples, None, bools inside
    sd["param_groups"][0]["extra"] = [None, True, "name", float("inf"), float("nan"), -3, 2.5]
    sd["param_groups"][0]["nested"] = {0: {"k": (1, [kiln.zeros(1)])}, "s": {}}
    sd["dtype"] = kiln.float16
    kiln.save(sd, tmp_path / "opt.safetensors")
    _same(sd, kiln.load(tmp_path / "opt.safetensors"))


def test_other_top_level_objects(tmp_path):
    p = tmp_path / "x"
    for obj in (kiln.arange(3), [kiln.ones(1), 3], (1, "a"), {"a.b": kiln.ones(1),
                                                                "a": {"b": kiln.zeros(1)}},
                {"np": np.arange(4, dtype=np.int16)}, 5, None, {}):
        kiln.save(obj, p)
        back = kiln.load(p)
        if isinstance(obj, dict) and "np" in obj:
            assert isinstance(back["np"], np.ndarray) and back["np"].dtype == np.int16
            assert back["np"].tolist() == [0, 1, 2, 3]
        else:
            _same(obj, back)


def test_file_objects(tmp_path):
    sd = {"w": kiln.ones(2, 3), "step": 4}
    buf = io.BytesIO()
    kiln.save(sd, buf)
    buf.seek(0)
    _same(sd, kiln.load(buf))
    with open(tmp_path / "f.safetensors", "wb") as f:
        kiln.save(sd, f)
    with open(tmp_path / "f.safetensors", "rb") as f:
        _same(sd, kiln.load(f))
    with pytest.raises(RuntimeError, match="not a valid safetensors checkpoint"):
        kiln.load(io.BytesIO(b"\x05\x00\x00\x00\x00\x00\x00\x00{}"))


def test_unsupported_objects_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="cannot save an object of type object at 'a.0'"):
        kiln.save({"a": [object()]}, tmp_path / "x")
    with pytest.raises(TypeError, match="dict keys"):
        kiln.save({(1, 2): kiln.ones(1)}, tmp_path / "x")
    with pytest.raises(TypeError, match="not supported"):
        kiln.save({"a": np.zeros(2, np.uint16)}, tmp_path / "x")
    assert os.listdir(tmp_path) == []


# -- PyTorch interop -------------------------------
def test_loads_torch_safetensors_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.update(half=torch.randn(3, dtype=torch.float16), mask=torch.tensor([True, False]),
              zero_d=torch.tensor(2.5, dtype=torch.float64), u8=torch.arange(4, dtype=torch.uint8))
    path = tmp_path / "torch.safetensors"
    torch_save_file(sd, str(path), metadata={"format": "pt"})
    back = kiln.load(path)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype.name == str(v.dtype).replace("torch.", "")
        assert tuple(back[k].shape) == tuple(v.shape)
        assert np.array_equal(back[k]._data, v.numpy())
    assert back["bn" if False else "1.num_batches_tracked"].dtype == kiln.int64


def test_kiln_state_dict_loads_in_torch(tmp_path):
    sd = {"w": kiln.from_numpy(_arr((2, 3), np.float32)), "n": kiln.from_numpy(_arr((), np.int64)),
          "b": kiln.from_numpy(np.array([True, False]))}
    kiln.save(sd, tmp_path / "k.safetensors")
    back = torch_load_file(str(tmp_path / "k.safetensors"))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert np.array_equal(back[k].numpy(), v._data) and back[k].shape == tuple(v.shape)


def test_unsupported_torch_dtype_is_named(tmp_path):
    torch_save_file({"w": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "bf.st"))
    with pytest.raises(TypeError, match="'w'.*BF16"):
        kiln.load(tmp_path / "bf.st")


# -- bad files -------------------------------
def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        kiln.load("/nonexistent/no-such-checkpoint.safetensors")


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    kiln.save({"w": kiln.ones(64, 64), "meta": {"x": 1}}, good)
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "empty": b"",
        "short": data[:5],
        "header-cut": data[:8 + header_len // 2],
        "data-cut": data[:-100],
        "one-byte-short": data[:-1],
        "garbage": os.urandom(300),
        "bad-json": data[:8] + b"{" * header_len + data[8 + header_len:],
        "flipped-byte": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
        "pickle": pickle.dumps({"w": [1.0, 2.0]}),
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(RuntimeError, match=f"not a valid safetensors checkpoint: .*{name}"):
            kiln.load(p)
    torch.save({"w": torch.ones(2)}, tmp_path / "torch-pickle.pt")
    with pytest.raises(RuntimeError, match="not a valid safetensors checkpoint"):
        kiln.load(tmp_path / "torch-pickle.pt")


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (os.environ["KILN_TEST_MARKER"],))


def test_load_never_executes_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("KILN_TEST_MARKER", str(marker))
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(RuntimeError):
        kiln.load(p)
    assert not marker.exists()


# -- atomic writes -------------------------------
def _old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    old = {"w": kiln.full((3,), 7.0), "step": 1}
    kiln.save(old, path)
    return path, old


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail):
    path, old = _old_checkpoint(tmp_path)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError, match="No space left"):
        kiln.save({"w": kiln.zeros(1000), "step": 2}, path)
    monkeypatch.undo()
    _same(old, kiln.load(path))
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # the temporary file is gone


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    # A real crash: the child may write at most 64 KiB per file, so writing a 4 MB checkpoint
    # kills it (SIGXFSZ) in the middle of the write.
    path, old = _old_checkpoint(tmp_path)
    code = textwrap.dedent(f"""
        import resource, kiln
        big = {{"w": kiln.zeros(1_000_000), "step": 2}}
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        kiln.save(big, {str(path)!r})
        print("saved")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "saved" not in proc.stdout
    _same(old, kiln.load(path))
    leftovers = [f for f in os.listdir(tmp_path) if f != "ckpt.safetensors"]
    assert all(f.startswith(".ckpt.safetensors.") for f in leftovers)
    kiln.save({"w": kiln.zeros(2), "step": 3}, path)  # a later save still works
    assert kiln.load(path)["step"] == 3


def test_new_file_mode_follows_umask(tmp_path):
    kiln.save({"w": kiln.ones(1)}, tmp_path / "a.safetensors")
    (tmp_path / "b").write_bytes(b"")
    assert os.stat(tmp_path / "a.safetensors").st_mode == os.stat(tmp_path / "b").st_mode


# -- a real training checkpoint --------------------------------------------------------------------
@pytest.mark.skipif(not (hasattr(kiln, "nn") and hasattr(kiln, "optim")),
                    reason="kiln.nn / kiln.optim not available")
def test_resume_from_checkpoint_matches_uninterrupted_training(tmp_path):
    x = kiln.tensor(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32))

    def step(model, opt):
        opt.zero_grad()
        out = model(x)
        (out * out).sum().backward()
        opt.step()

    def fresh():
        kiln.manual_seed(0)
        model = kiln.nn.Linear(3, 2)
        return model, kiln.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    model, opt = fresh()
    for _ in range(4):
        step(model, opt)
    expected = {k: v._data.copy() for k, v in model.state_dict().items()}

    model, opt = fresh()
    for _ in range(2):
        step(model, opt)
    path = tmp_path / "ckpt.safetensors"
    kiln.save({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 2}, path)

    model, opt = fresh()
    ckpt = kiln.load(path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    assert ckpt["epoch"] == 2
    for _ in range(2):
        step(model, opt)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v._data, expected[k])


def test_import_kiln_stays_light_and_missing_safetensors_is_explained(tmp_path, monkeypatch):
    code = ("import sys, kiln; "
            "print(sorted(m for m in ('safetensors', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install"):
        kiln.save({"w": kiln.ones(1)}, tmp_path / "x")
    with pytest.raises(ImportError, match="pip install"):
        kiln.load(tmp_path / "x")
