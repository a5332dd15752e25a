"""A Graph as JSON-ready data and back, with every value type-tagged and every field checked.

Attribute values are written with explicit tags, so that reading never guesses and never runs
code: JSON null/true/false/ints/strings/lists stand for themselves; finite floats are JSON
numbers; ``{"$float": "nan"}`` (or "inf", "-inf"), ``{"$tuple": [...]}``, ``{"$dict": [[k, v],
...]}``, ``{"$sym": [name, mul, add]}``, ``{"$dtype": "float32"}``, ``{"$slice": [a, b, c]}``,
``{"$Slice": [a, b, c]}`` (kiln.ops.index.Slice), ``{"$ellipsis": true}``, small arrays and
numpy scalars inline as ``{"$array": {"dtype", "shape", "hex"}}`` / ``{"$scalar": {...}}``
(little-endian bytes, so NaN payloads and -0.0 survive), and larger arrays as
``{"$tensor": key}``, a tensor stored beside the graph.

Node references are integers: graph inputs are 0..k-1, then the nodes in execution order.
Decoding is strict: anything unexpected raises ``InvalidArtifact`` naming where it is.  Names,
source locations, attribute keys and dimension names end up in generated source comments and
keyword arguments, so they are checked (printable text, identifiers) before the graph is built.
"""

from __future__ import annotations

import keyword
import math

import numpy as np

from kiln.graph.ir import Graph, Node
from kiln.graph.symbolic import Sym

INLINE_MAX = 16  # arrays with more elements are stored as tensors, not in the JSON

# The dtypes an artifact may contain (Kiln's dtypes); anything else is refused when reading.
DTYPES = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                    "float64"})


class InvalidArtifact(RuntimeError):
    """An exported program whose contents are malformed (corrupt or not written by Kiln)."""


# -- encoding ------------------------------------------------------------------------------------

class Encoder:
    """Turns attribute values into tagged JSON data, collecting large arrays in ``tensors``."""

    def __init__(self, sym_names: dict | None = None) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.sym_names = sym_names or {}  # rename dynamic dimensions ("B" -> "batch")

    def array(self, a: np.ndarray, key: str):
        if a.dtype.name not in DTYPES:
            raise TypeError(f"kiln.export: {key}: arrays of dtype {a.dtype} cannot be exported")
        if a.size <= INLINE_MAX:
            return {"$array": _inline(a)}
        self.tensors[key] = np.ascontiguousarray(a) if a.ndim else a.copy()
        return {"$tensor": key}

    def sym(self, s: Sym) -> Sym:
        return Sym(self.sym_names.get(s.name, s.name), s.mul, s.add)

    def value(self, v, where: str):
        """Tagged JSON data for attribute value ``v`` (``where`` names it in errors)."""
        from kiln.ops.index import Slice
        from kiln.tensor import Size

        if v is None or isinstance(v, (bool, str)):
            return v
        if type(v) is int:
            return v
        if type(v) is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, Sym):
            s = self.sym(v)
            return {"$sym": [s.name, s.mul, s.add]}
        if isinstance(v, Slice):
            return {"$Slice": [self.value(x, where) for x in v]}
        if type(v) is tuple or isinstance(v, Size):  # Size: a shape, read back as a tuple
            return {"$tuple": [self.value(x, where) for x in v]}
        if type(v) is list:
            return [self.value(x, where) for x in v]
        if type(v) is dict:
            return {"$dict": [[self.value(k, where), self.value(x, f"{where}[{k!r}]")]
                              for k, x in v.items()]}
        if isinstance(v, slice):
            return {"$slice": [self.value(x, where) for x in (v.start, v.stop, v.step)]}
        if v is Ellipsis:
            return {"$ellipsis": True}
        if isinstance(v, np.dtype):
            return {"$dtype": v.name}
        if isinstance(v, np.ndarray):
            return self.array(v, where)
        if isinstance(v, np.generic):
            return {"$scalar": _inline(np.asarray(v))}
        raise TypeError(f"kiln.export: {where} is a {type(v).__module__}.{type(v).__qualname__}, "
                        "which the artifact format cannot store")

    def shape(self, shape) -> list:
        return [self.value(d, "shape") for d in shape]


def _inline(a: np.ndarray) -> dict:
    return {"dtype": a.dtype.name, "shape": list(a.shape),
            "hex": a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes().hex()}


