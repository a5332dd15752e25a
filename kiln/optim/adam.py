"""Adam and AdamW, as PyTorch's single-tensor implementation (same formulas, same state)."""

from __future__ import annotations

from kiln import creation
from kiln.grad_mode import STATE
from kiln.ops import elementwise as _ew
from kiln.optim.optimizer import (
    Optimizer,
    addcmul_scaled_,
    check_differentiable,
    check_lr,
    check_nonneg,
    eval_closure,
    group_lr,
    hyper,
    is_capturable,
    native_step,
    scalar_like,
    step_no_grad,
    to_scalar,
)
from kiln.tensor import Tensor

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam (Kingma & Ba) with optional L2 ``weight_decay``, ``amsgrad`` and ``maximize``.

    With ``decoupled_weight_decay=True`` it is AdamW.  ``foreach`` and ``fused`` are accepted
    for compatibility.  ``capturable=True`` (and tracing by ``kiln.compile``) computes the bias
    corrections with tensor ops on the step counter and reads ``lr`` and ``betas`` through
    ``hyper``, so nothing is read back into Python; the results agree with the default path.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach=None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused=None, decoupled_weight_decay: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        b0, b1 = to_scalar(betas[0]), to_scalar(betas[1])
        if not 0.0 <= b0 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        check_nonneg(weight_decay, "weight_decay")
        if not (isinstance(betas[0], float) and isinstance(betas[1], float)) and not (
            isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)
        ):
            raise ValueError("betas must be either both floats or both Tensors")  # noqa: TRY004
        check_differentiable(differentiable)
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
            "capturable": capturable, "differentiable": differentiable, "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def _init_state(self, state: dict, p, amsgrad: bool) -> None:
        state["step"] = creation.zeros(())
        state["exp_avg"] = creation.zeros_like(p)
        state["exp_avg_sq"] = creation.zeros_like(p)
        if amsgrad:
            state["max_exp_avg_sq"] = creation.zeros_like(p)

    @step_no_grad
    def step(self, closure=None):
        """One Adam update of every parameter that has a gradient."""
        loss = eval_closure(closure)
        state_of = self.state
        for group in self.param_groups:
            if STATE.tracer is not None:  # 0-d tensors, read at every call of the compiled step
                beta1, beta2 = hyper(group, "betas", 0), hyper(group, "betas", 1)
            else:
                beta1, beta2 = group["betas"]
                beta1, beta2 = to_scalar(beta1), to_scalar(beta2)
            cap = is_capturable(group)
            lr = group_lr(group, cap)
            weight_decay = group["weight_decay"]
            eps = group["eps"]
            amsgrad = group["amsgrad"]
            maximize = group["maximize"]
            decoupled = group["decoupled_weight_decay"]
            one_minus_beta1 = 1 - beta1
            one_minus_beta2 = 1 - beta2
            if decoupled and weight_decay != 0:  # a tensor op when lr is one (capturable)
                decay = 1 - lr * weight_decay
            native = not (amsgrad or maximize) and native_step(cap, lr, beta1, beta2, eps,
                                                               weight_decay)
            cached_step = None
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = state_of[p]
                if len(state) == 0:
                    self._init_state(state, p, amsgrad)
                step_t = state["step"]
                if native:  # as add_'s in-place fast path, without the dispatch
                    step_t._data += 1
                    step_t._version[0] += 1
                else:
                    step_t.add_(1)
                # capturable: a float64 0-d tensor, so the bias corrections below are computed
                # in float64 as from the Python float
                step = step_t.double() if cap else step_t.item()
                if native and _native_update(p, grad, state, step, lr, beta1, beta2, eps,
                                             weight_decay, decoupled):
                    continue
                if maximize:
                    grad = _ew.neg(grad)
                if weight_decay != 0:
                    if decoupled:
                        p.mul_(decay)
                    else:
                        grad = grad.add(p, alpha=weight_decay)
                exp_avg = state["exp_avg"]
                exp_avg_sq = state["exp_avg_sq"]
                exp_avg.lerp_(grad, scalar_like(one_minus_beta1, exp_avg))
                addcmul_scaled_(exp_avg_sq.mul_(scalar_like(beta2, exp_avg_sq)), grad, grad,
                                one_minus_beta2)
                # Bias corrections are Python floats (PyTorch's non-capturable path) or float64
                # 0-d tensors (capturable); params of a group almost always share their step,
                # so the floats are computed once per group.
                if cap or step != cached_step:
                    cached_step = step
                    step_size = lr / (1 - beta1**step)
                    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                # The denominator is a fresh temporary, so it is built with out-of-place ops
                # (PyTorch's add_ on it would only add a copy back in eager kiln).
                if amsgrad:
                    max_sq = state["max_exp_avg_sq"]
                    max_sq.copy_(_ew.maximum(max_sq, exp_avg_sq))
                    sq = max_sq
                else:
                    sq = exp_avg_sq
                denom = (sq.sqrt() / scalar_like(bias_correction2_sqrt, p)).add(eps)
                # as addcdiv_(exp_avg, denom, value=-step_size), with step_size possibly a tensor
                p.sub_(exp_avg.mul(scalar_like(step_size, p)).div(denom))
        return loss

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if isinstance(self, AdamW):
            for group in self.param_groups:
                group["decoupled_weight_decay"] = True


def _native_update(p, grad, state, step, lr, beta1, beta2, eps, weight_decay, decoupled) -> bool:
    """The whole update of ``p`` in one native pass (float32 C-contiguous arrays only), with the
    op-by-op path's roundings; False when the arrays do not qualify."""
    from kiln.jit import optim_kernels

    m, v = state["exp_avg"], state["exp_avg_sq"]
    arrays = (p._data, grad._data, m._data, v._data)
    if not optim_kernels.usable(*arrays):
        return False
    if weight_decay == 0:
        kind, wd = "none", 0.0
    elif decoupled:
        kind, wd = "decoupled", 1 - lr * weight_decay
    else:
        kind, wd = "l2", weight_decay
    optim_kernels.adam(*arrays, one_minus_beta1=1 - beta1, beta2=beta2,
                       one_minus_beta2=1 - beta2, step_size=lr / (1 - beta1**step),
                       bias2_sqrt=(1 - beta2**step) ** 0.5, eps=eps, decay=kind, wd=wd)
    for t in (p, m, v):
        t._version[0] += 1
    return True


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach=None, capturable: bool = False, differentiable: bool = False,
                 fused=None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)
