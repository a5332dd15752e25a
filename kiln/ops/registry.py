"""The primitive registry: every primitive's name, impl, shape rule, backward rule and traits.

A primitive is defined once::

    @primitive("exp", traits={"elementwise"}, save_out=True)
    def exp(x):
        return np.exp(x)

    @exp.def_vjp
    def _exp_vjp(g, node):
        return (g * node.out,)

``impl`` works on numpy arrays.  The VJP works on Kiln tensors (``node.inputs``, ``node.out``,
``node.attrs``, ``node.needs``), so gradients of gradients and graph capture come for free.
"""

from __future__ import annotations

import numpy as np

from kiln.dispatch import apply

REGISTRY: dict[str, "Primitive"] = {}

TRAITS = frozenset({"elementwise", "reduce", "view", "random", "creation", "index", "linalg"})


class Primitive:
    """One primitive operation.  Call it with Kiln tensors (and keyword attributes)."""

    __slots__ = ("name", "impl", "vjp", "infer", "traits", "save", "save_out", "no_grad_reason",
                 "grad_into",
                 "is_view", "inplace_impl", "__weakref__")

    def __init__(self, name, impl, *, traits=(), save=(), save_out=False, infer=None):
        unknown = set(traits) - TRAITS
        if unknown:
            raise ValueError(f"primitive {name}: unknown traits {sorted(unknown)}")
        self.name = name
        self.impl = impl
        self.vjp = None
        self.infer = infer or abstract_eval(impl)
        self.traits = frozenset(traits)
        self.is_view = "view" in self.traits  # output shares the first input's storage
        # Optional fast path for ``x.op_(...)`` outside autograd: writes into x's array.
        self.inplace_impl = None
        self.save = tuple(save)  # input positions whose values the VJP reads
        self.save_out = save_out  # the VJP reads the output value
        self.no_grad_reason = None
        # Optional: ``grad_into(acc, g, node)`` adds this node's gradient for its first input
        # into ``acc`` (an array the backward walk owns, or None: make one) and returns it;
        # the walk uses it instead of the VJP when no graph of the backward is being built.
        self.grad_into = None

    def __call__(self, *inputs, **attrs):
        return apply(self, inputs, attrs)

    def __repr__(self) -> str:
        return f"<primitive {self.name}>"

    def def_vjp(self, fn):
        """Register the backward rule ``fn(g, node) -> tuple of input gradients (or None)``."""
        self.vjp = fn
        return fn

    def def_infer(self, fn):
        """Register the shape rule ``fn(shapes, dtypes, **attrs) -> (shape, numpy dtype)``."""
        self.infer = fn
        return fn

    def mark_not_differentiable(self, reason: str):
        """Declare that this primitive has no gradient (integer/boolean output, random, ...)."""
        self.no_grad_reason = reason
        return self


def primitive(name, *, traits=(), save=(), save_out=False, infer=None):
    """Decorator: register ``impl`` as primitive ``name`` and return the Primitive."""

    def wrap(impl):
        if name in REGISTRY:
            raise ValueError(f"primitive {name!r} is already registered")
        p = Primitive(name, impl, traits=traits, save=save, save_out=save_out, infer=infer)
        REGISTRY[name] = p
        return p

    return wrap


def abstract_eval(impl):
    """Default shape rule: run impl on zero-stride stand-ins of the right shape and dtype."""

    def infer(shapes, dtypes, **attrs):
        fakes = [np.broadcast_to(np.zeros((), dt), s) for s, dt in zip(shapes, dtypes)]
        out = impl(*fakes, **attrs)
        return out.shape, out.dtype

    return infer
