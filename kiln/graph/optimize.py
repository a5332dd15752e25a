"""The pass pipeline run on every traced graph, in order, with KILN_DEBUG=2 printing each step."""

from __future__ import annotations

import importlib
import os

from kiln.graph.ir import Graph, format_graph, verify

# (module under kiln.graph.passes, function): each is a pure Graph -> Graph function
# cse runs again after fold and simplify, which can make new duplicates (equal constants, two
# rebuilt nodes); dce then drops what the rewrites left unused, before fusion groups the rest.
# concat_slices runs after the rewrites that could drop its "+ 0.0" and before fusion.
PIPELINE = [("dce", "dce"), ("cse", "cse"), ("fold", "fold"), ("simplify", "simplify"),
            ("cse", "cse"), ("dce", "dce"), ("concat_slices", "concat_slices"), ("fuse", "fuse")]


def optimize(g: Graph, check: bool | None = None):
    """Run the pipeline; return (optimized graph, {pass: node count after it})."""
    debug = int(os.environ.get("KILN_DEBUG", "0") or 0) if os.environ.get(
        "KILN_DEBUG", "0").isdigit() else 0
    check = bool(os.environ.get("KILN_VERIFY")) if check is None else check
    stats = {"traced": len(g.nodes)}
    for mod, fn in PIPELINE:
        try:
            pass_fn = getattr(importlib.import_module(f"kiln.graph.passes.{mod}"), fn)
        except (ImportError, AttributeError):
            continue
        g = pass_fn(g)
        key = mod if mod not in stats else f"{mod}#2"
        stats[key] = len(g.nodes)
        if check:
            verify(g)
        if debug >= 2:
            print(f"[kiln] after {mod}: {len(g.nodes)} nodes\n{format_graph(g)}")
    return g, stats
