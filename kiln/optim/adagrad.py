"""Adagrad (Duchi et al.) with PyTorch's lr_decay, weight_decay and initial accumulator."""

from __future__ import annotations

from kiln import creation
from kiln.ops import elementwise as _ew
from kiln.optim.optimizer import (
    Optimizer,
    check_differentiable,
    check_lr,
    eval_closure,
    group_lr,
    is_capturable,
    scalar_like,
    step_no_grad,
)

__all__ = ["Adagrad"]


class Adagrad(Optimizer):
    """Adagrad as PyTorch's single-tensor implementation.

    Like PyTorch, the state (``step``, ``sum``) of every parameter is created in the
    constructor, filled with ``initial_accumulator_value``.  ``capturable=True`` (a kiln
    extension; PyTorch's Adagrad has no such flag) takes the path ``kiln.compile`` traces: the
    decayed learning rate is a float64 0-d tensor computed from the step counter.
    """

    def __init__(self, params, lr=1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach=None, *,
                 maximize: bool = False, differentiable: bool = False, fused=None,
                 capturable: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}"
            )
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        check_differentiable(differentiable)
        defaults = {
            "lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value, "foreach": foreach,
            "maximize": maximize, "differentiable": differentiable, "fused": fused,
        }
        if capturable:  # stored only when set, so defaults and state dicts stay PyTorch's
            defaults["capturable"] = True
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(self.state[p], p)

    def _init_state(self, state: dict, p) -> None:
        # PyTorch fills from the optimizer's defaults, not from the group (also for groups
        # added later with add_param_group).
        state["step"] = creation.zeros(())
        state["sum"] = creation.full_like(p, self.defaults["initial_accumulator_value"])

    @step_no_grad
    def step(self, closure=None):
        """One Adagrad update of every parameter that has a gradient."""
        loss = eval_closure(closure)
        state_of = self.state
        for group in self.param_groups:
            cap = is_capturable(group)
            lr = group_lr(group, cap)
            weight_decay = group["weight_decay"]
            lr_decay = group["lr_decay"]
            eps = group["eps"]
            maximize = group["maximize"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = state_of[p]
                if len(state) == 0:
                    self._init_state(state, p)
                step_t = state["step"]
                step_t.add_(1)
                # capturable: a float64 0-d tensor, so clr is computed in float64 as eagerly
                step = step_t.double() if cap else step_t.item()
                if maximize:
                    grad = _ew.neg(grad)
                if weight_decay != 0:
                    grad = grad.add(p, alpha=weight_decay)
                clr = lr / (1 + (step - 1) * lr_decay)
                state_sum = state["sum"]
                state_sum.addcmul_(grad, grad)
                std = state_sum.sqrt().add(eps)
                # as addcdiv_(grad, std, value=-clr), with clr possibly a tensor
                p.sub_(grad.mul(scalar_like(clr, grad)).div(std))
        return loss
