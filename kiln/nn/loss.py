"""Loss functions (functional forms and Module classes), with PyTorch's arguments and reductions."""

from __future__ import annotations

import warnings

import numpy as np

from kiln import dtypes, jit
from kiln.nn.normalization import _ones
from kiln.ops.elementwise import _tname, broadcast_shape, logsigmoid, where
from kiln.ops.index import one_hot
from kiln.ops.reduce import log_softmax, softmax
from kiln.ops.registry import primitive
from kiln.tensor import Tensor

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "nll_loss",
    "smooth_l1_loss",
]

_REDUCTIONS = ("none", "mean", "sum")
_CLASS_TARGETS = (np.dtype(np.int64), np.dtype(np.uint8))


# -- argument checks -----------------------------------------------------------------------------

def _legacy_reduction(size_average, reduce) -> str:
    """PyTorch's mapping of the deprecated ``size_average``/``reduce`` flags to ``reduction``."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
    warnings.warn(f"size_average and reduce args will be deprecated, please use "
                  f"reduction='{reduction}' instead.", UserWarning, stacklevel=3)
    return reduction


def _reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _weighted(loss: Tensor, weight, input: Tensor, reduction: str, by_weight: bool) -> Tensor:
    """PyTorch's elementwise ``weight`` of mse/l1/huber: 'mean' divides by the summed weights
    (mse, l1) or by the element count (huber)."""
    if weight is None:
        return _reduce(loss, reduction)
    if not isinstance(weight, Tensor) or weight._data.shape != input._data.shape:
        raise ValueError("Weights and input must have the same size.")
    loss = loss * weight
    if reduction == "mean" and by_weight:
        return loss.sum() / weight.sum()
    return _reduce(loss, reduction)


def _tensors(input, target, op: str) -> None:
    for pos, (name, t) in enumerate((("input", input), ("target", target)), 1):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}(): argument '{name}' (position {pos}) must be Tensor, not "
                            f"{type(t).__name__}")


def _pointwise_operands(input, target, op: str, kernel: str, int_error=NotImplementedError):
    """Input and target of an elementwise regression loss: same dtype, broadcast (with
    PyTorch's warning) when their shapes differ."""
    _tensors(input, target, op)
    if input._data.shape != target._data.shape:
        warnings.warn(
            f"Using a target size ({target.shape}) that is different to the input size "
            f"({input.shape}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.", UserWarning, stacklevel=3)
        broadcast_shape(op, input._data.shape, target._data.shape)  # RuntimeError if they clash
    dt = dtypes.result_type(input, target)
    if not dt.is_floating_point:
        if int_error is RuntimeError:  # l1_loss fails in its mean, as PyTorch's does
            raise RuntimeError(f"{op}: mean(): could not infer output dtype. Input dtype must be "
                               f"either a floating point or complex dtype. Got: {_tname(dt)}")
        raise NotImplementedError(f'"{kernel}" not implemented for \'{_tname(dt)}\'')
    if input.dtype != dt:
        input = input.to(dt)
    if target.dtype != dt:
        target = target.to(dt)
    return input, target


def _check_class_target(input: Tensor, target: Tensor, op: str) -> None:
    """PyTorch's checks of class-index targets (nll_loss_nd), in its order and classes."""
    nd, tshape = input._data.ndim, target._data.shape
    if nd < 1:
        raise ValueError(f"{op}: Expected 1 or more dimensions (got {nd})")
    if nd != 1 and (tshape[0] if tshape else 0) != input._data.shape[0]:
        raise ValueError(f"{op}: Expected input batch_size ({input._data.shape[0]}) to match "
                         f"target batch_size ({tshape[0] if tshape else 0}).")
    if nd <= 2:
        if len(tshape) > 1:
            raise RuntimeError(f"{op}: 0D or 1D target tensor expected, multi-target not "
                               "supported")
        if nd == 1 and len(tshape) == 1 and tshape[0] != 1:
            raise ValueError(f"{op}: For 1D input, 1D target must have size 1, but got target "
                             f"size: {tshape[0]}")
    else:
        expected = (input._data.shape[0],) + input._data.shape[2:]
        if tshape != expected:
            raise RuntimeError(f"{op}: Expected target size {list(expected)}, got "
                               f"{list(tshape)}")
    if target._data.dtype not in _CLASS_TARGETS:
        raise RuntimeError(f"{op}: expected target dtype to be Long or Byte, but got "
                           f"{_tname(target)}")


def _check_target_range(t: np.ndarray, n_classes: int, ignore_index: int) -> None:
    """IndexError for a class index outside [0, C) that is not ``ignore_index``."""
    if not t.size:
        return
    lo, hi = t.min(), t.max()
    if lo >= 0 and hi < n_classes:
        return
    bad = t[((t < 0) | (t >= n_classes)) & (t != ignore_index)]
    if bad.size:
        raise IndexError(f"Target {bad.flat[0]} is out of bounds.")


def _check_weight(weight, input: Tensor, n_classes: int, op: str) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    if weight._data.ndim != 1 or weight._data.size != n_classes:
        raise RuntimeError(f"{op}: weight tensor should be defined either for all {n_classes} "
                           f"classes or no classes but got weight tensor of shape: "
                           f"{list(weight.shape)}")
    if weight._data.dtype != input._data.dtype:
        raise RuntimeError(f"{op}: expected scalar type {_tname(input)} but found "
                           f"{_tname(weight)}")


def _rows(input: Tensor, target: Tensor):
    """(N, C, d1, ...) or (C,) input and its targets as (M, C) rows and (M,) targets."""
    nd = input._data.ndim
    if nd == 2:
        return input, target
    if nd == 1:
        return input.reshape(1, -1), target.reshape(1)
    c = input._data.shape[1]
    return input.movedim(1, -1).reshape(-1, c), target.reshape(-1)


def _unrows(loss: Tensor, input: Tensor, reduction: str) -> Tensor:
    """Per-row losses back in the shape of the target (reduction 'none')."""
    nd = input._data.ndim
    if reduction != "none" or nd == 2:
        return loss
    if nd == 1:
        return loss.reshape(())
    return loss.reshape((input._data.shape[0],) + input._data.shape[2:])


# -- primitives: fused softmax cross-entropy and negative log-likelihood -------------------------

def _safe_targets(t: np.ndarray, ignore_index: int):
    """Targets with the ignored ones replaced by class 0, and the valid mask (None when no
    target is ignored, the common case)."""
    if t.dtype != np.int64:
        t = t.astype(np.int64)
    ignored = t == ignore_index
    if not ignored.any():
        return t, None
    return np.where(ignored, 0, t), ~ignored


def _reduced(loss: np.ndarray, valid, reduction: str, denom=None) -> np.ndarray:
    """Reduce per-row losses; 'mean' divides by ``denom`` (default: the valid rows)."""
    if reduction == "none":
        return loss
    s = np.add.reduce(loss, dtype=loss.dtype)
    if reduction == "sum":
        return np.asarray(s)
    if denom is None:
        denom = loss.shape[0] if valid is None else np.count_nonzero(valid)
    with np.errstate(invalid="ignore", divide="ignore"):  # nothing to average: nan, as PyTorch
        return np.asarray(s / denom, dtype=loss.dtype)


# A row whose sum of exp(x - global max) is above this kept its largest terms in the normal
# range (float32: the row max within ~70 of the global max), so the global max is a safe shift.
_SAFE_SUM = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-280}


