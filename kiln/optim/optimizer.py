"""Optimizer base class: parameter groups, per-parameter state, zero_grad, state_dict, hooks."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

from kiln import dtypes
from kiln.grad_mode import STATE
from kiln.tensor import Tensor

__all__ = ["Optimizer", "add_scaled", "addcmul_scaled_", "group_lr", "hyper", "is_capturable",
           "required", "scalar_like"]


class _RequiredParameter:
    """Marks a hyper-parameter that every parameter group must give (no default)."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _RequiredParameter()


def _typename(obj) -> str:
    if isinstance(obj, Tensor):
        return f"kiln.{type(obj).__name__}"
    return type(obj).__name__


def to_scalar(x):
    """A hyper-parameter given as a one-element tensor (lr, betas) as a Python float."""
    return x.item() if isinstance(x, Tensor) else x


def is_capturable(group: dict) -> bool:
    """True when ``group`` must be stepped with tensor ops only: built with
    ``capturable=True``, or ``kiln.compile`` is tracing the step."""
    return STATE.tracer is not None or group.get("capturable", False)


def hyper(group: dict, name: str, index: int | None = None):
    """Hyper-parameter ``name`` of ``group`` (element ``index`` of a tuple such as betas) for
    the capturable path: the value as stored, or while tracing a 0-d float64 tensor that the
    compiled step reads from the group at every call (so a scheduler's changes take effect).
    The compiled step still recompiles when the value becomes or stops being zero."""
    tracer = STATE.tracer
    if tracer is None:
        return group[name] if index is None else group[name][index]
    return tracer.lift(group, name, index)


def group_lr(group: dict, capturable: bool):
    """The learning rate a step uses: a Python float on the default path; on the capturable
    path ``hyper``'s value, with a user's tensor lr taken in float64 as the float would be."""
    if not capturable:
        return to_scalar(group["lr"])
    lr = hyper(group, "lr")
    if isinstance(lr, Tensor) and lr.dtype != dtypes.float64:
        return lr.double()
    return lr


def native_step(capturable: bool, *settings) -> bool:
    """Whether an eager step may use kiln.jit's one-pass update kernels: not the capturable
    path (so not tracing either), every setting a plain Python number, the JIT available."""
    from kiln import jit

    return (not capturable and all(type(v) in (float, int) for v in settings)
            and jit.available())


def scalar_like(value, t: Tensor):
    """``value`` (a number, or on the capturable path a 0-d tensor) to combine with ``t``: a
    tensor is cast to ``t``'s dtype, because a 0-d float64 factor would promote a 0-d ``t``
    to float64, where a Python float never does."""
    if isinstance(value, Tensor) and value.dtype != t.dtype:
        return value.to(t.dtype)
    return value


def add_scaled(t: Tensor, other: Tensor, value) -> Tensor:
    """``t + value * other`` (as ``t.add(other, alpha=value)``), ``value`` a number or a 0-d
    tensor."""
    if isinstance(value, Tensor):
        return t.add(other.mul(scalar_like(value, other)))
    return t.add(other, alpha=value)


def addcmul_scaled_(t: Tensor, a: Tensor, b: Tensor, value) -> Tensor:
    """In-place ``t += value * a * b`` (as ``t.addcmul_(a, b, value=value)``), ``value`` a
    number or a 0-d tensor."""
    if isinstance(value, Tensor):
        return t.add_(a.mul(scalar_like(value, a)).mul(b))
    return t.addcmul_(a, b, value=value)


