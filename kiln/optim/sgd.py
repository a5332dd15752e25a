"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from kiln.ops import elementwise as _ew
from kiln.optim.optimizer import (
    Optimizer,
    add_scaled,
    check_differentiable,
    check_lr,
    eval_closure,
    group_lr,
    hyper,
    is_capturable,
    native_step,
    scalar_like,
    step_no_grad,
)

__all__ = ["SGD"]


class SGD(Optimizer):
    """SGD as PyTorch's single-tensor implementation; ``state[p]["momentum_buffer"]`` is kept
    only when ``momentum != 0``.

    ``capturable=True`` (a kiln extension; PyTorch's SGD has no such flag) takes the path
    ``kiln.compile`` traces: the learning rate and momentum are read through ``hyper`` as
    tensors.

    >>> import kiln
    >>> w = kiln.tensor([1.0, 2.0], requires_grad=True)
    >>> opt = kiln.optim.SGD([w], lr=0.1)
    >>> (w * w).sum().backward()
    >>> opt.step()
    >>> w
    tensor([0.8000, 1.6000], requires_grad=True)
    """

    def __init__(self, params, lr=1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach=None, differentiable: bool = False, fused=None,
                 capturable: bool = False) -> None:
        check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_differentiable(differentiable)
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening,
            "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
            "foreach": foreach, "differentiable": differentiable, "fused": fused,
        }
        if capturable:  # stored only when set, so defaults and state dicts stay PyTorch's
            defaults["capturable"] = True
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

    @step_no_grad
    def step(self, closure=None):
        """One SGD update of every parameter that has a gradient."""
        loss = eval_closure(closure)
        state_of = self.state
        for group in self.param_groups:
            cap = is_capturable(group)
            lr = group_lr(group, cap)
            weight_decay = group["weight_decay"]
            momentum = group["momentum"]
            has_momentum = momentum != 0  # decides the structure (compiled: guarded)
            if cap and has_momentum:
                momentum = hyper(group, "momentum")
            dampening = group["dampening"]
            nesterov = group["nesterov"]
            maximize = group["maximize"]
            native = not maximize and native_step(cap, lr, weight_decay, momentum, dampening)
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if native and _native_update(p, grad, state_of, lr, weight_decay, momentum,
                                             dampening, nesterov):
                    continue
                if maximize:
                    grad = _ew.neg(grad)
                if weight_decay != 0:
                    grad = grad.add(p, alpha=weight_decay)
                if has_momentum:
                    state = state_of[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        # The first buffer is the gradient itself; copy it only when it is
                        # the user's .grad (a temporary from maximize/weight decay is ours).
                        buf = grad.detach().clone() if grad is p.grad else grad
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(scalar_like(momentum, buf)).add_(grad, alpha=1 - dampening)
                    if nesterov:
                        grad = add_scaled(grad, buf, momentum)
                    else:
                        grad = buf
                # lr is a float or (capturable) a 0-d tensor, so it is multiplied, not an attr;
                # this rounds as add_(grad, alpha=-lr) would
                p.sub_(grad.mul(scalar_like(lr, grad)))
        return loss


def _native_update(p, grad, state_of, lr, weight_decay, momentum, dampening, nesterov) -> bool:
    """The whole update of ``p`` (and its momentum buffer) in one native pass, with the op-by-op
    path's roundings; False for arrays that do not qualify and for a buffer's first step."""
    from kiln.jit import optim_kernels

    buf = None
    if momentum != 0:
        buf = state_of[p].get("momentum_buffer")
        if buf is None:
            return False
    arrays = (p._data, grad._data) if buf is None else (p._data, grad._data, buf._data)
    if not optim_kernels.usable(*arrays):
        return False
    optim_kernels.sgd(p._data, grad._data, None if buf is None else buf._data, lr=lr,
                      weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                      nesterov=nesterov)
    p._version[0] += 1
    if buf is not None:
        buf._version[0] += 1
    return True
