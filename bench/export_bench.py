"""Export benchmark: Kiln's two export formats side by side, per workload model.

    python bench/export_bench.py                  # mlp, cnn, gpt; table to stdout
    python bench/export_bench.py --out bench/results/export.md
    python bench/export_bench.py --quick          # smoke test: mlp only, a few calls per case

For each workload of bench/workloads.py (the forward pass with the spec's parameters), in a
fresh process per workload:

- ``kiln.export`` time and ``.kiln`` size, ``kiln.onnx.export`` time and ``.onnx`` size
  (dynamic batch dimension; a model that refused one would be exported once per batch size,
  and the table would say so);
- inference latency at batch 1 and 256 of the artifact loaded with ``kiln.load_exported`` and of
  ONNX Runtime running the ``.onnx`` file (an ``InferenceSession`` with default session options:
  measured as found), the ratio, and the largest difference between the two outputs.

Timing follows bench/protocol.py (warm-up >= 10 calls and >= 1 s, calibration, 5 blocks, median
block; inference synchronised after every call).  Kiln's BLAS pool is limited to 2 threads as in
bench/peers/kiln_peer.py; ONNX Runtime keeps its own default thread pool.  Inputs: mlp and cnn
use the spec's inference data (seed 1000 + k + batch); gpt, which has no inference case in the
spec, uses tokens from seed 1002 + batch, shape (batch, 64).  Export times are one export each
(tracing included) of a model that has already run once, with a batch-2 example (a fixed-batch
model: at the batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import protocol  # noqa: E402  (bench/ is not a package)
import workloads as W  # noqa: E402

WORKLOADS = ["mlp", "cnn", "gpt"]
BATCHES = (1, 256)
QUICK_WORKLOADS = ["mlp"]
WORKER_TIMEOUT_S = 1800


def infer_input(workload: str, batch: int) -> np.ndarray:
    """The inference input of a workload at a batch size (see the module docstring)."""
    if workload == "gpt":
        rng = np.random.default_rng(1000 + 2 + batch)
        return rng.integers(0, W.GPT["vocab"], size=(batch, W.GPT["T"]))
    return W.infer_data(workload, batch)


def _quick_protocol() -> None:
    # --quick: the smoke test's few calls; protocol.time_calls reads these at call time
    protocol.WARMUP_CALLS, protocol.WARMUP_S, protocol.BLOCK_S, protocol.BLOCKS = 2, 0.0, 0.0, 3


# -- the worker: one workload, in its own process -------------------------------------------------

def _timed_export(export, fn, x, path, dynamic) -> float:
    t = time.perf_counter()
    export(fn, (x,), path, dynamic_dims={"x": {0: "batch"}} if dynamic else None)
    return time.perf_counter() - t


def _export_all(kiln, fn, workload: str, tmp: str) -> dict:
    """Export with a dynamic batch, or once per batch size when the model refuses one."""
    import kiln.onnx

    res = {"kiln": {}, "onnx": {}}
    example = kiln.tensor(infer_input(workload, 2))
    with kiln.no_grad():
        fn(example)  # a model that has run before, as a trained one has
    for fmt, export in (("kiln", kiln.export), ("onnx", kiln.onnx.export)):
        path = os.path.join(tmp, f"{workload}.{fmt}")
        try:
            secs = _timed_export(export, fn, example, path, True)
            res[fmt] = {b: path for b in BATCHES}
            res[f"{fmt}_dynamic"] = True
        except RuntimeError as e:
            if "dynamic" not in str(e):
                raise
            res[f"{fmt}_dynamic"] = False
            res[f"{fmt}_why_static"] = str(e)
            secs = None
            for b in BATCHES:
                pb = os.path.join(tmp, f"{workload}_b{b}.{fmt}")
                t = _timed_export(export, fn, kiln.tensor(infer_input(workload, b)), pb, False)
                secs = t if secs is None else secs  # report the batch-1 export
                res[fmt][b] = pb
        res[f"{fmt}_export_s"] = secs
        res[f"{fmt}_mb"] = os.path.getsize(res[fmt][BATCHES[0]]) / 1e6
    return res


def _latency(call) -> dict:
    r = protocol.time_calls(call, lambda out: out, sync_each=True)
    return {"ms": r["per_call"] * 1e3, "samples_ms": [s * 1e3 for s in r["samples"]],
            "n": r["n"]}


def _time_kiln(kiln, path: str, x: np.ndarray):
    prog = kiln.load_exported(path)
    xt = kiln.tensor(x)
    return _latency(lambda: prog(xt)), prog(xt).numpy()


def _time_ort(ort, path: str, x: np.ndarray):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    return _latency(lambda: sess.run(None, feed)), sess.run(None, feed)[0]


def worker(workload: str, quick: bool) -> dict:
    """Measure one workload in this process; errors are returned, never raised."""
    out = {"workload": workload, "load_start": os.getloadavg()[0]}
    try:
        if quick:
            _quick_protocol()
        from peers import kiln_peer

        out["kiln_setup"] = kiln_peer.setup("eager")
        import kiln
        import onnxruntime as ort

        p = {k: kiln.tensor(v) for k, v in W.params(workload).items()}
        fwd = W.FORWARD[workload]

        def model(x):
            return fwd(kiln, p, x)

        with tempfile.TemporaryDirectory(prefix="kiln-export-bench-") as tmp:
            ex = _export_all(kiln, model, workload, tmp)
            out.update({k: v for k, v in ex.items() if k not in ("kiln", "onnx")})
            out["batches"] = {}
            for b in BATCHES:
                x = infer_input(workload, b)
                # one after the other: ORT's thread pool exists only while its session does
                row = {}
                row["kiln"], ref = _time_kiln(kiln, ex["kiln"][b], x)
                row["ort"], got = _time_ort(ort, ex["onnx"][b], x)
                row["max_abs_diff"] = float(np.abs(got - ref).max())
                row["out_scale"] = float(np.abs(ref).max())
                out["batches"][b] = row
        out["ort_version"] = ort.__version__
        out["ort_threads"] = "default SessionOptions (intra_op_num_threads=0: ORT's choice)"
        import onnx

        out["onnx_version"] = onnx.__version__
    except Exception as e:  # noqa: BLE001 - reported in the table
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"[:1000]
        out["traceback"] = traceback.format_exc()[-3000:]
    out["load_end"] = os.getloadavg()[0]
    return out


def run_worker(workload: str, quick: bool) -> dict:
    fd, path = tempfile.mkstemp(prefix="kiln-export-bench-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", workload, "--json", path]
    if quick:
        cmd.append("--quick")
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                            cwd=HERE)
        with open(path) as f:
            text = f.read()
        if cp.returncode == 0 and text:
            return json.loads(text, object_hook=_int_keys)
        tail = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        return {"workload": workload, "error": f"worker exited {cp.returncode}: {tail}"}
    except subprocess.TimeoutExpired:
        return {"workload": workload, "error": f"worker timed out after {WORKER_TIMEOUT_S} s"}
    finally:
        os.unlink(path)


def _int_keys(d: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


# -- the report ----------------------------------------------------------------------------------

def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(results: list, env: dict) -> str:
    """The Markdown report: environment, the export table, the inference table, errors."""
    m = env["machine"]
    first = next((r for r in results if "kiln_setup" in r), {})
    ks = first.get("kiln_setup", {})
    out = [f"# Kiln export benchmark {env['date']}", "",
           f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
           f"{m.get('mem_gb', '?')} GB RAM, Linux {m.get('kernel', '?')}, "
           f"python {m.get('python', '?')}",
           f"- versions: kiln {ks.get('version', '?')}, numpy {ks.get('numpy', '?')}, "
           f"onnx {first.get('onnx_version', '?')}, onnxruntime {first.get('ort_version', '?')}",
           f"- threads: Kiln {ks.get('threading', '?')}; ONNX Runtime "
           f"{first.get('ort_threads', '?')}",
           "- load average (1 min) per workload process, start/end: "
           + ", ".join(f"{r['workload']} {_f(r.get('load_start'), '.2f')}/"
                       f"{_f(r.get('load_end'), '.2f')}" for r in results),
           "- timing: bench/protocol.py (warm-up, calibration, median of 5 blocks, synchronised "
           "after every call)" + (" -- QUICK MODE: a few calls, numbers are not meaningful"
                                  if env.get("quick") else ""),
           "", "## Export", "",
           "| model | batch dim | kiln.export s | .kiln MB | kiln.onnx.export s | .onnx MB |",
           "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r and "kiln_export_s" not in r:
            out.append(f"| {r['workload']} | error | - | - | - | - |")
            continue
        dim = "; ".join(f"{fmt}: {'dynamic' if r.get(f'{fmt}_dynamic') else 'fixed'}"
                        for fmt in ("kiln", "onnx"))
        out.append(f"| {r['workload']} | {dim} | {_f(r.get('kiln_export_s'), '.3f')} | "
                   f"{_f(r.get('kiln_mb'), '.2f')} | {_f(r.get('onnx_export_s'), '.3f')} | "
                   f"{_f(r.get('onnx_mb'), '.2f')} |")
    out += ["", "## Inference latency (ms per call, median)", "",
            "| model | batch | Kiln artifact ms | ORT ms | Kiln / ORT | max abs diff |",
            "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for b, row in sorted(r.get("batches", {}).items()):
            k, o = row["kiln"]["ms"], row["ort"]["ms"]
            out.append(f"| {r['workload']} | {b} | {k:.3f} | {o:.3f} | {k / o:.2f} | "
                       f"{row['max_abs_diff']:.1e} |")
    if any(r.get(f"{fmt}_dynamic") is False for r in results for fmt in ("kiln", "onnx")):
        out += ["", "fixed: the model refused a dynamic batch dimension and was exported once "
                "per batch size (the export columns show the batch-1 export)."]
    out += ["", "Kiln / ORT > 1: the Kiln artifact is slower. max abs diff: Kiln artifact vs "
            "ONNX Runtime outputs on the same input."]
    errs = [r for r in results if "error" in r]
    if errs:
        out += ["", "## Errors", ""] + [f"- {r['workload']}: {r['error']}" for r in errs]
    return "\n".join(out) + "\n"


def environment(quick: bool) -> dict:
    import run  # bench/run.py: the machine description the main benchmark records

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": run.machine(),
            "python": platform.python_version(), "quick": quick}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Kiln export benchmark (.kiln vs .onnx + ORT)")
    ap.add_argument("--quick", action="store_true", help="smoke test: mlp, a few calls")
    ap.add_argument("--workloads", nargs="*", help=f"subset of {WORKLOADS}")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        text = json.dumps(worker(args.worker, args.quick))
        with open(args.json, "w") as f:
            f.write(text)
        return 0
    workloads = args.workloads or (QUICK_WORKLOADS if args.quick else WORKLOADS)
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {WORKLOADS}")
    env = environment(args.quick)
    results = []
    for wl in workloads:
        t = time.time()
        results.append(run_worker(wl, args.quick))
        print(f"{wl}: {time.time() - t:.0f}s {results[-1].get('error', 'ok')[:160]}",
              file=sys.stderr, flush=True)
        if "traceback" in results[-1]:
            print(results[-1]["traceback"], file=sys.stderr)
    text = render(results, env)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