def encode_graph(g: Graph, enc: Encoder, input_extra: dict) -> dict:
    """``g`` as JSON-ready data; ``input_extra[node]`` adds fields to an input's entry."""
    index: dict[Node, int] = {}
    inputs = []
    for n in g.inputs:
        index[n] = len(index)
        inputs.append({"name": n.name, "shape": enc.shape(n.shape), "dtype": n.dtype.name,
                       **input_extra.get(n, {})})
    nodes = []
    for k, n in enumerate(g.nodes):
        if n.op in ("fused", "input"):
            raise ValueError(f"kiln.export: node %{n.id} is {n.op!r}; export the unfused graph")
        where = f"node {k} ({n.op})"
        attrs = {key: enc.value(v, f"{where} attribute {key!r}") for key, v in n.attrs.items()}
        if n.op == "const":
            attrs = {"value": enc.array(n.attrs["value"], f"const.{k}")}
        nodes.append({"op": n.op, "inputs": [index[i] for i in n.inputs], "attrs": attrs,
                      "shape": enc.shape(n.shape), "dtype": n.dtype.name,
                      "loc": _printable(n.loc)})
        index[n] = len(index)
    return {"inputs": inputs, "nodes": nodes,
            "outputs": [[name, index[n]] for name, n in g.outputs.items()]}


def _printable(text: str) -> str:
    # source locations come from file paths; the reader accepts printable text only
    return "".join(c if c.isprintable() else "?" for c in text)


# -- decoding ------------------------------------------------------------------------------------