def _exp_rows(x: np.ndarray):
    """``exp(x - m)`` for (N, C) logits, its row sums and the shift ``m``: the global max (one
    fast reduction) when every row stays well within the exponent range, else each row's max
    (numpy's max over short rows is several times slower than over the whole array)."""
    ones = _ones(x.shape[1], x.dtype)
    safe = _SAFE_SUM.get(x.dtype)
    if safe is not None:
        m = np.maximum.reduce(x, axis=None)
        if np.isfinite(m):
            e = np.subtract(x, m)
            np.exp(e, out=e)
            s = e @ ones
            if s.min() > safe:
                return e, s, m
    m = np.amax(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # rows of -inf: nan, as PyTorch
        e = np.subtract(x, m)
    np.exp(e, out=e)
    return e, e @ ones, m


@primitive("cross_entropy", traits={"reduce"}, save=(0, 1))
def _cross_entropy(x, t, reduction, ignore_index):
    """Softmax cross-entropy of (N, C) logits against (N,) class indices (ONNX
    SoftmaxCrossEntropyLoss): ``logsumexp(x_i) - x_i[t_i]`` per row."""
    if x.dtype == np.float32 and jit.available():
        from kiln.jit import cross_entropy as native

        out = native.forward(x, t, reduction, ignore_index)
        if out is not None:
            return out
    t, valid = _safe_targets(t, ignore_index)
    n = x.shape[0]
    if not n or not x.shape[1]:
        return _reduced(np.zeros(n, x.dtype), valid, reduction)
    _, s, m = _exp_rows(x)
    loss = np.log(s)
    loss += m if np.ndim(m) == 0 else m[:, 0]
    loss -= x[np.arange(n), t]
    if valid is not None:
        loss *= valid
    return _reduced(loss, valid, reduction)


@_cross_entropy.def_infer
def _cross_entropy_infer(shapes, dts, reduction, ignore_index):
    return (shapes[0][:1] if reduction == "none" else ()), dts[0]


@_cross_entropy.def_vjp
def _cross_entropy_vjp(g, node):
    x, t = node.inputs
    if not node.needs[0]:
        return None, None
    a = node.attrs
    return _cross_entropy_backward(x, t, g, reduction=a["reduction"],
                                   ignore_index=a["ignore_index"]), None


@primitive("cross_entropy_backward", traits={"reduce"}, save=(0, 1, 2))
def _cross_entropy_backward(x, t, g, reduction, ignore_index):
    """``(softmax(x) - onehot(t)) * g`` per row (divided by the valid count for 'mean')."""
    if x.dtype == np.float32 and jit.available():
        from kiln.jit import cross_entropy as native

        out = native.backward(x, t, g, reduction, ignore_index)
        if out is not None:
            return out
    t, valid = _safe_targets(t, ignore_index)
    n = x.shape[0]
    if not n or not x.shape[1]:
        return np.zeros_like(x)
    if reduction == "none":
        scale = g if valid is None else g * valid
    else:
        if reduction == "mean":
            count = n if valid is None else np.count_nonzero(valid)
            if not count:  # every row ignored: a nan loss, but PyTorch's gradient is 0
                return np.zeros_like(x)
            with np.errstate(invalid="ignore", divide="ignore"):
                g = g / count
        scale = np.full(n, g, x.dtype) if valid is None else g * valid
    scale = np.asarray(scale, x.dtype)
    p, s, _ = _exp_rows(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        p *= (scale / s)[:, None]
    p[np.arange(n), t] -= scale
    return p


@_cross_entropy_backward.def_infer
def _cross_entropy_backward_infer(shapes, dts, **attrs):
    return shapes[0], dts[0]


@_cross_entropy_backward.def_vjp
def _cross_entropy_backward_vjp(h, node):
    # dx = c * (softmax(x) - onehot(t)), c = g (per row for 'none') over the valid count for
    # 'mean', 0 on ignored rows.  Linear in g; in x through softmax, whose Jacobian is symmetric.
    x, t, g = node.inputs
    a = node.attrs
    red = a["reduction"]
    valid = t != a["ignore_index"]
    w = valid.to(x.dtype)
    if red == "mean":
        w = w / w.sum()
    p = softmax(x, 1)
    gx = gg = None
    if node.needs[0]:
        c = (w * g).unsqueeze(1)
        gx = p * (h - (h * p).sum(1, keepdim=True)) * c
    if node.needs[2]:
        safe = t.long().masked_fill(valid.logical_not(), 0)
        oh = one_hot(safe, x.shape[1]).to(x.dtype)
        per_row = (h * (p - oh)).sum(1) * w
        gg = per_row if red == "none" else per_row.sum()
    return gx, None, gg


@primitive("nll_loss", traits={"reduce"}, save=(1, 2))
def _nll_loss(x, t, *weight, reduction, ignore_index):
    """``-x_i[t_i]`` (times ``weight[t_i]``) per row of (N, C) log-probabilities (ONNX
    NegativeLogLikelihoodLoss); 'mean' divides by the summed weights of the valid rows."""
    t, valid = _safe_targets(t, ignore_index)
    loss = -x[np.arange(x.shape[0]), t]
    if not weight:
        if valid is not None:
            loss *= valid
        return _reduced(loss, valid, reduction)
    wt = weight[0][t]
    if valid is not None:
        wt *= valid
    loss *= wt
    return _reduced(loss, valid, reduction, np.add.reduce(wt, dtype=wt.dtype))


@_nll_loss.def_infer
def _nll_loss_infer(shapes, dts, reduction, ignore_index):
    return (shapes[0][:1] if reduction == "none" else ()), dts[0]


@_nll_loss.def_vjp
def _nll_loss_vjp(g, node):
    if not node.needs[0]:
        return (None,) * len(node.inputs)
    x, t, *w = node.inputs
    a = node.attrs
    gx = _nll_loss_backward(g, t, *w, n_classes=x.shape[1], **a)
    return (gx,) + (None,) * (len(node.inputs) - 1)


@primitive("nll_loss_backward", traits={"index"}, save=(1,))
def _nll_loss_backward(g, t, *weight, reduction, ignore_index, n_classes):
    """The adjoint of nll_loss (linear in x): ``-g * weight[t_i] / norm`` at each row's target."""
    t, valid = _safe_targets(t, ignore_index)
    n = t.shape[0]
    out = np.zeros((n, n_classes), g.dtype)
    wt = weight[0][t] if weight else np.ones(n, g.dtype)
    if valid is not None:
        wt = wt * valid
    if reduction == "mean":
        total = np.add.reduce(wt, dtype=wt.dtype)
        if not total:  # every row ignored (or zero weight): PyTorch's gradient is 0, not nan
            return out
        wt = wt / total
    out[np.arange(n), t] = -(wt * g)
    return out


@_nll_loss_backward.def_infer
def _nll_loss_backward_infer(shapes, dts, reduction, ignore_index, n_classes):
    return (shapes[1][0], n_classes), dts[0]


@_nll_loss_backward.def_vjp
def _nll_loss_backward_vjp(h, node):
    _, t, *w = node.inputs
    a = node.attrs
    gg = None
    if node.needs[0]:
        gg = _nll_loss(h, t, *w, reduction=a["reduction"], ignore_index=a["ignore_index"])
    return (gg,) + (None,) * (len(node.inputs) - 1)


_BCE_EPS = float(np.float32(1e-12))  # PyTorch's EPSILON is a float constant, also for doubles


@primitive("binary_cross_entropy", traits={"elementwise"}, save=(0, 1))
def _binary_cross_entropy(x, y):
    """``-(y log x + (1 - y) log(1 - x))`` with both logs clamped at -100, as PyTorch."""
    a, b = np.empty_like(x), np.empty_like(x)  # 0-d arrays stay arrays (for the out= below)
    with np.errstate(divide="ignore"):
        np.log(x, out=a)
        np.negative(x, out=b)
        np.log1p(b, out=b)
    np.maximum(a, -100, out=a)
    np.maximum(b, -100, out=b)
    a -= b
    a *= y
    a += b
    return np.negative(a, out=a)


@_binary_cross_entropy.def_vjp
def _binary_cross_entropy_vjp(g, node):
    # PyTorch's rules: (x - y) / max(x (1 - x), 1e-12) for x, -logit(x) for y (unclamped)
    x, y = node.inputs
    gx = gy = None
    if node.needs[0]:
        gx = g * (x - y) / (x * (1 - x)).clamp(min=_BCE_EPS)
    if node.needs[1]:
        gy = g * ((-x).log1p() - x.log())
    return gx, gy


# -- the losses ----------------------------------------------------------------------------------

def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of class indices ``target`` under log-probabilities ``input``
    of shape (N, C), (C,) or (N, C, d1, ...).

    >>> import kiln
    >>> logp = kiln.tensor([[-0.5, -1.0], [-2.0, -0.1]])
    >>> kiln.nn.functional.nll_loss(logp, kiln.tensor([0, 1]))
    tensor(0.3000)
    """
    reduction = _reduction(size_average, reduce, reduction)
    _tensors(input, target, "nll_loss")
    _check_class_target(input, target, "nll_loss")
    n_classes = input._data.shape[1 if input._data.ndim > 1 else 0]
    _check_weight(weight, input, n_classes, "nll_loss")
    _check_target_range(target._data, n_classes, ignore_index)
    x, t = _rows(input, target)
    w = () if weight is None else (weight,)
    loss = _nll_loss(x, t, *w, reduction=reduction, ignore_index=int(ignore_index))
    return _unrows(loss, input, reduction)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of logits ``input`` ((N, C), (C,) or (N, C, d1, ...)) against
    class indices, or against class probabilities of the input's shape, with PyTorch's
    ``weight``, ``ignore_index`` and ``label_smoothing``.

    >>> import kiln
    >>> logits = kiln.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> round(kiln.nn.functional.cross_entropy(logits, kiln.tensor([0, 1])).item(), 4)
    0.1269
    """
    reduction = _reduction(size_average, reduce, reduction)
    _tensors(input, target, "cross_entropy")
    if input._data.dtype.kind != "f":
        raise NotImplementedError(
            f"\"log_softmax_lastdim_kernel_impl\" not implemented for '{_tname(input)}'")
    if label_smoothing > 1.0:
        raise RuntimeError(f"cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: "
                           f"{label_smoothing}")
    nd = input._data.ndim
    if input._data.shape == target._data.shape:
        return _cross_entropy_probs(input, target, weight, ignore_index, reduction,
                                    label_smoothing)
    if nd == 0:
        raise IndexError("cross_entropy: Dimension out of range (expected to be in range of "
                         "[-1, 0], but got 1)")
    _check_class_target(input, target, "cross_entropy")
    n_classes = input._data.shape[1 if nd > 1 else 0]
    _check_weight(weight, input, n_classes, "cross_entropy")
    _check_target_range(target._data, n_classes, ignore_index)
    x, t = _rows(input, target)
    if weight is None and label_smoothing <= 0:  # the common case: one fused primitive
        loss = _cross_entropy(x, t, reduction=reduction, ignore_index=int(ignore_index))
        return _unrows(loss, input, reduction)
    logp = log_softmax(x, 1)
    w = () if weight is None else (weight,)
    nll = _nll_loss(logp, t, *w, reduction=reduction, ignore_index=int(ignore_index))
    if label_smoothing <= 0:
        return _unrows(nll, input, reduction)
    # PyTorch's smoothing term: the (weighted) sum of -log p over classes, with its own
    # normalisation for 'mean'
    smooth = -(logp * weight if weight is not None else logp).sum(1)
    ignored = t == ignore_index
    smooth = smooth.masked_fill(ignored, 0.0)
    if reduction == "mean":
        if weight is not None:
            kept = t.long().masked_fill(ignored, 0)
            denom = weight[kept].masked_fill(ignored, 0.0).sum()
        else:
            denom = ignored.logical_not().sum()
        smooth = smooth.sum() / denom
    else:
        smooth = _reduce(smooth, reduction)
    loss = nll * (1 - label_smoothing) + smooth * (label_smoothing / n_classes)
    return _unrows(loss, input, reduction)


def _cross_entropy_probs(input, target, weight, ignore_index, reduction, label_smoothing):
    """Cross-entropy against class probabilities (a target of the input's shape)."""
    if not target.is_floating_point():
        raise RuntimeError(f"cross_entropy: Expected floating point type for target with class "
                           f"probabilities, got {_tname(target)}")
    if ignore_index >= 0:
        raise RuntimeError("cross_entropy: ignore_index is not supported for floating point "
                           "target")
    nd = input._data.ndim
    if nd == 0:
        raise IndexError("cross_entropy: Dimension out of range (expected to be in range of "
                         "[-1, 0], but got 1)")
    class_dim = 0 if nd == 1 else 1
    n_classes = input._data.shape[class_dim]
    _check_weight(weight, input, n_classes, "cross_entropy")
    logp = log_softmax(input, class_dim)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / n_classes
    prod = logp * target
    if weight is not None:
        shape = [1] * nd
        shape[class_dim] = n_classes
        prod = prod * weight.reshape(shape)
    if reduction == "none":
        return -prod.sum(class_dim)
    total = -prod.sum()
    if reduction == "sum":
        return total
    rows = input._data.size // n_classes if n_classes else 0
    return total / rows if rows else total * float("nan")


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
             reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean squared error ``(input - target)**2``, optionally weighted elementwise."""
    reduction = _reduction(size_average, reduce, reduction)
    input, target = _pointwise_operands(input, target, "mse_loss", "mse_cpu")
    d = input - target
    return _weighted(d * d, weight, input, reduction, True)


def l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
            reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean absolute error ``|input - target|`` (gradient 0 where they are equal)."""
    reduction = _reduction(size_average, reduce, reduction)
    input, target = _pointwise_operands(input, target, "l1_loss", "abs", RuntimeError)
    return _weighted((input - target).abs(), weight, input, reduction, True)


def smooth_l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
                   reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """``0.5 d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta`` (``d = input - target``);
    ``beta = 0`` is the L1 loss."""
    reduction = _reduction(size_average, reduce, reduction)
    input, target = _pointwise_operands(input, target, "smooth_l1_loss", "smooth_l1_cpu")
    if beta < 0:
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    d = (input - target).abs()
    if beta == 0:
        return _reduce(d, reduction)
    loss = where(d < beta, d * d * (0.5 / beta), d - 0.5 * beta)
    return _reduce(loss, reduction)


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Tensor | None = None) -> Tensor:
    """``0.5 d**2`` where ``|d| < delta``, else ``delta (|d| - 0.5 delta)``."""
    reduction = _reduction(None, None, reduction)
    input, target = _pointwise_operands(input, target, "huber_loss", "huber_cpu")
    if delta <= 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    d = (input - target).abs()
    loss = where(d < delta, d * d * 0.5, (d - 0.5 * delta) * delta)
    return _weighted(loss, weight, input, reduction, False)


def _check_elementwise_weight(weight, input: Tensor, op: str, name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(weight).__name__}")
    shape = broadcast_shape(op, weight._data.shape, input._data.shape)
    if shape != input._data.shape:
        raise RuntimeError(f"{op}: {name} of shape {list(weight.shape)} does not broadcast to "
                           f"the input's shape {list(input.shape)}")


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                         size_average=None, reduce=None, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of probabilities ``input`` (in [0, 1]) against ``target``; the
    logs are clamped at -100, as PyTorch's."""
    reduction = _reduction(size_average, reduce, reduction)
    _tensors(input, target, "binary_cross_entropy")
    if input._data.shape != target._data.shape:
        raise ValueError(f"binary_cross_entropy: Using a target size ({target.shape}) that is "
                         f"different to the input size ({input.shape}) is deprecated. Please "
                         "ensure they have the same size.")
    if input._data.dtype.kind != "f" or target._data.dtype != input._data.dtype:
        raise RuntimeError(f"binary_cross_entropy: Found dtype {_tname(target)} but expected "
                           f"{_tname(input)}")
    x = input._data
    if x.size and not (x.min() >= 0 and x.max() <= 1):  # also catches nan
        raise RuntimeError("binary_cross_entropy: all elements of input should be between 0 "
                           "and 1")
    _check_elementwise_weight(weight, input, "binary_cross_entropy")
    loss = _binary_cross_entropy(input, target)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """Sigmoid and binary cross-entropy in one stable expression:
    ``(1 - y) x - (1 + (pos_weight - 1) y) logsigmoid(x)``."""
    reduction = _reduction(size_average, reduce, reduction)
    _tensors(input, target, "binary_cross_entropy_with_logits")
    if input._data.shape != target._data.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: Target size ({target.shape}) must "
                         f"be the same as input size ({input.shape})")
    dt = dtypes.result_type(input, target)
    if not dt.is_floating_point or target._data.dtype.kind != "f":
        raise RuntimeError(f"binary_cross_entropy_with_logits: result type {_tname(dt)} can't "
                           f"be cast to the desired output type {_tname(target)}")
    _check_elementwise_weight(weight, input, "binary_cross_entropy_with_logits")
    ls = logsigmoid(input)
    if pos_weight is not None:
        broadcast_shape("binary_cross_entropy_with_logits", pos_weight._data.shape,
                        input._data.shape)
        ls = ls * ((pos_weight - 1) * target + 1)
    loss = (1 - target) * input - ls
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


