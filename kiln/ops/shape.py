"""Shape and layout ops: reshape/view, expand, permute/transpose, squeeze/unsqueeze, flatten,
slicing, cat/stack/split/chunk, flip/roll/repeat, tril/triu and pad."""

from __future__ import annotations

import builtins
import math
import numbers
import warnings

import numpy as np

from kiln import dtypes
from kiln.ops.elementwise import cast, clone
from kiln.ops.index import _index_view
from kiln.ops.index import _slice as _mkslice
from kiln.ops.reduce import sum_to
from kiln.ops.registry import primitive
from kiln.tensor import Size, Tensor, normalize_dim

__all__ = [
    "atleast_1d",
    "atleast_2d",
    "atleast_3d",
    "broadcast_shapes",
    "broadcast_tensors",
    "broadcast_to",
    "cat",
    "chunk",
    "column_stack",
    "concat",
    "concatenate",
    "dsplit",
    "dstack",
    "flatten",
    "flip",
    "fliplr",
    "flipud",
    "hsplit",
    "hstack",
    "moveaxis",
    "movedim",
    "narrow",
    "permute",
    "ravel",
    "reshape",
    "roll",
    "row_stack",
    "split",
    "squeeze",
    "stack",
    "swapaxes",
    "swapdims",
    "t",
    "tensor_split",
    "tile",
    "transpose",
    "tril",
    "triu",
    "unbind",
    "unflatten",
    "unsqueeze",
    "vsplit",
    "vstack",
]


# -- argument parsing ----------------------------------------------------------------------------

def _int_tuple(args, op: str, what: str = "shape") -> tuple:
    """``f(2, 3)``, ``f((2, 3))`` and ``f([2, 3])`` all give ``(2, 3)``; anything else but
    integers is a TypeError, as in PyTorch."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    for s in args:
        if type(s) is not int:  # the ABC check below costs ~1 us per element: only when needed
            break
    else:
        return tuple(args)
    for s in args:
        if not isinstance(s, numbers.Integral) or isinstance(s, bool):
            if isinstance(s, Tensor) and s.ndim == 0 and s._data.dtype.kind in "iu":
                continue
            raise TypeError(f"{op}(): argument '{what}' must be a sequence of ints, "
                            f"got {type(s).__name__}")
    return tuple([int(s) for s in args])


def _varargs(args: tuple):
    """``x.flip(0, 1)`` and ``x.flip((0, 1))``: the method's varargs as one sequence."""
    return args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _size_args(shape, op: str) -> tuple:
    return _int_tuple(shape, op, "shape")


def _dim_list(dims, op: str) -> tuple:
    """An int or a sequence of ints (``dims`` of flip/roll/movedim/squeeze)."""
    if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        return (int(dims),)
    if isinstance(dims, (tuple, list)):
        return _int_tuple((dims,), op, "dims")
    raise TypeError(f"{op}(): argument 'dims' must be tuple of ints, not {type(dims).__name__}")


def _dim(d, ndim: int, op: str) -> int:
    """``normalize_dim`` with a fast path for the common in-range int."""
    if type(d) is int and -ndim <= d < ndim:
        return d + ndim if d < 0 else d
    return normalize_dim(d, ndim, op)


def _normalize_dims(dims, ndim: int, op: str) -> tuple:
    out = tuple([_dim(d, ndim, op) for d in dims])
    if len(set(out)) != len(out):
        dup = next(d for d in out if out.count(d) > 1)
        raise RuntimeError(f"{op}: dim {dup} appears multiple times in the list of dims")
    return out


_prod = math.prod


# -- reshape / view ------------------------------------------------------------------------------

