"""The benchmark suite's own logic (bench/): summaries, ratios within a round, the loss-agreement
check, the JSONL rows, the timing protocol on a fake clock, the spec's init/data/FLOPs.  No
timing is asserted and no framework peer is imported."""

import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import protocol  # noqa: E402
import report  # noqa: E402
import workloads as W  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_run", os.path.join(BENCH, "run.py"))
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)


def row(peer, mode, wl, metric, value, rnd=0, **kw):
    return {"peer": peer, "mode": mode, "workload": wl, "metric": metric, "value": value,
            "unit": "", "round": rnd, **kw}


# -- summaries and ratios ------------------------------------------------------------------------

def test_ratio_is_taken_within_the_round():
    rows = [row("torch", "eager", "mlp", "steps_per_s", 100, 0),
            row("torch", "eager", "mlp", "steps_per_s", 50, 1),
            row("torch", "eager", "mlp", "steps_per_s", 60, 2),
            row("kiln", "eager", "mlp", "steps_per_s", 50, 0),
            row("kiln", "eager", "mlp", "steps_per_s", 50, 1),
            row("kiln", "eager", "mlp", "steps_per_s", 60, 2)]
    # per round 0.5, 1.0, 1.0 -> median 1.0; the ratio of medians would be 50/60
    assert report.ratios(rows)[("mlp", "kiln:eager")] == 1.0
    assert report.ratios(rows)[("mlp", "torch:eager")] == 1.0
    med = report.medians(rows)
    assert med[("mlp", "torch:eager")]["steps_per_s"] == 60
    assert report.spread(rows)[("mlp", "torch:eager")] == (50, 100)


def test_ratio_skips_rounds_without_reference():
    rows = [row("torch", "eager", "cnn", "steps_per_s", 10, 0),
            row("kiln", "eager", "cnn", "steps_per_s", 5, 0),
            row("kiln", "eager", "cnn", "steps_per_s", 1000, 1),  # torch failed in round 1
            row("torch", "eager", "cnn", "error", None, 1, error="boom")]
    assert report.ratios(rows) == {("cnn", "torch:eager"): 1.0, ("cnn", "kiln:eager"): 0.5}
    assert report.ratios([row("kiln", "eager", "cnn", "steps_per_s", 5)]) == {}


def test_medians_ignore_errors_and_runner_records():
    rows = [{"peer": "runner", "mode": "-", "workload": "-", "metric": "environment",
             "value": None, "unit": ""},
            row("jax", "jit", "gpt", "error", None, error="x"),
            row("jax", "jit", "gpt", "steps_per_s", 3.0)]
    assert report.medians(rows) == {("gpt", "jax:jit"): {"steps_per_s": 3.0}}
    assert [r["error"] for r in report.errors(rows)] == ["x"]


def test_matmul_peak_is_best_median():
    rows = [row("numpy", "2threads", "matmul", "matmul_n2048_gflops", v, r)
            for r, v in enumerate([90, 100, 95])]
    rows += [row("torch", "eager", "matmul", "matmul_n1024_gflops", v, r)
             for r, v in enumerate([80, 200, 85])]
    assert report.matmul_peak(rows) == (95, "numpy:2threads", 2048)
    assert report.matmul_peak([row("kiln", "eager", "mlp", "gflops", 1.0)]) is None


# -- the loss-agreement check --------------------------------------------------------------------

def _losses(values, metric="loss_step10", wl="gpt"):
    return [row(p, m, wl, metric, v) for (p, m), v in values.items()]


def test_losses_agree():
    rows = _losses({("kiln", "eager"): 3.53619, ("torch", "eager"): 3.53620,
                    ("jax", "jit"): 3.53618})
    assert report.check_losses(rows) == []


