"""ONNX loss operators: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss, in Kiln ops."""

from __future__ import annotations

import kiln
from kiln.onnx.ops import onnx_op
from kiln.onnx.ops._common import T
from kiln.onnx.ops.nn import _err, _s


def _nll(ctx, logp, target, weight):
    """ONNX's NLL: logp (N, C, d...), target (N, d...) class indices, optional weight (C)."""
    target = T(target).to(kiln.int64)
    weight = T(weight)
    reduction = _s(ctx.attr("reduction", "mean"))
    if reduction not in ("none", "sum", "mean"):
        raise _err(ctx, f"reduction={reduction!r} is not valid")
    ignore = ctx.attr("ignore_index")
    keep = None
    if ignore is not None:
        keep = target != ignore
        target = kiln.where(keep, target, kiln.zeros_like(target))  # any valid class
    picked = kiln.gather(logp, 1, target.unsqueeze(1)).squeeze(1)
    w = None
    if weight is not None:
        w = kiln.index_select(weight, 0, target.reshape(-1)).reshape(tuple(target.shape))
    if keep is not None:
        k = keep.to(logp.dtype)
        w = k if w is None else w * k
    loss = -picked if w is None else -picked * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (w.sum() if w is not None else float(loss.numel()))


@onnx_op("NegativeLogLikelihoodLoss")
def nll_loss(ctx, x, target, weight=None):
    return _nll(ctx, T(x), target, weight)


@onnx_op("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy_loss(ctx, scores, labels, weights=None):
    logp = kiln.log_softmax(T(scores), 1)
    loss = _nll(ctx, logp, labels, weights)
    return (loss, logp)[:ctx.n_outputs]
