"""``kiln.export`` / ``kiln.load_exported``: a compiled graph as one self-contained file.

The artifact is a single safetensors file.  Its tensors are the weights (named by their graph
input names, e.g. ``model.0.weight``) and the constants too large to inline; its metadata holds
``"format": "kiln.export"`` and, under ``"kiln.export"``, one JSON document::

    {"format": "kiln.export", "format_version": 1, "kiln_version": "0.1.0", "name": ...,
     "dims": {"batch": {"traced_at": [4, 5, 11]}},
     "graph": {"inputs": [...], "nodes": [...], "outputs": [["out0", 12], ...]},
     "structure": ..., "checksums": {tensor name: CRC-32}}

(see ``kiln.export.graph_json`` for how nodes and attributes are written), and its CRC-32
under ``"kiln.export.crc32"``.  One file moves and replaces atomically, any safetensors reader
can list the weights, and reading it only parses JSON and copies bytes: nothing from the file
is ever executed or unpickled.  Names and strings that reach the executor's generated code are
checked first (see ``graph_json``).
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from kiln.export.graph_json import Decoder, Encoder, InvalidArtifact, decode_graph, encode_graph
from kiln.export.program import ExportedProgram
from kiln.serialization import write_atomic

__all__ = ["export", "load_exported", "FORMAT", "FORMAT_VERSION", "InvalidArtifact"]

FORMAT = "kiln.export"
FORMAT_VERSION = 1
_DOC = "kiln.export"
_DOC_CRC = "kiln.export.crc32"


def _kiln_version() -> str:
    import kiln

    return getattr(kiln, "__version__", "unknown")


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


# -- writing -------------------------------------------------------------------------------------

def export(model_or_fn, example_inputs, path, dynamic_dims=None) -> None:
    """Write ``model_or_fn``, traced on ``example_inputs``, as a standalone program at ``path``.

    ``example_inputs``: a tensor or a tuple of positional arguments (tensors, numpy arrays or
    constants; nested tuples, lists and dicts of tensors are flattened into named inputs).
    The model runs under ``kiln.no_grad()`` in its current mode (call ``.eval()`` first for
    inference).  ``dynamic_dims``: ``{input: {0: "batch"}}``, where ``input`` is an input's
    name (the function's parameter name, see ``ExportedProgram.input_specs``) or its position
    among the tensor inputs; the named dimension then takes any size at call time.  Only
    dimension 0 can be dynamic, with one name shared by every input that has it.  A model
    whose graph changes with that size in ways other than shapes (a branch on the size, a
    constant computed from it) is refused with the reason.

    Load the file with ``kiln.load_exported(path)``, in any process with Kiln: the model's code
    is not needed.

    >>> import kiln, os, tempfile
    >>> from kiln.export import export, load_exported
    >>> m = kiln.nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.kiln")
    >>> export(m, kiln.randn(4, 3), path, dynamic_dims={"input": {0: "batch"}})
    >>> prog = load_exported(path)
    >>> prog.input_specs[0].shape, prog(kiln.randn(7, 3)).shape
    (('batch', 3), kiln.Size([7, 2]))
    """
    from kiln.export.trace import capture
    from kiln.serialization import _safetensors

    stnp, _ = _safetensors()
    cap = capture(model_or_fn, example_inputs, dynamic_dims)
    g = cap.graph
    weight_nodes = [n for n in g.inputs if n.kind != "arg"]
    tensors: dict[str, np.ndarray] = {}
    extra: dict = {}
    for n in g.inputs:
        extra[n] = {"kind": "arg"}
    for n, w in zip(weight_nodes, cap.weights):
        key = n.name or "weight"
        while key in tensors:
            key += "'"
        tensors[key] = np.ascontiguousarray(w) if w.ndim else np.array(w)
        extra[n] = {"kind": "weight", "tensor": key}
    enc = Encoder(cap.sym_names)
    graph_doc = encode_graph(g, enc, extra)
    for key, a in enc.tensors.items():  # large constants, renamed if a weight has their name
        new = key
        while new in tensors:
            new += "'"
        if new != key:
            _rename_tensor(graph_doc, key, new)
        tensors[new] = a
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kiln_version": _kiln_version(),
           "name": cap.name, "dims": cap.dims, "graph": graph_doc,
           "structure": enc.value(cap.structure, "the output structure"),
           "checksums": {k: _crc(a) for k, a in tensors.items()}}
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    metadata = {"format": FORMAT, _DOC: text, _DOC_CRC: str(zlib.crc32(text.encode()))}
    write_atomic(os.fspath(path), lambda tmp: stnp.save_file(tensors, tmp, metadata=metadata))


def _rename_tensor(obj, old: str, new: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "$tensor" and v == old:
                obj[k] = new
            else:
                _rename_tensor(v, old, new)
    elif isinstance(obj, list):
        for v in obj:
            _rename_tensor(v, old, new)


# -- reading -------------------------------------------------------------------------------------

def load_exported(path) -> ExportedProgram:
    """Read a program written by ``kiln.export`` and return it as an ``ExportedProgram``.

    Checks the format and its version (a file from a newer Kiln is refused, naming both
    versions), the checksums, every operation (it must be a primitive of this Kiln) and the
    graph's invariants.  Never executes code from the file.
    """
    from kiln.graph.ir import GraphError, verify
    from kiln.serialization import _check_header, _safetensors, read_header_bytes

    _, safe_open = _safetensors()
    path = os.fspath(path)
    where = repr(path)
    raw, size = read_header_bytes(path)
    try:
        header = _check_header(raw, size, where)
    except RuntimeError as e:
        raise InvalidArtifact(str(e).replace("kiln.load:", "kiln.load_exported:", 1)) from None
    meta = header.get("__metadata__") or {}
    dec = Decoder({}, where)
    if not isinstance(meta, dict) or _DOC not in meta:
        hint = (" (it is a kiln.save checkpoint: use kiln.load)"
                if isinstance(meta, dict) and "kiln.tree" in meta else "")
        raise InvalidArtifact(f"kiln.load_exported: {where} is not a Kiln exported program: "
                              f"its metadata has no {_DOC!r} entry{hint}")
    text = meta[_DOC]
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise dec.fail("the graph document", f"unreadable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise dec.fail("the graph document", "not a JSON object")
    _check_version(doc, where)
    if meta.get(_DOC_CRC) != str(zlib.crc32(text.encode())):
        raise dec.fail("the graph document", "checksum mismatch: the header is corrupt")
    try:
        with safe_open(path, framework="np") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except Exception as e:  # the Rust parser's SafetensorError and friends
        raise dec.fail("the tensors", str(e)) from None
    crcs = doc.get("checksums")
    if not isinstance(crcs, dict) or set(crcs) != set(tensors):
        raise dec.fail("the tensors", "the checksum table does not list exactly the tensors")
    for k, a in tensors.items():
        if _crc(a) != crcs[k]:
            raise dec.fail(f"tensor {k!r}", "checksum mismatch: the data is corrupt")
    dec.tensors = tensors
    gdoc = doc.get("graph")
    if not isinstance(gdoc, dict):
        raise dec.fail("graph", "missing")
    g, entries = decode_graph(gdoc, dec)
    weights = _bind_weights(g, entries, dec)
    try:
        verify(g)
    except GraphError as e:
        raise dec.fail("graph", str(e)) from None
    _check_dims(g, dec)
    structure = dec.value(doc.get("structure"), "structure")
    if _count_outputs(structure, dec) != len(g.outputs):
        raise dec.fail("structure", f"does not hold the {len(g.outputs)} outputs")
    name = doc.get("name", "program")
    name = dec.text(name, "name") if isinstance(name, str) and name else "program"
    return ExportedProgram(g, weights, structure, name, doc)


def _check_version(doc: dict, where: str) -> None:
    fmt, version = doc.get("format"), doc.get("format_version")
    if fmt != FORMAT:
        raise InvalidArtifact(f"kiln.load_exported: {where} has unknown format {str(fmt)[:40]!r} "
                              f"(expected {FORMAT!r})")
    written_by = str(doc.get("kiln_version", "unknown"))[:40]
    if type(version) is not int or version < 1:
        raise InvalidArtifact(f"kiln.load_exported: {where} has unknown format version "
                              f"{str(version)[:40]!r} (written by Kiln {written_by}); this "
                              f"Kiln ({_kiln_version()}) reads format version {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise InvalidArtifact(f"kiln.load_exported: {where} has format version {version}, "
                              f"written by a newer Kiln ({written_by}); this Kiln "
                              f"({_kiln_version()}) reads format version {FORMAT_VERSION}: "
                              "upgrade Kiln to load it")


def _bind_weights(g, entries: list, dec: Decoder) -> list:
    """The weight arrays in graph input order; arguments must come before weights."""
    weights = []
    for k, (n, e) in enumerate(zip(g.inputs, entries)):
        kind = e.get("kind")
        if kind == "arg":
            if weights:
                raise dec.fail(f"input {k}", "arguments must come before weights")
            continue
        if kind != "weight":
            raise dec.fail(f"input {k}", f"unknown kind {str(kind)[:20]!r}")
        key = e.get("tensor")
        if not isinstance(key, str) or key not in dec.tensors:
            raise dec.fail(f"input {k}", f"refers to a missing tensor {str(key)[:80]!r}")
        a = dec.tensors[key]
        if a.shape != n.shape or a.dtype != n.dtype:
            raise dec.fail(f"weight {key!r}", f"stored as {a.dtype}{list(a.shape)}, the graph "
                                              f"expects {n.dtype}{list(n.shape)}")
        a.setflags(write=False)  # shared by every call: nothing may write into it
        n.kind = "captured"
        weights.append(a)
    return weights


def _check_dims(g, dec: Decoder) -> None:
    """Every dynamic dimension must be readable from an argument's shape."""
    from kiln.graph.symbolic import Sym

    bound = {d.name for n in g.inputs if n.kind == "arg" for d in n.shape if isinstance(d, Sym)}
    for n in g.inputs + g.nodes:
        if n.kind == "captured" and any(isinstance(d, Sym) for d in n.shape):
            raise dec.fail(f"weight {n.name!r}", "a weight cannot have a dynamic dimension")
        for s in _syms(n.shape) + _syms(n.attrs):
            if s.name not in bound:
                raise dec.fail(f"node {n.op}", f"dimension {s.name!r} is not the size of any "
                                               "input's dimension")


def _syms(obj) -> list:
    from kiln.graph.symbolic import Sym

    if isinstance(obj, Sym):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [s for x in obj for s in _syms(x)]
    if isinstance(obj, dict):
        return [s for x in obj.values() for s in _syms(x)]
    if isinstance(obj, slice):
        return _syms((obj.start, obj.stop, obj.step))
    return []


def _count_outputs(spec, dec: Decoder) -> int:
    """Check the output structure's shape and count its tensor slots."""
    if spec == "T":
        return 1
    if isinstance(spec, tuple) and spec and spec[0] in ("tuple", "list") and len(spec) == 2 \
            and isinstance(spec[1], tuple):
        return sum(_count_outputs(s, dec) for s in spec[1])
    if isinstance(spec, tuple) and spec and spec[0] == "dict" and len(spec) == 2 \
            and isinstance(spec[1], tuple):
        total = 0
        for item in spec[1]:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise dec.fail("structure", "bad dict entry")
            total += _count_outputs(item[1], dec)
        return total
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "const":
        return 0
    raise dec.fail("structure", f"unexpected entry {str(spec)[:60]}")