def test_loss_mismatch_names_the_outlier():
    rows = _losses({("kiln", "eager"): 3.5362, ("torch", "eager"): 3.5362,
                    ("tf", "xla"): 3.5362, ("jax", "eager"): 3.61})
    (msg,) = report.check_losses(rows)
    assert "gpt loss_step10" in msg and "jax:eager" in msg and "torch:eager" not in msg
    # float32 noise across frameworks: ~1e-7 at step 1, < 2e-5 at step 10; 4e-4 is a bug
    for metric in ("loss_step1", "loss_step10"):
        rows = _losses({("kiln", "eager"): 2.2900, ("torch", "eager"): 2.2900,
                        ("tf", "eager"): 2.2910}, metric=metric, wl="mlp")
        assert "tf:eager" in report.check_losses(rows)[0]
    rows = _losses({("kiln", "eager"): 2.2900455, ("torch", "eager"): 2.2900455,
                    ("jax", "jit"): 2.2900457}, metric="loss_step1", wl="mlp")
    assert report.check_losses(rows) == []
    rows = _losses({("kiln", "eager"): 0.485871, ("torch", "eager"): 0.485871,
                    ("jax", "jit"): 0.485880}, metric="loss_step10", wl="mlp")
    assert report.check_losses(rows) == []
    rows = _losses({("kiln", "eager"): 2.290045, ("torch", "eager"): 2.290045,
                    ("jax", "jit"): 2.290080}, metric="loss_step1", wl="mlp")
    assert "jax:jit" in report.check_losses(rows)[0]  # 1.5e-5 is too much at step 1


def test_loss_check_covers_rounds_of_one_peer():
    rows = [row("kiln", "eager", "mlp", "loss_step1", 2.29, 0),
            row("kiln", "eager", "mlp", "loss_step1", 2.29, 1),
            row("kiln", "eager", "mlp", "loss_step1", 2.50, 2)]
    (msg,) = report.check_losses(rows)
    assert "round 2" in msg


# -- the table and the report --------------------------------------------------------------------

def _run_rows():
    rows = [{"peer": "runner", "mode": "-", "workload": "-", "metric": "environment",
             "value": None, "unit": "", "date": "2026-01-01", "run_id": "abc", "rounds": 1,
             "machine": {"cpu": "TestCPU", "cores": 2, "mem_gb": 4, "kernel": "6",
                         "python": "3.11"}, "env": {}, "load": [0.1, 0.2, 0.3]}]
    for p, m, sps in [("kiln", "eager", 50.0), ("torch", "eager", 100.0)]:
        rows += [row(p, m, "mlp", "steps_per_s", sps, version="1.0"),
                 row(p, m, "mlp", "gflops", W.FLOPS["mlp"] * sps / 1e9),
                 row(p, m, "mlp", "loss_step1", 2.29005),
                 row(p, m, "mlp", "loss_step10", 0.48587),
                 row(p, m, "mlp", "infer_b1_ms", 0.1),
                 row(p, m, "mlp", "infer_b256_per_s", 12345.0),
                 row(p, m, "mlp", "peak_rss_mb", 100.0)]
    rows.append(row("numpy", "2threads", "matmul", "matmul_n256_gflops", 77.53))
    rows.append(row("tf", "xla", "gpt", "error", None, error="ImportError: no | tf"))
    return rows


def test_table():
    text = report.table(_run_rows())
    lines = text.splitlines()
    assert lines[0].startswith("| workload | peer:mode | steps/s | vs torch eager")
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    kiln = next(ln for ln in lines if "kiln:eager" in ln)
    assert "**kiln:eager**" in kiln and "0.50×" in kiln and "2.29005" in kiln
    assert "5.0%" in kiln  # 3.88 GFLOP/s of a 77.53 GFLOP/s matmul peak
    assert "12,345" in kiln
    err = next(ln for ln in lines if "tf:xla" in ln)
    assert "error: ImportError: no / tf" in err
    # kiln first, then torch (display order), mlp before gpt
    assert lines.index(kiln) < lines.index(next(ln for ln in lines if "torch:eager" in ln))
    assert lines.index(kiln) < lines.index(err)


