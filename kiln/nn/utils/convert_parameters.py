"""parameters_to_vector and vector_to_parameters: all parameters as one flat vector."""

from __future__ import annotations

from kiln.tensor import Tensor

__all__ = ["parameters_to_vector", "vector_to_parameters"]


def parameters_to_vector(parameters) -> Tensor:
    """Concatenate the flattened parameters into one 1-D tensor (differentiable)."""
    from kiln.ops.shape import cat

    return cat([p.reshape(-1) for p in parameters])


def vector_to_parameters(vec: Tensor, parameters) -> None:
    """Make each parameter's data the next slice of ``vec`` (viewed in the parameter's shape,
    sharing ``vec``'s storage as in PyTorch)."""
    if not isinstance(vec, Tensor):
        raise TypeError(f"expected kiln.Tensor, but got: {type(vec).__name__}")
    flat = vec._data.reshape(-1)
    pointer = 0
    for p in parameters:
        n = p.numel()
        p._data = flat[pointer:pointer + n].reshape(p._data.shape).astype(p._data.dtype,
                                                                            copy=False)
        pointer += n
