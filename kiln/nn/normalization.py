"""Normalization: batch_norm, layer_norm, group_norm (functional forms and Module classes)."""

from __future__ import annotations

import numbers

import numpy as np

import kiln
from kiln import jit
from kiln.grad_mode import STATE
from kiln.ops.elementwise import _tname
from kiln.ops.registry import primitive
from kiln.tensor import Tensor

__all__ = ["batch_norm", "group_norm", "layer_norm"]


def _check_dtypes(kernel: str, input: Tensor, *others) -> None:
    """PyTorch's errors for integer inputs and for parameters of another dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{kernel}(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}")
    if input._data.dtype.kind != "f":
        raise NotImplementedError(f"\"{kernel}\" not implemented for '{_tname(input)}'")
    for t in others:
        if t is not None and t._data.dtype != input._data.dtype:
            raise RuntimeError(f"{kernel}: mixed dtype (CPU): all inputs must share same "
                               f"datatype (input {_tname(input)}, parameter {_tname(t)}).")


# -- layer_norm: a primitive (ONNX LayerNormalization) ------------------------------------------

_ONES: dict = {}


def _ones(n: int, dt) -> np.ndarray:
    """A cached vector of ones: row sums as matrix-vector products, which BLAS does several
    times faster than numpy's reduction over a short last axis."""
    key = (n, dt)
    v = _ONES.get(key)
    if v is None:
        if len(_ONES) > 256:
            _ONES.clear()
        v = _ONES[key] = np.ones(n, dt)
    return v


