"""Parameter (a tensor a Module registers as learnable) and Buffer (one it keeps as state)."""

from __future__ import annotations

import numpy as np

from kiln import dtypes
from kiln.tensor import Tensor, _init, format_tensor

__all__ = ["Parameter", "Buffer"]


class Parameter(Tensor):
    """A tensor that a ``Module`` registers as a parameter when assigned as an attribute.

    It shares the storage (and version counter) of ``data`` and requires grad by default.

    >>> import kiln
    >>> p = kiln.nn.Parameter(kiln.zeros(2))
    >>> p.requires_grad, p.is_leaf
    (True, True)
    """

    __slots__ = ()

    def __init__(self, data: Tensor | None = None, requires_grad: bool = True):
        if data is None:
            arr = np.zeros((0,), dtypes.get_default_dtype().np)
            _init(self, arr)
        elif isinstance(data, Tensor):
            _init(self, data._data)
            self._version = data._version  # same storage, same in-place history
        else:
            raise TypeError(
                f"Parameter(): argument 'data' must be a Tensor, not {type(data).__name__}"
            )
        if requires_grad:
            self.requires_grad = True

    def __repr__(self) -> str:
        return "Parameter containing:\n" + format_tensor(self)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = type(self).__new__(type(self))
        _init(result, self._data.copy())
        result._rg = self._rg
        memo[id(self)] = result
        return result

    def __copy__(self):
        return self


class _BufferMeta(type):
    def __instancecheck__(cls, instance) -> bool:
        if cls is Buffer:
            return isinstance(instance, Tensor) and getattr(instance, "_is_buffer", False)
        return super().__instancecheck__(instance)


class Buffer(metaclass=_BufferMeta):
    """Marks a tensor as a buffer when assigned to a Module attribute (``persistent`` decides
    whether it goes into the state dict).  ``Buffer(t)`` returns a detached tensor sharing t's
    storage, as PyTorch's does."""

    def __new__(cls, data: Tensor | None = None, *, persistent: bool = True):
        if data is None:
            from kiln.creation import zeros

            data = zeros(0)
        if not isinstance(data, Tensor):
            raise TypeError(f"Buffer(): argument 'data' must be a Tensor, not "
                            f"{type(data).__name__}")
        t = data.detach()
        t._base = None
        t._is_buffer = True
        t.persistent = persistent
        return t