# -- Module classes ------------------------------------------------------------------------------

from kiln.nn.modules.module import Module  # noqa: E402

__all__ += [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "HuberLoss",
    "L1Loss",
    "MSELoss",
    "NLLLoss",
    "SmoothL1Loss",
]


class _Loss(Module):
    # As PyTorch: an invalid reduction is accepted here and rejected when the loss is called.
    def __init__(self, size_average=None, reduce=None, reduction: str = "mean"):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        self.reduction = reduction


class _WeightedLoss(_Loss):
    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None,
                 reduction: str = "mean"):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)


class CrossEntropyLoss(_WeightedLoss):
    """``cross_entropy`` as a module: ``CrossEntropyLoss(weight=None, ignore_index=-100,
    reduction='mean', label_smoothing=0.0)(logits, target)``."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)


class NLLLoss(_WeightedLoss):
    """``nll_loss`` as a module (input: log-probabilities)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return nll_loss(input, target, self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction)


class MSELoss(_Loss):
    """Mean squared error."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction)


class L1Loss(_Loss):
    """Mean absolute error."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    """Smooth L1 (quadratic below ``beta``)."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean",
                 beta: float = 1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(_Loss):
    """Huber loss (quadratic below ``delta``)."""

    def __init__(self, reduction: str = "mean", delta: float = 1.0):
        super().__init__(reduction=reduction)
        self.delta = delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class BCELoss(_WeightedLoss):
    """Binary cross-entropy on probabilities."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Binary cross-entropy on logits (numerically stable)."""

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None,
                 reduction: str = "mean", pos_weight: Tensor | None = None):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, self.weight,
                                                reduction=self.reduction,
                                                pos_weight=self.pos_weight)
