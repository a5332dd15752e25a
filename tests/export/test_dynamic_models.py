"""kiln.export with a dynamic batch for models that defeated it: RNNs (a zero initial state whose
shape follows the batch) and GPTs (a causal mask cached on the first call).  The artifact runs
at two batch sizes other than the traced ones in kiln.load_exported and is compared with eager
Kiln: max abs diff <= 1e-5 * max(1, max|out|)."""


import numpy as np
import pytest

import kiln
from kiln import nn
from kiln.export import export, load_exported
from kiln.nn import attention
from tests.helpers import assert_outputs_close, example_module, flat_arrays, workload_forward



def _check(model, example, inputs, tmp_path, dim="batch"):
    path = str(tmp_path / "m.kiln")
    export(model, example, path, dynamic_dims={0: {0: dim}})
    prog = load_exported(path)
    for x in inputs:
        with kiln.no_grad():
            want = flat_arrays(model(x))
        got = flat_arrays(prog(x))
        assert_outputs_close(got, want)
    return prog


class _Recurrent(nn.Module):
    """An LSTM (batch first) feeding a GRU (sequence first): both make zero initial states."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 5, bidirectional=True)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, hg = self.gru(y.transpose(0, 1))
        return z, h, c, hg


def test_lstm_dynamic_batch(tmp_path):
    model = nn.LSTM(6, 10, num_layers=2, batch_first=True).eval()
    _check(model, kiln.randn(3, 5, 6), [kiln.randn(2, 5, 6), kiln.randn(7, 5, 6)], tmp_path)


def test_recurrent_stack_dynamic_batch(tmp_path):
    model = _Recurrent().eval()
    _check(model, kiln.randn(3, 6, 4), [kiln.randn(1, 6, 4), kiln.randn(9, 6, 4)], tmp_path)


def _workload_gpt():
    fwd, W = workload_forward("gpt")
    return fwd, W.train_data("gpt")[0]


@pytest.mark.parametrize("mask_cached", [False, True])
def test_gpt_workload_dynamic_batch(tmp_path, mask_cached):
    """The bench workload's GPT; the causal mask made during the first trace (not cached yet)
    or before it (an eager call ran first)."""
    fwd, tok = _workload_gpt()
    attention._CAUSAL.clear()
    if mask_cached:
        with kiln.no_grad():
            fwd(kiln.tensor(tok[:1]))
    prog = _check(fwd, kiln.tensor(tok[:2]), [kiln.tensor(tok[:3]), kiln.tensor(tok[:5])],
                  tmp_path)
    assert [spec.shape for spec in prog.input_specs] == [("batch", tok.shape[1])]


def test_char_gpt_dynamic_batch(tmp_path):
    mod = example_module("char_gpt")
    cfg = mod.GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=32)
    model = mod.GPT(cfg).eval()
    rng = np.random.default_rng(0)

    def tok(b):
        return kiln.tensor(rng.integers(0, 30, (b, 16)))

    attention._CAUSAL.clear()
    _check(model, tok(4), [tok(2), tok(7)], tmp_path)


def test_batch_dependent_constant_still_refused(tmp_path):
    """A constant that is not one repeated value (an arange over the batch) cannot follow a
    symbolic batch: refused, with the reason."""
    class Ramp(nn.Module):
        def forward(self, x):
            return x * kiln.arange(x.shape[0], dtype=kiln.float32)[:, None]

    with pytest.raises(RuntimeError, match=r"could not make batch dynamic.*constant .* not one "
                                           r"value repeated"):
        export(Ramp(), kiln.randn(3, 2), str(tmp_path / "r.kiln"),
               dynamic_dims={0: {0: "batch"}})