def test_render_report():
    text = report.render(_run_rows())
    assert "TestCPU, 2 cores" in text and "no thread or BLAS variable set" in text
    assert "## Matmul probe" in text and "| numpy:2threads | 77.5 |" in text
    assert "All peers agree" in text
    assert "## Errors" in text and "tf:xla" in text
    assert "versions: kiln 1.0; torch 1.0" in text


# -- JSONL rows ----------------------------------------------------------------------------------

def test_dump_row_format(tmp_path):
    r = row("kiln", "eager", "mlp", "steps_per_s", 12.5, samples=[1.0, 2.0], run_id="x")
    line = report.dump_row(r)
    assert "\n" not in line and json.loads(line) == r
    with pytest.raises(ValueError, match="lacks"):
        report.dump_row({"peer": "kiln", "metric": "x"})
    with pytest.raises(ValueError):
        report.dump_row(row("kiln", "eager", "mlp", "steps_per_s", math.nan))
    path = tmp_path / "r.jsonl"
    path.write_text(line + "\n\n" + report.dump_row(row("a", "b", "c", "d", 1)) + "\n")
    assert [x["peer"] for x in report.load_jsonl(str(path))] == ["kiln", "a"]


def _fake_peer(monkeypatch):
    """A peer module whose 'framework' is plain Python: exercises the whole worker quickly."""
    mod = types.ModuleType("peers.fake_peer")
    mod.MODES, mod.COMPILED, mod.MATMUL_MODES = ("eager", "jit"), ("jit",), ("eager",)
    mod.modes = lambda: list(mod.MODES)
    mod.setup = lambda mode: {"version": "0.0", "threads": 2, "threading": "none"}
    mod.compile_init = lambda mode: 0.5
    losses = iter(np.linspace(3.0, 1.0, 10_000))
    mod.build_train = lambda mode, wl: (lambda: next(losses), lambda out: None, float)
    mod.build_infer = lambda mode, wl, b: (lambda: b, lambda out: None, None)
    mod.build_matmul = lambda mode, n: (lambda: n, lambda out: None)
    monkeypatch.setitem(sys.modules, "peers.fake_peer", mod)
    monkeypatch.setattr(protocol, "WARMUP_S", 0.001)
    monkeypatch.setattr(protocol, "BLOCK_S", 0.0001)


def test_worker_rows(monkeypatch):
    _fake_peer(monkeypatch)
    rows = protocol.worker("fake", "jit", "mlp")
    for r in rows:
        json.loads(report.dump_row(r))
        assert r["peer"] == "fake" and r["threads"] == 2 and r["spec"] == W.SPEC_VERSION
    metrics = [r["metric"] for r in rows]
    assert metrics == ["compile_init_s", "loss_step1", "loss_step10", "steps_per_s", "gflops",
                       "first_step_s", "compile_s", "infer_b1_ms", "infer_b256_ms",
                       "infer_b256_per_s", "peak_rss_mb"]
    by = {r["metric"]: r for r in rows}
    step = 2.0 / 9999
    assert by["loss_step1"]["value"] == 3.0
    assert by["loss_step10"]["value"] == pytest.approx(3.0 - 9 * step)
    assert len(by["steps_per_s"]["samples"]) == 5 and by["steps_per_s"]["n_per_block"] >= 3
    assert by["peak_rss_mb"]["value"] > 0
    mm = protocol.worker("fake", "eager", "matmul")
    assert [r["metric"] for r in mm] == ["matmul_n256_gflops", "matmul_n1024_gflops",
                                         "matmul_n2048_gflops", "peak_rss_mb"]


def test_worker_errors_become_rows(monkeypatch):
    _fake_peer(monkeypatch)
    (r,) = protocol.worker("fake", "nosuchmode", "mlp")
    assert r["metric"] == "error" and "no 'nosuchmode' mode" in r["error"]
    (r,) = protocol.worker("fake", "eager", "resnet")
    assert r["metric"] == "error" and "unknown workload" in r["error"]
    (r,) = protocol.worker("nosuchpeer", "eager", "mlp")
    assert r["metric"] == "error" and "ModuleNotFoundError" in r["error"]
    json.loads(report.dump_row(r))