def check_lr(lr) -> None:
    """PyTorch's checks on ``lr``: a number or a one-element tensor, not negative."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonneg(value, what: str) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what} value: {value}")


def check_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise NotImplementedError(
            "differentiable=True (a step recorded by autograd) is not supported by kiln optimizers"
        )


def step_no_grad(step):
    """Run an optimizer's ``step`` with gradient recording off and its step hooks around it.

    The grad switch is flipped directly (not through ``no_grad()``) because this wraps every
    training step and a context-manager object per call is measurable overhead.
    """

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if self._step_pre_hooks or _GLOBAL_PRE_HOOKS:
            for hook in chain(_GLOBAL_PRE_HOOKS.values(), self._step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{hook} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
                    args, kwargs = result
        prev = STATE.grad_enabled
        STATE.grad_enabled = False
        try:
            out = step(self, *args, **kwargs)
        finally:
            STATE.grad_enabled = prev
        if self._step_post_hooks or _GLOBAL_POST_HOOKS:
            for hook in chain(self._step_post_hooks.values(), _GLOBAL_POST_HOOKS.values()):
                hook(self, args, kwargs)
        return out

    return wrapper


def eval_closure(closure):
    """Evaluate ``closure`` (forward + backward) with gradients on, as PyTorch's step does."""
    if closure is None:
        return None
    prev = STATE.grad_enabled
    STATE.grad_enabled = True
    try:
        return closure()
    finally:
        STATE.grad_enabled = prev


class RemovableHandle:
    """Returned by the ``register_*_hook`` methods; ``remove()`` unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks: dict):
        self._hooks = hooks
        self.id = RemovableHandle._next_id
        RemovableHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


_GLOBAL_PRE_HOOKS: OrderedDict = OrderedDict()
_GLOBAL_POST_HOOKS: OrderedDict = OrderedDict()


def _add_hook(hooks: OrderedDict, hook, prepend: bool = False) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def register_optimizer_step_pre_hook(hook) -> RemovableHandle:
    """Run ``hook(optimizer, args, kwargs)`` before every optimizer's step."""
    return _add_hook(_GLOBAL_PRE_HOOKS, hook)


def register_optimizer_step_post_hook(hook) -> RemovableHandle:
    """Run ``hook(optimizer, args, kwargs)`` after every optimizer's step."""
    return _add_hook(_GLOBAL_POST_HOOKS, hook)