def _ln_stats(x2: np.ndarray, eps: float):
    """Centred rows of the (M, D) array ``x2`` and 1 / sqrt(var + eps) per row (biased
    variance, two passes as PyTorch)."""
    d = x2.shape[1]
    ones = _ones(d, x2.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (x2 @ ones) / d
        xc = np.subtract(x2, mean[:, None])
        var = (np.square(xc) @ ones) / d
        var += eps
        rstd = np.sqrt(var, out=var)
        np.reciprocal(rstd, out=rstd)
    return xc, rstd.astype(x2.dtype, copy=False)


def _rows2(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` as (rows, normalized elements); explicit sizes, as either may be 0."""
    lead = x.shape[:x.ndim - k]
    return x.reshape(int(np.prod(lead)), int(np.prod(x.shape[x.ndim - k:])))


# The fast path: the statistics come from one pass of sums, mean = sum(x) / D and
# var = sum(x * x) / D - mean^2 (no centred temporary to square and sum), which loses about
# log2(1 + mean^2 / var) bits to cancellation: rows with mean^2 > var take the two-pass path.
# The rest works in place on one temporary.  (Outer products through a small BLAS product
# instead of broadcasting were 3x faster alone but slower inside a training step, where
# OpenBLAS wakes its threads for each call.)
_FAST_LN = (np.dtype(np.float32), np.dtype(np.float64))
_vecdot = getattr(np, "vecdot", None) or (lambda a, b: np.einsum("ij,ij->i", a, b))


def _ln_moments(x2: np.ndarray, eps: float):
    """Row means and 1 / sqrt(var + eps) of (M, D) ``x2`` from one pass of sums, or None when
    the fast path does not apply (dtype, empty, a row with mean^2 > var, NaN or inf)."""
    m, d = x2.shape
    if x2.dtype not in _FAST_LN or not x2.size or not x2.flags.c_contiguous:
        return None
    with np.errstate(all="ignore"):
        mean = x2 @ _ones(d, x2.dtype)
        mean /= d
        var = _vecdot(x2, x2)
        var /= d
        sq = mean * mean
        var -= sq
        if not (sq <= var).all():  # also catches NaN and inf
            return None
        var += eps
        rstd = np.sqrt(var, out=var)
        np.reciprocal(rstd, out=rstd)
    return mean, rstd


def _layer_norm_fast(x2, params, eps, has_weight, has_bias):
    """``(x - mean) * rstd * w + b`` from the one-pass statistics, in place (float32 with
    kiln.jit: its native row kernel instead, with two-pass statistics)."""
    if x2.dtype == np.float32 and jit.available():
        from kiln.jit import rows
        d = x2.shape[1]
        w = np.ascontiguousarray(params[0].reshape(d)) if has_weight else None
        b = np.ascontiguousarray(params[-1].reshape(d)) if has_bias else None
        y = rows.layer_norm(np.ascontiguousarray(x2), w, b, eps)
        if y is not None:
            return y
    st = _ln_moments(x2, eps)
    if st is None:
        return None
    mean, rstd = st
    d = x2.shape[1]
    y = np.subtract(x2, mean[:, None])
    y *= rstd[:, None]
    if has_weight:
        y *= params[0].reshape(d)
    if has_bias:
        y += params[-1].reshape(d)
    return y


@primitive("layer_norm", save=(0, 1))
def _layer_norm(x, *params, k, eps, has_weight, has_bias):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last ``k`` dims."""
    y = _layer_norm_fast(_rows2(x, k), params, eps, has_weight, has_bias)
    if y is not None:
        return y.reshape(x.shape)
    xc, rstd = _ln_stats(_rows2(x, k), eps)
    xc *= rstd[:, None]
    y = xc.reshape(x.shape)
    if has_weight:
        y *= params[0]
    if has_bias:
        y += params[-1]
    return y


@_layer_norm.def_infer
def _layer_norm_infer(shapes, dts, **attrs):
    return shapes[0], dts[0]


@_layer_norm.def_vjp
def _layer_norm_vjp(g, node):
    x, *params = node.inputs
    a = node.attrs
    k, has_w, has_b = a["k"], a["has_weight"], a["has_bias"]
    needs = node.needs
    parts = ("x",) * needs[0] + ("w",) * (has_w and needs[1]) + ("b",) * (has_b and needs[-1])
    w = (params[0],) if has_w else ()
    if parts == ("x",):
        return (_layer_norm_backward(x, g, *w, k=k, eps=a["eps"], parts=parts),) + (None,) * (
            len(params))
    packed = _layer_norm_backward(x, g, *w, k=k, eps=a["eps"], parts=parts)
    pieces = _unpack(packed, parts, x.shape, k)
    grads = [pieces.get("x")]
    if has_w:
        grads.append(pieces.get("w"))
    if has_b:
        grads.append(pieces.get("b"))
    return tuple(grads)


def _unpack(packed: Tensor, parts: tuple, shape: tuple, k: int) -> dict:
    """Split layer_norm_backward's flat output into the x, weight and bias gradients."""
    nshape = tuple(shape[len(shape) - k:])
    sizes = {"x": int(np.prod(shape)), "w": int(np.prod(nshape)), "b": int(np.prod(nshape))}
    out, at = {}, 0
    for p in parts:
        n = sizes[p]
        out[p] = packed[at:at + n].reshape(shape if p == "x" else nshape)
        at += n
    return out


@primitive("layer_norm_backward", save=(0, 1))
def _layer_norm_backward(x, g, *weight, k, eps, parts):
    """The gradients of layer_norm for ``parts`` (of "x", "w", "b"): x's is
    ``rstd * (gh - mean(gh)) - xc * rstd**3 * mean(gh * xc)`` per row with ``gh = g * weight``,
    weight's ``sum(g * xhat)`` and bias's ``sum(g)`` over the leading dims.  Only the x part:
    returned in x's shape; several parts: concatenated flat (one pass for all of them)."""
    x2 = _rows2(x, k)
    m, d = x2.shape
    g2 = g.reshape(m, d)
    only_x = parts == ("x",)
    out = np.empty(x.shape if only_x else (x.size * ("x" in parts) + d * (len(parts) - (
        "x" in parts)),), x.dtype)
    if _layer_norm_backward_fast(x2, g2, weight, eps, parts, out):
        return out
    xc, rstd = _ln_stats(x2, eps)
    ones = _ones(d, x2.dtype)
    at = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        if "x" in parts:
            gh = np.multiply(g2, weight[0].reshape(d)) if weight else g2
            mg = (gh @ ones) / d
            c = (np.multiply(gh, xc) @ ones) / d
            dx = out.reshape(m, d) if only_x else out[:x.size].reshape(m, d)
            np.multiply(gh, rstd[:, None], out=dx)
            dx -= (rstd * mg)[:, None]
            c *= rstd * rstd * rstd
            tmp = np.multiply(xc, c[:, None])
            dx -= tmp
            at = x.size
        if "w" in parts:
            xc *= rstd[:, None]
            np.multiply(xc, g2, out=xc)
            out[at:at + d] = _ones(m, x2.dtype) @ xc
            at += d
        if "b" in parts:
            out[at:at + d] = _ones(m, x2.dtype) @ g2
    return out


def _layer_norm_backward_fast(x2, g2, weight, eps, parts, out) -> bool:
    """layer_norm_backward into ``out`` from the one-pass statistics, with no centred
    temporary; False when the fast path does not apply.  With gh = g * w, per row:
    dx = rstd gh - rstd mean(gh) - rstd^3 c (x - mean), c = mean(gh x) - mean mean(gh), that
    is g * (rstd (x) w) + x * (s (x) 1) + t (x) 1 with s = -rstd^3 c and
    t = rstd^3 c mean - rstd mean(gh); dw = sum_rows(g * x * rstd) - sum_rows(g * mean rstd);
    db = sum_rows(g)."""
    if x2.dtype == np.float32 and g2.dtype == x2.dtype and jit.available():
        from kiln.jit import rows
        w = np.ascontiguousarray(weight[0].reshape(x2.shape[1])) if weight else None
        if rows.layer_norm_backward(np.ascontiguousarray(x2), np.ascontiguousarray(g2), w, eps,
                                    parts, out):
            return True
    if g2.dtype != x2.dtype or not g2.flags.c_contiguous:
        return False
    st = _ln_moments(x2, eps)
    if st is None:
        return False
    mean, rstd = st
    m, d = x2.shape
    ones_d, ones_m = _ones(d, x2.dtype), _ones(m, x2.dtype)
    gx = np.multiply(g2, x2) if ("x" in parts or "w" in parts) else None
    at = 0
    with np.errstate(all="ignore"):
        if "x" in parts:
            w = weight[0].reshape(d) if weight else ones_d
            mg = g2 @ w
            mg /= d
            c = gx @ w
            c /= d
            c -= mean * mg
            r3c = rstd * rstd
            r3c *= rstd
            r3c *= c  # rstd^3 c
            t = r3c * mean
            mg *= rstd
            t -= mg
            np.negative(r3c, out=r3c)  # s
            dx = out.reshape(m, d) if parts == ("x",) else out[:x2.size].reshape(m, d)
            if weight:
                np.multiply(g2, w, out=dx)
                dx *= rstd[:, None]
            else:
                np.multiply(g2, rstd[:, None], out=dx)
            xs = np.multiply(x2, r3c[:, None])
            dx += xs
            dx += t[:, None]
            at = x2.size
        if "w" in parts:
            mean *= rstd
            dw = out[at:at + d]
            np.matmul(rstd, gx, out=dw)
            dw -= mean @ g2
            at += d
        if "b" in parts:
            np.matmul(ones_m, g2, out=out[at:at + d])
    return True


@_layer_norm_backward.def_infer
def _layer_norm_backward_infer(shapes, dts, k, eps, parts):
    if parts == ("x",):
        return shapes[0], dts[0]
    size = int(np.prod(shapes[0]))
    d = int(np.prod(shapes[0][len(shapes[0]) - k:]))
    return (size * ("x" in parts) + d * (len(parts) - ("x" in parts)),), dts[0]


@_layer_norm_backward.def_vjp
def _layer_norm_backward_vjp(h, node):
    # With P(v) = rstd * (v - mean v - xhat * mean(v * xhat)) (xhat's Jacobian, symmetric):
    #   dx = P(g * w), dw = sum_lead(g * xhat), db = sum_lead(g).
    # dx is linear in g * w, so its g-gradient is P(h_x) * w.  Its x-gradient, written out with
    # r = rstd, xc = x - mean, gc = gh - mean gh, c = mean(gh * xc), all per row:
    #   -r^3 xc (mean(h gc) - 3 r^2 c mean(h xc)) - r^3 mean(h xc) gc - r^3 c (h - mean h)
    x, g, *w = node.inputs
    a = node.attrs
    k, eps, parts = a["k"], a["eps"], a["parts"]
    axes = tuple(range(x.ndim - k, x.ndim))
    lead = tuple(range(x.ndim - k))
    nshape = tuple(x.shape[x.ndim - k:])
    hs = {"x": h} if parts == ("x",) else _unpack(h, parts, x.shape, k)
    gx = gg = gw = None

    def add(acc, v):
        return v if acc is None else acc + v

    if "x" in hs:
        hx = hs["x"]
        ph = _layer_norm_backward(x, hx, k=k, eps=eps, parts=("x",))
        gg = ph * w[0] if w else ph
        if w and node.needs[2]:
            gw = (g * ph).sum(lead) if lead else g * ph
        if node.needs[0]:
            gh = g * w[0] if w else g
            xc = x - x.mean(axes, keepdim=True)
            r = ((xc * xc).mean(axes, keepdim=True) + eps).rsqrt()
            r3 = r * r * r
            gc = gh - gh.mean(axes, keepdim=True)
            c = (gh * xc).mean(axes, keepdim=True)
            hxc = (hx * xc).mean(axes, keepdim=True)
            inner = (hx * gc).mean(axes, keepdim=True) - r * r * c * hxc * 3
            gx = -(r3 * (xc * inner + hxc * gc + c * (hx - hx.mean(axes, keepdim=True))))
    if "w" in hs:
        hw = hs["w"].reshape(nshape)
        xhat = _layer_norm(x, k=k, eps=eps, has_weight=False, has_bias=False)
        gg = add(gg, xhat * hw)
        if node.needs[0]:
            gx = add(gx, _layer_norm_backward(x, g * hw, k=k, eps=eps, parts=("x",)))
    if "b" in hs:
        gg = add(gg, hs["b"].reshape(nshape).expand(x.shape))
    return (gx, gg) + ((gw,) if w else ())


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` dims (biased variance), then scale by
    ``weight`` and shift by ``bias`` elementwise.

    >>> import kiln
    >>> kiln.nn.functional.layer_norm(kiln.tensor([[1.0, 3.0]]), (2,))
    tensor([[-1.0000,  1.0000]])
    """
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0:
        raise RuntimeError("layer_norm: Expected normalized_shape to be at least 1-dimensional, "
                           "i.e., containing at least one element, but got normalized_shape = []")
    if not isinstance(input, Tensor):
        raise TypeError(f"layer_norm(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}")
    shape = input._data.shape
    if shape[len(shape) - k:] != normalized_shape or len(shape) < k:
        raise RuntimeError(
            f"layer_norm: Given normalized_shape={list(normalized_shape)}, expected input with "
            f"shape [*, {', '.join(map(str, normalized_shape))}], but got input of size"
            f"{list(shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t._data.shape != normalized_shape:
            raise RuntimeError(f"layer_norm: Expected {name} to be of same shape as "
                               f"normalized_shape, but got {name} of shape {list(t.shape)} and "
                               f"normalized_shape = {list(normalized_shape)}")
    _check_dtypes("LayerNormKernelImpl", input, weight, bias)
    params = [t for t in (weight, bias) if t is not None]
    return _layer_norm(input, *params, k=k, eps=float(eps), has_weight=weight is not None,
                       has_bias=bias is not None)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize each group of ``C / num_groups`` channels of each sample (N, C, ...), then
    scale and shift per channel."""
    if not isinstance(input, Tensor):
        raise TypeError(f"group_norm(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}")
    shape = input._data.shape
    if len(shape) < 2:
        raise RuntimeError(f"group_norm: Expected at least 2 dimensions for input tensor but "
                           f"received {len(shape)}")
    n, c = shape[0], shape[1]
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(f"group_norm: Expected number of channels in input to be divisible "
                           f"by num_groups, but got input of shape {list(shape)} and "
                           f"num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t._data.shape != (c,):
            raise RuntimeError(f"group_norm: Expected {name} to be a vector of size equal to the "
                               f"number of channels in input, but got {name} of shape "
                               f"{list(t.shape)} and input of shape {list(shape)}")
    _check_dtypes("GroupNormKernelImpl", input, weight, bias)
    # each (sample, group) is one row of a layer norm without affine parameters
    x = input.reshape(n, num_groups, -1)
    out = _layer_norm(x, k=1, eps=float(eps), has_weight=False, has_bias=False).reshape(shape)
    pshape = (1, c) + (1,) * (len(shape) - 2)
    if weight is not None:
        out = out * weight.reshape(pshape)
    if bias is not None:
        out = out + bias.reshape(pshape)
    return out


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalize over every dim but the channel dim 1, as ``torch.nn.functional.batch_norm``.

    In training mode the batch statistics are used and the running statistics (if given) are
    updated in place: ``running = (1 - momentum) * running + momentum * batch_stat``, with the
    unbiased variance for ``running_var``, as PyTorch.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(input).__name__}")
    shape = input._data.shape
    c = shape[1] if len(shape) > 1 else 0
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t._data.size != c:
            raise RuntimeError(f"batch_norm: {name} should contain {c} elements not "
                               f"{t._data.size}")
    _check_dtypes("batch_norm", input, running_mean, running_var, weight, bias)
    count = input._data.size // c if c else 0
    if training and count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {input.shape}")
    axes = (0,) + tuple(range(2, len(shape)))
    pshape = (1, c) + (1,) * (len(shape) - 2)
    if training:
        mean = input.mean(axes, keepdim=True)
        centered = input - mean
        var = (centered * centered).mean(axes, keepdim=True)
        if running_mean is not None or running_var is not None:
            with kiln.no_grad():
                # momentum is a number, or (cumulative average inside kiln.compile) a 0-d tensor
                m = momentum if isinstance(momentum, Tensor) else float(momentum)
                if running_mean is not None:
                    running_mean.mul_(1 - m).add_(mean.reshape(c) * m)
                if running_var is not None:
                    unbiased = var.reshape(c) * (count / max(count - 1, 1))
                    running_var.mul_(1 - m).add_(unbiased * m)
        scale = (var + eps).rsqrt()
    else:
        if running_mean is None or running_var is None:
            missing = "running_mean" if running_mean is None else "running_var"
            raise RuntimeError(f"batch_norm: {missing} must be defined in evaluation mode")
        # eval: a per-channel affine map, folded into one scale and one shift
        scale = (running_var + eps).rsqrt()
        if weight is not None:
            scale = scale * weight
        shift = -running_mean * scale
        if bias is not None:
            shift = shift + bias
        return input * scale.reshape(pshape) + shift.reshape(pshape)
    if weight is not None:
        scale = scale * weight.reshape(pshape)
    out = centered * scale
    if bias is not None:
        out = out + bias.reshape(pshape)
    return out
# -- Module classes ------------------------------------------------------------------------------

from kiln.nn import init  # noqa: E402
from kiln.nn.modules.module import Module  # noqa: E402
from kiln.nn.parameter import Parameter  # noqa: E402

__all__ += ["BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm"]


def _affine_parameters(m: Module, shape, affine: bool, bias: bool, dtype):
    """Register ``m``'s ``weight`` (ones) and ``bias`` (zeros) of ``shape``, or None where
    ``affine``/``bias`` leave them out, as PyTorch's norm layers do; returns the dtype."""
    dt = dtype or kiln.get_default_dtype()
    m.register_parameter("weight", Parameter(kiln.ones(shape, dtype=dt)) if affine else None)
    m.register_parameter("bias", Parameter(kiln.zeros(shape, dtype=dt))
                         if affine and bias else None)
    return dt


class _BatchNorm(Module):
    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.has_bias = bias
        self.track_running_stats = track_running_stats
        dt = _affine_parameters(self, num_features, affine, bias, dtype)
        if track_running_stats:
            self.register_buffer("running_mean", kiln.zeros(num_features, dtype=dt))
            self.register_buffer("running_var", kiln.ones(num_features, dtype=dt))
            self.register_buffer("num_batches_tracked", kiln.tensor(0, dtype=kiln.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            with kiln.no_grad():
                self.running_mean.zero_()
                self.running_var.fill_(1)
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.ndim not in self._ranks:
            raise ValueError(
                f"{type(self).__name__}: expected {' or '.join(f'{r}D' for r in self._ranks)} "
                f"input, got {input.ndim}D input of shape {list(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}({self.num_features}) expected input with "
                f"{self.num_features} channels in dim 1, got shape {list(input.shape)}"
            )
        momentum = self.momentum
        if self.training and self.track_running_stats:
            with kiln.no_grad():
                self.num_batches_tracked.add_(1)
            if momentum is None and STATE.tracer is not None:  # the count is graph data
                momentum = self.num_batches_tracked.double().reciprocal()
            elif momentum is None:  # cumulative moving average, as PyTorch
                momentum = 1.0 / float(self.num_batches_tracked.item())
        use_batch_stats = self.training or not self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch_stats, momentum if momentum is not None else 0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input."""

    _ranks = (4,)


class LayerNorm(Module):
    """Layer normalization over the trailing ``normalized_shape`` dims."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.has_bias = bias
        _affine_parameters(self, self.normalized_shape, elementwise_affine, bias, dtype)

    def forward(self, input: Tensor) -> Tensor:
        ns = self.normalized_shape
        if isinstance(input, Tensor) and tuple(input.shape[input.ndim - len(ns):]) != ns:
            raise RuntimeError(f"{self!r} expected input with shape [*, "
                               f"{', '.join(map(str, ns))}], got shape {list(input.shape)}")
        return layer_norm(input, ns, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


class GroupNorm(Module):
    """Group normalization: ``num_channels`` split into ``num_groups`` groups."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        _affine_parameters(self, num_channels, affine, bias, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if input.ndim < 2 or input.shape[1] != self.num_channels:
            raise RuntimeError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expected input (N, "
                f"{self.num_channels}, ...), got shape {list(input.shape)}"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