# -- the timing protocol, on a fake clock --------------------------------------------------------

class FakeClock:
    def __init__(self, durations):
        self.t, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self):
        return self.t

    def fn(self):
        self.t += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1
        return self.calls


def test_time_calls_protocol():
    # call 1 compiles (2 s), call 2 recompiles (0.5 s), then 1/128 s per call (dyadic: exact)
    d = 2.0 ** -7
    clock = FakeClock([2.0, 0.5] + [d] * 10_000)
    syncs = []
    r = protocol.time_calls(clock.fn, syncs.append, clock=clock, to_float=float)
    assert r["first_s"] == 2.0
    # warm-up: >= 10 calls and >= 1 s of calls; 2.5 s are spent after 2 calls, so exactly 10
    assert len(r["warmup"]) == 10
    assert r["n"] == 32  # ceil(0.25 s / (1/128 s))
    assert r["per_call"] == d and len(r["samples"]) == 5
    assert r["compile_s"] == (2.0 - d) + (0.5 - d)
    assert r["kept"] == {0: 1.0, 9: 10.0}
    # training blocks synchronise once per block; every warm-up call is synchronised
    assert len(syncs) == 10 + 5 and clock.calls == 10 + 5 * 32


def test_time_calls_slow_and_inference():
    clock = FakeClock([0.4])  # slow calls: >= 1 s of warm-up does not cut below 10 calls
    syncs = []
    r = protocol.time_calls(clock.fn, syncs.append, clock=clock, sync_each=True)
    assert len(r["warmup"]) == 10 and r["n"] == 3  # the minimum block size
    assert len(syncs) == 10 + 5 * 3 + 5  # inference: after every call (+ the block end)
    assert r["compile_s"] == 0 and r["kept"] == {}
    clock = FakeClock([1e-4])
    r = protocol.time_calls(clock.fn, lambda out: None, clock=clock)
    assert len(r["warmup"]) >= 10_000  # 1 s of calls


# -- the driver --------------------------------------------------------------------------------

def test_schedule_rotates_and_interleaves():
    pairs = [("kiln", "eager"), ("torch", "eager"), ("jax", "jit")]
    probe = [("numpy", "2threads"), ("torch", "eager")]
    jobs = bench_run.schedule(pairs, probe, ["mlp", "gpt"], 3)
    assert len(jobs) == 3 * (2 * 3 + 2)
    firsts = [j[1:3] for j in jobs if j[3] == "mlp" and j in jobs][::3]
    assert firsts == pairs  # each pair goes first in one round
    assert [j[0] for j in jobs] == sorted(j[0] for j in jobs)  # rounds are not mixed
    rnd1 = [j for j in jobs if j[0] == 1]
    assert [j[1:] for j in rnd1[:3]] == [("torch", "eager", "mlp"), ("jax", "jit", "mlp"),
                                         ("kiln", "eager", "mlp")]
    assert rnd1[-2:] == [(1, "torch", "eager", "matmul"), (1, "numpy", "2threads", "matmul")]


def test_thread_env_as_found():
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "4", "MY_THREADS": "2",
           "TF_CLI_CONFIG_FILE": "/root/.terraformrc", "XLA_FLAGS": "--x", "HOME": "/root"}
    assert bench_run.thread_env(env) == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "4",
                                         "MY_THREADS": "2", "XLA_FLAGS": "--x"}


def test_quick_peers_are_known():
    train, probe = bench_run.default_pairs()
    assert ("kiln", "eager") in train and ("torch", "eager") in train
    assert set(map(tuple, (p.split(":") for p in bench_run.QUICK["peers"]))) <= set(train)
    assert ("numpy", "2threads") in probe and ("numpy", "1thread") in probe


