"""Random numbers: generators, manual_seed, rand/randn/randint/randperm/normal.

Kiln draws from numpy's PCG64.  Seeded runs are reproducible in Kiln; they do not reproduce
PyTorch's random streams (to start from PyTorch's weights, load them).
"""

from __future__ import annotations

import numpy as np

from kiln import dtypes
from kiln.grad_mode import STATE
from kiln.creation import _factory, _float_or, _shape
from kiln.tensor import Tensor

__all__ = ["Generator", "manual_seed", "seed", "initial_seed", "rand", "randn", "randint",
           "randperm", "normal", "rand_like", "randn_like", "randint_like", "default_generator"]


class Generator:
    """A source of random numbers, seedable like ``torch.Generator``."""

    def __init__(self, device=None):
        self._seed = int(np.random.SeedSequence().entropy % (2**63))
        self.rng = np.random.default_rng(self._seed)

    def manual_seed(self, seed: int) -> "Generator":
        self._seed = int(seed)
        self.rng = np.random.default_rng(self._seed)
        return self

    def seed(self) -> int:
        return self.manual_seed(int(np.random.SeedSequence().entropy % (2**63)))._seed

    def initial_seed(self) -> int:
        return self._seed

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


default_generator = Generator()


def _rng(generator) -> np.random.Generator:
    return (generator or default_generator).rng


def _untraced(op: str) -> None:
    """Random factories draw once, at trace time: inside kiln.compile that would freeze them."""
    tracer = STATE.tracer
    if tracer is not None:
        tracer.unsupported(
            f"kiln.{op}() inside a compiled function would draw its numbers once, at trace "
            "time; create random tensors outside and pass them in (dropout is supported)")


def manual_seed(seed: int) -> Generator:
    """Seed the default generator so that later random calls repeat exactly."""
    return default_generator.manual_seed(seed)


def seed() -> int:
    return default_generator.seed()


def initial_seed() -> int:
    return default_generator.initial_seed()


def rand(*size, generator=None, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Uniform samples on [0, 1)."""
    _untraced("rand")
    d = _float_or(dtype)
    return _factory(_rng(generator).random(_shape(size), dtype=np.float64).astype(d),
                    requires_grad)


def randn(*size, generator=None, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Standard normal samples."""
    _untraced("randn")
    d = _float_or(dtype)
    return _factory(_rng(generator).standard_normal(_shape(size)).astype(d), requires_grad)


def randint(low, high=None, size=None, *, generator=None, dtype=None, device=None,
            requires_grad: bool = False) -> Tensor:
    """Integers uniform on [low, high); ``randint(high, size)`` starts at 0."""
    _untraced("randint")
    if size is None:
        if high is None or not isinstance(high, (tuple, list)):
            raise TypeError("randint() missing required argument 'size'")
        low, high, size = 0, low, high
    elif high is None:
        low, high = 0, low
    if high <= low:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got from={low} "
                           f">= to={high}")
    d = dtypes.as_dtype(dtype) if dtype is not None else dtypes.int64
    arr = _rng(generator).integers(low, high, _shape((size,))).astype(d.np)
    return _factory(arr, requires_grad)


def randperm(n: int, *, generator=None, dtype=None, device=None,
             requires_grad: bool = False) -> Tensor:
    """A random permutation of 0..n-1."""
    _untraced("randperm")
    d = dtypes.as_dtype(dtype) if dtype is not None else dtypes.int64
    if n < 0:
        raise RuntimeError(f"randperm: n must be non-negative, got {n}")
    return _factory(_rng(generator).permutation(int(n)).astype(d.np), requires_grad)


def normal(mean=0.0, std=1.0, size=None, *, generator=None, dtype=None, device=None,
           requires_grad: bool = False) -> Tensor:
    """Normal samples; ``mean`` and ``std`` may be tensors (broadcast) or numbers."""
    _untraced("normal")
    m = mean._data if isinstance(mean, Tensor) else mean
    s = std._data if isinstance(std, Tensor) else std
    if np.any(np.asarray(s) < 0):
        raise RuntimeError("normal expects std >= 0.0")
    if size is None:
        if not isinstance(mean, Tensor) and not isinstance(std, Tensor):
            raise TypeError("normal(): with a float mean and a float std, the size argument "
                            "is required")
        try:
            size = np.broadcast_shapes(np.shape(m), np.shape(s))
        except ValueError:
            raise RuntimeError(f"normal(): the shapes of mean {list(np.shape(m))} and std "
                               f"{list(np.shape(s))} do not broadcast") from None
    d = dtype
    if d is None:
        d = next((x.dtype for x in (mean, std) if isinstance(x, Tensor)), None)
    arr = (m + s * _rng(generator).standard_normal(_shape((size,)))).astype(_float_or(d))
    return _factory(arr, requires_grad)


def rand_like(input: Tensor, *, dtype=None, generator=None) -> Tensor:
    return rand(*input.shape, dtype=dtype or input.dtype, generator=generator)


def randn_like(input: Tensor, *, dtype=None, generator=None) -> Tensor:
    return randn(*input.shape, dtype=dtype or input.dtype, generator=generator)


def randint_like(input: Tensor, low, high=None, *, dtype=None, generator=None) -> Tensor:
    return randint(low, high, tuple(input.shape), dtype=dtype or input.dtype, generator=generator)
