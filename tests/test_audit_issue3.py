"""Gaps found auditing issue #3 (nn, optim, data, checkpoints) against PyTorch 2.13."""

import io
import re

import numpy as np
import pytest
import torch

import kiln
from tests.helpers import check_exception


# -- every target ignored: a nan loss, but a zero gradient as in PyTorch -----------------------
@pytest.mark.parametrize("fn, kwargs", [
    ("cross_entropy", {}), ("cross_entropy", {"label_smoothing": 0.1}),
    ("cross_entropy", {"weight": [0.5, 1.0, 2.0, 1.5]}),
    ("cross_entropy", {"weight": [0.5, 1.0, 2.0, 1.5], "label_smoothing": 0.2}),
    ("nll_loss", {}), ("nll_loss", {"weight": [0.5, 1.0, 2.0, 1.5]}),
])
def test_loss_with_every_target_ignored_has_zero_gradient(fn, kwargs):
    x = np.random.RandomState(0).randn(5, 4).astype(np.float32)
    res = []
    for lib in (kiln, torch):
        kw = dict(kwargs)
        if "weight" in kw:
            kw["weight"] = lib.tensor(kw["weight"])
        a = lib.tensor(x, requires_grad=True)
        loss = getattr(lib.nn.functional, fn)(a, lib.full((5,), -100), **kw)
        loss.backward()
        res.append((loss.item(), a.grad.numpy()))
    assert np.isnan(res[0][0]) and np.isnan(res[1][0])
    np.testing.assert_array_equal(res[0][1], res[1][1])
    assert not res[0][1].any()


# -- a wrong input shape names the layer, the expected and the actual shape --------------------
@pytest.mark.parametrize("make, x, expect", [
    (lambda lib: lib.nn.LSTM(4, 5, batch_first=True), (2, 6, 3),
     [r"LSTM\(4, 5", r"Expected 4, got 3", r"\[2, 6, 3\]"]),
    (lambda lib: lib.nn.GRU(4, 5), (6, 2, 3), [r"GRU\(4, 5\)", r"\[6, 2, 3\]"]),
    (lambda lib: lib.nn.RNN(4, 5), (6, 2, 3), [r"RNN\(4, 5\)", r"\[6, 2, 3\]"]),
    (lambda lib: lib.nn.LayerNorm(4), (2, 5), [r"LayerNorm\(\(4,\)", r"\[\*, 4\]", r"\[2, 5\]"]),
    (lambda lib: lib.nn.LayerNorm((3, 4)), (2, 4, 3),
     [r"LayerNorm", r"\[\*, 3, 4\]", r"\[2, 4, 3\]"]),
    (lambda lib: lib.nn.Conv2d(3, 4, 5), (1, 3, 3, 3),
     [r"Conv2d\(3, 4, kernel_size=\(5, 5\)", r"\[1, 3, 3, 3\]", r"Kernel size"]),
    (lambda lib: lib.nn.Conv1d(3, 4, 5, dilation=2), (1, 3, 6),
     [r"Conv1d\(3, 4", r"\[1, 3, 6\]"]),
])
def test_wrong_input_shape_names_layer_and_shapes(make, x, expect):
    e = check_exception(lambda lib: make(lib)(lib.zeros(*x)))
    for pat in expect:
        assert re.search(pat, str(e)), (pat, str(e))


def test_rnn_with_1d_input_reports_the_shape():
    e = check_exception(lambda lib: lib.nn.GRU(4, 5)(lib.zeros(4)), match="GRU")
    assert "[4]" in str(e)


# -- a corrupt checkpoint header is reported as corrupt ------------------------------------------
def _checkpoint() -> bytes:
    kiln.manual_seed(0)
    m = kiln.nn.Sequential(kiln.nn.Linear(3, 4), kiln.nn.BatchNorm1d(4), kiln.nn.Linear(4, 2))
    opt = kiln.optim.AdamW(m.parameters(), lr=1e-3)
    m(kiln.randn(5, 3)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    kiln.save({"model": m.state_dict(), "opt": opt.state_dict(), "epoch": 3}, buf)
    return buf.getvalue()


def test_flipped_bits_anywhere_in_a_checkpoint_are_reported():
    raw = _checkpoint()
    n = int.from_bytes(raw[:8], "little")
    rs = np.random.RandomState(0)
    # bits in the tensor names, dtypes, shapes, offsets and the skeleton (learning rates,
    # step counts, key names), not only in the tensor data
    positions = list(range(8, 8 + n, 3)) + list(rs.randint(8 + n, len(raw), 200))
    fmt = raw.index(b'"format":"pt"')  # the one entry no checksum covers (PyTorch's marker)
    for i in positions:
        if fmt <= i < fmt + len(b'"format":"pt"'):
            continue
        if 8 + n > i >= 8 and raw[i] == ord(" "):  # safetensors' header padding
            continue
        b = bytearray(raw)
        b[i] ^= 1 << (i % 7)
        with pytest.raises(RuntimeError, match="not a valid safetensors checkpoint"):
            kiln.load(io.BytesIO(bytes(b)))


def test_unknown_dtype_in_header_is_corruption_but_bf16_is_unsupported():
    raw = _checkpoint()
    bad = raw.replace(b'"dtype":"F32"', b'"dtype":"F3:"', 1)
    with pytest.raises(RuntimeError, match="not a valid safetensors checkpoint.*unknown dtype"):
        kiln.load(io.BytesIO(bad))
    from safetensors.torch import save
    data = save({"w": torch.ones(2, dtype=torch.bfloat16)})
    with pytest.raises(TypeError, match="BF16"):
        kiln.load(io.BytesIO(data))


def test_malformed_header_entry_is_corruption():
    raw = _checkpoint()
    i = raw.index(b'"__metadata__"') + 5
    bad = raw[:i] + b"}" + raw[i + 1:]
    with pytest.raises(RuntimeError, match="not a valid safetensors checkpoint"):
        kiln.load(io.BytesIO(bad))
