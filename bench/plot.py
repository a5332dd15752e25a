"""Plot of a results file: training steps/s per workload and framework, log scale, Kiln
highlighted; whiskers span the rounds (min to max), bars are the median.

    bench/.venvs/torch/bin/python bench/plot.py bench/results/<run>.jsonl out.png

(bench/run.py calls this after a run, with the torch venv's matplotlib.)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402

COLORS = {"kiln": "#e4572e", "torch": "#4c72b0", "tf": "#8c8c8c", "jax": "#55a868"}


def draw(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, spr, rat = report.medians(rows), report.spread(rows), report.ratios(rows)
    workloads = [w for w in report.WORKLOADS if any(k[0] == w for k in med)]
    labels = sorted({lbl for (wl, lbl), m in med.items() if wl in workloads
                     and "steps_per_s" in m}, key=report.order_key)
    if not labels:
        raise SystemExit("no steps/s measurements to plot")
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(labels) * len(workloads) / 2), 4.8))
    width = 0.8 / len(labels)
    for j, lbl in enumerate(labels):
        peer, mode = lbl.split(":")
        kiln = peer == "kiln"
        shade = 1.0 if mode in ("eager",) else 0.55
        for i, wl in enumerate(workloads):
            v = med.get((wl, lbl), {}).get("steps_per_s")
            if v is None:
                continue
            x = i + (j - (len(labels) - 1) / 2) * width
            lo, hi = spr.get((wl, lbl), (v, v))
            ax.bar(x, v, width * 0.92, color=COLORS.get(peer, "#999999"), alpha=shade,
                   edgecolor="black" if kiln else "none", linewidth=1.6 if kiln else 0,
                   hatch=None if mode == "eager" else "//", label=lbl if i == 0 else None,
                   yerr=[[v - lo], [hi - v]], error_kw={"elinewidth": 0.8, "capsize": 2})
            r = rat.get((wl, lbl))
            text = f"{v:.3g}" + (f"\n{r:.2f}×" if r is not None and lbl != report.REF else "")
            ax.text(x, hi * 1.08, text, ha="center", va="bottom", fontsize=6.5,
                    fontweight="bold" if kiln else "normal")
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{w}" for w in workloads])
    ax.set_ylabel("training steps/s (log scale; higher is better)")
    env = report.runner_record(rows)
    cpu = env.get("machine", {}).get("cpu", "")
    ax.set_title(f"Kiln vs PyTorch, TensorFlow, JAX — {env.get('date', '')}, {cpu}, 2 threads\n"
                 "bar = median over rounds, whisker = min..max, label: steps/s and ratio to "
                 "torch:eager", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(labels), 5), loc="upper right", frameon=False)
    lo = min(m["steps_per_s"] for (wl, _), m in med.items() if "steps_per_s" in m)
    hi = max(m["steps_per_s"] for (wl, _), m in med.items() if "steps_per_s" in m)
    ax.set_ylim(lo / 2, hi * 12)
    ax.grid(axis="y", which="major", alpha=0.3)
    for t in ax.get_legend().get_texts():
        if t.get_text().startswith("kiln"):
            t.set_fontweight("bold")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    draw(report.load_jsonl(sys.argv[1]), sys.argv[2])