# -- the spec: init, data, relabelling, FLOPs ----------------------------------------------------

def test_params_and_data_follow_the_spec():
    p = W.params("mlp")
    assert list(p) == ["fc1.w", "fc1.b", "fc2.w", "fc2.b", "fc3.w", "fc3.b"]
    assert p["fc1.w"].shape == (784, 256) and p["fc1.w"].dtype == np.float32
    assert np.abs(p["fc1.w"]).max() <= 1 / 28
    rng = np.random.default_rng(0)  # first draw of the spec's seed-0 stream
    assert np.array_equal(p["fc1.w"], rng.uniform(-1 / 28, 1 / 28, (784, 256)).astype(np.float32))
    g = W.params("gpt")
    assert len(g) == 2 + 4 * 12 + 3 and g["h3.mlp.proj.w"].shape == (512, 128)
    assert (g["h0.ln1.g"] == 1).all() and (g["h0.attn.qkv.b"] == 0).all()
    x, y = W.train_data("gpt")
    assert x.shape == y.shape == (16, 64) and (x[:, 1:] == y[:, :-1]).all()
    x, y = W.train_data("cnn")
    assert x.shape == (64, 1, 28, 28) and y.max() < 10
    assert W.infer_data("mlp", 256).shape == (256, 784)
    assert np.array_equal(W.infer_data("cnn", 1),
                          np.random.default_rng(1002).standard_normal((1, 1, 28, 28),
                                                                      dtype=np.float32))


def test_nhwc_relabelling_is_the_same_math():
    p, q = W.cnn_params(), W.to_nhwc(W.cnn_params())
    h = np.random.default_rng(5).standard_normal((3, 32, 7, 7))  # float64: order-insensitive
    np.testing.assert_allclose(h.reshape(3, -1) @ p["fc1.w"].astype(np.float64),
                               h.transpose(0, 2, 3, 1).reshape(3, -1) @ q["fc1.w"].astype(
                                   np.float64), rtol=1e-12, atol=1e-14)
    assert q["conv1.w"].shape == (5, 5, 1, 16) and q["conv2.w"][1, 2, 3, 4] == \
        p["conv2.w"][4, 3, 1, 2]
    assert W.to_nhwc(W.mlp_params()).keys() == W.mlp_params().keys()


def test_flops_table_matches_the_shapes():
    def linear(b, layers, first_input_grad=False):
        fwd = sum(2 * b * i * o for i, o in layers)
        dx = sum(2 * b * i * o for k, (i, o) in enumerate(layers) if k or first_input_grad)
        return fwd, fwd + fwd + dx

    mlp = [(784, 256), (256, 256), (256, 10)]
    assert W.FLOPS["mlp"] == pytest.approx(linear(64, mlp)[1], rel=1e-3)
    assert W.FLOPS["mlp_infer_b256"] == pytest.approx(linear(256, mlp)[0], rel=1e-3)
    conv = 2 * (28 * 28 * 16 * 25 * 1) + 0  # per sample
    conv2 = 2 * (14 * 14 * 32 * 25 * 16)
    fc = [(1568, 128), (128, 10)]
    fwd = 64 * (conv + conv2) + linear(64, fc)[0]
    train = 2 * fwd + 64 * conv2 + linear(64, fc, True)[0]  # conv1 needs no input gradient
    assert W.FLOPS["cnn"] == pytest.approx(train, rel=1e-3)
    assert W.FLOPS["cnn_infer_b1"] == pytest.approx(conv + conv2 + linear(1, fc)[0], rel=1e-3)
    B, T, C, V = 16, 64, 128, 65
    per_layer = 2 * B * T * C * (3 * C + C + 4 * C + 4 * C) + 2 * 2 * B * T * T * C
    fwd = 4 * per_layer + 2 * B * T * C * V
    assert W.FLOPS["gpt"] == pytest.approx(3 * fwd, rel=1e-3)
