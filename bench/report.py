"""Turning result rows into the report: medians over rounds, ratios against PyTorch eager taken
within each round, the loss-agreement check, the matmul peak, and the Markdown tables.

Pure standard library (no framework, no numpy), so the runner, the plot script and the tests
can all import it.  A row is one JSON object of the results file: ``peer``, ``mode``,
``workload``, ``metric``, ``value``, ``unit`` plus context (``round``, ``version``, ...).
"""

from __future__ import annotations

import json
import statistics

REF = "torch:eager"
WORKLOADS = ("mlp", "cnn", "gpt")
# Display order; peers not listed go last, alphabetically.
ORDER = ("kiln:eager", "kiln:compile", "torch:eager", "torch:compile", "tf:eager",
         "tf:function", "tf:xla", "jax:eager", "jax:jit", "numpy:2threads", "numpy:1thread")
# Measured spread across all peers: ~1e-7 at step 1 (float32 rounding), up to 2e-5 at step 10
# (Adam amplifies rounding where gradients are tiny); a wrong implementation is far outside.
LOSS_RTOL = {"loss_step1": 1e-5, "loss_step10": 1e-4}
ROW_KEYS = ("peer", "mode", "workload", "metric", "value", "unit")


def label(row: dict) -> str:
    return f"{row['peer']}:{row['mode']}"


def order_key(lbl: str):
    return (ORDER.index(lbl), "") if lbl in ORDER else (len(ORDER), lbl)


