"""ONNX out and ONNX in: ``kiln.onnx.export`` and ``kiln.onnx.load``.

An optional extra: ``pip install "kiln[onnx]"`` installs the ``onnx`` and ``onnxruntime``
packages.  ``import kiln`` never imports this package; ``import kiln.onnx`` does not import
``onnx`` until a function here is called.
"""

from __future__ import annotations


def export(model_or_fn, example_inputs, path, *, opset=None, dynamic_dims=None, **kwargs):
    """Export a model or function of tensors to an ONNX file; see docs/onnx.md."""
    from kiln.onnx.exporter import export as _export

    return _export(model_or_fn, example_inputs, path, opset=opset, dynamic_dims=dynamic_dims,
                   **kwargs)


def load(model):
    """An ``nn.Module`` running an ONNX model (a path, bytes or ``onnx.ModelProto``)."""
    from kiln.onnx.importer import load as _load

    return _load(model)
