"""Benchmark runner: every (peer, mode) in its own fresh process, rounds interleaved, ratios
against PyTorch eager taken within each round (shared/bench-workloads.md, timing protocol).

    python bench/run.py --quick                 # Kiln eager vs PyTorch eager, 3 workloads
    python bench/run.py --peers kiln:eager torch:eager torch:compile --rounds 3

Writes ``bench/results/<date>-<run_id>.jsonl`` (one JSON object per measurement) and prints a
Markdown table.  Steady-state numbers exclude warm-up; first-step and compile time are
reported separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ["mlp", "cnn", "gpt"]
THREADS = 2


# -- inside a worker process ---------------------------------------------------------------------

def _lib(peer: str):
    if peer == "torch":
        import torch

        torch.set_num_threads(THREADS)
        torch.set_num_interop_threads(THREADS)
        return torch
    if peer == "kiln":
        import kiln

        return kiln
    raise ValueError(f"unknown peer {peer!r}")


def _sync(x):
    return x


def _time_calls(fn, sync):
    """Warm-up, calibration and 5 timed blocks; returns (first_s, compile_s, per_call, samples)."""
    warm = []
    start = time.perf_counter()
    while len(warm) < 10 or time.perf_counter() - start < 1.0:
        t = time.perf_counter()
        sync(fn())
        warm.append(time.perf_counter() - t)
    steady = statistics.median(warm[-5:])
    compile_s = sum(max(0.0, w - steady) for w in warm[:10])
    n = max(3, math.ceil(0.25 / max(steady, 1e-9)))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            out = fn()
        sync(out)
        samples.append((time.perf_counter() - t) / n)
    return warm[0], compile_s, statistics.median(samples), samples, n


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(peer: str, mode: str, workload: str) -> list:
    sys.path.insert(0, HERE)
    import workloads as W

    lib = _lib(peer)
    if mode != "eager":
        raise ValueError(f"mode {mode!r} is not available for {peer}")
    version = getattr(lib, "__version__", "?")
    rows = []
    base = {"peer": peer, "mode": mode, "workload": workload, "version": version,
            "threads": THREADS}
    step, _ = W.build(lib, workload)
    losses = [float(step().item()) for _ in range(10)]
    rows.append({**base, "metric": "loss_step1", "value": losses[0], "unit": "nats"})
    rows.append({**base, "metric": "loss_step10", "value": losses[9], "unit": "nats"})
    step, _ = W.build(lib, workload)  # fresh state for timing
    first, comp, per, samples, n = _time_calls(step, _sync)
    rows.append({**base, "metric": "steps_per_s", "value": 1 / per, "unit": "steps/s",
                 "samples": [1 / s for s in samples], "n_per_block": n})
    rows.append({**base, "metric": "gflops", "value": W.FLOPS[workload] / per / 1e9,
                 "unit": "GFLOP/s"})
    rows.append({**base, "metric": "first_step_s", "value": first, "unit": "s"})
    rows.append({**base, "metric": "compile_s", "value": comp, "unit": "s"})
    if workload == "gpt":
        rows.append({**base, "metric": "tokens_per_s", "value": 1024 / per, "unit": "tokens/s"})
    else:
        ctx = lib.no_grad() if peer != "torch" else lib.inference_mode()
        for batch in ([1, 256] if workload == "mlp" else [1]):
            call = W.build_inference(lib, workload, batch)
            with ctx:
                _, _, per_i, samples_i, n_i = _time_calls(call, _sync)
            rows.append({**base, "metric": f"infer_b{batch}_ms", "value": per_i * 1e3,
                         "unit": "ms", "samples": [s * 1e3 for s in samples_i],
                         "n_per_block": n_i})
    rows.append({**base, "metric": "peak_rss_mb", "value": _peak_rss_mb(), "unit": "MB"})
    return rows


# -- the driver ---------------------------------------------------------------------------------

def _run_worker(peer, mode, workload, python) -> list:
    cmd = [python, os.path.abspath(__file__), "--worker", f"{peer}:{mode}:{workload}"]
    cp = subprocess.run(cmd, capture_output=True, text=True)
    if cp.returncode != 0:
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"peer": peer, "mode": mode, "workload": workload, "metric": "error",
                 "value": None, "unit": "", "error": err}]
    return json.loads(cp.stdout.strip().splitlines()[-1])


def environment() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "MKL_", "KILN_", "XLA_", "TF_"))}
    return {"machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "env": env}


def summarize(rows: list) -> str:
    """Markdown table: per workload and peer, median over rounds, ratio vs PyTorch eager."""
    by = {}
    for r in rows:
        if r["metric"] == "error":
            by.setdefault((r["workload"], f"{r['peer']}:{r['mode']}"), {})["error"] = r["error"]
            continue
        by.setdefault((r["workload"], f"{r['peer']}:{r['mode']}"), {}).setdefault(
            r["metric"], {})[r.get("round", 0)] = r["value"]
    lines = ["| workload | peer:mode | steps/s | vs torch:eager | GFLOP/s | loss@1 | loss@10 "
             "| first step s | infer b1 ms | peak MB |", "|" + "---|" * 10]
    for (wl, peer), m in sorted(by.items()):
        if "error" in m:
            lines.append(f"| {wl} | {peer} | error: {m['error'][:80]} |" + " |" * 7)
            continue
        ref = by.get((wl, "torch:eager"), {}).get("steps_per_s", {})
        sps = m.get("steps_per_s", {})
        ratios = [sps[k] / ref[k] for k in sps if k in ref]

        def med(name, fmt="{:.3g}"):
            vals = list(m.get(name, {}).values())
            return fmt.format(statistics.median(vals)) if vals else "-"

        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        lines.append(f"| {wl} | {peer} | {med('steps_per_s', '{:.1f}')} | {ratio} | "
                     f"{med('gflops', '{:.2f}')} | {med('loss_step1', '{:.5f}')} | "
                     f"{med('loss_step10', '{:.5f}')} | {med('first_step_s', '{:.3f}')} | "
                     f"{med('infer_b1_ms', '{:.3f}')} | {med('peak_rss_mb', '{:.0f}')} |")
    return "\n".join(lines)


def check_losses(rows: list, rtol: float = 1e-3) -> list:
    """Peers must agree on loss_step1 and loss_step10 (same init and data): list mismatches."""
    problems = []
    for wl in {r["workload"] for r in rows}:
        for metric in ("loss_step1", "loss_step10"):
            vals = {f"{r['peer']}:{r['mode']}": r["value"] for r in rows
                    if r["workload"] == wl and r["metric"] == metric}
            if len(vals) > 1:
                lo, hi = min(vals.values()), max(vals.values())
                if hi - lo > rtol * abs(hi):
                    problems.append(f"{wl} {metric} disagrees across peers: {vals}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description="Kiln benchmark runner")
    ap.add_argument("--quick", action="store_true", help="Kiln and PyTorch eager only")
    ap.add_argument("--peers", nargs="*", default=["kiln:eager", "torch:eager"])
    ap.add_argument("--workloads", nargs="*", default=WORKLOADS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        peer, mode, wl = args.worker.split(":")
        print(json.dumps(worker(peer, mode, wl)))
        return
    run_id = uuid.uuid4().hex[:8]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out_path = os.path.join(HERE, "results", f"{time.strftime('%Y-%m-%d')}-{run_id}.jsonl")
    pairs = [tuple(p.split(":")) for p in args.peers]
    rows = []
    for rnd in range(args.rounds):
        order = pairs[rnd % len(pairs):] + pairs[:rnd % len(pairs)]
        for wl in args.workloads:
            for peer, mode in order:
                got = _run_worker(peer, mode, wl, sys.executable)
                for r in got:
                    r.update(round=rnd, run_id=run_id, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
                rows.extend(got)
                with open(out_path, "a") as f:
                    for r in got:
                        f.write(json.dumps(r) + "\n")
                print(f"round {rnd} {wl} {peer}:{mode} done", file=sys.stderr)
    env = environment()
    print(f"# Kiln benchmark {time.strftime('%Y-%m-%d')} run {run_id}")
    print(f"machine: {env['processor'] or env['machine']}, {env['cpus']} cpus, "
          f"python {env['python']}, threads {THREADS}, environment as found: "
          f"{env['env'] or 'no thread/BLAS variables set'}\n")
    print(summarize(rows))
    for p in check_losses(rows):
        print(f"\nWARNING: {p}")
    print(f"\nraw results: {os.path.relpath(out_path)}")


if __name__ == "__main__":
    main()