def load_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def dump_row(row: dict) -> str:
    """One JSON line; refuses rows without the six fields the spec's output format requires."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"result row lacks {missing}: {row}")
    return json.dumps(row, sort_keys=False, allow_nan=False)


def measurements(rows: list) -> list:
    """The rows that are measurements of a workload (not errors, not the runner's records)."""
    return [r for r in rows if r.get("peer") != "runner" and r["metric"] != "error"
            and r.get("value") is not None]


def by_round(rows: list) -> dict:
    """{(workload, peer:mode, metric): {round: value}}."""
    out = {}
    for r in measurements(rows):
        out.setdefault((r["workload"], label(r), r["metric"]), {})[r.get("round", 0)] = r["value"]
    return out


def medians(rows: list) -> dict:
    """{(workload, peer:mode): {metric: median over rounds}}."""
    out = {}
    for (wl, lbl, metric), vals in by_round(rows).items():
        out.setdefault((wl, lbl), {})[metric] = statistics.median(vals.values())
    return out


def spread(rows: list, metric: str = "steps_per_s") -> dict:
    """{(workload, peer:mode): (min, max) over rounds}."""
    return {(wl, lbl): (min(v.values()), max(v.values()))
            for (wl, lbl, m), v in by_round(rows).items() if m == metric}


def ratios(rows: list, metric: str = "steps_per_s", ref: str = REF) -> dict:
    """{(workload, peer:mode): median over rounds of value / (ref's value in the same round)}.

    Rounds where the reference has no value are skipped, so a ratio never mixes rounds."""
    br = by_round(rows)
    out = {}
    for (wl, lbl, m), vals in br.items():
        if m != metric:
            continue
        refv = br.get((wl, ref, metric), {})
        rs = [v / refv[k] for k, v in vals.items() if refv.get(k)]
        if rs:
            out[(wl, lbl)] = statistics.median(rs)
    return out


def errors(rows: list) -> list:
    return [r for r in rows if r.get("metric") == "error"]


def matmul_peak(rows: list):
    """The best matmul GFLOP/s measured (median over rounds of each peer/size):
    ``(gflops, peer:mode, n)`` or None."""
    best = None
    for (wl, lbl), m in medians(rows).items():
        if wl != "matmul":
            continue
        for metric, v in m.items():
            if metric.startswith("matmul_n") and (best is None or v > best[0]):
                best = (v, lbl, int(metric[len("matmul_n"):].split("_")[0]))
    return best


def check_losses(rows: list, rtol: dict | None = None) -> list:
    """Every peer starts from the same parameters and data, so loss_step1 and loss_step10 must
    agree.  Compares each (peer:mode, round) value with the median over all of them and returns
    one message per disagreement, naming the peers that are off."""
    rtol = rtol or LOSS_RTOL
    problems = []
    for (wl, metric), vals in sorted(_loss_values(rows).items()):
        ref = statistics.median(vals.values())
        off = {k: v for k, v in vals.items() if abs(v - ref) > rtol[metric] * abs(ref)}
        if off:
            worst = ", ".join(f"{lbl} (round {rnd}) {v:.6f}" for (lbl, rnd), v in
                              sorted(off.items()))
            problems.append(f"{wl} {metric}: median of {len(vals)} is {ref:.6f}; off by more "
                            f"than rtol {rtol[metric]:g}: {worst}")
    return problems


def _loss_values(rows):
    out = {}
    for r in measurements(rows):
        if r["metric"] in LOSS_RTOL:
            out.setdefault((r["workload"], r["metric"]), {})[(label(r), r.get("round", 0))] = \
                r["value"]
    return out


def versions(rows: list) -> dict:
    """{peer: "version (extras)"} from the workers' context fields."""
    out = {}
    for r in rows:
        if r.get("peer") in (None, "runner") or "version" not in r:
            continue
        extra = [f"{k} {r[k]}" for k in ("keras", "jaxlib", "optax", "numpy", "jit")
                 if k in r]
        out[r["peer"]] = r["version"] + (f" ({', '.join(extra)})" if extra else "")
    return dict(sorted(out.items()))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _sig(v):
    """Three significant figures without scientific notation for the usual ranges."""
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if v >= 1 else f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"


def table(rows: list) -> str:
    """The main table: one row per workload x peer:mode, medians over rounds."""
    med, rat, spr = medians(rows), ratios(rows), spread(rows)
    peak = matmul_peak(rows)
    errs = {(r["workload"], label(r)): r["error"] for r in errors(rows)}
    head = ["workload", "peer:mode", "steps/s", "vs torch eager", "GFLOP/s", "% matmul peak",
            "loss@1", "loss@10", "first step s", "compile s", "infer b1 ms",
            "infer b256 /s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(
        "---" if i < 2 else "--:" for i in range(len(head))) + "|"]
    keys = {k for k in med if k[0] != "matmul"} | {k for k in errs if k[0] != "matmul"}
    for wl, lbl in sorted(keys, key=lambda k: (_wl_key(k[0]), order_key(k[1]))):
        m = med.get((wl, lbl), {})
        name = f"**{lbl}**" if lbl.startswith("kiln:") else lbl
        if "steps_per_s" not in m:
            msg = errs.get((wl, lbl), "no result").replace("|", "/").replace("\n", " ")
            lines.append(f"| {wl} | {name} | error: {msg[:140]} |" + " |" * (len(head) - 3))
            continue
        sps = m["steps_per_s"]
        lo, hi = spr.get((wl, lbl), (sps, sps))
        pm = f" ±{50 * (hi - lo) / sps:.0f}%" if hi > lo else ""
        r = rat.get((wl, lbl))
        gf = m.get("gflops")
        cells = [wl, name, f"{_sig(sps)}{pm}", "-" if r is None else f"{r:.2f}×",
                 _fmt(gf, ".2f"),
                 "-" if gf is None or peak is None else f"{100 * gf / peak[0]:.1f}%",
                 _fmt(m.get("loss_step1"), ".5f"), _fmt(m.get("loss_step10"), ".5f"),
                 _fmt(m.get("first_step_s"), ".3f"), _fmt(m.get("compile_s"), ".3f"),
                 _fmt(m.get("infer_b1_ms"), ".3f"), _sig(m.get("infer_b256_per_s")),
                 _fmt(m.get("peak_rss_mb"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wl_key(wl):
    return (WORKLOADS.index(wl), "") if wl in WORKLOADS else (len(WORKLOADS), wl)


def matmul_table(rows: list) -> str:
    """GFLOP/s of C = A @ B per peer:mode and n (medians over rounds)."""
    med = medians(rows)
    errs = {label(r): r["error"] for r in errors(rows) if r["workload"] == "matmul"}
    labels = sorted({lbl for wl, lbl in med if wl == "matmul"} | set(errs), key=order_key)
    if not labels:
        return ""
    sizes = sorted({int(m[len("matmul_n"):].split("_")[0]) for (wl, _), ms in med.items()
                    if wl == "matmul" for m in ms if m.startswith("matmul_n")})
    lines = ["| matmul GFLOP/s | " + " | ".join(f"n={n}" for n in sizes) + " | peak MB |",
             "|---|" + "--:|" * (len(sizes) + 1)]
    for lbl in labels:
        m = med.get(("matmul", lbl), {})
        if not m:
            lines.append(f"| {lbl} | error: {errs[lbl][:120]} |" + " |" * len(sizes))
            continue
        cells = [_fmt(m.get(f"matmul_n{n}_gflops"), ".1f") for n in sizes]
        cells.append(_fmt(m.get("peak_rss_mb"), ".0f"))
        lines.append(f"| {lbl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_init_table(rows: list) -> str:
    """Median over processes of the compiler's start-up (``x*2+1`` compiled first)."""
    vals = {}
    for r in measurements(rows):
        if r["metric"] == "compile_init_s":
            vals.setdefault(label(r), []).append(r["value"])
    if not vals:
        return ""
    lines = ["| compiled mode | compile_init_s (median) | processes |", "|---|--:|--:|"]
    for lbl in sorted(vals, key=order_key):
        lines.append(f"| {lbl} | {statistics.median(vals[lbl]):.3f} | {len(vals[lbl])} |")
    return "\n".join(lines)


def runner_record(rows: list, metric: str = "environment") -> dict:
    for r in rows:
        if r.get("peer") == "runner" and r.get("metric") == metric:
            return r
    return {}


def render(rows: list) -> str:
    """The whole Markdown report of one run."""
    env = runner_record(rows)
    end = runner_record(rows, "finished")
    out = [f"# Kiln benchmark {env.get('date', '')} run {env.get('run_id', '')}", ""]
    if env:
        m = env.get("machine", {})
        out += [f"- machine: {m.get('cpu', '?')}"
                + (f", {m['simd']}" if m.get("simd") else "") + f", {m.get('cores', '?')} cores, "
                f"{m.get('mem_gb', '?')} GB RAM, Linux {m.get('kernel', '?')}, "
                f"python {m.get('python', '?')}",
                f"- thread/BLAS environment as found (never changed): "
                f"{_env_str(env.get('env', {}))}",
                f"- load average (1/5/15 min) at start: {_load(env.get('load'))}"
                + (f"; at end: {_load(end.get('load'))}" if end else ""),
                f"- rounds: {env.get('rounds', '?')} (order rotated each round), "
                f"every (peer, mode, workload) in a fresh process, 2 threads each; "
                f"kiln commit {env.get('commit', '?')}"]
        wl = [r.get("load_start") for r in rows if r.get("load_start") is not None]
        if wl:
            out.append(f"- load average (1 min) seen by the workers: median "
                       f"{statistics.median(wl):.1f}, max {max(wl):.1f} (2 cores: above 2 "
                       f"means other processes competed for the CPU)")
        if end.get("wall_s"):
            out.append(f"- wall time {end['wall_s'] / 60:.1f} min")
    ver = versions(rows)
    if ver:
        out.append("- versions: " + "; ".join(f"{p} {v}" for p, v in ver.items()))
    out += ["", "## Training (medians over rounds)", "", table(rows)]
    peak = matmul_peak(rows)
    if peak:
        out += ["", f"% matmul peak = workload GFLOP/s / {peak[0]:.1f} GFLOP/s, the best matmul "
                f"measured ({peak[1]}, n={peak[2]})."]
    mt = matmul_table(rows)
    if mt:
        out += ["", "## Matmul probe (C = A @ B, float32, GFLOP/s = 2n³/t)", "", mt]
    ct = compile_init_table(rows)
    if ct:
        out += ["", "## Compiler start-up", "", ct]
    problems = check_losses(rows)
    out += ["", "## Loss agreement", ""]
    if problems:
        out += [f"- MISMATCH {p}" for p in problems]
    else:
        n = len(_loss_values(rows).get(("gpt", "loss_step10"), {}))
        out.append(f"All peers agree on loss_step1 (rtol {LOSS_RTOL['loss_step1']:g}) and "
                   f"loss_step10 (rtol {LOSS_RTOL['loss_step10']:g}) on every workload"
                   + (f" ({n} gpt processes)." if n else "."))
    errs = errors(rows)
    if errs:
        out += ["", "## Errors", ""]
        out += [f"- {r['workload']} {label(r)} round {r.get('round', '?')}: {r['error'][:300]}"
                for r in errs]
    return "\n".join(out) + "\n"


def _env_str(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or \
        "no thread or BLAS variable set"


def _load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load) if load else "?"
