"""Per-op overhead of eager mode on tiny tensors: Kiln vs PyTorch eager, side by side.

Cases (16-element float32 tensors, so time is framework overhead, not arithmetic):
  add_chain_fwd      1,000 chained adds, graph recorded (x requires grad)
  add_chain_fwd_bwd  the same plus .sum().backward()
  mixed_fwd_bwd      1,000 steps of y = tanh(y * w + b), then backward
  nograd_add         1,000 adds under no_grad

Each framework runs in its own fresh process, rounds interleaved; we report the median over
rounds of microseconds per op and the ratio Kiln / PyTorch within each round.

    python bench/eager_overhead.py [--rounds 5] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

N_OPS = 1000
CASES = ["add_chain_fwd", "add_chain_fwd_bwd", "mixed_fwd_bwd", "nograd_add"]


def _worker(lib_name: str) -> dict:
    if lib_name == "torch":
        import torch as lib

        lib.set_num_threads(2)
    else:
        import kiln as lib

    x = lib.ones(16, requires_grad=True)
    w = lib.full((16,), 0.5, requires_grad=True)
    b = lib.full((16,), 0.1, requires_grad=True)
    y0 = lib.ones(16)

    def add_chain_fwd():
        z = x
        for _ in range(N_OPS):
            z = z + y0
        return z

    def add_chain_fwd_bwd():
        add_chain_fwd().sum().backward()

    def mixed_fwd_bwd():
        z = x
        for _ in range(N_OPS // 3):
            z = (z * w + b).tanh()
        z.sum().backward()

    def nograd_add():
        with lib.no_grad():
            z = x
            for _ in range(N_OPS):
                z = z + y0

    fns = {"add_chain_fwd": add_chain_fwd, "add_chain_fwd_bwd": add_chain_fwd_bwd,
           "mixed_fwd_bwd": mixed_fwd_bwd, "nograd_add": nograd_add}
    out = {}
    for name in CASES:
        fn = fns[name]
        for _ in range(5):
            fn()
        samples = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(5):
                fn()
            samples.append((time.perf_counter() - t) / 5 / N_OPS * 1e6)
        x.grad = w.grad = b.grad = None
        out[name] = statistics.median(samples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="append one JSON line per (peer, case, round) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker)))
        return

    peers = ["kiln", "torch"]
    per_round = []
    for r in range(args.rounds):
        order = peers if r % 2 == 0 else peers[::-1]
        res = {}
        for p in order:
            cp = subprocess.run([sys.executable, __file__, "--worker", p], capture_output=True,
                                text=True, check=True)
            res[p] = json.loads(cp.stdout.strip().splitlines()[-1])
        per_round.append(res)
        if args.json:
            with open(args.json, "a") as f:
                for p in peers:
                    for c in CASES:
                        f.write(json.dumps({"peer": p, "mode": "eager", "workload": c,
                                            "metric": "us_per_op", "value": res[p][c],
                                            "unit": "us", "round": r}) + "\n")

    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "MKL_")) or k == "KILN_DEBUG"}
    print(f"# eager per-op overhead, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, python {platform.python_version()}, env {env or 'none set'}")
    print("| case | Kiln us/op | PyTorch us/op | Kiln / PyTorch |")
    print("|---|---|---|---|")
    for c in CASES:
        k = statistics.median(r["kiln"][c] for r in per_round)
        t = statistics.median(r["torch"][c] for r in per_round)
        ratio = statistics.median(r["kiln"][c] / r["torch"][c] for r in per_round)
        print(f"| {c} | {k:.2f} | {t:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
