"""ONNX control flow (If, Loop, Scan), run eagerly: conditions and trip counts are read as
Python values, so under ``kiln.compile`` they must be static (computed from constants or
shapes); a condition computed from the model's inputs raises the tracer's error."""

from __future__ import annotations

import numpy as np

import kiln
from kiln.onnx.ops._common import T
from kiln.tensor import Tensor


def _value(x):
    """A condition or count as a NumPy value (reading a tensor's data)."""
    if isinstance(x, Tensor):
        return np.asarray(x.detach().numpy())
    return np.asarray(x)


def _stack(slices, axis=0):
    if not slices:
        raise NotImplementedError("a loop with zero iterations and scan outputs is not "
                                  "supported (their shape is unknown)")
    if all(isinstance(s, np.ndarray) for s in slices):
        return np.stack(slices, axis)
    return kiln.stack([s if isinstance(s, Tensor) else kiln.from_numpy(np.array(s))
                       for s in slices], axis)


def if_(ctx, scope):
    cond = bool(_value(ctx.inputs[0]).reshape(-1)[0])
    branch = ctx.attrs["then_branch" if cond else "else_branch"]
    return tuple(branch.run(scope, []))


def loop(ctx, scope):
    body = ctx.attrs["body"]
    trip, cond, *carried = ctx.inputs
    limit = None if trip is None else int(_value(trip).reshape(-1)[0])
    go = True if cond is None else bool(_value(cond).reshape(-1)[0])
    n_carried = len(carried)
    scans: list = []
    i = 0
    while go and (limit is None or i < limit):
        outs = body.run(scope, [np.array(i, np.int64), np.array(go)] + list(carried))
        if cond is not None:
            go = bool(_value(outs[0]).reshape(-1)[0])
        carried = outs[1:1 + n_carried]
        scans.append(outs[1 + n_carried:])
        i += 1
    n_scan = len(body.output_names) - 1 - n_carried
    stacked = [_stack([s[k] for s in scans]) for k in range(n_scan)]
    return tuple(carried) + tuple(stacked)


def _scan_steps(body, scope, states, xs, dirs):
    """Run the body over axis 0 of the scan inputs: the final states and each step's
    scan-output slices."""
    xs = [kiln.flip(x, (0,)) if d else x for x, d in zip(xs, dirs)]
    steps = xs[0].shape[0] if xs else 0
    per_step = []
    for t in range(steps):
        outs = body.run(scope, list(states) + [x[t] for x in xs])
        states = outs[:len(states)]
        per_step.append(outs[len(states):])
    return list(states), per_step


def scan(ctx, scope):
    if ctx.opset < 9:
        return _scan8(ctx, scope)
    body = ctx.attrs["body"]
    m = ctx.attr("num_scan_inputs")
    values = ctx.inputs
    n_state = len(values) - m
    xs = [T(x) for x in values[n_state:]]
    in_axes = ctx.attr("scan_input_axes") or [0] * m
    xs = [kiln.movedim(x, a % x.ndim, 0) for x, a in zip(xs, in_axes)]
    states, per_step = _scan_steps(body, scope, values[:n_state], xs,
                                   ctx.attr("scan_input_directions") or [0] * m)
    k = len(body.output_names) - n_state
    out_axes = ctx.attr("scan_output_axes") or [0] * k
    out_dirs = ctx.attr("scan_output_directions") or [0] * k
    results = []
    for j in range(k):
        slices = [o[j] for o in per_step]
        y = T(_stack(slices[::-1] if out_dirs[j] else slices))
        results.append(kiln.movedim(y, 0, out_axes[j] % y.ndim))
    return tuple(states) + tuple(results)


def _scan8(ctx, scope):
    """Scan of opsets 8: a batch axis first, then the sequence axis; one scan per batch row."""
    body = ctx.attrs["body"]
    m = ctx.attr("num_scan_inputs")
    lens, *values = ctx.inputs
    n_state = len(values) - m
    states0, xs = [T(v) for v in values[:n_state]], [T(x) for x in values[n_state:]]
    batch = xs[0].shape[0]
    lens = None if lens is None else _value(lens).reshape(-1)
    finals, outs = [], []
    for b in range(batch):
        rows = [x[b] for x in xs]
        if lens is not None:
            rows = [r[:int(lens[b])] for r in rows]
        states, per_step = _scan_steps(body, scope, [s[b] for s in states0], rows,
                                       ctx.attr("directions") or [0] * m)
        finals.append(states)
        outs.append([T(_stack([o[j] for o in per_step]))
                     for j in range(len(body.output_names) - n_state)])
    result = [_stack([f[i] for f in finals]) for i in range(n_state)]
    result += [_stack([o[j] for o in outs]) for j in range(len(outs[0]) if outs else 0)]
    return tuple(result)


def sequence_map(ctx, scope):
    body = ctx.attrs["body"]
    inputs = ctx.inputs
    n = len(inputs[0])
    outs = [[] for _ in body.output_names]
    for i in range(n):
        step = [x[i] if isinstance(x, list) else x for x in inputs]
        for acc, y in zip(outs, body.run(scope, step)):
            acc.append(y)
    return tuple(outs)


CONTROL = {"If": if_, "Loop": loop, "Scan": scan, "SequenceMap": sequence_map}