class Optimizer:
    """Base class of all optimizers (PyTorch's ``torch.optim.Optimizer`` API).

    ``params`` is an iterable of tensors, or of dicts each holding ``"params"`` plus
    hyper-parameters overriding ``defaults`` for that group.  Subclasses implement ``step``.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self._step_pre_hooks: OrderedDict = OrderedDict()
        self._step_post_hooks: OrderedDict = OrderedDict()
        self._state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._state_dict_post_hooks: OrderedDict = OrderedDict()
        self._load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._load_state_dict_post_hooks: OrderedDict = OrderedDict()
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                "dicts, but got " + _typename(params)
            )
        self.state: defaultdict = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)

    # -- pickling / repr ------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in ("_step_pre_hooks", "_step_post_hooks", "_state_dict_pre_hooks",
                     "_state_dict_post_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks"):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self.defaults.setdefault("differentiable", False)
        # Groups saved by an older version may miss newer flags; a step stored as a number
        # becomes the 0-d tensor the step functions expect.
        for group in self.param_groups:
            for name, default in self.defaults.items():
                if default is not required:
                    group.setdefault(name, default)
            for p in group["params"]:
                s = self.state.get(p)
                if s and "step" in s and not isinstance(s["step"], Tensor):
                    s["step"] = _step_tensor(float(s["step"]))

    def __repr__(self) -> str:
        out = self.__class__.__name__ + " ("
        for i, group in enumerate(self.param_groups):
            out += f"\nParameter Group {i}\n"
            for key in sorted(group.keys()):
                if key != "params":
                    out += f"    {key}: {group[key]}\n"
        return out + ")"

    # -- parameter groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters (with optional per-group hyper-parameters)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            params = list(params)
        tensors, names = [], []
        for p in params:
            if isinstance(p, tuple):  # (name, tensor) pairs from named_parameters()
                names.append(p[0])
                tensors.append(p[1])
            else:
                tensors.append(p)
        param_group["params"] = tensors
        if names:
            if len(names) != len(tensors):
                raise ValueError(
                    "all optimizer params should be with/without names. Some param names are "
                    "missing"
                )
            param_group["param_names"] = names
        for p in tensors:
            if not isinstance(p, Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, but one of the params is "
                    + _typename(p)
                )
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        for name, default in self.defaults.items():
            if default is required and name not in param_group:
                raise ValueError(
                    "parameter group didn't specify a value of required optimization "
                    f"parameter {name}"
                )
            param_group.setdefault(name, default)
        if len({id(p) for p in tensors}) != len(tensors):
            import warnings

            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; in future, "
                "this will cause an error; see github.com/pytorch/pytorch/issues/40967 for more "
                "information",
                stacklevel=3,
            )
        seen: set = set()
        for group in self.param_groups:
            seen.update(id(p) for p in group["params"])
            if ("param_names" in param_group) != ("param_names" in group):
                which = "with names" if "param_names" in param_group else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {which} to the optimizer"
                )
        if any(id(p) in seen for p in tensors):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    # -- gradients and steps --------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset every parameter's ``.grad``: to None (default) or to zeros in place."""
        if set_to_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
                    if STATE.tracer is not None:  # kiln.compile replays this at every run
                        STATE.tracer.on_zero_grad(p)
            return
        prev = STATE.grad_enabled
        STATE.grad_enabled = False
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is not None:
                        if g.grad_fn is not None:
                            g.detach_()
                        else:
                            g.requires_grad_(False)
                        g.zero_()
        finally:
            STATE.grad_enabled = prev

    def step(self, closure: Callable[[], Any] | None = None):
        """Update the parameters once; ``closure`` re-evaluates the model and returns the loss."""
        raise NotImplementedError

    def register_step_pre_hook(self, hook) -> RemovableHandle:
        """Run ``hook(optimizer, args, kwargs)`` before ``step``; it may return new args."""
        return _add_hook(self._step_pre_hooks, hook)

    def register_step_post_hook(self, hook) -> RemovableHandle:
        """Run ``hook(optimizer, args, kwargs)`` after ``step``."""
        return _add_hook(self._step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        return _add_hook(self._state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        return _add_hook(self._state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        return _add_hook(self._load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False) -> RemovableHandle:
        return _add_hook(self._load_state_dict_post_hooks, hook, prepend)

    # -- state_dict -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``.

        Parameters are numbered in group order.  As in PyTorch, the per-parameter state dicts
        (and their tensors) are the optimizer's own, not copies: save or copy them before
        stepping again if a snapshot is wanted.
        """
        for hook in self._state_dict_pre_hooks.values():
            hook(self)
        mapping: dict[int, int] = {}
        groups = []
        start = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for i, p in enumerate(group["params"], start):
                mapping.setdefault(id(p), i)
            packed["params"] = [mapping[id(p)] for p in group["params"]]
            start += len(packed["params"])
            groups.append(packed)
        packed_state = {
            (mapping[id(k)] if isinstance(k, Tensor) else k): v for k, v in self.state.items()
        }
        sd = {"state": packed_state, "param_groups": groups}
        for hook in self._state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``: groups are matched by position, parameters by index.

        State tensors are copied (and cast to their parameter's floating dtype), so the
        loaded optimizer never shares buffers with the one that was saved.
        """
        state_dict = state_dict.copy()
        for hook in self._load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = [_copy_value(g) for g in state_dict["param_groups"]]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        state: defaultdict = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                state[param] = _cast_state(param, v)
            else:
                state[k] = v
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self.__setstate__({"state": state, "param_groups": new_groups})
        for hook in self._load_state_dict_post_hooks.values():
            hook(self)


def _step_tensor(value: float = 0.0) -> Tensor:
    """The per-parameter step counter: a 0-d tensor of the default float dtype, as PyTorch."""
    from kiln.creation import tensor

    return tensor(value)


def _copy_value(value):
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_value(v) for v in value)
    return copy.deepcopy(value)


def _cast_state(param: Tensor, value, key=None):
    """A copy of a saved state entry; tensors other than ``step`` take the parameter's dtype."""
    if isinstance(value, Tensor):
        out = value.detach()
        if key != "step" and param.is_floating_point() and out.dtype != param.dtype:
            return out.to(param.dtype)
        return out.clone()
    if isinstance(value, dict):
        return {k: _cast_state(param, v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_state(param, v) for v in value)
    return copy.deepcopy(value)