def infer_reshape(old: tuple, new: tuple, op: str = "reshape") -> tuple:
    """Resolve a -1 in ``new`` and check the element count, with PyTorch's messages."""
    size = _prod(old)
    if -1 not in new and _prod(new) == size and (not new or min(new) >= 0):
        return new
    unknown = -1
    known = 1
    for i, s in enumerate(new):
        if s == -1:
            if unknown >= 0:
                raise RuntimeError(f"{op}: only one dimension can be inferred")
            unknown = i
        elif s < 0:
            raise RuntimeError(f"{op}: invalid shape dimension {s} at index {i} of shape "
                               f"{list(new)}")
        else:
            known *= s
    if unknown >= 0:
        if known == 0:
            if size == 0:
                raise RuntimeError(
                    f"{op}: cannot reshape tensor of 0 elements into shape {list(new)} because "
                    "the unspecified dimension size -1 can be any value and is ambiguous"
                )
            raise RuntimeError(f"shape '{list(new)}' is invalid for input of size {size}")
        if size % known:
            raise RuntimeError(f"shape '{list(new)}' is invalid for input of size {size}")
        return new[:unknown] + (size // known,) + new[unknown + 1:]
    if known != size:
        raise RuntimeError(f"shape '{list(new)}' is invalid for input of size {size}")
    return new


def _viewable(a: np.ndarray, shape: tuple) -> bool:
    """Whether ``a`` can take ``shape`` without a copy (numpy's stride rule is PyTorch's)."""
    try:
        a.reshape(shape, copy=False)  # numpy >= 2.1
        return True
    except ValueError:
        return False
    except TypeError:
        v = a.view()
        try:
            v.shape = shape
        except AttributeError:
            return False
        return True


@primitive("reshape", traits={"view"})
def _reshape(x, shape):
    return x.reshape(shape)


@_reshape.def_vjp
def _reshape_vjp(g, node):
    return (reshape(g, node.inputs[0]._data.shape),)


def reshape(input: Tensor, *shape) -> Tensor:
    """The same data with a new shape; one dimension may be -1.  A view when the strides allow
    it, otherwise a contiguous copy (as in PyTorch).

    >>> import kiln
    >>> kiln.arange(6).reshape(2, -1).shape
    kiln.Size([2, 3])
    """
    a = input._data
    new = infer_reshape(a.shape, _size_args(shape, "reshape"))
    if new == a.shape:
        return input
    if not a.flags.c_contiguous and not _viewable(a, new):
        input = contiguous(input)
    return _reshape(input, shape=new)


_VIEW_ERROR = (
    "view size is not compatible with input tensor's size and stride (at least one dimension "
    "spans across two contiguous subspaces). Use .reshape(...) instead."
)


def view(self: Tensor, *shape) -> Tensor:
    """A view with a new shape; never copies.

    Kiln follows PyTorch exactly here rather than only accepting contiguous inputs: numpy's
    no-copy reshape uses the same stride rule as PyTorch's ``view``, so a view of a transposed
    or sliced tensor works whenever PyTorch's does, and raises PyTorch's RuntimeError ("view
    size is not compatible with input tensor's size and stride ...") where PyTorch does.
    ``view(dtype)`` (reinterpreting the bytes) is not supported.
    """
    if len(shape) == 1 and isinstance(shape[0], (dtypes.dtype, type, np.dtype)):
        raise NotImplementedError("view(dtype): reinterpreting a tensor's bytes is not supported")
    a = self._data
    new = infer_reshape(a.shape, _size_args(shape, "view"), "view")
    if new == a.shape:
        return self
    if not a.flags.c_contiguous and not _viewable(a, new):
        raise RuntimeError(_VIEW_ERROR)
    return _reshape(self, shape=new)


def view_as(self: Tensor, other: Tensor) -> Tensor:
    return view(self, other._data.shape)


def reshape_as(self: Tensor, other: Tensor) -> Tensor:
    return reshape(self, other._data.shape)


@primitive("contiguous")
def _contiguous(x):
    return np.array(x, order="C", copy=True)


@_contiguous.def_vjp
def _contiguous_vjp(g, node):
    return (g,)


def contiguous(self: Tensor, memory_format=None) -> Tensor:
    """``self`` if it is C-contiguous, else a C-contiguous copy (autograd sees through it)."""
    if self._data.flags.c_contiguous:
        return self
    return _contiguous(self)


def flatten(input: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge dims ``start_dim..end_dim`` into one (a view when possible, like reshape).

    >>> import kiln
    >>> kiln.zeros(2, 3, 4).flatten(1).shape
    kiln.Size([2, 12])
    """
    shape = input._data.shape
    nd = len(shape)
    s = _dim(start_dim, nd, "flatten")
    e = _dim(end_dim, nd, "flatten")
    if nd == 0:
        return _reshape(input, shape=(1,))
    if s > e:
        raise RuntimeError("flatten() has invalid args: start_dim cannot come after end_dim")
    if s == e:
        return input
    return reshape(input, shape[:s] + (_prod(shape[s:e + 1]),) + shape[e + 1:])


def ravel(input: Tensor) -> Tensor:
    """A contiguous 1-D tensor of the elements (a view when ``input`` is contiguous)."""
    return reshape(contiguous(input), -1)


def unflatten(input: Tensor, dim: int, sizes) -> Tensor:
    """Split dimension ``dim`` into ``sizes`` (one entry may be -1)."""
    shape = input._data.shape
    d = _dim(dim, len(shape), "unflatten")
    sizes = _int_tuple((sizes,), "unflatten", "sizes")
    if not sizes:
        raise RuntimeError("unflatten: sizes must be non-empty")
    n = shape[d]
    try:
        sizes = infer_reshape((n,), sizes, "unflatten")
    except RuntimeError as e:
        if "invalid for input" not in str(e):
            raise
        raise RuntimeError(
            f"unflatten: Provided sizes {list(sizes)} don't multiply up to the size of dim {d} "
            f"({n}) in the input tensor"
        ) from None
    return reshape(input, shape[:d] + sizes + shape[d + 1:])


# -- permutations --------------------------------------------------------------------------------

@primitive("permute", traits={"view"})
def _permute(x, dims):
    return np.transpose(x, dims)


@_permute.def_vjp
def _permute_vjp(g, node):
    dims = node.attrs["dims"]
    inv = [0] * len(dims)
    for i, p in enumerate(dims):
        inv[p] = i
    return (_permute(g, dims=tuple(inv)),)


def permute(input: Tensor, *dims, **kwargs) -> Tensor:
    """Reorder the dimensions (a view): ``x.permute(1, 0)`` or ``kiln.permute(x, (1, 0))``.

    >>> import kiln
    >>> kiln.zeros(2, 3, 4).permute(2, 0, 1).shape
    kiln.Size([4, 2, 3])
    """
    if kwargs:
        if dims or set(kwargs) != {"dims"}:
            raise TypeError(f"permute() got unexpected arguments {sorted(kwargs)}")
        dims = (kwargs["dims"],)
    dims = _int_tuple(dims, "permute", "dims")
    nd = input._data.ndim
    if len(dims) != nd:
        raise RuntimeError(
            "permute(): number of dimensions in the tensor input does not match the length of "
            f"the desired ordering of dimensions i.e. input.dim() = {nd} is not equal to "
            f"len(dims) = {len(dims)}"
        )
    perm = tuple([_dim(d, nd, "permute") for d in dims])
    if len(set(perm)) != nd:
        raise RuntimeError("permute(): duplicate dims are not allowed.")
    if perm == tuple(range(nd)):
        return input
    return _permute(input, dims=perm)


def transpose(input: Tensor, dim0: int, dim1: int) -> Tensor:
    """Swap two dimensions (a view)."""
    nd = input._data.ndim
    a = _dim(dim0, nd, "transpose")
    b = _dim(dim1, nd, "transpose")
    if a == b:
        return input
    perm = list(range(nd))
    perm[a], perm[b] = b, a
    return _permute(input, dims=tuple(perm))


def swapaxes(input: Tensor, axis0: int, axis1: int) -> Tensor:
    return transpose(input, axis0, axis1)


def swapdims(input: Tensor, dim0: int, dim1: int) -> Tensor:
    return transpose(input, dim0, dim1)


def t(input: Tensor) -> Tensor:
    """Transpose of a matrix; 0-D and 1-D tensors are returned as they are."""
    nd = input._data.ndim
    if nd > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {nd}D")
    if nd < 2:
        return input
    return _permute(input, dims=(1, 0))


def _T(self: Tensor) -> Tensor:
    nd = self._data.ndim
    if nd != 2:
        warnings.warn(
            "The use of `x.T` on tensors of dimension other than 2 to reverse their shape is "
            "deprecated and it will throw an error in a future release. Consider `x.mT` to "
            "transpose batches of matrices or `x.permute(*torch.arange(x.ndim - 1, -1, -1))` to "
            "reverse the dimensions of a tensor.", UserWarning, stacklevel=2)
    if nd < 2:
        return self
    return _permute(self, dims=tuple(range(nd - 1, -1, -1)))


def _mT(self: Tensor) -> Tensor:
    nd = self._data.ndim
    if nd == 0:
        return self
    if nd < 2:
        raise RuntimeError("tensor.mT is only supported on matrices or batches of matrices. "
                           f"Got {nd}-D tensor.")
    return _permute(self, dims=tuple(range(nd - 2)) + (nd - 1, nd - 2))


def _H(self: Tensor) -> Tensor:
    nd = self._data.ndim
    if nd == 0:
        return self
    if nd != 2:
        raise RuntimeError(f"tensor.H is only supported on matrices (2-D tensors). Got {nd}-D "
                           "tensor. For batches of matrices, consider using tensor.mH")
    return _permute(self, dims=(1, 0))


def movedim(input: Tensor, source, destination) -> Tensor:
    """Move dims ``source`` to positions ``destination``; the others keep their order."""
    nd = input._data.ndim
    src = _dim_list(source, "movedim")
    dst = _dim_list(destination, "movedim")
    if len(src) != len(dst):
        raise RuntimeError(
            f"movedim: Invalid source or destination dims: source ({list(src)} dims) should "
            f"contain the same number of dims as destination ({list(dst)} dims)"
        )
    s = [_dim(d, nd, "movedim") for d in src]
    d = [_dim(x, nd, "movedim") for x in dst]
    if len(set(s)) != len(s):
        raise RuntimeError(f"movedim: repeated dim in `source` ({list(src)})")
    if len(set(d)) != len(d):
        raise RuntimeError(f"movedim: repeated dim in `destination` ({list(dst)})")
    perm = [-1] * nd
    for a, b in zip(s, d):
        perm[b] = a
    rest = iter([i for i in range(nd) if i not in s])
    perm = tuple([p if p >= 0 else next(rest) for p in perm])
    if perm == tuple(range(nd)):
        return input
    return _permute(input, dims=perm)


moveaxis = movedim


# -- squeeze / unsqueeze / expand ----------------------------------------------------------------

def squeeze(input: Tensor, dim=None) -> Tensor:
    """Remove size-1 dimensions: all of them, or those in ``dim`` (an int or a tuple)."""
    shape = input._data.shape
    nd = len(shape)
    if dim is None:
        new = tuple([s for s in shape if s != 1])
    else:
        dims = _normalize_dims(_dim_list(dim, "squeeze"), nd, "squeeze")
        new = tuple([s for i, s in enumerate(shape) if s != 1 or i not in dims])
    if len(new) == nd:
        return input
    return _reshape(input, shape=new)


def unsqueeze(input: Tensor, dim: int) -> Tensor:
    """Insert a size-1 dimension at ``dim`` (in ``[-ndim-1, ndim]``)."""
    shape = input._data.shape
    d = _dim(dim, len(shape) + 1, "unsqueeze")
    return _reshape(input, shape=shape[:d] + (1,) + shape[d:])


@primitive("expand", traits={"view"})
def _expand(x, shape):
    return np.broadcast_to(x, shape)


@_expand.def_vjp
def _expand_vjp(g, node):
    return (sum_to(g, node.inputs[0].shape),)


def expand(input: Tensor, *sizes) -> Tensor:
    """Broadcast to a larger shape without copying; -1 keeps a dimension."""
    sizes = _size_args(sizes, "expand")
    shape = input._data.shape
    if len(sizes) < len(shape):
        raise RuntimeError(
            f"expand: the number of sizes provided ({len(sizes)}) must be greater or equal to "
            f"the number of dimensions in the tensor ({len(shape)})"
        )
    lead = len(sizes) - len(shape)
    out = []
    for i, s in enumerate(sizes):
        old = shape[i - lead] if i >= lead else None
        if s == -1:
            if old is None:
                raise RuntimeError("expand: -1 is not allowed in a leading, non-existing dimension")
            s = old
        elif (old is not None and old != s and old != 1) or s < 0:
            raise RuntimeError(
                f"The expanded size of the tensor ({s}) must match the existing size ({old}) at "
                f"non-singleton dimension {i}.  Target sizes: {list(sizes)}.  Tensor sizes: "
                f"{list(shape)}"
            )
        out.append(s)
    out = tuple(out)
    if out == shape:
        return input
    return _expand(input, shape=out)


def expand_as(self: Tensor, other: Tensor) -> Tensor:
    return expand(self, other._data.shape)


def broadcast_to(input: Tensor, size) -> Tensor:
    return expand(input, size)


def broadcast_shapes(*shapes) -> Size:
    """The shape that tensors of the given shapes broadcast to."""
    shapes = [(s,) if isinstance(s, numbers.Integral) else tuple(s) for s in shapes]
    nd = builtins.max([len(s) for s in shapes], default=0)
    out = [1] * nd
    for k, s in enumerate(shapes):
        for i, n in enumerate(s):
            j = nd - len(s) + i
            if n < 0:
                raise RuntimeError(f"broadcast_shapes: Trying to create tensor with negative "
                                   f"dimension {n}: {list(s)}")
            if out[j] == 1:
                out[j] = n
            elif n != 1 and n != out[j]:
                raise RuntimeError(
                    f"Attempting to broadcast a dimension of length {n} at {j - nd}! Mismatching "
                    f"argument at index {k} had {tuple(s)}; but expected shape should be "
                    f"broadcastable to {out}"
                )
    return Size(out)


def broadcast_tensors(*tensors) -> tuple:
    """Expand all tensors to their common broadcast shape (views)."""
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        tensors = tuple(tensors[0])
    shapes = [x._data.shape for x in tensors]
    nd = builtins.max([len(s) for s in shapes], default=0)
    out = [1] * nd
    for s in shapes:
        for i, n in enumerate(s):
            j = nd - len(s) + i
            if out[j] == 1:
                out[j] = n
            elif n != 1 and n != out[j]:
                raise RuntimeError(
                    f"The size of tensor a ({out[j]}) must match the size of tensor b ({n}) at "
                    f"non-singleton dimension {j}"
                )
    out = tuple(out)
    return tuple([x if x._data.shape == out else _expand(x, shape=out) for x in tensors])


# -- basic slicing -------------------------------------------------------------------------------
# One primitive serves all basic slicing: ``index_view`` (kiln.ops.index), the view behind
# ``x[1:3, 0]``; the helpers here build its normalized index.

def _full_slices(shape, d: int) -> tuple:
    return tuple([_mkslice(0, n, 1) for n in shape[:d]])


def basic_slice(x: Tensor, starts, stops, steps) -> Tensor:
    """``x[starts[0]:stops[0]:steps[0], ...]`` as a view, one entry per dimension.

    The entries must already be normalized (``0 <= start <= size``, ``0 <= stop <= size``,
    ``step >= 1``), as PyTorch's basic indexing does; ``stop < start`` gives an empty slice.
    Returns ``x`` itself when every slice is the full range.
    """
    shape = x._data.shape
    index = [_mkslice(a, builtins.max(a, b), s) for a, b, s in zip(starts, stops, steps)]
    while index and index[-1] == (0, shape[len(index) - 1], 1):
        index.pop()  # trailing full slices change nothing (and keep the index canonical)
    return _index_view(x, index=tuple(index)) if index else x


def _slice_dim(x: Tensor, d: int, start: int, stop: int) -> Tensor:
    """``x`` restricted to ``start:stop`` along dimension ``d`` (normalized, a view)."""
    shape = x._data.shape
    if start == 0 and stop == shape[d]:
        return x
    return _index_view(x, index=_full_slices(shape, d) + (_mkslice(start, stop, 1),))


def narrow(input: Tensor, dim: int, start, length: int) -> Tensor:
    """``length`` elements of dimension ``dim`` from ``start`` (a view)."""
    shape = input._data.shape
    if not shape:
        raise RuntimeError("narrow() cannot be applied to a 0-dim tensor.")
    d = _dim(dim, len(shape), "narrow")
    if isinstance(start, Tensor):
        start = int(start.item())
    n = shape[d]
    if length < 0:
        raise RuntimeError("narrow(): length must be non-negative.")
    if start < -n or start > n:
        raise IndexError(f"narrow: start out of range (expected to be in range of [{-n}, {n}], "
                         f"but got {start})")
    if start < 0:
        start += n
    if start + length > n:
        raise RuntimeError(f"narrow: start ({start}) + length ({length}) exceeds dimension size "
                           f"({n}).")
    return _slice_dim(input, d, start, start + length)


# -- splitting -----------------------------------------------------------------------------------

def _split_sizes(x: Tensor, sizes, d: int) -> tuple:
    out = []
    off = 0
    for s in sizes:
        out.append(_slice_dim(x, d, off, off + s))
        off += s
    return tuple(out)


def split(tensor: Tensor, split_size_or_sections, dim: int = 0) -> tuple:
    """Pieces of ``split_size_or_sections`` elements (an int: the last may be smaller; a list:
    exact sizes) along ``dim``; views of ``tensor``."""
    shape = tensor._data.shape
    if not shape:
        raise RuntimeError("split expects at least a 1-dimensional tensor")
    d = _dim(dim, len(shape), "split")
    n = shape[d]
    if isinstance(split_size_or_sections, (tuple, list)):
        sizes = _int_tuple((split_size_or_sections,), "split", "split_size")
        if builtins.any(s < 0 for s in sizes):
            raise RuntimeError("split_with_sizes expects split_sizes have only non-negative "
                               f"entries, but got split_sizes={list(sizes)}")
        if builtins.sum(sizes) != n:
            raise RuntimeError(
                f"split_with_sizes expects split_sizes to sum exactly to {n} (input tensor's "
                f"size at dimension {d}), but got split_sizes={list(sizes)}"
            )
        return _split_sizes(tensor, sizes, d)
    if isinstance(split_size_or_sections, Tensor):
        split_size_or_sections = int(split_size_or_sections.item())
    if not isinstance(split_size_or_sections, numbers.Integral):
        raise TypeError("split(): argument 'split_size' must be int or a sequence of ints, got "
                        f"{type(split_size_or_sections).__name__}")
    size = int(split_size_or_sections)
    if size < 0:
        raise RuntimeError(f"split expects split_size be non-negative, but got split_size={size}")
    if size == 0 and n != 0:
        raise RuntimeError("split_size can only be 0 if dimension size is 0, but got dimension "
                           f"size of {n}")
    if size == 0 or n == 0:
        return (tensor,)
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    return _split_sizes(tensor, sizes, d)


def chunk(input: Tensor, chunks: int, dim: int = 0) -> tuple:
    """At most ``chunks`` pieces of equal size (the last may be smaller) along ``dim``."""
    shape = input._data.shape
    if not shape:
        raise RuntimeError("chunk expects at least a 1-dimensional tensor")
    if chunks <= 0:
        raise RuntimeError(f"chunk expects `chunks` to be greater than 0, got: {chunks}")
    d = _dim(dim, len(shape), "chunk")
    n = shape[d]
    if n == 0:
        return _split_sizes(input, [0] * chunks, d)
    return split(input, -(-n // chunks), d)


def tensor_split(input: Tensor, indices_or_sections, dim: int = 0) -> tuple:
    """``sections`` nearly equal pieces, or pieces cut before each of ``indices``."""
    shape = input._data.shape
    if not shape:
        raise RuntimeError("tensor_split expected at least a 1-dimensional tensor, but got a "
                           "tensor with 0 dims")
    d = _dim(dim, len(shape), "tensor_split")
    n = shape[d]
    if isinstance(indices_or_sections, (tuple, list)):
        cuts = _int_tuple((indices_or_sections,), "tensor_split", "indices")
        bounds = []
        for c in cuts:
            c = c + n if c < 0 else c
            bounds.append(builtins.min(builtins.max(c, 0), n))
        starts = [0] + bounds
        stops = bounds + [n]
        return tuple([_slice_dim(input, d, a, builtins.max(a, b))
                      for a, b in zip(starts, stops)])
    if isinstance(indices_or_sections, Tensor):
        indices_or_sections = int(indices_or_sections.item())
    sections = int(indices_or_sections)
    if sections <= 0:
        raise RuntimeError(f"number of sections must be larger than 0, got {sections}")
    q, r = divmod(n, sections)
    return _split_sizes(input, [q + 1] * r + [q] * (sections - r), d)


def _split_along(input, sections, d: int, op: str, min_dim: int):
    if input._data.ndim < min_dim:
        raise RuntimeError(f"kiln.{op} requires a tensor with at least {min_dim} dimension, but "
                           f"got a tensor with {input._data.ndim} dimensions!")
    if isinstance(sections, numbers.Integral):
        n = input._data.shape[d]
        if sections == 0 or n % sections:
            raise RuntimeError(f"kiln.{op} attempted to split along dimension {d}, but the size "
                               f"of the dimension {n} is not divisible by the split_size "
                               f"{sections}!")
    return tensor_split(input, sections, d)


def hsplit(input: Tensor, indices_or_sections) -> tuple:
    return _split_along(input, indices_or_sections, 1 if input._data.ndim > 1 else 0,
                        "hsplit", 1)


def vsplit(input: Tensor, indices_or_sections) -> tuple:
    return _split_along(input, indices_or_sections, 0, "vsplit", 2)


def dsplit(input: Tensor, indices_or_sections) -> tuple:
    return _split_along(input, indices_or_sections, 2, "dsplit", 3)


def unbind(input: Tensor, dim: int = 0) -> tuple:
    """The slices along ``dim``, with that dimension removed (views)."""
    shape = input._data.shape
    if not shape:
        raise IndexError("unbind: Dimension specified as 0 but tensor has no dimensions")
    d = _dim(dim, len(shape), "unbind")
    lead = _full_slices(shape, d)
    return tuple([_index_view(input, index=lead + (i,)) for i in range(shape[d])])


# -- joining -------------------------------------------------------------------------------------

@primitive("cat")
def _cat(*xs, dim):
    try:
        return np.concatenate(xs, axis=dim)
    except ValueError:  # a legacy 1-D empty input that requires grad rides along
        return np.concatenate([a for a in xs if a.shape != (0,)], axis=dim)


@_cat.def_vjp
def _cat_vjp(g, node):
    d = node.attrs["dim"]
    nd = g._data.ndim
    grads = []
    off = 0
    for x, need in zip(node.inputs, node.needs):
        shape = x._data.shape
        if len(shape) != nd:  # skipped legacy empty tensor
            grads.append(reshape(_slice_dim(g, d, 0, 0), 0) if need else None)
            continue
        n = shape[d]
        grads.append(_slice_dim(g, d, off, off + n) if need else None)
        off += n
    return tuple(grads)


def _tensor_seq(tensors, op: str) -> tuple:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (tuple, list)):
        raise TypeError(f"{op}(): argument 'tensors' (position 1) must be tuple of Tensors, not "
                        f"{type(tensors).__name__}")
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}(): expected Tensor as element {i} in argument 0, but got "
                            f"{type(x).__name__}")
    return tuple(tensors)


def cat(tensors, dim: int = 0) -> Tensor:
    """Concatenate along an existing dimension, promoting dtypes like PyTorch.  1-D empty
    tensors are skipped (PyTorch's legacy rule), whatever the other tensors' shapes.

    >>> import kiln
    >>> kiln.cat([kiln.zeros(2, 3), kiln.ones(1, 3)]).shape
    kiln.Size([3, 3])
    """
    tensors = _tensor_seq(tensors, "cat")
    if not tensors:
        raise ValueError("cat(): expected a non-empty list of Tensors")
    first = tensors[0]._data.dtype
    ref = None
    legacy = mixed = uneven = False
    for i, x in enumerate(tensors):
        a = x._data
        if a.dtype != first:
            mixed = True
        shape = a.shape
        if shape == ref:
            continue
        if not shape:
            raise RuntimeError(f"cat: zero-dimensional tensor (at position {i}) cannot be "
                               "concatenated")
        if shape == (0,):
            legacy = True
        elif ref is None:
            ref = shape
        else:
            uneven = True
    d = _dim(dim, len(ref) if ref is not None else 1, "cat")
    if uneven:
        for i, x in enumerate(tensors):
            shape = x._data.shape
            if shape == ref or shape == (0,):
                continue
            if len(shape) != len(ref):
                raise RuntimeError(f"cat: Tensors must have same number of dimensions: got "
                                   f"{len(ref)} and {len(shape)}")
            for k, (a, b) in enumerate(zip(ref, shape)):
                if k != d and a != b:
                    raise RuntimeError(
                        f"cat: Sizes of tensors must match except in dimension {d}. Expected "
                        f"size {a} but got size {b} for tensor number {i} in the list."
                    )
    if mixed:
        common = tensors[0].dtype
        for x in tensors[1:]:
            common = dtypes.promote_types(common, x.dtype)
        tensors = tuple([cast(x, common) for x in tensors])
    if legacy and ref is not None:
        tensors = tuple([x for x in tensors if x._data.shape != (0,) or x._rg])
    return _cat(*tensors, dim=d)


concat = cat
concatenate = cat


def stack(tensors, dim: int = 0) -> Tensor:
    """Join equally shaped tensors along a new dimension ``dim``.

    >>> import kiln
    >>> kiln.stack([kiln.zeros(2, 3), kiln.ones(2, 3)], dim=1).shape
    kiln.Size([2, 2, 3])
    """
    tensors = _tensor_seq(tensors, "stack")
    if not tensors:
        raise RuntimeError("stack expects a non-empty TensorList")
    shape = tensors[0]._data.shape
    for i, x in enumerate(tensors):
        if x._data.shape != shape:
            raise RuntimeError(f"stack expects each tensor to be equal size, but got "
                               f"{list(shape)} at entry 0 and {list(x._data.shape)} at entry {i}")
    d = _dim(dim, len(shape) + 1, "stack")
    new = shape[:d] + (len(tensors),) + shape[d:]
    if d < len(shape):
        # joining the blocks along d and splitting d into (count, size) is the stack: two
        # dispatches whatever the number of tensors (the reshape of cat's output is a view)
        return _reshape(cat(tensors, d), shape=new)
    one = shape + (1,)
    return cat([_reshape(x, shape=one) for x in tensors], d)


def atleast_1d(*tensors):
    """Each tensor viewed with at least 1 dimension (one tensor in, one out)."""
    return _atleast(tensors, 1)


def atleast_2d(*tensors):
    """Each tensor viewed with at least 2 dimensions (1-D ``(n,)`` becomes ``(1, n)``)."""
    return _atleast(tensors, 2)


def atleast_3d(*tensors):
    """Each tensor viewed with at least 3 dimensions (``(n,)`` -> ``(1, n, 1)``, ``(m, n)`` ->
    ``(m, n, 1)``)."""
    return _atleast(tensors, 3)


def _atleast(tensors, k: int):
    single = len(tensors) == 1 and isinstance(tensors[0], Tensor)
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        tensors = tuple(tensors[0])
    out = []
    for x in tensors:
        shape = x._data.shape
        if len(shape) >= k:
            out.append(x)
            continue
        if k == 1 or len(shape) == 0:
            new = (1,) * k
        elif k == 2:
            new = (1,) + shape
        else:
            new = (1,) + shape + (1,) if len(shape) == 1 else shape + (1,)
        out.append(_reshape(x, shape=new))
    return out[0] if single else tuple(out)


def hstack(tensors) -> Tensor:
    """Concatenate column-wise (along dim 1; along dim 0 for 1-D tensors)."""
    tensors = atleast_1d(_tensor_seq(tensors, "hstack"))
    return cat(tensors, 0 if tensors and tensors[0]._data.ndim == 1 else 1)


def vstack(tensors) -> Tensor:
    """Concatenate row-wise (1-D tensors become rows)."""
    return cat(atleast_2d(_tensor_seq(tensors, "vstack")), 0)


row_stack = vstack


def dstack(tensors) -> Tensor:
    """Concatenate depth-wise (along dim 2, after ``atleast_3d``)."""
    return cat(atleast_3d(_tensor_seq(tensors, "dstack")), 2)


def column_stack(tensors) -> Tensor:
    """Concatenate as columns: 0-D and 1-D tensors become ``(n, 1)`` columns."""
    tensors = _tensor_seq(tensors, "column_stack")
    cols = [x if x._data.ndim >= 2 else _reshape(x, shape=(x._data.size, 1)) for x in tensors]
    return cat(cols, 1)


# -- copies with a new layout --------------------------------------------------------------------

@primitive("flip")
def _flip(x, dims):
    return np.flip(x, dims).copy()


@_flip.def_vjp
def _flip_vjp(g, node):
    return (_flip(g, dims=node.attrs["dims"]),)


def flip(input: Tensor, dims) -> Tensor:
    """Reverse the order of elements along ``dims`` (a copy, as in PyTorch)."""
    if not isinstance(dims, (tuple, list)):
        raise TypeError(f"flip(): argument 'dims' (position 2) must be tuple of ints, not "
                        f"{type(dims).__name__}")
    nd = input._data.ndim
    d = _normalize_dims(_int_tuple((dims,), "flip", "dims"), nd, "flip")
    if not nd or not d:
        return clone(input)
    return _flip(input, dims=d)


def fliplr(input: Tensor) -> Tensor:
    if input._data.ndim < 2:
        raise RuntimeError("fliplr: Input must be >= 2-d.")
    return _flip(input, dims=(1,))


def flipud(input: Tensor) -> Tensor:
    if input._data.ndim < 1:
        raise RuntimeError("flipud: Input must be >= 1-d.")
    return _flip(input, dims=(0,))


@primitive("roll")
def _roll(x, shifts, dims):
    # one concatenate of two slices per rolled dim: several times faster than np.roll
    for s, d in zip(shifts, dims):
        head = [builtins.slice(None)] * x.ndim
        tail = list(head)
        head[d] = builtins.slice(-s, None)
        tail[d] = builtins.slice(None, -s)
        x = np.concatenate((x[tuple(head)], x[tuple(tail)]), axis=d)
    return x


@_roll.def_vjp
def _roll_vjp(g, node):
    dims = node.attrs["dims"]
    shape = g._data.shape
    back = tuple([shape[d] - s for s, d in zip(node.attrs["shifts"], dims)])
    return (_roll(g, shifts=back, dims=dims),)


def roll(input: Tensor, shifts, dims=None) -> Tensor:
    """Rotate elements along ``dims`` by ``shifts`` (flattened first when ``dims`` is None)."""
    sh = _dim_list(shifts, "roll")
    if dims is None:
        if len(sh) != 1:
            raise RuntimeError(f"roll: shifts and dimensions must align. shifts: {len(sh)}, "
                               "dims:0")
        shape = input._data.shape
        return reshape(roll(flatten(input), sh, 0), shape)
    ds = _dim_list(dims, "roll")
    if not sh:
        raise RuntimeError("roll: `shifts` required")
    if len(sh) != len(ds):
        raise RuntimeError(f"roll: shifts and dimensions must align. shifts: {len(sh)}, "
                           f"dims:{len(ds)}")
    shape = input._data.shape
    if not shape:
        raise IndexError("roll: Dimension specified as 0 but tensor has no dimensions")
    ds = [_dim(d, len(shape), "roll") for d in ds]
    if not input._data.size:
        return clone(input)
    pairs = [(s % shape[d], d) for s, d in zip(sh, ds)]
    pairs = [(s, d) for s, d in pairs if s]
    if not pairs:
        return clone(input)
    return _roll(input, shifts=tuple([s for s, _ in pairs]), dims=tuple([d for _, d in pairs]))


def repeat(self: Tensor, *sizes) -> Tensor:
    """Tile the tensor ``sizes[i]`` times along each dimension (a copy)."""
    sizes = _int_tuple(sizes, "repeat", "repeats")
    shape = self._data.shape
    if len(sizes) < len(shape):
        raise RuntimeError("repeat: Number of dimensions of repeat dims can not be smaller than "
                           "number of dimensions of tensor")
    shape = (1,) * (len(sizes) - len(shape)) + shape
    final = tuple([r * s for r, s in zip(sizes, shape)])
    if builtins.any(r < 0 for r in sizes):
        raise RuntimeError(f"repeat: Trying to create tensor with negative dimension "
                           f"{builtins.min(final)}: {list(final)}")
    if builtins.all(r == 1 for r in sizes):
        return clone(self) if final == self._data.shape else reshape(clone(self), final)
    # interleave a size-1 axis before each dim, broadcast it to the repeat count, merge: the
    # gradient comes from expand (a sum over the copies) and reshape
    inter = tuple([v for s in shape for v in (1, s)])
    big = tuple([v for r, s in zip(sizes, shape) for v in (r, s)])
    x = _expand(_reshape(self, shape=inter), shape=big)
    return _reshape(_contiguous(x), shape=final)  # always a copy, never a zero-stride view


def tile(input: Tensor, dims) -> Tensor:
    """``repeat`` with ``dims`` padded with leading 1s to the tensor's rank."""
    dims = _int_tuple((dims,), "tile", "dims")
    nd = input._data.ndim
    if len(dims) < nd:
        dims = (1,) * (nd - len(dims)) + dims
    return repeat(input, dims)


@primitive("tril")
def _tril(x, diagonal):
    return np.tril(x, diagonal)


@_tril.def_vjp
def _tril_vjp(g, node):
    return (_tril(g, diagonal=node.attrs["diagonal"]),)


@primitive("triu")
def _triu(x, diagonal):
    return np.triu(x, diagonal)


@_triu.def_vjp
def _triu_vjp(g, node):
    return (_triu(g, diagonal=node.attrs["diagonal"]),)


def _diagonal_arg(input: Tensor, diagonal, op: str) -> int:
    if input._data.ndim < 2:
        raise RuntimeError(f"{op}: input tensor must have at least 2 dimensions")
    if not isinstance(diagonal, numbers.Integral) or isinstance(diagonal, bool):
        raise TypeError(f"{op}(): argument 'diagonal' (position 2) must be int, not "
                        f"{type(diagonal).__name__}")
    return int(diagonal)


def tril(input: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two dims (elements above ``diagonal`` set to zero)."""
    return _tril(input, diagonal=_diagonal_arg(input, diagonal, "tril"))


def triu(input: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two dims (elements below ``diagonal`` set to zero)."""
    return _triu(input, diagonal=_diagonal_arg(input, diagonal, "triu"))


# -- padding -------------------------------------------------------------------------------------

@primitive("pad")
def _pad(x, widths, value):
    shape = tuple([n + lo + hi for n, (lo, hi) in zip(x.shape, widths)])
    out = np.zeros(shape, x.dtype) if value == 0 else np.full(shape, value, x.dtype)
    out[tuple([builtins.slice(lo, lo + n) for n, (lo, _) in zip(x.shape, widths)])] = x
    return out


@_pad.def_vjp
def _pad_vjp(g, node):
    widths = node.attrs["widths"]
    shape = node.inputs[0]._data.shape
    stops = [lo + n for n, (lo, _) in zip(shape, widths)]
    return (basic_slice(g, [lo for lo, _ in widths], stops, [1] * len(shape)),)


_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def pad(input: Tensor, pad, mode: str = "constant", value=None) -> Tensor:
    """Pad the last ``len(pad) // 2`` dims; ``pad`` lists (left, right) pairs from the LAST
    dimension backwards, as in PyTorch.  Negative pads crop.  Modes: ``constant`` (with
    ``value``, default 0), ``reflect``, ``replicate``, ``circular``.  Always a new tensor.

    >>> import kiln
    >>> kiln.ops.shape.pad(kiln.ones(2, 3), (1, 2)).shape
    kiln.Size([2, 6])
    """
    if not isinstance(pad, (tuple, list)):
        raise TypeError(f"pad(): argument 'pad' (position 2) must be tuple of ints, not "
                        f"{type(pad).__name__}")
    for i, p in enumerate(pad):
        if type(p) is not int and (not isinstance(p, numbers.Integral) or isinstance(p, bool)):
            raise TypeError("pad(): argument 'pad' (position 2) must be tuple of ints, but found "
                            f"element of type {type(p).__name__} at pos {i}")
    shape = input._data.shape
    nd = len(shape)
    if len(pad) % 2:
        raise RuntimeError("Padding length must be divisible by 2")
    k = len(pad) // 2
    if k > nd:
        raise RuntimeError(
            "Padding length should be less than or equal to two times the input dimension but "
            f"got padding length {len(pad)} and input of dimension {nd}"
        )
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Unrecognised padding mode {mode}")
    widths = [(0, 0)] * (nd - k) + [(int(pad[2 * i]), int(pad[2 * i + 1]))
                                   for i in range(k - 1, -1, -1)]
    if mode == "constant":
        for d, ((lo, hi), n) in enumerate(zip(widths, shape)):
            if n + lo + hi < 0:
                raise RuntimeError(
                    f"pad: The input size {n}, plus negative padding {lo} and {hi} resulted in a "
                    f"negative output size, which is invalid. Check dimension {d} of your input."
                )
        return _pad_constant(input, widths, 0 if value is None else value)
    if value is not None and value != 0:
        raise RuntimeError(f'Padding mode "{mode}" doesn\'t take in value argument')
    if k not in (1, 2, 3) or nd not in (k + 1, k + 2):
        raise NotImplementedError(
            f"Padding size {len(pad)} is not supported for {nd}D input tensor.\n"
            "Supported combinations for non-constant padding:\n"
            "  - 2D or 3D input: padding size = 2 (pads last dimension)\n"
            "  - 3D or 4D input: padding size = 4 (pads last 2 dimensions)\n"
            "  - 4D or 5D input: padding size = 6 (pads last 3 dimensions)"
        )
    if mode != "circular" and 0 in shape[1:]:
        raise RuntimeError(
            f"pad: Expected {k + 1}D or {k + 2}D (batch mode) tensor with possibly 0 batch size "
            f"and other non-zero dimensions for input, but got: {list(shape)}"
        )
    for d in range(nd - k, nd):
        lo, hi = widths[d]
        n = shape[d]
        if mode == "reflect" and (lo >= n or hi >= n):
            raise RuntimeError(
                "Argument #4: Padding size should be less than the corresponding input "
                f"dimension, but got: padding ({lo}, {hi}) at dimension {d} of input "
                f"{list(shape)}"
            )
        if mode == "circular":
            kept = n + builtins.min(lo, 0) + builtins.min(hi, 0)
            if kept < 0:
                raise RuntimeError("pad: Negative padding value is resulting in an empty "
                                   "dimension")
            # PyTorch wraps with the cropped input; it cannot wrap around it more than once
            if lo > kept or hi > kept:
                raise RuntimeError("pad: Padding value causes wrapping around more than once.")
        elif n + lo + hi < 1:
            name = "WHD"[nd - 1 - d]
            raise RuntimeError(f"pad: input ({name}: {n}) is too small. Calculated output "
                               f"{name}: {n + lo + hi}")
    # Each padded dim: grow the positive sides by joining pieces of the input (differentiable
    # through slice/flip/expand/cat).  Negative sides are cropped after growing for reflect and
    # replicate (the mirror/edge stays that of the whole input), before it for circular (which
    # wraps the cropped input), as PyTorch does.
    crop = [(builtins.max(-lo, 0), builtins.max(-hi, 0)) for lo, hi in widths]
    cropping = builtins.any(a or b for a, b in crop)
    out = input
    if cropping and mode == "circular":
        out = _crop(out, crop)
    grown = False
    for d in range(nd - k, nd):
        lo, hi = widths[d]
        if lo <= 0 and hi <= 0:
            continue
        grown = True
        n = out._data.shape[d]
        parts = []
        if lo > 0:
            parts.append(_pad_piece(out, d, n, lo, mode, left=True))
        parts.append(out)
        if hi > 0:
            parts.append(_pad_piece(out, d, n, hi, mode, left=False))
        out = cat(parts, d)
    if cropping and mode != "circular":
        out = _crop(out, crop)
    return contiguous(out) if grown else clone(out)


def _crop(x: Tensor, crop) -> Tensor:
    shape = x._data.shape
    return basic_slice(x, [a for a, _ in crop], [n - b for n, (_, b) in zip(shape, crop)],
                       [1] * len(shape))


def _pad_piece(x: Tensor, d: int, n: int, p: int, mode: str, left: bool) -> Tensor:
    if mode == "reflect":  # mirror without repeating the edge element
        piece = _slice_dim(x, d, 1, p + 1) if left else _slice_dim(x, d, n - 1 - p, n - 1)
        return _flip(piece, dims=(d,))
    if mode == "replicate":
        edge = _slice_dim(x, d, 0, 1) if left else _slice_dim(x, d, n - 1, n)
        shape = list(edge._data.shape)
        shape[d] = p
        return _expand(edge, shape=tuple(shape))
    return _slice_dim(x, d, n - p, n) if left else _slice_dim(x, d, 0, p)  # circular


def _pad_constant(x: Tensor, widths, value) -> Tensor:
    neg = pos = False
    for lo, hi in widths:
        if lo < 0 or hi < 0:
            neg = True
        if lo > 0 or hi > 0:
            pos = True
    if neg:
        x = _crop(x, [(builtins.max(-lo, 0), builtins.max(-hi, 0)) for lo, hi in widths])
        widths = [(builtins.max(lo, 0), builtins.max(hi, 0)) for lo, hi in widths]
    if not pos:
        return clone(x)
    return _pad(x, widths=tuple(widths), value=value)


TENSOR_METHODS = {
    "reshape": reshape, "view": view, "view_as": view_as, "reshape_as": reshape_as,
    "contiguous": contiguous, "flatten": flatten, "ravel": ravel, "unflatten": unflatten,
    "permute": permute, "transpose": transpose, "swapaxes": swapaxes, "swapdims": swapdims,
    "t": t, "T": property(_T), "mT": property(_mT), "H": property(_H), "mH": property(_mT),
    "movedim": movedim, "moveaxis": movedim, "squeeze": squeeze, "unsqueeze": unsqueeze,
    "expand": expand, "expand_as": expand_as, "broadcast_to": broadcast_to, "narrow": narrow,
    "split": lambda self, split_size, dim=0: split(self, split_size, dim),
    "tensor_split": tensor_split, "hsplit": hsplit, "vsplit": vsplit, "dsplit": dsplit,
    "chunk": chunk, "unbind": unbind, "tril": tril, "triu": triu,
    "flip": lambda self, *dims: flip(self, _varargs(dims)), "fliplr": fliplr, "flipud": flipud,
    "roll": roll, "repeat": repeat, "tile": lambda self, *dims: tile(self, _varargs(dims)),
}
