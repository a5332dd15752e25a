"""Dynamic dimensions: ``Sym`` stands for ``mul * name + add`` (for example ``B`` or ``64*B``).

A graph traced at two batch sizes is turned into one graph for every batch size by ``unify``:
wherever the two traces differ only by an integer that is a linear function of the batch size,
the integer becomes a ``Sym``; any other difference means the graphs cannot be merged.
"""

from __future__ import annotations

from typing import Any


class Sym:
    """An integer that depends linearly on a dynamic dimension: ``mul * name + add``."""

    __slots__ = ("name", "mul", "add")

    def __init__(self, name: str, mul: int = 1, add: int = 0) -> None:
        self.name, self.mul, self.add = name, mul, add

    def value(self, env: dict) -> int:
        return self.mul * env[self.name] + self.add

    def __eq__(self, other) -> bool:
        return (isinstance(other, Sym) and
                (self.name, self.mul, self.add) == (other.name, other.mul, other.add))

    def __hash__(self) -> int:
        return hash((self.name, self.mul, self.add))

    def __repr__(self) -> str:
        s = self.name if self.mul == 1 else f"{self.mul}*{self.name}"
        if self.add:
            s += f"{'+' if self.add > 0 else '-'}{abs(self.add)}"
        return s

    def source(self) -> str:
        """The Python expression for this value in generated code."""
        return f"({self!r})".replace("*", " * ")


def has_sym(obj: Any) -> bool:
    """True if ``obj`` (an int, tuple, list or dict of them) contains a ``Sym``."""
    if isinstance(obj, Sym):
        return True
    if isinstance(obj, (tuple, list)):
        return any(has_sym(x) for x in obj)
    if isinstance(obj, dict):
        return any(has_sym(x) for x in obj.values())
    return False


def resolve(obj: Any, env: dict) -> Any:
    """``obj`` with every ``Sym`` replaced by its value for the dimensions in ``env``."""
    if isinstance(obj, Sym):
        return obj.value(env)
    if isinstance(obj, tuple):
        return rebuild(obj, [resolve(x, env) for x in obj])
    if isinstance(obj, list):
        return [resolve(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, env) for k, v in obj.items()}
    return obj


def rebuild(like, items: list):
    """A tuple or list of ``like``'s type holding ``items`` (tuple subclasses such as
    ``kiln.ops.index.Slice`` take their fields as arguments, ``kiln.Size`` an iterable)."""
    cls = type(like)
    if cls in (tuple, list):
        return cls(items)
    if cls.__new__ is not tuple.__new__ and hasattr(like, "__getnewargs__"):
        return cls(*items)
    return cls(items)


class CannotUnify(Exception):
    """The two traces differ in a way a dynamic dimension does not explain."""


def unify_value(a: Any, b: Any, name: str, n1: int, n2: int) -> Any:
    """One value from the trace at size ``n1`` (``a``) and at ``n2`` (``b``): equal parts stay,
    integers that differ become ``Sym(name, mul, add)`` with ``a = mul*n1+add``,
    ``b = mul*n2+add``."""
    if type(a) is not type(b):
        raise CannotUnify(f"{a!r} vs {b!r}")
    if isinstance(a, bool) or a is None or isinstance(a, (str, float, complex)):
        if a != b and not (a != a and b != b):  # NaN equals NaN here
            raise CannotUnify(f"{a!r} vs {b!r}")
        return a
    if isinstance(a, int):
        if a == b:
            return a
        mul, rem = divmod(b - a, n2 - n1)
        if rem or mul == 0:
            raise CannotUnify(f"{a} vs {b}")
        add = a - mul * n1
        if add != b - mul * n2:
            raise CannotUnify(f"{a} vs {b}")
        return Sym(name, mul, add)
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise CannotUnify(f"{a!r} vs {b!r}")
        return rebuild(a, [unify_value(x, y, name, n1, n2) for x, y in zip(a, b)])
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise CannotUnify(f"attributes {sorted(a)} vs {sorted(b)}")
        return {k: unify_value(a[k], b[k], name, n1, n2) for k in a}
    if a == b:
        return a
    raise CannotUnify(f"{a!r} vs {b!r}")
