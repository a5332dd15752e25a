"""The worker side of the timing protocol (shared/bench-workloads.md): one process measures one
(peer, mode, workload) and returns JSON rows.  Imports no framework itself: the peer module
(bench/peers/<peer>_peer.py) does, so this runs in any interpreter that has numpy.

A peer module provides:

    MODES, COMPILED, MATMUL_MODES      mode names (``modes()`` may narrow MODES at run time)
    setup(mode) -> dict                import the framework, set 2 threads; returns context
                                       fields: version, threads, threading (how it was set)
    compile_init(mode) -> float        seconds to compile and run ``x*2+1`` (compiled modes)
    build_train(mode, workload)        -> (step, sync, to_float); step() returns the loss as a
                                       framework tensor, sync(out) waits for it and the state
    build_infer(mode, workload, batch) -> (call, sync, context manager to time it under)
    build_matmul(mode, n)              -> (call, sync)
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import resource
import statistics
import sys
import time
import traceback

import workloads as W

THREADS = 2
MATMUL_SIZES = (256, 1024, 2048)
WARMUP_CALLS, WARMUP_S, BLOCK_S, BLOCKS = 10, 1.0, 0.25, 5


def time_calls(fn, sync, *, sync_each=False, clock=time.perf_counter, keep=(0, 9),
               to_float=None):
    """Warm-up (>= 10 calls and >= 1 s, each synchronised and timed), calibration, 5 blocks.

    Returns a dict: first_s, compile_s, per_call (median of the blocks), samples (per-call
    time of each block), n (calls per block), warmup (all warm-up times) and, when
    ``to_float`` is given, kept: {call index: to_float(output)} for the indices in ``keep``
    (converted outside the timed region)."""
    warm, kept = [], {}
    start = clock()
    while len(warm) < WARMUP_CALLS or clock() - start < WARMUP_S:
        t = clock()
        out = fn()
        sync(out)
        warm.append(clock() - t)
        if to_float is not None and len(warm) - 1 in keep:
            kept[len(warm) - 1] = to_float(out)
    n = max(3, math.ceil(BLOCK_S / max(statistics.median(warm[-5:]), 1e-9)))
    samples = []
    for _ in range(BLOCKS):
        t = clock()
        for _ in range(n):
            out = fn()
            if sync_each:
                sync(out)
        sync(out)
        samples.append((clock() - t) / n)
    per_call = statistics.median(samples)
    compile_s = sum(max(0.0, w - per_call) for w in warm[:WARMUP_CALLS])
    return {"first_s": warm[0], "compile_s": compile_s, "per_call": per_call,
            "samples": samples, "n": n, "warmup": warm, "kept": kept}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_module(peer: str):
    return importlib.import_module(f"peers.{peer}_peer")


def worker(peer: str, mode: str, workload: str) -> list:
    """Measure one (peer, mode, workload) in this process; never raises (errors become rows)."""
    rows = []
    base = {"peer": peer, "mode": mode, "workload": workload, "spec": W.SPEC_VERSION,
            "python": sys.executable, "pid": os.getpid(), "load_start": os.getloadavg()[0]}

    def add(metric, value, unit, **extra):
        rows.append({**base, "metric": metric, "value": value, "unit": unit, **extra})

    try:
        mod = peer_module(peer)
        known = mod.MATMUL_MODES if workload == "matmul" else mod.modes()
        if mode not in known:
            raise ValueError(f"{peer} has no {mode!r} mode for {workload}; it has {list(known)}")
        if workload != "matmul" and workload not in W.FORWARD:
            raise ValueError(f"unknown workload {workload!r}")
        base.update(mod.setup(mode))
        if mode in getattr(mod, "COMPILED", ()):
            add("compile_init_s", mod.compile_init(mode), "s")
        if workload == "matmul":
            _matmul(mod, mode, add)
        else:
            _train(mod, mode, workload, add)
            _infer(mod, mode, workload, add)
        base["load_end"] = os.getloadavg()[0]
        add("peak_rss_mb", peak_rss_mb(), "MB")
    except Exception as e:  # noqa: BLE001 - every failure is reported as a row
        tb = traceback.format_exc().strip().splitlines()
        add("error", None, "", error=f"{type(e).__name__}: {e}"[:2000],
            traceback="\n".join(tb[-12:]))
    return rows


def _train(mod, mode, workload, add):
    step, sync, to_float = mod.build_train(mode, workload)
    r = time_calls(step, sync, to_float=to_float)
    add("loss_step1", r["kept"][0], "nats")
    add("loss_step10", r["kept"][9], "nats")
    add("steps_per_s", 1 / r["per_call"], "steps/s", samples=[1 / s for s in r["samples"]],
        n_per_block=r["n"])
    add("gflops", W.FLOPS[workload] / r["per_call"] / 1e9, "GFLOP/s")
    add("first_step_s", r["first_s"], "s", warmup=r["warmup"][:WARMUP_CALLS])
    add("compile_s", r["compile_s"], "s")
    if workload == "gpt":
        tokens = W.GPT["B"] * W.GPT["T"]
        add("tokens_per_s", tokens / r["per_call"], "tokens/s")


def _infer(mod, mode, workload, add):
    for batch in W.INFERENCE.get(workload, ()):
        call, sync, ctx = mod.build_infer(mode, workload, batch)
        with ctx or contextlib.nullcontext():
            r = time_calls(call, sync, sync_each=True)
        add(f"infer_b{batch}_ms", r["per_call"] * 1e3, "ms",
            samples=[s * 1e3 for s in r["samples"]], n_per_block=r["n"],
            first_call_s=r["first_s"])
        if batch > 1:
            add(f"infer_b{batch}_per_s", batch / r["per_call"], "samples/s")


def _matmul(mod, mode, add):
    for n in MATMUL_SIZES:
        call, sync = mod.build_matmul(mode, n)
        r = time_calls(call, sync)
        add(f"matmul_n{n}_gflops", 2 * n ** 3 / r["per_call"] / 1e9, "GFLOP/s",
            samples=[2 * n ** 3 / s / 1e9 for s in r["samples"]], n_per_block=r["n"],
            first_call_s=r["first_s"])


def matmul_operands(n: int):
    """A, B standard normal float32 (seed n): the same operands for every framework."""
    import numpy as np

    rng = np.random.default_rng(n)
    return (rng.standard_normal((n, n), dtype=np.float32),
            rng.standard_normal((n, n), dtype=np.float32))
