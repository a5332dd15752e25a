"""default_collate / default_convert: how a list of samples becomes a batch (PyTorch's rules)."""

from __future__ import annotations

import collections.abc as abc
import copy

import numpy as np

from kiln import dtypes
from kiln.tensor import Tensor, _make

__all__ = ["default_collate", "default_convert"]

_ERR = ("default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; "
        "found {}")


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _np_to_tensor(a) -> Tensor:
    a = np.asarray(a)
    if a.dtype.kind in "USO":
        raise TypeError(_ERR.format(a.dtype))
    dtypes.from_numpy_dtype(a.dtype)  # TypeError naming the unsupported dtype
    return _make(a)


def _stack(batch) -> Tensor:
    first = batch[0]
    shape = first._data.shape
    for i, t in enumerate(batch):
        if t._data.shape != shape:
            raise RuntimeError(
                f"stack expects each tensor to be equal size, but got {list(shape)} at entry 0 "
                f"and {list(t._data.shape)} at entry {i}")
    if any(t._rg for t in batch):
        import kiln

        if hasattr(kiln, "stack"):  # keep the samples' graph, as PyTorch's stack does
            return kiln.stack(list(batch), 0)
    dt = first._data.dtype
    if any(t._data.dtype != dt for t in batch):
        d = first.dtype
        for t in batch:
            d = dtypes.promote_types(d, t.dtype)
        dt = d.np
    return _make(np.stack([t._data for t in batch]).astype(dt, copy=False))


def _rebuild_mapping(like, values: dict):
    """``values`` in a mapping of ``like``'s type, where that type can be rebuilt (else a dict),
    as PyTorch's collate and convert do."""
    if type(like) is dict:
        return values
    try:
        if isinstance(like, abc.MutableMapping):
            clone = copy.copy(like)
            clone.update(values)
            return clone
        return type(like)(values)
    except TypeError:
        return values


def default_collate(batch):
    """Merge a list of samples into a batch, structure-preserving, exactly as PyTorch does.

    Tensors are stacked along a new first dimension; numpy arrays become tensors and are
    stacked; Python floats become a float64 tensor, ints an int64 tensor (bools a bool
    tensor); numpy scalars keep their dtype; strings and bytes stay a list; dicts, named
    tuples and lists are collated field by field (tuples come back as lists, as in PyTorch).

    >>> import kiln
    >>> default_collate([(kiln.zeros(2), 1), (kiln.ones(2), 0)])[1]
    tensor([1, 0])
    """
    elem = batch[0]
    if isinstance(elem, Tensor):
        return _stack(batch)
    if isinstance(elem, np.ndarray):
        return _stack([_np_to_tensor(b) for b in batch])
    if isinstance(elem, np.generic):
        if isinstance(elem, (np.str_, np.bytes_)):
            return batch
        return _np_to_tensor(np.array(batch))
    if isinstance(elem, float):
        return _make(np.array(batch, dtype=np.float64))
    if isinstance(elem, int):  # bool is an int: a batch of bools is a bool tensor
        from kiln.creation import tensor

        return tensor(batch)
    if isinstance(elem, (str, bytes)):
        return batch
    if isinstance(elem, abc.Mapping):
        return _rebuild_mapping(elem, {key: default_collate([d[key] for d in batch])
                                       for key in elem})
    if _is_namedtuple(elem):
        return type(elem)(*(default_collate(s) for s in zip(*batch)))
    if isinstance(elem, abc.Sequence):
        size = len(elem)
        if any(len(e) != size for e in batch):
            raise RuntimeError("each element in list of batch should be of equal size")
        columns = [default_collate(s) for s in zip(*batch)]
        if isinstance(elem, tuple) or type(elem) is list:
            return columns
        try:
            return type(elem)(columns)
        except TypeError:
            return columns
    raise TypeError(_ERR.format(type(elem)))


def default_convert(data):
    """Turn numpy arrays (also inside dicts, lists and tuples) into tensors; leave the rest.

    Used instead of ``default_collate`` when automatic batching is off (``batch_size=None``).
    """
    if isinstance(data, Tensor):
        return data
    if isinstance(data, np.ndarray):
        return data if data.dtype.kind in "USO" else _np_to_tensor(data)
    if isinstance(data, np.generic):
        return data if isinstance(data, (np.str_, np.bytes_)) else _np_to_tensor(data)
    if isinstance(data, (str, bytes)):
        return data
    if isinstance(data, abc.Mapping):
        return _rebuild_mapping(data, {k: default_convert(v) for k, v in data.items()})
    if _is_namedtuple(data):
        return type(data)(*(default_convert(d) for d in data))
    if isinstance(data, tuple):
        return [default_convert(d) for d in data]
    if isinstance(data, abc.Sequence):
        converted = [default_convert(d) for d in data]
        if type(data) is list:
            return converted
        try:
            return type(data)(converted)
        except TypeError:
            return converted
    return data