class Decoder:
    """Reads tagged JSON data back into values, checking every field; ``tensors`` holds the
    arrays stored beside the graph (``{"$tensor": key}``)."""

    def __init__(self, tensors, where: str) -> None:
        self.tensors = tensors
        self.where = where  # the file, for messages
        self.used: set = set()  # tensor keys the graph referred to

    def fail(self, what: str, why: str) -> InvalidArtifact:
        return InvalidArtifact(f"kiln.load_exported: {self.where} is not a valid Kiln exported "
                               f"program: {what}: {why}")

    def value(self, v, what: str):
        from kiln.ops.index import Slice

        if v is None or isinstance(v, (bool, str)) or type(v) is int:
            return v
        if type(v) is float:
            if not math.isfinite(v):
                raise self.fail(what, "non-finite float written without a tag")
            return v
        if isinstance(v, list):
            return [self.value(x, what) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise self.fail(what, f"unexpected value {str(v)[:60]}")
        (tag, body), = v.items()
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise self.fail(what, f"bad $float {str(body)[:20]!r}")
            return float(body)
        if tag == "$tuple":
            return tuple(self.value(x, what) for x in self.list(body, what))
        if tag == "$dict":
            out = {}
            for item in self.list(body, what):
                if not isinstance(item, list) or len(item) != 2:
                    raise self.fail(what, "a $dict item is not a [key, value] pair")
                key = self.value(item[0], what)
                try:
                    out[key] = self.value(item[1], what)
                except TypeError:  # an unhashable key
                    raise self.fail(what, f"unusable dict key {str(item[0])[:40]}") from None
            return out
        if tag == "$sym":
            return self.sym(body, what)
        if tag in ("$slice", "$Slice"):
            parts = self.list(body, what)
            if len(parts) != 3:
                raise self.fail(what, f"{tag} needs 3 parts")
            parts = [self.value(x, what) for x in parts]
            if not all(x is None or type(x) is int or isinstance(x, Sym) for x in parts):
                raise self.fail(what, f"{tag} parts must be integers, dimensions or null")
            if tag == "$slice":
                return slice(*parts)
            if None in parts:
                raise self.fail(what, "$Slice parts must be integers or dimensions")
            return Slice(*parts)
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$dtype":
            return self.dtype(body, what)
        if tag == "$array":
            return self.inline(body, what)
        if tag == "$scalar":
            a = self.inline(body, what)
            if a.ndim:
                raise self.fail(what, "a $scalar must have shape []")
            return a[()]
        if tag == "$tensor":
            if not isinstance(body, str) or body not in self.tensors:
                raise self.fail(what, f"refers to a missing tensor {str(body)[:80]!r}")
            self.used.add(body)
            return self.tensors[body]
        raise self.fail(what, f"unknown tag {tag[:40]!r}")

    def list(self, v, what: str) -> list:
        if not isinstance(v, list):
            raise self.fail(what, f"expected a list, got {str(v)[:40]}")
        return v

    def sym(self, body, what: str) -> Sym:
        if (not isinstance(body, list) or len(body) != 3 or not self.is_ident(body[0])
                or type(body[1]) is not int or type(body[2]) is not int or body[1] == 0):
            raise self.fail(what, f"bad dimension {str(body)[:60]}")
        return Sym(*body)

    def dtype(self, name, what: str) -> np.dtype:
        if name not in DTYPES:
            raise self.fail(what, f"unsupported dtype {str(name)[:20]!r}")
        return np.dtype(name)

    def inline(self, body, what: str) -> np.ndarray:
        if not isinstance(body, dict) or set(body) != {"dtype", "shape", "hex"}:
            raise self.fail(what, "an inline array needs dtype, shape and hex")
        dt = self.dtype(body["dtype"], what).newbyteorder("<")
        shape = self.shape(body["shape"], what, dynamic=False)
        try:
            raw = bytes.fromhex(body["hex"])
        except (TypeError, ValueError):
            raise self.fail(what, "inline array data is not hex") from None
        if len(raw) != int(np.prod(shape)) * dt.itemsize:
            raise self.fail(what, "inline array data does not match its shape")
        return np.frombuffer(raw, dt).astype(dt.newbyteorder("="), copy=True).reshape(shape)

    def shape(self, v, what: str, dynamic: bool = True) -> tuple:
        out = []
        for d in self.list(v, what):
            if type(d) is int and d >= 0:
                out.append(d)
            elif dynamic and isinstance(d, dict) and set(d) == {"$sym"}:
                out.append(self.sym(d["$sym"], what))
            else:
                raise self.fail(what, f"bad shape {str(v)[:60]}")
        return tuple(out)

    def text(self, v, what: str) -> str:
        if not isinstance(v, str) or not v.isprintable():
            raise self.fail(what, f"expected printable text, got {str(v)[:60]!r}")
        return v

    @staticmethod
    def is_ident(v) -> bool:
        return isinstance(v, str) and v.isidentifier() and not keyword.iskeyword(v)


def decode_graph(doc: dict, dec: Decoder) -> tuple[Graph, list[dict]]:
    """The Graph described by ``doc`` (from ``encode_graph``) and the raw input entries."""
    from kiln.ops.registry import REGISTRY

    g = Graph()
    refs: list[Node] = []
    entries = dec.list(doc.get("inputs"), "inputs")
    for k, e in enumerate(entries):
        what = f"input {k}"
        if not isinstance(e, dict):
            raise dec.fail(what, "not an object")
        name = dec.text(e.get("name"), f"{what} name")
        n = g.add_input(name, dec.shape(e.get("shape"), what),
                        dec.dtype(e.get("dtype"), what), kind=e.get("kind", "arg"))
        refs.append(n)
    for k, e in enumerate(dec.list(doc.get("nodes"), "nodes")):
        what = f"node {k}"
        if not isinstance(e, dict):
            raise dec.fail(what, "not an object")
        op = e.get("op")
        if op != "const" and (not isinstance(op, str) or op not in REGISTRY):
            raise dec.fail(what, f"unknown operation {str(op)[:60]!r}: this Kiln has no such "
                                 "primitive (the artifact needs a newer Kiln?)")
        what = f"node {k} ({op})"
        ins = []
        for i in dec.list(e.get("inputs"), what):
            if type(i) is not int or not 0 <= i < len(refs):
                raise dec.fail(what, f"input reference {str(i)[:20]} is not an earlier value")
            ins.append(refs[i])
        raw = e.get("attrs")
        if not isinstance(raw, dict):
            raise dec.fail(what, "attrs is not an object")
        attrs = {}
        for key, v in raw.items():
            if not dec.is_ident(key):  # keys become keyword arguments in generated code
                raise dec.fail(what, f"attribute name {key[:40]!r} is not an identifier")
            attrs[key] = dec.value(v, f"{what} attribute {key!r}")
        shape = dec.shape(e.get("shape"), what)
        dtype = dec.dtype(e.get("dtype"), what)
        loc = dec.text(e.get("loc", ""), f"{what} loc")
        if op == "const":
            value = attrs.get("value")
            if (set(attrs) != {"value"} or not isinstance(value, np.ndarray)
                    or value.shape != shape or value.dtype != dtype):
                raise dec.fail(what, "a const needs one array 'value' matching its shape and dtype")
        n = Node(op, ins, attrs, shape, dtype, loc=loc)
        g.nodes.append(n)
        refs.append(n)
    for item in dec.list(doc.get("outputs"), "outputs"):
        if (not isinstance(item, list) or len(item) != 2 or type(item[1]) is not int
                or not 0 <= item[1] < len(refs)):
            raise dec.fail("outputs", f"bad output entry {str(item)[:60]}")
        name = dec.text(item[0], "output name")
        if name in g.outputs:
            raise dec.fail("outputs", f"output {name!r} listed twice")
        g.outputs[name] = refs[item[1]]
    return g, entries
