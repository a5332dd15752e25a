"""The optional packages behind kiln.onnx, imported on first use with a clear install line."""

from __future__ import annotations

import importlib

INSTALL = 'pip install "kiln[onnx]"'


def require(name: str = "onnx"):
    """Import ``onnx`` or ``onnxruntime``, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"kiln.onnx needs the {name} package, which is an optional extra: "
                          f"{INSTALL}") from e
