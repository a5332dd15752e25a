"""The eager Tensor: a numpy array plus autograd state (requires_grad, grad, graph node).

Operations are attached by the modules in ``kiln.ops`` (see ``install_methods``); this file
holds only what a tensor is, not what can be computed from it.
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

from kiln import dtypes
from kiln.grad_mode import STATE as _STATE


class Size(tuple):
    """A tensor's shape: a tuple that prints like PyTorch's ``torch.Size``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"kiln.Size({list(self)})"

    def numel(self) -> int:
        n = 1
        for d in self:
            n *= d
        return n


class device(str):
    """Where a tensor lives: always ``"cpu"``.  A str, so ``t.device == "cpu"`` holds."""

    __slots__ = ()

    def __new__(cls, type: str = "cpu", index: int | None = None):  # noqa: A002 - PyTorch's name
        return super().__new__(cls, type)

    @property
    def type(self) -> str:
        return self.split(":")[0]

    @property
    def index(self) -> int | None:
        return None

    def __repr__(self) -> str:
        return f"device(type='{self.type}')"


_CPU = device("cpu")


class Tensor:
    """An n-dimensional array with autograd.  Build one with ``kiln.tensor(data)``.

    >>> import kiln
    >>> x = kiln.tensor([1.0, 2.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    tensor([2., 4.])
    """

    __slots__ = ("_data", "_rg", "_node", "grad", "_version", "_base", "_hooks", "__weakref__",
                 "__dict__")

    def __init__(self, data=None, requires_grad: bool = False):
        from kiln.creation import _to_array

        arr = _to_array([] if data is None else data, None, copy=True)
        _init(self, arr)
        if requires_grad:
            self.requires_grad = True

    # -- identity -------------------------------------------------------------------------------
    @property
    def shape(self) -> Size:
        return Size(self._data.shape)

    def size(self, dim: int | None = None):
        """The shape, or the length of one dimension."""
        if dim is None:
            return Size(self._data.shape)
        return self._data.shape[normalize_dim(dim, self._data.ndim, "size")]

    @property
    def dtype(self) -> dtypes.dtype:
        return dtypes._FROM_NP[self._data.dtype]

    @property
    def ndim(self) -> int:
        return self._data.ndim

    def dim(self) -> int:
        return self._data.ndim

    def numel(self) -> int:
        return self._data.size

    nelement = numel

    def element_size(self) -> int:
        return self._data.itemsize

    @property
    def device(self) -> device:
        return _CPU

    def stride(self, dim: int | None = None):
        """Strides in elements, as PyTorch reports them."""
        st = tuple(s // self._data.itemsize for s in self._data.strides)
        return st if dim is None else st[normalize_dim(dim, self._data.ndim, "stride")]

    def is_floating_point(self) -> bool:
        return self._data.dtype.kind == "f"

    def is_contiguous(self) -> bool:
        return self._data.flags.c_contiguous

    # -- autograd state -------------------------------------------------------------------------
    @property
    def requires_grad(self) -> bool:
        return self._rg

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        value = bool(value)
        if self._node is not None:
            if not value:
                raise RuntimeError(
                    "you can only change requires_grad flags of leaf variables. If you want to "
                    "use a computed variable in a subgraph that doesn't require differentiation "
                    "use var_no_grad = var.detach()."
                )
            return
        if value and self._data.dtype.kind != "f":
            raise RuntimeError(
                "Only Tensors of floating point and complex dtype can require gradients "
                f"(got {self.dtype})"
            )
        self._rg = value

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        self.requires_grad = requires_grad
        return self

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

    @property
    def _version_counter(self) -> int:
        return self._version[0]

    @property
    def data(self) -> "Tensor":
        """A tensor sharing this one's storage, outside the autograd graph."""
        return self.detach()

    @data.setter
    def data(self, value: "Tensor") -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"data must be a Tensor, got {type(value).__name__}")
        self._data = value._data

    def detach(self) -> "Tensor":
        """A tensor sharing this one's storage, cut from the graph (``requires_grad=False``)."""
        t = _make(self._data)
        t._version = self._version
        t._base = self
        return t

    def detach_(self) -> "Tensor":
        self._node = None
        self._rg = False
        return self

    def retain_grad(self) -> None:
        """Keep ``.grad`` of this non-leaf tensor after backward, as PyTorch does."""
        if self._node is None:
            if not self._rg:
                raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
            return
        self._node.retain(self)

    @property
    def retains_grad(self) -> bool:
        return self._node is not None and self._node.retains is not None

    def register_hook(self, hook):
        """Call ``hook(grad)`` when this tensor's gradient is computed; it may return a new one."""
        if not self._rg:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        from kiln.autograd import HookHandle

        if self._node is not None:
            hooks = self._node.hooks
            if hooks is None:
                hooks = self._node.hooks = []
        else:
            if self._hooks is None:
                self._hooks = []
            hooks = self._hooks
        hooks.append(hook)
        return HookHandle(hooks, hook)

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` (see ``kiln.autograd.backward``)."""
        from kiln.autograd import backward

        backward(self, gradient, retain_graph=retain_graph, create_graph=create_graph,
                 inputs=inputs)

    # -- conversion to Python and numpy --------------------------------------------------------
    def numpy(self, *, force: bool = False) -> np.ndarray:
        """The underlying numpy array (shared, not copied)."""
        if self._rg and not force:
            raise RuntimeError(
                "Can't call numpy() on Tensor that requires grad. "
                "Use tensor.detach().numpy() instead."
            )
        _concrete(self, "numpy()")
        return self._data

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self._data.size != 1:
            raise RuntimeError(
                f"a Tensor with {self._data.size} elements cannot be converted to Scalar"
            )
        _concrete(self, "item()")
        return self._data.reshape(()).item()

    def tolist(self):
        _concrete(self, "tolist()")
        return self._data.tolist()

    def __array__(self, dtype=None, copy=None):
        _concrete(self, "numpy.asarray()")
        return self._data if dtype is None else self._data.astype(dtype)

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self._data.dtype.kind not in "iub":
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return int(self.item())

    def __bool__(self) -> bool:
        if self._data.size != 1:
            raise RuntimeError(
                f"Boolean value of Tensor with {'no' if self._data.size == 0 else 'more than one'}"
                " value is ambiguous"
            )
        _concrete(self, "bool()")
        return bool(self._data.reshape(()))

    def __len__(self) -> int:
        if self._data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self._data.shape[0]

    def __iter__(self):
        if self._data.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self._data.shape[0]))

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return format_tensor(self)

    def __format__(self, spec: str) -> str:
        if self._data.ndim == 0 and spec:
            return format(self.item(), spec)
        return repr(self)

    def __deepcopy__(self, memo):
        if self._node is not None:
            raise RuntimeError(
                "Only Tensors created explicitly by the user (graph leaves) support the deepcopy "
                "protocol at the moment. If you were attempting to deepcopy a module, this may "
                "be because of a torch.nn.utils.weight_norm usage."
            )
        if id(self) in memo:
            return memo[id(self)]
        new = type(self).__new__(type(self))
        _init(new, self._data.copy())
        new._rg = self._rg
        memo[id(self)] = new
        if self.grad is not None:
            new.grad = self.grad.__deepcopy__(memo)
        if getattr(self, "__dict__", None):
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "kiln tensors are not pickled (loading a pickle can run code); "
            "use kiln.save / kiln.load, which write safetensors"
        )


def _init(t: Tensor, arr: np.ndarray) -> None:
    t._data = arr
    t._rg = False
    t._node = None
    t.grad = None
    t._version = [0]
    t._base = None
    t._hooks = None


def _make(arr: np.ndarray) -> Tensor:
    """Wrap a numpy array (no copy) as a tensor outside the graph: the fast internal constructor."""
    t = Tensor.__new__(Tensor)
    t._data = arr
    t._rg = False
    t._node = None
    t.grad = None
    t._version = [0]
    t._base = None
    t._hooks = None
    if _STATE.tracer is not None:
        _STATE.tracer.on_make(t)
    return t


def _concrete(t: Tensor, what: str) -> None:
    """Reading a value in Python: an error while kiln.compile traces, if the value is traced."""
    if _STATE.tracer is not None:
        _STATE.tracer.on_read(t, what)


def normalize_dim(dim, ndim: int, op: str = "") -> int:
    """Turn a possibly negative dim into an index, with PyTorch's IndexError when out of range."""
    if not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if dim < lo or dim > hi:
        raise IndexError(
            f"{op + ': ' if op else ''}Dimension out of range "
            f"(expected to be in range of [{lo}, {hi}], but got {dim})"
        )
    return dim % ndim if ndim else 0


def format_tensor(t: Tensor) -> str:
    """PyTorch-style repr: values, then dtype when not a default, then grad information."""
    a = t._data
    extras = []
    if a.size == 0:
        body = "[]"
        if a.shape != (0,):
            extras.append(f"size={tuple(a.shape)}")
    else:
        kind = a.dtype.kind
        if kind == "f":
            finite = a[np.isfinite(a)]
            whole = finite.size == 0 or bool(np.all(finite == np.round(finite)))
            big = finite.size and (np.abs(finite).max() >= 1e8 or
                                   (np.abs(finite[finite != 0]).min(initial=1) < 1e-4))

            def fmt(v):
                if not np.isfinite(v):
                    return str(float(v))
                if big:
                    return f"{v:.4e}"
                return f"{v:.0f}." if whole else f"{v:.4f}"
        elif kind == "b":
            def fmt(v):
                return "True" if v else "False"
        else:
            fmt = str
        flat = a.ravel()
        sample = flat if flat.size <= 1000 else np.concatenate([flat[:500], flat[-500:]])
        width = max(len(fmt(v)) for v in sample)
        body = np.array2string(a, separator=", ", formatter={"all": lambda v: fmt(v).rjust(width)},
                               prefix="tensor(",
                               threshold=1000, max_line_width=80)
    default_dtypes = (dtypes.get_default_dtype().np, np.dtype(np.int64), np.dtype(np.bool_))
    if a.dtype not in default_dtypes or (a.size == 0 and a.dtype != dtypes.get_default_dtype().np):
        extras.append(f"dtype=kiln.{dtypes._FROM_NP[a.dtype].name}")
    if t._node is not None:
        extras.append(f"grad_fn=<{t._node.name()}>")
    elif t._rg:
        extras.append("requires_grad=True")
    return "tensor(" + ", ".join([body] + extras) + ")"


def install_methods(methods: dict) -> None:
    """Attach operations (and operator dunders) from an ops module to Tensor."""
    for name, fn in methods.items():
        setattr(Tensor, name, fn)

