"""RMSprop (Hinton), with PyTorch's centered and momentum variants."""

from __future__ import annotations

from kiln import creation
from kiln.ops import elementwise as _ew
from kiln.optim.optimizer import (
    Optimizer,
    addcmul_scaled_,
    check_differentiable,
    check_lr,
    eval_closure,
    group_lr,
    hyper,
    is_capturable,
    scalar_like,
    step_no_grad,
)

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    """RMSprop as PyTorch's single-tensor implementation.

    State: ``step``, ``square_avg``, plus ``momentum_buffer`` (momentum > 0) and ``grad_avg``
    (centered).  ``capturable=True`` (and tracing by ``kiln.compile``) reads ``lr``, ``alpha``
    and ``momentum`` through ``hyper``, so they may be tensors.
    """

    def __init__(self, params, lr=1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach=None, maximize: bool = False,
                 differentiable: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        check_differentiable(differentiable)
        defaults = {
            "lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": centered,
            "weight_decay": weight_decay, "capturable": capturable, "foreach": foreach,
            "maximize": maximize, "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    @step_no_grad
    def step(self, closure=None):
        """One RMSprop update of every parameter that has a gradient."""
        loss = eval_closure(closure)
        state_of = self.state
        for group in self.param_groups:
            cap = is_capturable(group)
            lr = group_lr(group, cap)
            alpha = hyper(group, "alpha") if cap else group["alpha"]
            eps = group["eps"]
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            has_momentum = momentum > 0  # decides the structure (compiled: guarded)
            if cap and has_momentum:
                momentum = hyper(group, "momentum")
            centered = group["centered"]
            maximize = group["maximize"]
            one_minus_alpha = 1 - alpha
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = state_of[p]
                if len(state) == 0:
                    state["step"] = creation.zeros(())
                    state["square_avg"] = creation.zeros_like(p)
                    if has_momentum:
                        state["momentum_buffer"] = creation.zeros_like(p)
                    if centered:
                        state["grad_avg"] = creation.zeros_like(p)
                if maximize:
                    grad = _ew.neg(grad)
                state["step"].add_(1)
                if weight_decay != 0:
                    grad = grad.add(p, alpha=weight_decay)
                square_avg = state["square_avg"]
                addcmul_scaled_(square_avg.mul_(scalar_like(alpha, square_avg)), grad, grad,
                                one_minus_alpha)
                if centered:
                    grad_avg = state["grad_avg"]
                    grad_avg.lerp_(grad, scalar_like(one_minus_alpha, grad_avg))
                    avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt()
                else:
                    avg = square_avg.sqrt()
                avg = avg.add(eps)
                if has_momentum:
                    buf = state["momentum_buffer"]
                    buf.mul_(scalar_like(momentum, buf)).addcdiv_(grad, avg)
                    p.sub_(buf.mul(scalar_like(lr, buf)))
                else:  # as addcdiv_(grad, avg, value=-lr), with lr possibly a tensor
                    p.sub_(grad.mul(scalar_like(lr, grad)).div(avg))
        return loss
