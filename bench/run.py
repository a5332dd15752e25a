"""Benchmark runner: Kiln side by side with PyTorch, TensorFlow and JAX on the workloads of
shared/bench-workloads.md (spec version 1).

    bash bench/setup_peers.sh       # once: a venv per peer under bench/.venvs/
    python bench/run.py             # full suite: every peer and mode, matmul probe, 3 rounds
    python bench/run.py --quick     # Kiln eager vs PyTorch eager on mlp, cnn, gpt (< 1 min idle)
    python bench/run.py --peers kiln:eager jax:jit --workloads gpt --rounds 2
    python bench/run.py --report bench/results/<file>.jsonl   # re-render a report

Every (peer, mode, workload) runs in its own fresh process, under the interpreter of its peer
(Kiln and the numpy probe: this interpreter; torch, tf, jax: bench/.venvs/<peer>); each round
runs all of them in a rotated order, and ratios against PyTorch eager are taken within the
round.  Writes bench/results/<date>-<run_id>.jsonl (one JSON object per measurement, appended
as they come), .md (the report) and .png (the plot, drawn with matplotlib from the torch venv).
The thread environment is recorded as found and passed to the workers unchanged.
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
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402  (bench/ is not a package)

WORKLOADS = ["mlp", "cnn", "gpt"]
PEERS = ["kiln", "torch", "tf", "jax"]  # training peers, in display order
MATMUL_PEERS = ["numpy", "kiln", "torch", "tf", "jax"]
VENVS = os.path.join(HERE, ".venvs")
QUICK = dict(peers=["kiln:eager", "torch:eager"], workloads=WORKLOADS, rounds=1)
WORKER_TIMEOUT_S = 1800


def _peer_module(peer):
    import importlib

    return importlib.import_module(f"peers.{peer}_peer")


def interpreter(peer: str):
    """The Python that runs a peer: its venv when there is one; Kiln and numpy run here; torch
    falls back to this interpreter when it has torch (the test oracle) and no venv exists."""
    venv = os.path.join(VENVS, peer, "bin", "python")
    if peer in ("kiln", "numpy"):
        return sys.executable
    if os.path.exists(venv):
        return venv
    if peer == "torch":
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return sys.executable
    return None


def default_pairs():
    """Every available (peer, mode): the training pairs and the matmul-probe pairs."""
    train = [(p, m) for p in PEERS for m in _modes(p)]
    probe = [(p, m) for p in MATMUL_PEERS for m in _peer_module(p).MATMUL_MODES]
    return train, probe


def _modes(peer):
    mod = _peer_module(peer)
    # kiln's mode list depends on the installed kiln (compile appears when kiln.compile does);
    # the other peers' lists are static, so no framework is imported here.
    return mod.modes() if peer == "kiln" else list(mod.MODES)


# -- running workers ----------------------------------------------------------------------------

def run_worker(peer, mode, workload, timeout=WORKER_TIMEOUT_S) -> list:
    python = interpreter(peer)
    base = {"peer": peer, "mode": mode, "workload": workload}
    if python is None:
        return [{**base, "metric": "error", "value": None, "unit": "",
                 "error": f"no interpreter for {peer}: run `bash bench/setup_peers.sh {peer}`"}]
    fd, out = tempfile.mkstemp(prefix="kiln-bench-", suffix=".json")
    os.close(fd)
    cmd = [python, os.path.abspath(__file__), "--worker", f"{peer}:{mode}:{workload}",
           "--out", out]
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
        with open(out) as f:
            text = f.read()
        if cp.returncode == 0 and text:
            return json.loads(text)
        tail = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        return [{**base, "metric": "error", "value": None, "unit": "",
                 "error": f"worker exited {cp.returncode}: {tail}",
                 "stderr": cp.stderr[-3000:]}]
    except subprocess.TimeoutExpired:
        return [{**base, "metric": "error", "value": None, "unit": "",
                 "error": f"worker timed out after {timeout} s"}]
    finally:
        os.unlink(out)


def schedule(train_pairs, probe_pairs, workloads, rounds):
    """The job list: per round, every workload with its pairs in an order rotated by the round
    (so no pair is always first or last), then the matmul probe, likewise rotated."""
    jobs = []
    for rnd in range(rounds):
        for wl in workloads:
            k = rnd % len(train_pairs) if train_pairs else 0
            jobs += [(rnd, p, m, wl) for p, m in train_pairs[k:] + train_pairs[:k]]
        if probe_pairs:
            k = rnd % len(probe_pairs)
            jobs += [(rnd, p, m, "matmul") for p, m in probe_pairs[k:] + probe_pairs[:k]]
    return jobs


# -- the environment as found --------------------------------------------------------------------

_ENV_PREFIXES = ("OMP_", "OPENBLAS_", "GOTO", "MKL_", "BLIS_", "KMP_", "VECLIB_", "NUMEXPR_",
                 "XLA_", "JAX_", "TORCH", "KILN_", "TF_NUM", "TF_ENABLE", "TF_XLA", "NPROC")


def thread_env(environ=None) -> dict:
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k.startswith(_ENV_PREFIXES) or "THREAD" in k.upper()}


def machine() -> dict:
    """CPU model (and its widest SIMD), cores, memory, kernel, python: from /proc on Linux."""
    cpu, mem, simd = platform.processor() or platform.machine(), None, None
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        field = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
                 for ln in info if ":" in ln}
        cpu = field.get("model name", cpu)
        if "model" in field:
            cpu += f" (family {field.get('cpu family', '?')} model {field['model']})"
        flags = set(field.get("flags", "").split())
        simd = next((s for s in ("avx512f", "avx2", "avx", "sse4_2") if s in flags), None)
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
            mem = round(kb / 1024 ** 2, 1)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "simd": simd, "cores": os.cpu_count(), "mem_gb": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# -- main ---------------------------------------------------------------------------------------

def _runner_row(metric, run_id, **fields):
    return {"peer": "runner", "mode": "-", "workload": "-", "metric": metric, "value": None,
            "unit": "", "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **fields}


def plot(jsonl_path, png_path):
    """Draw the PNG with the torch venv's matplotlib (or this interpreter's); returns the
    path, or None with a message when no matplotlib is available."""
    script = os.path.join(HERE, "plot.py")
    for python in (os.path.join(VENVS, "torch", "bin", "python"), sys.executable):
        if not os.path.exists(python):
            continue
        cp = subprocess.run([python, script, jsonl_path, png_path], capture_output=True,
                            text=True)
        if cp.returncode == 0:
            return png_path
        err = (cp.stderr.strip().splitlines() or ["?"])[-1]
    print(f"no plot: {err if 'err' in locals() else 'no interpreter with matplotlib'}",
          file=sys.stderr)
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Kiln benchmark runner")
    ap.add_argument("--quick", action="store_true",
                    help="Kiln eager and PyTorch eager on mlp, cnn, gpt; 1 round; no probe")
    ap.add_argument("--peers", nargs="*", help="peer:mode pairs (default: every available)")
    ap.add_argument("--workloads", nargs="*", help=f"subset of {WORKLOADS}")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul probe")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--report", metavar="JSONL", help="re-render the report of a results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside a fresh process, possibly another interpreter
        import protocol

        peer, mode, wl = args.worker.split(":")
        rows = protocol.worker(peer, mode, wl)
        text = json.dumps(rows)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)
        return
    if args.report:
        text = report.render(report.load_jsonl(args.report))
        png = os.path.splitext(args.report)[0] + ".png"
        if os.path.exists(png):
            text += f"\n![steps/s per workload and framework]({os.path.basename(png)})\n"
        print(text)
        return

    train, probe = default_pairs()
    if args.quick:
        train = [tuple(p.split(":")) for p in QUICK["peers"]]
        probe = []
    if args.peers:
        wanted = [tuple(p.split(":")) for p in args.peers]
        train = [p for p in wanted if p[0] in PEERS]
        probe = [p for p in wanted if p in default_pairs()[1]]
    if args.no_matmul:
        probe = []
    workloads = args.workloads or WORKLOADS
    rounds = args.rounds or (QUICK["rounds"] if args.quick else 3)

    run_id = uuid.uuid4().hex[:8]
    date = time.strftime("%Y-%m-%d")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", f"{date}-{run_id}")
    jsonl = stem + ".jsonl"
    t0 = time.time()
    env_row = _runner_row("environment", run_id, date=date, rounds=rounds, machine=machine(),
                          env=thread_env(), load=list(os.getloadavg()), commit=_commit(),
                          interpreters={p: interpreter(p) for p in set(PEERS + MATMUL_PEERS)},
                          pairs=[":".join(p) for p in train],
                          probe=[":".join(p) for p in probe], workloads=workloads)
    rows = [env_row]
    with open(jsonl, "w") as f:
        f.write(report.dump_row(env_row) + "\n")
    jobs = schedule(train, probe, workloads, rounds)
    for i, (rnd, peer, mode, wl) in enumerate(jobs, 1):
        t = time.time()
        got = run_worker(peer, mode, wl)
        for r in got:
            r.update(round=rnd, run_id=run_id, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rows += got
        with open(jsonl, "a") as f:
            f.writelines(report.dump_row(r) + "\n" for r in got)
        status = next((r["error"] for r in got if r["metric"] == "error"), "ok")
        print(f"[{i}/{len(jobs)}] round {rnd} {wl} {peer}:{mode} {time.time() - t:.0f}s "
              f"{status[:160]}", file=sys.stderr, flush=True)
    end_row = _runner_row("finished", run_id, load=list(os.getloadavg()),
                          wall_s=time.time() - t0)
    rows.append(end_row)
    with open(jsonl, "a") as f:
        f.write(report.dump_row(end_row) + "\n")

    text = report.render(rows)
    png = None if args.no_plot else plot(jsonl, stem + ".png")
    if png:
        text += f"\n![steps/s per workload and framework]({os.path.basename(png)})\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"raw results: {os.path.relpath(jsonl)}\nreport: {os.path.relpath(stem + '.md')}"
          + (f"\nplot: {os.path.relpath(png)}" if png else ""))


if __name__ == "__main__":
    main()
